"""Ops that move axes around: Reshape/Flatten merge and split axes (products), Transpose
permutes them, Squeeze/Unsqueeze insert or drop length-1 axes, Expand/Tile broadcast."""
from __future__ import annotations

from .common import norm_axis, rewrite_target, target_axes_rule, touch, freeze_axes
from .registry import rule


def couple_reshape(n, c, x: str, y: str) -> None:
    """Match runs of input and output axes with equal products: 1→1 is an identity,
    k→1 a merge, 1→k a split (both products); k→m is frozen."""
    sx, sy = n.shape(x), n.shape(y)
    if sx is None or sy is None:
        return
    touch(c, x)
    touch(c, y)
    ix = [a for a, d in enumerate(sx) if d != 1]
    iy = [a for a, d in enumerate(sy) if d != 1]
    i = j = 0
    while i < len(ix) and j < len(iy):
        a, b = ix[i], iy[j]
        if sx[a] == sy[b] or not isinstance(sx[a], int) and not isinstance(sy[b], int):
            c.couple((x, a), (y, b))  # equal, or both dynamic (e.g. the batch axis)
            i, j = i + 1, j + 1
            continue
        if not isinstance(sx[a], int) or not isinstance(sy[b], int):
            break
        rx, ry, px, py = [a], [b], sx[a], sy[b]
        i, j = i + 1, j + 1
        ok = True
        while px != py:
            if px < py:
                if i >= len(ix) or not isinstance(sx[ix[i]], int):
                    ok = False
                    break
                px *= sx[ix[i]]
                rx.append(ix[i])
                i += 1
            else:
                if j >= len(iy) or not isinstance(sy[iy[j]], int):
                    ok = False
                    break
                py *= sy[iy[j]]
                ry.append(iy[j])
                j += 1
        if not ok:
            i -= len(rx)
            j -= len(ry)
            break
        if len(rx) == 1:
            c.product((x, rx[0]), [(y, k) for k in ry])
        elif len(ry) == 1:
            c.product((y, ry[0]), [(x, k) for k in rx])
        else:
            for k in rx:
                c.freeze((x, k), "reshape mixes several axes into several axes")
            for k in ry:
                c.freeze((y, k), "reshape mixes several axes into several axes")
    freeze_axes(n, c, x, ix[i:], "reshape with dynamic lengths")
    freeze_axes(n, c, y, iy[j:], "reshape with dynamic lengths")


def _reshape_shrink(n, s):
    rewrite_target(n, s, 1, n.o(0))


@rule("Reshape", shrink=_reshape_shrink)
def reshape(n, c):
    """Reshape: axes merge/split as products; shape literals are rewritten, runtime shapes
    taken from Shape(x) follow by themselves."""
    target_axes_rule(n, c, 1, n.o(0))
    touch(c, n.i(1))
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
    touch(c, n.i(1))


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
    touch(c, n.i(1))


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
    touch(c, n.i(1))


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
    touch(c, n.i(1))


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
    touch(c, n.i(0))
