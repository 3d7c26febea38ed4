"""Knapsack selection: keep the most (normalised) importance that fits the budget.

A 0/1 mixed-integer program over channels, solved with HiGHS (scipy.optimize.milp):

    maximise    sum_c w_c x_c                       x_c = 1: channel c stays
    subject to  C(x0) + sum_c a_c (x_c - x0_c) <= B   the cost, linearised at x0
                sum_{c in g} x_c >= keep_g              every group keeps >= 1 channel and
                                                        >= (1 - max_group_loss) of them
                sum_{c in g} n_mc x_c >= N_m - L_m + 1  no member dim m emptied
                sum_{c in g} x_c = u k_g (+ r_g f_g)    group sizes multiples of u_g, the
                                                        group's round_to (spa.select.align),
                                                        or the whole group; k_g integer

The cost is not linear in the channels (a conv costs in x out), so it is linearised at a
plan x0 (nothing removed) -- a_c is the first-order drop of the true cost when channel c
goes, from spa.cost -- and the *linear budget* B is corrected until the true cost of the
solution lands in the window [F - tolerance, F]: the first solve aims at F - tolerance/4,
each next B moves by the miss times the secant slope of true cost over B, kept inside the
bracket of budgets known to be too low and too high (a few solves; true cost rises with B
almost monotonically, which the bracket makes safe). Linearising again at the solution
(`relinearize=2`) is possible, but the program then jumps far from the point it was
linearised at and, on the zoo and ResNet-50, it rarely found a better plan at twice the
time, so it is off by default. Whatever the solves gave is finally *repaired* with the
exact cost: channels go (or come back) in order of importance per unit of cost, with the cut
found by bisection, so the result is never above the target.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix, csr_matrix, vstack

from ..cost import cost_model
from ..errors import UsageError
from .global_ import (NORMALIZERS, TOLERANCE, Constraints, Stepper, normalized,
                      parse_target, refine, unreachable)


class _Program:
    """The constraint rows that do not change between rounds, and the variables."""

    def __init__(self, cons: Constraints):
        a = cons.analysis
        self.cons = cons
        self.chans = cons.channels()                      # variable j <-> channel chans[j]
        n = self.n = len(self.chans)
        var_of = np.full(a.n_channels, -1, np.int64)
        var_of[self.chans] = np.arange(n)
        self.var_of = var_of
        rows, cols, vals, lb, ub = [], [], [], [], []
        integ = [1] * n
        lo_b, hi_b = [0.0] * n, [1.0] * n
        r = 0
        for g in np.nonzero(cons.eligible)[0].tolist():
            gv = var_of[a.group_chans[g]]
            size, u, keep = int(cons.size[g]), int(cons.unit[g]), int(cons.min_keep[g])
            if u == 1:
                rows += [r] * len(gv); cols += gv.tolist(); vals += [1.0] * len(gv)
                lb.append(keep); ub.append(size); r += 1
            else:
                # sum x - u k - rem f = 0, with k >= K f so that f = 1 only for the whole
                whole, rem = size // u, size % u
                k = len(lo_b)
                integ.append(1); lo_b.append(keep // u); hi_b.append(whole)
                rows += [r] * (len(gv) + 1); cols += gv.tolist() + [k]
                vals += [1.0] * len(gv) + [-float(u)]
                if rem:
                    f = len(lo_b)
                    integ.append(1); lo_b.append(0.0); hi_b.append(1.0)
                    rows.append(r); cols.append(f); vals.append(-float(rem))
                    lb.append(0.0); ub.append(0.0); r += 1
                    rows += [r, r]; cols += [k, f]; vals += [1.0, -float(whole)]
                    lb.append(0.0); ub.append(np.inf); r += 1
                else:
                    lb.append(0.0); ub.append(0.0); r += 1
            for total, cnt in cons.danger.get(g, []):
                nz = np.nonzero(cnt)[0]
                rows += [r] * len(nz); cols += gv[nz].tolist(); vals += cnt[nz].tolist()
                lb.append(float(cnt.sum() - total + 1)); ub.append(np.inf); r += 1
        self.n_vars = len(lo_b)
        self.fixed = (coo_matrix((vals, (rows, cols)), shape=(r, self.n_vars)).tocsr(),
                      np.array(lb, float), np.array(ub, float))
        self.integrality = np.array(integ)
        self.bounds = Bounds(np.array(lo_b), np.array(hi_b))

    def solve(self, w: np.ndarray, a: np.ndarray, rhs: float, time_limit: float,
              core: int = 128):
        """max w.x s.t. a.x <= rhs and the fixed rows; returns x over channels or None.

        HiGHS is slow on knapsacks with thousands of binaries, so the program is solved on
        its *core*: the LP relaxation is solved first, every variable whose reduced cost
        exceeds a threshold is fixed at its LP value, and the MILP runs on the rest (the
        `core` variables nearest the LP's cut). The result is optimal for the whole program
        when the restricted optimum is within the smallest fixed reduced cost of the LP
        bound (any solution that flips a fixed variable is worse than the LP bound by at
        least its reduced cost); otherwise the core grows fourfold, the MILP runs once
        more, and the better of the two solutions is kept."""
        c = np.zeros(self.n_vars)
        c[:self.n] = -w
        A, lb, ub = self.fixed
        A_all = vstack([csr_matrix(np.concatenate([a, np.zeros(self.n_vars - self.n)])[None]),
                        A]).tocsr()
        lb_all = np.concatenate([[-np.inf], lb])
        ub_all = np.concatenate([[rhs], ub])
        eq = lb_all == ub_all
        up = ~eq & np.isfinite(ub_all)
        lo = ~eq & np.isfinite(lb_all)
        lp = linprog(c, A_ub=vstack([A_all[up], -A_all[lo]]).tocsr() if (up | lo).any()
                     else None,
                     b_ub=np.concatenate([ub_all[up], -lb_all[lo]]) if (up | lo).any()
                     else None,
                     A_eq=A_all[eq] if eq.any() else None,
                     b_eq=ub_all[eq] if eq.any() else None,
                     bounds=list(zip(self.bounds.lb, self.bounds.ub)), method="highs")
        if lp.status != 0:
            return None
        z_lp = float(lp.fun)
        red = np.abs(lp.lower.marginals) + np.abs(lp.upper.marginals)
        xl = lp.x
        frac = np.abs(xl - np.rint(xl)) > 1e-9
        binary = np.zeros(self.n_vars, bool)
        binary[:self.n] = True
        cons = [LinearConstraint(A_all, lb_all, ub_all)]
        best = None
        for tries in range(2):
            cand = binary & ~frac
            order = np.argsort(red[cand], kind="stable")
            idx = np.nonzero(cand)[0][order]
            fix = idx[core:]
            lo_b, hi_b = self.bounds.lb.copy(), self.bounds.ub.copy()
            lo_b[fix] = hi_b[fix] = np.rint(xl[fix])
            res = milp(c, integrality=self.integrality, bounds=Bounds(lo_b, hi_b),
                       constraints=cons, options={"time_limit": time_limit,
                                                  "mip_rel_gap": 1e-3, "disp": False})
            if res.x is not None:
                if best is None or res.fun < best[0]:
                    best = (float(res.fun), np.rint(res.x[:self.n]).astype(bool))
                margin = float(red[fix].min()) if len(fix) else np.inf
                if best[0] - z_lp <= margin:
                    break       # no solution flipping a fixed variable can be better
            if not len(fix):
                break
            core *= 4
        return None if best is None else best[1]


def knapsack(analysis, scores: list[np.ndarray], target, *, normalize: str = "mean",
             max_group_loss: float = 0.9, round_to=1, exact_only: bool = False,
             tolerance: float = TOLERANCE, max_iter: int = 6, relinearize: int = 1,
             time_limit: float = 10.0, criterion: str = "l2", options: dict | None = None):
    """Maximise kept normalised importance subject to cost <= fraction x original (and,
    where the channels allow, >= fraction - tolerance). Returns a Plan whose options record
    the target, the fraction achieved, the MILP solves and the true cost after each."""
    target = parse_target(target)
    if normalize not in NORMALIZERS:
        raise UsageError(f"unknown normalisation {normalize!r} (use one of "
                         f"{', '.join(NORMALIZERS)})")
    cm = cost_model(analysis)
    metric = target.metric
    base = max(cm.original[metric], 1)
    limit, floor = target.fraction * base, (target.fraction - tolerance) * base
    aim = (target.fraction - tolerance / 4) * base
    cons = Constraints(analysis, max_group_loss=max_group_loss, round_to=round_to,
                       exact_only=exact_only)
    score = normalized(analysis, scores, normalize)
    prog = _Program(cons)
    chans = prog.chans
    if len(chans) and score[chans].min() <= 0:  # importance must be positive, or dropping
        lo_s = score[chans].min()               # a channel would pay by itself
        score = score - lo_s + 1e-3 * max(float(np.ptp(score[chans])), 1e-9)
    w = score[chans]
    n = analysis.n_channels
    history = []
    if floor <= cm.original[metric] <= limit:     # nothing needs to go
        relinearize = 0
    best = None       # (key, removed mask, true cost); key ranks in-window by importance
    point = np.zeros(n, bool)
    for _ in range(relinearize):
        # the cost linearised at `point`; the linear budget b is corrected (secant steps
        # inside a bracket) until the true cost of the solution lands in the window
        cost_p, saving = cm.linearize(point, metric)
        a = saving[chans] / base
        const = float(a @ ~point[chans]) - cost_p / base
        b, lo_b, hi_b, prev = aim, None, None, None
        found = False
        for _ in range(max_iter):
            x = prog.solve(w, a, b / base + const, time_limit)
            if x is None:                    # budget below what the constraints allow
                lo_b = b
                nb = b + 0.5 * abs(aim - cost_p) + tolerance * base
            else:
                nxt = np.zeros(n, bool)
                nxt[chans[~x]] = True
                c = cm.evaluate(nxt, (metric,))[metric]
                history.append(round(c / base, 6))
                inside = floor <= c <= limit
                key = (inside, float(w @ x) if inside else -abs(c - aim))
                if best is None or key > best[0]:
                    best = (key, nxt, c)
                if inside:
                    found = True
                    break
                if c > limit:
                    hi_b = b
                else:
                    lo_b = b
                slope = 1.0
                if prev is not None and prev[1] != c and prev[0] != b:
                    slope = (prev[0] - b) / (prev[1] - c)
                    slope = min(max(slope, 0.1), 10.0)
                prev = (b, c)
                nb = b + slope * (aim - c)
            if lo_b is not None and hi_b is not None and not lo_b < nb < hi_b:
                nb = (lo_b + hi_b) / 2
            b = nb
        if not found:
            break
        point = best[1]
    if best is None:
        removed, c = np.zeros(n, bool), cm.original[metric]
    else:
        _, removed, c = best
    removed = _repair(cm, metric, cons, removed, c, limit, floor, score, target, base)
    achieved = cm.evaluate(removed, (metric,))[metric] / base
    opts = {"select": "knapsack", "normalize": normalize, "target": target.to_json(),
            "achieved": round(achieved, 6), "solves": history, **(options or {})}
    return cons.plan(removed, criterion, opts)


def _repair(cm, metric, cons, removed, c, limit, floor, score, target, base):
    """Make the solution meet the budget exactly: while it costs too much, channels go in
    order of importance per unit of cost saved; then, while budget is left, removed channels
    come back in the opposite order (each cut found by bisection with the exact cost)."""
    _, saving = cm.linearize(removed, metric)
    ratio = score / np.maximum(saving, 1e-12 * base)
    if c > limit:
        chans = cons.channels()
        chans = chans[~removed[chans]]
        priority = chans[np.lexsort((chans, ratio[chans]))]
        st = Stepper(cm, metric, removed, cons.removal_steps(priority, removed), +1)
        k = st.first_at_most(limit)
        if k is None:
            raise unreachable(target, st.cost(len(st.steps)) / base)
        out = st.mask(k)
        if k > 0 and st.cost(k) < floor:
            out = refine(cm, metric, cons, st.mask(k - 1), out, limit, floor, score, priority)
        return out
    back = np.nonzero(removed)[0]
    if not len(back):
        return removed
    priority = back[np.lexsort((back, -ratio[back]))]
    st = Stepper(cm, metric, removed, cons.restore_steps(priority, removed), -1)
    return st.mask(st.last_at_most(limit))
