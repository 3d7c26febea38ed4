"""The torch reference zoo: small hand-written architectures with random, seeded weights.

Each architecture stands for one family of real networks and carries that family's structure
(residual streams, grouped/depthwise convs, concats, channel split/shuffle, SE gates,
attention heads, GQA, layer scale, …) at a size that exports and runs in well under a
second. They are *not* trained: they exist so the pruner meets every structural pattern.

Determinism: every factory seeds torch itself, so `make(name)` always returns the same
weights. Normalisation layers are made non-trivial so that pruning tests mean something:
affine parameters are randomised, and BatchNorm running statistics are *calibrated* on a
seeded random batch (so signals neither vanish nor explode through depth) and then
perturbed. Models are returned in eval mode.

The names, families and input shapes live in `models/registry.py` (framework-free); this
module only adds the factories and checks that the two tables agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import TORCH_ZOO, ZooSpec


# --------------------------------------------------------------------------- helpers


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU,
             dims=2):
    """Conv (no bias) -> BN -> activation, as an nn.Sequential."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _make_divisible(v, divisor=8):
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _example_for(spec: ZooSpec, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *spec.input_shape[1:])
    if spec.int_range is not None:
        lo, hi = spec.int_range
        return torch.randint(lo, hi, shape, generator=g, dtype=getattr(torch, spec.dtype))
    return torch.randn(shape, generator=g, dtype=getattr(torch, spec.dtype))


def _finalize(model: nn.Module, spec: ZooSpec) -> nn.Module:
    """Randomise norm layers, calibrate BN statistics, return the model in eval mode.

    Calls the global RNG, which the factory has seeded, so the result is deterministic.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
        if bns:
            # Cumulative average over one seeded batch = that batch's statistics.
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            model(_example_for(spec, batch=8, seed=1234))
            for m in bns:
                m.momentum = 0.1
                # Perturb so that no channel's statistics are exactly the batch's.
                m.running_mean.add_(torch.randn_like(m.running_mean) * 0.05)
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
    return model.eval()


# --------------------------------------------------------------------------- CNNs


class PlainCNN(nn.Module):
    """conv-BN-ReLU x3 with max pools, Flatten -> Linear -> ReLU -> Linear (no global pool)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 16), _conv_bn(16, 32), nn.MaxPool2d(2),
            _conv_bn(32, 32), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.flatten(self.features(x)))))


class VGG(nn.Module):
    """VGG-11 with BN at 1/4 width; Flatten -> Linear -> ReLU -> Dropout -> Linear."""

    CFG = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M")

    def __init__(self, num_classes=10):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(_conv_bn(cin, v))
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = (_conv_bn(cin, cout, 1, stride, act=None)
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (3 stages of 3 basic blocks, widths 16/32/64)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        blocks, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (optionally grouped) -> 1x1 expand, projection shortcut."""

    def __init__(self, cin, width, cout, stride=1, groups=1):
        super().__init__()
        self.reduce = _conv_bn(cin, width, 1)
        self.conv = _conv_bn(width, width, 3, stride, groups=groups)
        self.expand = _conv_bn(width, cout, 1, act=None)
        self.shortcut = (_conv_bn(cin, cout, 1, stride, act=None)
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.expand(self.conv(self.reduce(x))) + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """ResNet-50-style (expansion 4) or ResNeXt (grouped 3x3) on 32x32 inputs."""

    def __init__(self, stages, groups=1, stem=32, num_classes=10):
        super().__init__()
        self.stem = _conv_bn(3, stem)
        blocks, cin = [], stem
        for width, cout, n, stride in stages:
            for i in range(n):
                blocks.append(Bottleneck(cin, width, cout, stride if i == 0 else 1, groups))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> act -> 1x1 expand -> sigmoid gate (multiplies x)."""

    def __init__(self, channels, reduced, act=nn.ReLU):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class RegNetYBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width=16, se_ratio=0.25):
        super().__init__()
        self.a = _conv_bn(cin, cout, 1)
        self.b = _conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcite(cout, max(1, int(cin * se_ratio)))
        self.c = _conv_bn(cout, cout, 1, act=None)
        self.proj = (_conv_bn(cin, cout, 1, stride, act=None)
                     if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.c(self.se(self.b(self.a(x)))) + self.proj(x))


class RegNetY(nn.Module):
    def __init__(self, widths=(32, 64, 128), depths=(1, 2, 2), num_classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 24, 3, 1)
        blocks, cin = [], 24
        for w, d in zip(widths, depths):
            for i in range(d):
                blocks.append(RegNetYBlock(cin, w, 2 if i == 0 else 1))
                cin = w
        self.trunk = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.trunk(self.stem(x)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   _conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 x0.5 for 32x32 inputs (strides adapted as in CIFAR ports)."""

    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 3, 2), (6, 96, 2, 1),
           (6, 160, 2, 2), (6, 320, 1, 1))

    def __init__(self, width=0.5, num_classes=10):
        super().__init__()
        cin = _make_divisible(32 * width)
        layers = [_conv_bn(3, cin, 3, 1, act=nn.ReLU6)]
        for t, c, n, s in self.CFG:
            cout = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = 640
        layers.append(_conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class MBConv(nn.Module):
    """EfficientNet MBConv: expand 1x1 -> depthwise kxk -> SE (SiLU, sigmoid) -> project."""

    def __init__(self, cin, cout, k, stride, expand, se_ratio=0.25):
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden, 1, act=nn.SiLU) if expand != 1 else nn.Identity()
        self.dw = _conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcite(hidden, max(1, int(cin * se_ratio)), act=nn.SiLU)
        self.project = _conv_bn(hidden, cout, 1, act=None)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.use_res else y


class EfficientNet(nn.Module):
    # (expand, channels, repeats, stride, kernel)
    CFG = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 2, 2, 3),
           (6, 112, 1, 1, 5))

    def __init__(self, num_classes=10):
        super().__init__()
        cin = 32
        layers = [_conv_bn(3, cin, 3, 1, act=nn.SiLU)]
        for t, c, n, s, k in self.CFG:
            for i in range(n):
                layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 320, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(320, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (4*growth) -> BN-ReLU-Conv3x3 (growth); output concatenated to input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return torch.cat([x, y], 1)


class DenseNetBC(nn.Module):
    def __init__(self, growth=12, blocks=(4, 4, 4), num_classes=10):
        super().__init__()
        c = 2 * growth
        layers = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for bi, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if bi != len(blocks) - 1:  # transition: BN-ReLU-1x1 (compression 0.5)-avgpool
                out = c // 2
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False),
                           nn.AvgPool2d(2)]
                c = out
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class InceptionModule(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.b1 = _conv_bn(cin, c1, 1)
        self.b2 = nn.Sequential(_conv_bn(cin, c3r, 1), _conv_bn(c3r, c3, 3))
        # the 5x5 branch as two 3x3 convs (Inception-v2 style)
        self.b3 = nn.Sequential(_conv_bn(cin, c5r, 1), _conv_bn(c5r, c5, 3), _conv_bn(c5, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class Inception(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 32)
        self.a = InceptionModule(32, 16, 16, 24, 8, 8, 8)       # -> 56
        self.b = InceptionModule(56, 24, 24, 32, 8, 16, 16)     # -> 88
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c = InceptionModule(88, 32, 24, 48, 8, 16, 16)     # -> 112
        self.fc = nn.Linear(112, num_classes)

    def forward(self, x):
        x = self.pool(self.b(self.a(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(self.c(x), 1).flatten(1))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                                         _conv_bn(cin, half, 1))
        bin_ = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            _conv_bn(bin_, half, 1),
            _conv_bn(half, half, 3, stride, groups=half, act=None),
            _conv_bn(half, half, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths=(48, 96, 192), repeats=(2, 3, 2), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1))
        units, cin = [], 24
        for w, n in zip(widths, repeats):
            for i in range(n):
                units.append(ShuffleUnit(cin, w, 2 if i == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*units)
        self.conv5 = _conv_bn(cin, 256, 1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(_conv_bn(cin, cout), _conv_bn(cout, cout))


class UNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), bottom=128, num_classes=2):
        super().__init__()
        self.downs = nn.ModuleList()
        cin = 3
        for w in widths:
            self.downs.append(DoubleConv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = DoubleConv(cin, bottom)
        self.ups, self.decs = nn.ModuleList(), nn.ModuleList()
        cin = bottom
        for w in reversed(widths):
            self.ups.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.decs.append(DoubleConv(2 * w, w))
            cin = w
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.ups, self.decs, reversed(skips)):
            x = dec(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


class HRNet(nn.Module):
    """Three parallel resolutions (1, 1/2, 1/4 of the stem's) with two exchange units.

    Fusion follows HRNet: a lower-resolution input is 1x1 conv+BN then upsampled (nearest
    via nn.Upsample, or bilinear via F.interpolate), a higher-resolution input is reduced by
    strided 3x3 conv+BN; all inputs of a branch are summed, then ReLU.
    """

    def __init__(self, widths=(16, 32, 64), num_classes=10):
        super().__init__()
        self.widths = widths
        self.stem = nn.Sequential(_conv_bn(3, 32, 3, 2), _conv_bn(32, 32, 3, 2))  # 1/4 res
        self.trans = nn.ModuleList([
            _conv_bn(32, widths[0], 3, 1),
            _conv_bn(32, widths[1], 3, 2),
            nn.Sequential(_conv_bn(32, widths[1], 3, 2), _conv_bn(widths[1], widths[2], 3, 2)),
        ])
        self.stages = nn.ModuleList()
        for _ in range(2):
            branches = nn.ModuleList([BasicBlock(w, w) for w in widths])
            fuse = nn.ModuleDict()
            for i in range(3):          # target
                for j in range(3):      # source
                    if j > i:
                        fuse[f"{j}to{i}"] = _conv_bn(widths[j], widths[i], 1, act=None)
                    elif j < i:
                        steps = []      # i-j strided 3x3 convs; only the last changes width
                        for s in range(i - j):
                            last = s == i - j - 1
                            steps.append(_conv_bn(widths[j], widths[i] if last else widths[j],
                                                  3, 2, act=None if last else nn.ReLU))
                        fuse[f"{j}to{i}"] = nn.Sequential(*steps)
            self.stages.append(nn.ModuleDict({"branches": branches, "fuse": fuse}))
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = _conv_bn(sum(widths), 64, 1)
        self.fc = nn.Linear(64, num_classes)

    def _upsample(self, x, j, i):
        if j - i == 1:
            return self.up2(x)
        return F.interpolate(x, scale_factor=2 ** (j - i), mode="bilinear", align_corners=False)

    def forward(self, x):
        x = self.stem(x)
        xs = [t(x) for t in self.trans]
        for stage in self.stages:
            xs = [b(t) for b, t in zip(stage["branches"], xs)]
            fused = []
            for i in range(3):
                acc = xs[i]
                for j in range(3):
                    if j > i:
                        acc = acc + self._upsample(stage["fuse"][f"{j}to{i}"](xs[j]), j, i)
                    elif j < i:
                        acc = acc + stage["fuse"][f"{j}to{i}"](xs[j])
                fused.append(F.relu(acc))
            xs = fused
        # HRNetV2 representation head: upsample everything to the highest resolution, concat
        y = torch.cat([xs[0], self.up2(xs[1]),
                       F.interpolate(xs[2], scale_factor=4, mode="bilinear",
                                     align_corners=False)], dim=1)
        y = self.head(y)
        return self.fc(y.mean((2, 3)))


def _silu_conv(cin, cout, k=1, s=1):
    return _conv_bn(cin, cout, k, s, act=nn.SiLU)


class YoloBottleneck(nn.Module):
    def __init__(self, c, shortcut):
        super().__init__()
        self.cv1, self.cv2 = _silu_conv(c, c, 3), _silu_conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8 C2f: 1x1 conv, chunk in two, n bottlenecks on the last chunk, concat all, 1x1."""

    def __init__(self, c1, c2, n=1, shortcut=False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = _silu_conv(c1, 2 * self.c)
        self.cv2 = _silu_conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = _silu_conv(c1, c_)
        self.cv2 = _silu_conv(c_ * 4, c2)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class YoloC2f(nn.Module):
    """YOLOv8-style backbone + top-down neck + two detection heads, concatenated outputs."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.b0 = _silu_conv(3, 16, 3, 2)       # 32
        self.b1 = _silu_conv(16, 32, 3, 2)      # 16
        self.b2 = C2f(32, 32, 1, True)
        self.b3 = _silu_conv(32, 64, 3, 2)      # 8  (P3)
        self.b4 = C2f(64, 64, 2, True)
        self.b5 = _silu_conv(64, 128, 3, 2)     # 4  (P4)
        self.b6 = C2f(128, 128, 1, True)
        self.sppf = SPPF(128, 128)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(128 + 64, 64, 1, False)
        self.no = 4 + num_classes
        self.head3 = nn.Sequential(_silu_conv(64, 32, 3), nn.Conv2d(32, self.no, 1))
        self.head4 = nn.Sequential(_silu_conv(128, 32, 3), nn.Conv2d(32, self.no, 1))

    def forward(self, x):
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.sppf(self.b6(self.b5(p3)))
        n3 = self.n1(torch.cat([self.up(p4), p3], 1))
        b = x.shape[0]
        out3 = self.head3(n3).view(b, self.no, -1)
        out4 = self.head4(p4).view(b, self.no, -1)
        return torch.cat([out3, out4], 2)


# --------------------------------------------------------------------------- ConvNeXt, ViTs


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of NCHW: permute to channels-last and back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale=0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Real ConvNeXt initialises gamma at 1e-6; random, non-trivial values here.
        self.gamma = nn.Parameter(layer_scale * (0.5 + torch.rand(dim)))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)            # NCHW -> NHWC
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)          # NHWC -> NCHW
        return x + y


class ConvNeXt(nn.Module):
    def __init__(self, dims=(32, 64, 128), depths=(2, 2, 2), num_classes=10):
        super().__init__()
        self.downsample = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(1, len(dims)):
            self.downsample.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                                 nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)])
                                    for d, n in zip(dims, depths))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim, cin=3):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)   # [B, N, D]


class Mlp(nn.Sequential):
    def __init__(self, dim, hidden, act=nn.GELU):
        super().__init__(nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim))


class MHABlock(nn.Module):
    """Pre-norm transformer block with torch's nn.MultiheadAttention."""

    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTMHA(nn.Module):
    def __init__(self, patch=4, dim=64, depth=3, heads=4, num_classes=10, image=32):
        super().__init__()
        n = (image // patch) ** 2
        self.patch = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.2)
        self.blocks = nn.Sequential(*[MHABlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class QKVAttention(nn.Module):
    """timm-style attention: one qkv Linear, reshape/permute into heads, softmax, proj."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(x)


class QKVBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QKVAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTQKV(nn.Module):
    """ViT without cls token: position embedding, qkv attention, mean-pooled head."""

    def __init__(self, patch=4, dim=96, depth=3, heads=6, num_classes=10, image=32):
        super().__init__()
        self.patch = PatchEmbed(patch, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.2)
        self.blocks = nn.Sequential(*[QKVBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.blocks(self.patch(x) + self.pos_embed)
        return self.head(self.norm(x).mean(dim=1))


# --------------------------------------------------------------------------- language models


class BertSelfAttention(nn.Module):
    """Separate q/k/v Linears, heads via view/transpose, scaled softmax, output Linear."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def _split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        ctx = torch.matmul(F.softmax(scores, dim=-1), v)
        return self.out(ctx.transpose(1, 2).reshape(b, t, d))


class BertLayer(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.attn = BertSelfAttention(dim, heads)
        self.ln1 = nn.LayerNorm(dim, eps=1e-12)
        self.intermediate = nn.Linear(dim, ffn)
        self.act = nn.GELU()
        self.output = nn.Linear(ffn, dim)
        self.ln2 = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.output(self.act(self.intermediate(x))))


class BertTiny(nn.Module):
    def __init__(self, vocab=100, max_len=16, dim=64, heads=4, ffn=256, layers=2, labels=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.register_buffer("position_ids", torch.arange(max_len)[None], persistent=False)
        self.ln = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.Sequential(*[BertLayer(dim, heads, ffn) for _ in range(layers)])
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, labels)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(self.position_ids[:, :t])
        x = self.layers(self.ln(x))
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(pooled)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class GQAttention(nn.Module):
    """Grouped-query attention (Llama): n_heads query heads share n_kv_heads k/v heads,
    RoPE on q and k, k/v repeated with expand+reshape, causal mask."""

    def __init__(self, dim, n_heads, n_kv_heads, max_len):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.n_rep = n_heads // n_kv_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        freqs = torch.outer(torch.arange(max_len).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)),
                             persistent=False)

    def _repeat_kv(self, x):
        b, h, t, d = x.shape
        return x[:, :, None].expand(b, h, self.n_rep, t, d).reshape(b, h * self.n_rep, t, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:t], self.sin[:t]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        scores = (q @ k.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~self.mask[:t, :t], float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GPTBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden, max_len):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = GQAttention(dim, n_heads, n_kv_heads, max_len)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPTGQA(nn.Module):
    def __init__(self, vocab=100, max_len=16, dim=64, n_heads=8, n_kv_heads=2, hidden=172,
                 layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.1)      # logits ~ O(1) through the tied head
        self.blocks = nn.Sequential(*[GPTBlock(dim, n_heads, n_kv_heads, hidden, max_len)
                                      for _ in range(layers)])
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight          # tied

    def forward(self, input_ids):
        return self.lm_head(self.norm(self.blocks(self.embed(input_ids))))


# --------------------------------------------------------------------------- others


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, token_hidden, channel_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, channel_hidden)

    def forward(self, x):                                  # x: [B, N, D]
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, patch=4, dim=64, depth=3, num_classes=10, image=32):
        super().__init__()
        n = (image // patch) ** 2
        self.stem = PatchEmbed(patch, dim)
        self.blocks = nn.Sequential(*[MixerBlock(n, dim, 32, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x))).mean(1))


class Conv1dAudio(nn.Module):
    """M5-style raw-waveform classifier (Dai et al. 2017) at small width."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(1, 16, 79, 4, dims=1), nn.MaxPool1d(4),
            _conv_bn(16, 32, 3, dims=1), nn.MaxPool1d(4),
            _conv_bn(32, 64, 3, dims=1), nn.MaxPool1d(4),
            _conv_bn(64, 64, 3, dims=1),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(-1))


class Conv3dVideo(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, dims=3), nn.MaxPool3d((1, 2, 2)))
        self.res1 = _conv_bn(16, 16, 3, dims=3)
        self.res2 = _conv_bn(16, 16, 3, act=None, dims=3)
        self.down = _conv_bn(16, 32, 3, 2, dims=3)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.res2(self.res1(x)))
        return self.fc(self.pool(self.down(x)).flatten(1))


class LSTMClassifier(nn.Module):
    def __init__(self, features=16, embed=32, hidden=48, num_classes=10):
        super().__init__()
        self.embed = nn.Linear(features, embed)
        self.act = nn.ReLU()
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.fc1 = nn.Linear(hidden, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):                                  # x: [B, T, F]
        y, _ = self.lstm(self.act(self.embed(x)))
        return self.fc2(F.relu(self.fc1(y[:, -1])))


# --------------------------------------------------------------------------- the zoo

_ARCHS: dict[str, Callable[[], nn.Module]] = {
    "plain_cnn": PlainCNN,
    "vgg11_bn_small": VGG,
    "resnet20": ResNet20,
    "resnet_bottleneck": lambda: BottleneckResNet(
        stages=((16, 64, 2, 1), (32, 128, 2, 2), (64, 256, 2, 2))),
    "resnext_small": lambda: BottleneckResNet(
        stages=((32, 64, 1, 1), (64, 128, 2, 2), (128, 256, 2, 2)), groups=8),
    "regnety_small": RegNetY,
    "mobilenetv2_small": MobileNetV2,
    "efficientnet_small": EfficientNet,
    "densenet_bc_small": DenseNetBC,
    "inception_small": Inception,
    "shufflenetv2_small": ShuffleNetV2,
    "unet_small": UNet,
    "hrnet_small": HRNet,
    "yolo_c2f_small": YoloC2f,
    "convnext_small": ConvNeXt,
    "vit_mha": ViTMHA,
    "vit_qkv": ViTQKV,
    "bert_tiny": BertTiny,
    "gpt_gqa_tiny": GPTGQA,
    "mlp_mixer_small": MLPMixer,
    "conv1d_audio": Conv1dAudio,
    "conv3d_video": Conv3dVideo,
    "lstm_classifier": LSTMClassifier,
}


@dataclass(frozen=True)
class ZooEntry:
    spec: ZooSpec
    factory: Callable[[], nn.Module]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def input_spec(self) -> tuple[tuple[int, ...], str]:
        return self.spec.input_shape, self.spec.dtype

    def example_inputs(self, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor]:
        """A seeded random input (token ids within `spec.int_range` for int inputs)."""
        return (_example_for(self.spec, batch or self.spec.input_shape[0], seed),)


def _factory(spec: ZooSpec, arch: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return _finalize(arch(), spec)
    make.__name__ = f"make_{spec.name}"
    make.__doc__ = f"{spec.name} ({spec.family}): {spec.description}. Seeded, eval mode."
    return make


if set(_ARCHS) != {s.name for s in TORCH_ZOO}:   # keep the framework-free table honest
    raise RuntimeError("models/torch_zoo.py and models/registry.py TORCH_ZOO disagree: "
                       f"{sorted(set(_ARCHS) ^ {s.name for s in TORCH_ZOO})}")

ZOO: dict[str, ZooEntry] = {s.name: ZooEntry(s, _factory(s, _ARCHS[s.name])) for s in TORCH_ZOO}


def make(name: str) -> nn.Module:
    """The seeded, eval-mode model called `name`."""
    try:
        return ZOO[name].factory()
    except KeyError:
        raise KeyError(f"no torch zoo model {name!r}; known: {', '.join(ZOO)}") from None


def num_params(model: nn.Module) -> int:
    """Parameter count, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
