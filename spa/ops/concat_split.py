"""Ops that join or cut an axis: Concat (offsets), Split, Slice and Gather with constant
indices. Their rewrite keeps the cuts on the same channels after pruning."""
from __future__ import annotations

import numpy as np

from .common import norm_axis, touch, operand
from .registry import rule


@rule("Concat")
def concat(n, c):
    """Concat: input k occupies [offset_k, offset_k + len_k) of the output axis."""
    y = n.o(0)
    r = n.rank(y)
    axis = norm_axis(n.attr("axis"), r)
    off = 0
    for x in n.inputs:
        if not x:
            continue
        sx = n.shape(x)
        for k in range(r):
            if k != axis:
                c.couple((x, k), (y, k))
        ln = sx[axis]
        if not isinstance(ln, int):
            c.freeze((y, axis), "concatenation of dynamic lengths")
            return
        if ln:
            c.couple_idx((x, axis), np.arange(ln), (y, axis), off + np.arange(ln))
        off += ln
    c.touched.add((y, axis))


def _split_sizes(n):
    x = n.i(0)
    r = n.rank(x)
    axis = norm_axis(n.attr("axis", 0), r)
    total = n.shape(x)[axis]
    sizes = n.attr("split")
    if sizes is None and n.i(1):
        a = n.const(1)
        sizes = None if a is None else [int(v) for v in a]
    if sizes is None:
        k = len([o for o in n.outputs])
        sizes = [n.shape(o)[axis] for o in n.outputs]
        if any(not isinstance(s, int) for s in sizes) and isinstance(total, int):
            sizes = [total // k] * k
    return axis, list(sizes)


def _split_shrink(n, s):
    axis, _ = _split_sizes(n)
    new = [s.new_len((o, axis)) for o in n.outputs]
    old = [s.old_len((o, axis)) for o in n.outputs]
    if new == old:
        return
    if n.attr("split") is not None:
        s.set_attr(n, "split", new)
    elif n.i(1):
        s.set_input(n, 1, np.array(new, dtype=np.int64))
    else:  # equal split (num_outputs / implicit): make the sizes explicit
        if n.opset >= 13:
            s.add_input(n, 1, np.array(new, dtype=np.int64), "split")
            s.del_attr(n, "num_outputs")
        else:
            s.set_attr(n, "split", new)


@rule("Split", shrink=_split_shrink)
def split(n, c):
    """Split: output k is [offset_k, offset_k + size_k) of the input axis."""
    x = n.i(0)
    r = n.rank(x)
    axis, sizes = _split_sizes(n)
    off = 0
    for o, sz in zip(n.outputs, sizes):
        for k in range(r):
            if k != axis:
                c.couple((x, k), (o, k))
        c.couple_idx((x, axis), off + np.arange(sz), (o, axis), np.arange(sz))
        off += sz
    c.touched.add((x, axis))
    operand(c, n.i(1))


def _slice_params(n):
    x = n.i(0)
    r = n.rank(x)
    st, en = n.const(1), n.const(2)
    axes = n.const(3) if n.i(3) else np.arange(len(st)) if st is not None else None
    steps = n.const(4) if n.i(4) else (np.ones(len(st), np.int64) if st is not None else None)
    if st is None or en is None or axes is None or steps is None:
        return None
    out = {}
    for s0, e0, a, p in zip(st, en, axes, steps):
        a = norm_axis(int(a), r)
        ln = n.shape(x)[a]
        if not isinstance(ln, int):
            out[a] = None
            continue
        out[a] = range(*slice(int(s0), int(e0), int(p)).indices(ln))
    return out


def _slice_shrink(n, s):
    x = n.i(0)
    params = _slice_params(n)
    st, en = n.const(1).copy(), n.const(2).copy()
    axes = n.const(3) if n.i(3) else np.arange(len(st))
    changed = False
    for j, a in enumerate(axes):
        a = norm_axis(int(a), n.rank(x))
        kept = s.kept((x, a))
        if kept is None:
            continue
        rng = params[a]
        if rng.step != 1:
            continue
        pos = np.searchsorted(kept, [rng.start, rng.stop])
        st[j], en[j] = pos[0], pos[1]
        changed = True
    if changed:
        s.set_input(n, 1, st)
        s.set_input(n, 2, en)


@rule("Slice", shrink=_slice_shrink)
def slice_(n, c):
    """Slice with constant parameters: output index k is input index start + k·step."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    params = _slice_params(n)
    runtime_axes = None
    if params is None:
        axes = n.const(3) if n.i(3) else None
        runtime_axes = set(range(r)) if axes is None else {norm_axis(int(a), r) for a in axes}
    for k in range(r):
        if params is None and k in runtime_axes:
            continue  # frozen below
        if params is None or k not in params:
            c.couple((x, k), (y, k))
        elif params[k] is None:
            c.freeze((x, k), "slice of a dynamic axis")
            c.freeze((y, k), "slice of a dynamic axis")
        else:
            rng = params[k]
            if rng.step != 1:
                c.freeze((x, k), "strided slice")
                c.freeze((y, k), "strided slice")
            else:
                c.couple_idx((x, k), np.array(rng), (y, k), np.arange(len(rng)))
            c.touched.add((x, k))
    if params is None:  # runtime starts/ends: only the sliced axes are frozen
        for k in sorted(runtime_axes):
            c.freeze((x, k), "slice parameters computed at runtime")
            c.freeze((y, k), "slice parameters computed at runtime")
    for t in n.inputs[1:]:
        operand(c, t or None)


def _gather_shrink(n, s):
    x, idx = n.i(0), n.const(1)
    r = n.rank(x)
    axis = norm_axis(n.attr("axis", 0), r)
    kept = s.kept((x, axis))
    if kept is None or idx is None:
        return
    new_pos = np.full(s.old_len((x, axis)), -1, np.int64)
    new_pos[kept] = np.arange(len(kept))
    norm = np.where(idx < 0, idx + s.old_len((x, axis)), idx)
    y = n.o(0)
    ri = idx.ndim
    if ri == 1:
        ykept = s.kept((y, axis))
        sel = norm if ykept is None else norm[ykept]
    else:
        sel = norm
    s.set_input(n, 1, new_pos[sel].astype(idx.dtype))


@rule("Gather", shrink=_gather_shrink)
def gather(n, c):
    """Gather: with constant indices on an axis, output index k is input index idx[k];
    embedding lookups (constant table, runtime indices) keep the feature axis."""
    x, ind, y = n.i(0), n.i(1), n.o(0)
    r, ri = n.rank(x), n.rank(ind)
    axis = norm_axis(n.attr("axis", 0), r)
    for k in range(axis):
        c.couple((x, k), (y, k))
    for k in range(axis + 1, r):
        c.couple((x, k), (y, k + ri - 1))
    idx = n.const(1)
    ln = n.shape(x)[axis]
    if idx is not None and idx.ndim == 1 and isinstance(ln, int):
        norm = np.where(idx < 0, idx + ln, idx)
        c.couple_idx((x, axis), norm, (y, axis), np.arange(len(norm)))
    else:
        c.freeze((x, axis), "indexed by runtime or scalar indices")
        for k in range(ri):
            c.couple((ind, k), (y, axis + k))
    touch(c, ind)
    if x in n.model.consts:
        for k in range(r):
            if k != axis:
                c.role((x, k), "embedding")
