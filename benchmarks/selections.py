"""Selections compared on the trained zoo (issue "Budgets that hold"): knapsack vs global
ranking vs uniform ratio, with l2 and OBSPA (512 calibration images) scores, at 50 % of the
FLOPs and at 60 % of the measured CPU latency (batch 32). Accuracy is top-1 on the
Fashion-MNIST test set without fine-tuning; latency is measured against the original in one
process (interleaved medians).

    python benchmarks/selections.py [MODEL.onnx ...]      # prints a markdown table
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import spa
from spa.bench import bench_models
from spa.latency import LatencySettings
from models.fmnist import evaluate_onnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CALIB = os.path.join(ROOT, "models", "trained", "fmnist_calib512.npz")
# latency:0.6 at batch 32 is out of reach for ResNet-20 (its stem, head and the frozen
# input/output channels cost more than 60 % by the measured tables): SPA says so and the
# table records it; 0.75 is the comparison that can be run
TARGETS = tuple(os.environ.get("SPA_SEL_TARGETS", "flops:0.5,latency:0.6,latency:0.75")
                .split(","))


def run(path: str) -> list[str]:
    model = spa.load(path)
    base_acc = evaluate_onnx(path)
    rows = [f"| {os.path.basename(path)} | – | – | unpruned | 1.000 | 1.000 | "
            f"{100 * base_acc:.2f} | – |"]
    tmp = tempfile.mkdtemp(prefix="spa-sel-")
    for target in TARGETS:
        for crit in ("l2", "obspa"):
            for select in ("uniform", "global", "knapsack"):
                kw = dict(target=target, select=select, criterion=crit, round_to=16)
                if crit == "obspa":
                    kw["calib"] = CALIB
                if target.startswith("latency"):
                    kw["latency"] = LatencySettings(batch=32, align=16)
                t = time.perf_counter()
                try:
                    res = spa.prune(model, **kw)
                except spa.SpaError as exc:
                    rows.append(f"| {os.path.basename(path)} | {target} | {crit} | {select} | "
                                f"– | – | – | {exc.reason[:60]} |")
                    continue
                took = time.perf_counter() - t
                out = os.path.join(tmp, f"{crit}-{select}-{target.replace(':', '')}.onnx")
                spa.save(res.proto, out)
                acc = evaluate_onnx(out)
                lat = bench_models([path, out], batches=[32], repeat=15)
                ratio = lat[1]["median_ms"] / lat[0]["median_ms"]
                flops = res.after["macs"] / res.before["macs"]
                rows.append(f"| {os.path.basename(path)} | {target} | {crit} | {select} | "
                            f"{flops:.3f} | {ratio:.3f} | {100 * acc:.2f} | {took:.1f} |")
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str]) -> int:
    paths = argv or [os.path.join(ROOT, "models", "trained", "resnet20.onnx")]
    print("| model | target | scores | selection | FLOPs kept | latency kept (b=32, measured) "
          "| top-1 % | prune s |")
    print("|---|---|---|---|---|---|---|---|")
    for p in paths:
        for r in run(p):
            print(r, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
