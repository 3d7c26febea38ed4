"""Importance criteria. Each scores member slices; `group_scores` maps them onto each
group's channels and aggregates (here: sum over members).

obspa needs calibration (spa.criteria.obspa.Obspa); `spa.prune(criterion="obspa",
calib=...)` builds it and attaches it to the analysis, where `score` finds it."""
from . import magnitude
from .magnitude import CRITERIA as _MAGNITUDE
from .obspa import CRITERIA as _OBSPA

CRITERIA = _MAGNITUDE + _OBSPA


def score(analysis, criterion: str = "l2", seed: int = 0):
    """Importance of every channel of every group (higher = keep)."""
    if criterion in _OBSPA:
        from ..errors import UsageError
        ob = analysis.__dict__.get("_obspa")
        if ob is None:
            raise UsageError("criterion 'obspa' needs its calibration first: use "
                             "spa.prune(..., criterion='obspa', calib=...) or attach a "
                             "spa.criteria.obspa.Obspa to the analysis")
        return ob.scores()
    return magnitude.score(analysis, criterion, seed=seed)


__all__ = ["score", "CRITERIA"]
