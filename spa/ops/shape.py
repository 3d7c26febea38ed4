"""Ops that move axes around: Reshape/Flatten merge and split axes (products), Transpose
permutes them, Squeeze/Unsqueeze insert or drop length-1 axes, Expand/Tile broadcast."""
from __future__ import annotations

import numpy as np

from .common import norm_axis, rewrite_target, target_axes_rule, touch, freeze_axes, operand
from .registry import rule


def couple_reshape(n, c, x: str, y: str) -> None:
    """Reshape as atoms: both sides are cut at every stride boundary of either side, so
    each axis is a row-major product of atoms (1 atom: an identity; several: a merge or a
    split, both products). A dynamic axis (the batch) may carry static atoms merged into it
    (torch's MultiheadAttention folds heads into the batch axis): they are tracked as the
    axis' hidden factors and found again when the axis is split."""
    sx, sy = n.shape(x), n.shape(y)
    if sx is None or sy is None:
        return
    touch(c, x)
    touch(c, y)
    px, py = _parts(c, x, sx), _parts(c, y, sy)
    segx, segy = _segments(px), _segments(py)
    if segx is None or segy is None or len(segx) != len(segy):
        _freeze_all(n, c, x, y, sx, sy, "reshape of dynamic axes that cannot be matched")
        return
    for k, ((symx, intx), (symy, inty)) in enumerate(zip(segx, segy)):
        # dynamic axes carry no elements; their static atoms are in intx / inty
        pxp = int(np.prod([ln for _, ln in intx])) if intx else 1
        pyp = int(np.prod([ln for _, ln in inty])) if inty else 1
        if pxp != pyp and k > 0 and symx is not None:
            # the dynamic axis on one side absorbs static atoms of the other side
            if pxp % pyp == 0:
                atom = c.hidden_atom(symy, pxp // pyp)
                inty = [(atom, pxp // pyp)] + inty
            elif pyp % pxp == 0:
                atom = c.hidden_atom(symx, pyp // pxp)
                intx = [(atom, pyp // pxp)] + intx
        if not _align(n, c, intx, inty):
            for key, _ in intx + inty:
                c.freeze(key, "reshape mixes several axes into several axes")


def _freeze_all(n, c, x, y, sx, sy, why):
    freeze_axes(n, c, x, [k for k, d in enumerate(sx) if d != 1], why)
    freeze_axes(n, c, y, [k for k, d in enumerate(sy) if d != 1], why)


def _parts(c, t, shape):
    """Axis parts outer→inner: ("sym", key) for a dynamic axis followed by its hidden
    static atoms, (key, length) for a static axis; length-1 axes dropped."""
    parts = []
    for k, d in enumerate(shape):
        if isinstance(d, int):
            if d != 1:
                parts.append(((t, k), d))
        else:
            parts.append(("sym", (t, k)))
            parts.extend(c.hidden_of((t, k)))
    return parts


def _segments(parts):
    """[(None, ints before the first dynamic axis), (dyn key, ints after it), ...]"""
    segs = [(None, [])]
    for p in parts:
        if p[0] == "sym":
            segs.append((p[1], []))
        else:
            segs[-1][1].append(p)
    return segs


def _align(n, c, xs, ys) -> bool:
    """Couple two static part sequences with equal products through common atoms."""
    if not xs and not ys:
        return True
    if int(np.prod([ln for _, ln in xs])) != int(np.prod([ln for _, ln in ys])):
        return False

    def bounds(seq):
        out, acc = [], 1
        for _, ln in reversed(seq):
            acc *= ln
            out.append(acc)
        return out
    cuts = sorted({1, *bounds(xs), *bounds(ys)})
    if any(b % a for a, b in zip(cuts, cuts[1:])):
        return False
    atoms = [(lo, hi) for lo, hi in zip(cuts, cuts[1:])]   # atom = strides [lo, hi)

    def atoms_of(seq):
        res, acc = [], 1
        for key, ln in reversed(seq):
            mine = [a for a in atoms if a[0] >= acc and a[1] <= acc * ln]
            res.append((key, list(reversed(mine))))
            acc *= ln
        return list(reversed(res))
    ax, ay = atoms_of(xs), atoms_of(ys)
    rep: dict = {}
    for key, mine in ax + ay:          # an axis that is exactly one atom represents it
        if len(mine) == 1:
            if mine[0] in rep:
                c.couple(rep[mine[0]], key)
            else:
                rep[mine[0]] = key
    for a in atoms:
        if a not in rep:
            rep[a] = c.virtual(f"atom{a[0]}x{a[1] // a[0]}", a[1] // a[0])
    for key, mine in ax + ay:
        if len(mine) > 1:
            c.product(key, [rep[a] for a in mine])
    return True


def _reshape_shrink(n, s):
    rewrite_target(n, s, 1, n.o(0))


@rule("Reshape", shrink=_reshape_shrink)
def reshape(n, c):
    """Reshape: axes merge/split as products; shape literals are rewritten, runtime shapes
    taken from Shape(x) follow by themselves."""
    target_axes_rule(n, c, 1, n.o(0))
    operand(c, n.i(1))
    couple_reshape(n, c, n.i(0), n.o(0))


@rule("Flatten")
def flatten(n, c):
    """Flatten: [d0..dk-1 | dk..] → 2-D, i.e. a reshape with two merges."""
    couple_reshape(n, c, n.i(0), n.o(0))


def _axes(n, k_input: int):
    axes = n.attr("axes")
    if axes is None and n.i(k_input):
        a = n.const(k_input)
        axes = None if a is None else [int(v) for v in a.reshape(-1)]
    return axes


@rule("Squeeze")
def squeeze(n, c):
    """Squeeze: drops length-1 axes; the others keep their order."""
    x, y = n.i(0), n.o(0)
    sx = n.shape(x)
    axes = _axes(n, 1)
    r = len(sx)
    drop = set(norm_axis(a, r) for a in axes) if axes is not None else \
        {k for k, d in enumerate(sx) if d == 1}
    kept = [k for k in range(r) if k not in drop]
    for j, k in enumerate(kept):
        c.couple((x, k), (y, j))
    touch(c, x)
    operand(c, n.i(1))


@rule("Unsqueeze")
def unsqueeze(n, c):
    """Unsqueeze: inserts length-1 axes."""
    x, y = n.i(0), n.o(0)
    ry = n.rank(y)
    axes = set(norm_axis(a, ry) for a in _axes(n, 1))
    kept = [k for k in range(ry) if k not in axes]
    for j, k in enumerate(kept):
        c.couple((x, j), (y, k))
    touch(c, y)
    operand(c, n.i(1))


@rule("Transpose")
def transpose(n, c):
    """Transpose: output axis k is input axis perm[k] (tracks NHWC ↔ NCHW layouts)."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    perm = n.attr("perm") or list(range(r))[::-1]
    for k, p in enumerate(perm):
        c.couple((x, p), (y, k))


def _expand_shrink(n, s):
    r = n.rank(n.o(0))
    src_len = n.model.shapes.get(n.i(1))
    m = src_len[0] if src_len else r
    rewrite_target(n, s, 1, n.o(0), offset=r - m if isinstance(m, int) else 0)


@rule("Expand", shrink=_expand_shrink)
def expand(n, c):
    """Expand: broadcast; equal axes are identities, broadcast axes take their new length
    from the shape operand (rewritten)."""
    x, y = n.i(0), n.o(0)
    rx, ry = n.rank(x), n.rank(y)
    sh = n.model.shapes.get(n.i(1))
    m = sh[0] if sh else ry
    sx, sy = n.shape(x), n.shape(y)
    for k in range(rx):
        c.couple((x, k), (y, ry - rx + k))
    for k in range(ry):
        j = k - (ry - rx)
        if j < 0 or sx[j] == 1:
            if sy[k] != 1:
                c.touched.add((y, k))
    src_needed = [k for k in range(ry) if (k - (ry - rx) < 0 or sx[k - (ry - rx)] == 1)]
    if src_needed:
        target_axes_rule(n, c, 1, y, offset=ry - m if isinstance(m, int) else 0)
    operand(c, n.i(1))


@rule("Tile")
def tile(n, c):
    """Tile: axes repeated once are identities; repeated axes are frozen."""
    x, y = n.i(0), n.o(0)
    reps = n.const(1)
    for k in range(n.rank(x)):
        if reps is not None and int(reps[k]) == 1:
            c.couple((x, k), (y, k))
        else:
            c.freeze((x, k), "tiled axis")
            c.freeze((y, k), "tiled axis")
    operand(c, n.i(1))


@rule("Shape", "Size")
def shape(n, c):
    """Shape/Size read lengths only; their values follow pruning at runtime."""
    touch(c, n.i(0))
    touch(c, n.o(0))


def _cos_shrink(n, s):
    rewrite_target(n, s, 0, n.o(0))


@rule("ConstantOfShape", shrink=_cos_shrink)
def constant_of_shape(n, c):
    """ConstantOfShape: output axis k has the length given by element k of the input."""
    target_axes_rule(n, c, 0, n.o(0))
    operand(c, n.i(0))
