"""Criteria compared on the trained ResNet-20 (Fashion-MNIST, 93.96 %): pruned to 50 % and
75 % of the FLOPs with each criterion, without fine-tuning, with one ratio for all groups (uniform)
and with one global ranking (each criterion's default normalisation, at most 90 % of a
group removed); top-1 on the 10k test images. Gradient statistics (gradient, diagonal
Fisher, Hessian-gradient product) come from the JAX engine on the 512 bundled calibration
images with their labels, computed once and shared by the gradient criteria.

    python benchmarks/criteria.py [--no-doc]     # prints the table; writes docs/criteria.md
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import spa  # noqa: E402
from spa.activations import load_calibration  # noqa: E402
from spa.criteria import REGISTRY  # noqa: E402
from spa.criteria.gradient import compute_stats  # noqa: E402
from spa.ir import write_text_atomic  # noqa: E402
from spa.rewrite.apply import apply_plan  # noqa: E402
from models.fmnist import evaluate_onnx  # noqa: E402

MODEL = os.path.join(ROOT, "models", "trained", "resnet20.onnx")
CALIB = os.path.join(ROOT, "models", "trained", "fmnist_calib512.npz")
DOC = os.path.join(ROOT, "docs", "criteria.md")
BEGIN, END = "<!-- criteria.py:begin -->", "<!-- criteria.py:end -->"
TARGETS = tuple(os.environ.get("SPA_CRIT_TARGETS", "flops:0.5,flops:0.75").split(","))
CRITERIA = tuple(os.environ.get(
    "SPA_CRIT_LIST", "l1,l2,bn_scale,fpgm,lamp,taylor,hessian,snip,grasp,crop,random")
    .split(","))
SELECTIONS = ("uniform", "global")
RANDOM_SEEDS = (0, 1, 2)


def table_for(model, ana, target, stats, base, tmp, threads) -> list[str]:
    head = ["| criterion | " + " | ".join(f"{s}: FLOPs kept | {s}: top-1 %" for s in SELECTIONS)
            + " |", "|---|" + "---|---|" * len(SELECTIONS)]
    rows = ["| unpruned | " + " | ".join(f"1.000 | {100 * base:.2f}" for _ in SELECTIONS)
            + " |"]
    print(f"\n{target}\n" + "\n".join(head + rows), flush=True)
    for crit in CRITERIA:
        cells = []
        for select in SELECTIONS:
            accs, kept = [], []
            for seed in (RANDOM_SEEDS if crit == "random" else (0,)):
                plan = spa.make_plan(model, ana, ratio=0.5, criterion=crit, target=target,
                                     select=select, seed=seed, stats=stats)
                out = os.path.join(tmp, f"{crit}-{select}-{seed}.onnx")
                spa.save(apply_plan(model, ana, plan), out)
                accs.append(evaluate_onnx(out, threads=threads))
                kept.append(plan.options["achieved"])
            acc = f"{100 * sum(accs) / len(accs):.2f}"
            if len(accs) > 1:
                acc += f" ({100 * min(accs):.2f}–{100 * max(accs):.2f}, {len(accs)} seeds)"
            cells.append(f"{sum(kept) / len(kept):.3f} | {acc}")
        rows.append(f"| {crit} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return head + rows


def main(argv: list[str]) -> int:
    threads = os.environ.get("SPA_CRIT_THREADS")
    model = spa.load(MODEL)
    ana = spa.analyze(model)
    base = evaluate_onnx(MODEL, threads=int(threads or 0))
    stats, grad_s = None, 0.0
    if any(REGISTRY[c].needs for c in CRITERIA):
        t = time.perf_counter()
        stats = compute_stats(model, load_calibration(CALIB, model),
                              ("grad", "fisher", "hg"))
        grad_s = time.perf_counter() - t
    tmp = tempfile.mkdtemp(prefix="spa-crit-")
    tables = []
    for target in TARGETS:
        tables.append(f"**{target}**\n\n" + "\n".join(
            table_for(model, ana, target, stats, base, tmp, int(threads or 0))))
    note = (f"ResNet-20 ({os.path.basename(MODEL)}), no fine-tuning; top-1 on the "
            f"Fashion-MNIST test set (10k). Gradient statistics on "
            f"{os.path.basename(CALIB)}"
            + (f" ({stats.samples} samples, objective {stats.objective}, Fisher "
               f"{stats.fisher_mode}, {grad_s:.0f} s on a shared CPU)"
               if stats is not None else "")
            + ". `python benchmarks/criteria.py`")
    table = "\n\n".join(tables) + "\n\n" + note
    print("\n" + note)
    if "--no-doc" not in argv:
        text = open(DOC).read()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
        text = text[:text.index(BEGIN)] + f"{BEGIN}\n{table}\n{END}" + \
            text[text.index(END) + len(END):]
        write_text_atomic(DOC, text)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
