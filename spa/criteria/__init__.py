"""Importance criteria (docs/criteria.md).

Every criterion but obspa scores *member slices* -- (tensor, axis) slices of the parameters
a channel owns -- and one shared step (spa.criteria.aggregate) maps them onto each group's
channels through concat offsets, flatten blocks and head blocks, and aggregates them (sum,
mean, max, prod, first). `score` returns those per-group scores; `normalize` (applied by the
global selections, or by `importance`) makes groups comparable.

Gradient criteria need statistics from spa.engine on calibration data: `spa.prune(...,
criterion="taylor", calib=...)` computes them and attaches them to the analysis, or pass
`stats=` here. obspa needs its calibration too (spa.criteria.obspa.Obspa, attached by
spa.prune).
"""
from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .aggregate import AGGREGATIONS, NORMALIZERS, member_pairs, normalize
from .core import Context, Criterion, group_scores
from .gradient import CRITERIA as _GRADIENT
from .magnitude import CRITERIA as _DATA_FREE
from .obspa import CRITERIA as _OBSPA

REGISTRY: dict[str, Criterion] = {**_DATA_FREE, **_GRADIENT}
#: every criterion name, in the order the CLI lists them
CRITERIA = tuple(REGISTRY) + _OBSPA
#: criteria that need calibration data
DATA_CRITERIA = tuple(_GRADIENT) + _OBSPA


def get(criterion: str) -> Criterion:
    c = REGISTRY.get(criterion)
    if c is None:
        raise UsageError(f"unknown criterion {criterion!r} (use one of {', '.join(CRITERIA)})")
    return c


def default_normalize(criterion: str) -> str:
    """The per-group normalisation a criterion's scores need under global selection."""
    if criterion in _OBSPA:
        return "none"  # relative output errors: comparable already
    return get(criterion).default_normalize


def evaluate(analysis, criterion: str = "l2", *, seed: int = 0, aggregate: str = "sum",
             stats=None) -> tuple[list[np.ndarray], list[str]]:
    """Per-group channel scores (higher = keep) and notes about how they were made."""
    if aggregate not in AGGREGATIONS:
        raise UsageError(f"unknown aggregation {aggregate!r} (use one of "
                         f"{', '.join(AGGREGATIONS)})")
    if criterion in _OBSPA:
        ob = analysis.__dict__.get("_obspa")
        if ob is None:
            raise UsageError("criterion 'obspa' needs its calibration first: use "
                             "spa.prune(..., criterion='obspa', calib=...) or attach a "
                             "spa.criteria.obspa.Obspa to the analysis")
        return ob.scores(), []
    crit = get(criterion)
    if crit.needs:
        stats = analysis.__dict__.get("_gradients") if stats is None else stats
        if stats is None:
            raise UsageError(f"criterion {criterion!r} needs gradients on calibration data: "
                             "give --calib FILE.npz (spa.prune(..., calib=...))")
        lacking = [k for k in crit.needs if getattr(stats, k, None) is None]
        if lacking:
            raise UsageError(f"criterion {criterion!r} needs gradient statistics "
                             f"{', '.join(lacking)} that were not computed (compute_stats "
                             f"with needs={crit.needs})")
    ctx = Context(analysis, seed=seed, stats=stats)
    return group_scores(crit, ctx, aggregate), ctx.notes


def score(analysis, criterion: str = "l2", seed: int = 0, *, aggregate: str = "sum",
          stats=None) -> list[np.ndarray]:
    """Importance of every channel of every group (higher = keep), not normalised."""
    return evaluate(analysis, criterion, seed=seed, aggregate=aggregate, stats=stats)[0]


def importance(analysis, criterion: str = "l2", *, seed: int = 0, aggregate: str = "sum",
               normalization: str | None = None, stats=None) -> list[np.ndarray]:
    """Scores normalised per group (default: the criterion's own normalisation), comparable
    across groups."""
    how = default_normalize(criterion) if normalization is None else normalization
    return [normalize(s, how) for s in score(analysis, criterion, seed, aggregate=aggregate,
                                             stats=stats)]


__all__ = ["score", "evaluate", "importance", "normalize", "member_pairs",
           "CRITERIA", "DATA_CRITERIA", "AGGREGATIONS", "NORMALIZERS", "REGISTRY", "get",
           "default_normalize"]
