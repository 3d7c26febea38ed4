"""OBSPA benchmark: accuracy without fine-tuning at FLOPs targets, per criterion and
calibration mode, with the pruning wall time.

    python benchmarks/obspa.py                              # trained Fashion-MNIST models
    python benchmarks/obspa.py --models resnet20 --fractions 0.5 --limit 2000
    python benchmarks/obspa.py --zoo resnet20 mobilenetv2_small   # untrained zoo: cosine

Trained models are models/trained/<name>.onnx (raw 28×28 pixels in, 10 logits out);
top-1 accuracy is on the Fashion-MNIST test split (`models.fmnist.evaluate_onnx`), no
fine-tuning. Methods:

  obspa-512        --criterion obspa --calib models/trained/fmnist_calib512.npz
  obspa-synthetic  --criterion obspa --calib synthetic
  obspa-none       --criterion obspa --calib none
  l2-global        --criterion l2 --select global (mean-normalised)
  l2-uniform       --criterion l2 --select uniform (the same ratio in every group)

all with `--target flops:F`. For zoo models (random weights, no task) the table reports the
mean cosine similarity of the outputs to the unpruned model's on 256 held-out synthetic
inputs instead of accuracy. "time" is the wall time of spa.prune (analysis, calibration,
Hessians, scores, selection, rewrite and reconstruction, and obspa's error measurement).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import spa  # noqa: E402

TRAINED = os.path.join(ROOT, "models", "trained")
CALIB = os.path.join(TRAINED, "fmnist_calib512.npz")
METHODS = {
    "obspa-512": dict(criterion="obspa", calib=CALIB),
    "obspa-synthetic": dict(criterion="obspa", calib="synthetic"),
    "obspa-none": dict(criterion="obspa", calib="none"),
    "l2-global": dict(criterion="l2", select="global"),
    "l2-uniform": dict(criterion="l2", select="uniform"),
}


def cosine(model_proto, pruned_proto, calib) -> float:
    from spa.activations import run_outputs
    name = [o.name for o in model_proto.graph.output][0]
    a = run_outputs(model_proto, [name], calib, limit=256)[name]
    b = run_outputs(pruned_proto, [name], calib, limit=256)[name]
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    cs = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return float(cs.mean())


def run(path: str, fractions, methods, *, limit, zoo: bool, base=None) -> list[dict]:
    from models.fmnist import evaluate_onnx
    from spa.activations import synthesize
    rows = []
    model = spa.load(path)
    held_out = synthesize(model, n=256, seed=12345) if zoo else None
    name = os.path.basename(path).rsplit(".onnx", 1)[0]
    with tempfile.TemporaryDirectory() as d:
        for f in fractions:
            for m in methods:
                kw = dict(METHODS[m])
                if zoo and kw.get("calib") == CALIB:
                    continue
                t0 = time.perf_counter()
                try:
                    res = spa.prune(spa.load(path), target=f"flops:{f}", **kw)
                except spa.SpaError as exc:
                    print(f"{name} {m} {f}: {exc}", file=sys.stderr)
                    continue
                wall = time.perf_counter() - t0
                out = os.path.join(d, "p.onnx")
                spa.save(res.proto, out)
                row = {"model": name, "fraction": f, "method": m,
                       "achieved": res.plan.options.get("achieved"), "time_s": wall}
                if zoo:
                    row["cosine"] = cosine(model.proto, res.proto, held_out)
                else:
                    row["top1"] = evaluate_onnx(out, limit=limit, threads=1)
                    row["base"] = base
                if res.obspa is not None:
                    row["out_err"] = next(iter(res.obspa["measured"]["output_rel_error"]
                                               .values()))
                rows.append(row)
                print(_line(row, zoo), flush=True)
    return rows


def _line(r: dict, zoo: bool) -> str:
    q = f"{r['cosine']:.4f}" if zoo else \
        f"{100 * r['top1']:.2f} ({100 * (r['top1'] - r['base']):+.2f})"
    err = f"{r['out_err']:.3f}" if "out_err" in r else "–"
    return (f"| {r['model']} | {r['fraction']:.2f} | {r['method']} | {r['achieved']:.4f} | "
            f"{q} | {err} | {r['time_s']:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None,
                   help="trained model names (default: every models/trained/*.onnx)")
    p.add_argument("--zoo", nargs="*", default=None,
                   help="untrained zoo models instead (cosine similarity)")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--limit", type=int, default=None, help="test images (default all)")
    a = p.parse_args(argv)
    zoo = a.zoo is not None
    if zoo:
        from models.export import export_zoo_entry
        paths = [str(export_zoo_entry(n)) for n in (a.zoo or ["resnet20"])]
    else:
        names = a.models or sorted(f[:-5] for f in os.listdir(TRAINED) if f.endswith(".onnx"))
        paths = [os.path.join(TRAINED, n + ".onnx") for n in names]
        if not paths:
            print("no trained models in models/trained (python -m models.train ...); use --zoo",
                  file=sys.stderr)
            return 2
    q = "cosine to unpruned" if zoo else "top-1 % (Δ)"
    print(f"| model | FLOPs target | method | achieved | {q} | output rel. error | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        base = None
        if not zoo:
            from models.fmnist import evaluate_onnx
            base = evaluate_onnx(path, limit=a.limit, threads=1)
            print(f"| {os.path.basename(path)[:-5]} | 1.00 | unpruned | 1.0000 | "
                  f"{100 * base:.2f} | – | – |", flush=True)
        run(path, a.fractions, a.methods, limit=a.limit, zoo=zoo, base=base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
