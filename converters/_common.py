"""Helpers shared by the framework converters (no framework imported here)."""
from __future__ import annotations

import os


def as_model(model):
    """A spa Model from a path, or the model itself."""
    import spa

    if isinstance(model, (str, os.PathLike)):
        return spa.load(str(model))
    return model


def as_plan(plan):
    """A spa Plan from a path, a JSON dict, or the plan itself."""
    from spa.plan import Plan

    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(str(plan))
    if isinstance(plan, dict):
        return Plan.from_json(plan)
    return plan
