"""Pooling, reductions, Softmax, Resize and Pad: channels pass through; spatial axes are
kept; reducing or normalising over a pruned axis is exact (sums) or approximate (means,
maxima, softmax)."""
from __future__ import annotations

from .common import norm_axis, touch, freeze_axes, rewrite_target, operand
from .registry import rule


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
      "GlobalLpPool", "MaxRoiPool")
def pool(n, c):
    """Pooling: batch and channel axes pass through; spatial axes are not pruned."""
    x, y = n.i(0), n.o(0)
    for k in (0, 1):
        c.couple((x, k), (y, k))
    r = n.rank(x)
    freeze_axes(n, c, x, range(2, r), "spatial axis", structural=True)
    freeze_axes(n, c, y, range(2, r), "spatial axis", structural=True)
    if n.o(1):
        for k in (0, 1):
            c.couple((x, k), (n.o(1), k))
        freeze_axes(n, c, n.o(1), range(2, r), "spatial axis", structural=True)


EXACT_REDUCE = {"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"}
APPROX_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSum",
                 "ReduceLogSumExp"}


def _reduce_axes(n):
    r = n.rank(n.i(0))
    axes = n.attr("axes")
    if axes is None and n.i(1):
        a = n.const(1)
        if a is None:
            return None
        axes = [int(v) for v in a.reshape(-1)]
    if not axes:
        return [] if n.attr("noop_with_empty_axes", 0) else list(range(r))
    return sorted(norm_axis(a, r) for a in axes)


@rule(*sorted(EXACT_REDUCE | APPROX_REDUCE))
def reduce(n, c):
    """Reductions: other axes pass through; a pruned reduced axis is exact for sums and
    approximate for means/maxima (the decomposed LayerNorm / RMSNorm pattern)."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    axes = _reduce_axes(n)
    if axes is None:
        freeze_axes(n, c, x, range(r), "reduction axes computed at runtime")
        touch(c, y)
        return
    keep = n.attr("keepdims", 1)
    j = 0
    for k in range(r):
        if k in axes:
            c.touched.add((x, k))
            if n.op in APPROX_REDUCE:
                c.approximate((x, k), f"{n.op} over this axis")
            if keep:
                j += 1
        else:
            c.couple((x, k), (y, j))
            j += 1
    touch(c, y)
    operand(c, n.i(1))


@rule("ArgMax", "ArgMin")
def argmax(n, c):
    """ArgMax/ArgMin: the reduced axis is frozen (indices would change)."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    axis = norm_axis(n.attr("axis", 0), r)
    keep = n.attr("keepdims", 1)
    j = 0
    for k in range(r):
        if k == axis:
            c.freeze((x, k), f"{n.op} returns indices along this axis")
            j += keep
        else:
            c.couple((x, k), (y, j))
            j += 1
    touch(c, y)


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(n, c):
    """Softmax: elementwise map, but the normalised axis mixes its elements (approximate)."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    axis = norm_axis(n.attr("axis", -1 if n.opset >= 13 else 1), r)
    mixed = [axis] if n.opset >= 13 else list(range(axis, r))
    for k in range(r):
        c.couple((x, k), (y, k))
        if k in mixed:
            c.approximate((x, k), f"{n.op} normalises over this axis")


def _resize_shrink(n, s):
    if n.i(3) and n.const(3) is not None:
        rewrite_target(n, s, 3, n.o(0))


@rule("Resize", "Upsample", shrink=_resize_shrink)
def resize(n, c):
    """Resize: axes whose length does not change pass through; resized axes are kept."""
    x, y = n.i(0), n.o(0)
    sx, sy = n.shape(x), n.shape(y)
    for k in range(len(sx)):
        if sx[k] == sy[k]:
            c.couple((x, k), (y, k))
        else:
            c.freeze((x, k), "resized axis")
            c.freeze((y, k), "resized axis")
    for t in n.inputs[1:]:
        operand(c, t or None)


@rule("Pad")
def pad(n, c):
    """Pad: unpadded axes pass through; padded axes are kept."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    pads = n.attr("pads")
    if pads is None and n.i(1):
        p = n.const(1)
        pads = None if p is None else [int(v) for v in p]
    axes = list(range(r))
    if n.i(3):
        a = n.const(3)
        axes = None if a is None else [norm_axis(int(v), r) for v in a]
    if pads is None or axes is None:
        freeze_axes(n, c, x, range(r), "pads computed at runtime")
        freeze_axes(n, c, y, range(r), "pads computed at runtime")
    else:
        padded = {ax for j, ax in enumerate(axes)
                  if pads[j] != 0 or pads[j + len(axes)] != 0}
        for k in range(r):
            if k in padded:
                c.freeze((x, k), "padded axis")
                c.freeze((y, k), "padded axis")
            else:
                c.couple((x, k), (y, k))
    for t in n.inputs[1:]:
        operand(c, t or None)


@rule("Trilu")
def trilu(n, c):
    """Trilu: the last two axes are masked by position (kept); others pass through."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    for k in range(r):
        if k >= r - 2:
            c.freeze((x, k), "triangular mask axis")
            c.freeze((y, k), "triangular mask axis")
        else:
            c.couple((x, k), (y, k))
    operand(c, n.i(1))


@rule("QuantizeLinear", "DequantizeLinear")
def quant(n, c):
    """(De)QuantizeLinear: elementwise; per-axis scales and zero points follow that axis.
    Blocked quantization (opset 21 `block_size`: scale and zero point have x's rank, one
    value per block of `block_size` elements along `axis`): the other axes follow x, and
    along `axis` x is (blocks x block_size), so only whole blocks can go."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    for k in range(r):
        c.couple((x, k), (y, k))
    axis = norm_axis(n.attr("axis", 1), r) if r else 0
    block = n.attr("block_size", 0) or 0
    for t in n.inputs[1:3]:
        if t and block > 0 and r and n.rank(t) == r:
            for k in range(r):
                if k != axis:
                    c.couple((t, k), (x, k))
                    c.role((t, k), "quant")
            inner = c.virtual("block", block)
            c.freeze(inner, f"elements of one quantization block (block_size {block})")
            # (a last, partial block makes the lengths disagree: product() freezes the axis)
            c.product((x, axis), [(t, axis), inner])
            c.role((t, axis), "quant")
        elif t and n.rank(t) == 1 and n.shape(t)[0] != 1:
            c.couple((t, 0), (x, axis))
            c.role((t, 0), "quant")
        else:
            operand(c, t or None)
