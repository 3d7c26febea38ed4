"""Selections: turn per-channel scores into a plan.

local.uniform  the same fraction of every group (--ratio)
local.global_ratio  a fraction of each group kind, ranked across its groups (--ratio, global)
global_rank    one ranking of all normalised scores, cut where the plan's cost meets a target
knapsack       maximise kept importance under the cost target (MILP, HiGHS)
"""
from .local import global_ratio, uniform
from .global_ import (global_rank, uniform_for_target, parse_target, normalize, Target,
                      NORMALIZERS)
from .knapsack import knapsack

SELECTIONS = ("uniform", "global", "knapsack")

__all__ = ["uniform", "global_ratio", "uniform_for_target", "global_rank", "knapsack",
           "parse_target", "normalize", "Target", "NORMALIZERS", "SELECTIONS"]
