"""ONNX Runtime latency: warm-up, models interleaved in one process, medians and spread."""
from __future__ import annotations

import time

import numpy as np

from .ir import load
from .runtime import dummy_inputs, session_for

PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def bench_models(paths: list[str], *, provider: str = "cpu", batches=(1,), threads: int = 0,
                 repeat: int = 50, warmup: int = 5) -> list[dict]:
    models = [load(p) for p in paths]
    sessions = [session_for(m.proto, PROVIDERS[provider], threads) for m in models]
    rows = []
    for batch in batches:
        feeds = [dummy_inputs(m, batch=batch, sym_value=batch) for m in models]
        names = [[o.name for o in s.get_outputs()] for s in sessions]
        times = [[] for _ in models]
        for s, f, nm in zip(sessions, feeds, names):
            for _ in range(warmup):
                s.run(nm, f)
        for _ in range(repeat):  # interleaved: drift hits every model alike
            for k, (s, f, nm) in enumerate(zip(sessions, feeds, names)):
                t = time.perf_counter()
                s.run(nm, f)
                times[k].append(time.perf_counter() - t)
        base = None
        for p, ts in zip(paths, times):
            ms = np.array(ts) * 1e3
            med = float(np.median(ms))
            base = base or med
            rows.append({"model": p, "provider": provider, "batch": batch, "median_ms": med,
                         "p10_ms": float(np.percentile(ms, 10)),
                         "p90_ms": float(np.percentile(ms, 90)),
                         "throughput": batch * 1e3 / med, "speedup": base / med})
    return rows
