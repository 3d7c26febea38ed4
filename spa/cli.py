"""`spa analyze | prune | verify | bench | convert` — exit codes: 0 success, 1 verification
failed, 2 usage error, 3 the model (or plan) cannot be processed."""
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
    model = api.load(args.model)
    ana = api.analyze(model, progress=_progress("analyze"))
    st = api.stats(model)
    if args.json:
        out = {"model": args.model, **ana.to_json(), **st}
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.model}: {len(model.nodes)} nodes, params {_fmt(st['params'])}, "
          f"MACs {_fmt(st['macs'])}, opset {model.opset}")
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


def _check_output(args) -> None:
    out = os.path.abspath(args.output)
    if os.path.exists(out) and os.path.samefile(out, args.model):
        raise UsageError("the output path is the input file; SPA never overwrites its input",
                         file=args.output)
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError("the output directory does not exist", file=args.output)


def _write_text(path: str, text: str) -> None:
    import tempfile
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError("the directory does not exist", file=path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".spa-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _budget_args(args):
    """--target METRIC:FRACTION (malformed: exit 2 before anything is loaded)."""
    from .select import parse_target
    if args.target is None:
        if args.select != "uniform":
            raise UsageError(f"--select {args.select} needs --target, e.g. --target flops:0.5")
        return None
    if args.plan:
        raise UsageError("--target and --plan exclude each other (a plan is already chosen)")
    return parse_target(args.target)


def cmd_prune(args) -> int:
    from . import api
    from .plan import Plan
    _check_output(args)
    target = _budget_args(args)
    plan = Plan.load(args.plan) if args.plan else None
    model = api.load(args.model)
    res = api.prune(model, ratio=args.ratio, criterion=args.criterion, round_to=args.round_to,
                    seed=args.seed, plan=plan, do_verify=args.verify,
                    exact_only=args.exact_only, progress=_progress("analyze"),
                    target=target, select=args.select, normalize=args.normalize,
                    max_group_loss=args.max_group_loss)
    if target is not None:
        print(f"target {target.name}:{target.fraction:g} ({args.select} selection): achieved "
              f"{res.plan.options.get('achieved', float('nan')):.4f} of the original")
    b, a = res.before, res.after
    print(f"pruned {len(res.plan.keep)}/{len(res.analysis.groups)} groups: params "
          f"{_fmt(b['params'])} -> {_fmt(a['params'])} ({a['params'] / max(b['params'], 1):.1%}),"
          f" MACs {_fmt(b['macs'])} -> {_fmt(a['macs'])} ({a['macs'] / max(b['macs'], 1):.1%})")
    if res.verify is not None:
        v = res.verify
        if v.passed is None:
            print(f"verify: approximate groups pruned {v.approximate_groups}; deviation from "
                  f"the masked original {v.max_rel_error:.3g} (relative)")
        else:
            print(f"verify: {'PASS' if v.passed else 'FAIL'} max relative error "
                  f"{v.max_rel_error:.3g} (tolerance {v.tolerance:g})")
        if v.passed is False:
            print("error: the pruned model does not match the masked original; nothing written",
                  file=sys.stderr)
            return 1
    if args.plan_out:
        _write_text(args.plan_out, res.plan.dumps())
    if args.report:
        _write_text(args.report, json.dumps(res.report(), indent=1))
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
    res = verify(model, pruned.proto, ana, plan, seed=args.seed)
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
    rows = bench_models(args.models, provider=args.provider, batches=args.batch,
                        threads=args.threads, repeat=args.repeat)
    print(f"{'model':<40} {'batch':>5} {'median ms':>10} {'p10-p90 ms':>16} {'img/s':>9} "
          f"{'speed-up':>8}")
    for r in rows:
        print(f"{os.path.basename(r['model']):<40} {r['batch']:>5} {r['median_ms']:>10.3f} "
              f"{r['p10_ms']:>7.3f}-{r['p90_ms']:<8.3f} {r['throughput']:>9.1f} "
              f"{r['speedup']:>7.2f}x")
    if args.json:
        _write_text(args.json, json.dumps(rows, indent=1))
    return 0


def cmd_convert(args) -> int:
    # The one place spa reaches into converters/ (models -> converters -> spa): lazily, so
    # that spa itself never needs a framework.
    import importlib.util
    if importlib.util.find_spec(args.framework) is None:
        raise UsageError(f"spa convert {args.framework} needs PyTorch: pip install "
                         "'spa-prune[torch]' -c constraints.txt")
    from converters.torch import convert
    path = convert(args.factory, args.input_shape, args.output, state_dict=args.state_dict,
                   exporter=args.exporter, opset=args.opset, keep_bn=not args.fold_bn)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spa", description="Structural pruning of ONNX models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("analyze", help="list coupled channel groups and frozen dims")
    a.add_argument("model")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(fn=cmd_analyze)

    q = sub.add_parser("prune", help="remove channels and write a smaller model")
    q.add_argument("model")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of the channels of every prunable group to remove")
    q.add_argument("--criterion", default="l2", choices=["l1", "l2", "random"])
    q.add_argument("--round-to", type=int, default=1, help="keep group sizes multiples of N")
    q.add_argument("--exact-only", action="store_true",
                   help="do not prune approximate groups (channels under a normalisation)")
    q.add_argument("--plan", help="apply this plan (JSON) instead of selecting")
    q.add_argument("--plan-out", help="write the plan (JSON)")
    q.add_argument("--report", help="write a JSON report")
    q.add_argument("--verify", action="store_true", help="run the masked-equivalence oracle")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--target", metavar="METRIC:F",
                   help="budget instead of --ratio: keep at most F of the original flops "
                        "(MACs), params or memory, e.g. flops:0.5")
    q.add_argument("--select", default="uniform", choices=["uniform", "global", "knapsack"],
                   help="with --target: one ratio for all groups (bisection), one global "
                        "ranking, or the knapsack (MILP) that keeps the most importance")
    q.add_argument("--normalize", default="mean",
                   choices=["mean", "max", "sum", "none", "standardization", "lamp"],
                   help="per-group score normalisation for --select global/knapsack")
    q.add_argument("--max-group-loss", type=float, default=0.9,
                   help="with --target: largest fraction of one group's channels removed")
    q.set_defaults(fn=cmd_prune)

    v = sub.add_parser("verify", help="check a pruned model against its original")
    v.add_argument("original")
    v.add_argument("pruned")
    v.add_argument("--plan", help="the plan used (default: recovered from the weights)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_verify)

    b = sub.add_parser("bench", help="ONNX Runtime latency of one or more models")
    b.add_argument("models", nargs="+")
    b.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--batch", type=int, nargs="+", default=[1])
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--repeat", type=int, default=50)
    b.add_argument("--json", help="write the rows as JSON")
    b.set_defaults(fn=cmd_bench)

    c = sub.add_parser("convert", help="export a framework model to ONNX (docs/frameworks.md)")
    c.add_argument("framework", choices=["torch"])
    c.add_argument("factory", help="pkg.module:callable that returns the model")
    c.add_argument("--input-shape", required=True, metavar="SHAPE",
                   help="e.g. 1x3x224x224; several inputs comma-separated; 1x16:int64 for ids")
    c.add_argument("--state-dict", help="weights file (torch.load, weights_only=True)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    c.add_argument("--opset", type=int, default=18)
    c.add_argument("--fold-bn", action="store_true",
                   help="deployment export (BN folded); plans on it cannot be mapped back")
    c.set_defaults(fn=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpaError as exc:
        print(f"spa: error: {exc.describe()}", file=sys.stderr)
        return exc.exit_code
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
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
