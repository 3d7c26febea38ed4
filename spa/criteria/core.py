"""What a criterion is, and the pipeline that turns it into channel scores.

A criterion scores *member slices*; the pipeline is the same for all of them:

    member (tensor, axis) ──criterion──▶ per-element scores (other axes reduced)
                           ──slice_sums──▶ per-channel slice scores of that member
                           ──member_post──▶ (e.g. |.| for Taylor)
    all members ──aggregate (sum/mean/max/prod/first)──▶ one score per channel
                ──finish──▶ (e.g. √ for l2)        ──group_finish──▶ (e.g. LAMP)

Most criteria are a per-weight saliency (|w|, w², |w·g|, ½·F·w², ...) summed over the
weights of a slice: they only define `weight`. Criteria whose slice score is not a sum
(FPGM's distances) define `slices`; criteria that do not score members at all (random) or
that choose between pipelines per group (bn_scale's fallback) define `channels`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..ir.external import ExternalTensor
from ..ir.model import is_float
from .aggregate import aggregate, member_pairs, slice_sums

#: tensors of more than this many bytes are scored in blocks of rows by criteria whose
#: saliency is elementwise, each block read from the file (external data) rather than
#: mapped: scoring holds one block and its saliency, not the tensor
BLOCK_BYTES = 32 << 20


@dataclass
class Context:
    """What a criterion may look at besides the weights."""
    analysis: object
    seed: int = 0
    stats: object | None = None          # gradient statistics (spa.engine.gradient_stats)
    notes: list[str] = field(default_factory=list)

    @property
    def model(self):
        return self.analysis.model


@dataclass(frozen=True)
class Criterion:
    name: str
    summary: str                                   # one line (CLI help, docs)
    #: per-weight saliency, same shape as the tensor: (array, tensor name, ctx) -> array
    weight: Callable | None = None
    #: non-additive slice scores: (array, key, pairs, ctx) -> (channel ids, scores)
    slices: Callable | None = None
    #: whole pipeline replaced: (ctx, aggregate) -> global channel scores
    channels: Callable | None = None
    #: which members take part: (ctx, key, array) -> bool (default: every float parameter)
    accepts: Callable | None = None
    member_post: Callable | None = None            # per member slice scores -> scores
    finish: Callable | None = None                 # global channel scores -> scores
    group_finish: Callable | None = None           # one group's scores -> scores
    needs: tuple = ()                              # gradient statistics: grad, fisher, hg
    default_normalize: str = "mean"
    #: `weight` depends on each element alone (|w|, w²): big tensors are scored in blocks
    elementwise: bool = False

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)


def param_members(analysis):
    """Member dims that are floating-point parameters (float16 and bfloat16 too), in graph
    order, with their arrays. A weight held by reference (external data, a pending slice)
    is not read here: its array is a read-only stand-in of the right shape and dtype (one
    zero, broadcast), enough for `accepts`; scores read the data through the consts."""
    consts = analysis.model.consts
    for key in analysis.member_keys():
        name = key[0]
        if name not in consts or not is_float(consts.dtype_of(name)) \
                or not len(consts.shape(name)):
            continue
        if consts.ref(name) is None:
            yield key, consts[name]
        else:
            yield key, np.broadcast_to(np.zeros((), consts.dtype_of(name)), consts.shape(name))


def reduce_to_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """Sum over every axis but `axis` (float64)."""
    others = tuple(k for k in range(a.ndim) if k != axis)
    return a.sum(axis=others, dtype=np.float64) if others else a.astype(np.float64)


def _nbytes(consts, name: str) -> int:
    return math.prod(consts.shape(name)) * np.dtype(consts.dtype_of(name)).itemsize


def row_blocks(consts, name: str, block_bytes: int | None = None):
    """(first row, rows) of a constant, about `block_bytes` (BLOCK_BYTES) at a time along
    axis 0. Weights in external data files are read block by block (anonymous memory that
    goes with the block; nothing stays mapped); others are sliced (views)."""
    shape = consts.shape(name)
    ref = consts.ref(name)
    arr = None if isinstance(ref, ExternalTensor) else consts[name]
    row = max(1, math.prod(shape[1:]) * np.dtype(consts.dtype_of(name)).itemsize)
    step = max(1, (block_bytes or BLOCK_BYTES) // row)
    for a in range(0, shape[0], step):
        b = min(a + step, shape[0])
        yield a, (ref.read_rows(a, b) if arr is None else arr[a:b])


def _blockwise_sums(crit: Criterion, ctx: Context, name: str, keys: list) -> dict:
    """Per-element scores (other axes summed, float64) of each member axis of one tensor,
    from an elementwise saliency computed one block of rows at a time."""
    shape = ctx.model.consts.shape(name)
    out = {key: np.zeros(shape[key[1]], np.float64) for key in keys}
    for a, blk in row_blocks(ctx.model.consts, name):
        sal = crit.weight(blk, name, ctx)
        for key in keys:
            r = reduce_to_axis(sal, key[1])
            if key[1] == 0:
                out[key][a:a + len(r)] = r
            else:
                out[key] += r
        sal = blk = None
    return out


def member_scores(crit: Criterion, ctx: Context) -> list[tuple]:
    """(channel ids, slice scores) of every member the criterion scores, in graph order.
    A tensor's per-weight saliency is computed once for all its member axes."""
    analysis = ctx.analysis
    by_tensor: dict[str, list] = {}
    order = []
    for key, arr in param_members(analysis):
        if crit.accepts is not None and not crit.accepts(ctx, key, arr):
            continue
        pairs = member_pairs(analysis, key)
        if pairs is None:
            continue
        order.append(key)
        # not the array: with streamed external data every weight held here would stay
        # mapped (resident) until the last tensor is scored
        by_tensor.setdefault(key[0], []).append((key, pairs))
    done = {}
    consts = analysis.model.consts
    for name, items in by_tensor.items():
        if crit.elementwise and crit.slices is None and _nbytes(consts, name) > BLOCK_BYTES:
            sums = _blockwise_sums(crit, ctx, name, [key for key, _ in items])
            for key, pairs in items:
                chans, vals = slice_sums(pairs, sums[key])
                if crit.member_post is not None:
                    vals = crit.member_post(vals)
                done[key] = (chans, vals)
            continue
        sal = None
        arr = consts[name]
        for key, pairs in items:
            if crit.slices is not None:
                chans, vals = crit.slices(arr, key, pairs, ctx)
            else:
                if sal is None:
                    sal = crit.weight(arr, name, ctx)
                chans, vals = slice_sums(pairs, reduce_to_axis(sal, key[1]))
            if crit.member_post is not None:
                vals = crit.member_post(vals)
            done[key] = (chans, vals)
        sal = arr = None  # one tensor's saliency at a time (large models)
    return [done[k] for k in order]


def channel_scores(crit: Criterion, ctx: Context, how: str = "sum") -> np.ndarray:
    """One score per global channel (analysis.n_channels), before per-group steps."""
    if crit.channels is not None:
        glob = crit.channels(ctx, how)
    else:
        glob = aggregate(ctx.analysis.n_channels, member_scores(crit, ctx), how)
        if crit.finish is not None:
            glob = crit.finish(glob)
    return glob


def group_scores(crit: Criterion, ctx: Context, how: str = "sum") -> list[np.ndarray]:
    glob = channel_scores(crit, ctx, how)
    out = [glob[ch] for ch in ctx.analysis.group_chans]
    if crit.group_finish is not None:
        out = [crit.group_finish(s) for s in out]
    return out
