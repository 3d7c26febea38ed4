"""The one step every member-slice criterion shares: member scores -> channel scores.

A *member* is one axis of one parameter tensor, `(tensor name, axis)`, that belongs to a
group (a conv's output filters, the next conv's input slices, a BatchNorm scale, the rows of
a Linear after a Flatten, the Q/K/V/O columns of an attention block, ...). A criterion gives
one score per *element* of the member (per index along its axis, the other axes already
reduced) or one score per channel slice directly. This module maps those onto the global
channel index space of the analysis:

- an element maps to one channel (identity, concat offset), to no prunable channel, or, for
  a merged axis built from several prunable factors (product / "-2" entries: grouped
  convolutions with several prunable factors, nested flatten/head splits), to *each* of the
  channels it is derived from;
- several elements of one member may belong to the same channel (a Flatten block of H·W
  features, a head's block of head_dim columns): the member's *slice score* for that channel
  is the sum of its elements' scores (criteria that do not add up, like FPGM, build slice
  vectors themselves from `member_pairs`);
- the slice scores of all members that touch a channel are then aggregated
  (`AGGREGATIONS`): sum, mean, max, prod, or first (the member met first in graph order,
  usually the layer that produces the channel).

`normalize` then rescales one group's channel scores so that groups compare under a global
ranking (`NORMALIZERS`); local (per-group) selections are unaffected by it, since every
normalisation is increasing within a group.
"""
from __future__ import annotations

import numpy as np

from ..errors import UsageError

AGGREGATIONS = ("sum", "mean", "max", "prod", "first")
NORMALIZERS = ("mean", "max", "sum", "none", "standardization", "lamp")


def member_pairs(analysis, key) -> tuple[np.ndarray, np.ndarray] | None:
    """(element index, global channel id) pairs of a member dim: one pair per element that
    maps to a prunable channel, one per derived channel for merged ("-2") elements. Cached
    on the analysis; None when the dim owns no prunable channel."""
    cache = analysis.__dict__.setdefault("_member_pairs", {})
    if key in cache:
        return cache[key]
    ch = analysis.dim_channels(key)
    out = None
    if ch is not None:
        direct = np.nonzero(ch >= 0)[0]
        elems, chans = [direct], [ch[direct]]
        several = np.nonzero(ch == -2)[0]
        if len(several):
            c = analysis.coupler
            base = c.base[c.dims[key]]
            for j in several.tolist():
                multi = analysis.multi[int(analysis.label[base + j])]
                elems.append(np.full(len(multi), j, np.int64))
                chans.append(np.asarray(multi, np.int64))
        e, h = np.concatenate(elems), np.concatenate(chans)
        if len(e):
            out = (e.astype(np.int64), h.astype(np.int64))
    cache[key] = out
    return out


def slice_sums(pairs, element_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel slice score of one member: the sum of its elements' scores over the
    elements each channel owns. Returns (channel ids, scores)."""
    elems, chans = pairs
    uniq, inv = np.unique(chans, return_inverse=True)
    vals = np.bincount(inv, weights=np.asarray(element_scores, np.float64)[elems],
                       minlength=len(uniq))
    return uniq, vals


def aggregate(n_channels: int, members, how: str = "sum") -> np.ndarray:
    """Aggregate member slice scores into one score per global channel.

    `members`: iterable of (channel ids, slice scores), in member order (graph order, so that
    "first" is the earliest member, usually the channel's producer). Channels no member
    touches score 0."""
    if how not in AGGREGATIONS:
        raise UsageError(f"unknown aggregation {how!r} (use one of {', '.join(AGGREGATIONS)})")
    count = np.zeros(n_channels, np.int64)
    if how in ("sum", "mean"):
        acc = np.zeros(n_channels)
    elif how == "max":
        acc = np.full(n_channels, -np.inf)
    elif how == "prod":
        acc = np.ones(n_channels)
    else:
        acc = np.zeros(n_channels)
    for chans, vals in members:
        vals = np.asarray(vals, np.float64)
        if how in ("sum", "mean"):
            np.add.at(acc, chans, vals)
        elif how == "max":
            np.maximum.at(acc, chans, vals)
        elif how == "prod":
            np.multiply.at(acc, chans, vals)
        else:  # first: only channels no earlier member touched
            new = count[chans] == 0
            acc[chans[new]] = vals[new]
        np.add.at(count, chans, 1)
    untouched = count == 0
    if how == "mean":
        acc = acc / np.maximum(count, 1)
    acc[untouched] = 0.0
    return acc


def normalize(s, how: str = "mean") -> np.ndarray:
    """Make one group's scores comparable with other groups' (higher = more important).

    mean / max / sum: divide by that statistic (when positive); standardization: zero mean,
    unit variance; lamp (Lee et al., ICLR 2021): a score over the sum of all scores of the
    group that are not below it, so the group's largest channel scores 1."""
    s = np.asarray(s, np.float64)
    if how == "none" or not len(s):
        return s.copy()
    if how in ("mean", "max", "sum"):
        d = {"mean": np.mean, "max": np.max, "sum": np.sum}[how](s)
        return s / d if d > 0 else s.copy()
    if how == "standardization":
        return (s - s.mean()) / (s.std() + 1e-12)
    if how == "lamp":
        order = np.argsort(s, kind="stable")
        srt = s[order]
        tail = np.cumsum(srt[::-1])[::-1]
        out = np.empty_like(s)
        out[order] = srt / np.maximum(tail, 1e-12)
        return out
    raise UsageError(f"unknown normalisation {how!r} (use one of {', '.join(NORMALIZERS)})")
