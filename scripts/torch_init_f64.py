#!/usr/bin/env python3
"""The torch-init fixtures' features in float64, and how far PyTorch's float32 lands from
them: the reference `trainer/tests/pretrained.rs` holds our features to.

  python3 scripts/torch_init_f64.py [FIXTURES] [OUT]
      FIXTURES  default ../shared/fixtures/torch-init (NAME.pth, NAME.input.npy, ...)
      OUT       default trainer/tests/fixtures/torch-init-f64

Writes OUT/NAME.{eval,train}.npy: float64 N x C, the pooled features of NAME.pth on
NAME.input.npy computed by PyTorch in float64 (eval mode: running statistics; train
mode: batch statistics). Prints, per case and mode, PyTorch's float32 against itself in
another summation order (channels_last memory format, 1 thread) and against float64.

The model is torchvision's ResNet written out (BasicBlock / Bottleneck, the same
modules and names as the fixtures' make.py), so torchvision is not needed.
"""
import os
import sys

import numpy as np
import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + idt)


class ResNet(nn.Module):
    def __init__(self, block, layers, width, stem):
        super().__init__()
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        for i, depth in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._layer(block, width << i, depth, 1 if i == 0 else 2))
        self.fc = nn.Linear(8 * width * block.expansion, 10)

    def _layer(self, block, planes, depth, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, depth)]
        return nn.Sequential(*mods)

    def features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))


CASES = {
    "resnet18_cifar_w8": (BasicBlock, [2, 2, 2, 2], 8, "cifar"),
    "resnet50_w8": (Bottleneck, [3, 4, 6, 3], 8, "imagenet"),
}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def features(name, x, train, dtype, channels_last=False, threads=2):
    torch.set_num_threads(threads)
    block, layers, width, stem = CASES[name]
    m = ResNet(block, layers, width, stem)
    m.load_state_dict(torch.load(os.path.join(FIX, f"{name}.pth")))
    m = m.to(dtype).train(train)
    x = x.to(dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return m.features(x).numpy()


FIX = sys.argv[1] if len(sys.argv) > 1 else "../shared/fixtures/torch-init"
OUT = sys.argv[2] if len(sys.argv) > 2 else "trainer/tests/fixtures/torch-init-f64"
os.makedirs(OUT, exist_ok=True)
print(f"torch {torch.__version__}; relative L2 distances of the pooled features")
for name in CASES:
    x = torch.from_numpy(np.load(os.path.join(FIX, f"{name}.input.npy")))
    for mode, saved in [("eval", "features"), ("train", "train")]:
        train = mode == "train"
        exact = features(name, x, train, torch.float64)
        np.save(os.path.join(OUT, f"{name}.{mode}.npy"), exact)
        f32 = features(name, x, train, torch.float32)
        one = features(name, x, train, torch.float32, threads=1)
        cl = features(name, x, train, torch.float32, channels_last=True)
        fixture = np.load(os.path.join(FIX, f"{name}.{saved}.npy"))
        print(
            f"{name} {mode:5}: f32 vs f64 {rel(f32, exact):.1e}; fixture vs f64 {rel(fixture, exact):.1e}; "
            f"f32 vs itself: 1 thread {rel(one, f32):.1e}, channels_last {rel(cl, f32):.1e}, "
            f"the fixture {rel(fixture, f32):.1e}"
        )
