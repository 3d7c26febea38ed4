"""Engine benchmark: time and peak memory of load / analyze / plan / rewrite / save on a
ResNet-50-sized CNN, a BERT-base-sized encoder and chains of 10 / 100 / 1000 residual
blocks, and Torch-Pruning 1.6.1 on the same ResNet-50 for comparison.

    python benchmarks/engine.py            # all models, writes docs/benchmarks.md
    python benchmarks/engine.py --only resnet50 --no-write

Every model runs in a fresh subprocess (so ru_maxrss means something): one cold run that
records the RSS high-water mark after each stage, then N timed runs (median reported), then
one run under tracemalloc for each stage's peak of Python/numpy allocations. The ONNX files
come from models.synthetic (pure onnx.helper + numpy, seeded) and are cached in
.cache/bench/, keyed by the generator's source.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from spa.ir import write_text_atomic  # noqa: E402

CACHE = os.path.join(ROOT, ".cache", "bench")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
STAGES = ("load", "analyze", "plan", "rewrite", "save")
RATIO, CRITERION = 0.5, "l2"
BEGIN, END = "<!-- engine.py:begin -->", "<!-- engine.py:end -->"

# name -> (generator name in models.synthetic, kwargs, timed runs, label)
MODELS = {
    "resnet50": ("resnet50_like", {}, 5, "ResNet-50, 1x3x224x224"),
    "bert-base": ("bert_base_like", {}, 5, "BERT-base encoder, seq 128"),
    "stacked-10": ("stacked", {"depth": 10}, 5, "10 residual blocks"),
    "stacked-100": ("stacked", {"depth": 100}, 5, "100 residual blocks"),
    "stacked-1000": ("stacked", {"depth": 1000}, 3, "1000 residual blocks"),
}
TARGETS = {"resnet50": 1.5, "bert-base": 3.0}  # seconds end to end (the core issue)
TP_ISSUE_S = 0.30  # Torch-Pruning graph build + one-shot 50 % prune, as the issue quotes it


# ------------------------------------------------------------------------------------------
# model files


def model_path(name: str) -> str:
    """Generate (once) and cache the ONNX file of a benchmark model."""
    from models import synthetic
    fn_name, kwargs, _, _ = MODELS[name]
    fn = getattr(synthetic, fn_name)
    key = hashlib.sha256((inspect.getsource(synthetic) + repr(sorted(kwargs.items())))
                         .encode()).hexdigest()[:12]
    path = os.path.join(CACHE, f"{name}-{key}.onnx")
    if not os.path.exists(path):
        import onnx
        os.makedirs(CACHE, exist_ok=True)
        for old in os.listdir(CACHE):  # stale versions of this model
            if old.startswith(name + "-") and old.endswith(".onnx") and \
                    old[len(name) + 1:-5].isalnum():
                os.unlink(os.path.join(CACHE, old))
        t = time.perf_counter()
        print(f"  generating {name} ...", end="", flush=True)
        proto = fn(**kwargs)
        fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=".tmp")
        os.close(fd)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
        print(f" {time.perf_counter() - t:.1f} s", flush=True)
    return path


# ------------------------------------------------------------------------------------------
# child: one model, one process


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0), so that each stage's peak
    is its own. ru_maxrss cannot be reset, and a child even inherits its parent's value
    across fork + exec, which is why it is not used here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _params(proto) -> int:
    n = 0
    for t in proto.graph.initializer:
        k = 1
        for d in t.dims:
            k *= d
        n += k
    return n


def _pipeline(path: str, out: str, hook) -> dict:
    """load -> analyze -> plan -> rewrite (+ checker) -> save; hook(stage, fn) runs a stage."""
    from spa.analysis import analyze
    from spa.api import make_plan
    from spa.ir import load, save_atomic
    from spa.rewrite.apply import apply_plan, check

    model = hook("load", lambda: load(path))
    ana = hook("analyze", lambda: analyze(model))
    plan = hook("plan", lambda: make_plan(model, ana, ratio=RATIO, criterion=CRITERION))

    def rewrite():
        proto = apply_plan(model, ana, plan)
        check(proto, model.proto, model.path)
        return proto
    proto = hook("rewrite", rewrite)
    hook("save", lambda: save_atomic(proto, out))
    return {"nodes": len(model.graph.node), "groups": len(ana.groups),
            "channels": int(ana.n_channels), "groups_pruned": len(plan.keep),
            "params": _params(model.proto), "params_after": _params(proto),
            "file_mb": os.path.getsize(path) / 1e6, "out_mb": os.path.getsize(out) / 1e6}


def child(name: str, runs: int) -> dict:
    import spa.analysis  # noqa: F401  (imports are not part of any stage)
    import spa.api  # noqa: F401
    import spa.ops  # noqa: F401
    import spa.rewrite.apply  # noqa: F401
    path = model_path(name)
    out = os.path.join(tempfile.mkdtemp(prefix="spa-bench-"), "pruned.onnx")
    gc.collect()
    result = {"rss_base_mb": _status_mb("VmRSS"), "rss_peak_mb": {}, "rss_growth_mb": {},
              "times": {s: [] for s in STAGES}, "cpu": {s: [] for s in STAGES}, "cold": {},
              "py_peak_mb": {}}
    per_stage = _reset_peak_rss() and _status_mb("VmHWM") is not None

    # 1. cold run: peak RSS of each stage, and how far above the RSS at its start it went
    def cold(stage, fn):
        if per_stage:
            _reset_peak_rss()
        before = _status_mb("VmRSS") if per_stage else _maxrss_mb()
        t = time.perf_counter()
        r = fn()
        result["cold"][stage] = time.perf_counter() - t
        peak = _status_mb("VmHWM") if per_stage else _maxrss_mb()
        result["rss_peak_mb"][stage] = peak
        result["rss_growth_mb"][stage] = peak - before
        return r
    result["info"] = _pipeline(path, out, cold)
    result["rss_kind"] = "VmHWM per stage" if per_stage else "ru_maxrss"
    gc.collect()

    # 2. timed runs (wall and process CPU time: CPU time is less disturbed by other jobs)
    def timed(stage, fn):
        t, c = time.perf_counter(), time.process_time()
        r = fn()
        result["times"][stage].append(time.perf_counter() - t)
        result["cpu"][stage].append(time.process_time() - c)
        return r
    for _ in range(runs):
        _pipeline(path, out, timed)
        gc.collect()

    # 3. tracemalloc: peak of Python + numpy allocations above what was alive before the
    # stage (protobuf's own arenas are not traced; the RSS column covers them)
    tracemalloc.start()

    def traced(stage, fn):
        cur = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        r = fn()
        result["py_peak_mb"][stage] = (tracemalloc.get_traced_memory()[1] - cur) / 2**20
        return r
    _pipeline(path, out, traced)
    tracemalloc.stop()
    os.unlink(out)
    os.rmdir(os.path.dirname(out))
    return result


def profile(name: str, top: int = 15) -> None:
    """One cold pipeline under cProfile; the top functions of each stage by own time and by
    cumulative time, with each one's share of the stage."""
    import cProfile
    import io
    import pstats
    path = model_path(name)
    out = os.path.join(tempfile.mkdtemp(prefix="spa-bench-"), "pruned.onnx")
    profs = {}

    def hook(stage, fn):
        pr = cProfile.Profile()
        r = pr.runcall(fn)
        profs[stage] = pr
        return r
    _pipeline(path, out, hook)
    os.unlink(out)
    os.rmdir(os.path.dirname(out))
    for stage in STAGES:
        st = pstats.Stats(profs[stage])
        total = st.total_tt
        print(f"\n=== {name} / {stage}: {total:.3f} s under cProfile")
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            st.stream = buf
            st.sort_stats(key)
            rows = []
            for func in st.fcn_list[:top]:
                cc, nc, tt, ct, _ = st.stats[func]
                t = tt if key == "tottime" else ct
                where = f"{os.path.relpath(func[0], ROOT) if func[0].startswith(ROOT) else func[0]}" \
                    f":{func[1]}({func[2]})"
                rows.append(f"  {100 * t / total:5.1f}%  {t:7.3f} s  {nc:7d}x  {where}")
            print(f" by {key}:")
            print("\n".join(rows))


def child_torch_pruning(runs: int, threads: int = 0) -> dict:
    """Torch-Pruning on the same ResNet-50: DependencyGraph build (inside the pruner's
    constructor) + one-shot 50 % magnitude (L2) prune step, fc left alone."""
    import copy

    import torch
    import torch_pruning as tp
    from importlib.metadata import version

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_resnet50 import resnet50

    if threads:
        torch.set_num_threads(threads)
    template = resnet50()
    example = torch.randn(1, 3, 224, 224)
    params = sum(p.numel() for p in template.parameters()) + \
        sum(b.numel() for n, b in template.named_buffers() if not n.endswith("num_batches_tracked"))
    res = {"version": version("torch-pruning"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "build": [], "step": [], "total": [], "cpu": []}
    gc.collect()
    per_stage = _reset_peak_rss() and _status_mb("VmHWM") is not None
    for r in range(runs + 1):
        model = copy.deepcopy(template)
        if r == 0 and per_stage:
            _reset_peak_rss()
        rss0 = _status_mb("VmRSS") if per_stage else _maxrss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=RATIO, ignored_layers=[model.fc])
        t1 = time.perf_counter()
        pruner.step()
        t2, c2 = time.perf_counter(), time.process_time()
        if r == 0:  # the cold run is not counted
            res["cold"] = t2 - t0
            peak = _status_mb("VmHWM") if per_stage else _maxrss_mb()
            res["rss_peak_mb"], res["rss_growth_mb"] = peak, peak - rss0
            after = sum(p.numel() for p in model.parameters()) + \
                sum(b.numel() for n, b in model.named_buffers()
                    if not n.endswith("num_batches_tracked"))
            with torch.no_grad():
                assert model(example).shape == (1, 1000)
            res["params"], res["params_after"] = params, after
            continue
        res["build"].append(t1 - t0)
        res["step"].append(t2 - t1)
        res["total"].append(t2 - t0)
        res["cpu"].append(c2 - c0)
        del pruner, model
        gc.collect()
    return res


# ------------------------------------------------------------------------------------------
# parent: run children, print, write the doc


def run_child(args: list[str], timeout: float = 600) -> dict | str:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"failed (exit {p.returncode}): {tail[0]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(name: str, r: dict) -> dict:
    t = {s: med(r["times"][s]) for s in STAGES}
    totals = [sum(v) for v in zip(*(r["times"][s] for s in STAGES))]
    t["total"] = med(totals)
    t["best"] = min(totals)
    t["cpu"] = med([sum(v) for v in zip(*(r["cpu"][s] for s in STAGES))])
    t["analyze+plan"] = med([a + b for a, b in zip(r["times"]["analyze"], r["times"]["plan"])])
    t["cpu analyze+plan"] = med([a + b for a, b in zip(r["cpu"]["analyze"], r["cpu"]["plan"])])
    return {"name": name, "label": MODELS[name][3], "runs": len(r["times"]["load"]), **r["info"],
            "t": t, "cold_total": sum(r["cold"].values()), "rss_base_mb": r["rss_base_mb"],
            "rss_peak_mb": r["rss_peak_mb"], "rss_growth_mb": r["rss_growth_mb"],
            "rss_kind": r["rss_kind"], "py_peak_mb": r["py_peak_mb"], "times": r["times"]}


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def tables(rows: list[dict], tp: list[dict] | str | None) -> str:
    out = []
    out.append("| model | nodes | params | groups (pruned) | params after | runs | "
               + " | ".join(STAGES) + " | **total** | best | CPU | analyze+plan |")
    out.append("|---|---:|---:|---:|---:|---:|" + "---:|" * (len(STAGES) + 4))
    for r in rows:
        t = r["t"]
        out.append(f"| {r['label']} | {r['nodes']} | {r['params'] / 1e6:.2f} M | "
                   f"{r['groups']} ({r['groups_pruned']}) | {r['params_after'] / 1e6:.2f} M | "
                   f"{r['runs']} | " + " | ".join(fmt_s(t[s]) for s in STAGES) +
                   f" | **{fmt_s(t['total'])}** | {fmt_s(t['best'])} | {fmt_s(t['cpu'])} | "
                   f"{fmt_s(t['analyze+plan'])} |")
    out.append("")
    out.append("Wall-clock seconds, median of the timed runs in one process (a cold first "
               "run is excluded; its total is in the memory table). *best*: fastest total; "
               "*CPU*: median process CPU time of the total (less disturbed by other jobs on "
               "the machine). *rewrite* includes `onnx.checker` (full check); *load* includes "
               "shape inference; *plan* includes L2 scoring and the model's sha256.")
    out.append("")
    out.append("| model | file MB | cold total s | RSS after imports MB | "
               + " | ".join(f"{s}: peak RSS (+growth)" for s in STAGES) + " | "
               + " | ".join(f"py peak {s}" for s in STAGES) + " |")
    out.append("|---|---:|---:|---:|" + "---:|" * (2 * len(STAGES)))
    for r in rows:
        out.append(f"| {r['label']} | {r['file_mb']:.1f} | {fmt_s(r['cold_total'])} | "
                   f"{r['rss_base_mb']:.0f} | "
                   + " | ".join(f"{r['rss_peak_mb'][s]:.0f} (+{r['rss_growth_mb'][s]:.0f})"
                                for s in STAGES) + " | "
                   + " | ".join(f"{r['py_peak_mb'][s]:.0f}" for s in STAGES) + " |")
    out.append("")
    kind = rows[0]["rss_kind"] if rows else ""
    out.append("Memory in MB, from the cold run. *peak RSS*: the process's resident-set "
               "high-water mark during that stage (" + kind + ": reset before each stage "
               "through /proc/self/clear_refs), *+growth*: how far it rose above the RSS at "
               "the stage's start. *py peak*: `tracemalloc` peak of Python + numpy "
               "allocations during the stage above what was alive before it (protobuf's "
               "arenas are not traced; the RSS columns cover them).")
    stacked = [r for r in rows if r["name"].startswith("stacked-")]
    if len(stacked) >= 2:
        out.append("")
        out.append("Depth scaling (residual basic blocks, width 16, 8x8 input):")
        out.append("")
        out.append("| blocks | nodes | total s | µs per node | "
                   + " | ".join(f"{s} µs/node" for s in STAGES) + " |")
        out.append("|---:|---:|---:|---:|" + "---:|" * len(STAGES))
        for r in stacked:
            n = r["nodes"]
            out.append(f"| {r['name'].split('-')[1]} | {n} | {fmt_s(r['t']['total'])} | "
                       f"{1e6 * r['t']['total'] / n:.0f} | "
                       + " | ".join(f"{1e6 * r['t'][s] / n:.0f}" for s in STAGES) + " |")
        out.append("")
        for a, b in zip(stacked, stacked[1:]):
            slopes = []
            for s in ("total",) + STAGES:
                ta, tb = a["t"][s], b["t"][s]
                if ta > 0 and tb > 0:
                    slopes.append(f"{s} {math.log(tb / ta) / math.log(b['nodes'] / a['nodes']):.2f}")
            out.append(f"Growth exponent k (time ∝ nodes^k; 1.0 = linear) from {a['nodes']} to "
                       f"{b['nodes']} nodes: " + ", ".join(slopes) + ".")
            out.append("")
        out.pop()
    if tp is not None:
        out.append("")
        if isinstance(tp, str):
            out.append(f"Torch-Pruning: {tp}")
        else:
            t0 = tp[0]
            out.append(f"Torch-Pruning {t0['version']} (torch {t0['torch']}) on the same "
                       f"ResNet-50 as a torch module (`benchmarks/torch_resnet50.py`), "
                       f"example input 1x3x224x224, `MagnitudePruner(importance="
                       f"MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[fc])`; "
                       f"median of {len(t0['total'])} in one process (cold run excluded). "
                       f"Torch runs with 1 thread by default here: with 2 threads on this "
                       f"shared 2-core machine it measured 5-10x slower (busy-waiting "
                       f"threads; `--tp-threads 1 0` runs both). Its DependencyGraph "
                       f"build traces one forward pass; its prune step also slices the "
                       f"weights (SPA's rewrite).")
            out.append("")
            out.append("| | graph build / analyze | prune step / plan | **total** | CPU | "
                       "peak RSS MB (+growth) | params after |")
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for t in tp:
                out.append(f"| Torch-Pruning, {t['threads']} thread{'s' * (t['threads'] > 1)} "
                           f"| {fmt_s(med(t['build']))} | {fmt_s(med(t['step']))}"
                           f" | **{fmt_s(med(t['total']))}** | {fmt_s(med(t['cpu']))} | "
                           f"{t['rss_peak_mb']:.0f} (+{t['rss_growth_mb']:.0f}) | "
                           f"{t['params_after'] / 1e6:.2f} M |")
            r50 = [r for r in rows if r["name"] == "resnet50"]
            if r50:
                r = r50[0]
                peak = max(r["rss_peak_mb"][s] for s in ("analyze", "plan"))
                grow = r["rss_growth_mb"]["analyze"] + r["rss_growth_mb"]["plan"]
                out.append(f"| SPA analyze + plan | {fmt_s(r['t']['analyze'])} | "
                           f"{fmt_s(r['t']['plan'])} | **{fmt_s(r['t']['analyze+plan'])}** | "
                           f"{fmt_s(r['t']['cpu analyze+plan'])} | {peak:.0f} (+{grow:.0f}) | {r['params_after'] / 1e6:.2f} M |")
                ap_rw = med([a + b + c for a, b, c in zip(
                    *(r["times"][s] for s in ("analyze", "plan", "rewrite")))]) \
                    if "times" in r else None
                if ap_rw is not None:
                    out.append(f"| SPA analyze + plan + rewrite | | | {fmt_s(ap_rw)} | | | |")
    return "\n".join(out)


def verdicts(rows: list[dict], tp: list[dict] | str | None) -> list[str]:
    out = []
    by = {r["name"]: r for r in rows}
    for name, limit in TARGETS.items():
        if name in by:
            t = by[name]["t"]["total"]
            out.append(f"- {by[name]['label']} end to end ≤ {limit} s: "
                       f"{'**met**' if t <= limit else '**missed**'} ({fmt_s(t)} s)")
    if "resnet50" in by and isinstance(tp, list):
        a, b = by["resnet50"]["t"]["analyze+plan"], min(med(t["total"]) for t in tp)
        ac = by["resnet50"]["t"]["cpu analyze+plan"]
        bc = min(med(t["cpu"]) for t in tp)
        out.append(f"- ResNet-50 analysis + planning no slower than Torch-Pruning: "
                   f"{'**met**' if a <= b else '**missed**'} ({fmt_s(a)} s vs {fmt_s(b)} s "
                   f"wall; CPU time {fmt_s(ac)} s vs {fmt_s(bc)} s)")
        out.append(f"- the same against the issue's Torch-Pruning figure ({TP_ISSUE_S} s): "
                   f"{'**met**' if a <= TP_ISSUE_S else '**missed**'} ({fmt_s(a)} s)")
    st = [by[k] for k in ("stacked-10", "stacked-100", "stacked-1000") if k in by]
    if len(st) >= 2:
        a, b = st[-2], st[-1]
        lg = math.log(b["nodes"] / a["nodes"])
        kw = math.log(b["t"]["total"] / a["t"]["total"]) / lg
        kc = math.log(b["t"]["cpu"] / a["t"]["cpu"]) / lg
        per_a, per_b = a["t"]["total"] / a["nodes"], b["t"]["total"] / b["nodes"]
        out.append(f"- growth linear in nodes: {'**met**' if max(kw, kc) <= 1.05 else '**missed**'}"
                   f" from {a['nodes']} to {b['nodes']} nodes: exponent {kw:.2f} (wall), "
                   f"{kc:.2f} (CPU); time per node {1e6 * per_a:.0f} → {1e6 * per_b:.0f} µs "
                   f"(rewrite: {1e6 * a['t']['rewrite'] / a['nodes']:.0f} → "
                   f"{1e6 * b['t']['rewrite'] / b['nodes']:.0f} µs)")
    return out


def write_doc(section: str) -> None:
    text = ""
    if os.path.exists(DOC):
        with open(DOC) as f:
            text = f.read()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        head = "# Benchmarks\n\n" if not text else text.rstrip() + "\n\n"
        text = head + "## Engine: analyze + prune\n\n" + block + "\n"
    write_text_atomic(DOC, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=[*MODELS, "torch-pruning"],
                    help="run only these (default: all)")
    ap.add_argument("--runs", type=int, help="timed runs per model (default: 5, 3 for 1000 blocks)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: one run of each --only model under cProfile, "
                    "printing each stage's hot spots")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tp-threads", type=int, nargs="+", default=[1], metavar="N",
                    help="torch thread counts to run Torch-Pruning with (0: torch's default, "
                    "one per core; default: 1, the faster one on a busy 2-core machine)")
    args = ap.parse_args()

    if args.child:
        r = child_torch_pruning(args.runs, args.threads) if args.child == "torch-pruning" else \
            child(args.child, args.runs)
        print(json.dumps(r))
        return 0

    only = args.only or [*MODELS, "torch-pruning"]
    if args.profile:
        for name in only:
            if name in MODELS:
                profile(name)
        return 0
    start = time.perf_counter()
    load0 = os.getloadavg()
    rows, tp = [], None
    for name in MODELS:
        if name not in only:
            continue
        model_path(name)  # generate outside the measured process
        runs = args.runs or MODELS[name][2]
        print(f"{name}: {runs} timed runs ...", flush=True)
        r = run_child(["--child", name, "--runs", str(runs)])
        if isinstance(r, str):
            print(f"  {r}")
            continue
        rows.append(summarize(name, r))
        t = rows[-1]["t"]
        print("  " + "  ".join(f"{s} {fmt_s(t[s])}" for s in STAGES) +
              f"  total {fmt_s(t['total'])} s", flush=True)
    if "torch-pruning" in only:
        print("torch-pruning: ...", flush=True)
        try:
            import torch_pruning  # noqa: F401
            tp = []
            for threads in args.tp_threads:
                r = run_child(["--child", "torch-pruning", "--runs", str(args.runs or 5),
                               "--threads", str(threads)])
                print(f"  {r if isinstance(r, str) else 'total ' + fmt_s(med(r['total'])) + ' s'}"
                      f" ({r['threads'] if isinstance(r, dict) else threads} threads)")
                tp.append(r)
            tp = [r for r in tp if isinstance(r, dict)] or tp[0]
        except ImportError:
            tp = ("not installed (`pip install torch-pruning==1.6.1 -c constraints.txt` into "
                  "the venv to compare)")

    section = tables(rows, tp)
    judged = verdicts(rows, tp)
    load1 = os.getloadavg()
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    header = (f"Generated by `python benchmarks/engine.py` on {now} "
              f"({time.perf_counter() - start:.0f} s). Machine: {os.cpu_count()} cores "
              f"({cpu}), shared with other jobs (load average {load0[0]:.1f} at start, "
              f"{load1[0]:.1f} at end), Python {platform.python_version()}, "
              f"{platform.system()}. Plan: ratio {RATIO}, criterion {CRITERION}, local "
              f"(uniform) selection; rewrite includes `onnx.checker` (full check); load "
              f"includes shape inference. Models from `models/synthetic.py` (seeded random "
              f"weights).")
    doc = header + "\n\n" + section + ("\n\nTargets (core issue):\n\n" + "\n".join(judged)
                                       if judged else "")
    print()
    print(section)
    if judged:
        print()
        print("\n".join(judged))
    if not args.no_write and not args.only:
        write_doc(doc)
        print(f"\nwrote {os.path.relpath(DOC, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
