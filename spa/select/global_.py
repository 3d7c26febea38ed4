"""Global selection under a budget: one ranking of all channels, cut where the plan's true
cost meets the target.

Scores are normalised per group (so that a wide residual stream and a narrow bottleneck
compare), all channels are put in one ascending order, and channels are removed in that
order -- skipping those the group constraints forbid -- until the exact cost of the plan
(spa.cost, which is not additive: a conv costs in x out) is at most `fraction` of the
original. The removal sequence is built once; every prefix of it is a valid plan and the
cost of a prefix only falls as it grows, so the cut is found by bisection over prefixes with
the exact cost, then refined: when the last step jumps past the window, the single next
step of every group is tried instead and the closest one below the target kept.

The building blocks here (targets, normalisations, group constraints and step sequences) are
shared with the knapsack selection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..cost import METRIC_ALIASES, cost_model
from ..criteria.aggregate import NORMALIZERS, normalize  # the per-group step, shared
from ..errors import UsageError
from ..plan import Plan, model_sha256
from .align import option as _round_option, units as _units
from .local import _member_counts

#: the result lands in [fraction - TOLERANCE, fraction] of the original cost
TOLERANCE = 0.02


@dataclass(frozen=True)
class Target:
    """A budget: keep at most `fraction` of the original `name` (flops, params, ...)."""
    name: str
    fraction: float

    @property
    def metric(self) -> str:
        return METRIC_ALIASES[self.name]

    def to_json(self) -> dict:
        return {"metric": self.name, "fraction": self.fraction}


def parse_target(spec) -> Target:
    """'flops:0.5', ('params', 0.3) or a Target -> Target; UsageError when malformed."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, str):
        name, sep, value = spec.partition(":")
        if not sep:
            raise UsageError(f"malformed target {spec!r}: expected METRIC:FRACTION, e.g. "
                             "flops:0.5 or params:0.3")
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        name, value = spec
    else:
        raise UsageError(f"malformed target {spec!r}: expected METRIC:FRACTION")
    name = str(name).strip().lower()
    if name not in METRIC_ALIASES:
        raise UsageError(f"unknown target metric {name!r} (use one of "
                         f"{', '.join(sorted(METRIC_ALIASES))})")
    try:
        frac = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"malformed target fraction {value!r}: expected a number in (0, 1]")
    if not (0.0 < frac <= 1.0) or math.isnan(frac):
        raise UsageError(f"target fraction must be in (0, 1], got {value!r}")
    return Target(name, frac)


class Constraints:
    """What a selection may remove: per group, at least one channel (and at least
    1 - max_group_loss of them) stays, group sizes stay multiples of round_to, and no
    member dim loses all its elements. Removals come in *steps* (one channel, or a chunk
    that moves a group from one multiple of round_to to the next), so that every prefix of
    a step sequence is a valid plan. `round_to` is an integer (every group of at least that
    many channels) or one multiple per group (spa.select.align.group_alignment)."""

    def __init__(self, analysis, *, max_group_loss: float = 0.9, round_to=1,
                 exact_only: bool = False):
        if not 0.0 <= max_group_loss < 1.0:
            raise UsageError(f"max_group_loss must be in [0, 1), got {max_group_loss}")
        align = _units(analysis, round_to)
        self.analysis = analysis
        n_groups = len(analysis.groups)
        self.size = np.array([g.channels for g in analysis.groups], np.int64)
        self.unit = np.ones(n_groups, np.int64)
        self.min_keep = self.size.copy()
        self.eligible = np.zeros(n_groups, bool)
        self.danger: dict[int, list[tuple[int, np.ndarray]]] = {}
        for g, grp in enumerate(analysis.groups):
            size = grp.channels
            if size < 2 or (exact_only and not grp.exact):
                continue
            u = align[g] if size >= align[g] else 1
            keep = max(1, size - int(math.floor(max_group_loss * size + 1e-9)))
            keep = min(size, int(math.ceil(keep / u)) * u)
            if keep >= size:
                continue
            self.unit[g], self.min_keep[g], self.eligible[g] = u, keep, True
            # members that could be emptied while a channel stays: one some channels
            # own nothing of, and that the group's channels cover entirely
            d = [(total, cnt) for total, cnt in _member_counts(analysis, g)
                 if cnt.sum() >= total and (cnt == 0).any()]
            if d:
                self.danger[g] = d
        self.options = {"max_group_loss": max_group_loss,
                        "round_to": _round_option(round_to), "exact_only": exact_only}

    def channels(self) -> np.ndarray:
        """Global ids of the channels a selection may remove."""
        a = self.analysis
        ids = [a.group_chans[g] for g in np.nonzero(self.eligible)[0]]
        return np.concatenate(ids) if ids else np.zeros(0, np.int64)

    def removal_steps(self, priority, removed=None) -> list[np.ndarray]:
        """Removal steps in `priority` order (global channel ids, first = first to go),
        starting from the plan that removes `removed` (a boolean mask, default nothing)."""
        a = self.analysis
        gof, loc = a.group_of_chan, a.local_of_chan
        removed = np.zeros(a.n_channels, bool) if removed is None else removed
        priority = np.asarray(priority, np.int64)
        priority = priority[self.eligible[gof[priority]] & ~removed[priority]]
        kept = self.size - np.bincount(gof[removed], minlength=len(self.size))
        if (self.unit[gof[priority]] == 1).all() and \
                not any(g in self.danger for g in np.unique(gof[priority]).tolist()):
            # one channel per step and no member at risk: the k-th channel of a group in
            # priority order may go while k < kept - min_keep (vectorised)
            g = gof[priority]
            order = np.argsort(g, kind="stable")
            rank = np.empty(len(g), np.int64)
            gs = g[order]
            starts = np.searchsorted(gs, gs, side="left")
            rank[order] = np.arange(len(g)) - starts
            ok = rank < (kept - self.min_keep)[g]
            return [np.array([c]) for c in priority[ok].tolist()]
        need = np.where((kept == self.size) & (self.size % self.unit != 0),
                        self.size % self.unit, self.unit)
        left = {}
        for g, ms in self.danger.items():
            rm_local = loc[a.group_chans[g][removed[a.group_chans[g]]]]
            left[g] = [total - int(cnt[rm_local].sum()) for total, cnt in ms]
        pending: dict[int, list[int]] = {}
        steps = []
        for c in priority.tolist():
            g = int(gof[c])
            p = pending.setdefault(g, [])
            if kept[g] - len(p) - 1 < self.min_keep[g]:
                continue
            if g in left:
                j = int(loc[c])
                ms = self.danger[g]
                if any(left[g][k] - cnt[j] <= 0 for k, (_, cnt) in enumerate(ms)):
                    continue
                for k, (_, cnt) in enumerate(ms):
                    left[g][k] -= int(cnt[j])
            p.append(c)
            if len(p) == need[g]:
                steps.append(np.array(p, np.int64))
                kept[g] -= len(p)
                need[g] = self.unit[g]
                pending[g] = []
        return steps

    def restore_steps(self, priority, removed) -> list[np.ndarray]:
        """Steps that bring removed channels back, in `priority` order (first = first
        back), keeping group sizes multiples of round_to (or whole)."""
        a = self.analysis
        gof = a.group_of_chan
        kept = self.size - np.bincount(gof[removed], minlength=len(self.size))
        pending: dict[int, list[int]] = {}
        steps = []
        for c in np.asarray(priority, np.int64).tolist():
            g = int(gof[c])
            if not removed[c]:
                continue
            p = pending.setdefault(g, [])
            p.append(c)
            if len(p) == min(self.unit[g], self.size[g] - kept[g]):
                steps.append(np.array(p, np.int64))
                kept[g] += len(p)
                pending[g] = []
        return steps

    def plan(self, removed: np.ndarray, criterion: str, options: dict) -> Plan:
        a = self.analysis
        keep, sizes = {}, {}
        for g in np.nonzero(self.eligible)[0].tolist():
            chans = a.group_chans[g]
            gone = removed[chans]
            if gone.any():
                keep[g] = np.nonzero(~gone)[0].tolist()
                sizes[g] = int(self.size[g])
        return Plan(keep, sizes, criterion, {**self.options, **options},
                    model_sha256(a.model))


def normalized(analysis, scores, how: str) -> np.ndarray:
    """Normalised score of every global channel."""
    out = np.zeros(analysis.n_channels)
    for g, chans in enumerate(analysis.group_chans):
        out[chans] = normalize(scores[g], how)
    return out


class Stepper:
    """Exact cost of `base` plus the first k steps, with a cache and bisection."""

    def __init__(self, cm, metric: str, base: np.ndarray, steps: list[np.ndarray], sign: int):
        self.cm, self.metric, self.base, self.steps = cm, metric, base, steps
        self.value = not sign < 0   # True: steps remove channels; False: they restore them
        self.flat = np.concatenate(steps) if steps else np.zeros(0, np.int64)
        self.end = np.cumsum([0] + [len(x) for x in steps])
        self.cache: dict[int, int] = {}
        self.evals = 0

    def mask(self, k: int) -> np.ndarray:
        m = self.base.copy()
        m[self.flat[:self.end[k]]] = self.value
        return m

    def cost(self, k: int) -> int:
        if k not in self.cache:
            self.evals += 1
            self.cache[k] = self.cm.evaluate(self.mask(k), (self.metric,))[self.metric]
        return self.cache[k]

    def first_at_most(self, limit: float) -> int | None:
        """Smallest k whose cost <= limit (costs fall with k), None if even all exceed."""
        n = len(self.steps)
        if self.cost(n) > limit:
            return None
        lo, hi = 0, n          # cost(hi) <= limit
        if self.cost(0) <= limit:
            return 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.cost(mid) <= limit:
                hi = mid
            else:
                lo = mid
        return hi

    def last_at_most(self, limit: float) -> int:
        """Largest k whose cost <= limit (costs rise with k; cost(0) <= limit)."""
        n = len(self.steps)
        if self.cost(n) <= limit:
            return n
        lo, hi = 0, n          # cost(lo) <= limit < cost(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.cost(mid) <= limit:
                lo = mid
            else:
                hi = mid
        return lo


def unreachable(target: Target, best: float) -> UsageError:
    return UsageError(f"target {target.name}:{target.fraction:g} cannot be met: with the "
                      f"group constraints at most {1 - best:.1%} of the {target.name} can go "
                      f"(reachable: {best:.3f}); raise the target, max_group_loss, "
                      "prune approximate groups too, or lower --round-to (the default "
                      "'auto' keeps convolution widths at multiples of the channel block; "
                      "--round-to 1 gives exact counts, which run slower)")


def refine(cm, metric: str, cons: Constraints, removed: np.ndarray, over: np.ndarray,
           limit: float, floor: float, score: np.ndarray, priority) -> np.ndarray:
    """`removed` costs more than `limit`, `over` (removed plus one more step) less than
    `floor`: try the next step of every group from `removed` instead and keep the one that
    lands highest at or under `limit` (the least important one inside the window)."""
    best, best_key = over, (0, cm.evaluate(over, (metric,))[metric])
    seen = set()
    for step in cons.removal_steps(priority, removed):
        g = int(cons.analysis.group_of_chan[step[0]])
        if g in seen:
            continue
        seen.add(g)
        m = removed.copy()
        m[step] = True
        c = cm.evaluate(m, (metric,))[metric]
        if c > limit:
            continue
        key = (1, -float(score[step].sum())) if c >= floor else (0, c)
        if key > best_key:
            best, best_key = m, key
    return best


def global_rank(analysis, scores: list[np.ndarray], target, *, normalize: str = "mean",
                max_group_loss: float = 0.9, round_to=1, exact_only: bool = False,
                tolerance: float = TOLERANCE, criterion: str = "l2",
                options: dict | None = None) -> Plan:
    """Remove the globally least important channels until the plan's cost is at most the
    target fraction of the original (and, where the steps allow, within `tolerance` of it).
    The plan's options record the target and the fraction achieved."""
    target = parse_target(target)
    if normalize not in NORMALIZERS:
        raise UsageError(f"unknown normalisation {normalize!r} (use one of "
                         f"{', '.join(NORMALIZERS)})")
    cm = cost_model(analysis)
    metric = target.metric
    base = cm.original[metric]
    limit, floor = target.fraction * base, (target.fraction - tolerance) * base
    cons = Constraints(analysis, max_group_loss=max_group_loss, round_to=round_to,
                       exact_only=exact_only)
    score = normalized(analysis, scores, normalize)
    chans = cons.channels()
    priority = chans[np.lexsort((chans, score[chans]))]
    steps = cons.removal_steps(priority)
    st = Stepper(cm, metric, np.zeros(analysis.n_channels, bool), steps, +1)
    k = st.first_at_most(limit)
    if k is None:
        raise unreachable(target, st.cost(len(steps)) / max(base, 1))
    removed = st.mask(k)
    if k > 0 and st.cost(k) < floor:
        removed = refine(cm, metric, cons, st.mask(k - 1), removed, limit, floor, score,
                         priority)
    achieved = cm.evaluate(removed, (metric,))[metric] / max(base, 1)
    opts = {"select": "global", "normalize": normalize, "target": target.to_json(),
            "achieved": round(achieved, 6), **(options or {})}
    return cons.plan(removed, criterion, opts)


def uniform_for_target(analysis, scores: list[np.ndarray], target, *,
                       max_group_loss: float = 0.9, round_to=1,
                       exact_only: bool = False, criterion: str = "l2",
                       options: dict | None = None) -> Plan:
    """Local selection under a budget: the smallest ratio (the same for every group, at
    most max_group_loss) whose uniform plan costs at most the target, found by bisection.
    The cost falls in steps as the ratio grows, so the result can land further below the
    target than the global and knapsack selections do."""
    from .local import uniform
    target = parse_target(target)
    cm = cost_model(analysis)
    metric = target.metric
    base = max(cm.original[metric], 1)
    limit = target.fraction * base

    def plan_at(r):
        return uniform(analysis, scores, r, round_to=round_to, exact_only=exact_only,
                       criterion=criterion, options=options)

    def cost_of(p):
        return cm.evaluate(p.removed(analysis), (metric,))[metric]

    hi_plan = plan_at(max_group_loss)
    if cost_of(hi_plan) > limit:
        raise unreachable(target, cost_of(hi_plan) / base)
    lo, hi = 0.0, max_group_loss
    if cm.original[metric] <= limit:
        hi, hi_plan = 0.0, plan_at(0.0)
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        p = plan_at(mid)
        if cost_of(p) <= limit:
            hi, hi_plan = mid, p
        else:
            lo = mid
    achieved = cost_of(hi_plan) / base
    hi_plan.options.update({"select": "uniform", "target": target.to_json(),
                            "achieved": round(achieved, 6), "ratio": round(hi, 6)})
    return hi_plan
