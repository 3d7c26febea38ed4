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

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .aggregate import aggregate, member_pairs, slice_sums


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

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)


def param_members(analysis):
    """Member dims that are floating-point parameters, in graph order, with their arrays."""
    consts = analysis.model.consts
    for key in analysis.member_keys():
        arr = consts.get(key[0])
        if arr is not None and np.issubdtype(arr.dtype, np.floating) and arr.ndim:
            yield key, arr


def reduce_to_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """Sum over every axis but `axis` (float64)."""
    others = tuple(k for k in range(a.ndim) if k != axis)
    return a.sum(axis=others, dtype=np.float64) if others else a.astype(np.float64)


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
