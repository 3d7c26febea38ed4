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
  taylor           --criterion taylor --calib models/trained/fmnist_calib512.npz --select global
                   (first-order Taylor |w·g| on the 512 calibration images and their labels)
  random           --criterion random --select global (seeded uniform scores)

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
    "taylor": dict(criterion="taylor", calib=CALIB, select="global"),
    "random": dict(criterion="random", select="global"),
}
DOC = os.path.join(ROOT, "docs", "obspa.md")
BEGIN, END = "<!-- obspa-trained:begin -->", "<!-- obspa-trained:end -->"


def cosine(model_proto, pruned_proto, calib) -> float:
    from spa.activations import run_outputs
    name = [o.name for o in model_proto.graph.output][0]
    a = run_outputs(model_proto, [name], calib, limit=256)[name]
    b = run_outputs(pruned_proto, [name], calib, limit=256)[name]
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    cs = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return float(cs.mean())


def _record(rows_file: str | None, row: dict) -> None:
    """Append one result as a JSON line (a cut-off run keeps the rows it finished)."""
    if rows_file:
        import json
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")


def run(path: str, fractions, methods, *, limit, zoo: bool, base=None,
        rows_file: str | None = None) -> list[dict]:
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
                load0 = os.getloadavg()[0]
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
                       "achieved": res.plan.options.get("achieved"), "time_s": wall,
                       "load": round(max(load0, os.getloadavg()[0]), 1),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                if zoo:
                    row["cosine"] = cosine(model.proto, res.proto, held_out)
                else:
                    row["top1"] = evaluate_onnx(out, limit=limit, threads=1)
                    row["base"] = base
                if res.obspa is not None:
                    row["out_err"] = next(iter(res.obspa["measured"]["output_rel_error"]
                                               .values()))
                rows.append(row)
                _record(rows_file, row)
                print(_line(row, zoo), flush=True)
    return rows


def _line(r: dict, zoo: bool) -> str:
    q = f"{r['cosine']:.4f}" if zoo else \
        f"{100 * r['top1']:.2f} ({100 * (r['top1'] - r['base']):+.2f})"
    err = f"{r['out_err']:.3f}" if "out_err" in r else "–"
    return (f"| {r['model']} | {r['fraction']:.2f} | {r['method']} | {r['achieved']:.4f} | "
            f"{q} | {err} | {r['time_s']:.2f} |")


def table(rows_file: str) -> str:
    """The markdown table of every row recorded in ``rows_file`` (JSON lines; a later row
    for the same model, fraction and method replaces an earlier one), models in file order,
    fractions descending, methods in METHODS order; the load average column is the 1-minute
    load of the machine while that row ran (max of start and end)."""
    import json
    rows: dict = {}
    for line in open(rows_file):
        if line.strip():
            r = json.loads(line)
            rows[(r["model"], r["fraction"], r["method"])] = r
    models = list(dict.fromkeys(k[0] for k in rows))
    order = {m: i for i, m in enumerate(["unpruned", *METHODS])}
    out = ["| model | FLOPs target | method | achieved | top-1 % (Δ) | output rel. error "
           "| time (s) | load avg |", "|---|---|---|---|---|---|---|---|"]
    for m in models:
        keys = sorted((k for k in rows if k[0] == m),
                      key=lambda k: (-k[1], order.get(k[2], 99)))
        for k in keys:
            r = rows[k]
            if r["method"] == "unpruned":
                out.append(f"| {m} | 1.00 | unpruned | 1.0000 | {100 * r['top1']:.2f} | – | – "
                           "| – |")
            else:
                out.append(_line(r, False) + f" {r.get('load', '–')} |")
    return "\n".join(out)


def write_doc(rows_file: str, doc: str = DOC) -> None:
    """Put `table(rows_file)` into ``doc`` between the obspa-trained markers."""
    from spa.docgen import write_between
    write_between(doc, BEGIN, END, table(rows_file))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None,
                   help="trained model names (default: every models/trained/*.onnx)")
    p.add_argument("--zoo", nargs="*", default=None,
                   help="untrained zoo models instead (cosine similarity)")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--limit", type=int, default=None, help="test images (default all)")
    p.add_argument("--rows", default=None,
                   help="append every result to this JSON-lines file as it comes")
    p.add_argument("--write", action="store_true",
                   help="after each model, write the table of every row in --rows into "
                        "docs/obspa.md between the obspa-trained markers")
    p.add_argument("--write-only", action="store_true",
                   help="only write the table of --rows into docs/obspa.md (no runs)")
    a = p.parse_args(argv)
    if (a.write or a.write_only) and not a.rows:
        p.error("--write needs --rows FILE")
    if a.write_only:
        write_doc(a.rows)
        return 0
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
            _record(a.rows, {"model": os.path.basename(path)[:-5], "fraction": 1.0,
                             "method": "unpruned", "top1": base})
        run(path, a.fractions, a.methods, limit=a.limit, zoo=zoo, base=base, rows_file=a.rows)
        if a.write and not zoo:
            write_doc(a.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
