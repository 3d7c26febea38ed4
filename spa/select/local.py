"""Local selection: remove the same fraction of channels from every prunable group."""
from __future__ import annotations

import math

import numpy as np

from ..plan import Plan, model_sha256
from .align import option as _round_option, units as _units


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


def uniform(analysis, scores: list[np.ndarray], ratio, *, round_to=1,
            exact_only: bool = False, criterion: str = "l2", options: dict | None = None) -> Plan:
    """Keep the highest-scored (1 - ratio) of every group, never emptying a tensor.
    `ratio` may be a dict {group kind: ratio} ("channels", "heads", "groups"; kinds it
    does not name lose nothing), e.g. a third of the attention heads and half of the FFN
    channels of a transformer: {"heads": 1/3, "channels": 0.5}. `round_to`: an integer
    (kept counts of groups of at least that many channels are rounded up to a multiple of
    it) or one multiple per group (spa.select.align.group_alignment)."""
    keep, sizes = {}, {}
    unit = _units(analysis, round_to)
    for g, grp in enumerate(analysis.groups):
        size = grp.channels
        sizes[g] = size
        if exact_only and not grp.exact:
            continue
        r = ratio.get(grp.kind, 0.0) if isinstance(ratio, dict) else ratio
        n_keep = size - int(math.floor(r * size + 1e-9))
        u = unit[g]
        if u > 1 and size >= u:
            n_keep = min(size, max(u, int(math.ceil(n_keep / u)) * u))
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
    opts = {"ratio": dict(ratio) if isinstance(ratio, dict) else ratio,
            "round_to": _round_option(round_to), "exact_only": exact_only, **(options or {})}
    return Plan(keep, {g: sizes[g] for g in keep}, criterion, opts,
                model_sha256(analysis.model))


def global_ratio(analysis, scores: list[np.ndarray], ratio, *, normalize: str = "mean",
                 max_group_loss: float = 0.9, round_to=1, exact_only: bool = False,
                 criterion: str = "l2", options: dict | None = None) -> Plan:
    """Remove `ratio` of the channels of each group kind, ranked across groups: the
    scores (normalised per group by `normalize`, see spa.criteria.aggregate.normalize) of
    all groups of one kind go into one ascending order, and channels leave in that order
    until that kind has lost floor(ratio · its channels), so the criterion decides how much
    each group loses. `ratio` is a float (every kind) or a dict {kind: ratio} like
    `uniform`'s. A group loses at most floor(max_group_loss · size) channels, keeps at
    least one, and never empties a member tensor; with `round_to` > 1 the kept count of a
    group is rounded up to a multiple of round_to (groups of at least round_to channels),
    so a kind can lose a little less than asked (round_to may also be one multiple per
    group, spa.select.align.group_alignment). What each kind lost is recorded in the
    plan's options (`achieved`)."""
    from ..criteria.aggregate import normalize as norm
    if not 0.0 <= max_group_loss <= 1.0:
        from ..errors import UsageError
        raise UsageError(f"--max-group-loss must be in [0, 1], got {max_group_loss}")
    removed: dict[int, list[int]] = {}
    achieved = {}
    unit = _units(analysis, round_to)
    for kind in sorted({g.kind for g in analysis.groups}):
        r = ratio.get(kind, 0.0) if isinstance(ratio, dict) else ratio
        gs = [g for g, grp in enumerate(analysis.groups) if grp.kind == kind and
              not (exact_only and not grp.exact)]
        total = sum(analysis.groups[g].channels for g in
                    range(len(analysis.groups)) if analysis.groups[g].kind == kind)
        want = int(math.floor(r * total + 1e-9))
        if not gs or want == 0:
            continue
        pool = np.concatenate([norm(scores[g], normalize) for g in gs])
        owner = np.concatenate([np.full(analysis.groups[g].channels, g) for g in gs])
        local = np.concatenate([np.arange(analysis.groups[g].channels) for g in gs])
        left = {g: [t for t, _ in _member_counts(analysis, g)] for g in gs}
        cap = {g: min(analysis.groups[g].channels - 1,
                      int(math.floor(max_group_loss * analysis.groups[g].channels + 1e-9)))
               for g in gs}
        got = 0
        for k in np.argsort(pool, kind="stable"):
            if got == want:
                break
            g, ch = int(owner[k]), int(local[k])
            rm = removed.setdefault(g, [])
            if len(rm) >= cap[g]:
                continue
            members = _member_counts(analysis, g)
            if not all(left[g][m] - cnt[ch] > 0 for m, (_, cnt) in enumerate(members)):
                continue
            for m, (_, cnt) in enumerate(members):
                left[g][m] -= cnt[ch]
            rm.append(ch)
            got += 1
        for g in gs:
            size = analysis.groups[g].channels
            rm = removed.get(g, [])
            u = unit[g]
            if u > 1 and size >= u and rm:
                n_keep = int(math.ceil((size - len(rm)) / u)) * u
                del rm[max(0, size - n_keep):]    # the last removed are the most important
            if not rm:
                removed.pop(g, None)
        achieved[kind] = round(sum(len(removed.get(g, [])) for g in gs) / total, 6)
    keep = {g: sorted(set(range(analysis.groups[g].channels)) - set(rm))
            for g, rm in removed.items()}
    opts = {"ratio": dict(ratio) if isinstance(ratio, dict) else ratio, "select": "global",
            "normalize": normalize, "max_group_loss": max_group_loss,
            "round_to": _round_option(round_to), "exact_only": exact_only,
            "achieved": achieved, **(options or {})}
    return Plan(keep, {g: analysis.groups[g].channels for g in keep}, criterion, opts,
                model_sha256(analysis.model))
