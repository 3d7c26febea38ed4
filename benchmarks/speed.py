"""Speed benchmark: measured latency speed-up against the FLOPs reduction, and latency-budget
pruning (asked against measured latency), with ONNX Runtime on this machine.

    python benchmarks/speed.py flops   --model resnet50 --batch 1        # 70/50/30 % FLOPs
    python benchmarks/speed.py flops   --model resnet50 --batch 32 --repeat 5
    python benchmarks/speed.py latency --model resnet50 --batch 1 --targets 0.7 0.5
    python benchmarks/speed.py report [--write]   # tables from all saved runs (docs/speed.md)

Models: `resnet50` (models.synthetic.resnet50_like, 3x224x224), `bert` (bert_base_like,
seq 128), `mobilenetv2` (MobileNetV2 1.0 at 3x224x224 with ImageNet strides, generated
here), `mobilenetv2_small` (the torch zoo's MobileNetV2 x0.5 for 32x32, dynamo export).
Pruning: L2 magnitude, `--select global`, widths multiples of `--round-to` (default: 16, the
AVX-512 channel block of ONNX Runtime's fast convolutions, and 1 for comparison).

Every run measures all its models interleaved in one process (spa.bench: round r starts
with model r mod n, medians, per-round speed-up ratios for the spread) and saves its rows to
.cache/speed/<part>-<model>-b<batch>.json with the machine, the load average and the time,
so that separate runs (each kept under ~10 minutes) make one report.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import inspect
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

import spa  # noqa: E402
from spa import bench, latency  # noqa: E402
from spa.cost import cost_model  # noqa: E402
from spa.criteria import score  # noqa: E402
from spa.ir import load, write_text_atomic  # noqa: E402
from spa.rewrite.apply import apply_plan  # noqa: E402
from spa.select import global_rank  # noqa: E402

CACHE = os.path.join(ROOT, ".cache", "speed")
DOC = os.path.join(ROOT, "docs", "speed.md")
BEGIN, END = "<!-- speed.py:{}:begin -->", "<!-- speed.py:{}:end -->"
LABELS = {
    "resnet50": "ResNet-50-sized CNN (3x224x224, 4.1 GMACs)",
    "mobilenetv2": "MobileNetV2 1.0 (3x224x224, ImageNet strides)",
    "mobilenetv2_small": "MobileNetV2 x0.5 (3x32x32, torch zoo export)",
    "bert": "BERT-base-sized encoder (seq 128)",
}


# ------------------------------------------------------------------------------------------
# models


def mobilenetv2_like(width: float = 1.0, image: int = 224, classes: int = 1000,
                     seed: int = 0):
    """MobileNetV2 (Sandler et al. 2018) with the ImageNet strides: inverted residuals
    (1x1 expand, ReLU6; 3x3 depthwise, ReLU6; 1x1 project), BN after every conv; ~300 M MACs
    and 3.5 M parameters at width 1.0, 224x224."""
    from models.synthetic import G, _he

    g = G(opset=18, seed=seed)
    lo, hi = g.const(np.float32(0.0)), g.const(np.float32(6.0))

    def div8(v):
        return max(8, int(v + 4) // 8 * 8)

    def cbr(x, cin, cout, k, stride=1, group=1, act=True):
        y = g.op("Conv", [x, _he(g, cout, cin // group, k, k)], kernel_shape=[k, k],
                 pads=[k // 2] * 4, strides=[stride, stride], group=group)
        y = g.bn(y, cout)
        return g.op("Clip", [y, lo, hi]) if act else y

    x = g.input(["batch", 3, image, image], name="input")
    cin = div8(32 * width)
    y = cbr(x, 3, cin, 3, stride=2)
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        cout = div8(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            h = cbr(y, cin, hidden, 1) if t != 1 else y
            h = cbr(h, hidden, hidden, 3, stride=stride, group=hidden)
            h = cbr(h, hidden, cout, 1, act=False)
            y = g.op("Add", [y, h]) if stride == 1 and cin == cout else h
            cin = cout
    last = div8(1280 * max(1.0, width))
    y = cbr(y, cin, last, 1)
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    g.output(g.op("Gemm", [y, g.w(classes, last, scale=0.02), g.w(classes, scale=0.0)],
                  transB=1))
    return g.model()


def model_path(name: str) -> str:
    if name == "resnet50":
        from engine import model_path as engine_model
        return engine_model("resnet50")
    if name == "bert":
        from engine import model_path as engine_model
        return engine_model("bert-base")
    if name == "mobilenetv2_small":
        from models.export import export_zoo_entry
        return str(export_zoo_entry("mobilenetv2_small", exporter="dynamo"))
    if name == "mobilenetv2":
        import onnx
        src = inspect.getsource(mobilenetv2_like) + inspect.getsource(
            __import__("models.synthetic", fromlist=["G"]))
        key = hashlib.sha256(src.encode()).hexdigest()[:12]
        path = os.path.join(ROOT, ".cache", "bench", f"mobilenetv2-{key}.onnx")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            os.close(fd)
            onnx.save(mobilenetv2_like(), tmp)
            os.replace(tmp, path)
        return path
    raise SystemExit(f"unknown model {name!r} (use one of {', '.join(LABELS)})")


# ------------------------------------------------------------------------------------------
# runs


def machine() -> dict:
    import onnxruntime as ort
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = None
    if "CUDAExecutionProvider" in ort.get_available_providers():
        import subprocess
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = "unknown CUDA device"
    return {"cpu": cpu, "gpu": gpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "python": platform.python_version(), "load": [round(x, 2) for x in os.getloadavg()],
            "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def save(part: str, name: str, batch: int, data: dict) -> str:
    os.makedirs(CACHE, exist_ok=True)
    dev = "" if data.get("provider", "cpu") == "cpu" else f"-{data['provider']}"
    path = os.path.join(CACHE, f"{part}-{name}-b{batch}{dev}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def adaptive_repeat(m, protos, batch: int, provider: str = "cpu",
                    budget_s: float = 30.0) -> int:
    """Interleaved rounds that fit in about `budget_s`: the dense model timed once, the
    others assumed to take their share (at least 5 rounds, at most 200)."""
    run = bench.Runner(bench.make_session(m.proto, provider), bench.feeds_for(m, batch),
                       provider)
    run()
    t = time.perf_counter()
    run()
    one = time.perf_counter() - t
    return int(min(200, max(5, budget_s / max(one * len(protos) * 0.7, 1e-6))))


def run_flops(name: str, batch: int, fractions, round_tos, repeat: int,
              provider: str = "cpu") -> dict:
    """The model and its global-L2 plans at each FLOPs fraction and width multiple, all
    interleaved at one batch size."""
    path = model_path(name)
    m = load(path)
    a = spa.analyze(m)
    scores = score(a, "l2")
    cm = cost_model(a)
    variants, protos = [], [m.proto]
    for rt in round_tos:
        for f in fractions:
            plan = global_rank(a, scores, ("flops", f), round_to=rt)
            protos.append(apply_plan(m, a, plan))
            macs = cm.evaluate(plan.removed(a), ("macs",))["macs"] / cm.original["macs"]
            variants.append({"flops_target": f, "round_to": rt, "macs": round(macs, 4)})
    t = time.perf_counter()
    info = machine()
    repeat = repeat or adaptive_repeat(m, protos, batch, provider)
    rows = bench.compare(protos, batch=batch, repeat=repeat, model=m, provider=provider)
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    out = {"model": name, "batch": batch, "repeat": repeat, "machine": info,
           "provider": provider,
           "seconds": round(time.perf_counter() - t, 1),
           "dense_ms": rows[0]["median_ms"], "dense_spread": rows[0]["spread"], "rows": []}
    for v, r in zip(variants, rows[1:]):
        red = 1.0 / v["macs"]
        out["rows"].append({**v, "median_ms": r["median_ms"], "speedup": r["speedup"],
                            "speedup_p10": r["speedup_p10"], "speedup_p90": r["speedup_p90"],
                            "flops_reduction": red, "ratio": r["speedup"] / red})
    return out


def run_latency(name: str, batch: int, targets, round_to: int, rounds: int,
                repeat: int, provider: str = "cpu") -> dict:
    """Latency-budget pruning (global selection) at each target, then one independent,
    interleaved re-measurement of all results against the original."""
    path = model_path(name)
    m = load(path)
    settings = latency.LatencySettings(provider=provider, batch=batch, align=round_to,
                                       rounds=rounds,
                                       log=lambda s: print("   ", s, flush=True))
    info = machine()
    results, protos = [], [m.proto]
    t_all = time.perf_counter()
    for f in targets:
        t = time.perf_counter()
        res = spa.prune(m, target=f"latency:{f}", select="global", round_to=round_to,
                        latency=settings)
        lat = res.plan.options["latency"]
        results.append({"asked": f, "predicted": lat["predicted"], "measured": lat["measured"],
                        "rounds": lat["rounds"], "seconds": round(time.perf_counter() - t, 1),
                        "tables_measured": lat["model"]["measured_points"],
                        "macs": res.after["macs"] / res.before["macs"],
                        "model": {k: lat["model"][k] for k in
                                  ("dense_ms", "scale", "const_ms", "rest_ms",
                                   "heavy_nodes")}})
        protos.append(res.proto)
        print(f"  latency:{f}: predicted {lat['predicted']:.3f} measured {lat['measured']:.3f}"
              f" after {len(lat['rounds'])} round(s), {results[-1]['seconds']} s", flush=True)
    repeat = repeat or adaptive_repeat(m, protos, batch, provider)
    rows = bench.compare(protos, batch=batch, repeat=repeat, model=m, provider=provider)
    for r, row in zip(results, rows[1:]):
        r["remeasured"] = row["fraction"]
        r["remeasured_p10"] = 1.0 / row["speedup_p90"]
        r["remeasured_p90"] = 1.0 / row["speedup_p10"]
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return {"model": name, "batch": batch, "round_to": round_to, "machine": info,
            "repeat": repeat, "provider": provider,
            "seconds": round(time.perf_counter() - t_all, 1), "dense_ms": rows[0]["median_ms"],
            "rows": results}


# ------------------------------------------------------------------------------------------
# report


def _load(part: str) -> list[dict]:
    out = []
    for p in sorted(glob.glob(os.path.join(CACHE, f"{part}-*.json"))):
        with open(p) as f:
            out.append(json.load(f))
    order = list(LABELS)
    return sorted(out, key=lambda d: (order.index(d["model"]) if d["model"] in order else 99,
                                      d["batch"]))


def _dev(d: dict) -> str:
    p = d.get("provider", "cpu")
    return "CPU" if p == "cpu" else f"CUDA ({d['machine'].get('gpu') or 'GPU'})"


def report() -> dict[str, str]:
    """{"flops": table, "latency": table} of all saved runs."""
    sections = {}
    lines = []
    flops = _load("flops")
    if flops:
        lines += ["| model | provider | batch | round-to | FLOPs kept | FLOPs reduction | "
                  "latency (ms, dense → pruned) | speed-up (p10–p90) | speed-up / FLOPs "
                  "reduction |", "|---|---|---|---|---|---|---|---|---|"]
        for d in flops:
            for r in d["rows"]:
                lines.append(
                    f"| {LABELS.get(d['model'], d['model'])} | {_dev(d)} | {d['batch']} | "
                    f"{r['round_to']} "
                    f"| {r['macs']:.3f} | {r['flops_reduction']:.2f}× | {d['dense_ms']:.1f} → "
                    f"{r['median_ms']:.1f} | {r['speedup']:.2f}× ({r['speedup_p10']:.2f}–"
                    f"{r['speedup_p90']:.2f}) | **{r['ratio']:.2f}** |")
        lines.append("")
        lines.append("Runs (machine load = 1/5/15-minute load average before → after):")
        lines.append("")
        for d in flops:
            mc = d["machine"]
            lines.append(f"- {d['model']} batch {d['batch']}: {d['repeat']} interleaved "
                         f"rounds, {d['seconds']} s, {mc['when']}, load {mc['load']} → "
                         f"{mc.get('load_after')}")
        lines.append("")
    sections["flops"], lines = lines, []
    lat = _load("latency")
    if lat:
        lines += ["| model | provider | batch | round-to | asked | predicted | measured (in "
                  "the loop) | rounds | re-measured (p10–p90) | miss | FLOPs kept | time (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for d in lat:
            for r in d["rows"]:
                lines.append(
                    f"| {LABELS.get(d['model'], d['model'])} | {_dev(d)} | {d['batch']} | "
                    f"{d['round_to']} | {r['asked']:.2f} | {r['predicted']:.3f} | "
                    f"{r['measured']:.3f} | {len(r['rounds'])} | {r['remeasured']:.3f} ({r['remeasured_p10']:.3f}–"
                    f"{r['remeasured_p90']:.3f}) | {100 * (r['measured'] / r['asked'] - 1):+.1f} %"
                    f" | {r['macs']:.3f} | {r['seconds']} |")
        lines.append("")
        lines.append("Runs:")
        lines.append("")
        for d in lat:
            mc = d["machine"]
            how = "measuring the tables" if any(r["tables_measured"] for r in d["rows"]) \
                else "tables and calibration from the cache"
            lines.append(f"- {d['model']} batch {d['batch']}: {d['seconds']} s ({how}), "
                         f"{mc['when']}, load {mc['load']} → {mc.get('load_after')}")
        lines.append("")
    sections["latency"] = lines
    if flops or lat:
        mc = (flops or lat)[0]["machine"]
        for k in sections:
            sections[k].append(f"Machine: {mc['cpu']}, {mc['cores']} cores, onnxruntime "
                               f"{mc['onnxruntime']}, Python {mc['python']}; default "
                               "threads.")
    return {k: "\n".join(v) for k, v in sections.items()}


def write_doc(sections: dict[str, str]) -> None:
    with open(DOC) as f:
        text = f.read()
    for name, section in sections.items():
        begin, end = BEGIN.format(name), END.format(name)
        if begin not in text or end not in text:
            raise SystemExit(f"{DOC} has no {begin} ... {end} block")
        text = text[:text.index(begin)] + f"{begin}\n{section}\n{end}" + \
            text[text.index(end) + len(end):]
    write_text_atomic(DOC, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    f = sub.add_parser("flops", help="speed-up vs FLOPs reduction (global selection)")
    f.add_argument("--model", required=True, choices=list(LABELS))
    f.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    f.add_argument("--batch", type=int, nargs="+", default=[1])
    f.add_argument("--fractions", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    f.add_argument("--round-to", type=int, nargs="+", default=[16, 1])
    f.add_argument("--repeat", type=int, default=0,
                   help="interleaved rounds (default 0: as many as fit in ~30 s, 5 to 200)")
    la = sub.add_parser("latency", help="latency-budget pruning: asked vs measured")
    la.add_argument("--model", required=True, choices=list(LABELS))
    la.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    la.add_argument("--batch", type=int, default=1)
    la.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    la.add_argument("--round-to", type=int, default=16)
    la.add_argument("--rounds", type=int, default=3)
    la.add_argument("--repeat", type=int, default=0,
                    help="interleaved rounds of the final re-measurement (0: ~30 s)")
    r = sub.add_parser("report", help="print the tables of all saved runs")
    r.add_argument("--write", action="store_true", help="and put them into docs/speed.md")
    args = ap.parse_args()
    if args.part == "flops":
        for b in args.batch:
            print(f"{args.model} batch {b}: dense + {len(args.fractions) * len(args.round_to)}"
                  " pruned models, interleaved ...", flush=True)
            d = run_flops(args.model, b, args.fractions, args.round_to, args.repeat,
                          args.provider)
            for row in d["rows"]:
                print(f"  flops {row['flops_target']} round-to {row['round_to']}: kept "
                      f"{row['macs']:.3f}, speed-up {row['speedup']:.2f}x "
                      f"({row['speedup_p10']:.2f}-{row['speedup_p90']:.2f}) vs FLOPs "
                      f"reduction {row['flops_reduction']:.2f}x: ratio {row['ratio']:.2f}")
            print(f"  saved {save('flops', args.model, b, d)} ({d['seconds']} s)")
    elif args.part == "latency":
        print(f"{args.model} batch {args.batch}: latency targets {args.targets}", flush=True)
        d = run_latency(args.model, args.batch, args.targets, args.round_to, args.rounds,
                        args.repeat, args.provider)
        for row in d["rows"]:
            print(f"  asked {row['asked']}: predicted {row['predicted']:.3f}, measured "
                  f"{row['measured']:.3f} ({len(row['rounds'])} rounds), re-measured "
                  f"{row['remeasured']:.3f}")
        print(f"  saved {save('latency', args.model, args.batch, d)} ({d['seconds']} s)")
    else:
        sections = report()
        print("\n\n".join(sections.values()))
        if args.write:
            write_doc(sections)
            print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
