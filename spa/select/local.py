"""Local selection: remove the same fraction of channels from every prunable group."""
from __future__ import annotations

import math

import numpy as np

from ..plan import Plan, model_sha256


def _member_counts(analysis, g: int) -> list[np.ndarray]:
    """For each member dim of group g: how many of its elements each channel owns.
    Cached on the analysis (selections that search a ratio call this many times)."""
    cache = analysis.__dict__.setdefault("_member_counts", {})
    if g not in cache:
        cache[g] = _count_members(analysis, g)
    return cache[g]


def _count_members(analysis, g: int) -> list[np.ndarray]:
    size = analysis.groups[g].channels
    out = []
    for m in analysis.groups[g].members:
        ch = analysis.dim_channels((m["tensor"], m["axis"]))
        sel = ch[ch >= 0]
        sel = sel[analysis.group_of_chan[sel] == g]
        if len(sel) == 0:
            continue
        counts = np.bincount(analysis.local_of_chan[sel], minlength=size)
        out.append((len(ch), counts))
    return out


def uniform(analysis, scores: list[np.ndarray], ratio, *, round_to: int = 1,
            exact_only: bool = False, criterion: str = "l2", options: dict | None = None) -> Plan:
    """Keep the highest-scored (1 - ratio) of every group, never emptying a tensor.
    `ratio` may be a dict {group kind: ratio} ("channels", "heads", "groups"; kinds it
    does not name lose nothing), e.g. a third of the attention heads and half of the FFN
    channels of a transformer: {"heads": 1/3, "channels": 0.5}."""
    keep, sizes = {}, {}
    for g, grp in enumerate(analysis.groups):
        size = grp.channels
        sizes[g] = size
        if exact_only and not grp.exact:
            continue
        r = ratio.get(grp.kind, 0.0) if isinstance(ratio, dict) else ratio
        n_keep = size - int(math.floor(r * size + 1e-9))
        if round_to > 1 and size >= round_to:
            n_keep = min(size, max(round_to, int(math.ceil(n_keep / round_to)) * round_to))
        n_keep = max(1, n_keep)
        if n_keep >= size:
            continue
        members = _member_counts(analysis, g)
        left = [total for total, _ in members]
        order = np.argsort(scores[g], kind="stable")
        removed = []
        for ch in order:
            if size - len(removed) <= n_keep:
                break
            if all(left[k] - cnt[ch] > 0 for k, (_, cnt) in enumerate(members)):
                for k, (_, cnt) in enumerate(members):
                    left[k] -= cnt[ch]
                removed.append(int(ch))
        if removed:
            keep[g] = sorted(set(range(size)) - set(removed))
    opts = {"ratio": dict(ratio) if isinstance(ratio, dict) else ratio, "round_to": round_to,
            "exact_only": exact_only, **(options or {})}
    return Plan(keep, {g: sizes[g] for g in keep}, criterion, opts,
                model_sha256(analysis.model))
