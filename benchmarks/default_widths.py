"""Default widths: how much faster the models SPA prunes with its DEFAULT options run.

    python benchmarks/default_widths.py                       # ResNet-50, MobileNetV2, BERT
    python benchmarks/default_widths.py --models resnet50 --batches 8 32
    python benchmarks/default_widths.py --models mobilenetv2 --fractions 0.5 --batches 1 \\
        --repeat 3 --no-write                                # a quick check that it runs
    python benchmarks/default_widths.py --kernels            # conv / matmul rate per width

Every model is pruned once per FLOPs fraction with `spa.prune(model, target="flops:F",
criterion="l2")` -- nothing else, so `--round-to auto` (conv groups at multiples of the
CPU's channel block, docs/speed.md "Default widths") and the uniform selection are what is
measured -- then the original and its pruned versions run interleaved in one process
(spa.bench) at each batch size: the median per model, the p10-p90 range of the per-round
speed-up ratios, and the machine load before and after. `--also-round-to 1` adds the same
plans with exact counts for comparison. Rows go to benchmarks/default_widths.json (merged
with the (model, batch) pairs of earlier runs) and, unless --no-write, the table into
docs/speed.md between the default_widths markers.

`--kernels` times chains of 3x3 convolutions and pairs of matrix products at widths around
a multiple of the block, with the kernel ONNX Runtime chose, to check the claims the
"Default widths" section makes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

import spa  # noqa: E402
from spa import bench, latency  # noqa: E402
from spa.docgen import write_between  # noqa: E402
from speed import LABELS, adaptive_repeat, machine, model_path  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "default_widths.json")
DOC = os.path.join(ROOT, "docs", "speed.md")
MARK = "<!-- default_widths.py:{}:{} -->"
MODELS = ("resnet50", "mobilenetv2", "bert")
#: target: speed-up / FLOPs reduction at least this for ResNet-50 at batch >= 8
TARGET = 0.9


def _load_rows() -> dict:
    if os.path.exists(OUT):
        with open(OUT) as f:
            return json.load(f)
    return {"runs": []}


def _save_rows(data: dict) -> None:
    from spa.ir import write_text_atomic
    order = {m: k for k, m in enumerate(MODELS)}
    data["runs"].sort(key=lambda r: (order.get(r["model"], 99), r["batch"]))
    write_text_atomic(OUT, json.dumps(data, indent=1, sort_keys=True) + "\n")


def prune_all(name: str, fractions, also) -> tuple[object, list[dict], list]:
    """The model and its default-option plans at each fraction (plus `also` round-to)."""
    m = spa.load(model_path(name))
    variants, protos = [], []
    for rt in [None, *also]:
        for f in fractions:
            t = time.perf_counter()
            kw = {} if rt is None else {"round_to": rt}
            res = spa.prune(m, target=f"flops:{f}", criterion="l2", **kw)
            o = res.plan.options
            scope = o.get("round_to_scope")
            variants.append({
                "flops_target": f, "round_to": "auto" if rt is None else rt,
                "resolved": f"{o['round_to']}" + (f" ({scope})" if scope else ""),
                "select": o.get("select", "uniform"),
                "macs_kept": round(res.after["macs"] / res.before["macs"], 4),
                "params_kept": round(res.after["params"] / res.before["params"], 4),
                "prune_s": round(time.perf_counter() - t, 1)})
            protos.append(res.proto)
            print(f"  {name} flops:{f} round-to {variants[-1]['round_to']} "
                  f"({variants[-1]['resolved']}): kept {variants[-1]['macs_kept']:.3f} of the "
                  f"MACs, {variants[-1]['prune_s']} s", flush=True)
    return m, variants, protos


def measure(name: str, m, variants, protos, batch: int, repeat: int) -> dict:
    everything = [m.proto, *protos]
    info = machine()
    t = time.perf_counter()
    rounds = repeat or adaptive_repeat(m, everything, batch)
    rows = bench.compare(everything, batch=batch, repeat=rounds, model=m)
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    out = {"model": name, "batch": batch, "repeat": rounds, "machine": info,
           "block": latency.default_round_to("cpu"),
           "seconds": round(time.perf_counter() - t, 1), "dense_ms": rows[0]["median_ms"],
           "rows": []}
    for v, r in zip(variants, rows[1:]):
        red = 1.0 / v["macs_kept"]
        out["rows"].append({**v, "median_ms": r["median_ms"], "speedup": r["speedup"],
                            "speedup_p10": r["speedup_p10"], "speedup_p90": r["speedup_p90"],
                            "flops_reduction": round(red, 4),
                            "ratio": round(r["speedup"] / red, 4)})
    return out


def table(data: dict) -> str:
    lines = ["| model | batch | round-to | FLOPs kept | FLOPs reduction | latency (ms, dense → "
             "pruned) | speed-up (p10–p90) | speed-up / FLOPs reduction |",
             "|---|---|---|---|---|---|---|---|"]
    for d in data["runs"]:
        for r in d["rows"]:
            lines.append(
                f"| {LABELS.get(d['model'], d['model'])} | {d['batch']} | {r['round_to']}"
                f"{' → ' + r['resolved'] if r['round_to'] == 'auto' else ''} | "
                f"{r['macs_kept']:.3f} | {r['flops_reduction']:.2f}× | {d['dense_ms']:.1f} → "
                f"{r['median_ms']:.1f} | {r['speedup']:.2f}× ({r['speedup_p10']:.2f}–"
                f"{r['speedup_p90']:.2f}) | **{r['ratio']:.2f}** |")
    lines += ["", "Runs (machine load = 1/5/15-minute load average before → after):", ""]
    for d in data["runs"]:
        mc = d["machine"]
        lines.append(f"- {d['model']} batch {d['batch']}: {d['repeat']} interleaved rounds, "
                     f"{d['seconds']} s, {mc['when']}, load {mc['load']} → "
                     f"{mc.get('load_after')}")
    if data["runs"]:
        mc = data["runs"][0]["machine"]
        lines += ["", f"Machine: {mc['cpu']}, {mc['cores']} cores, channel block "
                  f"{data['runs'][0]['block']}, onnxruntime {mc['onnxruntime']}, Python "
                  f"{mc['python']}; default threads, spinning off."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# kernels: rate per width


def _conv_chain(c: int, n: int = 4, hw: int = 56):
    from onnx import TensorProto, helper as h, numpy_helper as nh
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        inits += [nh.from_array((rng.standard_normal((c, c, 3, 3)) * .05).astype(np.float32),
                                f"w{i}"), nh.from_array(np.zeros(c, np.float32), f"b{i}")]
        nodes += [h.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4,
                              kernel_shape=[3, 3]),
                  h.make_node("Relu", [f"c{i}"], [f"y{i}"])]
        x = f"y{i}"
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           [1, c, hw, hw])],
                     [h.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return (h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=9),
            n * c * c * 9 * hw * hw)


def _matmuls(n: int, k: int = 768, m: int = 1024):
    from onnx import TensorProto, helper as h, numpy_helper as nh
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((k, n)) * .05).astype(np.float32), "w"),
             nh.from_array((rng.standard_normal((n, k)) * .05).astype(np.float32), "w2")]
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"]),
                      h.make_node("MatMul", ["y", "w2"], ["z"])], "g",
                     [h.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                     [h.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=9), 2 * m * k * n


def _kernel_of(proto) -> str:
    """The op ONNX Runtime runs for the first heavy node after its graph optimisations."""
    import tempfile

    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        o = ort.SessionOptions()
        o.log_severity_level = 4
        o.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(proto.SerializeToString(), o, providers=["CPUExecutionProvider"])
        ops = [f"{n.domain + '.' if n.domain else ''}{n.op_type}"
               for n in onnx.load(o.optimized_model_filepath).graph.node]
    heavy = [op for op in ops if op.endswith(("Conv", "MatMul", "Gemm", "FusedConv",
                                              "FusedMatMul"))]
    return heavy[0] if heavy else ops[0]


def kernels(repeat: int) -> dict:
    block = latency.default_round_to("cpu")
    out = {"block": block, "machine": machine(), "rows": []}
    conv_c = [8 * block, 8 * block - 2, 8 * block - 4, 8 * block - 6, 7 * block,
              7 * block - 4, 7 * block - 6, 6 * block]
    mm_n = [3072, 3071, 3068, 3064, 3001, 3000, 2304, 2303]
    for kind, widths, make in (("conv", conv_c, _conv_chain), ("matmul", mm_n, _matmuls)):
        cases = [make(w) for w in widths]
        runners = []
        for proto, _ in cases:
            s = bench.make_session(proto)
            x = s.get_inputs()[0]
            feeds = {x.name: np.random.default_rng(0).standard_normal(x.shape)
                     .astype(np.float32)}
            runners.append(bench.Runner(s, feeds))
        med = np.median(bench.time_interleaved(runners, repeat=repeat), axis=0)
        base = cases[0][1] / med[0]
        for w, (proto, macs), t in zip(widths, cases, med):
            out["rows"].append({"kind": kind, "width": w, "ms": round(float(t) * 1e3, 3),
                                "gmacs": round(macs / t / 1e9, 2),
                                "rate": round(float(macs / t / base), 3),
                                "kernel": _kernel_of(proto)})
            r = out["rows"][-1]
            print(f"  {kind} width {w}: {r['ms']} ms, {r['gmacs']} GMAC/s, rate "
                  f"{r['rate']:.2f} of width {widths[0]}, kernel {r['kernel']}", flush=True)
    out["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def kernels_table(d: dict) -> str:
    b = d["block"]
    lines = ["| op | width | multiple of | kernel ONNX Runtime runs | ms | GMAC/s | rate vs "
             "the widest |", "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        w = r["width"]
        mult = f"{b}" if w % b == 0 else ("4" if w % 4 == 0 else "-")
        what = ("4 × Conv 3×3, C→C, 56×56, batch 1" if r["kind"] == "conv"
                else "MatMul 1024×768 · 768×N · N×768")
        lines.append(f"| {what} | {w} | {mult} | `{r['kernel']}` | {r['ms']:.2f} | "
                     f"{r['gmacs']:.1f} | {r['rate']:.2f} |")
    mc = d["machine"]
    lines += ["", f"Channel block {b}; {mc['cpu']}, {mc['cores']} cores, onnxruntime "
              f"{mc['onnxruntime']}; {mc['when']}, load {mc['load']} → {mc['load_after']}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                    help="batch sizes (default 1 8; ResNet-50 also at --resnet-batch)")
    ap.add_argument("--resnet-batch", type=int, nargs="*", default=[32],
                    help="extra batch sizes for ResNet-50 only (default 32; none: omit)")
    ap.add_argument("--also-round-to", type=int, nargs="*", default=[],
                    help="also measure the same targets with --round-to N (e.g. 1)")
    ap.add_argument("--repeat", type=int, default=0,
                    help="interleaved rounds (default 0: as many as fit in ~30 s, 5 to 200)")
    ap.add_argument("--kernels", action="store_true",
                    help="only the conv / matmul rate per width (the Default widths claims)")
    ap.add_argument("--no-write", action="store_true",
                    help="print only: leave benchmarks/default_widths.json and docs alone")
    args = ap.parse_args()
    if args.kernels:
        d = kernels(args.repeat or 30)
        if not args.no_write:
            data = _load_rows()
            data["kernels"] = d
            _save_rows(data)
            write_between(DOC, MARK.format("kernels", "begin"), MARK.format("kernels", "end"),
                          kernels_table(d))
            print(f"wrote {OUT} and {DOC}")
        return 0
    data = _load_rows()
    fresh = []
    for name in args.models:
        batches = list(dict.fromkeys(args.batches + (args.resnet_batch if name == "resnet50"
                                                     else [])))
        print(f"{name}: pruning at flops {args.fractions} with the default options ...",
              flush=True)
        m, variants, protos = prune_all(name, args.fractions, args.also_round_to)
        for b in batches:
            print(f"{name} batch {b}: dense + {len(protos)} pruned, interleaved ...",
                  flush=True)
            d = measure(name, m, variants, protos, b, args.repeat)
            for r in d["rows"]:
                ok = "" if name != "resnet50" or b < 8 or r["round_to"] != "auto" else \
                    ("  (target met)" if r["ratio"] >= TARGET else f"  (below {TARGET})")
                print(f"  flops:{r['flops_target']} round-to {r['round_to']}: kept "
                      f"{r['macs_kept']:.3f}, speed-up {r['speedup']:.2f}x "
                      f"({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}), FLOPs reduction "
                      f"{r['flops_reduction']:.2f}x, ratio {r['ratio']:.2f}{ok}", flush=True)
            print(f"  load {d['machine']['load']} -> {d['machine']['load_after']}, "
                  f"{d['seconds']} s", flush=True)
            fresh.append(d)
        del m, protos
    if args.no_write:
        return 0
    done = {(d["model"], d["batch"]) for d in fresh}
    data["runs"] = [d for d in data["runs"] if (d["model"], d["batch"]) not in done] + fresh
    _save_rows(data)
    write_between(DOC, MARK.format("flops", "begin"), MARK.format("flops", "end"), table(data))
    print(f"wrote {OUT} and {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
