#!/usr/bin/env python3
"""The PyTorch reference for the Fashion-MNIST quality runs: a plain BYOL in PyTorch and
torchvision (ResNet-18 with the small-image stem, projector and predictor, EMA target)
and one evaluator that scores its encoder and ours alike.

Train, then score the encoder with the evaluator below:

    # the recipe of issue 41 (lightly's CIFAR-10 benchmark), 702 steps, schedule over 702
    python3 scripts/peer_byol_fmnist.py --recipe lightly --steps 702 --seed 1 \
        --save peer-s1.safetensors --json peer-s1.json
    # configs/small.toml's recipe, given a wall-clock budget (the cosine length is fixed
    # after 10 steps, from the measured step time, so that it ends with the budget)
    python3 scripts/peer_byol_fmnist.py --minutes 60 --json peer.json

Score any encoder saved under torchvision's ResNet names (`byol export`, or `--save`
above); it is fed the preprocessing it was trained with, read from the file's
`byol.input` metadata (`--size`, `--mean`, `--std`, `--interpolation` override it; a
file without it gets ImageNet's statistics at 32 px, with a warning):

    python3 scripts/peer_byol_fmnist.py --score encoder.safetensors --json score.json

Recipes (`--recipe`; every value can be overridden by its flag):
- `small` (configs/small.toml): AdamW, lr 2e-3 x batch/256, weight decay 1e-6 on every
  parameter, 50 warm-up steps then cosine; views at 32 px from BYOL's T and T' without
  blur (crop scale 0.08-1, bicubic, jitter 0.4/0.4/0.2/0.1 p 0.8, grayscale 0.2,
  solarize 0 / 0.2), ImageNet's mean and std.
- `lightly` (issue 41; configs/recipe-lightly-fmnist.toml is ours): SGD lr 0.12 x
  batch/256, momentum 0.9, no Nesterov, weight decay 5e-4 on every parameter, cosine,
  no warm-up; views at 28 px: crop scale 0.2-1 (bilinear), flip, brightness and
  contrast 0.4 with p 0.8, solarize 0 / 0.2; the dataset's mean and std 0.286 / 0.353.
Both: ResNet-18, width 16, small-image stem (3x3 conv, stride 1, no max-pool), PyTorch's
default init; projector and predictor Linear(d, 1024) -> BN -> ReLU -> Linear(1024, 128);
loss 2 - 2 cos(p, z) summed over both directions, batch mean (as ours); EMA of the
parameters, tau from 0.99 to 1 on the learning rate's cosine; batch 256.

Evaluation (the protocol of issue 41): frozen online encoder (BatchNorm in eval mode),
pooled features of the 60k training and 10k test images, each resized (short side, then
centre crop) to the encoder's input size and normalised with its mean and std;
- linear: features standardised with the training split's mean and std; multinomial
  logistic regression (mean cross-entropy + l2/2 |W|^2, bias free), fitted by L-BFGS
  in float64 (at most --probe-iters iterations, 300); l2 chosen among 1e-5..1e-1 on a
  seeded held-out 5k of the training split (fitted on the other 55k), then refitted on all 60k;
- kNN: cosine similarity, k = 200, votes exp(sim / 0.1).
Needs torch, torchvision and safetensors; reads the IDX files of `dataset-fashion-mnist`.
"""

import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FMNIST = ((0.286,) * 3, (0.353,) * 3)
INPUT_KEY = "byol.input"
INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
          "lanczos3": T.InterpolationMode.LANCZOS}

RECIPES = {
    "small": dict(optimizer="adamw", lr=2e-3, weight_decay=1e-6, warmup=50, size=32,
                  mean=IMAGENET[0], std=IMAGENET[1], interpolation="bicubic", scale=(0.08, 1.0),
                  jitter=(0.4, 0.4, 0.2, 0.1), grayscale=0.2),
    "lightly": dict(optimizer="sgd", lr=0.12, weight_decay=5e-4, warmup=0, size=28,
                    mean=FMNIST[0], std=FMNIST[1], interpolation="bilinear", scale=(0.2, 1.0),
                    jitter=(0.4, 0.4, 0.0, 0.0), grayscale=0.0),
}


def read_idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 without `fc`, its names included (`conv1`, `bn1`,
    `layer1.0.conv1`, ...), at `width` channels in the first stage; `small_stem`: 3x3
    conv stride 1 and no max-pool, else torchvision's 7x7 stride 2 and max-pool."""

    def __init__(self, width, small_stem=True):
        super().__init__()
        self.small_stem = small_stem
        self.conv1 = (nn.Conv2d(3, width, 3, 1, 1, bias=False) if small_stem
                      else nn.Conv2d(3, width, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i in range(4):
            planes = width << i
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(Block(cin, planes, stride), Block(planes, planes, 1)))
            cin = planes
        self.dim = cin

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.small_stem:
            x = F.max_pool2d(x, 3, 2, 1)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean((2, 3))


def mlp(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, o))


def regression(p, z):
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)


class AdditiveJitter:
    """Brightness and contrast as BYOL's TensorFlow code (and ours) has them, on a [0, 1]
    tensor: brightness `x + U[-b, b]`, contrast `(x - m) * U[1-c, 1+c] + m` with `m` each
    channel's mean, each followed by a clip to [0, 1], in a random order (an ablation:
    torchvision's brightness multiplies)."""

    def __init__(self, brightness, contrast):
        self.b, self.c = brightness, contrast

    def __call__(self, x):
        for op in torch.randperm(2).tolist():
            if op == 0 and self.b > 0:
                x = (x + torch.empty(1).uniform_(-self.b, self.b)).clamp(0, 1)
            elif op == 1 and self.c > 0:
                m = x.mean((1, 2), keepdim=True)
                x = ((x - m) * torch.empty(1).uniform_(1 - self.c, 1 + self.c) + m).clamp(0, 1)
        return x


def views(r):
    """BYOL's T and T' for recipe `r` (torchvision's transforms; `r["brightness"] ==
    "add"`: [`AdditiveJitter`] instead of `ColorJitter`, saturation and hue ignored)."""
    crop = [T.RandomResizedCrop(r["size"], scale=r["scale"], interpolation=INTERP[r["interpolation"]]),
            T.RandomHorizontalFlip()]
    if r.get("brightness") == "add":
        common = crop + [T.ToTensor(), T.RandomApply([AdditiveJitter(*r["jitter"][:2])], p=0.8)]
        solarize, to_tensor = [T.RandomSolarize(0.5, p=0.2)], []
    else:
        common = crop + [T.RandomApply([T.ColorJitter(*r["jitter"])], p=0.8)]
        solarize, to_tensor = [T.RandomSolarize(128, p=0.2)], [T.ToTensor()]
    if r["grayscale"] > 0:
        common.append(T.RandomGrayscale(p=r["grayscale"]))
    tail = to_tensor + [T.Normalize(r["mean"], r["std"])]
    return T.Compose(common + tail), T.Compose(common + solarize + tail)


def init_like_ours(module):
    """Convolutions Kaiming normal, fan-out, ReLU gain (torchvision's ResNet init, and
    ours) instead of PyTorch's default Kaiming uniform with a = sqrt(5) (an ablation)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, images, recipe):
        self.images = images
        self.t1, self.t2 = views(recipe)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i]).convert("RGB")
        return self.t1(img), self.t2(img)


# ---------------------------------------------------------------------------------------
# Evaluation


def features(encoder, images, spec, device, batch=512):
    """Pooled features of `images` (uint8, N x H x W) preprocessed by `spec` (as `byol
    eval`: short side resized to the input size, from 96 px up to size * 256/224 first,
    then a centre crop; Normalize(mean, std))."""
    size = spec["size"]
    resize = size if size < 96 else int(round(size * 256 / 224))
    steps = [] if images.shape[1] == images.shape[2] == size else [
        T.Resize(resize, interpolation=INTERP[spec["interpolation"]]), T.CenterCrop(size)]
    tf = T.Compose(steps + [T.ToTensor(), T.Normalize(spec["mean"], spec["std"])])
    encoder.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.stack([tf(Image.fromarray(a).convert("RGB")) for a in images[s:s + batch]])
            out.append(encoder(x.to(device)).float().cpu())
    return torch.cat(out)


def logistic(x, y, classes, l2, max_iter=300):
    """Mean cross-entropy + l2/2 |W|^2 (bias free) minimised by L-BFGS (float64), at most
    `max_iter` iterations."""
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(ftr, ytr, fte, yte, seed, holdout=5000, grid=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1), iters=300):
    ftr, fte = ftr.double(), fte.double()
    mean, std = ftr.mean(0), ftr.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    ftr, fte = (ftr - mean) / std, (fte - mean) / std
    classes = int(ytr.max()) + 1
    perm = torch.randperm(len(ftr), generator=torch.Generator().manual_seed(seed))
    held, fit = perm[:holdout], perm[holdout:]
    search = []
    for l2 in sorted(grid, reverse=True):  # strongest first: a tie keeps the stronger
        w, b = logistic(ftr[fit], ytr[fit], classes, l2, iters)
        search.append((l2, ((ftr[held] @ w + b).argmax(1) == ytr[held]).double().mean().item()))
    best = max(search, key=lambda s: s[1])[0]
    w, b = logistic(ftr, ytr, classes, best, iters)
    train_acc = ((ftr @ w + b).argmax(1) == ytr).double().mean().item()
    return dict(accuracy=((fte @ w + b).argmax(1) == yte).double().mean().item(), l2=best,
                train_accuracy=train_acc, search=search)


def knn(ftr, ytr, fte, yte, k=200, t=0.1):
    ftr, fte = F.normalize(ftr, dim=1), F.normalize(fte, dim=1)
    classes = int(ytr.max()) + 1
    correct = 0
    for s in range(0, len(fte), 256):
        sim = fte[s:s + 256] @ ftr.T
        top, idx = sim.topk(min(k, len(ftr)), dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, ytr[idx], (top / t).exp())
        correct += (votes.argmax(1) == yte[s:s + 256]).sum().item()
    return correct / len(fte)


def evaluate(encoder, spec, data, device, seed, holdout, label, iters=300):
    xtr, ytr, xte, yte = data
    t0 = time.time()
    ftr, fte = features(encoder, xtr, spec, device), features(encoder, xte, spec, device)
    t1 = time.time()
    lin = linear_probe(ftr, ytr, fte, yte, seed, holdout, iters=iters)
    t2 = time.time()
    nn_acc = knn(ftr, ytr, fte, yte)
    rows = [dict(encoder=label, protocol="linear", accuracy=lin["accuracy"], l2=lin["l2"],
                 train_accuracy=lin["train_accuracy"], search=lin["search"], feature_dim=ftr.shape[1],
                 seconds=round(t2 - t1, 1)),
            dict(encoder=label, protocol="knn", accuracy=nn_acc, feature_dim=ftr.shape[1],
                 seconds=round(time.time() - t2, 1))]
    print(f"{label}: linear {lin['accuracy']:.4f} (l2 {lin['l2']:g}), kNN {nn_acc:.4f}, "
          f"features {t1 - t0:.0f} s", flush=True)
    return rows


def load_encoder(path):
    """A ResNet-18 from a safetensors file in torchvision's names, and its metadata."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    if "conv1.weight" not in sd:
        sys.exit(f"{path}: no conv1.weight: not a torchvision ResNet state_dict")
    if any(k.endswith("conv3.weight") for k in sd):
        sys.exit(f"{path}: bottleneck blocks (conv3): only ResNet-18 is scored here")
    w = sd["conv1.weight"]
    enc = ResNet18(w.shape[0], small_stem=w.shape[-1] == 3)
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    if missing or unexpected:
        sys.exit(f"{path}: does not fit a ResNet-18 of width {w.shape[0]}: "
                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return enc, meta


def resolve_spec(meta, a, path):
    """The preprocessing to score with: the file's record, then the flags over it."""
    if INPUT_KEY in meta:
        spec, source = json.loads(meta[INPUT_KEY]), "metadata"
    else:
        print(f"warning: {path} records no {INPUT_KEY}: scoring with ImageNet's mean and std at "
              "32 px (bicubic); --size/--mean/--std/--interpolation override", file=sys.stderr)
        spec, source = dict(size=32, mean=list(IMAGENET[0]), std=list(IMAGENET[1]),
                            interpolation="bicubic"), "imagenet default"
    for key in ("size", "mean", "std", "interpolation"):
        v = getattr(a, key)
        if v is not None:
            spec[key], source = v, source + " + flags"
    return spec, source


def triple(s):
    v = [float(x) for x in s.split(",")]
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise argparse.ArgumentTypeError(f"need R,G,B or one value, got {s!r}")
    return v


def input_spec(r):
    """The `byol.input` record of recipe `r` (as our checkpoints write it)."""
    return dict(size=r["size"], mean=list(r["mean"]), std=list(r["std"]), interpolation=r["interpolation"])


def save_encoder(enc, spec, path):
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
    save_file(sd, path, metadata={INPUT_KEY: json.dumps(spec)})


# ---------------------------------------------------------------------------------------
# Training


def train(a, r, xtr, dev):
    spec = input_spec(r)
    online_enc = ResNet18(a.width)
    if a.conv_init == "fan-out":
        init_like_ours(online_enc)
    online = nn.ModuleDict(dict(encoder=online_enc, projector=mlp(online_enc.dim, 1024, 128),
                                predictor=mlp(128, 1024, 128)))
    target = nn.ModuleDict(dict(encoder=ResNet18(a.width), projector=mlp(online_enc.dim, 1024, 128)))
    for name in ("encoder", "projector"):
        target[name].load_state_dict(online[name].state_dict())
        target[name].requires_grad_(False)
    random_init = ResNet18(a.width)
    random_init.load_state_dict(online_enc.state_dict())
    for m in (online, target, random_init):
        m.to(dev)
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                      enabled=a.precision == "bf16")
    lr = r["lr"] * a.batch / 256
    if r["optimizer"] == "sgd":
        opt = torch.optim.SGD(online.parameters(), lr=lr, momentum=0.9, weight_decay=r["weight_decay"])
    else:
        opt = torch.optim.AdamW(online.parameters(), lr=lr, weight_decay=r["weight_decay"])
    loader = torch.utils.data.DataLoader(TwoViews(xtr, r), batch_size=a.batch, shuffle=True,
                                         drop_last=True, num_workers=a.workers, persistent_workers=a.workers > 0,
                                         pin_memory=dev.type == "cuda")
    budget = a.minutes * 60 if a.steps is None else float("inf")
    warmup = r["warmup"]
    start = time.time()
    step, total, log = 0, a.steps, []
    done = False
    while not done:
        for v1, v2 in loader:
            v1, v2 = v1.to(dev, non_blocking=True), v2.to(dev, non_blocking=True)
            elapsed = time.time() - start
            if a.steps is None and step == 10:
                total = max(step + 1, int(budget / (elapsed / step)))
            if elapsed >= budget or (total is not None and step >= total):
                done = True
                break
            length = total or 10 ** 9
            if step < warmup:
                cur = lr * step / warmup
            else:
                cur = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, length - warmup))))
            for g in opt.param_groups:
                g["lr"] = cur
            tau = 1 - (1 - a.tau) * (math.cos(math.pi * min(1.0, step / length)) + 1) / 2
            online.train(), target.train()
            with autocast():
                z1 = online["projector"](online["encoder"](v1))
                z2 = online["projector"](online["encoder"](v2))
                p1, p2 = online["predictor"](z1), online["predictor"](z2)
                with torch.no_grad():
                    t1 = target["projector"](target["encoder"](v1))
                    t2 = target["projector"](target["encoder"](v2))
            loss = (regression(p1.float(), t2.float()) + regression(p2.float(), t1.float())).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for name in ("encoder", "projector"):
                    for pt, po in zip(target[name].parameters(), online[name].parameters()):
                        pt.mul_(tau).add_(po.detach(), alpha=1 - tau)
            step += 1
            if a.save and a.save_every and step % a.save_every == 0:
                stem = a.save[:-len(".safetensors")] if a.save.endswith(".safetensors") else a.save
                save_encoder(online_enc, spec, f"{stem}-step{step:05d}.safetensors")
            if step % 20 == 0:
                # Read from the device at log steps only.
                z = F.normalize(z1.detach().float(), dim=1)
                collapse = z.std(0).mean().item() * math.sqrt(z1.shape[1])
                rec = dict(step=step, loss=loss.item(), collapse=collapse, lr=cur, tau=tau,
                           elapsed=round(time.time() - start, 1))
                log.append(rec)
                print(json.dumps(rec), flush=True)
    return online_enc, random_init, step, time.time() - start, log


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="small")
    ap.add_argument("--steps", type=int, help="train this many steps, the schedules over them")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget (without --steps)")
    ap.add_argument("--score", metavar="PATH.safetensors", help="only score this encoder")
    ap.add_argument("--save", metavar="PATH.safetensors", help="write the trained online encoder")
    ap.add_argument("--save-every", type=int, default=0, metavar="N",
                    help="also write the encoder every N steps, as PATH-stepNNNNN.safetensors")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, help="view / input size (default: the recipe's; --score: the file's)")
    ap.add_argument("--mean", type=triple, help="R,G,B or one value (default: the recipe's / the file's)")
    ap.add_argument("--std", type=triple, help="R,G,B or one value (default: the recipe's / the file's)")
    ap.add_argument("--interpolation", choices=sorted(INTERP))
    ap.add_argument("--lr", type=float, help="learning rate at batch 256 (default: the recipe's)")
    ap.add_argument("--warmup", type=int, help="warm-up steps (default: the recipe's)")
    ap.add_argument("--tau", type=float, default=0.99)
    ap.add_argument("--brightness", choices=["multiply", "add"], default="multiply",
                    help="ablation: add = BYOL's TensorFlow (and our) additive brightness")
    ap.add_argument("--conv-init", choices=["pytorch", "fan-out"], default="pytorch",
                    help="ablation: fan-out = Kaiming normal fan-out convolutions (torchvision's, ours)")
    ap.add_argument("--holdout", type=int, default=5000, help="training images held out to choose the L2")
    ap.add_argument("--probe-iters", type=int, default=300,
                    help="L-BFGS iterations per linear-probe fit (each L2 tried, then the refit)")
    ap.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images of each split (smoke tests)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the DataLoader pins memory then)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast(dtype=torch.bfloat16) around the forward passes")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    d = a.data
    xtr = read_idx(os.path.join(d, "train-images-idx3-ubyte.gz"))
    ytr = torch.from_numpy(read_idx(os.path.join(d, "train-labels-idx1-ubyte.gz")).astype(np.int64))
    xte = read_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"))
    yte = torch.from_numpy(read_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz")).astype(np.int64))
    if a.limit:
        xtr, ytr, xte, yte = xtr[: a.limit], ytr[: a.limit], xte[: a.limit], yte[: a.limit]
    data = (xtr, ytr, xte, yte)
    holdout = min(a.holdout, len(xtr) // 10) if a.limit else a.holdout
    dev = torch.device(a.device)

    if a.score:
        enc, meta = load_encoder(a.score)
        spec, source = resolve_spec(meta, a, a.score)
        print(f"scoring {a.score}: input {spec} ({source})", flush=True)
        rows = evaluate(enc.to(dev), spec, data, dev, a.eval_seed, holdout, os.path.basename(a.score),
                        a.probe_iters)
        result = dict(scored=os.path.abspath(a.score), input=spec, input_source=source,
                      holdout=holdout, eval_seed=a.eval_seed, rows=rows, torch=torch.__version__,
                      args=vars(a))
    else:
        r = dict(RECIPES[a.recipe])
        r["brightness"], r["conv_init"] = a.brightness, a.conv_init
        for key in ("size", "mean", "std", "interpolation", "lr", "warmup"):
            if getattr(a, key) is not None:
                r[key] = getattr(a, key)
        online_enc, random_init, step, secs, log = train(a, r, xtr, dev)
        spec = input_spec(r)
        if a.save:
            save_encoder(online_enc, spec, a.save)
        rows = []
        for name, enc in (("byol", online_enc), ("random-init", random_init)):
            rows += evaluate(enc, spec, data, dev, a.eval_seed, holdout, name, a.probe_iters)
        result = dict(peer="pytorch", recipe=r, steps=step, train_seconds=round(secs, 1),
                      images_per_sec=round(step * a.batch / secs, 1), input=spec, holdout=holdout,
                      rows=rows, log=log, torch=torch.__version__, args=vars(a))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
