#!/usr/bin/env python3
"""PyTorch's BYOL step, written out, for trainer/tests/torch_step.rs to hold ours to.

A tiny BYOL in PyTorch, fp32 on the CPU: a ResNet-18 with the small-image stem in
torchvision's layout (width 2: 2/4/8/16 channels), a projector and a predictor
`Linear -> BatchNorm1d -> ReLU -> Linear`, an EMA target (encoder + projector), and the
symmetric loss `L(p1, sg t2) + L(p2, sg t1)`, `L(p, z) = mean(2 - 2 cos(p, z))` (Grill
et al. 2020). Three steps from the same weights on seeded views, for each case:

  sgd          torch.optim.SGD, momentum 0.9, weight decay on weights only (ours by default)
  sgd-decay-all  the same with weight decay on every parameter, biases and BatchNorm's
               too (a plain torch.optim.SGD over model.parameters(); ours with
               `optim.decay_norm_and_bias = true`)
  adamw        torch.optim.AdamW, weight decay on weights only
  lars         LARS as BYOL's paper defines it (appendix C), written out here (PyTorch
               has none): g <- g + wd w; g <- g * eta ||w|| / ||g|| (when both norms are
               positive); m <- mu m + g; w <- w - lr m; biases and BatchNorm parameters
               take neither the decay nor the trust ratio.

The learning rate is `base_lr * batch / 256` on a cosine over `total_steps` (no warm-up),
tau `1 - (1 - tau_base)(cos(pi k / K) + 1) / 2` after step k (0-based); the EMA covers the
trainable parameters only (BatchNorm's running statistics of the target come from its own
forwards, as in ours and lightly's `update_momentum`).

Writes `trainer/tests/fixtures/torch-step/CASE.safetensors`, with tensors under our
names (`encoder.layer1.0.conv1.weight`, `projector.0.weight`, `predictor.3.bias`, ...):
  init.online.NAME, init.target.NAME      the weights before the first step
  stepK.v1, stepK.v2                      the views of step K (K = 0, 1, 2)
  stepK.loss                              the loss of step K (a 1-element tensor)
  stepK.grad.NAME                         the gradient of every trainable parameter
  stepK.online.NAME, stepK.target.NAME    the weights (and running statistics) after it
  stepK.optim.NAME.{momentum,m,v}         the optimizer's state after it
and the settings in the file's metadata (`settings`, JSON).

  python3 scripts/peer_byol_step_fixtures.py [--out trainer/tests/fixtures/torch-step]

Needs torch and safetensors (pip); not run by CI: the files it writes are committed.
"""
import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

WIDTH = 2
BATCH = 8
SIZE = 16
HIDDEN = 16
PROJ = 8
STEPS = 3
TOTAL_STEPS = 10
TAU_BASE = 0.99
BN_MOMENTUM = 0.1
BN_EPS = 1e-5

CASES = {
    "sgd": dict(optimizer="sgd", base_lr=0.5, weight_decay=1e-2, decay_all=False),
    "sgd-decay-all": dict(optimizer="sgd", base_lr=0.5, weight_decay=1e-2, decay_all=True),
    "adamw": dict(optimizer="adamw", base_lr=1e-2, weight_decay=1e-2, decay_all=False),
    "lars": dict(optimizer="lars", base_lr=2.0, weight_decay=1e-2, decay_all=False),
}


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


class ResNet18Small(nn.Module):
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, `w` wide."""

    def __init__(self, w):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w, eps=BN_EPS, momentum=BN_MOMENTUM)
        cin = w
        for i, (planes, stride) in enumerate([(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)]):
            blocks = [BasicBlock(cin, planes, stride), BasicBlock(planes, planes, 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.dim = cin

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        for i in range(4):
            y = getattr(self, f"layer{i + 1}")(y)
        return y.mean(dim=(2, 3))


def mlp(cin, hidden, cout):
    return nn.Sequential(
        nn.Linear(cin, hidden),
        nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM),
        nn.ReLU(),
        nn.Linear(hidden, cout),
    )


class Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ResNet18Small(WIDTH)
        self.projector = mlp(self.encoder.dim, HIDDEN, PROJ)

    def forward(self, x):
        return self.projector(self.encoder(x))


def regression(p, z):
    return (2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1)).mean()


def decayed(param, decay_all):
    return decay_all or param.dim() > 1


def lr_at(cfg, step):
    peak = cfg["base_lr"] * BATCH / 256
    return peak * 0.5 * (1 + math.cos(math.pi * min(step / TOTAL_STEPS, 1.0)))


def tau_at(step):
    return 1 - (1 - TAU_BASE) * (math.cos(math.pi * min(step / TOTAL_STEPS, 1.0)) + 1) / 2


class Lars:
    """BYOL's LARS (appendix C of Grill et al. 2020), as ours computes it."""

    def __init__(self, named, momentum, weight_decay, eta, decay_all):
        self.named = named
        self.momentum, self.wd, self.eta = momentum, weight_decay, eta
        self.decay_all = decay_all
        self.buf = {n: torch.zeros_like(p) for n, p in named}

    @torch.no_grad()
    def step(self, lr):
        for n, p in self.named:
            g = p.grad
            if decayed(p, self.decay_all):
                g = g + self.wd * p
                wn, gn = p.norm(), g.norm()
                trust = torch.where((wn > 0) & (gn > 0), self.eta * wn / gn, torch.ones_like(wn))
                g = g * trust
            self.buf[n] = self.momentum * self.buf[n] + g
            p.sub_(lr * self.buf[n])

    def state(self):
        return {f"{n}.momentum": b for n, b in self.buf.items()}


def make_optimizer(cfg, named):
    groups = [
        {"params": [p for _, p in named if decayed(p, cfg["decay_all"])], "weight_decay": cfg["weight_decay"]},
        {"params": [p for _, p in named if not decayed(p, cfg["decay_all"])], "weight_decay": 0.0},
    ]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, nesterov=False)
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    return Lars(named, 0.9, cfg["weight_decay"], 1e-3, cfg["decay_all"])


def optimizer_state(cfg, opt, named):
    if isinstance(opt, Lars):
        return opt.state()
    out = {}
    for n, p in named:
        s = opt.state[p]
        if cfg["optimizer"] == "sgd":
            out[f"{n}.momentum"] = s["momentum_buffer"]
        else:
            out[f"{n}.m"] = s["exp_avg"]
            out[f"{n}.v"] = s["exp_avg_sq"]
    return out


def named_state(module, prefix=""):
    """Parameters and buffers under our names (num_batches_tracked as int64)."""
    return {prefix + k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def run(name, cfg):
    torch.manual_seed(0)
    online = Network()
    predictor = mlp(PROJ, HIDDEN, PROJ)
    # BatchNorm's affine parameters away from 1 / 0, so a swapped or dropped one shows.
    with torch.no_grad():
        for m in list(online.modules()) + list(predictor.modules()):
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    target = Network()
    target.load_state_dict(online.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)
    online.train(); predictor.train(); target.train()

    trainable = sorted(
        [(f"{n}", p) for n, p in online.named_parameters()]
        + [(f"predictor.{n}", p) for n, p in predictor.named_parameters()]
    )
    opt = make_optimizer(cfg, trainable)
    out = {}
    for k, v in named_state(online).items():
        out[f"init.online.{k}"] = v
    for k, v in named_state(predictor, "predictor.").items():
        out[f"init.online.{k}"] = v
    for k, v in named_state(target).items():
        out[f"init.target.{k}"] = v

    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        v1 = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
        v2 = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
        out[f"step{step}.v1"], out[f"step{step}.v2"] = v1, v2
        z1 = online(v1)
        p1 = predictor(z1)
        z2 = online(v2)
        p2 = predictor(z2)
        with torch.no_grad():
            t1 = target(v1)
            t2 = target(v2)
        loss = regression(p1, t2) + regression(p2, t1)
        for _, p in trainable:
            p.grad = None
        loss.backward()
        out[f"step{step}.loss"] = loss.detach().reshape(1)
        for n, p in trainable:
            out[f"step{step}.grad.{n}"] = p.grad.detach().clone()
        lr = lr_at(cfg, step)
        if isinstance(opt, Lars):
            opt.step(lr)
        else:
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
        tau = tau_at(step)
        with torch.no_grad():
            for (n, t), (_, o) in zip(target.named_parameters(), online.named_parameters()):
                t.mul_(tau).add_(o, alpha=1 - tau)
        for k, v in named_state(online).items():
            out[f"step{step}.online.{k}"] = v
        for k, v in named_state(predictor, "predictor.").items():
            out[f"step{step}.online.{k}"] = v
        for k, v in named_state(target).items():
            out[f"step{step}.target.{k}"] = v
        for k, v in optimizer_state(cfg, opt, trainable).items():
            out[f"step{step}.optim.{k}"] = v.detach().clone()
    settings = dict(cfg, width=WIDTH, batch=BATCH, size=SIZE, hidden=HIDDEN, projection=PROJ,
                    steps=STEPS, total_steps=TOTAL_STEPS, tau_base=TAU_BASE,
                    bn_momentum=BN_MOMENTUM, bn_eps=BN_EPS, torch=torch.__version__)
    return out, settings


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "trainer", "tests", "fixtures", "torch-step"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(a.out, exist_ok=True)
    for name, cfg in CASES.items():
        tensors, settings = run(name, cfg)
        path = os.path.join(a.out, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path,
                  metadata={"settings": json.dumps(settings)})
        print(f"{path}: {len(tensors)} tensors, loss {[round(float(tensors[f'step{s}.loss']), 6) for s in range(STEPS)]}")


if __name__ == "__main__":
    main()
