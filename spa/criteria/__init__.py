"""Importance criteria. Each scores member slices; `group_scores` maps them onto each
group's channels and aggregates (here: sum over members)."""
from .magnitude import score, CRITERIA

__all__ = ["score", "CRITERIA"]
