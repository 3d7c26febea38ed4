"""Keras 3 / TensorFlow: export a model to ONNX with tf2onnx.

``export(model, path)`` takes a Keras model object, a saved ``.keras`` file or a TensorFlow
SavedModel directory (``model.export(dir)``) and writes an ONNX
file whose batch axis is dynamic (``batch``) and whose opset is 18 unless asked otherwise.
``cli_main`` is what ``spa convert keras MODEL -o OUT.onnx [--opset N]`` runs.

What tf2onnx does to a Keras model, and the settings chosen here (checked with
tensorflow 2.21, keras 3.15, tf2onnx 1.17; docs/frameworks.md has the details):

* **Freezing and grappler.** tf2onnx traces the model into a ``tf.function``, freezes the
  variables into constants and runs TensorFlow's grappler (``constfold``, ``function``,
  ``dependency``) before converting. Keras' inference BatchNorm is a multiply and an add;
  constant folding *folds the multiply into a preceding bias-free convolution* (the usual
  ``Conv2D(use_bias=False)`` → BN idiom: the kernel becomes W·γ/σ, named
  ``.../merged_input``) and the shift becomes that conv's bias. After a conv with a bias the
  BN stays as a per-channel ``Mul`` and ``Add``. Additions of all-zero biases are removed.
  This cannot be switched off through tf2onnx's API and we do not patch it: the result is
  the deployment graph, which is what one would ship and what SPA prunes equally well (a
  folded BN is exact for the oracle). BN parameters therefore do not appear in the file.
* **Layout.** Keras is channels-last (NHWC); ONNX's Conv is NCHW. tf2onnx wraps every conv in
  Transposes and its ``optimize_transpose`` pass pushes them through element-wise ops,
  pooling, Add … and cancels pairs, so a CNN keeps one Transpose after the input and one
  before its Flatten or global pooling. A Flatten stays in NHWC order: the Dense after it
  reads features in (h, w, c) order, so channel c owns every C-th row -- SPA's Reshape rule
  couples exactly those. ``inputs_as_nchw=True`` makes the ONNX input NCHW instead (the
  first Transpose then cancels) -- convenient for data stored NCHW (models/train_keras.py
  uses it so that ``spa eval fashion-mnist`` and the shared calibration file fit).
* **Other optimizer passes.** tf2onnx's default list is kept -- constant folding (kernels
  transposed HWIO→OIHW become plain initializers), identity removal, back-to-back (Conv +
  BatchNormalization fusion when a fused BN op survives), reshape, global-pool and Einsum
  simplification -- *except merge_duplication*, which merges constants with equal bytes
  into one. For SPA that is harmful when two *parameters* happen to be equal (an untrained
  model's zero biases or unit scales): they become one initializer and SPA would couple the
  channels of the unrelated layers that read it. It also picks the surviving name by
  chance, which made the output differ from run to run. Without it the graphs of the zoo
  have the same nodes; only small shape constants stay duplicated.
* **Determinism.** tf2onnx numbers the names it makes with a process-wide counter and its
  Einsum lowering (``keras.layers.MultiHeadAttention``) names and orders nodes by Python
  object ids: the counter is restarted for every export, and the graph is put into a
  canonical order with canonical names (``_canonical_graph``). The same model gives the
  same bytes, in one process and across processes.
* **Names.** tf2onnx names an initializer after the TF tensor it came from
  (``functional_1/fc_1/Cast/ReadVariableOp:0``). After conversion we rename each
  initializer that holds *exactly* one Keras variable's values -- as stored, or in ONNX's
  layout (conv kernels HWIO→OIHW, depthwise kernels to C·M×1×H×W) -- to the variable's path
  (``fc/kernel``). Initializers that hold folded values (a conv kernel with its BN folded
  in), or equal several variables, keep tf2onnx's name. ``rename=False`` keeps all of
  tf2onnx's names.
* **Opset.** 18 by default: tf2onnx 1.17 supports up to 18, SPA 11 to 23. For 19–23 the
  model is exported at 18 and converted with ``onnx.version_converter``.

Mapping a plan back onto the Keras model is not implemented (docs/frameworks.md says what to
do instead).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from pathlib import Path

import numpy as np

from spa.errors import SpaError, UsageError

DEFAULT_OPSET = 18
TF2ONNX_MAX_OPSET = 18
MIN_OPSET, MAX_OPSET = 11, 23


def _quiet_tf() -> None:
    """Keep TensorFlow's C++ start-up chatter off the terminal (only effective before the
    first import of tensorflow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _quiet_loggers():
    """tf2onnx logs progress and, for ops it cannot convert, ERROR lines; _check_converted
    reports those ops in the exception instead."""
    loggers = [logging.getLogger(n) for n in ("tf2onnx", "tensorflow", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --------------------------------------------------------------------------- loading


def load_model(source):
    """A Keras model object (returned as is), a ``.keras`` file (loaded with
    ``keras.saving.load_model``, no compilation) or a SavedModel directory (returned as the
    loaded ``tf.saved_model`` object). Errors name the file."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if not path.exists():
        raise UsageError("no such file or directory (expected MODEL.keras or a SavedModel "
                         "directory)", file=str(path))
    _quiet_tf()
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UsageError("a directory, but not a SavedModel (no saved_model.pb in it)",
                             file=str(path))
        import tensorflow as tf
        try:
            with _quiet_loggers():
                return tf.saved_model.load(str(path))
        except Exception as exc:  # noqa: BLE001 - TF raises many types for bad files
            raise SpaError(f"cannot load the SavedModel ({type(exc).__name__}: "
                           f"{_first_line(exc)})", file=str(path)) from None
    if path.suffix != ".keras":
        raise UsageError(f"unknown model file type {path.suffix!r}: expected a .keras file "
                         "(model.save) or a SavedModel directory (model.export)", file=str(path))
    import keras
    try:
        with _quiet_loggers():
            return keras.saving.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001
        raise SpaError(f"cannot load the Keras model ({type(exc).__name__}: "
                       f"{_first_line(exc)})", file=str(path)) from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


# --------------------------------------------------------------------------- export


def _input_specs(model, dynamic_batch: bool):
    """TensorSpecs of a Keras model's inputs (batch axis None), named after the inputs."""
    import tensorflow as tf

    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise UsageError(f"the Keras model {getattr(model, 'name', type(model).__name__)!r} "
                         "has no defined inputs (not a Keras model, or a subclassed "
                         "model that was never called?): build it on an input, or pass "
                         "input_signature=[tf.TensorSpec(...)]")
    specs = []
    for t in inputs:
        shape = list(t.shape)
        if dynamic_batch and shape:
            shape[0] = None
        name = getattr(t, "name", None) or f"input_{len(specs)}"
        specs.append(tf.TensorSpec(shape, tf.as_dtype(t.dtype), name=name.split(":")[0]))
    return specs


def _saved_model_function(obj):
    """The serving function of a loaded SavedModel and its input signature."""
    sigs = getattr(obj, "signatures", None) or {}
    if "serving_default" in sigs:
        fn = sigs["serving_default"]
    elif sigs:
        fn = sigs[sorted(sigs)[0]]
    else:
        raise SpaError("the SavedModel has no serving signature (save it with "
                       "model.export(dir) or tf.saved_model.save(..., signatures=...))")
    return fn


def _erfc_as_one_minus_erf(ctx, node, name, args):
    """tf2onnx handler for TF's ``Erfc``, which tf2onnx 1.17 does not convert and which
    Keras' exact GELU (``activation="gelu"``: 0.5·x·erfc(−x/√2)) emits: the node becomes
    ONNX ``Erf`` (the handler's ``onnx_op``) followed by ``Sub(1, ·)``."""
    from tf2onnx import utils

    dtype = ctx.get_dtype(node.output[0])
    one = ctx.make_const(utils.make_name(f"{name}_one"),
                         np.array(1, dtype=utils.map_onnx_to_numpy_type(dtype)))
    sub = ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(f"{name}_sub"),
                                        inputs=[one.output[0], node.output[0]])
    ctx.set_dtype(sub.output[0], dtype)
    ctx.copy_shape(node.output[0], sub.output[0])


# TF ops that tf2onnx does not convert but we do: {tf op: (handler, [onnx op])}.
CUSTOM_OP_HANDLERS = {"Erfc": (_erfc_as_one_minus_erf, ["Erf"])}

# tf2onnx's optimizer passes that we leave out (see the module docstring).
SKIPPED_OPTIMIZERS = ("merge_duplication",)


@contextlib.contextmanager
def _optimizers():
    """tf2onnx's default optimizer list without SKIPPED_OPTIMIZERS. ``from_keras`` takes the
    list as an argument, ``from_function`` (SavedModels) does not: the module-level default
    is swapped for the duration of the call."""
    import tf2onnx.optimizer as opt

    default = opt._optimizers   # noqa: SLF001 - tf2onnx 1.17's only handle on the list
    chosen = type(default)((k, v) for k, v in default.items() if k not in SKIPPED_OPTIMIZERS)
    opt._optimizers = chosen
    try:
        yield chosen
    finally:
        opt._optimizers = default


def _convert(model, opset: int, inputs_as_nchw: bool, dynamic_batch: bool, input_signature):
    import tensorflow as tf
    import tf2onnx
    import tf2onnx.utils

    # tf2onnx numbers the names it makes with a process-wide counter: restart it, so that
    # the same model gives the same names on every call (see also _canonical_graph).
    tf2onnx.utils.INTERNAL_NAME = 1
    nchw = None
    with _quiet_loggers(), contextlib.redirect_stdout(io.StringIO()), _optimizers() as opts:
        if isinstance(model, tf.types.experimental.ConcreteFunction) or (
                not hasattr(model, "inputs") and hasattr(model, "signatures")):
            fn = model if hasattr(model, "structured_input_signature") else \
                _saved_model_function(model)
            _, kwargs = fn.structured_input_signature
            names = sorted(kwargs)
            specs = []
            for n in names:
                s = kwargs[n]
                shape = list(s.shape)
                if dynamic_batch and shape:
                    shape[0] = None
                specs.append(tf.TensorSpec(shape, s.dtype, name=n))
            if inputs_as_nchw:
                nchw = [s.name + ":0" for s in specs]

            @tf.function(input_signature=specs)
            def serve(*xs):
                out = fn(**dict(zip(names, xs)))
                if isinstance(out, dict):
                    return {k: out[k] for k in sorted(out)}
                return out

            proto, _ = tf2onnx.convert.from_function(
                serve, input_signature=specs, opset=opset, inputs_as_nchw=nchw,
                custom_op_handlers=dict(CUSTOM_OP_HANDLERS))
            return proto, None
        specs = list(input_signature) if input_signature else _input_specs(model, dynamic_batch)
        if inputs_as_nchw:
            nchw = [s.name + ":0" for s in specs]
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=specs, opset=opset,
                                              inputs_as_nchw=nchw, optimizers=opts,
                                              custom_op_handlers=dict(CUSTOM_OP_HANDLERS))
        return proto, model


def export(model, path, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
           inputs_as_nchw: bool = False, rename: bool = True, input_signature=None) -> Path:
    """Export a Keras model (object, ``.keras`` file or SavedModel directory) to ONNX at
    `path`; return the path.

    The batch axis of every input and output is named ``batch`` (symbolic) with
    `dynamic_batch`. `inputs_as_nchw` makes a 4-D channels-last (NHWC) input NCHW
    in the ONNX graph. `rename` names initializers after the Keras variables whose values
    they hold (see the module docstring). `input_signature` (a list of ``tf.TensorSpec``)
    is needed only for a model without defined inputs. The file is written atomically;
    on any failure nothing is written.
    """
    from spa.ir import save_atomic

    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"opset {opset!r} is not supported: SPA handles opsets "
                         f"{MIN_OPSET}..{MAX_OPSET}")
    path = Path(path)
    if path.is_dir():
        raise UsageError("the output path is a directory", file=str(path))
    if not path.parent.is_dir():
        raise UsageError("the output directory does not exist", file=str(path))
    source = model
    if isinstance(source, (str, os.PathLike)) and path.exists() and Path(source).exists() \
            and os.path.samefile(path, source):
        raise UsageError("the output path is the input model; it is never overwritten",
                         file=str(path))
    model = load_model(model)
    label = str(source) if isinstance(source, (str, os.PathLike)) else \
        f"keras model {getattr(model, 'name', type(model).__name__)!r}"
    try:
        proto, keras_model = _convert(model, min(opset, TF2ONNX_MAX_OPSET), inputs_as_nchw,
                                      dynamic_batch, input_signature)
    except SpaError as exc:
        if exc.file is None:
            raise type(exc)(exc.reason, file=label) from None
        raise
    except Exception as exc:  # noqa: BLE001 - tf2onnx / TF raise anything
        raise SpaError(f"tf2onnx could not convert the model ({type(exc).__name__}: "
                       f"{_first_line(exc)})", file=label) from None
    _check_converted(proto, label)
    renamed = {}
    if rename and keras_model is not None:
        renamed = rename_initializers(proto, keras_model)
    _canonical_graph(proto, set(renamed.values()) | {v.name for v in proto.graph.input}
                     | {v.name for v in proto.graph.output})
    if dynamic_batch:
        _name_batch_axis(proto)
    if opset > TF2ONNX_MAX_OPSET:
        import onnx.version_converter

        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as exc:  # noqa: BLE001
            raise SpaError(f"tf2onnx writes opset {TF2ONNX_MAX_OPSET} at most and onnx's "
                           f"version converter could not take it to {opset} "
                           f"({type(exc).__name__}: {_first_line(exc)}); use --opset "
                           f"{TF2ONNX_MAX_OPSET}", file=label) from None
    save_atomic(proto, str(path))
    return path


def _check_converted(proto, label: str) -> None:
    """tf2onnx converts with ``continue_on_error``: a TF op it cannot map stays in the graph
    under its TF name, and the file would not load. Refuse, naming the ops."""
    import onnx

    bad = {}
    for node in proto.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            bad.setdefault(node.op_type, node.name)
        elif node.domain not in ("", "ai.onnx", "ai.onnx.ml"):
            bad.setdefault(f"{node.domain}.{node.op_type}", node.name)
    if bad:
        listed = ", ".join(f"{op} (e.g. node {name!r})" for op, name in sorted(bad.items()))
        raise SpaError(f"tf2onnx could not convert these TensorFlow ops to ONNX: {listed}; "
                       "replace the layers that produce them", file=label)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise SpaError(f"tf2onnx wrote an invalid ONNX model ({_first_line(exc)})",
                       file=label) from None


_OBJECT_ID = re.compile(r"\d{12,}")      # Python object ids in Einsum-lowering names
_COUNTER = re.compile(r"__\d+")          # tf2onnx's make_name counter


def _strip(name: str) -> str:
    return _COUNTER.sub("", _OBJECT_ID.sub("", name))


def _canonical_graph(proto, keep: set[str]) -> None:
    """Make tf2onnx's output byte-identical from run to run.

    tf2onnx numbers the names it makes with a process-wide counter, and its Einsum lowering
    (used for MultiHeadAttention) orders and names nodes by Python object ids. So: emit the
    nodes in a topological order whose ties are broken by structure (op type, attributes,
    the canonical names of the inputs, the name without counters), then rename every node
    and tensor to its name without counters / ids, numbered in that order when it repeats.
    Names in `keep` (graph inputs and outputs, Keras variable paths) stay. Graphs with
    subgraphs (If/Loop bodies name outer tensors) are left as they are."""
    import hashlib
    import heapq

    from onnx import numpy_helper

    g = proto.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in g.node for a in n.attribute):
        return
    inits = {t.name: t for t in g.initializer}
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    tensor_key: dict[str, tuple] = {}
    for name, t in inits.items():
        content = f"{t.data_type}{list(t.dims)}".encode() + numpy_helper.to_array(t).tobytes()
        tensor_key[name] = ("init", _strip(name), hashlib.sha256(content).hexdigest())
    for v in g.input:
        tensor_key.setdefault(v.name, ("input", v.name))
    tensor_key[""] = ("none",)

    def node_key(i):
        n = g.node[i]
        return (n.op_type, n.domain, tuple(tensor_key.get(t, ("?", t)) for t in n.input),
                tuple(a.SerializeToString(deterministic=True) for a in n.attribute),
                _strip(n.name), len(n.output))

    waiting = {i: sum(1 for t in set(n.input) if t in producer) for i, n in enumerate(g.node)}
    consumers: dict[int, list[int]] = {}
    for i, n in enumerate(g.node):
        for t in set(n.input):
            if t in producer:
                consumers.setdefault(producer[t], []).append(i)
    ready = [(node_key(i), i) for i, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for k, t in enumerate(g.node[i].output):
            tensor_key[t] = ("out", len(order), k)
        for c in consumers.get(i, []):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, (node_key(c), c))
    if len(order) != len(g.node):       # not a DAG: leave it to the checker's message
        return

    def namer(reserved):
        used, counts, table = set(reserved), {}, {}

        def fresh(old):
            if old in reserved or old in table:
                return table.get(old, old)
            base = _strip(old) or "t"
            k, cand = counts.get(base, 0), base
            while cand in used:
                k += 1
                cand = f"{base}__{k}"
            counts[base] = k
            used.add(cand)
            table[old] = cand
            return cand
        return fresh

    tensor_name = namer(keep | {""})
    node_name = namer(set())
    nodes = [g.node[i] for i in order]
    first_use: dict[str, int] = {}
    for pos, n in enumerate(nodes):
        n.name = node_name(n.name)
        for t in n.input:
            first_use.setdefault(t, pos)
        n.input[:] = [tensor_name(t) for t in n.input]
        n.output[:] = [tensor_name(t) for t in n.output]
    ordered_inits = sorted(g.initializer, key=lambda t: (first_use.get(t.name, len(nodes)),
                                                         tensor_key[t.name]))
    renamed = []
    for t in ordered_inits:
        c = type(t)()
        c.CopyFrom(t)
        c.name = tensor_name(t.name)
        renamed.append(c)
    for v in [*g.value_info, *g.output]:
        v.name = tensor_name(v.name)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(renamed)
    vi = sorted(g.value_info, key=lambda v: v.name)
    del g.value_info[:]
    g.value_info.extend(vi)
    symbols: dict[str, str] = {}
    for v in [*g.input, *g.output, *g.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param.startswith("unk__"):
                d.dim_param = symbols.setdefault(d.dim_param, f"unk__{len(symbols)}")


def _name_batch_axis(proto) -> None:
    """tf2onnx names unknown dims ``unk__12``; call axis 0 of the inputs and outputs
    ``batch`` (everywhere the same symbol appears), as the torch exports do."""
    g = proto.graph
    symbols = set()
    for v in [*g.input, *g.output]:
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            symbols.add(dims[0].dim_param)
    for v in [*g.input, *g.output, *g.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in symbols:
                d.dim_param = "batch"


def _onnx_layouts(value: np.ndarray) -> list[np.ndarray]:
    """The element orders in which tf2onnx may store a Keras variable: as is (also covers
    any reshape of it: EinsumDense kernels become 2-D, LayerNorm scales 1×1×C), a conv
    kernel (K…, I, O) as (O, I, K…), a depthwise kernel (K…, C, M) as (C·M, 1, K…)."""
    out = [value]
    if value.ndim >= 3:
        k = value.ndim - 2
        out.append(np.transpose(value, (k + 1, k, *range(k))))
        c, m = value.shape[-2], value.shape[-1]
        dw = value.reshape(*value.shape[:k], c * m)
        out.append(np.transpose(dw, (k, *range(k))))
    return out


def rename_initializers(proto, keras_model) -> dict[str, str]:
    """Rename each initializer that holds exactly one Keras variable's values (same dtype
    and elements in one of the orders of ``_onnx_layouts``) to the variable's path; return
    {old name: new name}. Initializers that match several variables (equal values), whose
    variable has fewer than 2 elements (too easy to match by chance), or whose new name is
    taken keep their names."""
    from onnx import numpy_helper

    candidates: dict[tuple, list[str]] = {}
    for var in keras_model.weights:
        vpath = getattr(var, "path", None) or var.name
        value = np.asarray(var.numpy())
        if value.size < 2:
            continue
        for arr in _onnx_layouts(value):
            key = (str(arr.dtype), np.ascontiguousarray(arr).tobytes())
            paths = candidates.setdefault(key, [])
            if vpath not in paths:
                paths.append(vpath)
    g = proto.graph
    taken = {t.name for t in g.initializer} | {v.name for v in [*g.input, *g.output]}
    taken |= {o for n in g.node for o in n.output}
    renames: dict[str, str] = {}
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        paths = candidates.get((str(arr.dtype), np.ascontiguousarray(arr).tobytes()))
        if not paths or len(paths) != 1 or paths[0] in taken:
            continue
        renames[init.name] = paths[0]
        taken.add(paths[0])
    if not renames:
        return renames
    for init in g.initializer:
        init.name = renames.get(init.name, init.name)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for v in g.value_info:
        v.name = renames.get(v.name, v.name)
    return renames


def _numpy(t) -> np.ndarray:
    """A TF tensor as numpy (``.numpy()``: np.asarray on an EagerTensor warns under numpy 2)."""
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def check_outputs(model, onnx_path, batch: int = 2, seed: int = 0,
                  inputs_as_nchw: bool = False) -> float:
    """Max |Keras − ONNX Runtime| / max |Keras output| on a seeded random batch (for
    float inputs), over all outputs. `model`: a Keras model object or ``.keras`` file."""
    import onnxruntime as ort

    model = load_model(model)
    rng = np.random.default_rng(seed)
    xs = []
    for t in model.inputs:
        shape = [batch, *[int(d) for d in t.shape[1:]]]
        xs.append(rng.standard_normal(shape).astype(np.float32))
    ref = model(xs if len(xs) > 1 else xs[0], training=False)
    refs = [_numpy(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for i, x in zip(sess.get_inputs(), xs):
        feeds[i.name] = np.ascontiguousarray(np.moveaxis(x, -1, 1)) if inputs_as_nchw else x
    outs = sess.run(None, feeds)
    err = 0.0
    for r, o in zip(refs, outs):
        err = max(err, float(np.max(np.abs(r - o)) / max(float(np.max(np.abs(r))), 1e-30)))
    return err


def cli_main(args) -> Path:
    """``spa convert keras MODEL -o OUT.onnx [--opset N]`` (arguments parsed by spa.cli)."""
    return export(args.model, args.output, opset=args.opset)
