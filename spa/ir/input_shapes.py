"""The shapes a model is costed at: `--input-shape NAME=D0xD1x…`.

Costs are per sample: a symbolic batch axis counts as 1 and does not change which layers
are expensive. A symbolic *spatial* or *sequence* axis does: convolutions scale with H·W and
a classifier head does not, attention scales with the square of the sequence length and its
projections linearly. So a model whose graph inputs have such dynamic axes is costed at the
shapes the user deploys at, given with `--input-shape` (API: `input_shapes={name: shape}`);
without them `analyze` says what it assumed and `prune --target flops|latency|memory`
refuses (docs/cli.md). The model itself keeps its dynamic axes: only the cost model, the
latency tables, the oracle's and the checks' inputs use the given shapes.
"""
from __future__ import annotations

import re

import onnx

from ..errors import UsageError

_SPEC = re.compile(r"^([^=]+)=(\d+(?:x\d+)*)$")


def parse(specs) -> dict[str, tuple[int, ...]]:
    """["images=1x3x640x640", ...] -> {"images": (1, 3, 640, 640)} (UsageError if bad)."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        m = _SPEC.match(spec.strip())
        if not m:
            raise UsageError(f"--input-shape {spec!r}: expected NAME=D0xD1x... with positive "
                             "integers, e.g. images=1x3x224x224")
        name, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        if any(d < 1 for d in dims):
            raise UsageError(f"--input-shape {spec!r}: every dimension must be >= 1")
        if name in out:
            raise UsageError(f"--input-shape given twice for input {name!r}")
        out[name] = dims
    return out


def declared(model) -> dict[str, tuple]:
    """Each graph input's declared dims (int, or the symbol's name / None when dynamic)."""
    out = {}
    for v in model.graph.input:
        if v.name in model.consts:
            continue
        dims = []
        for d in v.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                        else (d.dim_param or None))
        out[v.name] = tuple(dims)
    return out


def validate(model, shapes: dict) -> dict[str, tuple[int, ...]]:
    """Check `shapes` against the model's graph inputs (names, ranks, static dims)."""
    have = declared(model)
    for name, dims in shapes.items():
        if name not in have:
            raise UsageError(f"--input-shape names {name!r}, which is not a graph input (the "
                             f"inputs are {', '.join(map(repr, have)) or 'none'})",
                             file=model.path)
        want = have[name]
        if len(dims) != len(want):
            raise UsageError(f"--input-shape {name}={'x'.join(map(str, dims))} has rank "
                             f"{len(dims)}; the graph input has rank {len(want)} "
                             f"({_fmt(want)})", file=model.path)
        bad = [k for k, (a, b) in enumerate(zip(dims, want)) if isinstance(b, int) and a != b]
        if bad:
            raise UsageError(f"--input-shape {name}={'x'.join(map(str, dims))} contradicts "
                             f"the graph input's static shape {_fmt(want)} at axis {bad[0]}",
                             file=model.path)
    return {k: tuple(int(d) for d in v) for k, v in shapes.items()}


def _fmt(dims) -> str:
    return "x".join(str(d) if isinstance(d, int) else (d or "?") for d in dims)


def dynamic_axes(model, shapes: dict | None = None) -> list[tuple[str, int, str]]:
    """(input, axis, symbol) of every dynamic non-batch axis that `shapes` does not fix:
    the axes that change the relative cost of layers."""
    shapes = shapes or {}
    out = []
    for name, dims in declared(model).items():
        if name in shapes:
            continue
        for k, d in enumerate(dims):
            if k > 0 and not isinstance(d, int):
                out.append((name, k, d or "?"))
    return out


def suggestion(model, shapes: dict | None = None) -> str:
    """The exact option(s) that fix the dynamic axes, with the symbols to fill in."""
    shapes = shapes or {}
    dyn = {n for n, _, _ in dynamic_axes(model, shapes)}
    parts = []
    for name, dims in declared(model).items():
        if name in dyn:
            fill = ["1" if k == 0 and not isinstance(d, int) else
                    (str(d) if isinstance(d, int) else (d or f"D{k}").upper())
                    for k, d in enumerate(dims)]
            parts.append(f"--input-shape {name}={'x'.join(fill)}")
    return " ".join(parts)


def costing_shapes(model, shapes: dict) -> dict:
    """Every tensor's shape when the graph inputs have `shapes` (the model's own shapes for
    tensors inference cannot fix): inferred with the inputs made static for the time of
    the inference (the model's declared inputs are restored afterwards, whatever happens)."""
    from .model import infer_shapes
    shapes = validate(model, shapes)
    saved = {}
    for v in model.graph.input:
        if v.name in shapes:
            saved[v.name] = onnx.TypeProto()
            saved[v.name].CopyFrom(v.type)
            for d, n in zip(v.type.tensor_type.shape.dim, shapes[v.name]):
                d.Clear()
                d.dim_value = n
    try:
        fixed = infer_shapes(model)
    finally:
        for v in model.graph.input:
            if v.name in saved:
                v.type.CopyFrom(saved[v.name])
    out = dict(model.shapes)
    for t, s in fixed.items():
        old = out.get(t)
        if s is not None and (old is None or len(old) == len(s)):
            out[t] = s
    return out


def apply(model, shapes: dict) -> None:
    """Cost `model` at `shapes` from now on (model.cost_shapes; see spa.cost)."""
    model.cost_shapes = costing_shapes(model, shapes)
    model.input_shapes = validate(model, shapes)
