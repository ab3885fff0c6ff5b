#!/usr/bin/env python3
"""PyTorch BYOL training-step throughput on CPU or CUDA (the same work as our trainer's
BYOL step, `Trainer::step_tensors`), the peer a user would pick instead of our trainer.

Model: ResNet-18 (BasicBlock [2,2,2,2], widths w,2w,4w,8w, features 8w) or ResNet-50
(torchvision's Bottleneck [3,4,6,3], expansion 4, stride on the 3x3 conv as torchvision
v1.5, widths w..8w, features 32w); w = --width = channels of the first stage.
CIFAR stem = 3x3 conv s1 + BN + ReLU, no maxpool; ImageNet stem = 7x7 s2 conv + BN + ReLU
+ 3x3/2 maxpool. Global avg pool, projector Linear(feat,4096)-BN1d-ReLU-Linear(4096,256),
predictor Linear(256,4096)-BN1d-ReLU-Linear(4096,256) (--proj-hidden, --proj-dim,
--pred-hidden). Init as ours: Kaiming normal fan-out for convolutions, BN 1/0, Linear as
PyTorch's default. BN momentum 0.1, eps 1e-5.
Target = EMA copy of encoder+projector (--tau 0.996, constant), forward under no_grad with
BN in train mode (its own running statistics; the EMA covers parameters, not buffers).
Step: online fwd on view1 and view2 (batch B each, each view its own BN statistics),
target fwd on both, symmetric loss 2-2cos(p1,z2) + 2-2cos(p2,z1) (fp32), backward,
optimizer, EMA, then the loss and the collapse indicator read back to the host (as ours).
Optimizers (lr = --base-lr * B / 256, constant; weight decay --weight-decay; biases and
BatchNorm parameters = every rank-1 parameter get no weight decay, as ours):
  lars  (default) as ours: g += wd*w; g *= eta*|w|/|g| (1 where a norm is 0); mu = m*mu + g;
        w -= lr*mu; rank-1 parameters: plain momentum SGD (no decay, no trust ratio).
        momentum 0.9, eta 1e-3, wd 1.5e-6, base lr 0.2.
  sgd   torch.optim.SGD, momentum --momentum, coupled weight decay on rank>1 parameters.
  adamw torch.optim.AdamW, betas (0.9, 0.999), eps 1e-8, decoupled decay on rank>1 params.
Precision: fp32 = true fp32 unless --tf32 on (sets torch.backends.cuda.matmul.allow_tf32
and torch.backends.cudnn.allow_tf32; default off); bf16 = torch.autocast(device, bfloat16)
around forward passes and loss: bf16 convolutions and matmuls, fp32 master weights, BN
parameters and statistics, weight gradients and loss (as autocast does, activations between
layers stay bf16; ours casts each conv/matmul output back to f32). Eager mode (no
torch.compile), NCHW unless --channels-last on. Inputs are random N(0,1) tensors made on the device outside the
timed region (no data loading).
Timing: per step, wall time between torch.cuda.synchronize() calls (CUDA); the median over
--steps steps after --warmup untimed steps. images/s = B / median step seconds (each image
counted once; two views per image). Peak memory = torch.cuda.max_memory_reserved() and
max_memory_allocated() after the timed steps (0 on CPU).

Set-up: pip install torch   (CUDA build for the GPU runs; nothing else needed)
Run (GPU; a fresh process per case):
  python3 peer_torch_byol_step.py --device cuda --arch resnet18 --stem cifar --res 32 --batch 256 --precision fp32 --steps 20 --warmup 5 --json
  python3 peer_torch_byol_step.py --device cuda --arch resnet18 --stem cifar --res 32 --batch 256 --precision bf16 --steps 20 --warmup 5 --json
  python3 peer_torch_byol_step.py --device cuda --arch resnet50 --stem imagenet --res 224 --batch 64 --precision fp32 --steps 20 --warmup 5 --json
  python3 peer_torch_byol_step.py --device cuda --arch resnet50 --stem imagenet --res 224 --batch 64 --precision bf16 --steps 20 --warmup 5 --json
Run (CPU, tiny):
  python3 peer_torch_byol_step.py --device cpu --arch resnet18 --stem cifar --width 8 --res 32 --batch 8 --steps 2 --warmup 1 --threads 1 --json
Output: per-step lines on stderr; on stdout one line, human-readable, or with --json
exactly one JSON object (keys: peer, torch_version, device, device_name, arch, stem,
width, res, batch, precision, tf32, cudnn_benchmark, optimizer, steps, warmup,
step_seconds_median, images_per_sec, max_reserved_bytes, max_allocated_bytes, loss_first,
loss_last; then channels_last, threads, seed, lr, tau, params, step_seconds_all,
collapse_last).
Threads: torch.set_num_threads(--threads, default 2).
"""
import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, 0, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        sc = x if self.downsample is None else self.downsample(x)
        return F.relu(y + sc)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 (x4 channels)."""
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, 0, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        sc = x if self.downsample is None else self.downsample(x)
        return F.relu(y + sc)


class ResNet(nn.Module):
    """ResNet-18/50 encoder in torchvision's layout and names; output (batch, feature_dim)."""

    def __init__(self, arch="resnet18", width=64, stem="cifar"):
        super().__init__()
        block, depths = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}[arch]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        cin = width
        for i, depth in enumerate(depths):
            planes = width << i
            blocks = []
            for b in range(depth):
                blocks.append(block(cin, planes, 2 if (b == 0 and i > 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        y = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        y = self.layer4(self.layer3(self.layer2(self.layer1(y))))
        return y.mean((2, 3))


def mlp(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))


def byol_loss(p, z):
    """2 - 2cos(p, z) per row, averaged; computed in fp32 whatever the inputs' dtype."""
    p, z = p.float(), z.float()
    return (2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1)).mean()


def collapse_indicator(z):
    """Std over the batch of l2-normalised rows, averaged over dims, times sqrt(d) (as ours)."""
    zn = F.normalize(z.detach().float(), dim=-1)
    return zn.std(0, unbiased=False).mean() * math.sqrt(z.shape[-1])


class Lars(torch.optim.Optimizer):
    """LARS as ours (trainer/src/optim/lars.rs). Groups with `adapt` False (rank-1 params:
    biases, BatchNorm) get plain momentum SGD: no weight decay, no trust ratio."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1.5e-6, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            gs = [p.grad for p in ps]
            bufs = []
            for p in ps:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(st["momentum_buffer"])
            if group["adapt"]:
                gs = torch._foreach_add(gs, ps, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(ps))
                g_norm = torch.stack(torch._foreach_norm(gs))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                    torch.ones_like(w_norm))
                torch._foreach_mul_(gs, list(trust.unbind(0)))
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, gs)
            torch._foreach_add_(ps, bufs, alpha=-group["lr"])
        return None


def param_groups(params, weight_decay):
    """Ours' split: rank-1 parameters (biases, BatchNorm) excluded from decay/adaptation."""
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    return [dict(params=decay, weight_decay=weight_decay, adapt=True),
            dict(params=rest, weight_decay=0.0, adapt=False)]


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def run_byol(a):
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    set_tf32(a.tf32 == "on")
    torch.backends.cudnn.benchmark = a.cudnn_benchmark == "on"
    torch.manual_seed(a.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    enc = ResNet(a.arch, a.width, a.stem)
    online = nn.Sequential(enc, mlp(enc.out_dim, a.proj_hidden, a.proj_dim))
    pred = mlp(a.proj_dim, a.pred_hidden, a.proj_dim)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    mf = torch.channels_last if a.channels_last == "on" else torch.contiguous_format
    for m in (online, target, pred):
        m.to(dev, memory_format=mf)
        m.train()
    params = list(online.parameters()) + list(pred.parameters())
    nparams = sum(p.numel() for p in params)
    lr = a.lr if a.lr is not None else a.base_lr * a.batch / 256
    groups = param_groups(params, a.weight_decay)
    if a.optimizer == "lars":
        opt = Lars(groups, lr=lr, momentum=a.momentum, weight_decay=a.weight_decay, eta=a.trust_coefficient)
    elif a.optimizer == "sgd":
        for g in groups:
            g.pop("adapt")
        opt = torch.optim.SGD(groups, lr=lr, momentum=a.momentum)
    else:
        for g in groups:
            g.pop("adapt")
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    on_p = list(online.parameters())
    tg_p = list(target.parameters())
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if a.precision == "bf16" \
        else contextlib.nullcontext
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)

    times, losses, collapse = [], [], None
    for step in range(a.warmup + a.steps):
        x1 = torch.randn(a.batch, 3, a.res, a.res, device=dev).contiguous(memory_format=mf)
        x2 = torch.randn(a.batch, 3, a.res, a.res, device=dev).contiguous(memory_format=mf)
        sync()
        t0 = time.perf_counter()
        with autocast():
            z1 = online(x1)
            p1 = pred(z1)
            p2 = pred(online(x2))
            with torch.no_grad():
                t1 = target(x1)
                t2 = target(x2)
            loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(tg_p, a.tau)
            torch._foreach_add_(tg_p, on_p, alpha=1 - a.tau)
        loss_v = loss.item()
        collapse = collapse_indicator(z1).item()
        sync()
        dt = time.perf_counter() - t0
        losses.append(loss_v)
        timed = step >= a.warmup
        if timed:
            times.append(dt)
        print(f"step {step}{'' if timed else ' (warm-up)'}: {dt:.4f}s ({a.batch / dt:.1f} img/s) "
              f"loss {loss_v:.4f} collapse {collapse:.3f}", file=sys.stderr, flush=True)
    med = statistics.median(times)
    reserved = torch.cuda.max_memory_reserved(dev) if cuda else 0
    allocated = torch.cuda.max_memory_allocated(dev) if cuda else 0
    rec = dict(peer="pytorch", torch_version=torch.__version__, device=dev.type, device_name=device_name(dev),
               arch=a.arch, stem=a.stem, width=a.width, res=a.res, batch=a.batch, precision=a.precision,
               tf32=a.tf32, cudnn_benchmark=a.cudnn_benchmark, optimizer=a.optimizer, steps=a.steps,
               warmup=a.warmup, step_seconds_median=med, images_per_sec=a.batch / med,
               max_reserved_bytes=reserved, max_allocated_bytes=allocated, loss_first=losses[0],
               loss_last=losses[-1], channels_last=a.channels_last, threads=torch.get_num_threads(),
               seed=a.seed, lr=lr, tau=a.tau, params=nparams, step_seconds_all=times, collapse_last=collapse)
    if a.json:
        print(json.dumps(rec), flush=True)
    else:
        print(f"pytorch {torch.__version__} {dev.type} ({rec['device_name']}): {a.arch}/{a.stem} w{a.width} "
              f"{a.res}px batch {a.batch} {a.precision} tf32 {a.tf32} cudnn-benchmark {a.cudnn_benchmark} "
              f"channels-last {a.channels_last} {a.optimizer}: median {med:.4f} s/step over {a.steps} "
              f"(+{a.warmup} warm-up), {a.batch / med:.1f} img/s, peak reserved {reserved / 2**30:.2f} GiB "
              f"allocated {allocated / 2**30:.2f} GiB, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description="PyTorch BYOL training-step throughput (peer of our trainer).")
    ap.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    ap.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    ap.add_argument("--width", type=int, default=64, help="channels of the first stage")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--proj-hidden", type=int, default=4096)
    ap.add_argument("--proj-dim", type=int, default=256, help="projector and predictor output size")
    ap.add_argument("--pred-hidden", type=int, default=4096)
    ap.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"])
    ap.add_argument("--base-lr", type=float, default=0.2, help="lr = base_lr * batch / 256")
    ap.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --base-lr)")
    ap.add_argument("--momentum", type=float, default=0.9, help="LARS / SGD momentum")
    ap.add_argument("--weight-decay", type=float, default=1.5e-6)
    ap.add_argument("--trust-coefficient", type=float, default=1e-3, help="LARS eta")
    ap.add_argument("--tau", type=float, default=0.996)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tf32", default="off", choices=["on", "off"])
    ap.add_argument("--cudnn-benchmark", default="on", choices=["on", "off"])
    ap.add_argument("--channels-last", default="off", choices=["on", "off"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object line")
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.batch < 2:
        ap.error("need --steps >= 1, --warmup >= 0, --batch >= 2 (BatchNorm)")
    torch.set_num_threads(a.threads)
    run_byol(a)


if __name__ == "__main__":
    main()
