"""`make demo`: analyze, prune, verify and benchmark the bundled default model.

Runs with the core install only (no torch / jax / tensorflow): the model is a committed
ONNX file, accuracy comes from ONNX Runtime on the Fashion-MNIST test set.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import spa
from spa.bench import bench_models
from spa.ir import load

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = ["resnet56", "resnet20"]


def default_model() -> str:
    for name in CANDIDATES:
        p = os.path.join(HERE, "trained", f"{name}.onnx")
        if os.path.exists(p):
            return p
    raise SystemExit("no bundled model found under models/trained/ (expected one of "
                     f"{', '.join(c + '.onnx' for c in CANDIDATES)})")


def _accuracy(path: str) -> float | None:
    try:
        from models.fmnist import evaluate_onnx
        return evaluate_onnx(path)
    except Exception as exc:  # noqa: BLE001 - the demo reports and carries on
        print(f"(accuracy skipped: {exc})")
        return None


def main(argv: list[str]) -> int:
    path = argv[0] if argv else default_model()
    target = argv[1] if len(argv) > 1 else "flops:0.5"
    calib = os.path.join(HERE, "trained", "fmnist_calib512.npz")
    print(f"model: {os.path.relpath(path)}  (target {target}, OBSPA with 512 calibration "
          "images, widths rounded to multiples of 16, no fine-tuning)\n")
    t = time.perf_counter()
    model = load(path)
    ana = spa.analyze(model)
    print(f"analyze: {len(model.nodes)} nodes, {len(ana.groups)} prunable groups, "
          f"{len(ana.frozen)} frozen parameter sets, {len(ana.opaque)} opaque nodes")
    # ONNX Runtime's fast CPU convolutions (NCHWc) want channel counts that are multiples
    # of the SIMD block (16 with AVX-512): odd widths can make a smaller model slower
    # spa.prune verifies by default (the oracle on the exact structural plan, before OBSPA's
    # weight update; a failure raises) and measures how far the outputs moved
    res = spa.prune(model, target=target, criterion="obspa", calib=calib, round_to=16)
    took = time.perf_counter() - t
    v = res.verify
    status = "PASS" if v.passed else ("approximate" if v.passed is None else "FAIL")
    print(f"verify (default; masked equivalence of the structural plan, before OBSPA's "
          f"weight update): {status}, max relative error {v.max_rel_error:.2e}")
    print(f"deviation from the original: {res.deviation.summary()}")
    out_dir = tempfile.mkdtemp(prefix="spa-demo-")
    out = os.path.join(out_dir, "pruned.onnx")
    spa.save(res.proto, out, source=path)
    print(f"wrote {out}  (analyze + OBSPA prune + verify: {took:.1f} s)\n")
    rows = bench_models([path, out], batches=[1, 32], repeat=30)
    lat = {(r["model"], r["batch"]): r for r in rows}
    acc0, acc1 = _accuracy(path), _accuracy(out)
    b, a = res.before, res.after
    print(f"{'':<22}{'original':>14}{'pruned':>14}{'ratio':>9}")
    print(f"{'parameters':<22}{b['params']:>14,}{a['params']:>14,}"
          f"{a['params'] / b['params']:>9.2f}")
    print(f"{'MACs / sample':<22}{b['macs']:>14,}{a['macs']:>14,}{a['macs'] / b['macs']:>9.2f}")
    for batch in (1, 32):
        o, p = lat[(path, batch)]["median_ms"], lat[(out, batch)]["median_ms"]
        print(f"{f'latency ms (b={batch}, CPU)':<22}{o:>14.2f}{p:>14.2f}{p / o:>9.2f}")
    if acc0 is not None and acc1 is not None:
        print(f"{'top-1 accuracy':<22}{acc0:>14.2%}{acc1:>14.2%}{acc1 - acc0:>+9.2%}")
    print("\n(accuracy is without fine-tuning; see docs/ for criteria and budgets)")
    return 0 if v.passed is not False else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
