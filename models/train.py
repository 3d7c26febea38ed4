"""Train the reference zoo on Fashion-MNIST and export each model to ONNX.

    python -m models.train resnet20 --epochs 15 --seed 0 --threads 1

writes models/trained/<name>.onnx (raw [0, 1] pixels N×1×28×28 in, 10 logits out; the
data set's mean/std normalisation is the graph's first op), <name>.json (the accuracy
measured on the ONNX file with ONNX Runtime, and the recipe), <name>.pt (the state dict,
only when under 5 MB) and the shared calibration set fmnist_calib512.npz.

The architectures are our own small definitions, sized for 28×28 grayscale input, and
chosen to cover the structures a pruner must handle: residual streams with projection
shortcuts (ResNet), a Flatten→Linear head (VGG), depthwise convs and inverted residuals
(MobileNetV2), channel concatenation (DenseNet), and attention heads plus LayerNorm (ViT).
BatchNorm stays a separate node in the export: folding is the pruner's business.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.fmnist import MEAN, STD, evaluate_onnx, load_fmnist, write_calib

TRAINED_DIR = Path(__file__).resolve().parent / "trained"
CALIB_NAME = "fmnist_calib512.npz"
MAX_PT_BYTES = 5 * 1024 * 1024


# --------------------------------------------------------------------------- building blocks

class Normalize(nn.Module):
    """(x - mean) / std as the model's first op, so the ONNX file takes raw pixels."""

    def __init__(self, mean: float = MEAN, std: float = STD):
        super().__init__()
        self.mean, self.std = float(mean), float(std)  # constants, not state

    def forward(self, x):
        return (x - self.mean) / self.std


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- ResNet (CIFAR)

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # option B: 1x1 projection with BN
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. for small images: 3 stages of 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, not {depth}")
        n = (depth - 2) // 6
        self.norm = Normalize()
        self.stem = conv_bn(1, widths[0])
        blocks, cin = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (stage > 0 and i == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.stem(self.norm(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- VGG

class VGG(nn.Module):
    """VGG-style convs with BN, three poolings 28→14→7→3, then Flatten→Linear head."""

    def __init__(self, cfg=(32, 32, "M", 64, 64, "M", 128, 128, "M"), hidden=256,
                 num_classes=10):
        super().__init__()
        self.norm = Normalize()
        layers, cin = [], 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, v))
                cin = v
        self.features = nn.Sequential(*layers)
        side = 28
        for v in cfg:
            if v == "M":
                side //= 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True),
            nn.Dropout(0.3), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(self.norm(x)))


# --------------------------------------------------------------------------- MobileNetV2

def _divisible(v, d=8):
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 28×28: stride-1 stem, two stride-2 stages (28→14→7)."""

    # (expansion t, channels c, repeats n, first stride s)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1))

    def __init__(self, width: float = 0.5, last_channel: int = 640, num_classes=10):
        super().__init__()
        self.norm = Normalize()
        cin = _divisible(32 * width)
        layers = [nn.Sequential(nn.Conv2d(1, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin),
                                nn.ReLU6(inplace=True))]
        for t, c, n, s in self.SETTINGS:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _divisible(last_channel * max(1.0, width))
        layers.append(nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last),
                                    nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        x = self.pool(self.features(self.norm(x)))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- DenseNet-BC

class DenseLayer(nn.Module):
    """BN-ReLU-1x1 (4k) - BN-ReLU-3x3 (k), output concatenated onto the input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(nn.Module):
    """A small DenseNet-BC: 3 dense blocks, growth k, compression 0.5. The stem's stride
    (2 for the trained model: blocks at 14→7→3, four times cheaper per step on a CPU core
    than stride 1's 28→14→7) sets the first block's resolution."""

    def __init__(self, growth=12, block=(6, 6, 6), compression=0.5, num_classes=10,
                 stem_stride=1):
        super().__init__()
        self.norm = Normalize()
        c = 2 * growth
        layers = [nn.Conv2d(1, c, 3, stem_stride, 1, bias=False)]
        for i, n in enumerate(block):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i != len(block) - 1:
                cout = int(math.floor(c * compression))
                layers.append(Transition(c, cout))
                c = cout
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.pool(self.features(self.norm(x)))
        return self.fc(torch.flatten(x, 1))


# --------------------------------------------------------------------------- ViT

class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (explicit heads in ONNX)."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.dh = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):  # [B, N, D] -> [B, H, N, Dh]
            return t.reshape(b, n, self.heads, self.dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax((q @ k.transpose(-2, -1)) * (self.dh ** -0.5), dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, n, self.heads * self.dh)
        return self.proj(out)


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """A small ViT: patch-p conv embedding (or a conv stem), class token, learned positions,
    pre-LN blocks."""

    def __init__(self, patch=4, dim=128, depth=6, heads=4, mlp=256, num_classes=10,
                 stem="patch"):
        super().__init__()
        if 28 % patch:
            raise ValueError(f"patch {patch} does not divide 28")
        self.norm = Normalize()
        if stem == "patch":
            self.embed = nn.Conv2d(1, dim, patch, patch)
            n = (28 // patch) ** 2
        elif stem == "conv":
            # a convolutional stem (two 3x3 stride-2 convs, 28 -> 14 -> 7: 49 tokens, as patch
            # 4): small ViTs trained from scratch on little data converge much faster with it
            self.embed = nn.Sequential(
                nn.Conv2d(1, dim // 4, 3, 2, 1, bias=False), nn.BatchNorm2d(dim // 4),
                nn.ReLU(inplace=True), nn.Conv2d(dim // 4, dim, 3, 2, 1))
            n = 49
        else:
            raise ValueError(f"stem must be 'patch' or 'conv', not {stem!r}")
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.embed(self.norm(x)).flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------- registry

SGD = dict(optimizer="sgd", lr=0.1, wd=5e-4, batch=128)
ADAMW = dict(optimizer="adamw", lr=1e-3, wd=0.05, batch=128)

MODELS = {
    # name: (family, constructor, default recipe)
    "resnet20": ("resnet", lambda: CifarResNet(20), SGD),
    "resnet56": ("resnet", lambda: CifarResNet(56), SGD),
    "vgg": ("vgg", lambda: VGG(), dict(SGD, lr=0.05)),
    "mobilenetv2": ("mobilenet", lambda: MobileNetV2(width=0.5), dict(SGD, wd=4e-5)),
    "densenet": ("densenet", lambda: DenseNetBC(stem_stride=2), SGD),
    "vit": ("vit", lambda: ViT(stem="conv"), ADAMW),
}


def build(name: str) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name][1]()


# --------------------------------------------------------------------------- training

def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, batched."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # b,1,h,1
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # b,1,1,w
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return xp[bi, ci, rows, cols]


@torch.no_grad()
def evaluate_torch(model, images, labels, batch=1000):
    model.eval()
    correct = 0
    for s in range(0, len(images), batch):
        out = model(torch.from_numpy(np.array(images[s:s + batch])))
        correct += int((out.argmax(1).numpy() == labels[s:s + batch]).sum())
    return correct / len(images)


def train(name, epochs, seed=0, lr=None, batch=None, optimizer=None, wd=None,
          limit_train=None, log=print, eval_every=0, init=None):
    """Train ``name`` from scratch, or from the state dict ``init`` (a further schedule
    after a first one: a warm restart); return (model, recipe dict)."""
    family, _, defaults = MODELS[name]
    recipe = dict(defaults)
    for k, v in (("lr", lr), ("batch", batch), ("optimizer", optimizer), ("wd", wd)):
        if v is not None:
            recipe[k] = v
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build(name)
    prior = None
    if init:
        model.load_state_dict(torch.load(init, weights_only=True))
        prior = json.loads(Path(init).with_suffix(".json").read_text())["recipe"] \
            if Path(init).with_suffix(".json").exists() else None
    model = model.to(memory_format=torch.channels_last)  # ~20% faster on CPU
    images, labels = load_fmnist("train")
    test_x, test_y = load_fmnist("test")
    if limit_train:
        images, labels = images[:limit_train], labels[:limit_train]
    x_all = torch.from_numpy(np.array(images))  # writable copies
    y_all = torch.from_numpy(np.array(labels))
    n = len(x_all)
    bs = recipe["batch"]
    steps = math.ceil(n / bs)

    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or pname in ("cls", "pos") else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe["wd"]},
              {"params": no_decay, "weight_decay": 0.0}]
    if recipe["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=0.9, nesterov=True)
    elif recipe["optimizer"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=recipe["lr"])
    else:
        raise ValueError(f"unknown optimizer {recipe['optimizer']!r}")
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], epochs=epochs, steps_per_epoch=steps, pct_start=0.15,
        div_factor=10.0, final_div_factor=100.0)
    recipe.update(epochs=epochs, seed=seed, schedule="onecycle(pct_start=0.15)",
                  momentum=0.9 if recipe["optimizer"] == "sgd" else None,
                  nesterov=recipe["optimizer"] == "sgd", threads=torch.get_num_threads(),
                  augmentation="random crop (pad 2) + horizontal flip",
                  train_images=n)
    if init:
        # a second one-cycle schedule from a checkpoint: the recipe says so and the
        # table shows both stages ("6+6 epochs", the summed training time)
        recipe["continued_from"] = prior
    log(f"{name}: {sum(p.numel() for p in model.parameters())} params, {n} images, "
        f"{steps} steps/epoch, recipe {recipe}")

    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        te, loss_sum, correct = time.time(), 0.0, 0
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            x = augment(x_all[idx], gen).contiguous(memory_format=torch.channels_last)
            y = y_all[idx]
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == y).sum())
            if epoch == 0 and i in (9, 49):
                log(f"  epoch 1 step {i + 1}/{steps}: {(time.time() - te) / (i + 1):.3f} s/step")
        msg = (f"epoch {epoch + 1}/{epochs} loss {loss_sum / n:.4f} train acc {correct / n:.4f} "
               f"lr {sched.get_last_lr()[0]:.4g} epoch {time.time() - te:.1f}s "
               f"total {time.time() - t0:.0f}s")
        if eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            msg += f" test acc {evaluate_torch(model, test_x, test_y):.4f}"
        log(msg)
    recipe["train_seconds"] = round(time.time() - t0, 1)
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, recipe


# --------------------------------------------------------------------------- export

def export_onnx(model: nn.Module, path: Path) -> Path:
    """Legacy (TorchScript) export, opset 17, dynamic batch, BatchNorm kept as nodes.

    TrainingMode.PRESERVE with the model in eval mode exports inference-mode BN but skips
    the exporter's eval peephole, which would fold BN into the preceding Conv.
    """
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.onnx.export(
        model, (torch.zeros(1, 1, 28, 28),), str(tmp), dynamo=False, opset_version=17,
        do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["input"], output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    _drop_initializer_identities(tmp)
    os.replace(tmp, path)
    return path


def _drop_initializer_identities(path: Path) -> None:
    """Remove the Identity nodes PRESERVE mode puts between initializers and their users.

    Each such node only renames a weight; its consumers read the initializer directly
    instead (a graph output keeps its Identity).
    """
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    rename, keep = {}, []
    for node in g.node:
        if (node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits
                and node.output[0] not in outputs):
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not rename:
        return
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def save_outputs(name, model, recipe, out_dir=TRAINED_DIR, log=print):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, out_dir / f"{name}.onnx")
    acc = evaluate_onnx(onnx_path, threads=1)
    torch_acc = evaluate_torch(model, *load_fmnist("test"))
    log(f"{name}: ONNX test accuracy {acc:.4f} (torch {torch_acc:.4f})")
    try:
        rel = onnx_path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        rel = onnx_path
    meta = {
        "name": name,
        "framework": "torch",
        "family": MODELS[name][0],
        "input_shape": [1, 1, 28, 28],
        "accuracy": round(acc, 4),
        "path": str(rel),
        "params": sum(p.numel() for p in model.parameters()),
        "recipe": recipe,
    }
    tmp = out_dir / f"{name}.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / f"{name}.json")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    if buf.tell() < MAX_PT_BYTES:
        (out_dir / f"{name}.pt").write_bytes(buf.getvalue())
    else:
        log(f"{name}: state dict {buf.tell()} bytes >= 5 MB, not saved")
    calib = out_dir / CALIB_NAME
    if not calib.exists():
        write_calib(calib, n=512, seed=0, input_name="input")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch", type=int)
    p.add_argument("--wd", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--limit-train", type=int, help="train on the first N images (timing runs)")
    p.add_argument("--eval-every", type=int, default=0, help="test accuracy every N epochs")
    p.add_argument("--no-export", action="store_true", help="train only (timing runs)")
    p.add_argument("--out-dir", default=str(TRAINED_DIR))
    p.add_argument("--init", help="start from this state dict (.pt; its .json sidecar's recipe "
                                  "is recorded): a further schedule after a first one")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    model, recipe = train(a.name, a.epochs, a.seed, lr=a.lr, batch=a.batch,
                          optimizer=a.optimizer, wd=a.wd, limit_train=a.limit_train,
                          log=log, eval_every=a.eval_every, init=a.init)
    if not a.no_export:
        save_outputs(a.name, model, recipe, a.out_dir, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
