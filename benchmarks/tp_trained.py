"""Torch-Pruning 1.6.1 on the trained Fashion-MNIST torch models, at the same MACs as SPA.

    python benchmarks/tp_trained.py --models resnet56 --fractions 0.7 0.5 0.3

For each trained torch model (models/trained/<name>.pt, architecture from models.train) and
each MACs fraction F, Torch-Pruning's MetaPruner runs with global pruning (one ranking across
layers, `max_pruning_ratio` 0.9 so that no layer disappears) and each of its importance
criteria — group magnitude (L2), group Taylor (|w·g| on the 512 calibration images with
their labels) and group Hessian (OBD-style, per-sample gradients of 64 calibration images).
The pruning ratio is found by bisection so that the pruned model's MACs (Torch-Pruning's own
counter) land at or just below F of the original. The pruned module is exported with the
same exporter as the trained ONNX files and evaluated with ONNX Runtime on the 10 000 test
images, no fine-tuning — exactly how SPA's rows in docs/obspa.md are measured. The final
classifier is excluded from pruning, as Torch-Pruning's documentation recommends.

Prints one markdown row per (model, fraction, criterion) and, with --write, puts the table
into docs/obspa.md between the `tp-trained` markers.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

TRAINED = os.path.join(ROOT, "models", "trained")
CALIB = os.path.join(TRAINED, "fmnist_calib512.npz")
DOC = os.path.join(ROOT, "docs", "obspa.md")
BEGIN, END = "<!-- tp-trained:begin -->", "<!-- tp-trained:end -->"
CRITERIA = ("magnitude", "taylor", "hessian")


def load_trained(name: str):
    import torch

    from models.train import build
    model = build(name)
    state = torch.load(os.path.join(TRAINED, f"{name}.pt"), weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _final_linear(model):
    import torch.nn as nn
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def _importance(kind: str):
    import torch_pruning as tp
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "hessian":
        return tp.importance.GroupHessianImportance()
    raise ValueError(kind)


def prune_tp(base, kind: str, ratio: float, calib):
    """A pruned deep copy of ``base`` at Torch-Pruning pruning_ratio ``ratio``."""
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    model = copy.deepcopy(base)
    x, y = calib
    example = x[:2]
    imp = _importance(kind)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, global_pruning=True, pruning_ratio=ratio,
        max_pruning_ratio=0.9, ignored_layers=[_final_linear(model)])
    model.eval()  # BN statistics are not updated by the calibration passes
    if kind == "taylor":
        model.zero_grad()
        for s in range(0, len(x), 128):
            F.cross_entropy(model(x[s:s + 128]), y[s:s + 128], reduction="sum").backward()
    elif kind == "hessian":
        imp.zero_grad()
        for i in range(64):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            imp.accumulate_grad(model)
    pruner.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        return model.eval()


def macs(model, example) -> float:
    import torch_pruning as tp
    m, _ = tp.utils.count_ops_and_params(model, example)
    return float(m)


def at_fraction(base, kind, frac, calib, iters=9):
    """Bisection on the pruning ratio: the largest-MACs pruned model with MACs <= frac."""
    example = calib[0][:1]
    full = macs(base, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        try:
            pm = prune_tp(base, kind, mid, calib)
            f = macs(pm, example) / full
        except Exception as exc:  # noqa: BLE001 - an over-pruned net can fail; go lower
            print(f"  ratio {mid:.3f}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                  file=sys.stderr)
            hi = mid
            continue
        if f <= frac:
            best = (pm, f, mid)
            hi = mid
        else:
            lo = mid
        if best is not None and frac - best[1] < 0.005:
            break
    return best


def main(argv=None) -> int:
    import torch

    from models.fmnist import evaluate_onnx
    from models.train import export_onnx

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None,
                   help="trained torch models (default: every models/trained/*.pt)")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    p.add_argument("--limit", type=int, default=None, help="test images (default all)")
    p.add_argument("--write", action="store_true", help="write the table into docs/obspa.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = a.models or sorted(f[:-3] for f in os.listdir(TRAINED) if f.endswith(".pt"))
    d = np.load(CALIB)
    calib = (torch.from_numpy(d["input"]), torch.from_numpy(d["labels"]))
    lines = ["| model | MACs target | Torch-Pruning criterion | MACs achieved | top-1 % (Δ) "
             "| time (s, whole bisection) |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            base = load_trained(name)
            base_acc = evaluate_onnx(os.path.join(TRAINED, f"{name}.onnx"), limit=a.limit,
                                     threads=1)
            row = f"| {name} | 1.00 | unpruned | 1.0000 | {100 * base_acc:.2f} | – |"
            lines.append(row)
            print(row, flush=True)
            for frac in a.fractions:
                for kind in a.criteria:
                    t0 = time.perf_counter()
                    found = at_fraction(base, kind, frac, calib)
                    wall = time.perf_counter() - t0
                    if found is None:
                        row = f"| {name} | {frac:.2f} | {kind} | – | failed | {wall:.1f} |"
                    else:
                        pm, f, _ = found
                        out = export_onnx(pm, os.path.join(tmp, "tp.onnx"))
                        acc = evaluate_onnx(str(out), limit=a.limit, threads=1)
                        row = (f"| {name} | {frac:.2f} | {kind} | {f:.4f} | "
                               f"{100 * acc:.2f} ({100 * (acc - base_acc):+.2f}) | {wall:.1f} |")
                    lines.append(row)
                    print(row, flush=True)
    if a.write:
        from spa.docgen import write_between
        write_between(DOC, BEGIN, END, "\n".join(lines))
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
