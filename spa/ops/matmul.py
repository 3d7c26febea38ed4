"""Matrix products: the contracted axes of both operands are one dim; rows and columns
follow the output. A constant weight behind a Transpose is reached through the Transpose."""
from __future__ import annotations

from .common import prod
from .registry import rule


def _matmul_macs(n, shapes):
    a, y = shapes.get(n.i(0)), shapes.get(n.o(0))
    return prod(y) * prod(a[-1:]) if a and y is not None else 0


def _gemm_macs(n, shapes):
    a, y = shapes.get(n.i(0)), shapes.get(n.o(0))
    if not a or not y:
        return 0
    return prod(y) * prod([a[0] if n.attr("transA", 0) else a[1]])


@rule("MatMul", macs=_matmul_macs)
def matmul(n, c):
    """MatMul (numpy semantics): A[..., M, K] · B[..., K, N] → Y[..., M, N]."""
    a, b, y = n.i(0), n.i(1), n.o(0)
    ra, rb, ry = n.rank(a), n.rank(b), n.rank(y)
    ka = (a, ra - 1)
    kb = (b, 0 if rb == 1 else rb - 2)
    c.couple(ka, kb)
    if b in n.model.consts:
        c.role(kb, "in")
        if rb > 1:
            c.role((b, rb - 1), "out")
    if a in n.model.consts:
        c.role(ka, "in")
    if ra > 1:
        c.couple((a, ra - 2), (y, ry - (2 if rb > 1 else 1)))
    if rb > 1:
        c.couple((b, rb - 1), (y, ry - 1))
    # batch axes, right-aligned before the matrix axes
    nb_y = ry - (ra > 1) - (rb > 1)
    for t, r in ((a, ra), (b, rb)):
        nb = max(r - 2, 0)
        for k in range(nb):
            c.couple((t, k), (y, nb_y - nb + k))


@rule("Gemm", macs=_gemm_macs)
def gemm(n, c):
    """Gemm: Y = α·op(A)·op(B) + β·C with transA/transB; C broadcasts to Y."""
    a, b, cc, y = n.i(0), n.i(1), n.i(2), n.o(0)
    ta, tb = n.attr("transA", 0), n.attr("transB", 0)
    am, ak = (1, 0) if ta else (0, 1)
    bk, bn = (1, 0) if tb else (0, 1)
    c.couple((a, ak), (b, bk))
    c.couple((a, am), (y, 0))
    c.couple((b, bn), (y, 1))
    c.role((b, bk), "in")
    c.role((b, bn), "out")
    if cc:
        rc = n.rank(cc)
        for k in range(rc):
            c.couple((cc, k), (y, 2 - rc + k))
            c.role((cc, k), "bias")
