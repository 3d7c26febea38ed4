"""JAX / Flax: export a flax ``nnx.Module`` to ONNX with jax2onnx, and map an SPA plan back
onto the module's parameters.

Export (``export``) runs ``jax2onnx.to_onnx`` on an eval-mode clone of the module with these
settings (checked with jax 0.10.2 / flax 0.12.8 / jax2onnx 0.17.1, see docs/frameworks.md):

* opset 18 by default (jax2onnx's own default is 23): the lowest opset at which jax2onnx
  0.17.1 writes valid graphs for the whole zoo (below it, it still writes ReduceMean and
  Squeeze with axes inputs; such a graph is refused with that reason), what the torch
  converter uses, and every ONNX Runtime runs it (docs/frameworks.md has the per-opset
  results).
* a dynamic batch axis: axis 0 of every input is the symbol ``batch``.
* ``normalization_mode="auto"`` (jax2onnx's default): LayerNorm is written out as
  ReduceMean/Sub/Div…, which SPA couples like the native op (an approximate group).
* inputs named ``input`` (``input_ids`` for integer inputs; ``_1``, ``_2`` … for more), the
  outputs ``output`` (``output_1`` …), instead of jax2onnx's ``in_0`` / ``out_7``.
* jax2onnx lays convolutions out for ONNX: the flax kernel ``[kh, kw, in, out]`` becomes an
  ``[out, in, kh, kw]`` initializer, and NHWC activations are transposed to NCHW around the
  convs (Transposes between consecutive convs cancel). SPA's Transpose rule follows the
  channel axis through them.

The way back cannot work by names: jax2onnx names initializers ``const_12`` or
``kernel_oih_0``, and one parameter may reach the graph reshaped (an attention kernel
``[in, heads, head_dim]`` becomes ``[in, heads*head_dim]``) or transposed. Matching arrays
by value is ambiguous exactly where it matters (the zero biases and unit scales of an
untrained model are all equal). So the converter *probes* the exporter: it exports two
clones of the module in which every element of every float variable holds a distinct value
(a float32 bit pattern that encodes the element's index; the two probes use disjoint
ranges), and decodes every initializer element of the probes back to (variable, flat
index). An element counts as a copy of a parameter only if both probes agree, so a
constant of the exporter's (1.0, eps, a shape) can never be mistaken for one. This gives,
for every initializer, an index map into the parameters -- whatever transposes, reshapes
or copies the exporter applied. ``export`` uses it to name each initializer after its
parameter (``conv1.kernel``, ``bn1.mean``; a second initializer from the same parameter is
``conv1.kernel#1``) and records its settings in the file's metadata (``spa.jax.export``);
``apply_plan`` exports the module again with the same settings, checks that it gives the
file's graph, and carries the plan's kept indices through the index maps onto the
variables. Needing no equal values also means the plan can be applied to a freshly built
module (to load fine-tuned weights into afterwards).

Import cost: jax2onnx imports all its plugin packages on the first conversion, and its
equinox plugins compile example models at import (about 30 s on a busy 2-core CPU). During
its own conversions the converter lets jax2onnx see only the ``jax`` and ``flax`` plugin
trees (about 3 s to import), which is all a flax nnx module needs; if jax2onnx then finds
no plugin for a primitive, everything is imported and the conversion tried once more.
jax2onnx's bookkeeping is restored afterwards, so the caller's own ``jax2onnx.to_onnx``
calls still import every plugin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np

from spa.errors import SpaError, UsageError

DEFAULT_OPSET = 18
OPSETS = range(11, 24)
NORMALIZATION_MODES = ("auto", "prefer_native", "force_decomposed")
RECORD_KEY = "spa.jax.export"          # metadata_props key: the export settings (JSON)
RECORD_FORMAT = "spa-jax-export/1"
_BASE_BITS = 0x3F800000                # float32 1.0: probe A's first value
_MAX_BITS = 0x7F800000                 # +inf: probe B must stay below


class MapBackError(SpaError):
    """A plan cannot be carried over to the flax module (names which and why)."""


# --------------------------------------------------------------------------- jax2onnx


@contextlib.contextmanager
def _flax_plugins_only():
    """Inside: jax2onnx sees only its ``jax`` and ``flax`` plugin trees as imported (see the
    module docstring), so its first conversion does not import the equinox plugins. Yields
    a function that imports the rest (for a retry); afterwards jax2onnx's own bookkeeping is
    as it was, so a later ``jax2onnx.to_onnx`` of the caller's still imports everything it
    needs. If the plugin system does not look as expected, nothing is changed."""
    from jax2onnx.plugins import plugin_system as ps

    if getattr(ps, "_already_imported_plugins", True) is not False or \
            not hasattr(ps, "_import_tree") or not hasattr(ps, "import_all_plugins"):
        yield lambda: False
        return
    root = Path(ps.__file__).resolve().parent
    for sub in ("jax", "flax"):
        ps._import_tree(root / sub, f"jax2onnx.plugins.{sub}")
    state = {"all": False}

    def import_all() -> bool:
        ps._already_imported_plugins = False
        ps.import_all_plugins()
        state["all"] = True
        return True

    ps._already_imported_plugins = True
    try:
        yield import_all
    finally:
        if not state["all"]:
            ps._already_imported_plugins = False


# --------------------------------------------------------------------------- inputs


def input_specs(inputs, dynamic_batch: bool = True) -> list[tuple[tuple, str]]:
    """Normalise the ways to describe the inputs to ``[(shape, dtype name), ...]``.

    `inputs` is one shape (``(1, 28, 28, 1)``), a list of shapes or ``(shape, dtype)``
    pairs, or arrays / ``jax.ShapeDtypeStruct`` s (anything with ``.shape`` and
    ``.dtype``). With `dynamic_batch`, axis 0 becomes the symbol ``"batch"``.
    """
    if hasattr(inputs, "shape") and hasattr(inputs, "dtype"):
        inputs = [inputs]
    elif isinstance(inputs, (tuple, list)) and inputs and \
            all(isinstance(d, (int, np.integer)) for d in inputs):
        inputs = [inputs]
    out = []
    for spec in inputs:
        if hasattr(spec, "shape") and hasattr(spec, "dtype"):
            shape, dtype = tuple(spec.shape), np.dtype(spec.dtype).name
        elif (isinstance(spec, (tuple, list)) and len(spec) == 2
              and isinstance(spec[1], (str, np.dtype, type))):
            shape, dtype = tuple(spec[0]), np.dtype(spec[1]).name
        else:
            shape, dtype = tuple(spec), "float32"
        if not shape:
            raise UsageError("every input needs at least one axis (the batch axis)")
        if dynamic_batch:
            shape = ("batch", *shape[1:])
        out.append((shape, dtype))
    if not out:
        raise UsageError("no inputs given")
    return out


def _input_names(specs) -> list[str]:
    names = []
    for i, (_, dtype) in enumerate(specs):
        base = "input_ids" if np.issubdtype(np.dtype(dtype), np.integer) else "input"
        names.append(base if i == 0 else f"{base}_{i}")
    return names


def example_inputs(specs, batch: int = 2, seed: int = 0, int_high: int = 2) -> list:
    """Seeded random numpy inputs for `input_specs`'s result (symbolic axes get `batch`;
    integer inputs are drawn from [0, int_high))."""
    rng = np.random.default_rng(seed)
    xs = []
    for shape, dtype in specs:
        dims = tuple(batch if isinstance(d, str) else int(d) for d in shape)
        if np.issubdtype(np.dtype(dtype), np.integer):
            xs.append(rng.integers(0, int_high, dims).astype(dtype))
        else:
            xs.append(rng.standard_normal(dims).astype(dtype))
    return xs


# --------------------------------------------------------------------------- variables


def _variables(module) -> list[tuple[str, object]]:
    """(path, Variable) for every float array variable, each once (a shared variable under
    its first path), in flax's graph order."""
    import jax.numpy as jnp
    from flax import nnx

    out, seen = [], set()
    for path, node in nnx.graph.iter_graph(module):
        if not isinstance(node, nnx.Variable) or id(node) in seen:
            continue
        seen.add(id(node))
        try:
            value = node.get_value()
        except Exception:  # noqa: BLE001 - variables without an array value
            continue
        dtype = getattr(value, "dtype", None)
        if dtype is None or not hasattr(value, "shape"):
            continue
        try:
            floating = jnp.issubdtype(dtype, jnp.floating)
        except TypeError:
            floating = False
        if floating:
            out.append((".".join(str(p) for p in path), node))
    return out


def _modules(module) -> list[tuple[str, object]]:
    from flax import nnx

    return [(".".join(str(p) for p in path), node)
            for path, node in nnx.graph.iter_graph(module) if isinstance(node, nnx.Module)]


def _probe_values(variables, base_bits: int) -> None:
    """Give every element of every variable a distinct float32 value: bit pattern
    ``base_bits + global element index``."""
    import jax

    k = 0
    for _, var in variables:
        value = var.get_value()
        n = int(np.prod(value.shape))
        bits = np.arange(base_bits + k, base_bits + k + n, dtype=np.uint32)
        arr = bits.view(np.float32).reshape(value.shape)
        var.set_value(jax.device_put(arr.astype(np.dtype(value.dtype))))
        k += n


# --------------------------------------------------------------------------- graphs


def _tensors(proto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors of the main graph, by name."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == a.TENSOR:
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _skeleton(proto) -> list:
    """Everything about a graph except tensor values: node order, ops, wiring and
    attributes; initializer and input/output names, types and shapes."""
    def attr(a):
        if a.type == a.TENSOR:
            return (a.name, a.type, tuple(a.t.dims), a.t.data_type)
        if a.type == a.GRAPH:
            return (a.name, a.type, tuple(_skeleton_graph(a.g)))
        if a.type == a.GRAPHS:
            return (a.name, a.type, tuple(tuple(_skeleton_graph(g)) for g in a.graphs))
        return (a.name, a.SerializeToString(deterministic=True))

    def _skeleton_graph(g):
        items = [("node", n.op_type, n.domain, tuple(n.input), tuple(n.output),
                  tuple(attr(a) for a in n.attribute)) for n in g.node]
        items += [("init", t.name, tuple(t.dims), t.data_type) for t in g.initializer]
        items += [("in", v.SerializeToString(deterministic=True)) for v in g.input]
        items += [("out", v.SerializeToString(deterministic=True)) for v in g.output]
        return items

    return _skeleton_graph(proto.graph)


def _first_difference(a, b) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{_describe(y)} in the file, {_describe(x)} from the module"
    return (f"the file has {len(b)} graph entries (nodes, initializers, inputs, outputs), "
            f"the module's export {len(a)}")


def _describe(item) -> str:
    kind = item[0]
    if kind == "node":
        return f"node {item[1]} {list(item[3])} -> {list(item[4])}"
    if kind == "init":
        return f"initializer {item[1]!r} {list(item[2])}"
    return f"graph {'input' if kind == 'in' else 'output'}"


def _rename(graph, mapping: dict[str, str]) -> None:
    """Rename values in a graph (and its subgraphs) in place."""
    for t in graph.initializer:
        if t.name in mapping:
            t.name = mapping[t.name]
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.name in mapping:
            v.name = mapping[v.name]
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x in mapping:
                n.input[i] = mapping[x]
        for i, x in enumerate(n.output):
            if x in mapping:
                n.output[i] = mapping[x]
        for a in n.attribute:
            if a.type == a.GRAPH:
                _rename(a.g, mapping)
            elif a.type == a.GRAPHS:
                for g in a.graphs:
                    _rename(g, mapping)


def _all_value_names(graph) -> set[str]:
    names = {t.name for t in graph.initializer}
    names |= {v.name for v in (*graph.input, *graph.output)}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names


# --------------------------------------------------------------------------- conversion


class _Export:
    """One conversion of a module with given settings: the ONNX proto, and for every
    tensor the element-wise map into the module's float variables (-1: not a copy of a
    parameter element)."""

    def __init__(self, proto, variables, maps, probed: bool, note: str = ""):
        self.proto = proto
        self.variables = variables          # [(path, Variable)] of the module exported
        self.maps = maps                    # tensor name -> int64 array (variable, flat)
        self.probed = probed                # False: no element maps (see note)
        self.note = note


@contextlib.contextmanager
def _quiet_loggers():
    """jax2onnx and onnx_ir log a WARNING line per shape constant they cannot type; keep
    the caller's output clean (real failures raise)."""
    loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trace(module, settings: dict):
    """jax2onnx on an eval-mode clone of `module`; renames inputs/outputs as settings say."""
    import jax
    from flax import nnx

    from jax2onnx import to_onnx
    clone = nnx.clone(module)
    clone.eval()
    specs = [jax.ShapeDtypeStruct(tuple(s), d) for s, d in settings["inputs"]]
    kw = dict(opset=int(settings["opset"]), normalization_mode=settings["normalization"],
              model_name=settings.get("model_name", "jax_model"))
    if settings.get("names", True):
        kw["input_names"] = _input_names(settings["inputs"])
    # jax2onnx's flax plugins read `variable.value`, which flax 0.12 deprecates: one
    # DeprecationWarning per layer and conversion, not the caller's business
    with _quiet_loggers(), warnings.catch_warnings(), _flax_plugins_only() as import_all:
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            proto = to_onnx(clone, specs, **kw)
        except NotImplementedError as exc:   # "No plugins registered for primitive ..."
            if "plugin" not in str(exc) or not import_all():
                raise
            proto = to_onnx(clone, specs, **kw)
    # jax2onnx 0.17.1's layout pass moves convolutions to NCHW but leaves the NHWC shapes
    # in value_info; ONNX Runtime then rejects some graphs ("Incompatible dimensions" at a
    # residual Add). The annotations are optional: drop them.
    del proto.graph.value_info[:]
    if settings.get("names", True):
        outs = [o.name for o in proto.graph.output]
        wanted = ["output" if i == 0 else f"output_{i}" for i in range(len(outs))]
        taken = _all_value_names(proto.graph) - set(outs)
        mapping = {o: w for o, w in zip(outs, wanted) if o != w and w not in taken}
        _rename(proto.graph, mapping)
    return proto


def _convert(module, settings: dict, real: bool = True) -> _Export:
    """Export `module` and probe the exporter (module docstring): the graph plus, for every
    tensor, which parameter elements it copies. With ``settings["rename"]`` initializers
    are named after their parameters. With ``real=False`` only the probes are run and the
    returned proto is probe A's: the same graph as the real export, but its tensors hold
    probe values (what ``apply_plan`` needs: the structure and the maps)."""
    from flax import nnx

    proto = _trace(module, settings) if real else None
    variables = _variables(module)
    total = sum(int(np.prod(v.get_value().shape)) for _, v in variables)
    if 2 * total > _MAX_BITS - _BASE_BITS:
        return _Export(proto, variables, {}, False,
                       f"the module has {total} parameter elements, too many to probe")
    decoded = []
    for base in (_BASE_BITS, _BASE_BITS + total):
        probe = nnx.clone(module)
        _probe_values(_variables(probe), base)
        p = _trace(probe, settings)
        decoded.append((base, p, _tensors(p)))
    skeleton = _skeleton(decoded[0][1])
    if _skeleton(decoded[1][1]) != skeleton or (real and _skeleton(proto) != skeleton):
        return _Export(proto if real else decoded[0][1], variables, {}, False,
                       "jax2onnx gives different graphs for modules that differ only in "
                       "parameter values (it folds something value-dependent)")
    maps = {}
    (base_a, proto_a, tensors_a), (base_b, _, tensors_b) = decoded
    for name, a in tensors_a.items():
        if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
            continue
        ka = a.astype(np.float32).view(np.uint32).astype(np.int64) - base_a
        kb = tensors_b[name].astype(np.float32).view(np.uint32).astype(np.int64) - base_b
        ok = (ka >= 0) & (ka < total) & (ka == kb)
        if ok.any():
            maps[name] = np.where(ok, ka, -1)
    exp = _Export(proto if real else proto_a, variables, maps, True)
    if settings.get("rename", True):
        _rename_initializers(exp)
    return exp


def _rename_initializers(exp: _Export) -> None:
    """Name every initializer that holds only parameter elements, all from one variable,
    after that variable's path (``conv1.kernel``; further ones ``conv1.kernel#1``)."""
    offsets, paths = _offsets(exp.variables)
    inits = {t.name for t in exp.proto.graph.initializer}
    taken = _all_value_names(exp.proto.graph)
    mapping, count = {}, {}
    for t in exp.proto.graph.initializer:
        m = exp.maps.get(t.name)
        if m is None or (m < 0).any():
            continue
        owners = np.unique(np.searchsorted(offsets, m.ravel(), side="right") - 1)
        if len(owners) != 1:
            continue
        path = paths[int(owners[0])]
        n = count.get(path, 0)
        new = path if n == 0 else f"{path}#{n}"
        count[path] = n + 1
        if new in taken and new not in inits:
            continue
        mapping[t.name] = new
    if set(mapping.values()) & (inits - set(mapping)):
        return   # a name jax2onnx already uses: keep jax2onnx's names
    _rename(exp.proto.graph, mapping)
    exp.maps = {mapping.get(k, k): v for k, v in exp.maps.items()}


def _offsets(variables):
    sizes = [int(np.prod(v.get_value().shape)) for _, v in variables]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return offsets, [p for p, _ in variables]


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("jax", "flax", "jax2onnx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _settings(specs, opset: int, normalization: str) -> dict:
    return {"format": RECORD_FORMAT, "inputs": [[list(s), d] for s, d in specs],
            "opset": int(opset), "normalization": normalization, "names": True,
            "rename": True}


def to_onnx(module, inputs, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
            normalization: str = "auto", param_names: bool = True):
    """The ONNX ``ModelProto`` of the nnx module `module` (what ``export`` writes).

    `inputs`: the input shape(s), see ``input_specs`` (``(1, 28, 28, 1)``, or
    ``[((1, 16), "int32")]``, or example arrays); with `dynamic_batch` axis 0 is the symbol
    ``batch``. `normalization` is jax2onnx's ``normalization_mode``. The module is exported
    in eval mode (a clone; `module` itself is not touched). With `param_names` the
    exporter is probed (two more conversions) and initializers are named after the
    parameters they hold; either way the settings are recorded in the metadata
    (``spa.jax.export``), so that ``apply_plan`` can map a plan made on it back.
    """
    try:
        from flax import nnx
    except ImportError as exc:
        raise UsageError(f"converters.jax needs flax and jax2onnx ({exc})") from None
    if not isinstance(module, nnx.Module):
        raise UsageError(f"expected a flax nnx.Module, got {type(module).__name__}")
    if int(opset) not in OPSETS:
        raise UsageError(f"opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {opset}")
    if normalization not in NORMALIZATION_MODES:
        raise UsageError(f"normalization must be one of {NORMALIZATION_MODES}, "
                         f"got {normalization!r}")
    specs = input_specs(inputs, dynamic_batch)
    settings = _settings(specs, opset, normalization)
    settings["rename"] = bool(param_names)
    record = {**settings, "versions": _versions()}
    if param_names:
        exp = _convert(module, settings)
        proto = exp.proto
        if not exp.probed:
            record["rename"] = False
            record["note"] = exp.note
    else:
        proto = _trace(module, settings)
    _check_valid(proto, opset)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = RECORD_KEY, json.dumps(record, sort_keys=True)
    return proto


def _check_valid(proto, opset: int) -> None:
    """jax2onnx 0.17.1 writes some ops in their newest form whatever the opset (ReduceMean
    with an axes input below 18, Squeeze with an axes input below 13): refuse such a graph
    here, with the reason, rather than write a file nothing can load."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = (" -- jax2onnx writes some ops in their opset-18 form whatever the opset: "
                "export with opset 18 or higher" if opset < 18 else "")
        raise SpaError(f"jax2onnx wrote an invalid ONNX graph at opset {opset} "
                       f"({first}){hint}") from None


def export(module, inputs, path, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
           normalization: str = "auto", param_names: bool = True) -> Path:
    """Export the nnx module `module` to ONNX at `path` and return the path: ``to_onnx``
    (see there), written atomically (a temporary file renamed; nothing is left behind when
    the export fails)."""
    from spa.ir import save_atomic

    proto = to_onnx(module, inputs, opset=opset, dynamic_batch=dynamic_batch,
                    normalization=normalization, param_names=param_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(proto, str(path), external_data=False)
    return path


# --------------------------------------------------------------------------- CLI


def load_module(spec: str):
    """``pkg.module:factory`` → the nnx.Module the factory returns (called without
    arguments: give the factory default rngs)."""
    from converters.torch import load_factory

    factory = load_factory(spec)
    try:
        from flax import nnx
    except ImportError as exc:
        raise UsageError(f"spa convert jax needs flax ({exc})") from None
    try:
        module = factory()
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported
        raise UsageError(f"calling {spec!r}() failed ({type(exc).__name__}: {exc}); the "
                         "factory must build the module without arguments") from None
    if not isinstance(module, nnx.Module):
        raise UsageError(f"{spec!r} returned {type(module).__name__}, not a flax nnx.Module")
    return module


def parse_input_shape(text: str) -> list[tuple[tuple[int, ...], str]]:
    """``"1x28x28x1"`` → [((1, 28, 28, 1), "float32")]; several inputs comma-separated, a
    ``:dtype`` suffix for token ids (``1x16:int32``)."""
    from converters.torch import parse_input_shape as parse

    return parse(text)


def convert(factory: str, input_shape: str, output: str, *, opset: int = DEFAULT_OPSET,
            dynamic_batch: bool = True) -> Path:
    """What ``spa convert jax`` does."""
    if int(opset) not in OPSETS:
        raise UsageError(f"--opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {opset}")
    shapes = parse_input_shape(input_shape)
    module = load_module(factory)
    try:
        return export(module, shapes, output, opset=opset, dynamic_batch=dynamic_batch)
    except SpaError:
        raise
    except Exception as exc:  # noqa: BLE001 - jax2onnx and user code fail in many ways
        raise SpaError(f"jax2onnx cannot export {factory} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})",
                       file=output) from None


def cli_main(args) -> Path:
    """``spa convert jax`` (arguments parsed by spa.cli)."""
    return convert(args.factory, args.input_shape, args.output, opset=args.opset)


# --------------------------------------------------------------------------- map-back


def read_record(proto) -> dict | None:
    """The export settings ``export`` stored in the file, or None."""
    for p in proto.metadata_props:
        if p.key == RECORD_KEY:
            try:
                rec = json.loads(p.value)
            except ValueError:
                return None
            return rec if isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT \
                else None
    return None


def _guess_settings(proto) -> list[dict]:
    """Settings to try for a file that jax2onnx wrote without ``export`` (no record):
    its inputs and opset, jax2onnx's own names, both normalization modes."""
    import onnx

    inputs = []
    for v in proto.graph.input:
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value)
                for d in t.shape.dim]
        inputs.append([dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name])
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                 DEFAULT_OPSET)
    return [{"inputs": inputs, "opset": opset, "normalization": mode, "names": False,
             "rename": False} for mode in ("auto", "prefer_native")]


from converters._common import as_model as _as_model  # noqa: E402
from converters._common import as_plan as _as_plan  # noqa: E402


def _reexport(module, proto, source) -> tuple[_Export, dict]:
    """Export `module` again with the file's settings; the graph must be the file's."""
    rec = read_record(proto)
    candidates = [rec] if rec is not None else _guess_settings(proto)
    want = _skeleton(proto)
    tried = []
    for settings in candidates:
        try:
            exp = _convert(module, settings, real=False)
        except Exception as exc:  # noqa: BLE001 - report every failure below
            tried.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        got = _skeleton(exp.proto)
        if got == want:
            if not exp.probed:
                raise MapBackError(f"cannot relate the graph's initializers to the module's "
                                   f"parameters: {exp.note}", file=source)
            return exp, settings
        tried.append(_first_difference(got, want))
    how = ("its recorded settings" if rec is not None else
           "jax2onnx's defaults (the file has no converters.jax export record)")
    raise MapBackError("the module does not export to this file's graph with " + how
                       + ": " + "; ".join(tried) + ". Was the file exported from this "
                       "module (same architecture and widths) with converters.jax.export?",
                       file=source)


class _Var:
    """One variable of the module and the plan's cut of it."""

    def __init__(self, path, var):
        self.path, self.var = path, var
        self.old_shape = tuple(var.get_value().shape)
        self.uses: list[str] = []           # tensors that copy its elements
        self.keep: list[np.ndarray] | None = None   # kept indices per axis (None: uncut)


def apply_plan(module, onnx_model, plan, *, example_inputs=None, rtol: float = 1e-5,
               attributes: dict | None = None) -> dict:
    """Shrink the nnx `module` in place to match `plan`, a plan SPA made on `onnx_model`
    (the file ``export`` wrote for this module, a path or a ``spa.load``-ed Model; files
    written by plain ``jax2onnx.to_onnx`` with default settings work too). `plan` is a
    ``spa.Plan``, its JSON dict or a plan file.

    Every variable (``nnx.Param``, ``nnx.BatchStat`` …) is sliced along the axes the plan
    cuts in the initializers that hold its elements (found by probing the exporter, see the
    module docstring), and the width attributes of flax layers follow (``in_features``,
    ``out_features``, ``feature_group_count``, ``num_features``, ``num_heads`` …).
    Variables keep their identity (``set_value``): build the ``nnx.Optimizer`` afterwards.

    With `example_inputs` (an array or a tuple, as the module takes them) the shrunk module
    is run (eval mode, on a clone) and compared with SPA's pruned graph in ONNX Runtime:
    max |difference| <= `rtol` * max |output|. `attributes` sets module attributes by
    qualified name (``{"block.width": 8}``; None leaves one as it is).

    Returns ``{"tensors": {path: [old, new]}, "attributes": {"path.attr": [old, new]},
    "initializers": {tensor: [variable paths]}, "ignored_constants": [...], "unused": [...],
    "values_differ": [...]}``. Raises MapBackError naming the variable or module when
    the plan cannot be expressed on the module; the module is then left as it was.
    """
    from spa.analysis import analyze
    from spa.rewrite.apply import apply_plan as rewrite

    model = _as_model(onnx_model)
    plan = _as_plan(plan)
    source = model.path
    analysis = analyze(model)
    plan.validate(analysis, source=source)
    kept = plan.kept_indices(analysis)
    pruned = rewrite(model, analysis, plan)

    exp, _ = _reexport(module, model.proto, source)
    offsets, _ = _offsets(exp.variables)
    table = [_Var(p, v) for p, v in exp.variables]
    file_tensors = _tensors(model.proto)

    # which parameter values differ from the file's (a fresh module, or a trained one)
    values = np.concatenate([np.asarray(v.get_value(), np.float64).ravel()
                             for _, v in exp.variables] or [np.zeros(0)])
    differ = set()
    for name, m in exp.maps.items():
        sel = m >= 0
        same = np.asarray(file_tensors[name], np.float64)[sel] == values[m[sel]]
        if not same.all():
            owners = np.searchsorted(offsets, m[sel][~same], side="right") - 1
            differ.update(table[int(i)].path for i in np.unique(owners))

    # 1. every tensor's cut, carried onto the variables it copies
    problems: list[str] = []
    ignored: list[str] = []
    cuts: dict[int, list] = {}
    for name, arr in file_tensors.items():
        axes = {ax: kept[(name, ax)] for ax in range(arr.ndim) if (name, ax) in kept}
        m = exp.maps.get(name)
        if m is None:
            if axes:
                ignored.append(name)
            continue
        keep_mask = np.ones(arr.shape, bool)
        for ax, k in axes.items():
            line = np.zeros(arr.shape[ax], bool)
            line[k] = True
            keep_mask &= line.reshape([-1 if i == ax else 1 for i in range(arr.ndim)])
        sel = m >= 0
        if axes and (~sel & ~keep_mask).any() and _is_real(arr.dtype):
            ignored.append(name)   # the cut also removes exporter constants: SPA rewrites
        flat = m[sel]
        owner = np.searchsorted(offsets, flat, side="right") - 1
        for i in np.unique(owner):
            i = int(i)
            mine = owner == i
            table[i].uses.append(name)
            cuts.setdefault(i, []).append((name, flat[mine] - offsets[i],
                                           keep_mask[sel][mine]))
    for i, occ in cuts.items():
        err = _cut(table[i], occ)
        if err:
            problems.append(err)
    unused = sorted(e.path for e in table if not e.uses)
    computed = [n for n in ignored if n not in exp.maps
                and _is_real(file_tensors[n].dtype)]
    if computed and unused:
        problems.append(
            "the plan shrinks tensors that hold no parameter element: "
            + ", ".join(computed[:8]) + (f" (+{len(computed) - 8})" if len(computed) > 8
                                         else "")
            + "; and these variables are in no tensor of the graph: " + ", ".join(unused[:8])
            + (f" (+{len(unused) - 8})" if len(unused) > 8 else "")
            + (" -- variables in float16/bfloat16 cannot hold the probe's codes, so the "
               "converter cannot find them in the graph: keep the parameters in float32 "
               "(param_dtype) and compute in half precision if needed"
               if any(np.dtype(e.var.get_value().dtype).itemsize < 4 for e in table
                      if not e.uses) else
               " -- the exporter computed a tensor from them (e.g. `x @ (2 * w)` folded "
               "into one constant), so their cut is unknown; write the computation on the "
               "activations instead"))
    if problems:
        raise MapBackError("cannot map the plan back onto the module:\n  "
                           + "\n  ".join(problems), file=source)

    report = {"tensors": {}, "attributes": {}, "ignored_constants": sorted(set(ignored)),
              "unused": unused, "values_differ": sorted(differ),
              "initializers": {}}
    for e in table:
        for name in e.uses:
            report["initializers"].setdefault(name, []).append(e.path)
    undo: list = []
    try:
        _slice(table, report, undo)
        groups = _conv_groups(pruned, exp.maps, offsets, table)
        _Attrs(module, table, groups, source, report, undo, attributes).update()
        if example_inputs is not None:
            _check_outputs(module, pruned, example_inputs, rtol, source)
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    return report


def _cut(e: _Var, occurrences) -> str | None:
    """Kept indices per axis of one variable from the kept flags of its copied elements,
    or an error message. The kept elements must form a box (a slice on every axis)."""
    n = int(np.prod(e.old_shape)) if e.old_shape else 1
    kept_n = np.zeros(n, np.int64)
    drop_n = np.zeros(n, np.int64)
    for _, flat, keep in occurrences:
        kept_n += np.bincount(flat[keep], minlength=n)
        drop_n += np.bincount(flat[~keep], minlength=n)
    if not drop_n.any():
        return None
    names = ", ".join(dict.fromkeys(name for name, _, _ in occurrences))
    both = (kept_n > 0) & (drop_n > 0)
    if both.any():
        return (f"{e.path}: the plan keeps some copies of the same elements and removes "
                f"others (in {names}); the module has only one copy")
    seen = (kept_n + drop_n) > 0
    keep_el = kept_n > 0
    coords = np.unravel_index(np.arange(n), e.old_shape)
    keep = []
    for d, size in enumerate(e.old_shape):
        k = np.zeros(size, bool)
        k[coords[d][keep_el]] = True
        untouched = np.ones(size, bool)
        untouched[coords[d][seen]] = False   # indices the graph never copies: stay
        keep.append(np.nonzero(k | untouched)[0])
    inside = np.ones(n, bool)
    for d, k in enumerate(keep):
        inside &= np.isin(coords[d], k)
    if (inside[seen] != keep_el[seen]).any():
        return (f"{e.path}: the plan keeps a set of its elements that is no slice of the "
                f"variable (shape {list(e.old_shape)}, cut through {names}) -- e.g. "
                "different channels inside each attention head; the module cannot express it")
    if any(len(k) == 0 for k in keep):
        return f"{e.path}: the plan removes every index of an axis"
    e.keep = keep
    return None


def _slice(table, report, undo) -> None:
    import jax

    for e in table:
        if e.keep is None or all(len(k) == s for k, s in zip(e.keep, e.old_shape)):
            e.keep = None
            continue
        old = e.var.get_value()
        new = np.asarray(old)[np.ix_(*e.keep)] if e.old_shape else np.asarray(old)
        undo.append(lambda v=e.var, x=old: v.set_value(x))
        e.var.set_value(jax.device_put(new.astype(np.dtype(old.dtype))))
        report["tensors"][e.path] = [list(e.old_shape), list(new.shape)]


def _conv_groups(pruned, maps, offsets, table) -> dict[str, int]:
    """Variable path -> the ``group`` of the pruned Conv/ConvTranspose whose weight holds
    it."""
    out = {}
    for n in pruned.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose") or len(n.input) < 2:
            continue
        m = maps.get(n.input[1])
        if m is None:
            continue
        g = next((a.i for a in n.attribute if a.name == "group"), 1)
        sel = m[m >= 0]
        for i in np.unique(np.searchsorted(offsets, sel, side="right") - 1):
            out[table[int(i)].path] = int(g)
    return out


def _flat_outputs(y) -> list:
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(y)]


def run(module, *inputs):
    """The module's output on `inputs` in eval mode (on a clone; compiled once with
    ``nnx.jit`` -- op-by-op execution compiles every primitive separately)."""
    from flax import nnx

    clone = nnx.clone(module)
    clone.eval()
    return nnx.jit(lambda m, *xs: m(*xs))(clone, *inputs)


def _check_outputs(module, pruned, example_inputs, rtol, source) -> None:
    """Run the shrunk module (eval-mode clone) and SPA's pruned graph on the same inputs."""
    import onnxruntime as ort

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    xs = [np.asarray(x) for x in example_inputs]
    try:
        ys = _flat_outputs(run(module, *xs))
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported
        raise MapBackError(
            f"the shrunk module's forward fails ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Its code probably fixes a "
            "width that the plan changes", file=source) from exc
    sess = ort.InferenceSession(pruned.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), xs)}
    outs = sess.run(None, feeds)
    if len(outs) != len(ys):
        raise MapBackError(f"the module returns {len(ys)} arrays, the graph {len(outs)}",
                           file=source)
    for k, (a, b) in enumerate(zip(ys, outs)):
        if a.shape != b.shape:
            raise MapBackError(f"output {k}: shape {list(a.shape)} from the shrunk module, "
                               f"{list(b.shape)} from SPA's pruned graph", file=source)
        scale = float(np.nanmax(np.abs(b))) if b.size else 0.0
        err = float(np.nanmax(np.abs(a - b))) / max(scale, 1e-30) if b.size else 0.0
        if not err <= rtol:
            raise MapBackError(f"output {k}: the shrunk module differs from SPA's pruned graph "
                               f"by {err:.3g} (relative to max |output|; allowed {rtol:g})",
                               file=source)


# per-head sizes stay (SPA removes whole heads); head counts follow the heads
_PER_HEAD = re.compile(r"head_?(dim|size|width)|d_?head|dim_?head|(^|_)d_[kv]$|n_?rep$")


class _Attrs:
    """Bring the width attributes of flax layers in line with the new variable shapes."""

    def __init__(self, module, table, groups, source, report, undo, overrides):
        self.module, self.groups = module, groups
        self.source, self.report, self.undo = source, report, undo
        self.overrides = dict(overrides or {})
        self.used: set[str] = set()
        self.by_var = {id(e.var): e for e in table}

    @staticmethod
    def _key(mname, attr):
        return f"{mname}.{attr}" if mname else attr

    def _set(self, mname, m, attr, value):
        key = self._key(mname, attr)
        if key in self.overrides:
            self.used.add(key)
            value = self.overrides[key]
            if value is None:
                return
        old = getattr(m, attr)
        if old != value:
            self.undo.append(lambda: _setattr(m, attr, old))
            _setattr(m, attr, value)
            self.report["attributes"][key] = [_plain(old), _plain(value)]

    def _fail(self, mname, m, why):
        raise MapBackError(f"module {mname or '<root>'!r} ({type(m).__name__}): {why}",
                           file=self.source)

    def _entry(self, m, attr):
        v = getattr(m, attr, None)
        return self.by_var.get(id(v)) if v is not None else None

    def _shape(self, m, attr):
        v = getattr(m, attr, None)
        if v is None or id(v) not in self.by_var:
            return None
        return tuple(v.get_value().shape)

    def _changed(self, m, attrs=None):
        for a in attrs or ("kernel", "bias", "scale", "mean", "var", "embedding"):
            e = self._entry(m, a)
            if e is not None and e.keep is not None:
                return True
        return False

    def update(self):
        from flax import nnx

        for mname, m in _modules(self.module):
            if isinstance(m, nnx.MultiHeadAttention):
                self._mha(mname, m)
            elif isinstance(m, nnx.Conv):
                self._conv(mname, m)
            elif isinstance(m, nnx.ConvTranspose):
                k = self._shape(m, "kernel")
                if k is not None and self._changed(m):
                    self._set(mname, m, "in_features", k[-2])
                    self._set(mname, m, "out_features", k[-1])
                    self._set(mname, m, "kernel_shape", k)
                    if getattr(m, "mask", None) is not None:
                        self._fail(mname, m, "a masked ConvTranspose cannot be shrunk")
            elif isinstance(m, nnx.Linear):
                k = self._shape(m, "kernel")
                if k is not None:
                    self._set(mname, m, "in_features", k[0])
                    self._set(mname, m, "out_features", k[1])
            elif isinstance(m, nnx.LinearGeneral):
                k = self._shape(m, "kernel")
                if k is not None:
                    n_in = len(m.in_features)
                    self._set(mname, m, "in_features", tuple(k[:n_in]))
                    self._set(mname, m, "out_features", tuple(k[n_in:]))
            elif isinstance(m, nnx.Einsum):
                k = self._shape(m, "kernel")
                if k is not None:
                    self._set(mname, m, "kernel_shape", k)
                    b = self._shape(m, "bias")
                    if b is not None:
                        self._set(mname, m, "bias_shape", b)
            elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
                s = self._shape(m, "scale") or self._shape(m, "bias") or \
                    self._shape(m, "mean")
                if s is not None and hasattr(m, "num_features"):
                    self._set(mname, m, "num_features", s[-1])
            elif isinstance(m, nnx.GroupNorm):
                if self._changed(m):
                    self._fail(mname, m, "GroupNorm is not supported by the map-back")
            elif isinstance(m, nnx.Embed):
                w = self._shape(m, "embedding")
                if w is not None:
                    self._set(mname, m, "num_embeddings", w[0])
                    self._set(mname, m, "features", w[1])
            elif type(m).__module__.startswith("flax."):
                if isinstance(m, nnx.RNNCellBase) and self._changed(m, ["kernel", "bias"]):
                    self._fail(mname, m, "recurrent cells are not supported by the map-back")
                continue
            else:
                self._custom(mname, m)
        self._apply_remaining_overrides()

    def _conv(self, mname, m):
        k = self._shape(m, "kernel")
        if k is None or not self._changed(m):
            return
        e = self._entry(m, "kernel")
        groups = self.groups.get(e.path)
        if groups is None:
            self._fail(mname, m, "its kernel feeds no Conv node of the ONNX graph, so the "
                       "new number of groups is unknown")
        if getattr(m, "mask", None) is not None:
            self._fail(mname, m, "a masked Conv cannot be shrunk (its mask keeps the old "
                       "kernel shape)")
        self._set(mname, m, "in_features", k[-2] * groups)
        self._set(mname, m, "out_features", k[-1])
        self._set(mname, m, "feature_group_count", groups)
        self._set(mname, m, "kernel_shape", k)

    def _mha(self, mname, m):
        q = self._shape(m.query, "kernel")      # [in, heads, head_dim]
        k = self._shape(m.key, "kernel")
        v = self._shape(m.value, "kernel")
        o = self._shape(m.out, "kernel")        # [heads, head_dim, out]
        if None in (q, k, v, o):
            return
        if not (q[0] == k[0] == v[0]):
            self._fail(mname, m, f"query/key/value lost different input features "
                       f"({q[0]}, {k[0]}, {v[0]}): the module has one in_features")
        if not (q[2] == k[2] == v[2] == o[1]):
            self._fail(mname, m, f"query/key/value/out have different head sizes "
                       f"({q[2]}, {k[2]}, {v[2]}, {o[1]}): the module has one head_dim")
        if v[1] != k[1] or o[0] != q[1]:
            self._fail(mname, m, "value/out heads do not match key/query heads")
        self._set(mname, m, "in_features", q[0])
        self._set(mname, m, "num_heads", q[1])
        if hasattr(m, "num_kv_heads"):
            self._set(mname, m, "num_kv_heads", k[1])
        self._set(mname, m, "head_dim", q[2])
        self._set(mname, m, "qkv_features", q[1] * q[2])
        self._set(mname, m, "out_features", o[2])

    def _custom(self, mname, m):
        """Integer attributes of hand-written modules that equal the old length of a
        variable axis directly below them take its new length (all must agree)."""
        ints = {k: v for k, v in vars(m).items() if type(v) is int and not k.startswith("_")}
        axes = []
        for v in vars(m).values():
            e = self.by_var.get(id(v))
            if e is not None and e.keep is not None:
                axes += [(a, len(k)) for a, k in zip(e.old_shape, e.keep)]
        for attr, v in ints.items():
            key = self._key(mname, attr)
            if key in self.overrides:
                self._set(mname, m, attr, v)
                continue
            if v <= 1 or _PER_HEAD.search(attr):
                continue
            cands = {b for a, b in axes if a == v}
            if len(cands) > 1:
                self._fail(mname, m, f"cannot infer the new value of the integer attribute "
                           f"{attr!r} (was {v}): axes of length {v} now have lengths "
                           f"{sorted(cands)}; pass attributes={{{key!r}: <value or None>}}")
            if cands:
                self._set(mname, m, attr, cands.pop())

    def _apply_remaining_overrides(self):
        mods = dict(_modules(self.module))
        for key, value in self.overrides.items():
            if key in self.used:
                continue
            mname, _, attr = key.rpartition(".")
            m = mods.get(mname)
            if m is None or not hasattr(m, attr):
                raise MapBackError(f"attributes: the module has no attribute {key!r}",
                                   file=self.source)
            if value is not None:
                self._set(mname, m, attr, value)


def _is_real(dtype) -> bool:
    """Floating point, bfloat16 included (numpy does not count it as np.floating)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16", "float8_e4m3fn",
                                                                "float8_e5m2")


def _setattr(m, attr, value) -> None:
    try:
        setattr(m, attr, value)
    except Exception:  # noqa: BLE001 - nnx may guard attribute assignment
        object.__setattr__(m, attr, value)


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    return v
