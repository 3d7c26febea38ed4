"""ONNX operators as JAX functions: one small function per op type (or family).

An implementation is `fn(c, *inputs) -> output or tuple of outputs`, where `c` is the
node's `Ctx` (attributes, static operands, errors, the float dtype) and `c.xp` is the array
module to compute with. The engine picks it per node: when every input is a concrete numpy
array (shape computations, constant folding of frozen tensors) and the op is registered with
`numpy=True`, `c.xp` is numpy and the node is evaluated on the spot, so that Reshape targets,
Slice bounds, Resize sizes … are plain Python ints at trace time. Otherwise `c.xp` is
`jax.numpy` and the node becomes part of the traced (jit-able, differentiable) computation.
Ops registered with `numpy=False` use jax-only primitives; with all-static inputs they are
still evaluated eagerly (`jax.ensure_compile_time_eval`).

Operands that must be static (shape operands, axes, sizes) are read with `c.static(v)`; a
value computed from runtime data there is an error naming the node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from ._jax import J


@dataclass
class Impl:
    fn: Callable
    numpy: bool


IMPLS: dict[str, Impl] = {}


def op(*names: str, numpy: bool = True):
    def deco(fn):
        for n in names:
            if n in IMPLS:
                raise ValueError(f"duplicate engine implementation for {n}")
            IMPLS[n] = Impl(fn, numpy)
        return fn
    return deco


def supported_ops() -> list[str]:
    """Op types with an implementation: default-domain names, then `domain:Op` for the few
    ops of other domains (ai.onnx.ml, as skl2onnx emits around classifiers)."""
    return sorted(IMPLS, key=lambda n: (":" in n, n))


def impl_key(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


# ------------------------------------------------------------------------------------------
# helpers


def is_float(x) -> bool:
    return np.issubdtype(np.dtype(x.dtype), np.floating) if hasattr(x, "dtype") else \
        isinstance(x, float)


def _np_dtype(onnx_type: int):
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _matmul(c, a, b):
    if c.xp is np:
        return np.matmul(a, b)
    return J.jnp.matmul(a, b, precision=J.lax.Precision.HIGHEST)


def _where(c, cond, a, b):
    return c.xp.where(cond, a, b)


def _sigmoid(c, x):
    if c.xp is np:
        return 1.0 / (1.0 + np.exp(-x))
    return J.jax.nn.sigmoid(x)


def _softplus(c, x):
    if c.xp is np:
        return np.logaddexp(x, 0.0).astype(x.dtype)
    return J.jax.nn.softplus(x)


def _cast_float(c, x):
    """Results of float math keep the engine's float dtype (numpy may promote scalars)."""
    return x.astype(c.float_dtype) if is_float(x) and x.dtype != c.float_dtype else x


# ------------------------------------------------------------------------------------------
# elementwise


def _relu(c, x):
    return c.xp.where(x > 0, x, 0).astype(x.dtype)


_UNARY = {
    "Abs": lambda c, x: c.xp.abs(x),
    "Neg": lambda c, x: -x,
    "Sqrt": lambda c, x: c.xp.sqrt(x),
    "Exp": lambda c, x: c.xp.exp(x),
    "Log": lambda c, x: c.xp.log(x),
    "Reciprocal": lambda c, x: (1 / x).astype(x.dtype),
    "Floor": lambda c, x: c.xp.floor(x),
    "Ceil": lambda c, x: c.xp.ceil(x),
    "Round": lambda c, x: c.xp.round(x),
    "Sign": lambda c, x: c.xp.sign(x),
    "Sin": lambda c, x: c.xp.sin(x),
    "Cos": lambda c, x: c.xp.cos(x),
    "Tan": lambda c, x: c.xp.tan(x),
    "Asin": lambda c, x: c.xp.arcsin(x),
    "Acos": lambda c, x: c.xp.arccos(x),
    "Atan": lambda c, x: c.xp.arctan(x),
    "Sinh": lambda c, x: c.xp.sinh(x),
    "Cosh": lambda c, x: c.xp.cosh(x),
    "Asinh": lambda c, x: c.xp.arcsinh(x),
    "Acosh": lambda c, x: c.xp.arccosh(x),
    "Atanh": lambda c, x: c.xp.arctanh(x),
    "Tanh": lambda c, x: c.xp.tanh(x),
    "Not": lambda c, x: c.xp.logical_not(x),
    "BitwiseNot": lambda c, x: c.xp.invert(x),
    "IsNaN": lambda c, x: c.xp.isnan(x),
    "Relu": _relu,
    "Sigmoid": _sigmoid,
    "Softplus": _softplus,
    "Softsign": lambda c, x: x / (1 + c.xp.abs(x)),
    "Identity": lambda c, x: x,
}


def _unary(name, fn):
    def impl(c, x):
        return fn(c, x)
    impl.__name__ = name
    return impl


for _name, _fn in _UNARY.items():
    op(_name)(_unary(_name, _fn))


@op("Erf", numpy=False)
def erf(c, x):
    return J.lax.erf(x)


@op("IsInf")
def isinf(c, x):
    pos, neg = c.attr("detect_positive", 1), c.attr("detect_negative", 1)
    xp = c.xp
    return xp.logical_or(xp.logical_and(xp.isposinf(x), bool(pos)),
                         xp.logical_and(xp.isneginf(x), bool(neg)))


@op("LeakyRelu")
def leaky_relu(c, x):
    a = c.attr("alpha", 0.01)
    return c.xp.where(x >= 0, x, a * x).astype(x.dtype)


@op("PRelu")
def prelu(c, x, slope):
    return c.xp.where(x >= 0, x, slope * x).astype(x.dtype)


@op("ThresholdedRelu")
def thresholded_relu(c, x):
    return c.xp.where(x > c.attr("alpha", 1.0), x, 0).astype(x.dtype)


@op("Elu")
def elu(c, x):
    a = c.attr("alpha", 1.0)
    xp = c.xp
    return xp.where(x >= 0, x, a * (xp.exp(xp.minimum(x, 0)) - 1)).astype(x.dtype)


@op("Selu")
def selu(c, x):
    a, g = c.attr("alpha", 1.67326319217681884765625), c.attr("gamma", 1.05070102214813232421875)
    xp = c.xp
    return (g * xp.where(x > 0, x, a * (xp.exp(xp.minimum(x, 0)) - 1))).astype(x.dtype)


@op("Celu")
def celu(c, x):
    a = c.attr("alpha", 1.0)
    xp = c.xp
    return (xp.maximum(x, 0) + xp.minimum(0, a * (xp.exp(xp.minimum(x, 0) / a) - 1))
            ).astype(x.dtype)


@op("HardSigmoid")
def hard_sigmoid(c, x):
    a, b = c.attr("alpha", 0.2), c.attr("beta", 0.5)
    return c.xp.clip(a * x + b, 0, 1).astype(x.dtype)


@op("HardSwish")
def hard_swish(c, x):
    return (x * c.xp.clip(x / 6 + 0.5, 0, 1)).astype(x.dtype)


@op("Mish")
def mish(c, x):
    return x * c.xp.tanh(_softplus(c, x))


@op("Swish")
def swish(c, x):
    return x * _sigmoid(c, c.attr("alpha", 1.0) * x).astype(x.dtype)


@op("Gelu", numpy=False)
def gelu(c, x):
    approx = c.attr("approximate", "none")
    if approx == "tanh":
        return (0.5 * x * (1 + J.jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
                ).astype(x.dtype)
    return (0.5 * x * (1 + J.lax.erf(x / math.sqrt(2)))).astype(x.dtype)


@op("Shrink")
def shrink(c, x):
    b, lam = c.attr("bias", 0.0), c.attr("lambd", 0.5)
    xp = c.xp
    return xp.where(x < -lam, x + b, xp.where(x > lam, x - b, 0)).astype(x.dtype)


@op("Clip")
def clip(c, x, lo=None, hi=None):
    xp = c.xp
    if lo is not None:
        x = xp.where(x < lo, lo, x).astype(x.dtype)
    if hi is not None:
        x = xp.where(x > hi, hi, x).astype(x.dtype)
    return x


def _binary(fn):
    def impl(c, a, b):
        return fn(c.xp, a, b)
    return impl


def _int_div(xp, a, b):
    if np.issubdtype(np.dtype(a.dtype), np.integer):
        q = xp.abs(a) // xp.where(b == 0, 1, xp.abs(b))
        return (q * xp.sign(a) * xp.sign(b)).astype(a.dtype)
    return a / b


for _name, _fn in {
    "Add": lambda xp, a, b: a + b,
    "Sub": lambda xp, a, b: a - b,
    "Mul": lambda xp, a, b: a * b,
    "Div": _int_div,
    "Equal": lambda xp, a, b: xp.equal(a, b),
    "Less": lambda xp, a, b: xp.less(a, b),
    "LessOrEqual": lambda xp, a, b: xp.less_equal(a, b),
    "Greater": lambda xp, a, b: xp.greater(a, b),
    "GreaterOrEqual": lambda xp, a, b: xp.greater_equal(a, b),
    "And": lambda xp, a, b: xp.logical_and(a, b),
    "Or": lambda xp, a, b: xp.logical_or(a, b),
    "Xor": lambda xp, a, b: xp.logical_xor(a, b),
    "BitwiseAnd": lambda xp, a, b: xp.bitwise_and(a, b),
    "BitwiseOr": lambda xp, a, b: xp.bitwise_or(a, b),
    "BitwiseXor": lambda xp, a, b: xp.bitwise_xor(a, b),
}.items():
    op(_name)(_binary(_fn))


@op("Pow")
def power(c, a, b):
    xp = c.xp
    if is_float(a):
        return xp.power(a, b.astype(a.dtype) if hasattr(b, "astype") else b)
    return xp.power(a, b).astype(a.dtype)


@op("Mod")
def mod(c, a, b):
    if c.attr("fmod", 0):
        return c.xp.fmod(a, b)
    return c.xp.mod(a, b)


@op("BitShift")
def bitshift(c, a, b):
    if c.attr("direction") == "LEFT":
        return c.xp.left_shift(a, b)
    return c.xp.right_shift(a, b)


def _variadic(fn):
    def impl(c, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(c.xp, out, x)
        return out
    return impl


op("Sum")(_variadic(lambda xp, a, b: a + b))
op("Max")(_variadic(lambda xp, a, b: xp.maximum(a, b)))
op("Min")(_variadic(lambda xp, a, b: xp.minimum(a, b)))


@op("Mean")
def mean(c, *xs):
    return (_variadic(lambda xp, a, b: a + b)(c, *xs) / len(xs)).astype(xs[0].dtype)


@op("Where")
def where(c, cond, a, b):
    return c.xp.where(cond, a, b)


@op("Cast")
def cast(c, x):
    dt = c.dtype(c.attr("to"))
    if c.xp is not np:  # int64 is int32 in JAX unless jax_enable_x64 is set
        dt = J.jax.dtypes.canonicalize_dtype(dt)
    return x.astype(dt)


@op("CastLike")
def cast_like(c, x, like):
    return x.astype(like.dtype)


@op("Dropout")
def dropout(c, x, ratio=None, training=None):
    if training is not None and bool(np.asarray(c.static(training, "training_mode"))):
        raise c.error("Dropout in training mode is not supported (the engine evaluates "
                      "inference graphs)")
    return x, c.xp.ones(x.shape, dtype=bool)


# ------------------------------------------------------------------------------------------
# shapes and indexing


@op("Constant")
def constant(c):
    for a in c.node.attribute:
        if a.name == "value":
            return onnx.numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    raise c.error("Constant without a dense value (sparse or string constants are not "
                  "supported)")


@op("Shape")
def shape(c, x):
    s = list(np.shape(x))
    start, end = c.attr("start", 0), c.attr("end", None)
    return np.array(s[start:end], dtype=np.int64)


@op("Size")
def size(c, x):
    return np.array(int(np.prod(np.shape(x))), dtype=np.int64)


@op("Reshape")
def reshape(c, x, shape):
    target = [int(d) for d in c.static(shape, "shape")]
    if not c.attr("allowzero", 0):
        target = [x.shape[k] if d == 0 else d for k, d in enumerate(target)]
    if -1 in target:
        k = target.index(-1)
        known = int(np.prod([d for j, d in enumerate(target) if j != k]))
        target[k] = int(np.prod(x.shape)) // max(known, 1)
    if int(np.prod(target)) != int(np.prod(x.shape)):
        raise c.error(f"cannot reshape {tuple(x.shape)} to {tuple(target)}")
    return c.xp.reshape(x, target)


@op("Flatten")
def flatten(c, x):
    a = _axis(c.attr("axis", 1), x.ndim)
    return c.xp.reshape(x, (int(np.prod(x.shape[:a])), int(np.prod(x.shape[a:]))))


@op("Transpose")
def transpose(c, x):
    perm = c.attr("perm", None)
    perm = list(reversed(range(x.ndim))) if perm is None else [int(p) for p in perm]
    return c.xp.transpose(x, perm)


def _axes(c, axes_input, *, attr="axes"):
    if axes_input is not None:
        return [int(a) for a in np.atleast_1d(c.static(axes_input, "axes"))]
    a = c.attr(attr, None)
    return None if a is None else [int(v) for v in a]


@op("Squeeze")
def squeeze(c, x, axes=None):
    ax = _axes(c, axes)
    if ax is None:
        ax = [k for k, d in enumerate(x.shape) if d == 1]
    ax = sorted(_axis(a, x.ndim) for a in ax)
    return c.xp.reshape(x, [d for k, d in enumerate(x.shape) if k not in ax])


@op("Unsqueeze")
def unsqueeze(c, x, axes=None):
    ax = _axes(c, axes)
    rank = x.ndim + len(ax)
    ax = sorted(_axis(a, rank) for a in ax)
    shape = list(x.shape)
    for a in ax:
        shape.insert(a, 1)
    return c.xp.reshape(x, shape)


@op("Concat")
def concat(c, *xs):
    xs = [x for x in xs if x is not None]
    a = _axis(c.attr("axis"), xs[0].ndim)
    if c.xp is np:
        return np.concatenate(xs, axis=a)
    dt = J.jnp.result_type(*xs)
    return J.jnp.concatenate([J.jnp.asarray(x, dtype=dt) for x in xs], axis=a)


@op("Split")
def split(c, x, sizes=None):
    a = _axis(c.attr("axis", 0), x.ndim)
    n = len(c.node.output)
    if sizes is not None:
        sz = [int(s) for s in c.static(sizes, "split")]
    elif c.attr("split", None) is not None:
        sz = [int(s) for s in c.attr("split")]
    else:
        num = c.attr("num_outputs", n)
        chunk = -(-x.shape[a] // num)
        sz = [min(chunk, x.shape[a] - k * chunk) for k in range(num)]
    offsets = np.cumsum([0] + sz)
    return tuple(_slice_axis(x, a, offsets[k], offsets[k + 1]) for k in range(len(sz)))


def _slice_axis(x, axis, start, stop, step=1):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(int(start), None if stop is None else int(stop), int(step))
    return x[tuple(idx)]


@op("Slice")
def slice_(c, x, starts, ends, axes=None, steps=None):
    starts = [int(v) for v in c.static(starts, "starts")]
    ends = [int(v) for v in c.static(ends, "ends")]
    axes = list(range(len(starts))) if axes is None else \
        [_axis(int(v), x.ndim) for v in c.static(axes, "axes")]
    steps = [1] * len(starts) if steps is None else [int(v) for v in c.static(steps, "steps")]
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        d = x.shape[a]
        s = s + d if s < 0 else s
        e = e + d if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
            idx[a] = slice(s, e, st)
        else:
            s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
            idx[a] = slice(s, None if e < 0 else e, st)
    return x[tuple(idx)]


def _norm_index(xp, idx, n):
    return xp.where(idx < 0, idx + n, idx)


@op("Gather")
def gather(c, x, idx):
    a = _axis(c.attr("axis", 0), x.ndim)
    xp = c.xp
    if isinstance(idx, np.ndarray):
        idx = np.where(idx < 0, idx + x.shape[a], idx)
        if c.xp is np:
            return np.take(x, idx, axis=a)
        return J.jnp.take(x, idx, axis=a, mode="clip")
    idx = _norm_index(xp, idx, x.shape[a])
    return J.jnp.take(x, idx, axis=a, mode="clip")


@op("GatherElements")
def gather_elements(c, x, idx):
    a = _axis(c.attr("axis", 0), x.ndim)
    idx = _norm_index(c.xp, idx, x.shape[a])
    return c.xp.take_along_axis(x, idx, axis=a)


@op("GatherND")
def gather_nd(c, x, idx):
    xp = c.xp
    bd = c.attr("batch_dims", 0)
    bshape = tuple(x.shape[:bd])
    B = int(np.prod(bshape))
    xf = xp.reshape(x, (B,) + tuple(x.shape[bd:]))
    idf = xp.reshape(idx, (B,) + tuple(idx.shape[bd:]))
    k = idx.shape[-1]
    comps = tuple(_norm_index(xp, idf[..., i], xf.shape[1 + i]) for i in range(k))
    bi = xp.arange(B).reshape((B,) + (1,) * (idf.ndim - 2))
    out = xf[(bi,) + comps]
    return xp.reshape(out, bshape + tuple(out.shape[1:]))


@op("ScatterND", numpy=False)
def scatter_nd(c, data, idx, updates):
    jnp = J.jnp
    k = idx.shape[-1]
    comps = tuple(_norm_index(jnp, idx[..., i], data.shape[i]) for i in range(k))
    red = c.attr("reduction", "none")
    at = data.at[comps]
    return {"none": at.set, "add": at.add, "mul": at.multiply, "max": at.max,
            "min": at.min}[red](updates)


@op("ScatterElements", numpy=False)
def scatter_elements(c, data, idx, updates):
    jnp = J.jnp
    a = _axis(c.attr("axis", 0), data.ndim)
    idx = _norm_index(jnp, idx, data.shape[a])
    grids = list(jnp.meshgrid(*[jnp.arange(n) for n in idx.shape], indexing="ij"))
    grids[a] = idx
    red = c.attr("reduction", "none")
    at = data.at[tuple(grids)]
    return {"none": at.set, "add": at.add, "mul": at.multiply, "max": at.max,
            "min": at.min}[red](updates)


@op("Expand")
def expand(c, x, shape):
    target = tuple(int(d) for d in c.static(shape, "shape"))
    out = np.broadcast_shapes(tuple(x.shape), target)
    return c.xp.broadcast_to(x, out)


@op("Tile")
def tile(c, x, repeats):
    return c.xp.tile(x, [int(r) for r in c.static(repeats, "repeats")])


@op("ConstantOfShape")
def constant_of_shape(c, shape):
    dims = [int(d) for d in c.static(shape, "shape")]
    value = c.attr("value", None)
    v = np.zeros(1, np.float32) if value is None else onnx.numpy_helper.to_array(value)
    dt = c.float_dtype if is_float(v) else v.dtype
    return np.full(dims, v.reshape(-1)[0], dtype=dt)


@op("EyeLike")
def eye_like(c, x):
    dt = c.dtype(c.attr("dtype")) if c.attr("dtype", None) is not None else x.dtype
    return np.eye(x.shape[0], x.shape[1], k=c.attr("k", 0), dtype=dt)


@op("Range")
def range_(c, start, limit, delta):
    s, l_, d = (c.static(v, n) for v, n in ((start, "start"), (limit, "limit"),
                                             (delta, "delta")))
    dt = np.asarray(s).dtype
    n = max(int(math.ceil((float(l_) - float(s)) / float(d))), 0)
    return (np.asarray(s) + np.arange(n) * np.asarray(d)).astype(
        c.float_dtype if np.issubdtype(dt, np.floating) else dt)


@op("NonZero")
def nonzero(c, x):
    x = c.static(x, "input (NonZero has a data-dependent output shape)")
    return np.array(np.nonzero(x), dtype=np.int64)


@op("Compress")
def compress(c, x, cond):
    cond = np.asarray(c.static(cond, "condition (Compress has a data-dependent output shape)"))
    idx = np.nonzero(cond)[0]
    a = c.attr("axis", None)
    if a is None:
        return c.xp.reshape(x, (-1,))[idx]
    return c.xp.take(x, idx, axis=_axis(a, x.ndim))


@op("OneHot")
def one_hot(c, idx, depth, values):
    d = int(np.asarray(c.static(depth, "depth")).reshape(-1)[0])
    xp = c.xp
    a = c.attr("axis", -1)
    idx = xp.where(idx < 0, idx + d, idx)
    hot = xp.expand_dims(idx, -1) == xp.arange(d)
    out = xp.where(hot, values[1], values[0])
    rank = out.ndim
    return xp.moveaxis(out, -1, _axis(a, rank))


@op("Trilu")
def trilu(c, x, k=None):
    kk = 0 if k is None else int(np.asarray(c.static(k, "k")).reshape(-1)[0])
    n, m = x.shape[-2], x.shape[-1]
    mask = np.triu(np.ones((n, m), bool), kk) if c.attr("upper", 1) else \
        np.tril(np.ones((n, m), bool), kk)
    return c.xp.where(mask, x, 0).astype(x.dtype)


@op("CumSum")
def cumsum(c, x, axis):
    a = _axis(int(np.asarray(c.static(axis, "axis")).reshape(-1)[0]), x.ndim)
    xp = c.xp
    if c.attr("reverse", 0):
        x = xp.flip(x, a)
    y = xp.cumsum(x, axis=a).astype(x.dtype)
    if c.attr("exclusive", 0):
        y = y - x
    if c.attr("reverse", 0):
        y = xp.flip(y, a)
    return y


@op("DepthToSpace")
def depth_to_space(c, x):
    b = c.attr("blocksize")
    n, ch, h, w = x.shape
    xp = c.xp
    if c.attr("mode", "DCR") == "DCR":
        y = xp.reshape(x, (n, b, b, ch // (b * b), h, w))
        y = xp.transpose(y, (0, 3, 4, 1, 5, 2))
    else:
        y = xp.reshape(x, (n, ch // (b * b), b, b, h, w))
        y = xp.transpose(y, (0, 1, 4, 2, 5, 3))
    return xp.reshape(y, (n, ch // (b * b), h * b, w * b))


@op("SpaceToDepth")
def space_to_depth(c, x):
    b = c.attr("blocksize")
    n, ch, h, w = x.shape
    xp = c.xp
    y = xp.reshape(x, (n, ch, h // b, b, w // b, b))
    y = xp.transpose(y, (0, 3, 5, 1, 2, 4))
    return xp.reshape(y, (n, ch * b * b, h // b, w // b))


@op("Pad")
def pad(c, x, pads, value=None, axes=None):
    p = [int(v) for v in c.static(pads, "pads")]
    rank = x.ndim
    ax = list(range(rank)) if axes is None else \
        [_axis(int(a), rank) for a in c.static(axes, "axes")]
    k = len(ax)
    width = [[0, 0] for _ in range(rank)]
    for j, a in enumerate(ax):
        width[a] = [p[j], p[j + k]]
    mode = c.attr("mode", "constant")
    xp = c.xp
    pos = [(max(b, 0), max(e, 0)) for b, e in width]
    if any(b or e for b, e in pos):
        if mode == "constant":
            v = 0 if value is None or np.size(value) == 0 else xp.reshape(value, ())
            if c.xp is np:
                x = np.pad(x, pos, mode="constant", constant_values=v)
            else:
                x = J.jnp.pad(x, pos, mode="constant", constant_values=v)
        elif mode in ("reflect", "edge", "wrap"):
            x = xp.pad(x, pos, mode=mode)
        else:
            raise c.error(f"Pad mode {mode!r} is not supported")
    neg = [(max(-b, 0), max(-e, 0)) for b, e in width]
    if any(b or e for b, e in neg):
        x = x[tuple(slice(b, x.shape[k_] - e) for k_, (b, e) in enumerate(neg))]
    return x


# ------------------------------------------------------------------------------------------
# reductions, normalisation, softmax


def _reduce_axes(c, x, axes_input):
    if axes_input is not None:  # ReduceSum since opset 13, the others since 18
        ax = [int(a) for a in np.atleast_1d(c.static(axes_input, "axes"))]
    else:
        ax = c.attr("axes", None)
        ax = None if ax is None else [int(a) for a in ax]
    if not ax:
        if c.attr("noop_with_empty_axes", 0):
            return None
        return tuple(range(x.ndim))
    return tuple(sorted(_axis(a, x.ndim) for a in ax))


def _reducer(fn):
    def impl(c, x, axes=None):
        ax = _reduce_axes(c, x, axes)
        if ax is None:
            return x
        keep = bool(c.attr("keepdims", 1))
        return fn(c.xp, x, ax, keep)
    return impl


def _logsumexp(xp, x, ax, keep):
    m = xp.max(x, axis=ax, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    if xp is not np:
        m = J.lax.stop_gradient(m)
    y = xp.log(xp.sum(xp.exp(x - m), axis=ax, keepdims=True)) + m
    return y if keep else xp.squeeze(y, axis=ax)


for _name, _fn in {
    "ReduceSum": lambda xp, x, ax, k: xp.sum(x, axis=ax, keepdims=k).astype(x.dtype),
    "ReduceMean": lambda xp, x, ax, k: xp.mean(x, axis=ax, keepdims=k).astype(x.dtype),
    "ReduceMax": lambda xp, x, ax, k: xp.max(x, axis=ax, keepdims=k),
    "ReduceMin": lambda xp, x, ax, k: xp.min(x, axis=ax, keepdims=k),
    "ReduceProd": lambda xp, x, ax, k: xp.prod(x, axis=ax, keepdims=k).astype(x.dtype),
    "ReduceL1": lambda xp, x, ax, k: xp.sum(xp.abs(x), axis=ax, keepdims=k).astype(x.dtype),
    "ReduceL2": lambda xp, x, ax, k: xp.sqrt(xp.sum(x * x, axis=ax, keepdims=k)).astype(x.dtype),
    "ReduceSumSquare": lambda xp, x, ax, k: xp.sum(x * x, axis=ax, keepdims=k).astype(x.dtype),
    "ReduceLogSum": lambda xp, x, ax, k: xp.log(xp.sum(x, axis=ax, keepdims=k)).astype(x.dtype),
    "ReduceLogSumExp": _logsumexp,
}.items():
    op(_name)(_reducer(_fn))


def _arg(fn):
    def impl(c, x):
        a = _axis(c.attr("axis", 0), x.ndim)
        xp = c.xp
        if c.attr("select_last_index", 0):
            y = x.shape[a] - 1 - fn(xp, xp.flip(x, a), a)
        else:
            y = fn(xp, x, a)
        y = y.astype(np.int64) if xp is np else y
        return xp.expand_dims(y, a) if c.attr("keepdims", 1) else y
    return impl


op("ArgMax")(_arg(lambda xp, x, a: xp.argmax(x, axis=a)))
op("ArgMin")(_arg(lambda xp, x, a: xp.argmin(x, axis=a)))


def _softmax_family(kind):
    def impl(c, x):
        jax, jnp = J.jax, J.jnp
        legacy = c.opset < 13
        a = _axis(c.attr("axis", 1 if legacy else -1), x.ndim)
        shape = x.shape
        if legacy:  # opset < 13: coerce to 2-D at `axis`
            x = jnp.reshape(x, (int(np.prod(shape[:a])), int(np.prod(shape[a:]))))
            a = 1
        if kind == "softmax":
            y = jax.nn.softmax(x, axis=a)
        elif kind == "log":
            y = jax.nn.log_softmax(x, axis=a)
        else:
            y = jax.nn.one_hot(jnp.argmax(x, axis=a), x.shape[a], axis=a, dtype=x.dtype)
        return jnp.reshape(y, shape)
    return impl


op("Softmax", numpy=False)(_softmax_family("softmax"))
op("LogSoftmax", numpy=False)(_softmax_family("log"))
op("Hardmax", numpy=False)(_softmax_family("hard"))


def _channel(v, rank):
    """A per-channel vector [C] shaped to broadcast over [N, C, ...]."""
    return v.reshape((1, -1) + (1,) * (rank - 2))


@op("BatchNormalization")
def batch_norm(c, x, scale, bias, mean, var):
    if c.attr("training_mode", 0):
        raise c.error("BatchNormalization in training mode is not supported (the engine "
                      "evaluates inference graphs)")
    eps = c.attr("epsilon", 1e-5)
    xp = c.xp
    r = x.ndim
    inv = _channel(scale, r) / xp.sqrt(_channel(var, r) + eps)
    return ((x - _channel(mean, r)) * inv + _channel(bias, r)).astype(x.dtype)


@op("InstanceNormalization")
def instance_norm(c, x, scale, bias):
    eps = c.attr("epsilon", 1e-5)
    xp = c.xp
    ax = tuple(range(2, x.ndim))
    m = xp.mean(x, axis=ax, keepdims=True)
    v = xp.mean((x - m) ** 2, axis=ax, keepdims=True)
    return ((x - m) / xp.sqrt(v + eps) * _channel(scale, x.ndim) +
            _channel(bias, x.ndim)).astype(x.dtype)


@op("LayerNormalization")
def layer_norm(c, x, scale, bias=None):
    eps = c.attr("epsilon", 1e-5)
    xp = c.xp
    a = _axis(c.attr("axis", -1), x.ndim)
    ax = tuple(range(a, x.ndim))
    m = xp.mean(x, axis=ax, keepdims=True)
    v = xp.mean((x - m) ** 2, axis=ax, keepdims=True)
    inv = 1 / xp.sqrt(v + eps)
    y = (x - m) * inv * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype), m, inv


@op("RMSNormalization")
def rms_norm(c, x, scale):
    eps = c.attr("epsilon", 1e-5)
    xp = c.xp
    a = _axis(c.attr("axis", -1), x.ndim)
    ax = tuple(range(a, x.ndim))
    return (x / xp.sqrt(xp.mean(x * x, axis=ax, keepdims=True) + eps) * scale).astype(x.dtype)


@op("GroupNormalization")
def group_norm(c, x, scale, bias):
    eps = c.attr("epsilon", 1e-5)
    g = c.attr("num_groups")
    xp = c.xp
    n, ch = x.shape[:2]
    rest = tuple(x.shape[2:])
    y = xp.reshape(x, (n, g, -1))
    m = xp.mean(y, axis=2, keepdims=True)
    v = xp.mean((y - m) ** 2, axis=2, keepdims=True)
    y = (y - m) / xp.sqrt(v + eps)
    if scale.shape[0] == g and g != ch:  # opset 18: one scale/bias per group
        y = y * scale.reshape(1, g, 1) + bias.reshape(1, g, 1)
        return xp.reshape(y, (n, ch) + rest).astype(x.dtype)
    y = xp.reshape(y, (n, ch) + rest)
    return (y * _channel(scale, x.ndim) + _channel(bias, x.ndim)).astype(x.dtype)


@op("MeanVarianceNormalization")
def mvn(c, x):
    xp = c.xp
    ax = tuple(_axis(a, x.ndim) for a in c.attr("axes", [0, 2, 3]))
    m = xp.mean(x, axis=ax, keepdims=True)
    v = xp.mean((x - m) ** 2, axis=ax, keepdims=True)
    return ((x - m) / (xp.sqrt(v) + 1e-9)).astype(x.dtype)


@op("LRN")
def lrn(c, x):
    size = c.attr("size")
    alpha, beta, bias = c.attr("alpha", 1e-4), c.attr("beta", 0.75), c.attr("bias", 1.0)
    xp = c.xp
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = x * x
    width = [(0, 0)] * x.ndim
    width[1] = (lo, hi)
    sqp = xp.pad(sq, width)
    ch = x.shape[1]
    acc = sum(_slice_axis(sqp, 1, k, k + ch) for k in range(size))
    return (x / (bias + alpha / size * acc) ** beta).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# matrix products


@op("MatMul")
def matmul(c, a, b):
    return _matmul(c, a, b)


@op("Gemm")
def gemm(c, a, b, cc=None):
    if c.attr("transA", 0):
        a = a.T
    if c.attr("transB", 0):
        b = b.T
    y = _matmul(c, a, b)
    alpha, beta = c.attr("alpha", 1.0), c.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if cc is not None:
        y = y + (cc * beta if beta != 1.0 else cc)
    return y.astype(a.dtype)


@op("Einsum")
def einsum(c, *xs):
    eq = c.attr("equation")
    if c.xp is np:
        return np.einsum(eq, *xs)
    return J.jnp.einsum(eq, *xs, precision=J.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------
# convolution and pooling


def _conv_pads(c, in_sp, k_eff, strides):
    """Begin/end padding per spatial axis (explicit `pads` or `auto_pad`)."""
    nd = len(in_sp)
    auto = c.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i, s, k in zip(in_sp, strides, k_eff):
            o = -(-i // s)
            total = max(0, (o - 1) * s + k - i)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * nd
    p = c.attr("pads", None) or [0] * (2 * nd)
    return [(int(p[i]), int(p[i + nd])) for i in range(nd)]


@op("Conv", numpy=False)
def conv(c, x, w, b=None):
    lax = J.lax
    nd = x.ndim - 2
    strides = list(c.attr("strides", None) or [1] * nd)
    dil = list(c.attr("dilations", None) or [1] * nd)
    ks = list(w.shape[2:])
    k_eff = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
    pads = _conv_pads(c, x.shape[2:], k_eff, strides)
    y = lax.conv_general_dilated(x, w.astype(x.dtype), strides, pads, rhs_dilation=dil,
                                 feature_group_count=c.attr("group", 1),
                                 precision=lax.Precision.HIGHEST)
    if b is not None:
        y = y + _channel(b, y.ndim)
    return y


@op("ConvTranspose", numpy=False)
def conv_transpose(c, x, w, b=None):
    jnp, lax = J.jnp, J.lax
    nd = x.ndim - 2
    g = c.attr("group", 1)
    strides = list(c.attr("strides", None) or [1] * nd)
    dil = list(c.attr("dilations", None) or [1] * nd)
    ks = list(w.shape[2:])
    out_pad = list(c.attr("output_padding", None) or [0] * nd)
    in_sp = list(x.shape[2:])
    k_eff = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
    full = [s * (i - 1) + op_ + k for s, i, op_, k in zip(strides, in_sp, out_pad, k_eff)]
    out_shape = c.attr("output_shape", None)
    auto = c.attr("auto_pad", "NOTSET")
    if out_shape is not None:  # as ONNX Runtime: the head gets the larger half of the
        pads = []              # (clamped) padding except for SAME_UPPER, the tail the rest
        for f, t in zip(full, list(out_shape)[-nd:]):  # (negative: zeros appended)
            total = f - t
            tc = max(total, 0)
            head = tc // 2 if auto == "SAME_UPPER" else tc - tc // 2
            pads.append((head, total - head))
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for f, i, s in zip(full, in_sp, strides):
            total = f - i * s
            half = total // 2
            pads.append((total - half, half) if auto == "SAME_LOWER" else (half, total - half))
    elif auto == "VALID":
        pads = [(0, 0)] * nd
    else:
        p = c.attr("pads", None) or [0] * (2 * nd)
        pads = [(int(p[i]), int(p[i + nd])) for i in range(nd)]
    cin, mg = w.shape[0], w.shape[1]
    wt = jnp.reshape(w, (g, cin // g, mg) + tuple(ks))
    wt = jnp.swapaxes(wt, 1, 2)
    wt = jnp.reshape(wt, (g * mg, cin // g) + tuple(ks))
    wt = jnp.flip(wt, axis=tuple(range(2, 2 + nd)))
    padding = [(ke - 1 - pb, ke - 1 - pe + op_) for ke, (pb, pe), op_
               in zip(k_eff, pads, out_pad)]
    y = lax.conv_general_dilated(x, wt.astype(x.dtype), [1] * nd, padding,
                                 lhs_dilation=strides, rhs_dilation=dil,
                                 feature_group_count=g, precision=lax.Precision.HIGHEST)
    if b is not None:
        y = y + _channel(b, y.ndim)
    return y


def _pool_geometry(c, x):
    nd = x.ndim - 2
    ks = list(c.attr("kernel_shape"))
    strides = list(c.attr("strides", None) or [1] * nd)
    dil = list(c.attr("dilations", None) or [1] * nd)
    k_eff = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
    in_sp = list(x.shape[2:])
    pads = _conv_pads(c, in_sp, k_eff, strides)
    extra = [0] * nd
    ceil = c.attr("ceil_mode", 0)
    for j, (i, s, k, (pb, pe)) in enumerate(zip(in_sp, strides, k_eff, pads)):
        span = i + pb + pe - k
        if ceil:
            o = -(-span // s) + 1
            if (o - 1) * s >= i + pb:
                o -= 1
        else:  # C division as ONNX Runtime: a window larger than the input still gives one
            o = int(span / s) + 1
        extra[j] = max(0, (o - 1) * s + k - (i + pb + pe))
    return ks, strides, dil, pads, extra


def _window(x_ndim, ks, strides, dil, pads, extra):
    win = (1, 1) + tuple(ks)
    st = (1, 1) + tuple(strides)
    wd = (1, 1) + tuple(dil)
    pad = ((0, 0), (0, 0)) + tuple((pb, pe + e) for (pb, pe), e in zip(pads, extra))
    return win, st, wd, pad


@op("MaxPool", numpy=False)
def max_pool(c, x):
    if len(c.node.output) > 1 and c.node.output[1]:
        raise c.error("MaxPool's Indices output is not supported")
    lax, jnp = J.lax, J.jnp
    ks, strides, dil, pads, extra = _pool_geometry(c, x)
    win, st, wd, pad = _window(x.ndim, ks, strides, dil, pads, extra)
    # a concrete identity init value makes this the differentiable reduce_window_max
    init = np.array(-np.inf if is_float(x) else np.iinfo(x.dtype).min, dtype=x.dtype)
    if all(d == 1 for d in dil):
        return lax.reduce_window(x, init, lax.max, win, st, pad)
    # JAX has no reverse mode for dilated max windows: the maximum of strided slices, one
    # per kernel offset, is the same function and differentiates like any maximum
    xp_ = jnp.pad(x, pad, constant_values=init)
    out_sp = [(xp_.shape[2 + j] - ((k - 1) * d + 1)) // s + 1
              for j, (k, d, s) in enumerate(zip(ks, dil, strides))]
    y = None
    for offs in np.ndindex(*ks):
        idx = (slice(None), slice(None)) + tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, s, n in zip(offs, dil, strides, out_sp))
        y = xp_[idx] if y is None else jnp.maximum(y, xp_[idx])
    return y


@op("AveragePool", numpy=False)
def average_pool(c, x):
    lax, jnp = J.lax, J.jnp
    ks, strides, dil, pads, extra = _pool_geometry(c, x)
    win, st, wd, pad = _window(x.ndim, ks, strides, dil, pads, extra)
    s = lax.reduce_window(x, np.array(0, x.dtype), lax.add, win, st, pad, window_dilation=wd)
    ones = np.ones((1, 1) + tuple(x.shape[2:]), np.float32)
    if c.attr("count_include_pad", 0):
        ones = np.pad(ones, ((0, 0), (0, 0)) + tuple(pads), constant_values=1.0)
        cpad = ((0, 0), (0, 0)) + tuple((0, e) for e in extra)
    else:
        cpad = pad
    with J.jax.ensure_compile_time_eval():
        cnt = np.asarray(lax.reduce_window(jnp.asarray(ones), 0.0, lax.add, win, st, cpad,
                                           window_dilation=wd))
    return (s / cnt.astype(x.dtype)).astype(x.dtype)


@op("LpPool", numpy=False)
def lp_pool(c, x):
    lax, jnp = J.lax, J.jnp
    p = c.attr("p", 2)
    ks, strides, dil, pads, extra = _pool_geometry(c, x)
    win, st, wd, pad = _window(x.ndim, ks, strides, dil, pads, extra)
    s = lax.reduce_window(jnp.abs(x) ** p, np.array(0, x.dtype), lax.add, win, st, pad,
                          window_dilation=wd)
    return (s ** (1.0 / p)).astype(x.dtype)


@op("GlobalAveragePool")
def global_average_pool(c, x):
    return c.xp.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True).astype(x.dtype)


@op("GlobalMaxPool")
def global_max_pool(c, x):
    return c.xp.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)


@op("GlobalLpPool")
def global_lp_pool(c, x):
    p = c.attr("p", 2)
    xp = c.xp
    return (xp.sum(xp.abs(x) ** p, axis=tuple(range(2, x.ndim)), keepdims=True) ** (1.0 / p)
            ).astype(x.dtype)


@op("MaxRoiPool", numpy=False)
def max_roi_pool(c, x, rois):
    jnp = J.jnp
    ph, pw = c.attr("pooled_shape")
    scale = c.attr("spatial_scale", 1.0)
    n, ch, h, w = x.shape
    bidx = rois[:, 0].astype(jnp.int32)
    x1, y1, x2, y2 = (jnp.round(rois[:, k] * scale).astype(jnp.int32) for k in (1, 2, 3, 4))
    rh = jnp.maximum(y2 - y1 + 1, 1).astype(x.dtype)
    rw = jnp.maximum(x2 - x1 + 1, 1).astype(x.dtype)
    py, px = jnp.arange(ph), jnp.arange(pw)

    def bounds(start, size, p, pooled, limit):
        bs = size[:, None] / pooled
        lo = jnp.clip(jnp.floor(p[None] * bs).astype(jnp.int32) + start[:, None], 0, limit)
        hi = jnp.clip(jnp.ceil((p[None] + 1) * bs).astype(jnp.int32) + start[:, None], 0, limit)
        return lo, hi
    hs, he = bounds(y1, rh, py, ph, h)
    ws, we = bounds(x1, rw, px, pw, w)
    ys, xs = jnp.arange(h), jnp.arange(w)
    my = (ys[None, None] >= hs[..., None]) & (ys[None, None] < he[..., None])  # [R, ph, H]
    mx = (xs[None, None] >= ws[..., None]) & (xs[None, None] < we[..., None])  # [R, pw, W]
    feats = x[bidx]  # [R, C, H, W]
    mask = my[:, :, None, :, None] & mx[:, None, :, None, :]  # [R, ph, pw, H, W]
    vals = jnp.where(mask[:, None], feats[:, :, None, None], -jnp.inf)
    out = jnp.max(vals, axis=(-2, -1))
    empty = ~jnp.any(mask, axis=(-2, -1))
    return jnp.where(empty[:, None], 0, out).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# resize


def _resize_coords(mode, xo, scale, lin, lout, roi):
    if mode == "half_pixel":
        return (xo + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (xo + 0.5) / scale - 0.5 if lout > 1 else np.zeros_like(xo)
    if mode == "align_corners":
        return np.zeros_like(xo) if lout == 1 else xo * (lin - 1) / (lout - 1)
    if mode == "asymmetric":
        return xo / scale
    if mode == "tf_half_pixel_for_nn":
        return (xo + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adj = lout / (scale * lin)
        center = lin / 2
        return center * (1 - adj) + (xo + 0.5) / scale - 0.5
    if mode == "tf_crop_and_resize":
        s, e = roi
        if lout > 1:
            return s * (lin - 1) + xo * (e - s) * (lin - 1) / (lout - 1)
        return np.full_like(xo, 0.5 * (s + e) * (lin - 1))
    raise ValueError(mode)


def _nearest(mode, xi):
    if mode == "round_prefer_floor":
        return np.where(xi - np.floor(xi) == 0.5, np.floor(xi), np.round(xi))
    if mode == "round_prefer_ceil":
        return np.where(xi - np.floor(xi) == 0.5, np.ceil(xi), np.round(xi))
    if mode == "floor":
        return np.floor(xi)
    if mode == "ceil":
        return np.ceil(xi)
    raise ValueError(mode)


def _cubic_weights(t, a):
    """Weights of the four taps at offsets -1, 0, 1, 2 for fractional position t."""
    def k(d):
        d = np.abs(d)
        return np.where(d <= 1, (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1,
                        np.where(d < 2, a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a, 0))
    return np.stack([k(t + 1), k(t), k(1 - t), k(2 - t)], axis=-1)


def _resize_axis(c, x, axis, lout, scale, roi, mode, ctm, nearest_mode):
    xp = c.xp
    lin = x.shape[axis]
    xo = np.arange(lout, dtype=np.float64)
    xi = _resize_coords(ctm, xo, scale, lin, lout, roi)
    bshape = [1] * x.ndim
    bshape[axis] = lout
    if mode == "nearest":
        idx = np.clip(_nearest(nearest_mode, xi), 0, lin - 1).astype(np.int64)
        y = xp.take(x, idx, axis=axis)
    elif mode == "linear":
        xc = np.clip(xi, 0, lin - 1)
        i0 = np.floor(xc).astype(np.int64)
        i1 = np.minimum(i0 + 1, lin - 1)
        wgt = (xc - i0).reshape(bshape).astype(c.float_dtype)
        y = xp.take(x, i0, axis=axis) * (1 - wgt) + xp.take(x, i1, axis=axis) * wgt
    elif mode == "cubic":
        a = c.attr("cubic_coeff_a", -0.75)
        i0 = np.floor(xi).astype(np.int64)
        wts = _cubic_weights(xi - i0, a)  # [lout, 4]
        taps = i0[:, None] + np.arange(-1, 3)[None]
        if c.attr("exclude_outside", 0):
            wts = np.where((taps >= 0) & (taps < lin), wts, 0)
            wts = wts / wts.sum(axis=1, keepdims=True)
        taps = np.clip(taps, 0, lin - 1)
        y = 0
        for k in range(4):
            y = y + xp.take(x, taps[:, k], axis=axis) * \
                wts[:, k].reshape(bshape).astype(c.float_dtype)
    else:
        raise c.error(f"Resize mode {mode!r} is not supported")
    if ctm == "tf_crop_and_resize":
        ok = ((xi >= 0) & (xi <= lin - 1)).reshape(bshape)
        y = xp.where(ok, y, c.attr("extrapolation_value", 0.0))
    return y.astype(x.dtype)


@op("Resize", "Upsample")
def resize(c, x, *args):
    if c.node.op_type == "Upsample":
        scales = c.static(args[0], "scales") if args and args[0] is not None else \
            np.asarray(c.attr("scales"), np.float32)
        roi, sizes = None, None
        mode, ctm, nearest_mode = c.attr("mode", "nearest"), "asymmetric", "floor"
        if mode == "bilinear":
            mode = "linear"
    else:
        roi, scales, sizes = (list(args) + [None, None, None])[:3]
        def val(v, what):
            if v is None:
                return None
            v = np.asarray(c.static(v, what))
            return v if v.size else None
        roi, scales, sizes = val(roi, "roi"), val(scales, "scales"), val(sizes, "sizes")
        mode = c.attr("mode", "nearest")
        ctm = c.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = c.attr("nearest_mode", "round_prefer_floor")
        if c.attr("antialias", 0):
            raise c.error("Resize with antialias=1 is not supported")
    rank = x.ndim
    axes = c.attr("axes", None)
    axes = list(range(rank)) if axes is None else [_axis(int(a), rank) for a in axes]
    in_shape = list(x.shape)
    scale_of = {}
    out_len = {}
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        policy = c.attr("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for a, s in zip(axes, sizes):
                out_len[a], scale_of[a] = s, s / in_shape[a]
        else:
            ratios = [s / in_shape[a] for a, s in zip(axes, sizes)]
            r = min(ratios) if policy == "not_larger" else max(ratios)
            for a in axes:
                out_len[a] = int(math.floor(r * in_shape[a] + 0.5))
                scale_of[a] = r
    elif scales is not None:
        for a, s in zip(axes, [float(v) for v in scales]):
            scale_of[a] = s  # output length floor(in · scale), also with a crop (as ORT)
            out_len[a] = int(math.floor(in_shape[a] * s + 1e-9))
    else:
        raise c.error("Resize needs scales or sizes")
    for a in axes:
        if out_len[a] == in_shape[a] and scale_of[a] == 1.0 and ctm != "tf_crop_and_resize":
            continue
        r = None
        if ctm == "tf_crop_and_resize" and roi is not None:
            k, n = axes.index(a), len(axes)
            r = (float(roi[k]), float(roi[k + n]))
        x = _resize_axis(c, x, a, out_len[a], scale_of[a], r, mode, ctm, nearest_mode)
    return x


# ------------------------------------------------------------------------------------------
# quantisation


def _per_axis(c, v, x):
    if np.ndim(v) == 1 and x.ndim > 1 and v.shape[0] != 1:
        a = _axis(c.attr("axis", 1), x.ndim)
        shape = [1] * x.ndim
        shape[a] = -1
        return v.reshape(shape)
    return v


@op("QuantizeLinear")
def quantize_linear(c, x, scale, zp=None):
    xp = c.xp
    dt = zp.dtype if zp is not None else np.dtype(np.uint8)
    info = np.iinfo(dt)
    y = xp.round(x / _per_axis(c, scale, x))
    if zp is not None:
        y = y + _per_axis(c, zp, x).astype(y.dtype)
    return xp.clip(y, info.min, info.max).astype(dt)


@op("DequantizeLinear")
def dequantize_linear(c, x, scale, zp=None):
    y = x.astype(c.float_dtype)
    if zp is not None:
        y = y - _per_axis(c, zp, x).astype(c.float_dtype)
    return (y * _per_axis(c, scale, x)).astype(c.float_dtype)


# ------------------------------------------------------------------------------------------
# TopK


@op("TopK", numpy=False)
def topk(c, x, k):
    jnp, lax = J.jnp, J.lax
    kk = int(np.asarray(c.static(k, "K")).reshape(-1)[0])
    a = _axis(c.attr("axis", -1), x.ndim)
    xm = jnp.moveaxis(x, a, -1)
    if c.attr("largest", 1):
        v, i = lax.top_k(xm, kk)
    else:
        v, i = lax.top_k(-xm, kk)
        v = -v
    return jnp.moveaxis(v, -1, a), jnp.moveaxis(i, -1, a)


# ------------------------------------------------------------------------------------------
# attention (opset 23)


@op("Attention", numpy=False)
def attention(c, q, k, v, mask=None, past_k=None, past_v=None, *rest):
    jnp, jax = J.jnp, J.jax
    three_d = q.ndim == 3
    if three_d:
        hq, hk = c.attr("q_num_heads"), c.attr("kv_num_heads")
        b, s, _ = q.shape
        q = jnp.transpose(jnp.reshape(q, (b, s, hq, -1)), (0, 2, 1, 3))
        k = jnp.transpose(jnp.reshape(k, (k.shape[0], k.shape[1], hk, -1)), (0, 2, 1, 3))
        v = jnp.transpose(jnp.reshape(v, (v.shape[0], v.shape[1], hk, -1)), (0, 2, 1, 3))
    if past_k is not None:
        k = jnp.concatenate([past_k, k], axis=2)
        v = jnp.concatenate([past_v, v], axis=2)
    present_k, present_v = k, v
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = jnp.repeat(k, hq // hk, axis=1)
        v = jnp.repeat(v, hq // hk, axis=1)
    scale = c.attr("scale", None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.matmul(q * math.sqrt(scale), jnp.swapaxes(k, -1, -2) * math.sqrt(scale),
                   precision=J.lax.Precision.HIGHEST)
    lq, lk = s.shape[-2], s.shape[-1]
    if mask is not None:
        if mask.dtype == bool:
            s = jnp.where(mask, s, -jnp.inf)
        else:
            s = s + mask
    if c.attr("is_causal", 0):
        causal = np.tril(np.ones((lq, lk), bool), lk - lq)
        s = jnp.where(causal, s, -jnp.inf)
    cap = c.attr("softcap", 0.0)
    if cap:
        s = cap * jnp.tanh(s / cap)
    p = jax.nn.softmax(s, axis=-1)
    y = jnp.matmul(p, v, precision=J.lax.Precision.HIGHEST)
    if three_d:
        y = jnp.reshape(jnp.transpose(y, (0, 2, 1, 3)), (y.shape[0], y.shape[2], -1))
    return y, present_k, present_v, s


# ------------------------------------------------------------------------------------------
# recurrent layers (scan over time)


def _rnn_activation(name, alpha, beta):
    jnp, jax = J.jnp, J.jax
    fns = {
        "sigmoid": lambda x: jax.nn.sigmoid(x),
        "tanh": jnp.tanh,
        "relu": lambda x: jnp.maximum(x, 0),
        "hardsigmoid": lambda x: jnp.clip(alpha * x + beta, 0, 1),
        "leakyrelu": lambda x: jnp.where(x >= 0, x, alpha * x),
        "thresholdedrelu": lambda x: jnp.where(x > alpha, x, 0),
        "scaledtanh": lambda x: alpha * jnp.tanh(beta * x),
        "affine": lambda x: alpha * x + beta,
        "elu": lambda x: jnp.where(x >= 0, x, alpha * (jnp.exp(jnp.minimum(x, 0)) - 1)),
        "softsign": lambda x: x / (1 + jnp.abs(x)),
        "softplus": jax.nn.softplus,
    }
    return fns[name.lower()]


_TAKES = {"hardsigmoid": 2, "leakyrelu": 1, "thresholdedrelu": 1, "scaledtanh": 2,
          "affine": 2, "elu": 1}
_DEFAULT_AB = {"hardsigmoid": (0.2, 0.5), "leakyrelu": (0.01, 0.0),
               "thresholdedrelu": (1.0, 0.0), "elu": (1.0, 0.0)}


def _rnn_activations(c, defaults, ndir):
    names = c.attr("activations", None) or defaults * ndir
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    alphas = list(c.attr("activation_alpha", None) or [])
    betas = list(c.attr("activation_beta", None) or [])
    out = []
    for n in names:
        takes = _TAKES.get(n.lower(), 0)
        a, b = _DEFAULT_AB.get(n.lower(), (1.0, 0.0))
        if takes >= 1 and alphas:
            a = alphas.pop(0)
        if takes >= 2 and betas:
            b = betas.pop(0)
        if n.lower() not in ("sigmoid", "tanh", "relu", "hardsigmoid", "leakyrelu",
                             "thresholdedrelu", "scaledtanh", "affine", "elu", "softsign",
                             "softplus"):
            raise c.error(f"recurrent activation {n!r} is not supported")
        out.append(_rnn_activation(n, a, b))
    per = len(defaults)
    return [out[d * per:(d + 1) * per] for d in range(ndir)]


def _rnn(c, x, seq_lens, init_states, cell, ndir, hidden):
    """Run `cell(d, x_t, states) -> (h, states)` over time for each direction; returns
    (Y [T, D, B, H], final states per direction)."""
    jnp, lax = J.jnp, J.lax
    layout = c.attr("layout", 0)
    if layout:
        x = jnp.swapaxes(x, 0, 1)
    T, B = x.shape[0], x.shape[1]
    if seq_lens is not None:
        lens = jnp.asarray(seq_lens).astype(jnp.int32)
    else:
        lens = jnp.full((B,), T, jnp.int32)
    t_idx = jnp.arange(T)[:, None]
    valid = t_idx < lens[None, :]  # [T, B]
    ys, finals = [], []
    direction = c.attr("direction", "forward")
    for d in range(ndir):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        if reverse:  # reverse each sequence within its own length
            ridx = jnp.where(valid, lens[None, :] - 1 - t_idx, t_idx)
            xd = jnp.take_along_axis(x, ridx[:, :, None], axis=0)
        else:
            xd = x
        states0 = tuple(s[d] for s in init_states)

        def step(states, inp, d=d):
            xt, m = inp
            h, new = cell(d, xt, states)
            new = tuple(jnp.where(m[:, None], n, o) for n, o in zip(new, states))
            return new, jnp.where(m[:, None], h, 0)
        final, y = lax.scan(step, states0, (xd, valid))
        if reverse:
            y = jnp.take_along_axis(y, ridx[:, :, None], axis=0)
            y = jnp.where(valid[:, :, None], y, 0)
        ys.append(y)
        finals.append(final)
    Y = jnp.stack(ys, axis=1)  # [T, D, B, H]
    states = tuple(jnp.stack([f[k] for f in finals], axis=0) for k in range(len(finals[0])))
    if layout:
        Y = jnp.transpose(Y, (2, 0, 1, 3))
        states = tuple(jnp.swapaxes(s, 0, 1) for s in states)
    return Y, states


def _rnn_common(c, x, W, R, B, seq_lens, gates):
    jnp = J.jnp
    ndir = 2 if c.attr("direction", "forward") == "bidirectional" else 1
    hidden = c.attr("hidden_size", None) or R.shape[-1]
    batch = x.shape[1] if not c.attr("layout", 0) else x.shape[0]
    if B is None:
        B = jnp.zeros((ndir, 2 * gates * hidden), x.dtype)
    return ndir, hidden, batch, B


def _init_state(c, s, ndir, batch, hidden, dtype):
    jnp = J.jnp
    if s is None:
        return jnp.zeros((ndir, batch, hidden), dtype)
    return jnp.swapaxes(s, 0, 1) if c.attr("layout", 0) else s


def _clip(c, v):
    cl = c.attr("clip", None)
    return v if cl is None else J.jnp.clip(v, -cl, cl)


@op("LSTM", numpy=False)
def lstm(c, x, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
    jnp = J.jnp
    ndir, H, batch, B = _rnn_common(c, x, W, R, B, seq_lens, 4)
    acts = _rnn_activations(c, ["Sigmoid", "Tanh", "Tanh"], ndir)
    h0 = _init_state(c, h0, ndir, batch, H, x.dtype)
    c0 = _init_state(c, c0, ndir, batch, H, x.dtype)
    if P is None:
        P = jnp.zeros((ndir, 3 * H), x.dtype)
    couple = c.attr("input_forget", 0)
    hp = J.lax.Precision.HIGHEST

    def cell(d, xt, states):
        h, cs = states
        f, g, hf = acts[d]
        z = jnp.matmul(xt, W[d].T, precision=hp) + jnp.matmul(h, R[d].T, precision=hp) + \
            B[d, :4 * H] + B[d, 4 * H:]
        zi, zo, zf, zc = (z[:, k * H:(k + 1) * H] for k in range(4))
        pi, po, pf = P[d, :H], P[d, H:2 * H], P[d, 2 * H:]
        i = f(_clip(c, zi + pi * cs))
        fg = 1 - i if couple else f(_clip(c, zf + pf * cs))
        ct = g(_clip(c, zc))
        cn = fg * cs + i * ct
        o = f(_clip(c, zo + po * cn))
        hn = o * hf(cn)
        return hn, (hn, cn)
    Y, (hT, cT) = _rnn(c, x, seq_lens, (h0, c0), cell, ndir, H)
    return Y, hT, cT


@op("GRU", numpy=False)
def gru(c, x, W, R, B=None, seq_lens=None, h0=None):
    jnp = J.jnp
    ndir, H, batch, B = _rnn_common(c, x, W, R, B, seq_lens, 3)
    acts = _rnn_activations(c, ["Sigmoid", "Tanh"], ndir)
    h0 = _init_state(c, h0, ndir, batch, H, x.dtype)
    lbr = c.attr("linear_before_reset", 0)
    hp = J.lax.Precision.HIGHEST

    def cell(d, xt, states):
        (h,) = states
        f, g = acts[d]
        wx = jnp.matmul(xt, W[d].T, precision=hp) + B[d, :3 * H]
        rb = B[d, 3 * H:]
        Rz, Rr, Rh = R[d, :H], R[d, H:2 * H], R[d, 2 * H:]
        z = f(_clip(c, wx[:, :H] + jnp.matmul(h, Rz.T, precision=hp) + rb[:H]))
        r = f(_clip(c, wx[:, H:2 * H] + jnp.matmul(h, Rr.T, precision=hp) + rb[H:2 * H]))
        if lbr:
            hh = g(_clip(c, wx[:, 2 * H:] + r * (jnp.matmul(h, Rh.T, precision=hp) +
                                                  rb[2 * H:])))
        else:
            hh = g(_clip(c, wx[:, 2 * H:] + jnp.matmul(r * h, Rh.T, precision=hp) +
                         rb[2 * H:]))
        hn = (1 - z) * hh + z * h
        return hn, (hn,)
    Y, (hT,) = _rnn(c, x, seq_lens, (h0,), cell, ndir, H)
    return Y, hT


@op("RNN", numpy=False)
def rnn(c, x, W, R, B=None, seq_lens=None, h0=None):
    jnp = J.jnp
    ndir, H, batch, B = _rnn_common(c, x, W, R, B, seq_lens, 1)
    acts = _rnn_activations(c, ["Tanh"], ndir)
    h0 = _init_state(c, h0, ndir, batch, H, x.dtype)
    hp = J.lax.Precision.HIGHEST

    def cell(d, xt, states):
        (h,) = states
        hn = acts[d][0](_clip(c, jnp.matmul(xt, W[d].T, precision=hp) +
                              jnp.matmul(h, R[d].T, precision=hp) + B[d, :H] + B[d, H:]))
        return hn, (hn,)
    Y, (hT,) = _rnn(c, x, seq_lens, (h0,), cell, ndir, H)
    return Y, hT


# ------------------------------------------------------------------------------------------
# control flow (static conditions / trip counts only: the graph is unrolled at trace time)


@op("If")
def if_(c, cond):
    flag = bool(np.asarray(c.static(cond, "cond (If needs a condition known at trace time)"))
                .reshape(-1)[0])
    branch = c.attr("then_branch" if flag else "else_branch")
    return tuple(c.run_subgraph(branch, {}))


@op("Loop")
def loop(c, trip=None, cond=None, *carried):
    body = c.attr("body")
    max_trip = None if trip is None else int(np.asarray(c.static(trip, "M")).reshape(-1)[0])
    keep = True if cond is None else bool(np.asarray(c.static(cond, "cond")).reshape(-1)[0])
    n_car = len(carried)
    scans: list[list] = []
    i = 0
    limit = 100_000
    while keep and (max_trip is None or i < max_trip):
        if i >= limit:
            raise c.error(f"Loop ran more than {limit} iterations while unrolling")
        names = [v.name for v in body.input]
        bind = {names[0]: np.array(i, np.int64), names[1]: np.array(keep)}
        bind.update({n: v for n, v in zip(names[2:], carried)})
        outs = c.run_subgraph(body, bind)
        keep = bool(np.asarray(c.static(outs[0], "loop condition")).reshape(-1)[0])
        carried = tuple(outs[1:1 + n_car])
        for k, s in enumerate(outs[1 + n_car:]):
            if len(scans) <= k:
                scans.append([])
            scans[k].append(s)
        i += 1
    stacked = []
    for s in scans:
        xp = np if all(isinstance(v, np.ndarray) for v in s) else J.jnp
        stacked.append(xp.stack(s))
    n_scan = len(c.node.output) - n_car
    if len(stacked) < n_scan:  # zero iterations
        stacked += [np.zeros((0,), c.float_dtype)] * (n_scan - len(stacked))
    return tuple(carried) + tuple(stacked)


# ------------------------------------------------------------------------------------------
# ai.onnx.ml (what converters put around classic-ML classifiers)


@op("ai.onnx.ml:ArrayFeatureExtractor")
def array_feature_extractor(c, x, idx):
    """Elements of the last axis at `idx` (all of them, flattened); a 1-D input gives
    [1, len(idx)] (as ONNX Runtime)."""
    xp = c.xp
    flat = xp.reshape(idx, (-1,))
    flat = xp.where(flat < 0, flat + x.shape[-1], flat)
    y = xp.take(x, flat, axis=-1) if xp is np else J.jnp.take(x, flat, axis=-1, mode="clip")
    return xp.reshape(y, (1, -1)) if x.ndim == 1 else y


@op("ai.onnx.ml:Scaler")
def scaler(c, x):
    off = np.asarray(c.attr("offset", [0.0]), dtype=c.float_dtype)
    sc = np.asarray(c.attr("scale", [1.0]), dtype=c.float_dtype)
    return ((x.astype(c.float_dtype) - off) * sc).astype(c.float_dtype)


@op("ai.onnx.ml:Normalizer")
def normalizer(c, x):
    xp = c.xp
    norm = c.attr("norm", "MAX")
    x = x.astype(c.float_dtype)
    if norm == "MAX":
        d = xp.max(x, axis=-1, keepdims=True)
    elif norm == "L1":
        d = xp.sum(xp.abs(x), axis=-1, keepdims=True)
    elif norm == "L2":
        d = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
    else:
        raise c.error(f"Normalizer norm {norm!r} is not supported")
    return x / d
