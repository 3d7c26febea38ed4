"""The library API: what the CLI does, callable from Python on ONNX files."""
from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

from . import cost
from .analysis import analyze, Analysis
from .criteria import (AGGREGATIONS, DATA_CRITERIA, default_normalize, evaluate,
                       get as get_criterion)
from .errors import SpaError, UsageError
from .ir import input_shapes as input_shapes_, load, save_atomic
from .ir.model import from_proto
from .plan import Plan
from .rewrite.apply import apply_plan, check
from .select import (SELECTIONS, global_rank, global_ratio, knapsack, parse_target, uniform,
                     uniform_for_target)
from .select.align import group_alignment, parse_round_to, resolve as resolve_round_to
from .deviation import judge, measure as measure_deviation, Deviation
from .evaluate import GateError
from .rewrite.outputs import check_output_shapes
from .verify import (VerificationError, VerifyResult, divergence_message, exact_part,
                     locate_divergence, verify as _verify)

#: calibration of criterion obspa when none is given (see docs/obspa.md)
DEFAULT_CALIB = "synthetic"


@dataclass
class PruneResult:
    plan: Plan
    proto: onnx.ModelProto
    analysis: Analysis
    before: dict
    after: dict
    verify: VerifyResult | None = None  # the oracle on the exact part of the plan
    obspa: dict | None = None          # criterion obspa: calibration, predicted/measured error
    deviation: Deviation | None = None  # how far the outputs moved (spa.deviation)

    def report(self) -> dict:
        return {"plan": self.plan.to_json(), "before": self.before, "after": self.after,
                **({"obspa": self.obspa} if self.obspa is not None else {}),
                "verify": self.verify.to_json() if self.verify else None,
                "deviation": self.deviation.to_json() if self.deviation else None,
                "groups_pruned": len(self.plan.keep),
                "groups_total": len(self.analysis.groups),
                "select": self.plan.options.get("select"),
                "target": self.plan.options.get("target"),
                "achieved": self.plan.options.get("achieved"),
                "latency": self.plan.options.get("latency")}


def stats(model) -> dict:
    return {"params": cost.params(model), "macs": cost.macs(model)}


def make_plan(model, analysis, *, ratio: float, criterion: str = "l2", round_to="auto",
              seed: int = 0, exact_only: bool = False, target=None, select: str = "uniform",
              normalize: str | None = None, max_group_loss: float = 0.9, latency=None,
              aggregate: str = "sum", stats=None) -> Plan:
    """Score and select. Without `target`: `ratio` of every group (uniform; a dict
    {group kind: ratio} prunes each kind by its own ratio, see `select.uniform`). With `target`
    ("flops:0.5", ("params", 0.3)): the plan costs at most that fraction of the original,
    chosen by `select` (uniform: one ratio found by bisection; global; knapsack).
    "latency:F" predicts latency from tables measured as `latency` (a
    spa.latency.LatencySettings: provider, batch, threads) says. `aggregate` combines the
    member slice scores of a channel, `normalize` (default: the criterion's own, see
    docs/criteria.md) makes groups comparable for the global selections. `round_to`:
    "auto" (widths of the groups whose channels feed a convolution are multiples of the
    channel block of `latency.provider`, default cpu; spa.select.align) or N (every group
    of at least N channels, a multiple of N; 1: exact counts). Gradient
    criteria need `stats` (spa.criteria.gradient.compute_stats; spa.prune computes them
    from `calib` and attaches them to the analysis)."""
    if isinstance(ratio, dict):
        kinds = {g.kind for g in analysis.groups}
        bad = {k: r for k, r in ratio.items() if k not in ("channels", "heads", "groups")
               or not 0.0 <= float(r) < 1.0}
        if bad:
            raise UsageError(f"ratio per group kind must map channels/heads/groups to a "
                             f"value in [0, 1), got {bad} (this model's kinds: "
                             f"{', '.join(sorted(kinds))})")
        if target is not None:
            raise UsageError("a ratio per group kind is a uniform plan: give no target")
    elif not 0.0 <= ratio < 1.0:
        raise UsageError(f"--ratio must be in [0, 1), got {ratio}")
    block, scope = resolve_round_to(round_to, getattr(latency, "provider", "cpu"))
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection {select!r} (use one of {', '.join(SELECTIONS)})")
    if target is not None:
        target = parse_target(target)
        if target.metric == "latency":
            from .latency import LatencySettings, attach
            settings = latency or LatencySettings(align=block)
            if not settings.shapes and getattr(model, "input_shapes", None):
                settings.shapes = model.input_shapes
            attach(model, analysis, settings)
    elif select == "knapsack":
        raise UsageError("--select knapsack needs a budget: give --target, e.g. flops:0.5 "
                         "(with --ratio, --select is uniform or global)")
    normalize = default_normalize(criterion) if normalize is None else normalize
    scores, notes = evaluate(analysis, criterion, seed=seed, aggregate=aggregate, stats=stats)
    options = {"seed": seed, "round_to": block, **({"round_to_scope": scope} if scope else {})}
    round_to = group_alignment(analysis, block, scope)
    if criterion != "obspa":
        options["aggregate"] = aggregate
    grads = analysis.__dict__.get("_gradients") if stats is None else stats
    if grads is not None and criterion != "obspa" and get_criterion(criterion).needs_data:
        options["calib_samples"] = int(getattr(grads, "samples", 0))
        if getattr(grads, "objective", ""):
            options["objective"] = grads.objective
    if notes:
        options["criterion_notes"] = notes
    if target is None and select == "global":
        return global_ratio(analysis, scores, ratio, normalize=normalize,
                            max_group_loss=max_group_loss, round_to=round_to,
                            exact_only=exact_only, criterion=criterion, options=options)
    if target is None:
        return uniform(analysis, scores, ratio, round_to=round_to, exact_only=exact_only,
                       criterion=criterion, options=options)
    kw = dict(max_group_loss=max_group_loss, round_to=round_to, exact_only=exact_only,
              criterion=criterion, options=options)
    if select == "uniform":
        return uniform_for_target(analysis, scores, target, **kw)
    fn = global_rank if select == "global" else knapsack
    return fn(analysis, scores, target, normalize=normalize, **kw)


def prune(model, *, ratio: float = 0.5, criterion: str = "l2", round_to="auto",
          seed: int = 0, plan: Plan | None = None, verify: bool = True,
          do_verify: bool | None = None, exact_only: bool = False, progress=None,
          input_shapes: dict | None = None, target=None, select: str | None = None,
          normalize: str | None = None, max_group_loss: float = 0.9,
          latency=None, calib=None, aggregate: str = "sum",
          calib_samples: int | None = None, damp: float | None = None,
          force: bool = False) -> PruneResult:
    """Analyze, plan (or take the given plan), rewrite, verify and measure a model.
    Trust by default (docs/reliability.md): the masked-equivalence oracle checks the exact
    part of the structural plan (`verify=False` skips it; `do_verify` is its old name) and
    raises spa.verify.VerificationError naming the first tensor where the pruned model
    departs; one ONNX Runtime run checks that every graph output keeps its runtime shape
    (SpaError); every prune measures how far the outputs moved (`result.deviation`), and
    obspa, which promises a usable model without fine-tuning, raises
    spa.evaluate.GateError when its result is worse than plain slicing or destroyed
    (spa.deviation.judge) unless `force`. `input_shapes` ({input: shape}) fixes the shapes
    the costs, the oracle and the checks use. `round_to` (default "auto"): see make_plan.
    A "latency:F" target measures: see spa.latency.prune_to_latency.
    criterion "obspa": `calib` is an .npz path or "synthetic" (default DEFAULT_CALIB); the
    kept weights are reconstructed (docs/obspa.md).
    Gradient criteria (taylor, hessian, snip, grasp, crop; docs/criteria.md): `calib` is an
    .npz path (optional `labels`), "synthetic", or a spa.activations.Calibration;
    `calib_samples` uses only the first N samples. `damp` (obspa only): the Hessian
    damping, λ = damp · mean diagonal (default spa.rewrite.reconstruct.DAMP, 0.01)."""
    if do_verify is not None:
        verify = do_verify
    round_to = parse_round_to(round_to)   # "auto" or N >= 1, checked before loading
    if isinstance(calib, str) and calib == "none":
        raise UsageError("--calib none was removed: it returned chance-level models (10.05 % "
                         "top-1 on the trained ResNet-56 at flops:0.5). Without data, obspa "
                         "synthesises its calibration from the model (--calib synthetic, "
                         "the default); see docs/obspa.md")
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    if input_shapes:
        input_shapes_.apply(model, input_shapes)
    if target is not None:
        _refuse_guessed_costs(model, parse_target(target).metric, input_shapes)
    crit = None if criterion == "obspa" else get_criterion(criterion)
    needs_grads = crit is not None and crit.needs_data
    if calib is not None and criterion not in DATA_CRITERIA:
        raise UsageError(f"--calib applies to --criterion obspa and the gradient criteria "
                         f"({', '.join(c for c in DATA_CRITERIA if c != 'obspa')}) only; "
                         f"{criterion!r} needs no data")
    if needs_grads and plan is None and (calib is None or calib == "none"):
        raise UsageError(f"criterion {criterion!r} needs calibration data for its gradients: "
                         "give --calib FILE.npz (one array per graph input, first axis = "
                         "samples, optional 'labels') or --calib synthetic")
    if damp is not None and criterion != "obspa":
        raise UsageError(f"--damp applies to --criterion obspa only, not {criterion!r}")
    if damp is not None and not (0.0 < damp < float("inf")):
        raise UsageError(f"--damp must be a positive number, got {damp}")
    if calib_samples is not None and calib_samples < 1:
        raise UsageError(f"--calib-samples must be >= 1, got {calib_samples}")
    if aggregate not in AGGREGATIONS:
        raise UsageError(f"unknown aggregation {aggregate!r} (use one of "
                         f"{', '.join(AGGREGATIONS)})")
    if criterion == "obspa" and aggregate != "sum":
        raise UsageError("--aggregate does not apply to --criterion obspa (its scores are "
                         "whole-channel OBS costs, not member slices)")
    if criterion == "obspa":
        select = ("knapsack" if target is not None else "uniform") if select is None else select
    normalize = default_normalize(criterion) if normalize is None else normalize
    select = "uniform" if select is None else select
    analysis = analyze(model, progress=progress)
    calib_used = None   # the samples the deviation is measured on (synthetic without any)
    if needs_grads and plan is None:
        from .activations import load_calibration
        from .criteria.gradient import compute_stats
        cal = _first_samples(load_calibration(calib, model, seed=seed), calib_samples)
        analysis.__dict__["_gradients"] = compute_stats(model, cal, crit)
        calib_used = cal
    ob = None
    if criterion == "obspa":
        from .activations import load_calibration
        from .criteria.obspa import Obspa
        ob = Obspa(model, analysis, _first_samples(load_calibration(
            DEFAULT_CALIB if calib is None else calib, model, seed=seed), calib_samples),
            seed=seed, **({} if damp is None else {"damp": float(damp)}))
        analysis.__dict__["_obspa"] = ob
    proto = None
    if plan is None:
        def plan_for(t):
            return make_plan(model, analysis, ratio=ratio, criterion=criterion,
                             round_to=round_to, seed=seed, exact_only=exact_only, target=t,
                             select=select, normalize=normalize,
                             max_group_loss=max_group_loss, latency=latency,
                             aggregate=aggregate)
        if target is not None and parse_target(target).metric == "latency":
            from .latency import LatencySettings, prune_to_latency
            latency = latency or LatencySettings(align=resolve_round_to(round_to)[0])
            if input_shapes and not latency.shapes:
                latency.shapes = input_shapes_.validate(model, input_shapes)
            plan, proto = prune_to_latency(model, analysis, parse_target(target), plan_for,
                                           latency)
        else:
            plan = plan_for(target)
    if proto is None:
        proto = apply_plan(model, analysis, plan)
    structural = proto
    verified = None
    if verify:  # the oracle holds for the exact part of the structural plan
        verified = _verify_exact(model, analysis, plan, structural, input_shapes)
    updates = None
    if ob is not None:  # the weight update is part of applying the plan
        updates = ob.reconstruct(plan)
        plan.options.setdefault("calib", ob.calib.mode)
        plan.options.setdefault("reconstruct", True)
        plan.options.setdefault("damp", ob.damp)
        proto = apply_plan(model, analysis, plan, updates)
    check(proto, model.proto, model.path)
    check_output_shapes(model, proto, input_shapes=input_shapes)
    pruned = from_proto(proto, path=model.path, infer=True)
    if input_shapes:
        input_shapes_.apply(pruned, input_shapes)
    result = PruneResult(plan, proto, analysis, stats(model), stats(pruned))
    result.verify = verified
    if ob is not None:
        calib_used = ob.calib
    protos = {"pruned": proto, **({"sliced": structural} if ob is not None else {})}
    result.deviation = measure_deviation(model, protos, calib_used, seed=seed)
    if ob is not None:
        from .criteria.obspa import report
        result.obspa = report(ob, plan, updates, {"reconstructed": proto,
                                                  "sliced": structural})
        result.obspa["verify_applies_to"] = "the structural plan before reconstruction " \
            "(the reconstruction changes weights; see measured)"
        why = judge(result.deviation)
        if why and not force:
            raise GateError("obspa's result is not usable without fine-tuning: "
                            + "; ".join(why) + ". --force writes it anyway (e.g. to "
                            "fine-tune it); nothing written", file=model.path)
    return result


def _refuse_guessed_costs(model, metric: str, input_shapes) -> None:
    """A FLOPs / memory / latency budget on a model whose spatial or sequence axes are
    dynamic would be spent at a guessed shape: refuse, showing the option to add."""
    if metric == "params":
        return
    dyn = input_shapes_.dynamic_axes(model, input_shapes)
    if dyn:
        axes = ", ".join(f"{n}[{k}] ({sym})" for n, k, sym in dyn)
        raise UsageError(f"a {metric} budget depends on the input size, and these input axes "
                         f"are dynamic: {axes}. Give the shape you deploy at: "
                         f"{input_shapes_.suggestion(model, input_shapes)} (with the real "
                         "sizes; the batch axis may stay symbolic)", file=model.path)


def _verify_exact(model, analysis, plan, structural, input_shapes) -> VerifyResult | None:
    """The oracle on the structural plan: the whole plan when it is exact, else its exact
    part (rewritten once more on its own); approximate groups are listed as unchecked.
    A failure raises VerificationError naming the first tensor that departs."""
    part = exact_part(plan, analysis)
    approx = plan.touches_approximate(analysis)
    if part is None:  # nothing exact: the deviation from the masked original, as a report
        part = plan
    proto = structural if part is plan else apply_plan(model, analysis, part)
    res = _verify(model, proto, analysis, part, input_shapes=input_shapes)
    res.unchecked_groups = approx
    res.checked_groups = [g for g in sorted(part.keep) if g not in approx]
    if res.passed is False:
        where = locate_divergence(model, proto, analysis, part, input_shapes=input_shapes)
        raise VerificationError(divergence_message(where, res), file=model.path,
                                node=None if where is None else where["node"],
                                op=None if where is None else where["op"])
    return res


def _first_samples(cal, n: int | None):
    """The calibration restricted to its first n samples (all when n is None)."""
    if n is None or not cal.arrays or n >= cal.n_samples:
        return cal
    from dataclasses import replace
    return replace(cal, arrays={k: v[:n] for k, v in cal.arrays.items()},
                   labels=None if cal.labels is None else cal.labels[:n],
                   row_mask=None if cal.row_mask is None else cal.row_mask[:n],
                   notes=cal.notes + [f"first {n} of {cal.n_samples} samples"])


def save(proto: onnx.ModelProto, path: str, *, source: str | None = None) -> None:
    if source and os.path.exists(path) and os.path.samefile(path, source):
        raise UsageError("the output path is the input file; SPA never overwrites its input",
                         file=path)
    save_atomic(proto, path)


__all__ = ["load", "analyze", "prune", "make_plan", "save", "stats", "Plan", "SpaError"]
