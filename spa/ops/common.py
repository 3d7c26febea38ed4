"""Helpers shared by the rules: broadcasting, axis bookkeeping, shape-value provenance."""
from __future__ import annotations

import numpy as np


def prod(dims) -> int:
    """Product of lengths; dynamic dims (batch, sequence) count as 1: costs are per sample."""
    out = 1
    for d in dims:
        out *= d if isinstance(d, int) else 1
    return int(out)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def same(n, c, a: str | None, b: str | None) -> None:
    """Couple every axis of a with the same axis of b (elementwise ops)."""
    if a is None or b is None:
        return
    ra, rb = n.rank(a), n.rank(b)
    if ra is None or rb is None or ra != rb:
        return
    for k in range(ra):
        c.couple((a, k), (b, k))


def broadcast(n, c, inputs: list[str | None], out: str | None) -> None:
    """numpy broadcasting: right-aligned axes of equal length are the same channels."""
    ro = n.rank(out)
    if ro is None:
        return
    for t in inputs:
        if t is None:
            continue
        rt = n.rank(t)
        if rt is None:
            continue
        for k in range(rt):
            c.couple((t, k), (out, ro - rt + k))


def touch(c, t: str | None, axes=None) -> None:
    """Mark axes as handled without coupling them (e.g. read only for their length)."""
    if t is None:
        return
    r = c.model.rank(t)
    for k in (range(r or 0) if axes is None else axes):
        c.touched.add((t, k))


def operand(c, t: str | None) -> None:
    """An input read for its values (shape, axes, pads, scales, split sizes): its own axes
    are not channels and must keep their length."""
    if t is None:
        return
    for k in range(c.model.rank(t) or 0):
        c.freeze((t, k), "read as values (shape, axes, scales, ...)", structural=True)


def freeze_axes(n, c, t: str | None, axes, reason: str, structural: bool = False) -> None:
    if t is None:
        return
    for k in axes:
        c.freeze((t, k), reason, structural)


# ------------------------------------------------------------------------------------------
# shape-value provenance: where each element of a 1-D int tensor (a Reshape target, an
# Expand shape) comes from:
#   Lit(const, index, value, via, private): a literal inside a constant. `via` is the node
#       that reads the constant on the way here; `private` says that every tensor between
#       that node and the consumer has a single reader, so the literal can be changed for
#       this consumer alone (by giving `via` its own copy of the constant).
#   ("dim", tensor, axis): the runtime length of an axis (it follows pruning by itself).
#   None: computed in a way we do not follow.

_FOLLOW = {"Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}


class Lit(tuple):
    __slots__ = ()

    def __new__(cls, const, index, value, via=None, private=True):
        return tuple.__new__(cls, ("const", const, index, value, via, private))

    const = property(lambda self: self[1])
    index = property(lambda self: self[2])
    value = property(lambda self: self[3])
    via = property(lambda self: self[4])
    private = property(lambda self: self[5])


def shape_source(model, t: str | None):
    if t is None:
        return None
    cache = model.__dict__.setdefault("_shape_src", {})
    if t in cache:
        return cache[t]
    cache[t] = None  # cycles resolve to unknown
    cache[t] = _shape_source(model, t)
    return cache[t]


def _numel(model, t):
    s = model.shapes.get(t)
    if s is None or any(not isinstance(d, int) for d in s):
        return None
    return int(np.prod(s)) if s else 1


def _through(model, node, t, src):
    """Provenance of `src` (an input of `node`) seen from node's output `t`."""
    if src is None:
        return None
    single = len(model.consumers.get(t, [])) <= 1
    return [Lit(e.const, e.index, e.value, e.via if e.via is not None else node,
                e.private and (single or e.via is None)) if isinstance(e, Lit) else e
            for e in src]


def _shape_source(model, t):
    if t in model.consts:
        a = model.consts[t]
        if not np.issubdtype(a.dtype, np.integer) or a.ndim > 1 or a.size > 64:
            return None
        return [Lit(t, i, int(v)) for i, v in enumerate(a.reshape(-1))]
    node = model.producer.get(t)
    if node is None:
        return None
    from .registry import Node
    n = Node(node, model)
    op = node.op_type
    if op == "Shape":
        r = n.rank(n.i(0))
        if r is None:
            return None
        start, end = n.attr("start", 0), n.attr("end", r)
        start, end = max(0, norm_axis(start, r)), min(r, norm_axis(end, r))
        return [("dim", n.i(0), a) for a in range(start, end)]
    if op in _FOLLOW:
        return _through(model, node, t, shape_source(model, n.i(0)))
    if op == "Concat":
        out = []
        for x in node.input:
            s = _through(model, node, t, shape_source(model, x))
            if s is None:
                k = _numel(model, x)
                if k is None:
                    return None
                s = [None] * k
            out.extend(s)
        return out
    if op == "Gather":
        s, idx = _through(model, node, t, shape_source(model, n.i(0))), n.const(1)
        if s is None or idx is None:
            return None
        try:
            return [s[int(i)] for i in np.atleast_1d(idx).reshape(-1)]
        except IndexError:
            return None
    if op == "Slice":
        s = _through(model, node, t, shape_source(model, n.i(0)))
        st, en = n.const(1), n.const(2)
        steps = n.const(4) if n.i(4) else None
        if s is None or st is None or en is None:
            return None
        step = int(steps[0]) if steps is not None else 1
        return s[slice(int(st[0]), int(min(en[0], 1 << 30)), step)]
    if op == "Where":  # Where(Equal(s, -1), ones, s): the legacy exporter's Expand target
        cond = model.producer.get(node.input[0])
        if cond is not None and cond.op_type == "Equal" and node.input[2] in cond.input:
            return _through(model, node, t, shape_source(model, node.input[2]))
    if op == "Mul":  # products of runtime lengths (legacy exports merge axes this way)
        sa = _through(model, node, t, shape_source(model, n.i(0)))
        sb = _through(model, node, t, shape_source(model, n.i(1)))
        if sa is not None and sb is not None and len(sa) == len(sb):
            out = []
            for a, b in zip(sa, sb):
                pa, pb = _dims_in(a), _dims_in(b)
                out.append(("dimprod", pa + pb) if pa is not None and pb is not None else None)
            return out
    k = _numel(model, t)
    return None if k is None else [None] * k


def _dims_in(e):
    if e is None:
        return None
    if e[0] == "dim":
        return ((e[1], e[2]),)
    if e[0] == "dimprod":
        return e[1]
    return None


def target_axes_rule(n, c, shape_input: int, out: str, offset: int = 0) -> None:
    """For an op whose output axis k has the length given by element k of a shape operand
    (Reshape, Expand, ConstantOfShape): follow runtime lengths, rewrite literals, and
    freeze what is computed in ways we cannot rewrite."""
    src = shape_source(n.model, n.i(shape_input))
    r = n.rank(out)
    if r is None:
        return
    for k in range(r):
        e = k - offset
        s = src[e] if src is not None and 0 <= e < len(src) else None
        if s is None:
            if src is None or 0 <= e < len(src):
                c.freeze((out, k), "its length comes from a shape computed at runtime")
        elif s[0] == "dim":
            c.couple((s[1], s[2]), (out, k))
        elif s[0] == "dimprod":
            pass  # a product of runtime lengths: follows the merged axes by itself
        elif not s.private and s.value not in (0, -1, 1):
            # a literal shared with other consumers through a common node: all of them
            # must keep the same length
            c.literal(s.const, s.index, (out, k))


def rewrite_target(n, s, shape_input: int, out: str, offset: int = 0) -> None:
    """Shrink-time partner of target_axes_rule: write the new lengths into literals."""
    from .registry import Node
    src = shape_source(n.model, n.i(shape_input))
    if src is None:
        return
    edits: dict = {}
    for k in range(n.rank(out)):
        e = k - offset
        if not 0 <= e < len(src) or not isinstance(src[e], Lit):
            continue
        lit = src[e]
        old, now = s.old_len((out, k)), s.new_len((out, k))
        if old == now or lit.value != old:
            continue
        if not lit.private:
            s.set_const_elem(lit.const, lit.index, now)
            continue
        via = lit.via if lit.via is not None else n.proto
        key = (id(via), lit.const)
        if key not in edits:
            edits[key] = (via, lit.const, n.model.consts[lit.const].copy())
        edits[key][2].reshape(-1)[lit.index] = now
    for via, const, arr in edits.values():
        vn = Node(via, n.model)
        s.set_input(vn, list(via.input).index(const), arr)
