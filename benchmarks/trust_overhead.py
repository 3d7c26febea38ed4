"""What trust by default costs: `spa.prune` with the oracle (the default) against
`verify=False`, interleaved in one process, on the trained zoo, ResNet-50@224 and BERT-base
(synthetic weights, models/synthetic.py). Also the time of the deviation measurement that
every prune makes (spa.deviation.measure; on with and without the oracle).

    python benchmarks/trust_overhead.py [--models resnet20 resnet50 bert] [--rounds 3] [--doc]

Writes rows to benchmarks/trust_overhead.json and, with --doc, the table into
docs/reliability.md between the trust-overhead markers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import spa  # noqa: E402
import spa.api  # noqa: E402
from spa.docgen import write_between  # noqa: E402
from spa.ir import write_text_atomic  # noqa: E402

TRAINED = ("resnet20", "resnet56", "mobilenetv2", "vgg", "densenet", "vit", "flax_cnn",
           "keras_cnn")
RESULTS = os.path.join(HERE, "trust_overhead.json")
DOC = os.path.join(ROOT, "docs", "reliability.md")


def model_proto(name: str):
    import onnx
    if name in TRAINED:
        return onnx.load(os.path.join(ROOT, "models", "trained", f"{name}.onnx"))
    from models.synthetic import bert_base_like, resnet50_like
    return {"resnet50": resnet50_like, "bert": bert_base_like}[name]()


def timed_deviation():
    """Wrap spa.api.measure_deviation to record its time (seconds) per call."""
    real, spent = spa.api.measure_deviation, []

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent.append(time.perf_counter() - t)
    spa.api.measure_deviation = wrapper
    return spent


def run(name: str, rounds: int, ratio: float) -> dict:
    from spa.ir.model import from_proto
    proto = model_proto(name)
    spent = timed_deviation()
    times = {True: [], False: []}
    dev = []
    spa.prune(from_proto(proto, path=f"{name}.onnx"), ratio=ratio)   # warm-up, not timed
    spent.clear()
    for _ in range(rounds):
        for verify in (False, True):           # interleaved
            model = from_proto(proto, path=f"{name}.onnx")
            t = time.perf_counter()
            res = spa.prune(model, ratio=ratio, verify=verify)
            times[verify].append(time.perf_counter() - t)
            dev.append(spent[-1])
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"model": name, "ratio": ratio, "rounds": rounds,
            "prune_no_verify_s": round(off, 3), "prune_default_s": round(on, 3),
            "verify_overhead_s": round(on - off, 3),
            "overhead_of_prune": round((on - off) / off, 3),
            "deviation_s": round(statistics.median(dev), 3),
            "verify_passed": None if res.verify is None else res.verify.passed,
            "unchecked_groups": len(res.verify.unchecked_groups or []),
            "load": round(os.getloadavg()[0], 2)}


def table(rows: list[dict]) -> str:
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} "
             "cores, `python benchmarks/trust_overhead.py --doc`: `spa.prune(ratio=0.5)`, l2, "
             "with the oracle (the default) and with `verify=False`, interleaved, median of "
             f"{rows[0]['rounds'] if rows else 0} rounds; load average given per row (1 min).",
             "", "| model | prune, --no-verify | prune, default | oracle overhead | of the "
                 "prune time | deviation measurement (in both) | oracle | load |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        ok = {True: "PASS", False: "FAIL", None: "report"}[r["verify_passed"]]
        if r["unchecked_groups"]:
            ok += f" (exact part; {r['unchecked_groups']} approx. groups)"
        lines.append(f"| {r['model']} | {r['prune_no_verify_s']:.2f} s | "
                     f"{r['prune_default_s']:.2f} s | {r['verify_overhead_s']:.2f} s | "
                     f"{100 * r['overhead_of_prune']:.0f} % | {r['deviation_s']:.2f} s | {ok} | "
                     f"{r['load']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(TRAINED) + ["resnet50", "bert"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--doc", action="store_true")
    args = p.parse_args(argv)
    old = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            old = {r["model"]: r for r in json.load(f)}
    for name in args.models:
        r = run(name, args.rounds, args.ratio)
        print(json.dumps(r), flush=True)
        old[name] = r
        write_text_atomic(RESULTS, json.dumps(list(old.values()), indent=1) + "\n")
    if args.doc:
        write_between(DOC, "<!-- trust-overhead:begin -->", "<!-- trust-overhead:end -->",
                      table(list(old.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
