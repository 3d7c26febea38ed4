"""Calibration inputs and intermediate activations, from ONNX Runtime, batch by batch.

Data-aware criteria (OBSPA) need the inputs of some layers on calibration samples. They get
them framework-free: the requested tensors are added as extra graph outputs of a copy of the
model and ONNX Runtime runs it on one batch at a time; the caller folds each batch into its
statistics and drops it. Memory stays bounded: the batch size is chosen from the measured
per-sample size of the requested tensors (`max_bytes`), and tensors that do not fit together
even for one sample are streamed in several passes.

Calibration sources (`load_calibration`):

- a file: ``.npz`` with one array per graph input (first axis = samples) and optionally
  ``labels``; validated against the model (missing inputs, ranks, static dims, sample
  counts, NaN/Inf) with errors that say what to fix;
- ``synthetic``: inputs made up from the model itself (`synthesize`);
- ``none``: no samples at all (the criterion falls back to statistics stored in the model).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx

from .errors import SpaError, UsageError
from .runtime import _NP, session_for

MODES = ("file", "synthetic", "none")
#: key of the batch's row mask (`Calibration.row_mask`) in what `stream` yields
ROW_MASK = "\0row_mask"
DEFAULT_MAX_BYTES = 256 << 20


@dataclass
class Calibration:
    """Calibration samples for a model: `arrays` maps every graph input to an array whose
    first axis is the sample axis (None for mode "none")."""
    mode: str                                  # file | synthetic | none
    arrays: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    #: the graph to collect activations from, when not the model itself (synthetic inputs:
    #: the model with batch-statistics BatchNorms, see `batch_statistics_model`)
    network: onnx.ModelProto | None = None
    #: which positions of a [samples, seq] layout are real (True) rather than padding; rows
    #: of layer inputs laid out [batch, seq, ...] at padding positions are left out of the
    #: statistics (see `row_mask_for`)
    row_mask: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        if not self.arrays:
            return 0
        return int(next(iter(self.arrays.values())).shape[0])

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict]:
        n = self.n_samples if limit is None else min(limit, self.n_samples)
        for start in range(0, n, max(1, batch_size)):
            stop = min(n, start + batch_size)
            yield {k: v[start:stop] for k, v in self.arrays.items()}

    def row_masks(self, batch_size: int, limit: int | None = None) -> Iterator:
        """The row mask of each batch of `batches(batch_size, limit)` (None without one)."""
        n = self.n_samples if limit is None else min(limit, self.n_samples)
        for start in range(0, n, max(1, batch_size)):
            stop = min(n, start + batch_size)
            yield None if self.row_mask is None else self.row_mask[start:stop]

    def describe(self) -> dict:
        return {"mode": self.mode, "samples": self.n_samples, "source": self.source,
                "notes": list(self.notes)}


# ------------------------------------------------------------------------------------------
# loading and validating a calibration file


def _input_specs(model) -> dict[str, tuple[list, int]]:
    """Graph input -> (declared dims: int or None per axis, element type)."""
    specs = {}
    inits = {t.name for t in model.graph.initializer}
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tt.shape.dim] if tt.HasField("shape") else None
        specs[v.name] = (dims, tt.elem_type)
    return specs


def load_calibration_file(path: str, model) -> Calibration:
    """Read and validate `path` (.npz) for `model`; SpaError (exit 3) with the fix."""
    if not os.path.isfile(path):
        raise SpaError("calibration file not found (expected an .npz with one array per "
                       "graph input, first axis = samples)", file=path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SpaError(f"cannot read the calibration file as .npz ({type(exc).__name__}: "
                       f"{exc})", file=path)
    specs = _input_specs(model)
    missing = [n for n in specs if n not in data]
    if missing:
        raise SpaError(f"calibration file has no array for graph input(s) "
                       f"{', '.join(map(repr, missing))} (it has "
                       f"{', '.join(map(repr, sorted(data))) or 'nothing'}); name each array "
                       "after the graph input it feeds", file=path)
    arrays, n = {}, None
    for name, (dims, elem) in specs.items():
        a = data[name]
        dtype = _NP.get(elem)
        if dtype is None:
            raise SpaError(f"graph input {name!r} has an unsupported element type",
                           file=path)
        if a.dtype.kind not in "biuf":
            raise SpaError(f"calibration array {name!r} has dtype {a.dtype}, expected "
                           f"numbers ({np.dtype(dtype).name})", file=path)
        if dims is not None and a.ndim != len(dims):
            raise SpaError(f"calibration array {name!r} has shape {tuple(a.shape)}; graph "
                           f"input {name!r} has rank {len(dims)} (samples on the first axis)",
                           file=path)
        if dims is not None:
            bad = [k for k, d in enumerate(dims) if k > 0 and d is not None and a.shape[k] != d]
            if bad:
                want = tuple("N" if k == 0 else (d if d is not None else "?")
                             for k, d in enumerate(dims))
                raise SpaError(f"calibration array {name!r} has shape {tuple(a.shape)}, "
                               f"the graph input expects {want}", file=path)
        if a.ndim == 0 or a.shape[0] == 0:
            raise SpaError(f"calibration array {name!r} holds no samples", file=path)
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise SpaError(f"calibration arrays disagree on the number of samples "
                           f"({name!r} has {a.shape[0]}, others {n})", file=path)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise SpaError(f"calibration array {name!r} contains {bad} NaN/Inf values",
                           file=path)
        if np.issubdtype(dtype, np.integer) and a.dtype.kind == "f" and \
                not np.array_equal(a, np.round(a)):
            raise SpaError(f"calibration array {name!r} must hold integers (graph input "
                           f"type {np.dtype(dtype).name})", file=path)
        arrays[name] = np.ascontiguousarray(a.astype(dtype, copy=False))
    row_mask, mask_note = row_mask_for(arrays, data.get(ROW_MASK_KEY), n, path)
    labels = data.get("labels")
    if labels is not None and (labels.ndim < 1 or labels.shape[0] != n):
        raise SpaError(f"calibration 'labels' has {labels.shape[0] if labels.ndim else 0} "
                       f"entries for {n} samples", file=path)
    extra = sorted(set(data) - set(specs) - {"labels", ROW_MASK_KEY})
    notes = [f"ignored arrays that feed no graph input: {', '.join(extra)}"] if extra else []
    if mask_note:
        notes.append(mask_note)
    return Calibration("file", arrays, labels, source=os.path.basename(path), notes=notes,
                       row_mask=row_mask)


#: optional array of a calibration file: 0/1 [samples, seq], 1 where a position is real
ROW_MASK_KEY = "row_mask"


def row_mask_for(arrays: dict[str, np.ndarray], explicit: np.ndarray | None, n: int,
                 path: str = "") -> tuple[np.ndarray | None, str | None]:
    """The padding mask of a calibration set: the file's `row_mask` array when it has one
    (0/1, [samples, seq]), else the one graph input that is an attention mask — integer or
    bool, rank 2, a name containing "mask", only 0/1 values, at least one 1 per sample (the
    layout of BERT-style `attention_mask`). Padding positions (0) of layer inputs laid out
    [batch, seq, features] are then left out of the Hessians: the model ignores them (mean
    pooling, attention), so fitting them only dilutes the real tokens. Returns (mask or
    None, a note for the report)."""
    if explicit is not None:
        a = np.asarray(explicit)
        seqs = sorted({int(v.shape[1]) for v in arrays.values() if v.ndim >= 2})
        if a.ndim != 2 or a.shape[0] != n or a.shape[1] not in seqs:
            raise SpaError(f"calibration array {ROW_MASK_KEY!r} has shape {tuple(a.shape)}, "
                           f"expected ({n}, seq) with seq the second dim of an input "
                           f"({', '.join(map(str, seqs)) or 'none has one'}): 1 for real "
                           "positions, 0 for padding", file=path)
        if a.dtype.kind not in "biuf" or not np.isin(a, (0, 1)).all():
            raise SpaError(f"calibration array {ROW_MASK_KEY!r} must hold only 0 and 1",
                           file=path)
        m = a.astype(bool)
        if m.all():
            return None, f"{ROW_MASK_KEY}: every position real (no rows left out)"
        return m, (f"{ROW_MASK_KEY}: {int((~m).sum())} of {m.size} positions are padding, "
                   "left out of the statistics of [batch, seq, ...] layer inputs")
    found = [k for k, a in arrays.items()
             if "mask" in k.lower() and a.ndim == 2 and a.dtype.kind in "biu"
             and np.isin(a, (0, 1)).all() and a.any(axis=1).all()]
    if len(found) != 1:
        return None, None
    m = arrays[found[0]].astype(bool)
    if m.all():
        return None, None
    return m, (f"input {found[0]!r} read as the padding mask: {int((~m).sum())} of {m.size} "
               "positions left out of the statistics of [batch, seq, ...] layer inputs "
               f"(give an all-ones {ROW_MASK_KEY!r} array to keep them)")


def load_calibration(spec, model, *, n_synthetic: int = 256, seed: int = 0) -> Calibration:
    """`spec`: a Calibration, a path to an .npz, "synthetic" or "none"."""
    if isinstance(spec, Calibration):
        return spec
    if spec is None or spec == "none":
        return Calibration("none", source="model statistics (BatchNorm moments)")
    if spec == "synthetic":
        return synthesize(model, n=n_synthetic, seed=seed)
    if isinstance(spec, (str, os.PathLike)):
        return load_calibration_file(os.fspath(spec), model)
    raise UsageError(f"--calib must be an .npz file, 'synthetic' or 'none', got {spec!r}")


# ------------------------------------------------------------------------------------------
# streaming intermediate tensors


def with_outputs(proto: onnx.ModelProto, names: list[str], *,
                 only: bool = False) -> onnx.ModelProto:
    """A copy of `proto` whose graph outputs also include `names` (typeless: ORT infers).
    `only`: the graph outputs are exactly `names`, and the nodes nothing of them needs are
    left out (ONNX Runtime runs every node of a graph; this runs only the prefix needed)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    if only and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for n in g.node for a in n.attribute):
        producer = {o: k for k, n in enumerate(g.node) for o in n.output if o}
        need, todo = set(), list(names)
        while todo:
            k = producer.get(todo.pop())
            if k is None or k in need:
                continue
            need.add(k)
            todo.extend(i for i in g.node[k].input if i)
        nodes = [n for k, n in enumerate(g.node) if k in need]
        del g.node[:]
        g.node.extend(nodes)
        del g.output[:]
    have = {o.name for o in g.output}
    for n in names:
        if n not in have:
            g.output.append(onnx.ValueInfoProto(name=n))
            have.add(n)
    return out


def _sample_bytes(model, name: str, feeds: dict) -> int:
    """Bytes of one sample of `name`, from its inferred shape (symbolic non-batch axes take
    the largest static extent of the feeds, a rough but safe guess)."""
    shape = model.shapes.get(name)
    if shape is None:
        return 4 << 20
    fill = max([int(np.prod(v.shape[1:])) for v in feeds.values()] + [1])
    n = 1
    for k, d in enumerate(shape):
        if isinstance(d, int):
            n *= d
        elif k > 0:
            n *= fill
    return 4 * n


def _passes(model, names: list[str], calib: Calibration, max_bytes: int):
    """Split `names` into passes of at most `max_bytes` per sample; per-sample sizes."""
    first = next(calib.batches(1))
    per = {n: _sample_bytes(model, n, first) for n in names}
    passes, cur, used = [], [], 0
    for n in sorted(names, key=lambda t: -per[t]):
        if cur and used + per[n] > max_bytes:
            passes.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += per[n]
    if cur:
        passes.append(cur)
    return passes, per


def stream(model, names: list[str], calib: Calibration, *, batch_size: int = 64,
           max_bytes: int = DEFAULT_MAX_BYTES, threads: int = 0,
           limit: int | None = None, also: onnx.ModelProto | None = None) -> Iterator:
    """Yield {name: array} for every batch of `calib`: the values of the model's tensors
    `names` (graph inputs or node outputs). At most about `max_bytes` of requested tensors
    are alive at once: the batch shrinks, and tensors too big to share a pass get their own.
    With `also` (a model with the same inputs and tensor names, e.g. a pruned copy): yield
    pairs (values in the model, values in `also`) of the same batch."""
    if calib.arrays is None:
        raise SpaError("no calibration samples (calibration mode 'none')", file=model.path)
    names = list(dict.fromkeys(names))
    passes, per = _passes(model, names, calib, max_bytes // (2 if also is not None else 1))
    inputs = set(model.input_names)
    for group in passes:
        need = [n for n in group if n not in inputs]
        protos = [calib.network or model.proto] + ([also] if also is not None else [])
        sessions = [session_for(with_outputs(p, need, only=True), threads=threads)
                    if need else None for p in protos]
        size = sum(per[n] for n in group) * len(protos)
        bs = int(max(1, min(batch_size, max_bytes // max(size, 1))))
        for feeds, rmask in zip(calib.batches(bs, limit), calib.row_masks(bs, limit)):
            outs = []
            for sess in sessions:
                out = {n: feeds[n] for n in group if n in inputs}
                if need:
                    try:
                        vals = sess.run(need, feeds)
                    except Exception as exc:  # ORT errors are plain RuntimeErrors
                        raise SpaError(f"ONNX Runtime failed on the calibration inputs "
                                       f"({type(exc).__name__}: {exc})", file=model.path)
                    out.update(zip(need, vals))
                if rmask is not None:
                    out[ROW_MASK] = rmask
                outs.append(out)
            yield outs[0] if also is None else (outs[0], outs[1])


def runner(proto: onnx.ModelProto, names: list[str], *, threads: int = 0, path=None):
    """feeds -> {name: value} for the tensors `names` of `proto` (only the nodes they need
    run)."""
    sess = session_for(with_outputs(proto, names, only=True), threads=threads)

    def run(feeds: dict) -> dict:
        try:
            return dict(zip(names, sess.run(names, feeds)))
        except Exception as exc:  # ORT errors are plain RuntimeErrors
            raise SpaError(f"ONNX Runtime failed on the calibration inputs "
                           f"({type(exc).__name__}: {exc})", file=path)
    return run


class Frontier:
    """Runs a graph piece by piece over a fixed sequence of batches, remembering the
    tensors that the nodes not run yet still read (the frontier), so that each piece
    starts where the last one stopped instead of at the graph inputs. The weights may
    change between pieces (`compute` takes the current model each time, and `overrides`:
    new values of some of its initializers): a piece always runs with the weights it is
    given, and what it computed stays valid as long as later changes only touch nodes that
    have not run yet (sequential reconstruction: a layer is refitted before anything below
    it runs)."""

    def __init__(self, proto: onnx.ModelProto, batches: list[dict], *, threads: int = 0,
                 path=None):
        g = proto.graph
        self.n_nodes = len(g.node)
        self.done = np.zeros(self.n_nodes, bool)
        self.producer = {o: k for k, n in enumerate(g.node) for o in n.output if o}
        self.node_inputs = [[i for i in n.input if i] for n in g.node]
        self.node_outputs = [[o for o in n.output if o] for n in g.node]
        self.readers: dict[str, list[int]] = {}
        for k, ins in enumerate(self.node_inputs):
            for i in ins:
                self.readers.setdefault(i, []).append(k)
        self.cache = [dict(b) for b in batches]
        self.threads, self.path = threads, path
        self.ok = not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                          for n in g.node for a in n.attribute)

    def _read_later(self, t: str, done: np.ndarray) -> bool:
        """Some node not run yet reads tensor `t`."""
        return any(not done[r] for r in self.readers.get(t, []))

    def _segment(self, targets, have: set, inits: set, done: np.ndarray):
        """The nodes (in graph order) that compute `targets` from what is held."""
        seg, todo = set(), [t for t in targets if t not in have]
        while todo:
            t = todo.pop()
            k = self.producer.get(t)
            if k is None or k in seg or t in have or t in inits:
                continue
            if done[k]:
                raise SpaError(f"internal error: tensor {t!r} left the frontier",
                               file=self.path)
            seg.add(k)
            todo.extend(i for i in self.node_inputs[k] if i not in inits)
        return sorted(seg)

    def peak_bytes(self, rounds: list[list[str]], inits: set, bytes_of) -> int:
        """The most bytes per sample the frontier holds over a sequence of `compute`
        calls (targets per call), from `bytes_of(tensor)`, without running anything."""
        done = self.done.copy()
        have = set(self.cache[0]) if self.cache else set()
        peak = sum(bytes_of(t) for t in have)
        for targets in rounds:
            order = self._segment(targets, have, inits, done)
            done[order] = True
            have |= {o for k in order for o in self.node_outputs[k]}
            have = {t for t in have if t in targets or self._read_later(t, done)}
            peak = max(peak, sum(bytes_of(t) for t in have))  # targets are returned too
            have = {t for t in have if self._read_later(t, done)}
        return peak

    def compute(self, proto: onnx.ModelProto, targets: list[str],
                overrides: dict | None = None) -> list[dict]:
        """Values of `targets` for every batch, computed with `proto` (same nodes, in the
        same order, as the graph given at construction; weights may differ) and
        `overrides` ({initializer name: value} replacing the proto's)."""
        from onnx import helper, numpy_helper
        g = proto.graph
        overrides = overrides or {}
        inits = {t.name for t in g.initializer} | set(overrides)
        have = set(self.cache[0]) if self.cache else set()
        order = self._segment(targets, have, inits, self.done)
        made = {o for k in order for o in self.node_outputs[k]}
        ins = sorted({i for k in order for i in self.node_inputs[k]
                      if i not in inits and i not in made})
        self.done[order] = True
        keep = [t for t in made if self._read_later(t, self.done)]
        outs = list(dict.fromkeys([t for t in targets if t in made] + keep))
        if order:
            used = {i for k in order for i in self.node_inputs[k]}
            weights = [numpy_helper.from_array(np.asarray(overrides[t]), t)
                       for t in sorted(used & set(overrides))] + \
                [t for t in g.initializer if t.name in used and t.name not in overrides]
            sub = helper.make_graph(
                [g.node[k] for k in order], "segment",
                [helper.make_tensor_value_info(i, _onnx_type(self.cache[0][i]), None)
                 for i in ins],
                [onnx.ValueInfoProto(name=o) for o in outs], weights)
            m = helper.make_model(sub, opset_imports=proto.opset_import,
                                  ir_version=proto.ir_version)
            sess = session_for(m, threads=self.threads)
            for c in self.cache:
                try:
                    vals = sess.run(outs, {i: c[i] for i in ins})
                except Exception as exc:
                    raise SpaError(f"ONNX Runtime failed on the calibration inputs "
                                   f"({type(exc).__name__}: {exc})", file=self.path)
                c.update(zip(outs, vals))
        result = [{t: c[t] for t in targets} for c in self.cache]
        stale = [t for t in (self.cache[0] if self.cache else {})
                 if not self._read_later(t, self.done)]
        for c in self.cache:
            for t in stale:
                c.pop(t, None)
        return result


def _onnx_type(a: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype)


def batch_size_for(model, names: list[str], calib: Calibration, *, batch_size: int = 64,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, int]:
    """(batch size keeping `names` under `max_bytes` per batch, bytes per sample)."""
    first = next(calib.batches(1))
    per = sum(_sample_bytes(model, n, first) for n in names)
    return int(max(1, min(batch_size, max_bytes // max(per, 1)))), per


def run_outputs(proto: onnx.ModelProto, names: list[str], calib: Calibration, *,
                limit: int = 64, batch_size: int = 32, threads: int = 0) -> dict:
    """Concatenated values of `names` (graph outputs or intermediate tensors) of `proto` on
    the first `limit` calibration samples (for measuring errors, not for statistics)."""
    sess = session_for(with_outputs(proto, names), threads=threads)
    parts: dict[str, list] = {n: [] for n in names}
    for feeds in calib.batches(batch_size, limit):
        for n, v in zip(names, sess.run(names, feeds)):
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


# ------------------------------------------------------------------------------------------
# synthetic calibration inputs


def _first_bn(model) -> onnx.NodeProto | None:
    for node in model.nodes:
        if node.op_type == "BatchNormalization" and all(
                t in model.consts for t in node.input[1:5]):
            return node
    return None


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the spatial axes (2..) of x, rescaled to unit variance."""
    if sigma <= 0 or x.ndim < 3:
        return x
    from scipy.ndimage import gaussian_filter
    out = gaussian_filter(x.astype(np.float64), [0, 0] + [sigma] * (x.ndim - 2),
                          mode="reflect")
    return out / (out.std() + 1e-12)


def batch_statistics_model(model) -> onnx.ModelProto | None:
    """A copy of the model in which every (inference) BatchNormalization normalises with
    the statistics of the batch it sees instead of its running statistics, as in training.
    On synthetic inputs every BN output then has the per-channel mean β and variance γ² it
    has on real data, while the correlations between channels still come from the model's
    weights. Tensor names are kept. None if the model has no such BatchNormalization."""
    from onnx import helper, numpy_helper
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    g = proto.graph
    opset = model.opset
    nodes, changed = [], False
    for k, node in enumerate(g.node):
        r = model.rank(node.input[0]) if node.input else None
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or \
                len([o for o in node.output if o]) != 1 or r is None or r < 2 or \
                not all(t in model.consts for t in node.input[1:3]):
            nodes.append(node)
            continue
        changed = True
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        c = model.consts[node.input[1]].shape[0]
        shape = [1, c] + [1] * (r - 2)
        axes = [0] + list(range(2, r))
        p = f"{node.output[0]}__spa_bs{k}"
        x = node.input[0]
        scale = model.consts[node.input[1]].astype(np.float32).reshape(shape)
        bias = model.consts[node.input[2]].astype(np.float32).reshape(shape)
        g.initializer.extend([numpy_helper.from_array(scale, p + "_scale"),
                              numpy_helper.from_array(bias, p + "_bias"),
                              numpy_helper.from_array(np.float32(eps), p + "_eps")])

        def mean(i, o):
            if opset >= 18:
                g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64),
                                                             o + "_axes"))
                return helper.make_node("ReduceMean", [i, o + "_axes"], [o], keepdims=1)
            return helper.make_node("ReduceMean", [i], [o], axes=axes, keepdims=1)
        nodes += [mean(x, p + "_m"),
                  helper.make_node("Sub", [x, p + "_m"], [p + "_c"]),
                  helper.make_node("Mul", [p + "_c", p + "_c"], [p + "_c2"]),
                  mean(p + "_c2", p + "_v"),
                  helper.make_node("Add", [p + "_v", p + "_eps"], [p + "_ve"]),
                  helper.make_node("Sqrt", [p + "_ve"], [p + "_s"]),
                  helper.make_node("Div", [p + "_c", p + "_s"], [p + "_n"]),
                  helper.make_node("Mul", [p + "_n", p + "_scale"], [p + "_y"]),
                  helper.make_node("Add", [p + "_y", p + "_bias"], [node.output[0]])]
    if not changed:
        return None
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return proto


def entry_normalization(model, name: str):
    """The affine normalisation a model applies to graph input `name` before anything
    else, as (a, b, node names): the chain of Mul/Div/Add/Sub by constants (scalars or
    per-channel vectors on axis 1) that alone reads the input, folded into x·a + b with a
    and b broadcastable to the input. None when the input is not normalised that way (or
    `a` has a zero)."""
    rank = model.rank(name) or 0
    a, b, t, where = np.float64(1.0), np.float64(0.0), name, []
    while True:
        readers = [n for n in model.nodes if t in n.input]
        if len(readers) != 1 or readers[0].op_type not in ("Mul", "Div", "Add", "Sub") or \
                len(readers[0].input) != 2:
            break
        node = readers[0]
        other = node.input[1] if node.input[0] == t else node.input[0]
        c = model.consts.get(other)
        if c is None or c.dtype.kind != "f" or c.ndim > rank:
            break
        c = c.astype(np.float64).reshape((1,) * (rank - c.ndim) + c.shape)
        if any(s != 1 for k, s in enumerate(c.shape) if k != 1):
            break               # only scalars and per-channel constants
        first = node.input[0] == t
        if node.op_type == "Mul":
            a, b = a * c, b * c
        elif node.op_type == "Add":
            b = b + c
        elif node.op_type == "Sub":
            a, b = (a, b - c) if first else (-a, c - b)
        elif first and np.all(c != 0):      # Div: x / c
            a, b = a / c, b / c
        else:
            break
        where.append(model.node_name(node))
        t = node.output[0]
    if not where or np.any(np.asarray(a) == 0):
        return None
    return a, b, ", ".join(repr(w) for w in where)


def synthesize(model, *, n: int = 256, seed: int = 0, batch_stats: bool = True) -> Calibration:
    """Inputs made up from the model: Gaussian noise, spatially smoothed, with one mean and
    one scale per float input, fitted so that the model's first BatchNormalization sees
    the channel means and variances it stored during training (its running statistics).
    Three smoothing widths are tried and the one whose induced statistics are closest to
    the stored ones (Gaussian KL divergence) is kept. Integer inputs (token ids) are
    uniform over the range the model indexes. Without any BatchNormalization: smoothed
    standard-normal noise taken as the output of the model's input normalisation
    (`entry_normalization`: x·a + b by constants right at the input, e.g. a Keras
    Normalization or Rescaling layer) and mapped back through it; standard normal noise
    when there is no such normalisation either."""
    from .runtime import dummy_inputs
    rng = np.random.default_rng(seed)
    specs = _input_specs(model)
    base = dummy_inputs(model, seed=seed, batch=n)   # shapes, dtypes, token ranges
    floats = [k for k, (_, elem) in specs.items()
              if np.issubdtype(_NP.get(elem, np.int64), np.floating)]
    arrays = {k: v for k, v in base.items()}
    bn = _first_bn(model)
    notes = []
    if bn is None or not floats:
        source = "synthetic (standard normal)"
        for k in floats:
            z = rng.standard_normal(base[k].shape)
            prior = entry_normalization(model, k)
            if prior is None:
                arrays[k] = z.astype(base[k].dtype)
                continue
            # the model normalises this input as x·a + b: take that normalised tensor to
            # be smooth standard-normal noise, i.e. the input (z − b) / a
            a, b, where = prior
            z = _blur(z, 2.0)
            arrays[k] = ((z - b) / a).astype(base[k].dtype)
            source = "synthetic (normal noise through the input normalisation's inverse)"
            notes.append(f"input {k!r}: no BatchNormalization to match; smoothed standard "
                         f"normal noise (sigma 2 px) taken as the output of the model's "
                         f"input normalisation at {where}, mapped back through it")
        if source.endswith("(standard normal)"):
            notes.append("no BatchNormalization to match: standard normal inputs")
        return Calibration("synthetic", arrays, source=source, notes=notes)
    target = bn.input[0]
    rm = model.consts[bn.input[3]].astype(np.float64)
    rv = np.maximum(model.consts[bn.input[4]].astype(np.float64), 1e-8)
    probe_n = min(n, 32)
    sess = session_for(with_outputs(model.proto, [target], only=True))   # the prefix only

    def bn_input(feeds):
        y = sess.run([target], feeds)[0].astype(np.float64)
        axes = tuple(k for k in range(y.ndim) if k != 1)
        return y.mean(axis=axes), y.var(axis=axes)

    def feeds_for(m, s, noise):
        f = {k: v[:probe_n] for k, v in base.items()}
        for k in floats:
            f[k] = (m + s * noise[k][:probe_n]).astype(base[k].dtype)
        return f

    best = None
    for sigma in (0.0, 1.0, 2.0):
        noise = {k: _blur(rng.standard_normal(base[k].shape), sigma) for k in floats}
        # BN input statistics are affine in the input mean m (mean) and scale s (var):
        # measure the pieces, then fit m and s to the running statistics
        mu0, v1 = bn_input(feeds_for(0.0, 1.0, noise))
        mu1, _ = bn_input(feeds_for(1.0, 0.0, noise))
        b0, _ = bn_input(feeds_for(0.0, 0.0, noise))
        a = mu1 - b0
        m = float(np.dot(a, rm - b0) / max(np.dot(a, a), 1e-12))
        v_unit = np.maximum(v1, 1e-12)
        s = float(np.sqrt(max(np.exp(np.mean(np.log(rv) - np.log(v_unit))), 1e-12)))
        mu, var = bn_input(feeds_for(m, s, noise))
        var = np.maximum(var, 1e-12)
        kl = float(np.mean(0.5 * (var / rv + (mu - rm) ** 2 / rv - 1 + np.log(rv / var))))
        if best is None or kl < best[0]:
            best = (kl, sigma, m, s, noise)
    kl, sigma, m, s, noise = best
    for k in floats:
        arrays[k] = (m + s * noise[k]).astype(base[k].dtype)
    notes.append(f"Gaussian inputs, smoothing sigma {sigma:g} px, mean {m:.4g}, scale "
                 f"{s:.4g}, fitted to the running statistics of BatchNormalization "
                 f"{model.node_name(bn)!r} (KL {kl:.3g} per channel)")
    network = batch_statistics_model(model) if batch_stats else None
    if network is not None:
        notes.append("activations collected with every BatchNormalization normalising by "
                     "the synthetic batch's statistics (its outputs get the stored moments)")
    return Calibration("synthetic", arrays, source="synthetic (BatchNorm-matched noise)",
                       notes=notes, network=network)
