"""Pruning time of obspa on the two models of issue #13's speed targets, on this machine.

    python benchmarks/obspa_time.py [--rounds 3] [--minilm-rounds 1]

- ResNet-56 (models/trained/resnet56.onnx), obspa with the 512 bundled calibration images
  (models/trained/fmnist_calib512.npz), target flops:0.5, default options;
- all-MiniLM-L6-v2 at the issue-5 setting (benchmarks/minilm.py `obspa-mixed`, ratio
  {"heads": 1/3, "channels": 0.5}, damp 0.1, 384 calibration sequences of 128 tokens).

Each run is one `spa.prune` call (verification and deviation included, as a user gets
them); wall and process CPU seconds, obspa's own step timings, and the result (deviation
of the outputs / cosine of the sentence embeddings) so that a faster run is seen to give
the same model. Medians over the rounds; the load average is printed with each run.
Results go to benchmarks/obspa_time.json (one row per run appended).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import spa  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "obspa_time.json")


def run_resnet56() -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    r = spa.prune(os.path.join(ROOT, "models/trained/resnet56.onnx"), criterion="obspa",
                  calib=os.path.join(ROOT, "models/trained/fmnist_calib512.npz"),
                  target="flops:0.5")
    return {"model": "resnet56", "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "timings": r.obspa["timings"],
            "output_rel_error": r.deviation.models["pruned"]["overall"]}


def run_minilm() -> dict:
    import minilm as bench  # benchmarks/minilm.py
    from models import minilm
    model = spa.load(str(minilm.cached_export(os.path.join(ROOT, ".cache", "zoo"))))
    cal = bench.calibration_file("mixed")
    t0, c0 = time.perf_counter(), time.process_time()
    r = spa.prune(model, ratio=bench.ISSUE, seed=0, criterion="obspa", calib=cal, damp=0.1)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    feeds = minilm.tokenize(list(minilm.EVAL_SENTENCES))
    cos = minilm.cosine(minilm.embed(model.proto, feeds), minilm.embed(r.proto, feeds))
    return {"model": "minilm-issue5", "wall_s": wall, "cpu_s": cpu,
            "timings": r.obspa["timings"], "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--minilm-rounds", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for fn, n in ((run_resnet56, args.rounds), (run_minilm, args.minilm_rounds)):
        got = []
        for _ in range(n):
            row = fn()
            row["loadavg"] = round(os.getloadavg()[0], 2)
            got.append(row)
            print(json.dumps(row), flush=True)
        rows += got
        print(f"{got[0]['model']}: median wall {statistics.median(r['wall_s'] for r in got):.1f} s,"
              f" median CPU {statistics.median(r['cpu_s'] for r in got):.1f} s", flush=True)
    with open(OUT, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
