"""Gradient-engine benchmark: `spa.engine.gradient_stats` on the trained ResNet-20
(models/trained/resnet20.onnx) with its 512 bundled Fashion-MNIST calibration images.

    python benchmarks/gradients.py            # prints the table and writes docs/engine.md
    python benchmarks/gradients.py --no-write --samples 128

Each configuration runs twice on one engine: the first call includes tracing and XLA
compilation, the second reuses the compiled functions (what iterative pruning or a second
criterion pays). Wall and CPU seconds are both reported: on a shared machine the CPU time
is the better measure of the work done.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from spa.ir import write_text_atomic  # noqa: E402

MODEL = os.path.join(ROOT, "models", "trained", "resnet20.onnx")
CALIB = os.path.join(ROOT, "models", "trained", "fmnist_calib512.npz")
DOC = os.path.join(ROOT, "docs", "engine.md")
BEGIN, END = "<!-- engine-speed:begin -->", "<!-- engine-speed:end -->"

CONFIGS = [  # label, gradient_stats keyword arguments
    ("per-sample Fisher (vmap)", dict(per_sample=True)),
    ("micro-batch Fisher", dict(per_sample=False)),
    ("per-sample Fisher + H·g", dict(per_sample=True, hvp="hg")),
]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from spa.engine import Engine, gradient_stats

    data = np.load(CALIB)
    x, y = data["input"][:args.samples], data["labels"][:args.samples]
    rows = []
    for label, kw in CONFIGS:
        eng = Engine(MODEL)
        runs = []
        for _ in range(2):
            t, c = time.perf_counter(), cpu_s()
            st = gradient_stats(eng, {"input": x}, y, batch_size=args.batch_size, **kw)
            runs.append((time.perf_counter() - t, cpu_s() - c))
        rows.append((label, runs, st))
        print(f"{label}: first {runs[0][0]:.1f} s wall / {runs[0][1]:.1f} s CPU, "
              f"again {runs[1][0]:.1f} s wall / {runs[1][1]:.1f} s CPU "
              f"(loss {st.loss:.4f}, {st.fisher_mode})", flush=True)
    load = os.getloadavg()[0]
    lines = [BEGIN,
             f"`python benchmarks/gradients.py`: trained ResNet-20 (Fashion-MNIST, 28×28, "
             f"{sum(int(np.prod(v.shape)) for v in Engine(MODEL).params.values()):,} "
             f"parameters), {args.samples} calibration images with labels (objective `ce`), "
             f"batch size {args.batch_size}; {platform.machine()}, {os.cpu_count()} CPU "
             f"cores, JAX CPU, load average {load:.1f} during the run.", "",
             "| configuration | first call (compile + run) | again (compiled) |",
             "|---|---|---|"]
    for label, runs, _ in rows:
        lines.append(f"| {label} | {runs[0][0]:.1f} s wall, {runs[0][1]:.1f} s CPU | "
                     f"{runs[1][0]:.1f} s wall, {runs[1][1]:.1f} s CPU |")
    lines.append(END)
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        with open(DOC) as f:
            text = f.read()
        i, j = text.index(BEGIN), text.index(END) + len(END)
        write_text_atomic(DOC, text[:i] + block + text[j:])
        print("wrote docs/engine.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
