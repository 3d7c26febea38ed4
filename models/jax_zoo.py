"""The JAX/Flax zoo: three seeded flax nnx models with small inputs, exported to ONNX with
``converters.jax.export``.

| name | structure |
|---|---|
| jax_cnn_bn | conv-BN-ReLU stack with a grouped conv, max-pool, Flatten → Linear head |
| jax_resnet_small | ResNet basic blocks: residual adds, a strided 1x1 projection shortcut |
| jax_transformer_tiny | token Embed + position table, pre-LN encoder blocks with nnx.MultiHeadAttention and a GELU MLP, mean pool |

The rows of ``models.registry.JAX_ZOO`` describe them without jax (names, families, input
shapes); ``python -m models export <name>`` calls ``export`` here. Images are channels-last
(NHWC), as flax takes them; the exported graph takes the same layout.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SEED = 0


def _nnx():
    from flax import nnx
    return nnx


def _cnn_bn():
    import jax
    nnx = _nnx()

    class CnnBN(nnx.Module):
        """Conv-BN-ReLU ×3 (the second conv grouped, 2 groups), max-pool, Flatten, two
        Linear layers: the Flatten of NHWC activations interleaves the channels into the
        features (feature = (h·W + w)·C + c)."""

        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, rngs=rngs)
            self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, feature_group_count=2,
                                  rngs=rngs)
            self.bn2 = nnx.BatchNorm(32, rngs=rngs)
            self.conv3 = nnx.Conv(32, 32, (3, 3), rngs=rngs)
            self.bn3 = nnx.BatchNorm(32, rngs=rngs)
            self.fc1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
            self.fc2 = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.relu(self.bn1(self.conv1(x)))
            x = jax.nn.relu(self.bn2(self.conv2(x)))
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = jax.nn.relu(self.bn3(self.conv3(x)))
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = x.reshape(x.shape[0], -1)
            return self.fc2(jax.nn.relu(self.fc1(x)))

    return CnnBN(nnx.Rngs(SEED))


def _resnet_small():
    import jax
    nnx = _nnx()

    class Block(nnx.Module):
        def __init__(self, cin, cout, stride, rngs):
            self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False,
                                  rngs=rngs)
            self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
            self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
            self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
            if stride != 1 or cin != cout:
                self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False,
                                     rngs=rngs)
                self.proj_bn = nnx.BatchNorm(cout, rngs=rngs)
            else:
                self.proj = self.proj_bn = None

        def __call__(self, x):
            y = jax.nn.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            short = x if self.proj is None else self.proj_bn(self.proj(x))
            return jax.nn.relu(y + short)

    class ResNetSmall(nnx.Module):
        """Stem, two stages of two basic blocks (16 and 32 channels; the second stage
        starts with a strided block and a 1x1 projection shortcut), global average pool,
        Linear head."""

        def __init__(self, rngs):
            self.stem = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
            self.stem_bn = nnx.BatchNorm(16, rngs=rngs)
            self.blocks = nnx.List([Block(16, 16, 1, rngs), Block(16, 16, 1, rngs),
                                    Block(16, 32, 2, rngs), Block(32, 32, 1, rngs)])
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.relu(self.stem_bn(self.stem(x)))
            for b in self.blocks:
                x = b(x)
            return self.head(x.mean(axis=(1, 2)))

    return ResNetSmall(nnx.Rngs(SEED))


def _transformer_tiny():
    import jax
    import jax.numpy as jnp
    nnx = _nnx()

    class EncoderBlock(nnx.Module):
        def __init__(self, d, heads, hidden, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d,
                                               decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
            self.fc2 = nnx.Linear(hidden, d, rngs=rngs)

        def __call__(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h)
            return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))

    class TransformerTiny(nnx.Module):
        """Token embedding plus a learned position table, two pre-LN encoder blocks (4
        heads of 8, MLP 64), final LayerNorm, mean over tokens, Linear head."""

        def __init__(self, rngs, vocab=100, length=16, d=32, heads=4, hidden=64,
                     classes=5):
            self.embed = nnx.Embed(vocab, d, rngs=rngs)
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, d)))
            self.blocks = nnx.List([EncoderBlock(d, heads, hidden, rngs) for _ in range(2)])
            self.ln = nnx.LayerNorm(d, rngs=rngs)
            self.head = nnx.Linear(d, classes, rngs=rngs)

        def __call__(self, ids):
            x = self.embed(ids) + self.pos[...][None, : ids.shape[1]]
            for b in self.blocks:
                x = b(x)
            return self.head(jnp.mean(self.ln(x), axis=1))

    return TransformerTiny(nnx.Rngs(SEED))


@dataclass(frozen=True)
class Entry:
    factory: Callable
    input_shape: tuple[int, ...]          # batch 1
    dtype: str = "float32"
    int_high: int = 0                     # integer inputs: values in [0, int_high)

    def specs(self) -> list:
        return [(self.input_shape, self.dtype)]

    def example_inputs(self, batch: int = 2, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        shape = (batch, *self.input_shape[1:])
        if self.dtype.startswith("int"):
            return [rng.integers(0, self.int_high, shape).astype(self.dtype)]
        return [rng.standard_normal(shape).astype(self.dtype)]


ZOO: dict[str, Entry] = {
    "jax_cnn_bn": Entry(_cnn_bn, (1, 32, 32, 3)),
    "jax_resnet_small": Entry(_resnet_small, (1, 32, 32, 3)),
    "jax_transformer_tiny": Entry(_transformer_tiny, (1, 16), "int32", 100),
}


def make(name: str):
    """A freshly built, seeded module (the same parameters every time)."""
    try:
        entry = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown jax zoo model {name!r} (one of {', '.join(ZOO)})") from None
    return entry.factory()


# factories for `spa convert jax models.jax_zoo:<factory>`
cnn_bn = _cnn_bn
resnet_small = _resnet_small
transformer_tiny = _transformer_tiny


def export(name: str, path) -> Path:
    """Build the seeded model `name` and export it to `path` (converters.jax.export:
    opset 18, dynamic batch, initializers named after the parameters)."""
    from converters.jax import export as export_jax

    return export_jax(make(name), ZOO[name].specs(), path)


def fingerprint() -> str:
    """A hash of what an export depends on: this file, the converter and the versions."""
    from importlib import metadata

    import converters.jax as cj

    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(inspect.getsource(cj).encode())
    for dist in ("jax", "flax", "jax2onnx", "onnx"):
        try:
            h.update(f"{dist}=={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} missing".encode())
    return h.hexdigest()[:16]


def export_cached(name: str, cache_dir=None) -> Path:
    """``export`` to ``<cache>/<name>.onnx`` unless a file made by the same code and
    versions (its ``.fingerprint`` sidecar) is there."""
    from models.registry import FRAMEWORK_ZOO_BY_NAME

    path = FRAMEWORK_ZOO_BY_NAME[name].onnx_path(Path(cache_dir) if cache_dir else None)
    side = path.with_name(path.name + ".fingerprint")
    fp = fingerprint()
    if path.is_file() and side.is_file() and side.read_text().strip() == fp:
        return path
    export(name, path)
    side.write_text(fp + "\n")
    return path
