"""OBSPA: Optimal-Brain-Surgeon saliency of whole channels, for pruning without fine-tuning.

For every group, its *consumers* are the layers that read its channels through a constant
weight (Conv, ConvTranspose, Gemm, MatMul whose weight has an "in" dim in the group). For
each consumer the second moment of its input, H = Σ x xᵀ, is accumulated in float64 from
ONNX Runtime runs on calibration inputs (`spa.activations.stream`, batch by batch), with x
the layer's input unfolded over the kernel positions for convolutions (H is C_in·k·k square,
plus a constant-1 entry for the bias). Removing the input slice q of a layer with weight
matrix W costs, after the best update of the remaining weights,

    ΔE_q = tr(W_q [H⁻¹]_qq⁻¹ W_qᵀ)                   (OBS, for the block of columns q)

A group's channels are removed greedily: at each step the channels with the least total
cost Σ_consumers ΔE / E (E = tr(W H Wᵀ), the layer's output energy, so that costs are
relative output errors and compare across layers and groups) go, and every consumer's
weights and inverse Hessian are downdated (W ← W − W_q [H⁻¹]_qq⁻¹ [H⁻¹]_q:, same for H⁻¹).
A channel's score is its cost when it went, made non-decreasing along the removal order,
so that any prefix of a group's order is what a threshold on scores removes and the global
selection (one threshold for all groups, under a FLOPs or params target) decides how much
each group loses. After selection, `spa.rewrite.reconstruct` moves every consumer to the
least-squares optimum on its kept inputs, with bias compensation.

Large convolutions (C_in·k·k > `max_full`) and ConvTranspose use the channel-level
(Kronecker) approximation H ≈ H_c ⊗ I over kernel offsets, H_c the C_in² second moment
summed over positions: every kernel offset is then a separate row of W. Calibration rows
are subsampled at random beyond `rows_per_feature` · d per layer.

Without data (calibration "none"), H is a surrogate from the model's own statistics: the
moments of each channel (mean μ, variance σ²) propagated from the BatchNormalization and
LayerNormalization layers (whose outputs are β + γ·N(0, 1)), through ReLU/Clip (rectified
Gaussian), Add, pooling, reshapes and linear layers (independent inputs), or read from the
running statistics of a BatchNormalization that consumes the tensor; then
H = μμᵀ + diag(σ²) (independent across kernel offsets), and the identity where nothing is
known (the criterion then reduces to weight magnitude and the update to plain slicing).
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
from scipy.special import ndtr

from ..activations import ROW_MASK, Calibration, stream
from ..errors import SpaError, UsageError
from ..ops.registry import Node
from ..rewrite.reconstruct import DAMP, Consumer, Updates, damped, inv_psd, reconstruct

CRITERIA = ("obspa",)
#: largest unfolded conv input (C_in·k·k) that gets a full Hessian (else channel level)
MAX_FULL = 1152
#: calibration rows per Hessian entry kept (at least MIN_ROWS); beyond that, subsampled
ROWS_PER_FEATURE = 64
MIN_ROWS = 16384
CHUNK = 8192
#: sequential reconstruction holds the frontier tensors of all its samples up to about this
FRONTIER_BYTES = 1 << 30


# ------------------------------------------------------------------------------------------
# consumers


def _owners(analysis, key) -> list[np.ndarray] | None:
    ch = analysis.dim_channels(key)
    if ch is None or not ((ch >= 0) | (ch == -2)).any():
        return None
    out = []
    c = analysis.coupler
    d = c.dims[key]
    for j, x in enumerate(ch.tolist()):
        if x >= 0:
            out.append(np.array([x]))
        elif x == -2:
            out.append(np.array(analysis.multi[int(analysis.label[c.base[d] + j])]))
        else:
            out.append(np.zeros(0, np.int64))
    return out


def _exclusive(model, name: str, node) -> bool:
    users = model.consumers.get(name, [])
    return len(users) == 1 and users[0] is node and name not in model.output_names


def _conv_pads(n: Node, x: str, kernel, strides, dil):
    nd = len(kernel)
    auto = n.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        p = n.attr("pads", [0] * (2 * nd))
        return tuple(int(v) for v in p)
    if auto == "VALID":
        return (0,) * (2 * nd)
    shp = n.shape(x)
    if shp is None or any(not isinstance(s, int) for s in shp[2:]):
        return None
    begin, end = [], []
    for s, k, st, dl in zip(shp[2:], kernel, strides, dil):
        out = -(-s // st)
        total = max(0, (out - 1) * st + dl * (k - 1) + 1 - s)
        lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
        begin.append(lo)
        end.append(total - lo)
    return tuple(begin + end)


def _consumers_of(n: Node, analysis, max_full: int) -> list[Consumer]:
    model = analysis.model
    op = n.op
    node = n.proto
    if op in ("Conv", "ConvTranspose"):
        x, w = n.i(0), n.i(1)
        W = model.consts.get(w) if w else None
        if x is None or W is None or x in model.consts or W.ndim < 3:
            return []
        group = int(n.attr("group", 1))
        in_axis, out_axis = (1, 0) if op == "Conv" else (0, 1)
        if op == "ConvTranspose" and group != 1:
            return []
        if op == "Conv" and group > 1 and W.shape[1] == 1:
            return []  # depthwise: its input channels are its output channels
        owners = _owners(analysis, (w, in_axis))
        if owners is None:
            return []
        kernel = tuple(int(k) for k in W.shape[2:])
        nd = len(kernel)
        strides = tuple(int(v) for v in n.attr("strides", [1] * nd))
        dil = tuple(int(v) for v in n.attr("dilations", [1] * nd))
        pads = _conv_pads(n, x, kernel, strides, dil) if op == "Conv" else None
        n_in = int(W.shape[in_axis])
        mode = "full" if op == "Conv" and pads is not None and \
            n_in * int(np.prod(kernel)) <= max_full else "channel"
        b = n.i(2)
        bias = b if b and b in model.consts and _exclusive(model, b, node) else None
        bias_add = 2 if not b else None
        n_out = int(W.shape[out_axis]) // (group if op == "Conv" else 1)
        common = dict(node=n.name, op=op, x=x, weight=w, in_axis=in_axis, out_axis=out_axis,
                      kind="conv" if op == "Conv" else "convT", mode=mode, kernel=kernel,
                      strides=strides, dilations=dil, pads=pads or (0,) * (2 * nd),
                      bias=bias, bias_add=bias_add,
                      shared=len(model.consumers.get(w, [])) > 1, n_in=n_in, n_out=n_out,
                      owners=owners)
        if group == 1:
            return [Consumer(**common)]
        return [Consumer(**common, part=(g, group)) for g in range(group)]
    if op == "Gemm":
        a, w, cc = n.i(0), n.i(1), n.i(2)
        W = model.consts.get(w) if w else None
        if a is None or W is None or a in model.consts or W.ndim != 2:
            return []
        in_axis = 1 if n.attr("transB", 0) else 0
        owners = _owners(analysis, (w, in_axis))
        if owners is None:
            return []
        alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
        n_out = int(W.shape[1 - in_axis])
        bias, bias_add = None, None
        if beta != 0:
            if cc is None:
                bias_add = 2
            elif cc in model.consts and _exclusive(model, cc, node) and \
                    model.consts[cc].size == n_out and model.consts[cc].shape[-1] == n_out:
                bias = cc
        return [Consumer(node=n.name, op=op, x=a, weight=w, in_axis=in_axis,
                         out_axis=1 - in_axis, kind="dense", trans_x=bool(n.attr("transA", 0)),
                         bias=bias, bias_add=bias_add,
                         bias_scale=alpha / beta if beta else 1.0,
                         shared=len(model.consumers.get(w, [])) > 1,
                         n_in=int(W.shape[in_axis]), n_out=n_out, owners=owners)]
    if op == "MatMul":
        a, b = n.i(0), n.i(1)
        if a is None or b is None:
            return []
        A, B = model.consts.get(a), model.consts.get(b)
        if B is not None and A is None and B.ndim == 2:
            owners = _owners(analysis, (b, 0))
            if owners is None:
                return []
            bias, bias_node = None, None
            y = n.o(0)
            users = model.consumers.get(y, [])
            if len(users) == 1 and users[0].op_type == "Add" and y not in model.output_names:
                add = users[0]
                other = [t for t in add.input if t != y]
                if len(other) == 1 and other[0] in model.consts and \
                        _exclusive(model, other[0], add):
                    arr = model.consts[other[0]]
                    if arr.size == B.shape[1] and arr.shape and arr.shape[-1] == B.shape[1]:
                        bias, bias_node = other[0], model.node_name(add)
            return [Consumer(node=n.name, op=op, x=a, weight=b, in_axis=0, out_axis=1,
                             kind="dense", bias=bias, bias_node=bias_node,
                             shared=len(model.consumers.get(b, [])) > 1,
                             n_in=int(B.shape[0]), n_out=int(B.shape[1]), owners=owners)]
        if A is not None and B is None and A.ndim == 2 and (n.rank(b) or 0) >= 2:
            owners = _owners(analysis, (a, 1))
            if owners is None:
                return []
            return [Consumer(node=n.name, op=op, x=b, weight=a, in_axis=1, out_axis=0,
                             kind="dense_left", shared=len(model.consumers.get(a, [])) > 1,
                             n_in=int(A.shape[1]), n_out=int(A.shape[0]), owners=owners)]
    return []


def find_consumers(analysis, max_full: int = MAX_FULL) -> list[Consumer]:
    """Every layer that reads some group's channels through a constant weight."""
    out = []
    for node in analysis.model.nodes:
        if node.domain in ("", "ai.onnx") and node.op_type in ("Conv", "ConvTranspose",
                                                                "Gemm", "MatMul"):
            out += _consumers_of(Node(node, analysis.model), analysis, max_full)
    return out


# ------------------------------------------------------------------------------------------
# Hessians from calibration data


def collect_hessians(model, consumers: list[Consumer], calib: Calibration, *,
                     rows_per_feature: int = ROWS_PER_FEATURE, min_rows: int = MIN_ROWS,
                     seed: int = 0, batch_size: int = 64, max_bytes: int | None = None,
                     threads: int = 0) -> tuple[list[np.ndarray], dict]:
    """H = mean of x xᵀ (with a constant 1 appended) per consumer, from calibration runs;
    consumers that read the same rows share one matrix."""
    keys: dict[tuple, int] = {}
    reps: list[Consumer] = []
    for c in consumers:
        if c.hkey not in keys:
            keys[c.hkey] = len(reps)
            reps.append(c)
    acc = [np.zeros((r.d + 1, r.d + 1)) for r in reps]
    seen = np.zeros(len(reps))
    prob: list[float | None] = [None] * len(reps)
    rng = np.random.default_rng(seed)
    n_total = max(calib.n_samples, 1)
    kw = {} if max_bytes is None else {"max_bytes": max_bytes}
    names = sorted({r.x for r in reps})
    for batch in stream(model, names, calib, batch_size=batch_size, threads=threads, **kw):
        for k, r in enumerate(reps):
            if r.x not in batch:
                continue
            x = np.asarray(batch[r.x])
            if x.dtype.kind != "f":
                raise SpaError(f"the input {r.x!r} of layer {r.node!r} is not floating point; "
                               "its Hessian cannot be formed", file=model.path)
            n = r.n_rows(x.shape)
            valid = valid_rows(r, x.shape, batch.get(ROW_MASK))
            if prob[k] is None:
                real = n if valid is None else int(valid.sum())
                per_sample = real / max(x.shape[0] if r.kind != "dense" or not r.trans_x
                                        else x.shape[1], 1)
                cap = max(min_rows, rows_per_feature * r.d)
                prob[k] = min(1.0, cap / max(per_sample * n_total, 1.0))
            pick = _pick(rng, n, prob[k], valid)
            if pick is not None and not len(pick):
                continue
            d = r.d
            H = acc[k]
            for rows in _row_chunks(r, x, pick):
                H[:d, :d] += (rows.T @ rows).astype(np.float64)
                H[:d, d] += rows.sum(axis=0, dtype=np.float64)
                seen[k] += len(rows)
    hs = []
    info = {"layers": len(consumers), "hessians": len(reps), "rows": {}}
    for k, (r, H) in enumerate(zip(reps, acc)):
        if seen[k] == 0:
            raise SpaError(f"no calibration rows reached the input {r.x!r} of layer "
                           f"{r.node!r}: its Hessian cannot be formed", file=model.path)
        d = r.d
        H[d, :d] = H[:d, d]
        H[d, d] = seen[k]
        H /= seen[k]
        if not np.isfinite(H).all():
            raise SpaError(f"the input {r.x!r} of layer {r.node!r} has NaN/Inf values on "
                           "the calibration data: its Hessian cannot be formed",
                           file=model.path)
        hs.append(H)
        info["rows"][r.node] = int(seen[k])
    return [hs[keys[c.hkey]] for c in consumers], info


def valid_rows(c: Consumer, x_shape, mask: np.ndarray | None) -> np.ndarray | None:
    """Which rows of a batch of consumer `c`'s input are real positions under the batch's
    row mask ([batch, seq], `Calibration.row_mask`): for a dense layer whose input is laid
    out [batch, seq, ..., features] (rows sample-major, then positions); None where the
    mask does not apply (other layouts, convolutions, no mask)."""
    if mask is None or c.kind != "dense" or c.trans_x or len(x_shape) < 3 or \
            tuple(int(s) for s in x_shape[:2]) != tuple(mask.shape):
        return None
    m = np.asarray(mask, bool).reshape(tuple(mask.shape) + (1,) * (len(x_shape) - 3))
    return np.broadcast_to(m, tuple(int(s) for s in x_shape[:-1])).reshape(-1)


def _pick(rng, n: int, prob: float, valid: np.ndarray | None):
    """Row indices to use (None: all `n`): the valid rows, each kept with probability
    `prob` (the seeded subsample)."""
    if valid is None:
        return None if prob >= 1.0 else np.nonzero(rng.random(n) < prob)[0]
    idx = np.nonzero(valid)[0]
    return idx if prob >= 1.0 else idx[rng.random(len(idx)) < prob]


def _row_chunks(r: Consumer, x: np.ndarray, pick):
    if r.kind == "conv" and r.mode == "full":
        x = r.part_of(x)
        xp = r.padded(x)
        osz = r._out_spatial(x.shape[2:])
        if pick is None:  # every row: whole samples at a time (no index arrays)
            per = max(1, CHUNK // max(1, int(np.prod(osz))))
            for s in range(0, x.shape[0], per):
                yield r.unfold(xp[s:s + per], None, min(per, x.shape[0] - s), osz)
            return
        for s in range(0, len(pick), CHUNK):
            yield r.unfold(xp, pick[s:s + CHUNK], x.shape[0], osz)
        return
    rows = r.rows(x, pick)
    for s in range(0, len(rows), CHUNK):
        yield rows[s:s + CHUNK]


# ------------------------------------------------------------------------------------------
# Hessian surrogates without data: channel moments from the model's own statistics


def _relu_moments(mu, var):
    s = np.sqrt(np.maximum(var, 1e-20))
    a = mu / s
    cdf, pdf = ndtr(a), np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
    m1 = mu * cdf + s * pdf
    m2 = (mu * mu + var) * cdf + mu * s * pdf
    return m1, np.maximum(m2 - m1 * m1, 0.0)


def channel_moments(model) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """tensor -> (channel axis, mean, variance) where the model's statistics say."""
    mom: dict[str, tuple] = {}
    consts = model.consts

    def vec(name, axis, rank, length):
        """A constant as a per-channel vector along `axis` (or a scalar), else None."""
        a = consts.get(name)
        if a is None:
            return None
        if a.size == 1:
            return np.full(length, float(a.reshape(-1)[0]))
        shp = (1,) * (rank - a.ndim) + a.shape
        if len(shp) != rank or shp[axis] != length or \
                any(s != 1 for k, s in enumerate(shp) if k != axis):
            return None
        return a.reshape(-1).astype(np.float64)

    for node in model.nodes:
        op, ins, outs = node.op_type, list(node.input), list(node.output)
        if not outs or not outs[0]:
            continue
        y = outs[0]
        ry = model.rank(y) or 0
        got = None
        try:
            if op == "BatchNormalization" and all(t in consts for t in ins[1:3]):
                got = (1, consts[ins[2]].astype(np.float64).reshape(-1),
                       np.square(consts[ins[1]].astype(np.float64).reshape(-1)))
            elif op == "LayerNormalization" and len(ins) > 1 and ins[1] in consts:
                g = consts[ins[1]].astype(np.float64)
                if g.ndim == 1:
                    b = consts[ins[2]].astype(np.float64) if len(ins) > 2 and ins[2] \
                        and ins[2] in consts else np.zeros_like(g)
                    got = (ry - 1, b.reshape(-1), g * g)
            elif op in ("Relu",) and ins[0] in mom:
                ax, m, v = mom[ins[0]]
                got = (ax,) + _relu_moments(m, v)
            elif op == "Clip" and ins[0] in mom:
                lo = consts.get(ins[1]) if len(ins) > 1 and ins[1] else None
                if lo is not None and float(np.asarray(lo).reshape(-1)[0]) == 0.0:
                    ax, m, v = mom[ins[0]]
                    got = (ax,) + _relu_moments(m, v)
            elif op in ("Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
                        "GlobalMaxPool") and ins[0] in mom:
                got = mom[ins[0]]
            elif op == "ReduceMean" and ins[0] in mom:
                ax = mom[ins[0]][0]
                axes = [a.ints for a in node.attribute if a.name == "axes"]
                axes = list(axes[0]) if axes else (
                    consts[ins[1]].reshape(-1).tolist() if len(ins) > 1 and ins[1] in consts
                    else None)
                r = model.rank(ins[0]) or 0
                if axes is not None and ax not in [a % r for a in axes]:
                    keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
                    nax = ax if keep else ax - sum(1 for a in axes if a % r < ax)
                    got = (nax, mom[ins[0]][1], mom[ins[0]][2])
            elif op in ("Flatten", "Reshape", "Squeeze") and ins[0] in mom:
                ax, m, v = mom[ins[0]]
                sx, sy = model.shapes.get(ins[0]), model.shapes.get(y)
                if sx and sy and ax == 1 and len(sy) == 2 and \
                        all(isinstance(s, int) for s in sx[1:]) and \
                        isinstance(sy[1], int) and int(np.prod(sx[1:])) == sy[1]:
                    rep = int(np.prod(sx[2:]))
                    got = (1, np.repeat(m, rep), np.repeat(v, rep))
            elif op == "Add" and len(ins) == 2:
                a, b = ins
                if a in mom and b in mom and mom[a][0] == mom[b][0] and \
                        len(mom[a][1]) == len(mom[b][1]) and (model.rank(a) == ry):
                    got = (mom[a][0], mom[a][1] + mom[b][1], mom[a][2] + mom[b][2])
                else:
                    for p, q in ((a, b), (b, a)):
                        if p in mom and q in consts:
                            ax, m, v = mom[p]
                            c = vec(q, ax, ry, len(m))
                            if c is not None:
                                got = (ax, m + c, v)
            elif op == "Mul" and len(ins) == 2:
                for p, q in ((ins[0], ins[1]), (ins[1], ins[0])):
                    if p in mom and q in consts:
                        ax, m, v = mom[p]
                        c = vec(q, ax, ry, len(m))
                        if c is not None:
                            got = (ax, m * c, v * c * c)
            elif op == "Conv" and ins[0] in mom and ins[1] in consts:
                ax, m, v = mom[ins[0]]
                W = consts[ins[1]].astype(np.float64)
                g = next((a.i for a in node.attribute if a.name == "group"), 1)
                bias = consts[ins[2]].astype(np.float64) if len(ins) > 2 and ins[2] \
                    and ins[2] in consts else 0.0
                axes = tuple(range(2, W.ndim))
                if ax == 1 and g == 1 and W.shape[1] == len(m):
                    got = (1, W.sum(axis=axes) @ m + bias, (W * W).sum(axis=axes) @ v)
                elif ax == 1 and W.shape[1] == 1 and g == len(m) == W.shape[0]:
                    got = (1, W.sum(axis=axes)[:, 0] * m + bias,
                           (W * W).sum(axis=axes)[:, 0] * v)
            elif op in ("Gemm", "MatMul") and ins[0] in mom and ins[1] in consts:
                ax, m, v = mom[ins[0]]
                W = consts[ins[1]].astype(np.float64)
                if op == "Gemm" and next((a.i for a in node.attribute if a.name == "transB"),
                                         0):
                    W = W.T
                if W.ndim == 2 and ax == (model.rank(ins[0]) or 0) - 1 and \
                        W.shape[0] == len(m) and not (op == "Gemm" and next(
                            (a.i for a in node.attribute if a.name == "transA"), 0)):
                    bias = 0.0
                    if op == "Gemm" and len(ins) > 2 and ins[2] in consts and \
                            consts[ins[2]].size == W.shape[1]:
                        bias = consts[ins[2]].astype(np.float64).reshape(-1)
                    got = (ry - 1, m @ W + bias, v @ (W * W))
        except (ValueError, IndexError, KeyError, TypeError):
            got = None
        if got is not None and np.isfinite(got[1]).all() and np.isfinite(got[2]).all():
            mom[y] = got
    # a BatchNormalization that reads a tensor states that tensor's moments exactly
    for node in model.nodes:
        if node.op_type == "BatchNormalization" and all(t in consts for t in node.input[3:5]):
            x = node.input[0]
            if x not in consts:
                mom[x] = (1, consts[node.input[3]].astype(np.float64).reshape(-1),
                          np.maximum(consts[node.input[4]].astype(np.float64).reshape(-1), 0))
    return mom


def surrogate_hessians(model, consumers: list[Consumer]) -> tuple[list[np.ndarray], dict]:
    """H from channel moments (μμᵀ + diag σ², independent kernel offsets), identity where
    the model says nothing about a layer's input."""
    mom = channel_moments(model)
    out, known = [], 0
    for c in consumers:
        d = c.d
        H = np.eye(d + 1)
        m = mom.get(c.x)
        axis = {"conv": 1, "convT": 1}.get(c.kind)
        r = model.rank(c.x) or 0
        if c.kind == "dense":
            axis = 0 if c.trans_x else r - 1
        elif c.kind == "dense_left":
            axis = r - 2
        if m is not None and m[0] == axis:
            mu, var = m[1], m[2]
            if c.part is not None:
                g, _ = c.part
                mu, var = mu[g * c.n_in:(g + 1) * c.n_in], var[g * c.n_in:(g + 1) * c.n_in]
            if len(mu) == c.n_in:
                if c.mode == "full" and c.kprod > 1:
                    mu = np.repeat(mu, c.kprod)
                    var = np.repeat(var, c.kprod)
                H[:d, :d] = np.outer(mu, mu) + np.diag(var)
                H[:d, d] = H[d, :d] = mu
                known += 1
        out.append(H)
    return out, {"layers": len(consumers), "from_statistics": known,
                 "identity": len(consumers) - known}


# ------------------------------------------------------------------------------------------
# saliency: greedy group-level OBS with inverse-Hessian downdates


def _blocks(c: Consumer, chans: np.ndarray, local_of: dict) -> dict[int, np.ndarray]:
    """Local channel of the group -> the consumer's input elements it owns."""
    out: dict[int, list[int]] = {}
    for e, own in enumerate(c.owners):
        for ch in own.tolist():
            q = local_of.get(ch)
            if q is not None:
                out.setdefault(q, []).append(e)
    return {q: np.asarray(v, np.int64) for q, v in out.items()}


class _State:
    """One consumer inside one group's greedy pass: its matrix and inverse Hessian, both
    restricted to the inputs still present (the matrices shrink as inputs go, which makes
    the downdates of a wide layer several times cheaper than on the full width)."""

    def __init__(self, c: Consumer, H: np.ndarray, W: np.ndarray, blocks, damp: float):
        use = c.d + 1 if c.intercept else c.d
        Hc = H[:use, :use]
        self.M = np.zeros((c.matrix(W).shape[0], use))
        self.M[:, :c.d] = c.matrix(W)
        self.E = max(float(np.einsum("ij,ij->", self.M @ Hc, self.M)), 1e-30)
        self.Hinv = inv_psd(damped(Hc, damp, c.d))
        self.blocks = {q: c.h_index(e) for q, e in blocks.items()}
        self.gone = np.zeros(use, bool)
        #: original input index -> row/column of M and Hinv now (-1: gone)
        self.pos = np.arange(use)
        # blocks of one size that share no element (a FFN's channels, a projection's
        # heads): a block is either whole or gone, and the costs of all are computed at once
        self.table = None
        sizes = {len(v) for v in self.blocks.values()}
        if len(sizes) == 1 and self.blocks:
            allidx = np.concatenate(list(self.blocks.values()))
            if len(np.unique(allidx)) == len(allidx):
                nq = max(self.blocks) + 1
                self.table = np.full((nq, sizes.pop()), -1, np.int64)
                for q, v in self.blocks.items():
                    self.table[q] = v

    def _block_costs(self, I: np.ndarray) -> np.ndarray:
        """OBS costs of removing each row of I (n, b: original input indices, all present)."""
        P = self.pos[I]
        if P.shape[1] == 1:
            h = np.maximum(self.Hinv[P[:, 0], P[:, 0]], 1e-300)
            return np.square(self.M[:, P[:, 0]]).sum(axis=0) / h
        HB = self.Hinv[P[:, :, None], P[:, None, :]]    # (n, b, b)
        MB = self.M[:, P].transpose(1, 2, 0)            # (n, b, rows)
        try:
            X = np.linalg.solve(HB, MB)
        except np.linalg.LinAlgError:
            X = np.linalg.pinv(HB) @ MB
        return np.einsum("nbr,nbr->n", MB, X)

    def costs(self, qs: list[int]) -> np.ndarray:
        out = np.zeros(len(qs))
        if self.table is not None:
            q = np.asarray(qs, np.int64)
            inside = np.nonzero(q < len(self.table))[0]
            I = self.table[q[inside]]
            ok = (I[:, 0] >= 0) & ~self.gone[np.maximum(I[:, 0], 0)]
            if ok.any():
                out[inside[ok]] = self._block_costs(I[ok])
            return np.maximum(out, 0.0) / self.E
        by_size: dict[int, list[tuple[int, np.ndarray]]] = {}
        for k, q in enumerate(qs):
            idx = self.blocks.get(q)
            if idx is None:
                continue
            idx = idx[~self.gone[idx]]
            if len(idx):
                by_size.setdefault(len(idx), []).append((k, idx))
        for b, items in by_size.items():
            ks = np.array([k for k, _ in items])
            out[ks] = self._block_costs(np.stack([i for _, i in items]))
        return np.maximum(out, 0.0) / self.E

    def remove(self, qs) -> None:
        idx = [self.blocks[q] for q in qs if q in self.blocks]
        if not idx:
            return
        e = np.unique(np.concatenate(idx))
        e = e[~self.gone[e]]
        if not len(e):
            return
        p = self.pos[e]
        keep = np.ones(len(self.Hinv), bool)
        keep[p] = False
        k = np.nonzero(keep)[0]
        Hb = inv_psd(self.Hinv[np.ix_(p, p)])
        G = self.Hinv[np.ix_(p, k)]                     # (|e|, kept)
        HG = Hb @ G
        M = self.M[:, k]
        M -= self.M[:, p] @ HG
        Hinv = self.Hinv[np.ix_(k, k)]
        Hinv -= G.T @ HG
        self.M, self.Hinv = M, Hinv
        self.gone[e] = True
        self.pos[e] = -1
        self.pos[~self.gone] = np.arange(len(k))


def greedy_scores(analysis, consumers, hessians, *, damp: float = DAMP,
                  per_step: int = 64) -> tuple[list[np.ndarray], list[int]]:
    """Per group: channels in greedy OBS removal order, scored by their relative cost when
    they went (non-decreasing along the order). Also: the groups no consumer reads."""
    model = analysis.model
    scores, orphan = [], []
    by_group: dict[int, list[int]] = {}
    for k, c in enumerate(consumers):
        gs = set()
        for own in c.owners:
            for ch in own.tolist():
                gs.add(int(analysis.group_of_chan[ch]))
        for g in gs:
            by_group.setdefault(g, []).append(k)
    for g, chans in enumerate(analysis.group_chans):
        n = len(chans)
        ks = by_group.get(g, [])
        if not ks:
            scores.append(np.zeros(n))
            orphan.append(g)
            continue
        local_of = {int(ch): q for q, ch in enumerate(chans.tolist())}
        states = []
        for k in ks:
            c = consumers[k]
            bl = _blocks(c, chans, local_of)
            if bl:
                states.append(_State(c, hessians[k], model.consts[c.weight], bl, damp))
        alive = list(range(n))
        score = np.zeros(n)
        last = 0.0
        while alive:
            cost = np.zeros(len(alive))
            for s in states:
                cost += s.costs(alive)
            if len(alive) == 1:
                score[alive[0]] = max(float(cost[0]), np.nextafter(last, np.inf))
                break
            step = max(1, len(alive) // per_step)
            step = min(step, len(alive) - 1)
            pick = np.argsort(cost, kind="stable")[:step]
            go = [alive[j] for j in pick]
            for j in pick:
                last = max(float(cost[j]), np.nextafter(last, np.inf))
                score[alive[j]] = last
            for s in states:
                s.remove(go)
            gone = set(go)
            alive = [q for q in alive if q not in gone]
        scores.append(score)
    return scores, orphan


# ------------------------------------------------------------------------------------------
# sequential reconstruction: fit every affected layer on the pruned model's own inputs


def _rounds(model, consumers: list[Consumer], affected: list[int]) -> list[list[int]]:
    """Consumers (indices into `consumers`) by round: a consumer's input depends only on
    consumers of earlier rounds (the longest chain of affected consumers above it)."""
    at_node: dict[str, list[int]] = {}
    for k in affected:
        at_node.setdefault(consumers[k].node, []).append(k)
    depth: dict[str, int] = {}
    for node in model.nodes:
        d = max([depth.get(t, 0) for t in node.input if t] + [0])
        if model.node_name(node) in at_node:
            for k in at_node[model.node_name(node)]:
                consumers[k].__dict__["_round"] = depth.get(consumers[k].x, 0)
            d += 1
        for o in node.output:
            if o:
                depth[o] = d
    rounds: dict[int, list[int]] = {}
    for k in affected:
        rounds.setdefault(consumers[k].__dict__.pop("_round", 0), []).append(k)
    return [rounds[r] for r in sorted(rounds)]


def _affected(model, analysis, plan, consumers: list[Consumer]) -> list[int]:
    """Consumers that lose inputs, or whose input may differ in the pruned model (some node
    above it reads a pruned tensor)."""
    kept = plan.kept_indices(analysis)
    pruned_tensors = {t for t, _ in kept if t not in model.consts}
    changed: set[str] = set()
    for node in model.nodes:
        if any(t in changed or t in pruned_tensors for t in node.input if t):
            changed.update(o for o in node.output if o)
    out = []
    for k, c in enumerate(consumers):
        if c.shared:
            continue
        if (c.weight, c.in_axis) in kept or c.x in changed:
            out.append(k)
    return out


class _Overrides:
    """Values of the pruned model's initializers that a refit changed: the writer's new
    weights and biases (original shapes) sliced along the plan's kept indices, and its new
    bias inputs under the names apply_plan gave them."""

    def __init__(self, model, base, kept):
        self.model, self.kept, self.values = model, kept, {}
        by_output = {n.output[0]: n for n in base.graph.node if n.output}
        self.node_inputs = {model.node_name(n): list(by_output[n.output[0]].input)
                            for n in model.nodes if n.output and n.output[0] in by_output}

    def update(self, writer, c) -> None:
        from ..rewrite.apply import take_kept
        for name in (c.weight, c.bias):
            if name is not None and name in writer.work:
                dtype = self.model.consts.dtype_of(name)
                self.values[name] = np.ascontiguousarray(
                    take_kept(writer.work[name], name, self.kept).astype(dtype))
        key = (c.node, c.bias_add)
        if key in writer.new_inputs:
            ins = self.node_inputs.get(c.node, [])
            if c.bias_add < len(ins) and ins[c.bias_add]:
                v = writer.new_inputs[key]
                idx = self.kept.get(writer.dims[key])
                self.values[ins[c.bias_add]] = np.ascontiguousarray(
                    (v if idx is None else v[idx]).astype(writer.dtypes[key]))


def sequential_updates(ob: "Obspa", plan, start: Updates | None = None, *,
                       samples: int | None = None):
    """Refit, round by round in graph order, every affected layer so that on the pruned
    model's inputs x̃ (kept slices, earlier layers already refitted) it reproduces the
    original layer's output on the original inputs x: W = M E[x x̃ᵀ] E[x̃ x̃ᵀ]⁻¹ (plus the
    bias), damped towards the plainly sliced weights W_s: W = (M E[x x̃ᵀ] + λ W_s)
    (E[x̃ x̃ᵀ] + λI)⁻¹. The errors of earlier layers are then corrected instead of
    compounded."""
    from ..rewrite.apply import apply_plan
    from ..rewrite.reconstruct import Writer, cross_update
    model, analysis, calib = ob.model, ob.analysis, ob.calib
    kept = plan.kept_indices(analysis)
    consumers = ob.consumers
    writer = Writer(model, start)
    layers: dict[int, dict] = {}
    rng = np.random.default_rng(1)
    n_total = min(calib.n_samples, samples or calib.n_samples)
    rounds = _rounds(model, consumers, _affected(model, analysis, plan, consumers))
    from ..activations import (DEFAULT_MAX_BYTES, Frontier, _sample_bytes, batch_size_for,
                               runner)
    every = sorted({consumers[k].x for rnd in rounds for k in rnd})
    bs, per = batch_size_for(model, every, calib, max_bytes=DEFAULT_MAX_BYTES)
    batches = list(calib.batches(bs, n_total))
    masks = list(calib.row_masks(bs, n_total))
    # both models run piece by piece: each round computes only the layers between the
    # previous round's inputs and its own (graphs with subgraphs: whole prefixes)
    f_orig = Frontier(model.proto, batches, path=model.path)
    first = batches[0] if batches else {}
    # the pruned model is built once (its structure, bias inputs included, is the same in
    # every round); each round's refitted weights reach the pieces still to run as
    # initializer overrides, sliced like apply_plan slices them
    base = apply_plan(model, analysis, plan, writer.updates())
    over = _Overrides(model, base, kept)
    f_now = Frontier(base, batches, path=model.path)
    inits = {t.name for t in model.proto.graph.initializer}
    peak = f_orig.peak_bytes([sorted({consumers[k].x for k in rnd}) for rnd in rounds],
                             inits, lambda t: _sample_bytes(model, t, first))
    if 2 * n_total * peak > FRONTIER_BYTES:  # too many samples to hold a frontier
        f_now.ok = False
    for rnd in rounds:
        acc: dict[int, list] = {}
        names = sorted({consumers[k].x for k in rnd})
        if f_now.ok:
            orig_all = f_orig.compute(model.proto, names)
            now_all = f_now.compute(base, names, over.values)
        else:
            current = apply_plan(model, analysis, plan, writer.updates())
            run_now, run_orig = runner(current, names), runner(model.proto, names)
            orig_all = [run_orig(f) for f in batches]
            now_all = [run_now(f) for f in batches]
        for bi in range(len(batches)):
            now, orig = now_all[bi], orig_all[bi]
            for k in rnd:
                c = consumers[k]
                x, xt = np.asarray(orig[c.x]), np.asarray(now[c.x])
                keep_in = kept.get((c.weight, c.in_axis), np.arange(c.n_in))
                ct = Consumer(**{**c.__dict__, "n_in": len(keep_in)})
                ax = {"conv": 1, "convT": 1}.get(c.kind, x.ndim - (2 if c.kind ==
                                                                   "dense_left" else 1))
                if c.kind == "dense" and c.trans_x:
                    ax = 0
                groups = c.part[1] if c.part else 1
                if xt.shape[ax] != len(keep_in) * groups or x.dtype.kind != "f":
                    continue  # the pruned input is not simply the kept slices: skip
                n = c.n_rows(x.shape)
                valid = valid_rows(c, x.shape, masks[bi])
                if k not in acc:
                    cap = max(MIN_ROWS, ROWS_PER_FEATURE * c.d)
                    per_sample = (n if valid is None else int(valid.sum())) / max(x.shape[0], 1)
                    p = min(1.0, cap / max(per_sample * n_total, 1.0))
                    kt = ct.d + (1 if c.intercept else 0)
                    acc[k] = [p, np.zeros((kt, kt)), np.zeros((c.d + 1, kt)), 0]
                p = acc[k][0]
                pick = _pick(rng, n, p, valid)
                if pick is not None and not len(pick):
                    continue
                _, Ht, C, _ = acc[k]
                dt = ct.d
                for r, rt in zip(_row_chunks(c, x, pick), _row_chunks(ct, xt, pick)):
                    rt64 = rt.astype(np.float64)
                    Ht[:dt, :dt] += rt.T @ rt
                    C[:c.d, :dt] += r.T @ rt
                    C[c.d, :dt] += rt64.sum(axis=0)
                    if c.intercept:
                        Ht[:dt, dt] += rt64.sum(axis=0)
                        C[:c.d, dt] += r.astype(np.float64).sum(axis=0)
                        C[c.d, dt] += len(r)
                    acc[k][3] += len(r)
        for k, (_, Ht, C, rows) in acc.items():
            if rows == 0:
                continue
            c = consumers[k]
            keep_in = kept.get((c.weight, c.in_axis), np.arange(c.n_in))
            dt = Ht.shape[0] - (1 if c.intercept else 0)
            if c.intercept:
                Ht[dt, :dt] = Ht[:dt, dt]
                Ht[dt, dt] = rows
            Ht /= rows
            C /= rows
            use = c.d + 1 if c.intercept else c.d
            M = np.zeros((c.matrix(model.consts[c.weight]).shape[0], use))
            M[:, :c.d] = c.matrix(model.consts[c.weight])
            Cu = C[:use]
            cols = c.h_index(keep_in)
            Ws = M[:, list(cols) + ([c.d] if c.intercept else [])]
            # damped towards the plainly sliced weights (not towards zero): with few or
            # unrepresentative calibration rows the fit stays near the original layer
            Wt = cross_update(M, Cu, Ht, ob.damp, dt, prior=Ws)
            H = ob.hessians[k][:use, :use]
            energy = max(float(np.einsum("ij,ij->", M @ H, M)), 1e-30)

            def err(W):
                return (energy - 2 * float(np.einsum("ij,ij->", M @ Cu, W)) +
                        float(np.einsum("ij,ij->", W @ Ht, W)))
            e_fit, e_slice = err(Wt), err(Ws)
            if e_fit > e_slice:
                Wt, e_fit = Ws, e_slice
            Mn = np.zeros_like(M)
            Mn[:, cols] = Wt[:, :dt]
            if c.intercept:
                Mn[:, c.d] = Wt[:, dt]
            bias = writer.write(c, Mn)
            over.update(writer, c)
            layers[k] = {"node": c.node, "rows": int(rows),
                         "fit_rel_error": float(np.sqrt(max(e_fit, 0.0) / energy)),
                         "sliced_rel_error": float(np.sqrt(max(e_slice, 0.0) / energy)),
                         "bias": bias}
    return writer, [layers[k] for k in sorted(layers)]


# ------------------------------------------------------------------------------------------
# the criterion

#: BLAS threads while obspa computes (environment SPA_BLAS_THREADS; 0: the library's own)
BLAS_THREADS_ENV = "SPA_BLAS_THREADS"


def blas_threads():
    """A context limiting the BLAS library's threads (threadpoolctl) to
    $SPA_BLAS_THREADS, default 1, while obspa accumulates Hessians, runs the greedy pass
    and refits: its many small products gain nothing from BLAS threads, and on a machine
    whose cores are busy the threads' waiting costs several times the work (ResNet-56 at
    50 % FLOPs with one of two cores busy: 150.7 s with the default threads, 35.0 s with
    one; idle: 33.5 s and 29.2 s; docs/obspa.md). 0 leaves the library's default."""
    raw = os.environ.get(BLAS_THREADS_ENV, "1").strip()
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"{BLAS_THREADS_ENV}={raw!r}: expected a number of threads >= 0 "
                         "(0: the BLAS library's default)")
    from threadpoolctl import threadpool_limits  # a dependency; imported only when used
    return contextlib.nullcontext() if n == 0 else threadpool_limits(n, user_api="blas")


class Obspa:
    """Hessians of a model's consumers on a calibration source; scores and reconstruction."""

    def __init__(self, model, analysis, calib: Calibration, *, damp: float = DAMP,
                 max_full: int = MAX_FULL, seed: int = 0, batch_size: int = 64,
                 threads: int = 0, rows_per_feature: int = ROWS_PER_FEATURE,
                 sequential: bool | None = None, sequential_samples: int | None = None):
        self.model, self.analysis, self.calib, self.damp = model, analysis, calib, damp
        # sequential refits need real data: on synthetic inputs they fit the synthetic
        # distribution (measured: worse than independent updates, docs/obspa.md)
        self.sequential = calib.mode == "file" if sequential is None else sequential
        self.sequential_samples = sequential_samples
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.consumers = find_consumers(analysis, max_full)
        with blas_threads():
            if calib.mode == "none":
                self.hessians, self.info = surrogate_hessians(model, self.consumers)
            else:
                self.hessians, self.info = collect_hessians(
                    model, self.consumers, calib, seed=seed, batch_size=batch_size,
                    threads=threads, rows_per_feature=rows_per_feature)
        self.timings["hessians_s"] = time.perf_counter() - t0
        self.orphans: list[int] = []

    def scores(self) -> list[np.ndarray]:
        if getattr(self, "_scores", None) is not None:
            return self._scores
        t0 = time.perf_counter()
        with blas_threads():
            scores, self.orphans = greedy_scores(self.analysis, self.consumers,
                                                 self.hessians, damp=self.damp)
        if self.orphans:  # no layer reads these groups: their share of the weight energy
            from .magnitude import score as magnitude
            l2 = magnitude(self.analysis, "l2")
            for g in self.orphans:
                e = np.square(l2[g])
                scores[g] = e / e.sum() if e.sum() > 0 else e
        self.timings["scores_s"] = time.perf_counter() - t0
        self._scores = scores
        return scores

    def reconstruct(self, plan) -> Updates:
        """The weight update: with calibration data, sequential (each affected layer fitted
        on the pruned model's inputs); without, each layer on its own surrogate Hessian."""
        t0 = time.perf_counter()
        with blas_threads():
            upd = reconstruct(self.model, self.analysis, plan, self.consumers, self.hessians,
                              damp=self.damp)
            if self.sequential and self.calib.arrays is not None:
                writer, fits = sequential_updates(self, plan, upd,
                                                  samples=self.sequential_samples)
                upd = writer.updates(upd.layers)
                self.info["sequential_layers"] = len(fits)
        self.timings["reconstruct_s"] = time.perf_counter() - t0
        return upd

    def describe(self) -> dict:
        modes = {}
        for c in self.consumers:
            modes[c.mode] = modes.get(c.mode, 0) + 1
        return {"calibration": self.calib.describe(), "damp": self.damp,
                "reconstruction": "sequential" if self.sequential and
                self.calib.arrays is not None else "independent",
                "layers": len(self.consumers), "hessian_modes": modes,
                "groups_without_consumers": self.orphans,
                "hessians": {k: v for k, v in self.info.items() if k != "rows"},
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


# ------------------------------------------------------------------------------------------
# predicted vs measured error


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


def evaluation_samples(model, calib: Calibration, n: int = 64, seed: int = 0):
    """Samples to measure errors on: the first `n` calibration samples, or, without any
    (calibration 'none'), `n` synthetic ones."""
    if calib.arrays is not None:
        return calib, f"{min(n, calib.n_samples)} {calib.mode} calibration samples"
    from ..activations import synthesize
    return synthesize(model, n=n, seed=seed + 1), f"{n} synthetic samples (no calibration data)"


def measure(model, analysis, plan, consumers: list[Consumer], protos: dict, calib, *,
            n: int = 64) -> dict:
    """Relative output errors ‖y_pruned − y‖ / ‖y‖ of each pruned model in `protos` against
    the original, on `n` samples: graph outputs and (same tensor names) every consumer's
    output, compared on the output channels the plan keeps."""
    from ..activations import run_outputs
    kept = plan.kept_indices(analysis)
    layer_out = {}
    for c in consumers:
        if c.node in layer_out:
            continue
        node = next((x for x in model.nodes if model.node_name(x) == (c.bias_node or c.node)),
                    None)
        y = node.output[0] if node is not None else None
        r = model.rank(y) if y else None
        if y is None or r is None or y in model.output_names:
            continue
        axis = {"conv": 1, "convT": 1, "dense": r - 1, "dense_left": r - 2}[c.kind]
        layer_out[c.node] = (y, axis)
    outs = list(model.output_names)
    names = outs + sorted({y for y, _ in layer_out.values()})
    ref = run_outputs(model.proto, names, calib, limit=n)
    res = {}
    for label, proto in protos.items():
        got = run_outputs(proto, names, calib, limit=n)
        layers = {}
        for node, (y, axis) in layer_out.items():
            a, b = got[y], ref[y]
            idx = kept.get((y, axis))
            if idx is not None:
                b = np.take(b, idx, axis=axis)
            if a.shape == b.shape:
                layers[node] = _rel(a, b)
        res[label] = {"outputs": {o: _rel(got[o], ref[o]) for o in outs}, "layers": layers}
    return res


def report(ob: "Obspa", plan, updates: Updates, protos: dict, *, n: int = 64) -> dict:
    """The obspa part of a prune report: calibration, kept channels per group, predicted
    (per layer, on the Hessians) vs measured (model outputs and layer outputs) errors."""
    analysis = ob.analysis
    samples, on = evaluation_samples(ob.model, ob.calib, n)
    t0 = time.perf_counter()
    meas = measure(ob.model, analysis, plan, ob.consumers, protos, samples, n=n)
    ob.timings["measure_s"] = time.perf_counter() - t0
    main = "reconstructed" if "reconstructed" in meas else next(iter(meas))
    layers = []
    for e in updates.layers:
        row = {"node": e["node"], "inputs_removed": f"{e['removed_inputs']}/{e['inputs']}",
               "predicted": round(e["predicted_rel_error"], 6),
               "predicted_sliced": round(e["predicted_rel_error_sliced"], 6),
               "updated": e["updated"], "bias": e.get("bias")}
        m = meas[main]["layers"].get(e["node"])
        if m is not None:
            row["measured"] = round(m, 6)
        layers.append(row)
    pred = [e["predicted_rel_error"] for e in updates.layers]
    pred_s = [e["predicted_rel_error_sliced"] for e in updates.layers]
    out = ob.describe()
    out.update({
        "groups": {str(g): {"kept": len(k), "of": analysis.groups[g].channels}
                   for g, k in sorted(plan.keep.items())},
        "weights_changed": sorted(updates.consts),
        "biases_added": [f"{k[0]}:{k[1]}" for k in sorted(updates.new_inputs)],
        "predicted": {"mean_layer_rel_error": float(np.mean(pred)) if pred else 0.0,
                      "mean_layer_rel_error_sliced": float(np.mean(pred_s)) if pred_s else 0.0,
                      "what": "per layer, on its own (unpruned) inputs: sqrt of the error "
                              "energy over the output energy, from the Hessians"},
        "measured": {"on": on,
                     "output_rel_error": meas[main]["outputs"],
                     **({"output_rel_error_sliced": meas["sliced"]["outputs"]}
                        if "sliced" in meas and main != "sliced" else {}),
                     "what": "‖y_pruned − y‖ / ‖y‖ of the graph outputs; per layer (below) "
                             "the layer outputs inside the pruned model, errors compounded "
                             "from earlier layers"},
        "layer_errors": layers,
        "timings": {k: round(v, 3) for k, v in ob.timings.items()},
    })
    return out
