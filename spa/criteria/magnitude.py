"""Data-free criteria: magnitude (l1, l2, lamp), normalisation scale (bn_scale), redundancy
(fpgm) and random. Formulas and references: docs/criteria.md."""
from __future__ import annotations

import zlib

import numpy as np

from ..errors import UsageError
from .aggregate import aggregate, normalize, slice_sums
from .core import Context, Criterion, channel_scores, member_scores

#: FPGM: distances of every slice to at most this many reference slices of its member
FPGM_MAX_REFS = 1024


def _abs(a, name, ctx):
    return np.abs(_wide(a))  # slices are summed in float64


def _square(a, name, ctx):
    return np.square(_wide(a))


def _wide(a: np.ndarray) -> np.ndarray:
    """float16 / bfloat16 / float8 weights are scored in float32 (their squares overflow
    or round in their own precision); float32 and float64 as they are."""
    return a.astype(np.float32) if a.dtype.itemsize < 4 else a


def _random(ctx: Context, how: str) -> np.ndarray:
    return np.random.default_rng(ctx.seed).random(ctx.analysis.n_channels)


# ------------------------------------------------------------------------------------------
# FPGM: filters near the geometric median of their layer are the most replaceable


def _distance_sums(v: np.ndarray, rng) -> np.ndarray:
    """Σ_j ‖v_i − v_j‖₂ for every row i (over a seeded sample of at most FPGM_MAX_REFS
    reference rows, scaled to the full count)."""
    n = len(v)
    if n < 2:
        return np.zeros(n)
    refs = v if n <= FPGM_MAX_REFS else v[np.sort(rng.choice(n, FPGM_MAX_REFS, replace=False))]
    scale = n / len(refs)
    rsq = np.einsum("ij,ij->i", refs, refs)
    out = np.empty(n)
    step = max(1, (1 << 24) // max(1, len(refs)))
    for s in range(0, n, step):
        blk = v[s:s + step]
        d2 = np.einsum("ij,ij->i", blk, blk)[:, None] + rsq[None, :] - 2.0 * (blk @ refs.T)
        out[s:s + step] = np.sqrt(np.maximum(d2, 0.0)).sum(axis=1) * scale
    return out


def _fpgm_slices(arr, key, pairs, ctx: Context):
    """Each channel's slice of the member (all its elements' rows, flattened) is one vector;
    its score is its summed distance to the member's other slices. Members whose channels
    own different numbers of elements, or share elements (merged axes), score per element
    and sum over the channel's elements."""
    elems, chans = pairs
    x = np.moveaxis(arr, key[1], 0)
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    rng = np.random.default_rng([ctx.seed, zlib.crc32(key[0].encode()), key[1]])
    uniq, inv = np.unique(chans, return_inverse=True)
    counts = np.bincount(inv)
    if len(np.unique(elems)) == len(elems) and (counts == counts[0]).all():
        order = np.lexsort((elems, inv))  # rows grouped by channel, in element order
        v = x[elems[order]].reshape(len(uniq), -1)
        return uniq, _distance_sums(v, rng)
    ue = np.unique(elems)
    d = np.zeros(x.shape[0])
    d[ue] = _distance_sums(x[ue], rng)
    return slice_sums(pairs, d)


def _matrices_only(ctx, key, arr) -> bool:
    return arr.ndim >= 2


# ------------------------------------------------------------------------------------------
# bn_scale: |γ| of the normalisation layers a channel passes through


def norm_scales(analysis) -> set[str]:
    """Constants that are the scale (γ) of a normalisation layer: the dims the rules tag
    `norm_scale` (spa/ops/norm.py)."""
    consts = analysis.model.consts
    return {t for (t, _), tags in analysis.coupler.tags.items()
            if "norm_scale" in tags and t in consts}


def _bn_scale(ctx: Context, how: str) -> np.ndarray:
    """|γ| aggregated over the normalisation layers of the group. Groups in which some
    channel passes through no normalisation layer (an attention head group, a plain
    Linear) fall back to l1 for all their channels; the plan's notes list them."""
    ana = ctx.analysis
    scales = norm_scales(ana)
    if not scales:
        raise UsageError("criterion 'bn_scale' needs normalisation layers (BatchNormalization, "
                         "LayerNormalization, ...) and the model has none whose scale is a "
                         "constant; use l1, l2 or fpgm", file=ana.model.path)
    crit = Criterion("bn_scale", "", weight=_abs, elementwise=True,
                     accepts=lambda c, key, arr: key[0] in scales)
    members = member_scores(crit, ctx)
    glob = aggregate(ana.n_channels, members, how)
    touched = np.zeros(ana.n_channels, bool)
    for chans, _ in members:
        touched[chans] = True
    fallback = [g for g, ch in enumerate(ana.group_chans) if len(ch) and not touched[ch].all()]
    if len(fallback) == len(ana.group_chans):
        raise UsageError("criterion 'bn_scale': no prunable group passes through a "
                         "normalisation layer whose scale is a constant; use l1, l2 or fpgm",
                         file=ana.model.path)
    if fallback:
        l1 = channel_scores(L1, ctx, how)
        for g in fallback:
            glob[ana.group_chans[g]] = l1[ana.group_chans[g]]
        ctx.notes.append(f"bn_scale: {len(fallback)} group(s) without a normalisation scale on "
                         f"every channel scored by l1 instead: "
                         f"{', '.join(map(str, fallback[:20]))}"
                         + (" ..." if len(fallback) > 20 else ""))
    return glob


L1 = Criterion("l1", "L1 norm of everything a channel owns (Σ|w| over all members)",
               weight=_abs, elementwise=True)
L2 = Criterion("l2", "L2 norm of everything a channel owns (√ of the aggregated Σw²)",
               weight=_square, finish=np.sqrt, elementwise=True)
RANDOM = Criterion("random", "uniform random scores (seeded): the baseline",
                   channels=_random)
LAMP = Criterion("lamp", "LAMP: squared magnitude over the sum of the group's not-smaller "
                 "squared magnitudes (comparable across groups)", weight=_square,
                 group_finish=lambda s: normalize(s, "lamp"), default_normalize="none",
                 elementwise=True)
FPGM = Criterion("fpgm", "FPGM: summed distance of a channel's slice to the other slices of "
                 "its layer (near the geometric median = replaceable)",
                 slices=_fpgm_slices, accepts=_matrices_only)
BN_SCALE = Criterion("bn_scale", "|γ| of the normalisation layers (BatchNorm, LayerNorm, ...) "
                     "a channel passes through (network slimming)", channels=_bn_scale)

CRITERIA = {c.name: c for c in (L1, L2, BN_SCALE, RANDOM, FPGM, LAMP)}


def score(analysis, criterion: str = "l2", seed: int = 0) -> list[np.ndarray]:
    """Importance of every channel of every group (higher = keep), for obspa's fallback on
    groups no layer reads (spa.criteria.score is the general entry point)."""
    from . import score as _score
    return _score(analysis, criterion, seed=seed)
