#!/usr/bin/env python3
"""The PyTorch reference for the Fashion-MNIST quality run: the same BYOL recipe and
network as `configs/small.toml`, given the same wall-clock budget on the same machine,
then the same evaluation (linear probe and kNN on frozen online-encoder features).

    python3 scripts/peer_byol_fmnist.py --minutes 60 --json peer.json

Recipe (mirrors configs/small.toml): ResNet-18, width 16, small-image stem (3x3 conv,
stride 1, no max-pool); projector and predictor Linear(d, 1024) -> BN -> ReLU ->
Linear(1024, 128); AdamW, lr 2e-3 x batch/256, weight decay 1e-6, 50 warm-up steps, then
cosine; EMA tau from 0.99 to 1 (cosine); batch 256; views at 32 px from BYOL's T and T'
without blur (the "small" preset). The cosine length is fixed after 10 steps, from the
measured step time, so that the schedule ends when the budget does.

Evaluation (as `byol eval`): images resized 28 -> 32 (bicubic), normalised with the
ImageNet mean/std; linear probe = standardised features, multinomial logistic
regression with L2 chosen among 1e-5..1e-1 on a seeded 10% of the training split, refit
on all of it; kNN = cosine, k = 200, votes exp(sim / 0.1).
Needs torch and torchvision; reads the IDX files of `dataset-fashion-mnist`.
"""

import argparse
import gzip
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i in range(4):
            planes = width << i
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(Block(cin, planes, stride), Block(planes, planes, 1)))
            cin = planes
        self.layers = nn.Sequential(*layers)
        self.dim = cin

    def forward(self, x):
        return self.layers(F.relu(self.bn1(self.conv1(x)))).mean((2, 3))


def mlp(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, o))


def regression(p, z):
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, images, size):
        self.images = images
        common = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                  T.RandomHorizontalFlip(),
                  T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  T.RandomGrayscale(p=0.2)]
        tail = [T.ToTensor(), T.Normalize(MEAN, STD)]
        self.t1 = T.Compose(common + tail)
        self.t2 = T.Compose(common + [T.RandomSolarize(128, p=0.2)] + tail)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i]).convert("RGB")
        return self.t1(img), self.t2(img)


def features(encoder, images, size, device, batch=512):
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                    T.ToTensor(), T.Normalize(MEAN, STD)])
    encoder.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.stack([tf(Image.fromarray(a).convert("RGB")) for a in images[s:s + batch]])
            out.append(encoder(x.to(device)).float().cpu())
    return torch.cat(out)


def logistic(x, y, classes, l2, steps=300):
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(ftr, ytr, fte, yte, seed):
    mean, std = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    ftr, fte = (ftr - mean) / std, (fte - mean) / std
    classes = int(ytr.max()) + 1
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ftr), generator=g)
    held, fit = perm[: len(ftr) // 10], perm[len(ftr) // 10:]
    best = None
    for l2 in [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]:
        w, b = logistic(ftr[fit], ytr[fit], classes, l2)
        acc = ((ftr[held] @ w + b).argmax(1) == ytr[held]).float().mean().item()
        if best is None or acc > best[0]:
            best = (acc, l2)
    w, b = logistic(ftr, ytr, classes, best[1])
    return ((fte @ w + b).argmax(1) == yte).float().mean().item(), best[1]


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--tau", type=float, default=0.99)
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

    online_enc = ResNet18(a.width)
    online = nn.ModuleDict(dict(encoder=online_enc, projector=mlp(online_enc.dim, 1024, 128),
                                predictor=mlp(128, 1024, 128)))
    target = nn.ModuleDict(dict(encoder=ResNet18(a.width), projector=mlp(online_enc.dim, 1024, 128)))
    for name in ("encoder", "projector"):
        target[name].load_state_dict(online[name].state_dict())
        target[name].requires_grad_(False)
    random_init = ResNet18(a.width)
    random_init.load_state_dict(online_enc.state_dict())
    dev = torch.device(a.device)
    for m in (online, target, random_init):
        m.to(dev)
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                      enabled=a.precision == "bf16")
    lr = a.lr * a.batch / 256
    opt = torch.optim.AdamW(online.parameters(), lr=lr, weight_decay=1e-6)
    loader = torch.utils.data.DataLoader(TwoViews(xtr, a.size), batch_size=a.batch, shuffle=True,
                                         drop_last=True, num_workers=a.workers, persistent_workers=a.workers > 0,
                                         pin_memory=dev.type == "cuda")
    budget = a.minutes * 60
    start = time.time()
    step, total, log = 0, None, []
    done = False
    while not done:
        for v1, v2 in loader:
            v1, v2 = v1.to(dev, non_blocking=True), v2.to(dev, non_blocking=True)
            elapsed = time.time() - start
            if step == 10:
                total = max(step + 1, int(budget / (elapsed / step)))
            if elapsed >= budget or (total is not None and step >= total):
                done = True
                break
            length = total or 10 ** 9
            if step < a.warmup:
                cur = lr * step / a.warmup
            else:
                cur = lr * 0.5 * (1 + math.cos(math.pi * (step - a.warmup) / max(1, length - a.warmup)))
            for g in opt.param_groups:
                g["lr"] = cur
            tau = 1 - (1 - a.tau) * (math.cos(math.pi * step / length) + 1) / 2
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
            if step % 20 == 0:
                # Read from the device at log steps only.
                z = F.normalize(z1.detach().float(), dim=1)
                collapse = z.std(0).mean().item() * math.sqrt(z1.shape[1])
                rec = dict(step=step, loss=loss.item(), collapse=collapse, lr=cur, tau=tau,
                           elapsed=round(time.time() - start, 1))
                log.append(rec)
                print(json.dumps(rec), flush=True)
    train_secs = time.time() - start
    rows = []
    for name, enc in (("byol", online_enc), ("random-init", random_init)):
        t0 = time.time()
        ftr, fte = features(enc, xtr, a.size, dev), features(enc, xte, a.size, dev)
        lin, l2 = linear_probe(ftr, ytr, fte, yte, a.seed)
        rows.append(dict(encoder=name, protocol="linear", accuracy=lin, l2=l2))
        rows.append(dict(encoder=name, protocol="knn", accuracy=knn(ftr, ytr, fte, yte)))
        print(name, rows[-2:], f"{time.time() - t0:.0f} s", flush=True)
    result = dict(peer="pytorch", steps=step, train_seconds=round(train_secs, 1),
                  images_per_sec=round(step * a.batch / train_secs, 1), rows=rows, log=log,
                  torch=torch.__version__, args=vars(a))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
