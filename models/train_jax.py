"""Train a small flax nnx CNN on Fashion-MNIST and export it to ONNX with converters.jax.

    python -m models.train_jax --epochs 3 --seed 0 --threads 1

writes models/trained/flax_cnn.onnx (raw [0, 1] pixels N×1×28×28 in, 10 logits out: the
model itself normalises with the data set's mean/std and transposes to NHWC, so both are
in the graph), flax_cnn.json (accuracy measured on the ONNX file with ONNX Runtime on the
10k test images, and the recipe) and flax_cnn.log (the training log).

The recipe is deliberately cheap (the CPU is shared): three conv-BN-ReLU layers (16, 32,
64 channels, 2.3 M multiply-adds per image), a Flatten -> Linear(128) -> Linear(10) head,
AdamW with a one-cycle cosine schedule, horizontal flips, three epochs on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

TRAINED_DIR = Path(__file__).resolve().parent / "trained"
NAME = "flax_cnn"


def build(seed: int = 0):
    """The FlaxCNN module with seeded parameters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.fmnist import MEAN, STD

    class FlaxCNN(nnx.Module):
        """N×1×28×28 pixels in [0, 1] -> 10 logits. Normalisation and the NCHW -> NHWC
        transpose are the first ops, so the exported graph takes what the data loader gives."""

        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
            self.conv2 = nnx.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)
            self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
            self.conv3 = nnx.Conv(32, 64, (3, 3), use_bias=False, rngs=rngs)
            self.bn3 = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
            self.fc1 = nnx.Linear(7 * 7 * 64, 128, rngs=rngs)
            self.fc2 = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
            x = (x - MEAN) / STD
            x = jnp.transpose(x, (0, 2, 3, 1))                       # NCHW -> NHWC
            x = jax.nn.relu(self.bn1(self.conv1(x)))                 # 28x28x16
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = jax.nn.relu(self.bn2(self.conv2(x)))                 # 14x14x32
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = jax.nn.relu(self.bn3(self.conv3(x)))                 # 7x7x64
            x = x.reshape(x.shape[0], -1)
            return self.fc2(jax.nn.relu(self.fc1(x)))

    return FlaxCNN(nnx.Rngs(seed))


def _log(f, msg: str) -> None:
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    f.write(line + "\n")
    f.flush()


def train(epochs: int, seed: int, batch: int, lr: float, wd: float, out_dir: Path,
          threads: int, limit: int | None = None) -> dict:
    import jax
    import optax
    from flax import nnx

    from converters.jax import export
    from models.fmnist import evaluate_onnx, load_fmnist

    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_fmnist("train")
    test_x, test_y = load_fmnist("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    n = images.shape[0]
    steps = n // batch
    model = build(seed)
    schedule = optax.cosine_onecycle_schedule(epochs * steps, lr, pct_start=0.2)
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=wd), wrt=nnx.Param)
    recipe = {"optimizer": "adamw", "lr": lr, "wd": wd, "batch": batch, "epochs": epochs,
              "seed": seed, "schedule": "cosine_onecycle(pct_start=0.2)",
              "augmentation": "horizontal flip", "bn_momentum": 0.9,
              "threads": threads, "train_images": n,
              "versions": {d: _version(d) for d in ("jax", "flax", "optax", "jax2onnx")}}

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            logits = m(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, (logits.argmax(-1) == y).mean()

    @nnx.jit
    def predict(model, x):
        return model(x).argmax(-1)

    rng = np.random.default_rng(seed)
    log = open(out_dir / f"{NAME}.log", "w")
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    _log(log, f"{NAME}: {params} params, {n} images, {steps} steps/epoch, recipe {recipe}")
    t_start = time.time()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(n)
        t0 = time.time()
        tot_loss = tot_acc = 0.0
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            x = images[idx].copy()
            flip = rng.random(len(idx)) < 0.5
            x[flip] = x[flip][..., ::-1]
            loss, acc = step(model, opt, x, labels[idx])
            tot_loss += float(loss)
            tot_acc += float(acc)
            if epoch == 0 and s in (10, 50):
                _log(log, f"  epoch 1 step {s}/{steps}: {(time.time() - t0) / (s + 1):.3f} s/step")
        model.eval()
        correct = sum(int((np.asarray(predict(model, test_x[i:i + 1000]))
                           == test_y[i:i + 1000]).sum()) for i in range(0, len(test_y), 1000))
        _log(log, f"epoch {epoch + 1}/{epochs} loss {tot_loss / steps:.4f} train acc "
                  f"{tot_acc / steps:.4f} test acc (jax) {correct / len(test_y):.4f} "
                  f"epoch {time.time() - t0:.1f}s total {time.time() - t_start:.0f}s")
    recipe["train_seconds"] = round(time.time() - t_start, 1)
    model.eval()
    path = export(model, (1, 1, 28, 28), out_dir / f"{NAME}.onnx")
    acc = evaluate_onnx(path)
    _log(log, f"exported {path}: test accuracy (ONNX Runtime, 10k images) {acc:.4f}")
    log.close()
    rel = os.path.relpath(path, Path(__file__).resolve().parent.parent)
    meta = {"name": NAME, "framework": "jax", "family": "cnn", "input_shape": [1, 1, 28, 28],
            "accuracy": round(acc, 4), "path": rel, "params": params, "recipe": recipe}
    tmp = out_dir / f"{NAME}.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / f"{NAME}.json")
    return meta


def _version(dist: str):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.train_jax",
                                description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-train", type=int, help="train on the first N images (timing runs)")
    p.add_argument("--out-dir", default=str(TRAINED_DIR))
    args = p.parse_args(argv)
    if "jax" in sys.modules:
        print("warning: jax already imported; --threads has no effect", file=sys.stderr)
    # XLA's CPU thread pools: one thread each, as the recipe records
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false"
                               f" intra_op_parallelism_threads={args.threads}").strip()
    meta = train(args.epochs, args.seed, args.batch, args.lr, args.wd, Path(args.out_dir),
                 args.threads, args.limit_train)
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
