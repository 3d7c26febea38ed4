"""`spa analyze | prune | verify | bench | eval | finetune | convert | calib` — exit codes: 0
success, 1 verification failed, 2 usage error, 3 the model (or plan) cannot be processed, 4 the
pruned model failed the accuracy / deviation gate (--max-drop, --max-deviation; nothing
written)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import SpaError, UsageError


def _progress(label: str):
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def cb(k: int, n: int) -> None:
        now = time.monotonic()
        if now - last[0] > 0.1 or k + 1 == n:
            last[0] = now
            sys.stderr.write(f"\r{label}: {k + 1}/{n} nodes")
            if k + 1 == n:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return cb


def _fmt(n: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f}{unit}"
    return str(int(n))


def cmd_analyze(args) -> int:
    from . import api
    from .ir import input_shapes
    shapes = input_shapes.parse(args.input_shape)
    model = api.load(args.model)
    if shapes:
        input_shapes.apply(model, shapes)
    ana = api.analyze(model, progress=_progress("analyze"))
    st = api.stats(model)
    dyn = input_shapes.dynamic_axes(model, shapes)
    at = _costed_at(model, shapes, dyn)
    if args.json:
        out = {"model": args.model, **ana.to_json(), **st, "flops": 2 * st["macs"],
               "costed_at": at, "dynamic_axes": [{"input": n, "axis": k, "symbol": s}
                                                 for n, k, s in dyn]}
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.model}: {len(model.nodes)} nodes, params {_fmt(st['params'])}, "
          f"MACs {_fmt(st['macs'])}, opset {model.opset}")
    print(f"  costs per sample at {at}")
    if dyn:
        print(f"  note: dynamic input axes counted as 1: "
              f"{', '.join(f'{n}[{k}] ({sym})' for n, k, sym in dyn)}; the MACs and any "
              f"flops/latency budget depend on them: add "
              f"{input_shapes.suggestion(model, shapes)} with your sizes")
    for note in getattr(model, "shape_notes", None) or ():
        print(f"  note: {note}")
    print(f"{len(ana.groups)} prunable groups")
    print(f"{'id':>4} {'channels':>8} {'kind':>8} {'exact':>6} {'members':>7}  example members")
    for g in ana.groups:
        consts = [m for m in g.members if m["const"]][:3]
        ex = ", ".join(f"{m['tensor']}[{m['axis']}]" for m in consts)
        print(f"{g.id:>4} {g.channels:>8} {g.kind:>8} {'yes' if g.exact else 'approx':>6} "
              f"{len(g.members):>7}  {ex}")
    if ana.frozen:
        print(f"\nfrozen parameter dims ({len(ana.frozen)} sets):")
        for f in ana.frozen:
            dims = ", ".join(f"{d['tensor']}[{d['axis']}]" for d in f["dims"][:4])
            more = f" (+{f['n_dims'] - 4})" if f["n_dims"] > 4 else ""
            print(f"  {dims}{more}: {'; '.join(f['reasons'][:3])}")
    if ana.opaque:
        print(f"\nopaque nodes (no rule; their dims are frozen): {len(ana.opaque)}")
        for o in ana.opaque[:20]:
            print(f"  {o['node']} ({(o['domain'] + '.') if o['domain'] else ''}{o['op']})")
    return 0


def _costed_at(model, shapes: dict, dyn) -> str:
    """The graph input shapes the costs are taken at, e.g. "images=1x3x640x640"."""
    from .ir import input_shapes
    parts = []
    for name, dims in input_shapes.declared(model).items():
        d = shapes.get(name) or tuple(x if isinstance(x, int) else 1 for x in dims)
        parts.append(f"{name}={'x'.join(map(str, d))}")
    return ", ".join(parts) + (" (dynamic axes as 1)" if dyn else "")


def _check_output(args) -> None:
    out = os.path.abspath(args.output)
    if os.path.exists(out) and os.path.samefile(out, args.model):
        raise UsageError("the output path is the input file; SPA never overwrites its input",
                         file=args.output)
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError("the output directory does not exist", file=args.output)


def _write_text(path: str, text: str) -> None:
    from .ir import write_text_atomic
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError("the directory does not exist", file=path)
    write_text_atomic(path, text)


def _budget_args(args):
    """--target METRIC:FRACTION (malformed: exit 2 before anything is loaded)."""
    from .select import parse_target
    if args.target is None:
        if args.select == "knapsack":
            raise UsageError("--select knapsack needs --target, e.g. --target flops:0.5 "
                             "(with --ratio, --select is uniform or global)")
        return None
    if args.plan:
        raise UsageError("--target and --plan exclude each other (a plan is already chosen)")
    return parse_target(args.target)


def _round_to(value: str):
    """--round-to auto|N (argparse type: a bad value exits 2 before anything is loaded)."""
    from .select.align import parse_round_to
    try:
        return parse_round_to(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--round-to ", ""))


def _latency_args(args, target):
    """--provider/--batch/--threads for a latency target (checked before loading)."""
    from .latency import LatencySettings, default_log
    from .select.align import resolve
    is_latency = target is not None and target.metric == "latency"
    settings = LatencySettings(provider=args.provider, batch=args.batch, threads=args.threads,
                               rounds=args.latency_rounds, refresh=args.latency_refresh,
                               align=resolve(args.round_to, args.provider)[0],
                               log=default_log if sys.stderr.isatty() else None)
    if is_latency:
        settings.check()
    return settings


def _print_latency(lat: dict) -> None:
    m = lat["model"]
    print(f"latency on {m['provider']} (batch {m['batch']}, threads {m['threads'] or 'default'}"
          f"): asked {lat['asked']:g}, predicted {lat['predicted']:.4f}, measured "
          f"{lat['measured']:.4f} of the original ({100 * lat['miss']:+.1f} %, "
          f"{'within' if lat['within_tolerance'] else 'outside'} "
          f"{100 * lat['tolerance']:g} %)")
    for k, r in enumerate(lat["rounds"]):
        print(f"  round {k + 1}: aimed {r['aim']:.4f} predicted {r['predicted']:.4f} measured "
              f"{r['measured']:.4f} ({r['original_ms']:.2f} -> {r['pruned_ms']:.2f} ms, "
              f"median of {r['runs']} interleaved runs)")


def _print_obspa(ob: dict) -> None:
    cal = ob["calibration"]
    print(f"obspa: calibration {cal['mode']} ({cal['samples']} samples, {cal['source']}); "
          f"{ob['layers']} layers, Hessians in {ob['timings'].get('hessians_s', 0):.2f} s, "
          f"{ob['reconstruction']} reconstruction")
    for note in cal["notes"]:
        print(f"  {note}")
    kept = ", ".join(f"{g}:{v['kept']}/{v['of']}" for g, v in ob["groups"].items())
    print(f"  kept channels per group (group:kept/of): {kept or 'none pruned'}")
    p, m = ob["predicted"], ob["measured"]
    print(f"  predicted mean layer error {p['mean_layer_rel_error']:.4f} (plain slicing "
          f"{p['mean_layer_rel_error_sliced']:.4f})")
    for name, e in m["output_rel_error"].items():
        sl = m.get("output_rel_error_sliced", {}).get(name)
        print(f"  measured output error {name!r}: {e:.4f}"
              + (f" (plain slicing {sl:.4f})" if sl is not None else "") + f" on {m['on']}")
    print(f"  weights updated: {len(ob['weights_changed'])}, biases added: "
          f"{len(ob['biases_added'])}")


def _print_verify(v, reconstructed: bool) -> None:
    """The oracle's line: what was checked (the exact part of the plan) and the result."""
    what = "the structural plan before reconstruction" if reconstructed else "the plan"
    if v.passed is None:
        print(f"verify: nothing exact to check ({len(v.unchecked_groups or [])} approximate "
              f"groups pruned, channels under a normalisation); deviation from the masked "
              f"original {v.max_rel_error:.3g} (relative)")
        return
    part = ""
    if v.unchecked_groups:
        part = (f" (exact part: {len(v.checked_groups)} groups; {len(v.unchecked_groups)} "
                "approximate groups are not checkable, see the deviation line)")
    print(f"verify: {'PASS' if v.passed else 'FAIL'} masked equivalence of {what}{part}, max "
          f"relative error {v.max_rel_error:.3g} (tolerance {v.tolerance:g})")


def cmd_prune(args) -> int:
    from . import api
    from .evaluate import GateError, check_gate_args, gate, load_dataset
    from .plan import Plan
    _check_output(args)
    target = _budget_args(args)
    latency = _latency_args(args, target)
    check_gate_args(args.eval, args.max_drop, args.max_deviation)
    dataset = load_dataset(args.eval) if args.eval else None
    plan = Plan.load(args.plan) if args.plan else None
    from .ir import input_shapes
    shapes = input_shapes.parse(args.input_shape)
    if shapes:
        latency.shapes = shapes
    model = api.load(args.model)
    res = api.prune(model, ratio=args.ratio, criterion=args.criterion, round_to=args.round_to,
                    seed=args.seed, plan=plan, verify=not args.no_verify,
                    input_shapes=shapes or None, force=args.force,
                    exact_only=args.exact_only, progress=_progress("analyze"),
                    target=target, select=args.select, normalize=args.normalize,
                    max_group_loss=args.max_group_loss, latency=latency, calib=args.calib,
                    aggregate=args.aggregate, calib_samples=args.calib_samples,
                    damp=args.damp)
    if target is not None:
        print(f"target {target.name}:{target.fraction:g} "
              f"({res.plan.options.get('select', args.select)} selection): achieved "
              f"{res.plan.options.get('achieved', float('nan')):.4f} of the original"
              + (" (measured)" if target.metric == "latency" else ""))
        if res.plan.options.get("latency"):
            _print_latency(res.plan.options["latency"])
    b, a = res.before, res.after
    print(f"pruned {len(res.plan.keep)}/{len(res.analysis.groups)} groups: params "
          f"{_fmt(b['params'])} -> {_fmt(a['params'])} ({a['params'] / max(b['params'], 1):.1%}),"
          f" MACs {_fmt(b['macs'])} -> {_fmt(a['macs'])} ({a['macs'] / max(b['macs'], 1):.1%})")
    if res.obspa is not None:
        _print_obspa(res.obspa)
    for note in getattr(model, "shape_notes", None) or ():
        print(f"note: {note}")
    if res.verify is not None:
        _print_verify(res.verify, res.obspa is not None)
    else:
        print("verify: skipped (--no-verify): the rewrite is not checked against the masked "
              "original")
    if res.deviation is not None:
        d = res.deviation
        line = f"deviation from the original: {d.summary()}"
        if "sliced" in d.models:
            line += f"; plain slicing of the same plan: {d.models['sliced']['overall']:.4g}"
        print(line)
    report = res.report()
    if dataset is not None or args.max_deviation is not None:
        g = gate(model.proto, res.proto, dataset, max_drop=args.max_drop,
                 max_deviation=args.max_deviation, provider=args.provider,
                 threads=args.threads, limit=args.eval_limit)
        print(g.summary())
        report["eval"] = g.to_json()
        if not g.passed:
            raise GateError("; ".join(g.failures) + "; nothing written", file=args.model)
    if args.plan_out:
        _write_text(args.plan_out, res.plan.dumps())
    if args.report:
        _write_text(args.report, json.dumps(report, indent=1))
    api.save(res.proto, args.output, source=args.model)
    print(f"wrote {args.output}")
    return 0


def cmd_verify(args) -> int:
    from . import api
    from .plan import Plan
    from .verify import verify
    model = api.load(args.original)
    pruned = api.load(args.pruned)
    ana = api.analyze(model)
    plan = Plan.load(args.plan) if args.plan else _infer_plan(model, pruned, ana)
    plan.validate(ana, source=args.plan)
    from .ir import input_shapes
    shapes = input_shapes.validate(model, input_shapes.parse(args.input_shape))
    res = verify(model, pruned.proto, ana, plan, seed=args.seed, input_shapes=shapes or None)
    if args.json:
        print(json.dumps(res.to_json(), indent=1))
    elif res.passed is None:
        print(f"approximate plan (groups {res.approximate_groups}): deviation from the masked "
              f"original {res.max_rel_error:.3g}, from the original {res.max_rel_change:.3g}")
    else:
        print(f"{'PASS' if res.passed else 'FAIL'}: max relative error {res.max_rel_error:.3g} "
              f"(tolerance {res.tolerance:g}); change vs original {res.max_rel_change:.3g}")
    return 1 if res.passed is False else 0


def _infer_plan(model, pruned, ana):
    """Without --plan: recover kept channels by matching pruned parameters to originals."""
    from .plan import Plan, model_sha256
    import numpy as np
    keep = {}
    for g in ana.groups:
        for m in g.members:
            if not m["const"] or m["tensor"] not in pruned.consts:
                continue
            key = (m["tensor"], m["axis"])
            ch = ana.dim_channels(key)
            new_len = pruned.consts[m["tensor"]].shape[m["axis"]]
            if new_len == len(ch):
                keep[g.id] = list(range(g.channels))
                break
            a = np.moveaxis(model.consts[m["tensor"]], m["axis"], 0)
            b = np.moveaxis(pruned.consts[m["tensor"]], m["axis"], 0)
            if a.shape[1:] != b.shape[1:]:
                continue
            flat_a = a.reshape(len(a), -1)
            picked, j = [], 0
            for i in range(len(flat_a)):
                if j < len(b) and np.array_equal(flat_a[i], b.reshape(len(b), -1)[j]):
                    picked.append(i)
                    j += 1
            if j != len(b):
                continue
            local = sorted({int(ana.local_of_chan[ch[i]]) for i in picked if ch[i] >= 0})
            keep[g.id] = local
            break
        else:
            raise SpaError(f"cannot tell which channels of group {g.id} were kept; pass the "
                           "plan with --plan", file=pruned.path)
    keep = {g: k for g, k in keep.items() if len(k) < ana.groups[g].channels}
    return Plan(keep, {g: ana.groups[g].channels for g in keep}, "inferred", {},
                model_sha256(model))


def cmd_bench(args) -> int:
    from .bench import bench_models
    from .ir import input_shapes
    rows = bench_models(args.models, provider=args.provider, batches=args.batch,
                        threads=args.threads, repeat=args.repeat, warmup=args.warmup,
                        shapes=input_shapes.parse(args.input_shape) or None)
    if args.json == "-":
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':<40} {'batch':>5} {'median ms':>10} {'p10-p90 ms':>16} {'spread':>7} "
          f"{'samples/s':>9} {'speed-up (p10-p90)':>19}")
    for r in rows:
        print(f"{os.path.basename(r['model']):<40} {r['batch']:>5} {r['median_ms']:>10.3f} "
              f"{r['p10_ms']:>7.3f}-{r['p90_ms']:<8.3f} {100 * r['spread']:>6.1f}% "
              f"{r['throughput']:>9.1f} {r['speedup_p10']:>5.2f}-{r['speedup_p90']:<5.2f} "
              f"{r['speedup']:>6.2f}x")
    if args.json:
        _write_text(args.json, json.dumps(rows, indent=1))
    return 0


def cmd_eval(args) -> int:
    from . import api
    from .evaluate import GateError, check_gate_args, evaluate, gate, load_dataset
    check_gate_args(args.dataset, args.max_drop, args.max_deviation)
    if (args.max_drop is not None or args.max_deviation is not None) and not args.baseline:
        raise UsageError("--max-drop / --max-deviation compare with a model: give --baseline "
                         "ORIGINAL.onnx")
    from .bench import check_provider
    check_provider(args.provider)
    dataset = load_dataset(args.dataset)
    model = api.load(args.model)
    if args.baseline:
        base = api.load(args.baseline)
        g = gate(base.proto, model.proto, dataset, max_drop=args.max_drop,
                 max_deviation=args.max_deviation, provider=args.provider,
                 threads=args.threads, batch=args.batch, limit=args.limit)
        print(json.dumps(g.to_json(), indent=1) if args.json else g.summary())
        if not g.passed:
            raise GateError("; ".join(g.failures), file=args.model)
        return 0
    r = evaluate(model.proto, dataset, provider=args.provider, threads=args.threads,
                 batch=args.batch, limit=args.limit)
    if args.json:
        print(json.dumps({"model": args.model, "dataset": dataset.name, **r}, indent=1))
    elif r["accuracy"] is None:
        print(f"{args.model}: {r['samples']} samples of {dataset.name} run; no labels, no "
              "accuracy")
    else:
        print(f"{args.model}: top-1 accuracy {100 * r['accuracy']:.2f}% on {r['samples']} "
              f"samples of {dataset.name}")
    return 0


def cmd_finetune(args) -> int:
    """Train the pruned model's parameters on data with the JAX engine (spa/finetune.py)."""
    from dataclasses import asdict
    from . import api
    from .finetune import Config, finetune, load_training_data
    _check_output(args)
    cfg = Config(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                 schedule=args.schedule, weight_decay=args.wd, momentum=args.momentum,
                 batch=args.batch, seed=args.seed, augment=args.augment, bn=args.bn,
                 bn_samples=args.bn_samples, kd_alpha=args.kd_alpha,
                 kd_temperature=args.kd_temperature, limit=args.limit,
                 eval_limit=args.eval_limit, threads=args.threads)
    cfg.check()
    if args.teacher and os.path.exists(args.output) and \
            os.path.samefile(args.output, args.teacher):
        raise UsageError("the output path is the teacher file; SPA never overwrites its input",
                         file=args.output)
    model = api.load(args.model)
    teacher = api.load(args.teacher) if args.teacher else None
    data = load_training_data(args.data, model, test=args.test)
    res = finetune(model, data, cfg, teacher=teacher,
                   log=lambda line: print(line, flush=True))
    for note in res.notes:
        print(f"note: {note}")
    if res.accuracy_before is not None and res.accuracy_after is not None:
        print(f"test accuracy {100 * res.accuracy_before:.2f}% -> "
              f"{100 * res.accuracy_after:.2f}% ({res.seconds:.0f} s)")
    if args.report:
        _write_text(args.report, json.dumps({"model": args.model, "data": data.name,
                                             "teacher": args.teacher,
                                             "config": asdict(cfg), **res.to_json()},
                                            indent=1))
    api.save(res.proto, args.output, source=args.model)
    print(f"wrote {args.output}")
    return 0


# `spa convert FRAMEWORK ...`: the python package each framework needs, for the error message.
CONVERT_NEEDS = {"torch": ("torch", "torch"), "jax": ("jax2onnx", "jax"),
                 "keras": ("tf2onnx", "tf")}


def cmd_convert(args) -> int:
    # The one place spa reaches into converters/ (models -> converters -> spa): lazily, so
    # that spa itself never needs a framework. Each converters.<framework> module has a
    # `cli_main(args) -> Path` that takes the subcommand's parsed arguments.
    import importlib
    import importlib.util
    package, extra = CONVERT_NEEDS[args.framework]
    if importlib.util.find_spec(package) is None:
        raise UsageError(f"spa convert {args.framework} needs the {package!r} package: "
                         f"pip install 'spa-prune[{extra}]' -c constraints.txt")
    mod = importlib.import_module(f"converters.{args.framework}")
    path = mod.cli_main(args)
    print(f"wrote {path}")
    return 0


def _add_convert_jax(cs) -> None:
    """`spa convert jax ...` (converters/jax.py)."""
    cj = cs.add_parser("jax", help="a flax nnx module from a factory (pkg.module:fn), via jax2onnx")
    cj.add_argument("factory", help="pkg.module:callable that returns the nnx.Module")
    cj.add_argument("--input-shape", required=True, metavar="SHAPE",
                    help="e.g. 1x28x28x1 (batch axis exported dynamic)")
    cj.add_argument("-o", "--output", required=True)
    cj.add_argument("--opset", type=int, default=18)
    cj.set_defaults(fn=cmd_convert)


def _add_convert_keras(cs) -> None:
    """`spa convert keras ...` (converters/keras.py)."""
    ck = cs.add_parser("keras", help="a saved .keras file or SavedModel directory, via tf2onnx")
    ck.add_argument("model", help="MODEL.keras or a SavedModel directory")
    ck.add_argument("-o", "--output", required=True)
    ck.add_argument("--opset", type=int, default=18)
    ck.set_defaults(fn=cmd_convert)


def _add_input_shape(p) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0xD1x...",
                   help="shape of graph input NAME the costs (MACs, memory, latency tables), "
                        "the oracle and the benchmark use, e.g. images=1x3x640x640 "
                        "(repeatable; needed for flops/latency budgets when spatial or "
                        "sequence axes are dynamic)")


def build_parser() -> argparse.ArgumentParser:
    from .criteria import AGGREGATIONS, CRITERIA
    p = argparse.ArgumentParser(prog="spa", description="Structural pruning of ONNX models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("analyze", help="list coupled channel groups and frozen dims")
    a.add_argument("model")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    _add_input_shape(a)
    a.set_defaults(fn=cmd_analyze)

    q = sub.add_parser("prune", help="remove channels and write a smaller model")
    q.add_argument("model")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of the channels of every prunable group to remove")
    q.add_argument("--criterion", default="l2", choices=list(CRITERIA),
                   help="channel importance (docs/criteria.md): l1, l2, bn_scale, random, "
                        "fpgm, lamp need no data; taylor, hessian, snip, grasp, crop need "
                        "gradients on --calib data; obspa: OBS saliency on calibration data, "
                        "with least-squares reconstruction of the kept weights "
                        "(docs/obspa.md)")
    q.add_argument("--aggregate", default="sum", choices=list(AGGREGATIONS),
                   help="how the scores of the member slices of a channel (its filter, the "
                        "next layer's input slice, its BN scale, ...) combine (default sum)")
    q.add_argument("--calib", metavar="FILE.npz|synthetic",
                   help="calibration data for obspa and the gradient criteria: .npz (one "
                        "array per graph input, first axis = samples, optional 'labels') or "
                        "'synthetic' (inputs synthesised from the model; obspa's default)")
    q.add_argument("--calib-samples", type=int, metavar="N",
                   help="use only the first N calibration samples")
    q.add_argument("--damp", type=float, metavar="F",
                   help="obspa: Hessian damping, F times the mean diagonal (default 0.01; "
                        "larger regularises the reconstruction towards plain slicing, for "
                        "few calibration samples or calibration text unlike the use)")
    q.add_argument("--round-to", type=_round_to, default="auto", metavar="auto|N",
                   help="widths that run fast: 'auto' (default) keeps the channel counts of "
                        "convolutions at multiples of the --provider's channel block (16 "
                        "on AVX-512 CPUs, 8 on AVX2 and CUDA), other groups exact; N keeps "
                        "every group of at least N channels at a multiple of N; 1: exact "
                        "counts (docs/speed.md)")
    q.add_argument("--exact-only", action="store_true",
                   help="do not prune approximate groups (channels under a normalisation)")
    q.add_argument("--plan", help="apply this plan (JSON) instead of selecting")
    q.add_argument("--plan-out", help="write the plan (JSON)")
    q.add_argument("--report", help="write a JSON report")
    q.add_argument("--verify", action="store_true",
                   help="(the default; kept for scripts) run the masked-equivalence oracle")
    q.add_argument("--no-verify", action="store_true",
                   help="skip the masked-equivalence oracle on the exact part of the plan "
                        "(saves about one model load and three ONNX Runtime runs; a wrong "
                        "rewrite is then written without a word: docs/reliability.md)")
    q.add_argument("--force", action="store_true",
                   help="write an obspa result even when it is worse than plain slicing or "
                        "destroyed (e.g. to fine-tune it; otherwise exit 4, nothing written)")
    _add_input_shape(q)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--target", metavar="METRIC:F",
                   help="budget instead of --ratio: keep at most F of the original flops "
                        "(MACs), params or memory, e.g. flops:0.5")
    q.add_argument("--select", default=None, choices=["uniform", "global", "knapsack"],
                   help="with --target: one ratio for all groups (bisection), one global "
                        "ranking, or the knapsack (MILP) that keeps the most importance "
                        "(default uniform; knapsack for --criterion obspa). With --ratio: "
                        "uniform removes that fraction of every group, global that fraction "
                        "of each group kind, ranked across its groups")
    q.add_argument("--normalize", default=None,
                   choices=["mean", "max", "sum", "none", "standardization", "lamp"],
                   help="per-group score normalisation for --select global/knapsack "
                        "(default mean; none for obspa and lamp, whose scores compare across "
                        "groups; standardization for grasp, whose scores have both signs)")
    q.add_argument("--max-group-loss", type=float, default=0.9,
                   help="with --target, or --ratio and --select global: largest fraction of "
                        "one group's channels removed")
    q.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                   help="with --target latency:F: execution provider the latency is measured "
                        "on (also runs --eval, and sets the channel block of --round-to "
                        "auto)")
    q.add_argument("--batch", type=int, default=1, help="with --target latency:F: batch size")
    q.add_argument("--threads", type=int, default=0,
                   help="with --target latency:F: intra-op threads (0: ONNX Runtime default)")
    q.add_argument("--latency-rounds", type=int, default=3,
                   help="with --target latency:F: at most N plans, each measured against the "
                        "original; the next one corrects the miss (> 5 %%)")
    q.add_argument("--latency-refresh", action="store_true",
                   help="measure the per-node latency tables again (ignore the cache)")
    q.add_argument("--eval", metavar="DATA",
                   help="fashion-mnist, a directory of IDX files or FILE.npz (inputs keyed by "
                        "input name, optional `labels`): compare pruned and original on it")
    q.add_argument("--max-drop", type=float, metavar="PTS",
                   help="with --eval: fail (exit 4, nothing written) if top-1 accuracy drops "
                        "by more than PTS percentage points")
    q.add_argument("--max-deviation", type=float, metavar="X",
                   help="fail (exit 4, nothing written) if ||pruned - original|| / ||original|| "
                        "of the outputs exceeds X (on --eval data, else on random inputs)")
    q.add_argument("--eval-limit", type=int, metavar="N", help="evaluate the first N samples")
    q.set_defaults(fn=cmd_prune)

    v = sub.add_parser("verify", help="check a pruned model against its original")
    v.add_argument("original")
    v.add_argument("pruned")
    v.add_argument("--plan", help="the plan used (default: recovered from the weights)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true")
    _add_input_shape(v)
    v.set_defaults(fn=cmd_verify)

    b = sub.add_parser("bench", help="ONNX Runtime latency of one or more models")
    b.add_argument("models", nargs="+")
    b.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--batch", type=int, nargs="+", default=[1])
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--repeat", type=int, default=50, help="interleaved rounds (medians)")
    b.add_argument("--warmup", type=int, default=None,
                   help="warm-up runs per model (default: >= 1, until 1 s, at most 5)")
    b.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="JSON rows (median, p10, p90, spread, speed-up and its p10/p90): to "
                        "FILE, or instead of the table without FILE")
    _add_input_shape(b)
    b.set_defaults(fn=cmd_bench)

    e = sub.add_parser("eval", help="top-1 accuracy on a data set; with --baseline, the gate")
    e.add_argument("model")
    e.add_argument("--dataset", required=True, metavar="DATA",
                   help="fashion-mnist, a directory of IDX files or FILE.npz")
    e.add_argument("--baseline", metavar="ORIGINAL",
                   help="compare with this model (accuracy drop, output deviation)")
    e.add_argument("--max-drop", type=float, metavar="PTS",
                   help="with --baseline: exit 4 if accuracy drops by more than PTS points")
    e.add_argument("--max-deviation", type=float, metavar="X",
                   help="with --baseline: exit 4 if the relative output deviation exceeds X")
    e.add_argument("--limit", type=int, metavar="N", help="only the first N samples")
    e.add_argument("--batch", type=int, default=256)
    e.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    f = sub.add_parser("finetune", help="train a pruned model's parameters (JAX; same graph out)")
    f.add_argument("model", help="the pruned model (never modified)")
    f.add_argument("-o", "--output", required=True)
    f.add_argument("--data", required=True, metavar="DATA",
                   help="fashion-mnist (train split), a directory of IDX files or FILE.npz "
                        "(arrays keyed by input name, first axis = samples, optional `labels`)")
    f.add_argument("--test", metavar="DATA",
                   help="evaluate on this after every epoch (default: the test split of "
                        "fashion-mnist / the IDX directory; none for .npz)")
    f.add_argument("--epochs", type=int, required=True,
                   help="passes over the data (0: only recompute BatchNorm statistics)")
    f.add_argument("--lr", type=float, help="peak learning rate (default 0.01 sgd, 1e-3 adamw)")
    f.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                   help="sgd: Nesterov momentum")
    f.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle", "constant"])
    f.add_argument("--wd", type=float,
                   help="weight decay on weights of rank >= 2 (default 5e-4 sgd, 1e-2 adamw)")
    f.add_argument("--momentum", type=float, default=0.9)
    f.add_argument("--batch", type=int, default=128)
    f.add_argument("--augment", default="none", choices=["none", "crop", "flip", "crop-flip"],
                   help="image inputs: random crop (2-pixel padding) and/or horizontal flip")
    f.add_argument("--bn", default="batch", choices=["batch", "fixed"],
                   help="batch: BatchNorms train with batch statistics and their running "
                        "statistics are recomputed from the data; fixed: keep them")
    f.add_argument("--bn-samples", type=int, default=2048,
                   help="training samples the running statistics are recomputed on")
    f.add_argument("--teacher", metavar="ORIGINAL",
                   help="distil from this model (the unpruned original)")
    f.add_argument("--kd-alpha", type=float, default=0.9,
                   help="loss = alpha * KD + (1 - alpha) * cross-entropy")
    f.add_argument("--kd-temperature", type=float, default=4.0)
    f.add_argument("--limit", type=int, metavar="N",
                   help="train on a seeded random subset of N samples")
    f.add_argument("--eval-limit", type=int, metavar="N", help="evaluate the first N samples")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime threads (teacher, statistics, evaluation)")
    f.add_argument("--report", help="write a JSON report (options, per-epoch history)")
    f.set_defaults(fn=cmd_finetune)

    c = sub.add_parser("convert", help="export a framework model to ONNX (docs/frameworks.md)")
    cs = c.add_subparsers(dest="framework", required=True)
    ct = cs.add_parser("torch", help="an nn.Module from a factory (pkg.module:fn)")
    ct.add_argument("factory", help="pkg.module:callable that returns the model")
    ct.add_argument("--input-shape", required=True, metavar="SHAPE",
                    help="e.g. 1x3x224x224; several inputs comma-separated; 1x16:int64 for ids")
    ct.add_argument("--state-dict", help="weights file (torch.load, weights_only=True)")
    ct.add_argument("-o", "--output", required=True)
    ct.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    ct.add_argument("--opset", type=int, default=18)
    ct.add_argument("--fold-bn", action="store_true",
                    help="deployment export (BN folded); plans on it cannot be mapped back")
    ct.set_defaults(fn=cmd_convert)
    _add_convert_jax(cs)
    _add_convert_keras(cs)
    from . import calib_build
    calib_build.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpaError as exc:
        print(f"spa: error: {exc.describe()}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stderr.close()
        return 0
    except MemoryError:
        print("spa: error: out of memory while processing the model; nothing was written",
              file=sys.stderr)
        return 3
    except Exception as exc:  # a bug of ours or an input we do not understand: no crash dump
        if os.environ.get("SPA_DEBUG"):
            raise
        print(f"spa: error: cannot process the model ({type(exc).__name__}: {exc}); nothing "
              "was written (set SPA_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
