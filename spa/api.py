"""The library API: what the CLI does, callable from Python on ONNX files."""
from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

from . import cost
from .analysis import analyze, Analysis
from .criteria import score
from .errors import SpaError, UsageError
from .ir import load, save_atomic
from .ir.model import from_proto
from .plan import Plan
from .rewrite.apply import apply_plan, check
from .select import (SELECTIONS, global_rank, knapsack, parse_target, uniform,
                     uniform_for_target)
from .verify import verify as _verify, VerifyResult


@dataclass
class PruneResult:
    plan: Plan
    proto: onnx.ModelProto
    analysis: Analysis
    before: dict
    after: dict
    verify: VerifyResult | None = None

    def report(self) -> dict:
        return {"plan": self.plan.to_json(), "before": self.before, "after": self.after,
                "verify": self.verify.to_json() if self.verify else None,
                "groups_pruned": len(self.plan.keep),
                "groups_total": len(self.analysis.groups),
                "select": self.plan.options.get("select"),
                "target": self.plan.options.get("target"),
                "achieved": self.plan.options.get("achieved")}


def stats(model) -> dict:
    return {"params": cost.params(model), "macs": cost.macs(model)}


def make_plan(model, analysis, *, ratio: float, criterion: str = "l2", round_to: int = 1,
              seed: int = 0, exact_only: bool = False, target=None, select: str = "uniform",
              normalize: str = "mean", max_group_loss: float = 0.9) -> Plan:
    """Score and select. Without `target`: `ratio` of every group (uniform). With `target`
    ("flops:0.5", ("params", 0.3)): the plan costs at most that fraction of the original,
    chosen by `select` (uniform: one ratio found by bisection; global; knapsack)."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise UsageError(f"--round-to must be >= 1, got {round_to}")
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection {select!r} (use one of {', '.join(SELECTIONS)})")
    if target is not None:
        target = parse_target(target)
    elif select != "uniform":
        raise UsageError(f"--select {select} needs a budget: give --target, e.g. flops:0.5")
    scores = score(analysis, criterion, seed=seed)
    if target is None:
        return uniform(analysis, scores, ratio, round_to=round_to, exact_only=exact_only,
                       criterion=criterion, options={"seed": seed})
    kw = dict(max_group_loss=max_group_loss, round_to=round_to, exact_only=exact_only,
              criterion=criterion, options={"seed": seed})
    if select == "uniform":
        return uniform_for_target(analysis, scores, target, **kw)
    fn = global_rank if select == "global" else knapsack
    return fn(analysis, scores, target, normalize=normalize, **kw)


def prune(model, *, ratio: float = 0.5, criterion: str = "l2", round_to: int = 1,
          seed: int = 0, plan: Plan | None = None, do_verify: bool = False,
          exact_only: bool = False, progress=None,
          input_shapes: dict | None = None, target=None, select: str = "uniform",
          normalize: str = "mean", max_group_loss: float = 0.9) -> PruneResult:
    """Analyze, plan (or take the given plan), rewrite and optionally verify a model."""
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    analysis = analyze(model, progress=progress)
    if plan is None:
        plan = make_plan(model, analysis, ratio=ratio, criterion=criterion, round_to=round_to,
                         seed=seed, exact_only=exact_only, target=target, select=select,
                         normalize=normalize, max_group_loss=max_group_loss)
    proto = apply_plan(model, analysis, plan)
    check(proto, model.proto, model.path)
    pruned = from_proto(proto, path=model.path, infer=True)
    result = PruneResult(plan, proto, analysis, stats(model), stats(pruned))
    if do_verify:
        result.verify = _verify(model, proto, analysis, plan, input_shapes=input_shapes)
    return result


def save(proto: onnx.ModelProto, path: str, *, source: str | None = None) -> None:
    if source and os.path.exists(path) and os.path.samefile(path, source):
        raise UsageError("the output path is the input file; SPA never overwrites its input",
                         file=path)
    save_atomic(proto, path)


__all__ = ["load", "analyze", "prune", "make_plan", "save", "stats", "Plan", "SpaError"]
