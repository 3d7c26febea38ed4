"""Budget selection benchmark: FLOPs (MAC) target vs achieved, and the time to plan, for the
three selections on ResNet-56 (CIFAR-style, 28x28 input), a few zoo models and (with
--models ... resnet50) a ResNet-50-sized synthetic model.

    python benchmarks/budgets.py                   # prints a markdown table
    python benchmarks/budgets.py --models resnet56 --fractions 0.5

"time to plan" is the selection alone (scores computed before, the cost model built before
and timed separately as "cost model"): the median of --repeat runs. "kept importance" is the
sum of the mean-normalised L2 scores of the channels kept, over all prunable groups (what
the knapsack maximises; higher is better at the same budget).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import spa  # noqa: E402
from spa import cost  # noqa: E402
from spa.criteria import score  # noqa: E402
from spa.select import global_rank, knapsack, normalize, uniform_for_target  # noqa: E402

CACHE = os.path.join(ROOT, ".cache", "bench")
SELECTIONS = {"uniform": uniform_for_target, "global": global_rank, "knapsack": knapsack}


def model_path(name: str) -> str:
    if name == "resnet56":
        path = os.path.join(CACHE, "resnet56.onnx")
        if not os.path.exists(path):
            import torch
            from models.train import build, export_onnx
            torch.manual_seed(0)
            net = build("resnet56")
            # BN statistics as after training: an untrained net has identical running
            # stats everywhere, which the exporter shares as one initializer -- and a shared
            # initializer couples every BN of that width into one group
            for mod in net.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
                    mod.weight.data.uniform_(0.5, 1.5)
                    mod.bias.data.normal_(0, 0.1)
            os.makedirs(CACHE, exist_ok=True)
            export_onnx(net, path)
        return path
    if name == "resnet50":     # models.synthetic's ResNet-50 (224x224, seeded weights)
        path = os.path.join(CACHE, "budgets-resnet50.onnx")
        if not os.path.exists(path):
            import onnx
            from models.synthetic import resnet50_like
            os.makedirs(CACHE, exist_ok=True)
            onnx.save(resnet50_like(), path + ".tmp")
            os.replace(path + ".tmp", path)
        return path
    from models.export import export_zoo_entry
    return str(export_zoo_entry(name, exporter="dynamo"))


def kept_importance(ana, scores, plan) -> float:
    total = 0.0
    for g, s in enumerate(scores):
        n = normalize(s, "mean")
        total += float(n[plan.keep[g]].sum()) if g in plan.keep else float(n.sum())
    return total


def run(names, fractions, metric, repeat):
    rows = []
    for name in names:
        m = spa.load(model_path(name))
        ana = spa.analyze(m)
        scores = score(ana, "l2")
        t0 = time.perf_counter()
        cm = cost.cost_model(ana)
        t_cm = time.perf_counter() - t0
        key = cost.METRIC_ALIASES[metric]
        for F in fractions:
            for sel, fn in SELECTIONS.items():
                times, plan = [], None
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    plan = fn(ana, scores, (metric, F))
                    times.append(time.perf_counter() - t0)
                got = cost.plan_cost(ana, plan)[key] / cm.original[key]
                rows.append(dict(model=name, channels=ana.n_channels, groups=len(ana.groups),
                                 F=F, select=sel, achieved=got,
                                 in_window=F - 0.02 <= got <= F,
                                 ms=1e3 * statistics.median(times), cm_ms=1e3 * t_cm,
                                 kept=kept_importance(ana, scores, plan),
                                 groups_pruned=len(plan.keep)))
    return rows


def table(rows, metric) -> str:
    out = [f"| model (groups / channels) | {metric} target | selection | achieved | in "
           "[F-0.02, F] | groups pruned | kept importance | time to plan (ms) | cost model "
           "(ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} ({r['groups']} / {r['channels']}) | {r['F']:.2f} | "
                   f"{r['select']} | {r['achieved']:.4f} | {'yes' if r['in_window'] else 'no'} "
                   f"| {r['groups_pruned']}/{r['groups']} | {r['kept']:.1f} | {r['ms']:.1f} | "
                   f"{r['cm_ms']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+",
                   default=["resnet56", "resnet20", "mobilenetv2_small", "vit_qkv", "bert_tiny"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--metric", default="flops", choices=["flops", "params", "memory"])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    np.seterr(all="ignore")
    rows = run(args.models, args.fractions, args.metric, args.repeat)
    print(table(rows, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
