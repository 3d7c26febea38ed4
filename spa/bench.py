"""ONNX Runtime latency: warm-up, models interleaved in one process, medians and spread.

Latency on a shared machine drifts by more than the differences we want to see (a pruned
model 20 % faster), so every comparison is made inside one process with the models
*interleaved*: round r runs every model once, starting with model r mod n so that no model
always runs right after the same neighbour. Drift then hits every model alike, the ratio of
medians is stable, and the per-round ratios give the spread of the speed-up itself.

On CUDA the inputs are copied to the device once and the outputs are bound to device memory
(ONNX Runtime I/O binding): a timed run is the model, not two host<->device copies that can
be longer than a pruned model's kernels and would hide the speed-up.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .errors import SpaError, UsageError
from .ir import load
from .runtime import dummy_inputs

PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
#: adaptive warm-up: at least one run, then more until this long has passed (or `warmup`)
WARMUP_S = 1.0


def check_provider(provider: str) -> None:
    """A usage error, before any model is loaded, when the provider cannot be used here."""
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r} (use one of {', '.join(PROVIDERS)})")
    import onnxruntime as ort
    have = ort.get_available_providers()
    if PROVIDERS[provider][0] not in have:
        raise UsageError(f"--provider {provider} needs {PROVIDERS[provider][0]}, which this "
                         f"onnxruntime ({ort.__version__}) does not have (it has "
                         f"{', '.join(have)}); install onnxruntime-gpu instead of onnxruntime: "
                         "pip install -e '.[gpu]' -c constraints.txt")


def make_session(proto, provider: str = "cpu", threads: int = 0, spin: bool = False,
                 profile: str | None = None):
    """An InferenceSession on the provider; refuses a silent fallback to the CPU.

    Spinning is off by default: after a run, ONNX Runtime's worker threads spin waiting for
    more work, and with several sessions interleaved on a few cores the idle sessions'
    spinning threads steal the cores of the one being timed (measured on 2 cores: a 2 ms
    convolution timed at 30-60 ms with 8-25 sessions alive, the second of two sessions
    three times slower than the first). Off, every session gets the cores it would get
    alone; the small wake-up cost it adds is paid by every model compared.
    `profile`: a file prefix; ONNX Runtime then records every kernel's time."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    keep = []
    if isinstance(proto, (bytes, str)):
        data = proto
    else:
        from .runtime import add_external_initializers
        proto, keep = add_external_initializers(proto, opts)  # weights in external files
        data = proto.SerializeToString()
    try:
        s = ort.InferenceSession(data, opts, providers=PROVIDERS[provider])
        s._spa_external = keep
    except Exception as exc:  # noqa: BLE001 - ORT's own message says what is wrong
        raise SpaError(f"ONNX Runtime cannot load the model on {provider} "
                       f"({type(exc).__name__}: {exc})")
    if s.get_providers()[0] != PROVIDERS[provider][0]:
        raise SpaError(f"ONNX Runtime could not place the model on {PROVIDERS[provider][0]} "
                       f"(it runs on {s.get_providers()[0]}); check the CUDA/cuDNN install")
    return s


class Runner:
    """One model ready to run again and again with the same inputs.

    CPU: `session.run` on numpy feeds. CUDA: the feeds are copied to the device once and the
    outputs are bound to device memory (I/O binding), so that `run()` times the kernels and
    not host copies; ONNX Runtime synchronises the device at the end of each run."""

    def __init__(self, session, feeds: dict, provider: str = "cpu", device_id: int = 0):
        self.session = session
        self.names = [o.name for o in session.get_outputs()]
        self.binding = None
        if provider == "cuda":
            import onnxruntime as ort
            self.binding = session.io_binding()
            self._device_inputs = []
            for name, arr in feeds.items():
                v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda",
                                                     device_id)
                self._device_inputs.append(v)  # keep the device buffers alive
                self.binding.bind_ortvalue_input(name, v)
            for name in self.names:
                self.binding.bind_output(name, "cuda", device_id)
        else:
            self.feeds = feeds

    def __call__(self) -> None:
        if self.binding is None:
            self.session.run(self.names, self.feeds)
        else:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()


def time_interleaved(runners, *, repeat: int, warmup: int | None = None) -> np.ndarray:
    """Seconds per run, shape (repeat, len(runners)): round r runs every runner once,
    starting at runner r mod n. Warm-up: `warmup` runs of each, or (None) at least one and
    then more until WARMUP_S has passed per runner, at most 5."""
    n = len(runners)
    for run in runners:
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        extra = (warmup - 1) if warmup is not None else \
            min(4, int(math.ceil(max(WARMUP_S - first, 0.0) / max(first, 1e-6))))
        for _ in range(max(extra, 0)):
            run()
    out = np.zeros((repeat, n))
    for r in range(repeat):
        for j in range(n):
            k = (r + j) % n
            t = time.perf_counter()
            runners[k]()
            out[r, k] = time.perf_counter() - t
    return out


def summarize(times: np.ndarray) -> list[dict]:
    """Per runner: median, p10, p90, relative spread ((p90 - p10) / median), and the
    speed-up over runner 0: the ratio of medians, and p10/p90 of the per-round ratios;
    `fraction`: the median of the per-round latency ratios (runner / runner 0), which a
    burst of load on one run of a round cannot move."""
    ms = times * 1e3
    base = float(np.median(ms[:, 0]))
    rows = []
    for k in range(ms.shape[1]):
        col = ms[:, k]
        med = float(np.median(col))
        paired = ms[:, 0] / col
        rows.append({"median_ms": med, "p10_ms": float(np.percentile(col, 10)),
                     "p90_ms": float(np.percentile(col, 90)),
                     "min_ms": float(col.min()), "max_ms": float(col.max()),
                     "spread": float((np.percentile(col, 90) - np.percentile(col, 10)) / med),
                     "speedup": base / med,
                     "speedup_p10": float(np.percentile(paired, 10)),
                     "speedup_p90": float(np.percentile(paired, 90)),
                     "fraction": float(np.median(col / ms[:, 0])),
                     "runs": int(len(col))})
    return rows


def feeds_for(model, batch: int, shapes: dict | None = None) -> dict:
    """The seeded inputs every latency measurement of `model` uses at this batch size.
    `shapes` (--input-shape) fixes the other axes; its first axis is replaced by `batch`
    where the graph input's batch axis is dynamic."""
    if shapes:
        dyn0 = {v.name for v in model.graph.input if v.type.tensor_type.shape.dim and
                not v.type.tensor_type.shape.dim[0].dim_value}
        shapes = {k: ((batch,) + tuple(v[1:]) if k in dyn0 and v else tuple(v))
                  for k, v in shapes.items()}
    return dummy_inputs(model, batch=batch, sym_value=batch, shapes=shapes)


def compare(protos, *, provider: str = "cpu", batch: int = 1, threads: int = 0,
            repeat: int = 20, warmup: int | None = None, feeds: dict | None = None,
            model=None) -> list[dict]:
    """Interleaved latency of models that take the same inputs (an original and its pruned
    versions); row k has the speed-up of protos[k] over protos[0]."""
    if feeds is None:
        feeds = feeds_for(model if model is not None else load_proto(protos[0]), batch)
    runners = [Runner(make_session(p, provider, threads), feeds, provider) for p in protos]
    return summarize(time_interleaved(runners, repeat=repeat, warmup=warmup))


def load_proto(proto):
    from .ir.model import from_proto
    return from_proto(proto, infer=False)


def bench_models(paths: list[str], *, provider: str = "cpu", batches=(1,), threads: int = 0,
                 repeat: int = 50, warmup: int | None = None,
                 shapes: dict | None = None) -> list[dict]:
    """One row per (batch, model): median / p10 / p90 / spread in ms, throughput (samples
    per second) and the speed-up over the first model, all models interleaved."""
    check_provider(provider)
    if repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {repeat}")
    models = [load(p) for p in paths]
    sessions = [make_session(m.proto, provider, threads) for m in models]
    rows = []
    for batch in batches:
        if batch < 1:
            raise UsageError(f"--batch must be >= 1, got {batch}")
        runners = [Runner(s, feeds_for(m, batch, shapes), provider)
                   for s, m in zip(sessions, models)]
        stats = summarize(time_interleaved(runners, repeat=repeat, warmup=warmup))
        for p, st in zip(paths, stats):
            rows.append({"model": p, "provider": provider, "batch": batch,
                         "threads": threads, **st,
                         "throughput": batch * 1e3 / st["median_ms"]})
    return rows
