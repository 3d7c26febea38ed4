"""Latency as a budget: per-node latency tables measured on the target execution provider,
a latency model over plans, and pruning to a measured latency fraction.

FLOPs do not say how long a model runs: a narrow convolution uses the vector units worse
than a wide one (on CPUs, a channel count that is not a multiple of the vector width drops
ONNX Runtime's blocked NCHWc kernels altogether), a small matrix product is dominated by
fixed costs, and the ops around the heavy ones cost memory traffic, not multiply-adds. So
latency is *measured*, where the model will run:

1. Every node with a cost formula (the rules' `macs`: Conv, ConvTranspose, Gemm, MatMul) is
   cut out as a one-node model and timed with ONNX Runtime on the target provider, batch
   size and thread count, at several kept widths. Its variable dims (spa.cost) fall into
   *classes* -- dims that lose the same channels (a conv's input channels in X and W, its
   output channels in W, B and Y; a depthwise conv has one class) -- and every class is
   narrowed to each fraction of GRID (rounded to multiples of `align`, the selection's
   `round_to`), on a full grid when a node has one or two classes (5 or 25 points), along
   the diagonal when it has more. The shapes of each point come from the cost model itself
   (the channels of the class are removed), so inputs, weights and outputs agree;
   attributes that depend on widths (a depthwise conv's `group`) are fixed by the rule's
   own `shrink` hook. Identical points of different nodes (the repeated blocks of a ResNet
   or a BERT) are measured once; the points of one node are interleaved. On CPU the time is
   the kernels' own, from ONNX Runtime's profile, without the layout conversions a one-node
   model needs and a whole model does not; on CUDA it is wall-clock with I/O binding.
2. A point far off a smooth fit of its node (a + b f_in + c f_out + d f_in f_out) is
   replaced by the fit (a busy moment of a shared machine), the table made monotone, and a
   node's latency under a plan is the multilinear interpolation of its table at the plan's
   kept fractions.
3. The whole model is timed unpruned and at three uniform widths, interleaved, and
   latency = scale x (sum of the node tables) + const + rest x (activation memory fraction)
   is fitted: exact at the unpruned model, non-negative least squares on the others. The
   rest covers the cheap ops (memory-bound, so they shrink with activation memory) and the
   const what never shrinks (session overhead, graph inputs).

`attach()` puts the model on an analysis as the cost metric `latency` (nanoseconds), so that
every selection (uniform, global, knapsack) handles `--target latency:F` exactly as it
handles flops. `prune_to_latency()` then closes the loop: it *measures* the pruned model
against the original (interleaved; the median of the per-round latency ratios), and when
the measured fraction misses the asked one by more than 5 % it asks the selection again
with a corrected fraction (at most `rounds` plans), keeping the plan that landed closest.

Tables and calibration are cached per (model sha256, provider, batch, threads, onnxruntime
version) in $SPA_CACHE_DIR/latency (default ~/.cache/spa/latency); `refresh=True`
measures again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .bench import (Runner, check_provider, feeds_for, make_session, summarize,
                    time_interleaved)
from .cost import CostModel, cost_model
from .errors import SpaError, UsageError
from .ops import registry
from .ops.registry import Node
from .ir import write_text_atomic

#: kept fractions at which every class of a node is measured
GRID = (1.0, 0.75, 0.5, 0.25, 0.1)
#: weight of the prior scale = 1 in the calibration fit (relative to the dense latency)
PRIOR = 0.3
#: measured latency within this relative distance of the asked one ends the loop
TOLERANCE = 0.05
FORMAT = "spa-latency/1"
METRIC = "latency"


@dataclass
class LatencySettings:
    """Where latency is measured: `provider` (cpu | cuda), `batch`, `threads` (0: ONNX
    Runtime's default), `rounds` (plans tried by the measured loop, >= 1), `refresh`
    (measure the tables again), `shapes` (graph input shapes, overriding dummy inputs),
    `cache_dir` (default $SPA_CACHE_DIR/latency or ~/.cache/spa/latency), `repeat`
    (interleaved runs per comparison, None: adaptive)."""
    provider: str = "cpu"
    batch: int = 1
    threads: int = 0
    rounds: int = 3
    refresh: bool = False
    shapes: dict | None = None
    cache_dir: str | None = None
    repeat: int | None = None
    align: int = 1
    log: object = None

    def check(self) -> None:
        check_provider(self.provider)
        if self.batch < 1:
            raise UsageError(f"--batch must be >= 1, got {self.batch}")
        if self.threads < 0:
            raise UsageError(f"--threads must be >= 0, got {self.threads}")
        if self.rounds < 1:
            raise UsageError(f"--latency-rounds must be >= 1, got {self.rounds}")
        if self.align < 1:
            raise UsageError(f"--round-to must be >= 1, got {self.align}")

    def key(self) -> tuple:
        return (self.provider, self.batch, self.threads, self.align,
                json.dumps(self.shapes, sort_keys=True) if self.shapes else "")


def default_round_to(provider: str) -> int:
    """Channel multiple the provider's fast kernels want. CPU: ONNX Runtime's blocked
    (NCHWc) convolutions need channel counts that are multiples of the vector width -- 16
    floats with AVX-512, 8 with AVX2; a conv pruned to 13 channels falls back to a slower
    kernel and can run *slower* than the unpruned one. CUDA: 8 (tensor-core tiles)."""
    if provider != "cpu":
        return 8
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return 16 if " avx512f" in flags else 8
    except OSError:
        return 8


def _log(settings, msg: str) -> None:
    if settings.log is not None:
        settings.log(msg)


def default_log(msg: str) -> None:
    """Progress on stderr (the CLI's choice when stderr is a terminal)."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------
# tables


def _interp(axes: list[np.ndarray], table: np.ndarray, point) -> float:
    """Multilinear interpolation on a rectilinear grid (axes ascending), clamped at the
    ends."""
    if not axes:
        return float(table)
    ax = axes[0]
    if len(ax) == 1:
        return _interp(axes[1:], table[0], point[1:])
    x = min(max(point[0], ax[0]), ax[-1])
    i = int(np.searchsorted(ax, x, side="right")) - 1
    i = min(max(i, 0), len(ax) - 2)
    w = (x - ax[i]) / (ax[i + 1] - ax[i])
    lo = _interp(axes[1:], table[i], point[1:])
    if w == 0.0:
        return lo
    return (1.0 - w) * lo + w * _interp(axes[1:], table[i + 1], point[1:])


@dataclass
class NodeTable:
    """Measured latency (ms) of one node over the kept fractions of its classes."""
    name: str
    reps: list[int]              # one variable dim per class (spa.cost var id)
    full: list[int]              # their unpruned lengths
    axes: list[np.ndarray]       # per class: kept fractions measured, ascending
    ms: np.ndarray               # latency at every grid point
    diagonal: bool = False       # > 2 classes: one axis, the mean kept fraction

    def fractions(self, lens: np.ndarray) -> list[float]:
        f = [lens[v] / n for v, n in zip(self.reps, self.full)]
        return [float(np.mean(f))] if self.diagonal else f

    def at(self, lens: np.ndarray) -> float:
        return _interp(self.axes, self.ms, self.fractions(lens))

    def monotone(self) -> None:
        """Removing channels never makes a node slower (smooths measurement noise)."""
        for k in range(self.ms.ndim):
            self.ms = np.maximum.accumulate(self.ms, axis=k)


@dataclass
class LatencyModel:
    """Predicted latency of a model under a plan, in ms: the interpolated tables of the
    heavy nodes, the fixed heavy nodes, and the rest scaled by activation memory."""
    settings: LatencySettings
    tables: list[NodeTable]
    fixed_ms: float              # heavy nodes whose widths cannot change
    dense_ms: float              # the unpruned model, measured as a whole
    overhead_ms: float           # one session.run of an empty model (subtracted per node)
    rest_ms: float = 0.0         # fitted: the rest, scaled by activation memory
    const_ms: float = 0.0        # fitted: the rest that does not shrink
    scale: float = 1.0           # fitted: in-graph over isolated latency of the heavy nodes
    memory0: float = 1.0         # activation memory of the unpruned model
    calibration: list = field(default_factory=list)   # (heavy ms, memory, measured ms)
    skipped: list[str] = field(default_factory=list)   # heavy nodes that could not be timed
    measured_points: int = 0     # micro-benchmarks run (0: all from the cache)
    cache_path: str | None = None

    def heavy_ms(self, lens: np.ndarray) -> float:
        return self.fixed_ms + sum(t.at(lens) for t in self.tables)

    def predict_ms(self, lens: np.ndarray, memory: float) -> float:
        return (self.scale * self.heavy_ms(lens) + self.const_ms
                + self.rest_ms * memory / self.memory0)

    def fit(self, cm: CostModel, calibration: list[tuple[float, float, float]]) -> None:
        """scale, const and rest from whole-model measurements [(heavy ms, memory fraction,
        measured ms)], the dense model first: exact at the dense model, least squares
        (non-negative) on the others, with a weak pull of `scale` towards 1 (the tables are
        kernel times; heavy nodes and memory shrink together in uniform plans, so the data
        alone can leave the split between them to chance). Without others: the rest is all
        memory-bound."""
        from scipy.optimize import nnls
        self.memory0 = float(max(cm.original["memory"], 1))
        self.calibration = [tuple(round(float(x), 6) for x in c) for c in calibration]
        h0, _, l0 = calibration[0]
        if len(calibration) > 1:
            prior = PRIOR * h0
            a = np.array([[h - h0, m - 1.0] for h, m, _ in calibration[1:]] + [[prior, 0.0]])
            b = np.array([lat - l0 for _, _, lat in calibration[1:]] + [prior])
            (s, r), _ = nnls(a, b)
            c = l0 - s * h0 - r
            if c < 0:        # nothing fixed: fit through the origin, the dense row dominant
                w = np.array([100.0] + [1.0] * (len(calibration) - 1))
                a = np.array([[h, m] for h, m, _ in calibration]) * w[:, None]
                (s, r), _ = nnls(a, np.array([lat for _, _, lat in calibration]) * w)
                k = l0 / max(s * h0 + r, 1e-12)    # and exactly through the dense model
                s, r, c = s * k, r * k, 0.0
            if s > 0 or r > 0:
                self.scale, self.rest_ms, self.const_ms = float(s), float(r), float(c)
                return
        if h0 <= l0:
            self.scale, self.rest_ms, self.const_ms = 1.0, float(l0 - h0), 0.0
        else:
            self.scale, self.rest_ms, self.const_ms = float(l0 / max(h0, 1e-12)), 0.0, 0.0

    def to_json(self) -> dict:
        s = self.settings
        return {"provider": s.provider, "batch": s.batch, "threads": s.threads,
                "dense_ms": round(self.dense_ms, 4),
                "heavy_nodes": len(self.tables), "fixed_heavy_ms": round(self.fixed_ms, 4),
                "rest_ms": round(self.rest_ms, 4), "const_ms": round(self.const_ms, 4),
                "scale": round(self.scale, 4), "align": s.align,
                "calibration": [{"heavy_ms": h, "memory": m, "measured_ms": lat}
                                for h, m, lat in self.calibration],
                "overhead_ms": round(self.overhead_ms, 4), "skipped_nodes": self.skipped,
                "measured_points": self.measured_points, "cache": self.cache_path}


# ------------------------------------------------------------------------------------------
# shapes at the measured batch size


def _concrete_shapes(model, feeds: dict, names: set[str]) -> dict[str, tuple]:
    """Static shapes of `names` when the model runs on `feeds`: the inferred shapes with
    the graph inputs' symbols bound; what stays unknown from ONNX shape inference on the
    skeleton with fixed inputs, then from one ONNX Runtime run."""
    symbols: dict[str, int] = {}
    for v in model.graph.input:
        if v.name in feeds:
            for d, n in zip(v.type.tensor_type.shape.dim, feeds[v.name].shape):
                if d.HasField("dim_param") and d.dim_param:
                    symbols[d.dim_param] = int(n)
    out, todo = {}, set()
    for t in names:
        if t in feeds:
            out[t] = tuple(int(x) for x in feeds[t].shape)
            continue
        if t in model.consts:
            out[t] = tuple(int(x) for x in model.consts[t].shape)
            continue
        s = model.shapes.get(t)
        if s is not None:
            s = tuple(x if isinstance(x, int) else symbols.get(x) for x in s)
        if s is None or any(x is None for x in s):
            todo.add(t)
        else:
            out[t] = s
    if todo:
        from .ir.model import _dims_of, _skeleton
        sk = _skeleton(model)
        for v in sk.graph.input:
            if v.name in feeds:
                dims = v.type.tensor_type.shape.dim
                for d, n in zip(dims, feeds[v.name].shape):
                    d.Clear()
                    d.dim_value = int(n)
        try:
            inf = onnx.shape_inference.infer_shapes(sk, data_prop=True)
            for v in list(inf.graph.value_info) + list(inf.graph.output):
                if v.name in todo:
                    d = _dims_of(v.type)
                    if d is not None and all(isinstance(x, int) for x in d):
                        out[v.name] = d
                        todo.discard(v.name)
        except Exception:
            pass
    if todo:
        from .runtime import session_for
        m = onnx.ModelProto()
        m.CopyFrom(model.proto)
        del m.graph.output[:]
        for t in sorted(todo):
            m.graph.output.append(onnx.ValueInfoProto(name=t))
        try:
            s = session_for(m)
            names_o = [o.name for o in s.get_outputs()]
            for t, arr in zip(names_o, s.run(names_o, feeds)):
                out[t] = tuple(int(x) for x in np.shape(arr))
        except Exception as exc:
            raise SpaError(f"cannot tell the shapes of {sorted(todo)[:3]} at this batch size "
                           f"({type(exc).__name__}: {exc}); give the input shapes",
                           file=model.path)
    return out


# ------------------------------------------------------------------------------------------
# one-node models


class _MicroShrink:
    """What a rule's `shrink` hook may call, for a one-node model: the new length of a dim
    and attribute updates."""

    def __init__(self, node: onnx.NodeProto, shapes: dict):
        self.node, self.shapes = node, shapes

    def new_len(self, key) -> int:
        return int(self.shapes[key[0]][key[1]])

    def set_attr(self, n, name: str, value) -> None:
        for a in list(self.node.attribute):
            if a.name == name:
                self.node.attribute.remove(a)
        self.node.attribute.append(helper.make_attribute(name, value))


def _dtype(model, t: str) -> int:
    if t in model.consts:
        return int(helper.np_dtype_to_tensor_dtype(model.consts[t].dtype))
    return int(model.dtypes.get(t) or onnx.TensorProto.FLOAT)


class _Point:
    """One node at one set of widths: its one-node model and its signature."""

    def __init__(self, model, proto: onnx.NodeProto, shapes: dict, changed: bool):
        node = onnx.NodeProto()
        node.CopyFrom(proto)
        node.name = "spa_latency_node"
        if changed:
            r = registry.get(proto)
            if r is not None and r.shrink is not None:
                r.shrink(Node(proto, model), _MicroShrink(node, shapes))
        self.node, self.inputs = node, []
        for t in proto.input:
            if t:
                self.inputs.append((t, tuple(shapes[t]), _dtype(model, t), t in model.consts))
        ops = [(o.domain, o.version) for o in model.proto.opset_import]
        attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)
        sig = json.dumps([proto.op_type, proto.domain, attrs, sorted(ops),
                          [(s, d, c) for _, s, d, c in self.inputs]])
        self.sig = hashlib.sha1(sig.encode()).hexdigest()
        self.opsets = ops
        self.outputs = [(o, _dtype(model, o)) for o in proto.output if o]

    def build(self, model, rng) -> tuple[onnx.ModelProto, dict[str, tuple]]:
        """The one-node model (weights random, same dtype and shape) and its input shapes."""
        inits, ins, feeds = [], [], {}
        for t, shape, dt, const in self.inputs:
            if const:
                arr = model.consts[t]
                if tuple(arr.shape) != shape:
                    if not np.issubdtype(arr.dtype, np.floating):
                        raise ValueError(f"integer operand {t} changes shape")
                    arr = (rng.standard_normal(shape) * 0.05).astype(arr.dtype)
                inits.append(numpy_helper.from_array(np.asarray(arr), t))
            else:
                ins.append(helper.make_tensor_value_info(t, dt, list(shape)))
                feeds[t] = (shape, dt)
        outs = [helper.make_tensor_value_info(o, dt, None) for o, dt in self.outputs]
        g = helper.make_graph([self.node], "spa_latency", ins, outs, inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v)
                                                for d, v in self.opsets])
        m.ir_version = model.proto.ir_version
        return m, feeds


def _buffers(points: list[_Point], rng) -> dict:
    """One random buffer per activation input, large enough for every point; a point's
    feed is a contiguous prefix of it (no copies, one allocation per input)."""
    need: dict[str, tuple[int, int]] = {}
    for p in points:
        for t, shape, dt, const in p.inputs:
            if not const:
                n = int(np.prod(shape)) if shape else 1
                need[t] = (max(need.get(t, (0, dt))[0], n), dt)
    out = {}
    for t, (n, dt) in need.items():
        np_dt = helper.tensor_dtype_to_np_dtype(dt)
        if np.issubdtype(np_dt, np.floating):
            out[t] = rng.standard_normal(n).astype(np_dt)
        else:
            out[t] = np.zeros(n, np_dt)
    return out


def _overhead_ms(settings: LatencySettings) -> float:
    """One run of a model that does nothing (an Identity on one float)."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "idle", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    run = Runner(make_session(m, settings.provider, settings.threads),
                 {"x": np.zeros(1, np.float32)}, settings.provider)
    t = time_interleaved([run], repeat=200, warmup=20)
    return float(np.median(t)) * 1e3


#: ops ONNX Runtime adds around a one-node model that the node does not have in its graph
#: (the blocked-layout conversions before and after a CPU convolution: inside the model the
#: activations stay blocked from one convolution to the next)
LAYOUT_OPS = ("ReorderInput", "ReorderOutput")


def _kernel_ms(session, runs: int) -> np.ndarray | None:
    """Per run, the summed kernel time (ms) of the session's last `runs` runs, without the
    layout conversions, from ONNX Runtime's profile (None if it cannot be read)."""
    path = session.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    except (OSError, ValueError):
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    kern = [e for e in events if e.get("cat") == "Node" and
            str(e.get("name", "")).endswith("_kernel_time") and
            e.get("args", {}).get("op_name") not in LAYOUT_OPS]
    run_ev = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(run_ev) < runs or not kern:
        return None
    out = []
    for t0, t1 in run_ev[-runs:]:
        out.append(sum(e["dur"] for e in kern if t0 <= e["ts"] <= t1) * 1e-3)
    return np.asarray(out)


def _measure(model, points: list[_Point], settings: LatencySettings, overhead: float,
             budget_s: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Median latency (ms) of the points of one node, interleaved.

    CPU: the kernels' own time from ONNX Runtime's profile, without the layout conversions
    a one-node model needs and the model does not; CUDA (where the profile only sees kernel
    *launches*): wall-clock time with I/O binding, minus the overhead of an empty run."""
    rng = np.random.default_rng(seed)
    bufs = _buffers(points, rng)
    profile = settings.provider == "cpu"
    runners = []
    with tempfile.TemporaryDirectory(prefix="spa-profile-") as tmp:
        for k, p in enumerate(points):
            proto, shapes = p.build(model, rng)
            feeds = {t: bufs[t][:int(np.prod(s)) if s else 1].reshape(s)
                     for t, (s, _) in shapes.items()}
            sess = make_session(proto, settings.provider, settings.threads,
                                profile=os.path.join(tmp, f"p{k}") if profile else None)
            runners.append(Runner(sess, feeds, settings.provider))
        # one timed run each (after a warm-up run) sizes the number of rounds
        first = time_interleaved(runners, repeat=1, warmup=1)
        per_round = float(first.sum())
        rounds = int(min(25, max(5, math.ceil(budget_s / max(per_round, 1e-6)))))
        t = np.vstack([first, time_interleaved(runners, repeat=rounds - 1, warmup=0)]) \
            if rounds > 1 else first
        wall = np.median(t, axis=0) * 1e3 - overhead
        out = {}
        for p, r, w in zip(points, runners, wall):
            k = _kernel_ms(r.session, rounds) if profile else None
            out[p.sig] = float(np.median(k)) if k is not None else max(float(w), 0.0)
    return out


def _smooth(axes: list[np.ndarray], ms: np.ndarray) -> np.ndarray:
    """Replace outliers (a busy moment of a shared machine) by a smooth fit.

    A node's latency is close to a + b*f_in + c*f_out + d*f_in*f_out (fixed cost, reading
    the input, writing the output, the multiply-accumulates): that is fitted with
    non-negative coefficients, robustly (points far off are dropped and the fit repeated),
    and a point more than 3 robust deviations (and 25 %) off the fit is replaced by it.
    Real steps (a faster kernel at some width) stay; single wild points go."""
    from scipy.optimize import nnls
    grids = np.meshgrid(*axes, indexing="ij")
    fs = [g.ravel() for g in grids]
    y = ms.ravel().astype(np.float64)
    if len(y) < 4:
        return ms
    if len(fs) == 1:
        x = np.stack([np.ones_like(y), fs[0], fs[0] ** 2], 1)
    else:
        x = np.stack([np.ones_like(y), fs[0], fs[1], fs[0] * fs[1]], 1)
    keep = np.ones(len(y), bool)
    fit = y
    for _ in range(3):
        coef, _ = nnls(x[keep], y[keep])
        fit = x @ coef
        rel = (y - fit) / np.maximum(fit, 1e-9)
        mad = float(np.median(np.abs(rel[keep] - np.median(rel[keep])))) * 1.4826
        bad = np.abs(rel) > max(3.0 * mad, 0.25)
        if (keep == ~bad).all():
            break
        keep = ~bad
        if keep.sum() < x.shape[1]:
            return ms
    return np.where(keep, y, fit).reshape(ms.shape)


# ------------------------------------------------------------------------------------------
# the model


def _var_channels(cm: CostModel) -> list[frozenset]:
    """The channels owning elements of every variable dim (single and shared owners)."""
    owns = cm.owns.tocsr()
    sets = [set(owns.indices[owns.indptr[v]:owns.indptr[v + 1]].tolist())
            for v in range(cm.n_var)]
    if cm.n_multi:
        for k, v in enumerate(cm.m_dim.tolist()):
            sets[v].update(cm.m_chans[cm.m_owner == k].tolist())
    return [frozenset(s) for s in sets]


def _classes(vids: list[int], chans: list[frozenset]) -> list[tuple[int, list[int]]]:
    """Variable dims of one node grouped by the channels they lose: [(rep, [vids])]."""
    by: dict[frozenset, list[int]] = {}
    for v in vids:
        by.setdefault(chans[v], []).append(v)
    return [(vs[0], vs) for _, vs in sorted(by.items(), key=lambda kv: min(kv[1]))]


def cache_dir(settings: LatencySettings | None = None) -> str:
    if settings is not None and settings.cache_dir:
        return settings.cache_dir
    root = os.environ.get("SPA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "spa")
    return os.path.join(root, "latency")


def _cache_path(model, settings: LatencySettings) -> str:
    import onnxruntime as ort
    from .plan import model_sha256
    sha = str(model_sha256(model))
    extra = hashlib.sha1(repr(settings.key()).encode()).hexdigest()[:8] \
        if settings.shapes else "default"
    name = (f"{sha[:16]}-{settings.provider}-b{settings.batch}-t{settings.threads}-"
            f"ort{ort.__version__}-{extra}.json")
    return os.path.join(cache_dir(settings), name)


def _read_cache(path: str, sha: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") == FORMAT and data.get("model_sha256") == sha:
            return data
    except (OSError, ValueError):
        pass
    return {}


def _write_cache(path: str, data: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=0, sort_keys=True))
    except OSError:  # a read-only cache is no reason to fail: the tables are in memory
        pass


def build(model, analysis, settings: LatencySettings | None = None) -> LatencyModel:
    """Measure (or read from the cache) the latency tables of `model` and fit the model."""
    from .plan import model_sha256
    settings = settings or LatencySettings()
    settings.check()
    cm = base_cost_model(analysis)
    feeds = feeds_for(model, settings.batch, settings.shapes)
    path = _cache_path(model, settings)
    sha = str(model_sha256(model))
    cache = {} if settings.refresh else _read_cache(path, sha)
    points_ms: dict[str, float] = dict(cache.get("points", {}))
    chans = _var_channels(cm)
    var_nodes = {id(node.proto): (node, tv, vids) for _, node, tv, vids in cm._mac_nodes}
    heavy = []
    for proto in model.nodes:
        r = registry.get(proto)
        if r is not None and r.macs is not None:
            heavy.append(proto)
    names = {t for p in heavy for t in list(p.input) + list(p.output) if t}
    concrete = _concrete_shapes(model, feeds, names)

    # the points of every heavy node
    plans = []   # (proto, classes, diagonal, [(_Point, kept fraction per class)])
    for proto in heavy:
        node_info = var_nodes.get(id(proto))
        full = {t: concrete[t] for t in list(proto.input) + list(proto.output) if t}
        if node_info is None:
            plans.append((proto, [], [], [(_Point(model, proto, full, False), ())]))
            continue
        _, tv, vids = node_info
        classes = _classes(vids, chans)
        diagonal = len(classes) > 2
        combos = [(f,) * len(classes) for f in GRID] if diagonal else \
            [tuple(c) for c in np.array(np.meshgrid(*[GRID] * len(classes), indexing="ij"))
             .reshape(len(classes), -1).T.tolist()]
        pts = []
        for combo in combos:
            removed = np.zeros(cm.n_channels, bool)
            for (rep, _), f in zip(classes, combo):
                cs = sorted(chans[rep])
                removed[cs[:len(cs) - _kept(len(cs), f, settings.align)]] = True
            lens = cm.new_lengths(removed)
            shapes = dict(full)
            for t, vs in tv:
                s = list(shapes[t])
                for ax, v in vs:
                    s[ax] = int(lens[v])
                shapes[t] = tuple(s)
            frac = tuple(float(lens[rep] / cm.length[rep]) for rep, _ in classes)
            pts.append((_Point(model, proto, shapes, True), frac))
        plans.append((proto, classes, diagonal, pts))

    overhead = cache.get("overhead_ms")
    todo = {}
    for proto, classes, diagonal, pts in plans:
        mine = [p for p, _ in pts if p.sig not in points_ms and p.sig not in todo]
        if mine:
            todo.update({p.sig: (proto, p) for p in mine})
    measured, skipped = 0, []
    if todo:
        if overhead is None:
            overhead = _overhead_ms(settings)
        by_node: dict[int, list] = {}
        for sig, (proto, p) in todo.items():
            by_node.setdefault(id(proto), []).append((proto, p))
        n_nodes = len(by_node)
        _log(settings, f"latency tables: timing {len(todo)} one-node models of {n_nodes} "
                       f"distinct nodes on {settings.provider} (batch {settings.batch})")
        t0 = time.perf_counter()
        for k, group in enumerate(by_node.values()):
            proto = group[0][0]
            try:
                points_ms.update(_measure(model, [p for _, p in group], settings, overhead))
                measured += len(group)
            except Exception as exc:  # noqa: BLE001 - an untimable node joins the rest
                skipped.append(f"{model.node_name(proto)} ({type(exc).__name__}: {exc})")
            if settings.log is not None and (k + 1) % 10 == 0:
                _log(settings, f"  {k + 1}/{n_nodes} nodes, {time.perf_counter() - t0:.0f} s")
    if overhead is None:
        overhead = 0.0

    tables, fixed = [], 0.0
    for proto, classes, diagonal, pts in plans:
        if any(p.sig not in points_ms for p, _ in pts):
            continue
        if not classes:
            fixed += points_ms[pts[0][0].sig]
            continue
        if not diagonal:   # a rectilinear grid, unless classes share channels
            axes_vals = [sorted({fr[j] for _, fr in pts}) for j in range(len(classes))]
            diagonal = int(np.prod([len(a) for a in axes_vals])) != len({fr for _, fr in pts})
        if diagonal:
            axes_vals = [sorted({float(np.mean(fr)) for _, fr in pts})]
        axes = [np.asarray(a) for a in axes_vals]
        ms = np.zeros(tuple(len(a) for a in axes))
        n = np.zeros(ms.shape)
        for p, fr in pts:
            key = [float(np.mean(fr))] if diagonal else list(fr)
            idx = tuple(int(np.searchsorted(a, x)) for a, x in zip(axes, key))
            ms[idx] += points_ms[p.sig]
            n[idx] += 1
        ms /= np.maximum(n, 1)
        t = NodeTable(model.node_name(proto), [rep for rep, _ in classes],
                      [int(cm.length[rep]) for rep, _ in classes], axes,
                      _smooth(axes, ms), diagonal)
        t.monotone()
        tables.append(t)

    calib_plans = _calibration_plans(analysis, settings.align)
    calib = dict(cache.get("calibration", {})) if not measured else {}
    times = calib.get(str(settings.align))
    if times is None or len(times) != len(calib_plans) + 1:
        _log(settings, f"latency: timing the model whole, unpruned and at "
                       f"{len(calib_plans)} uniform widths")
        times = calibrate(model, analysis, settings, feeds, calib_plans)
        calib[str(settings.align)] = times
        measured += 1
    lm = LatencyModel(settings, tables, fixed, times[0][1], overhead, skipped=skipped,
                      measured_points=measured, cache_path=path)
    rows = []
    for (ratio, ms), removed in zip(times, [None] + [r for _, r in calib_plans]):
        lens = cm.length.copy() if removed is None else cm.new_lengths(removed)
        mem = cm._products("memory", lens) / max(cm.original["memory"], 1)
        rows.append((lm.heavy_ms(lens), mem, ms))
    lm.fit(cm, rows)
    if measured:
        _write_cache(path, {"format": FORMAT, "model_sha256": sha,
                            "provider": settings.provider, "batch": settings.batch,
                            "threads": settings.threads, "grid": list(GRID),
                            "overhead_ms": overhead, "points": points_ms,
                            "calibration": calib})
    return lm


def _kept(n: int, f: float, align: int) -> int:
    """Channels a class of n keeps at fraction f: a multiple of `align` when it can be."""
    if align > 1 and n >= align:
        return int(min(n, max(align, align * round(f * n / align))))
    return int(min(n, max(1, round(f * n))))


#: uniform ratios whose pruned models calibrate the model (with the unpruned one)
CALIBRATION = (0.25, 0.5, 0.75)


def _calibration_plans(analysis, align: int) -> list[tuple[float, np.ndarray]]:
    """(ratio, removed channels) of uniform plans: the same ratio of every group (the last
    channels; which ones does not matter for latency), group sizes multiples of `align`."""
    from .select.local import uniform
    scores = [np.arange(g.channels, 0, -1, dtype=np.float64) for g in analysis.groups]
    out, seen = [], set()
    for r in CALIBRATION:
        plan = uniform(analysis, scores, r, round_to=align, criterion="calibration")
        removed = np.zeros(analysis.n_channels, bool)
        removed[plan.removed(analysis)] = True
        key = removed.tobytes()
        if removed.any() and key not in seen:
            seen.add(key)
            out.append((r, removed))
    return out


def calibrate(model, analysis, settings: LatencySettings, feeds: dict,
              plans: list[tuple[float, np.ndarray]]) -> list[list[float]]:
    """Median latency (ms) of the unpruned model and of each calibration plan's model,
    interleaved: [[0.0, dense ms], [ratio, ms], ...]."""
    from .plan import Plan, model_sha256
    from .rewrite.apply import apply_plan
    protos = [model.proto]
    for _, removed in plans:
        keep, sizes = {}, {}
        for g, chans in enumerate(analysis.group_chans):
            gone = removed[chans]
            if gone.any():
                keep[g] = np.nonzero(~gone)[0].tolist()
                sizes[g] = len(chans)
        protos.append(apply_plan(model, analysis,
                                 Plan(keep, sizes, "calibration", {}, model_sha256(model))))
    runners = [Runner(make_session(p, settings.provider, settings.threads), feeds,
                      settings.provider) for p in protos]
    t0 = time.perf_counter()
    runners[0]()
    first = time.perf_counter() - t0
    repeat = settings.repeat or int(min(30, max(5, math.ceil(
        3.0 / max(first * (1 + len(plans) / 2), 1e-6)))))
    med = np.median(time_interleaved(runners, repeat=repeat), axis=0) * 1e3
    return [[0.0, float(med[0])]] + [[r, float(m)] for (r, _), m in zip(plans, med[1:])]


# ------------------------------------------------------------------------------------------
# the cost metric


class LatencyCost:
    """A cost model with one more metric, `latency` (predicted nanoseconds): the selections
    see it through the same `evaluate` / `linearize` / `original` as flops or params."""

    def __init__(self, base: CostModel, lm: LatencyModel):
        self.base, self.lm = base, lm
        self.original = dict(base.original)
        self.original[METRIC] = self._value(base.length.copy())

    def __getattr__(self, name):          # everything else is the base cost model's
        return getattr(self.base, name)

    def _value(self, lens: np.ndarray) -> float:
        mem = self.base._products("memory", lens)
        return self.lm.predict_ms(lens, mem) * 1e6

    def evaluate(self, removed, metrics=("params", "macs", "memory")) -> dict:
        others = tuple(m for m in metrics if m != METRIC)
        out = self.base.evaluate(removed, others) if others else {}
        if METRIC in metrics:
            out[METRIC] = self._value(self.base.new_lengths(removed))
        return {m: out[m] for m in metrics}

    def linearize(self, removed, metric: str):
        """(latency, saving per channel) in ns: backward differences of every table along
        its classes' representative dims, plus the rest's memory term."""
        if metric != METRIC:
            return self.base.linearize(removed, metric)
        b, lm = self.base, self.lm
        lens = b.new_lengths(removed)
        total = self._value(lens)
        grad = np.zeros(b.n_var, np.float64)
        for t in lm.tables:
            here = t.at(lens)
            for v in t.reps:
                if lens[v] <= 1:
                    continue
                lens[v] -= 1
                grad[v] += here - t.at(lens)
                lens[v] += 1
        grad *= lm.scale * 1e6
        saving = b.owns_t @ grad
        if b.n_multi:
            saving += np.bincount(b.m_chans, weights=grad[b.m_dim][b.m_owner],
                                  minlength=b.n_channels)
        if lm.rest_ms > 0:
            _, mem_saving = b.linearize(removed, "memory")
            saving = saving + mem_saving * (lm.rest_ms * 1e6 / lm.memory0)
        return total, saving


def base_cost_model(analysis) -> CostModel:
    cm = cost_model(analysis)
    return cm.base if isinstance(cm, LatencyCost) else cm


def attach(model, analysis, settings: LatencySettings | None = None) -> LatencyModel:
    """Build (or reuse) the latency model for these settings and make `latency` a cost
    metric of the analysis, for every selection."""
    settings = settings or LatencySettings()
    cur = analysis.__dict__.get("_cost_model")
    if isinstance(cur, LatencyCost) and cur.lm.settings.key() == settings.key():
        return cur.lm   # measured in this process already (refresh or not)
    base = base_cost_model(analysis)
    lm = build(model, analysis, settings)
    analysis.__dict__["_cost_model"] = LatencyCost(base, lm)
    return lm


# ------------------------------------------------------------------------------------------
# the measured loop


def prune_to_latency(model, analysis, target, make_plan, settings: LatencySettings):
    """Plan for a latency fraction, measure, correct: returns (plan, pruned proto).

    `make_plan(target)` selects for a latency target (the model must be attached). Each
    round applies the plan and times pruned and original interleaved (the median of the
    per-round ratios); when the measured fraction is within TOLERANCE (relative) of the
    asked one the loop ends, otherwise the next round asks the selection for a fraction
    corrected by the miss
    (secant through the last two rounds, proportional after the first). The plan that
    landed closest is kept; its options["latency"] records every round."""
    from .rewrite.apply import apply_plan
    from .select.global_ import Target
    asked = float(target.fraction)
    lm = attach(model, analysis, settings)
    feeds = feeds_for(model, settings.batch, settings.shapes)
    orig = Runner(make_session(model.proto, settings.provider, settings.threads), feeds,
                  settings.provider)
    rounds, best = [], None
    aim = asked
    for i in range(settings.rounds):
        try:
            plan = make_plan(Target(METRIC, aim))
        except UsageError:
            if not rounds:              # the asked fraction itself cannot be met
                raise
            break                       # a corrected aim the constraints cannot reach
        proto = apply_plan(model, analysis, plan)
        pruned = Runner(make_session(proto, settings.provider, settings.threads), feeds,
                        settings.provider)
        repeat = settings.repeat or int(min(40, max(7, math.ceil(
            6.0 / max(lm.dense_ms * 1e-3 * (1 + asked), 1e-6)))))
        st = summarize(time_interleaved([orig, pruned], repeat=repeat))
        measured = st[1]["fraction"]          # median of the per-round ratios
        row = {"aim": round(aim, 6), "predicted": plan.options.get("achieved"),
               "measured": round(measured, 6),
               "original_ms": round(st[0]["median_ms"], 4),
               "pruned_ms": round(st[1]["median_ms"], 4),
               "speedup_p10": round(st[1]["speedup_p10"], 4),
               "speedup_p90": round(st[1]["speedup_p90"], 4), "runs": repeat}
        rounds.append(row)
        _log(settings, f"latency round {i + 1}: aimed {aim:.4f}, predicted "
                       f"{row['predicted']:.4f}, measured {measured:.4f} (asked {asked:g})")
        miss = abs(measured / asked - 1.0)
        if best is None or (miss, measured) < (best[0], best[1]):
            best = (miss, measured, plan, proto, row)
        if miss <= TOLERANCE:
            break
        if len(rounds) >= 2 and rounds[-1]["measured"] != rounds[-2]["measured"] \
                and rounds[-1]["aim"] != rounds[-2]["aim"]:
            a0, m0 = rounds[-2]["aim"], rounds[-2]["measured"]
            a1, m1 = rounds[-1]["aim"], rounds[-1]["measured"]
            slope = (a1 - a0) / (m1 - m0)
            nxt = a1 + slope * (asked - m1) if slope > 0 else aim * asked / measured
        else:
            nxt = aim * asked / measured
        nxt = float(min(1.0, max(nxt, 0.02)))
        if abs(nxt - aim) < 1e-4:
            break
        aim = nxt
    miss, measured, plan, proto, row = best
    # the plan states what was asked and what was measured (the selection's own target was
    # the corrected aim of its round, kept in `rounds`)
    plan.options["target"] = target.to_json()
    plan.options["achieved"] = row["measured"]
    plan.options["latency"] = {
        "asked": asked, "measured": row["measured"], "predicted": row["predicted"],
        "miss": round(measured / asked - 1.0, 6), "within_tolerance": miss <= TOLERANCE,
        "tolerance": TOLERANCE, "rounds": rounds, "model": lm.to_json()}
    return plan, proto
