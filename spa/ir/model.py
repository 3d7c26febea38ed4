"""The in-memory model: the ONNX protobuf plus what every later stage needs.

We keep the protobuf itself as the IR (the pruned model must be the *same graph* with
narrower tensors, so editing the proto in place is the most faithful representation) and
add indices over it: producers, consumers, constants (initializers *and* Constant nodes),
and inferred shapes. value_info written by exporters is never trusted (jax2onnx writes
wrong shapes): shapes are re-inferred, and where static inference leaves a dimension
unknown, one ONNX Runtime run on dummy inputs fills it in.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, TensorProto

from ..errors import SpaError
from . import external
from .external import ExternalTensor, Pending

MIN_OPSET, MAX_OPSET = 11, 23
#: refuse tensors that declare more elements than this before allocating anything
MAX_TENSOR_ELEMENTS = 1 << 34
Dim = int | str | None  # static length, symbolic name, or unknown
#: models whose serialised size exceeds this are written with external data
#: (environment SPA_EXTERNAL_DATA_THRESHOLD, bytes; protobuf itself stops at 2 GB)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: with external data, tensors of at least this many bytes go to the data file
EXTERNAL_TENSOR_MIN_BYTES = 1024


def is_float(dtype) -> bool:
    """Floating point, including the ml_dtypes types numpy does not know (bfloat16, float8)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or (
        dtype.kind == "V" and "float" in dtype.name)


class Consts(MutableMapping):
    """Constants by name. Weights kept in external data files are held by reference
    (ExternalTensor, Pending) and mapped or computed each time they are read, so that
    nothing keeps a multi-GB model in memory; `shape` and `dtype_of` never read data."""

    def __init__(self):
        self._d: dict = {}

    def __getitem__(self, name: str) -> np.ndarray:
        v = self._d[name]
        return v.array() if isinstance(v, (ExternalTensor, Pending)) else v

    def __setitem__(self, name: str, value) -> None:
        self._d[name] = value

    def __delitem__(self, name: str) -> None:
        del self._d[name]

    def __contains__(self, name) -> bool:
        return name in self._d

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def ref(self, name: str):
        """The ExternalTensor / Pending behind a constant, or None when it is in memory."""
        v = self._d.get(name)
        return v if isinstance(v, (ExternalTensor, Pending)) else None

    def shape(self, name: str) -> tuple:
        return tuple(int(d) for d in self._d[name].shape)

    def dtype_of(self, name: str) -> np.dtype:
        return self._d[name].dtype


@dataclass
class Model:
    proto: onnx.ModelProto
    path: str | None = None
    consts: Consts = field(default_factory=Consts)
    const_node: dict[str, onnx.NodeProto] = field(default_factory=dict)  # Constant-node consts
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # topological order
    outer_refs: dict = field(default_factory=dict)  # id(node) -> names its subgraphs read
    #: where a graph output's declared shape contradicts what the graph computes (the
    #: computed shape is used; see infer_shapes), one sentence each, for the CLI to print
    shape_notes: list = field(default_factory=list)
    #: --input-shape: the graph input shapes the costs are taken at, and every tensor's
    #: shape then (spa.ir.input_shapes.apply); None: the symbolic shapes, dynamic dims as 1
    input_shapes: dict | None = None
    cost_shapes: dict | None = None

    # -- queries -----------------------------------------------------------------------
    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def opset(self) -> int:
        for imp in self.proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 0

    @property
    def input_names(self) -> list[str]:
        inits = {t.name for t in self.graph.initializer}
        return [v.name for v in self.graph.input if v.name not in inits]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.output]

    def node_name(self, node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"

    def error(self, reason: str, node: onnx.NodeProto | None = None) -> SpaError:
        return SpaError(reason, file=self.path,
                        node=self.node_name(node) if node is not None else None,
                        op=node.op_type if node is not None else None)

    def is_const(self, name: str) -> bool:
        return name in self.consts

    @property
    def streaming(self) -> bool:
        """Some weights stay in their external data files (see spa.ir.external)."""
        return any(self.consts.ref(k) is not None for k in self.consts)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def static_shape(self, name: str) -> tuple | None:
        s = self.shapes.get(name)
        if s is None or any(not isinstance(d, int) for d in s):
            return None
        return s

    # -- construction ------------------------------------------------------------------
    def index(self) -> None:
        """(Re)build consts, producers, consumers and topological order; validate structure."""
        g = self.graph
        self.consts, self.const_node, self.producer, self.consumers = Consts(), {}, {}, {}
        for t in g.initializer:
            _check_tensor_size(self, t)
            if t.name in self.consts:
                raise self.error(f"initializer {t.name!r} is defined twice")
            ref = external.ref_of(t)
            self.consts[t.name] = ref if ref is not None else _to_array(self, t)
            self.dtypes[t.name] = t.data_type
        known = set(self.consts) | {v.name for v in g.input} | {""}
        self.outer_refs = {}
        for node in g.node:
            refs = _outer_refs(node)
            if refs:
                self.outer_refs[id(node)] = refs
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(self, node)
                if value is not None:
                    self.consts[node.output[0]] = value
                    self.const_node[node.output[0]] = node
            for out in node.output:
                if not out:
                    continue
                if out in self.producer or out in self.consts and out not in self.const_node \
                        or out in {v.name for v in g.input}:
                    raise self.error(f"tensor {out!r} is produced more than once", node)
                self.producer[out] = node
        # topological order (graphs are supposed to be sorted, but tolerate unsorted ones)
        ready = set(known)
        pending = list(g.node)
        order: list[onnx.NodeProto] = []
        while pending:
            rest = []
            for node in pending:
                if all(i in ready for i in node.input) and \
                        all(i in ready for i in self.outer_refs.get(id(node), ())):
                    order.append(node)
                    ready.update(o for o in node.output if o)
                else:
                    rest.append(node)
            if len(rest) == len(pending):
                node = rest[0]
                missing = [i for i in list(node.input) + sorted(self.outer_refs.get(id(node),
                                                                                   ()))
                           if i not in ready]
                dangling = [i for i in missing if i not in self.producer]
                if dangling:
                    raise self.error(f"input {dangling[0]!r} is not produced by any node, "
                                     "initializer or graph input", node)
                raise self.error("the graph has a cycle through this node", node)
            pending = rest
        self.nodes = order
        for node in order:
            for i in list(node.input) + sorted(self.outer_refs.get(id(node), ())):
                if i:
                    self.consumers.setdefault(i, []).append(node)
        for out in self.output_names:
            if out not in ready:
                raise SpaError(f"graph output {out!r} is not produced by any node", file=self.path)

    def infer_shapes(self) -> None:
        for k, v in _infer_dtypes(self).items():
            self.dtypes.setdefault(k, v)
        self.shape_notes = []
        self.shapes = infer_shapes(self, notes=self.shape_notes)


def _outer_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    refs: set[str] = set()

    def walk(graph, bound: set[str]):
        bound = bound | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        for n in graph.node:
            for i in n.input:
                if i and i not in bound:
                    refs.add(i)
            for a in n.attribute:
                for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                           list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                    walk(sg, bound)
            bound |= set(n.output)
        for o in graph.output:
            if o.name not in bound:
                refs.add(o.name)
    for a in node.attribute:
        for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                   list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            walk(sg, set())
    return refs


# ------------------------------------------------------------------------------------------
# loading


def load(path: str, *, infer: bool = True, stream: bool | None = None) -> Model:
    """Load and validate an ONNX file (initializers, Constant nodes, external data).
    External data is memory-mapped, not loaded (`stream`, default: environment SPA_STREAM,
    else on; False loads every weight into memory): see spa.ir.external."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SpaError("no such file", file=path)
    external.protect(path)
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise SpaError("the file is empty (0 bytes), not an ONNX model", file=path)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-ish errors
        raise SpaError(f"not a valid ONNX protobuf ({type(exc).__name__}: {exc})", file=path)
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise SpaError("the protobuf parsed but holds no ONNX graph (is this an ONNX model?)",
                       file=path)
    model = from_proto(proto, path=path, base_dir=os.path.dirname(os.path.abspath(path)),
                       infer=infer, stream=stream)
    return model


def from_proto(proto: onnx.ModelProto, *, path: str | None = None, base_dir: str | None = None,
               infer: bool = True, stream: bool | None = None) -> Model:
    model = Model(proto=proto, path=path)
    _check_opset(model)
    _load_external(model, base_dir, _streaming(stream))
    model.index()
    _check_schema(model)
    if infer:
        model.infer_shapes()
    return model


def _check_schema(model: Model) -> None:
    """The ONNX structural checker (op schemas, input counts, attribute types), run on the
    skeleton so that big weights are not serialised."""
    try:
        structural_check(_skeleton(model))
    except Exception as exc:  # ValidationError, or undecodable strings (UnicodeDecodeError)
        msg = str(exc).strip().replace("\n", " ")
        raise model.error(f"invalid ONNX model ({type(exc).__name__}): {msg[:600]}")


def structural_check(proto: onnx.ModelProto) -> None:
    """onnx.checker without shape inference. An output declared without a shape is fine
    for ONNX Runtime but not for the checker: such outputs are left out of the check."""
    keep = [v for v in proto.graph.output
            if not v.type.HasField("tensor_type") or v.type.tensor_type.HasField("shape")]
    if len(keep) != len(proto.graph.output):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        del p.graph.output[:]
        p.graph.output.extend(keep)
        proto = p
    onnx.checker.check_model(proto)


def _check_opset(model: Model) -> None:
    v = model.opset
    if not v:
        raise model.error("the model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= v <= MAX_OPSET:
        raise model.error(f"opset {v} is not supported (supported: {MIN_OPSET}-{MAX_OPSET}); "
                          "convert it with onnx.version_converter first")


def _external_tensors(model: Model):
    def walk(graph):
        for t in graph.initializer:
            yield t
        for n in graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        yield from walk(sg)
    for t in walk(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            yield t


def _streaming(stream: bool | None) -> bool:
    if stream is None:
        return os.environ.get("SPA_STREAM", "1").strip().lower() not in ("0", "no", "false",
                                                                        "off")
    return bool(stream)


def _load_external(model: Model, base_dir: str | None, stream: bool = False) -> None:
    # tensors SPA already holds by reference (a model it loaded, a pruned model) were
    # checked when their files were loaded
    tensors = [t for t in _external_tensors(model) if external.ref_of(t) is None]
    if not tensors:
        return
    if base_dir is None:
        raise model.error("the model has external data but no directory to load it from")
    root = os.path.realpath(base_dir)
    files = {}
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or ".." in loc.replace("\\", "/").split("/"):
            raise model.error(f"external data location {loc!r} of tensor {t.name!r} escapes the "
                              "model's directory; refusing to read it")
        full = os.path.realpath(os.path.join(root, loc))
        if os.path.commonpath([full, root]) != root:
            raise model.error(f"external data file {loc!r} of tensor {t.name!r} resolves outside "
                              "the model's directory (symlink?); refusing to read it")
        if not os.path.isfile(full):
            raise model.error(f"external data file {loc!r} for tensor {t.name!r} is missing")
        _check_tensor_size(model, t)
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        need = _tensor_nbytes(t)
        if length is not None and int(length) < need:
            raise model.error(f"external data of tensor {t.name!r} declares {length} bytes but "
                              f"its shape needs {need}")
        if os.path.getsize(full) < offset + need:
            raise model.error(f"external data file {loc!r} is truncated: tensor {t.name!r} needs "
                              f"bytes {offset}..{offset + need}, the file has "
                              f"{os.path.getsize(full)}")
        files[id(t)] = full
    if not stream:
        onnx.external_data_helper.load_external_data_for_model(model.proto, root)
        return
    # initializers stay in their files (absolute, checked path in memory); anything else
    # (Constant-node and subgraph tensors, packed 4-bit or string types) is small: load it
    mapped = {id(t) for t in model.graph.initializer
              if t.data_type in external.MAPPABLE and sys.byteorder == "little"}
    for t in tensors:
        full = files[id(t)]
        external.register_source(full)
        if id(t) in mapped:
            for e in t.external_data:
                if e.key == "location":
                    e.value = full
        else:
            onnx.external_data_helper.load_external_data_for_tensor(t, root)
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]


_ITEMSIZE = {TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2,
             TensorProto.BFLOAT16: 2, TensorProto.INT64: 8, TensorProto.INT32: 4,
             TensorProto.INT16: 2, TensorProto.INT8: 1, TensorProto.UINT8: 1,
             TensorProto.BOOL: 1, TensorProto.UINT16: 2, TensorProto.UINT32: 4,
             TensorProto.UINT64: 8}


_PACKED = {TensorProto.INT4, TensorProto.UINT4} | (
    {TensorProto.FLOAT4E2M1} if hasattr(TensorProto, "FLOAT4E2M1") else set())


def _tensor_nbytes(t: TensorProto) -> int:
    n = math.prod(t.dims)
    if t.data_type in _PACKED:  # two 4-bit values per byte
        return (n + 1) // 2
    return n * _ITEMSIZE.get(t.data_type, 1)


def _check_tensor_size(model: Model, t: TensorProto) -> None:
    n = 1
    for d in t.dims:
        if d < 0:
            raise model.error(f"tensor {t.name!r} declares a negative dimension {list(t.dims)}")
        n *= d
        if n > MAX_TENSOR_ELEMENTS:
            raise model.error(f"tensor {t.name!r} declares an absurd size {list(t.dims)}; "
                              "refusing to allocate it")
    # (a raw_data length that disagrees with the dims is caught when the tensor is decoded)


def _to_array(model: Model, t: TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:
        raise model.error(f"cannot decode tensor {t.name!r} (shape {list(t.dims)}): {exc}")


def _constant_value(model: Model, node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            _check_tensor_size(model, a.t)
            return _to_array(model, a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


# ------------------------------------------------------------------------------------------
# shapes


def _dims_of(tp: onnx.TypeProto) -> tuple | None:
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tp.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return tuple(dims)


def _small(t: TensorProto) -> bool:
    """A tensor the skeleton keeps: scalars and shape-sized integer tensors."""
    size = math.prod(t.dims)
    return size <= 64 or (t.data_type in (TensorProto.INT64, TensorProto.INT32)
                          and size <= 4096)


def _big_constant(node: onnx.NodeProto, outputs: set) -> bool:
    """A Constant node holding a weight (a `value` tensor the skeleton would not keep)."""
    return (node.op_type == "Constant" and node.domain in ("", "ai.onnx")
            and not node.input and len(node.output) == 1 and node.output[0] not in outputs
            and len(node.attribute) == 1 and node.attribute[0].name == "value"
            and node.attribute[0].type == onnx.AttributeProto.TENSOR
            and not _small(node.attribute[0].t))


def _skeleton(model: Model, declared_outputs: bool = True) -> onnx.ModelProto:
    """The model without its big weights: big initializers and Constant nodes that hold
    weights become typed graph inputs, so that the checker and shape inference do not
    serialise hundreds of MB (several copies each) while small integer constants (shape
    operands) stay visible to data propagation. (Constant-node values were decoded, and so
    checked, when the model was indexed.) `declared_outputs=False` leaves the graph
    outputs' declared shapes out (their element types stay), so that inference says what
    the graph computes rather than merging it with (or failing on) what it claims."""
    g = model.graph
    sk = onnx.ModelProto()
    sk.ir_version = model.proto.ir_version
    sk.opset_import.extend(model.proto.opset_import)
    sk.functions.extend(model.proto.functions)
    sg = sk.graph
    sg.name = g.name
    outputs = {v.name for v in g.output}
    big = [n for n in g.node if _big_constant(n, outputs)]
    if big:
        skip = {id(n) for n in big}
        sg.node.extend(n for n in g.node if id(n) not in skip)
    else:
        sg.node.extend(g.node)
    init_names = {t.name for t in g.initializer}
    sg.input.extend(v for v in g.input if v.name not in init_names)
    for n in big:
        t = n.attribute[0].t
        sg.input.append(onnx.helper.make_tensor_value_info(n.output[0], t.data_type,
                                                           list(t.dims)))
    for t in g.initializer:
        if _small(t):
            sg.initializer.append(external.materialize(t))
        else:
            sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    sg.output.extend(g.output)
    if not declared_outputs:
        for v in sg.output:
            if v.type.HasField("tensor_type"):
                v.type.tensor_type.ClearField("shape")
    return sk


def infer_shapes(model: Model, notes: list | None = None) -> dict[str, tuple]:
    """Every tensor's shape. Graph inputs keep their declared shapes (they are the
    interface); a graph output's declared shape is only a claim: what inference (or, where
    it cannot tell, ONNX Runtime) computes wins, and each contradiction is appended to
    `notes`. A declared output shape only fills axes the computation leaves symbolic, when
    the ranks agree and no static length conflicts."""
    shapes: dict[str, tuple] = {}
    for name in model.consts:
        shapes[name] = model.consts.shape(name) if isinstance(model.consts, Consts) else \
            tuple(int(d) for d in model.consts[name].shape)
    skeleton = _skeleton(model, declared_outputs=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        _raise_if_inconsistent(model, str(exc))
        inferred = None
    except Exception:
        inferred = None
    try:
        if inferred is None:  # best effort; the ORT fallback below fills the gaps
            inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False,
                                                         data_prop=True)
        vis = list(inferred.graph.value_info) + list(inferred.graph.input) + \
            list(inferred.graph.output)
    except Exception:
        vis = list(model.graph.input) + list(model.graph.output)
    # graph inputs keep their declared shapes (they define the interface); declared output
    # shapes are checked against the computed ones below
    declared = {v.name: _dims_of(v.type) for v in model.graph.input}
    for v in vis:
        d = _dims_of(v.type)
        if d is not None and v.name not in model.consts:
            shapes[v.name] = d
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            model.dtypes.setdefault(v.name, v.type.tensor_type.elem_type)
    for k, d in declared.items():
        if d is not None and k not in model.consts:
            prev = shapes.get(k)
            if prev is None or len(prev) != len(d):
                shapes[k] = d
            else:  # prefer the concrete one of (declared, inferred) per axis
                shapes[k] = tuple(a if isinstance(a, int) else b for a, b in zip(d, prev))
    # unknown dims, and symbols that inference made up past the first axis (they may hide
    # a static length, e.g. an Expand whose target is computed): ask ONNX Runtime
    unknown = [o for n in model.nodes for o in n.output
               if o and o not in model.consts and
               (shapes.get(o) is None or any(
                   x is None or (k > 0 and isinstance(x, str) and x.startswith("unk__"))
                   for k, x in enumerate(shapes[o])))]
    measured = _runtime_shapes(model, unknown, shapes) if unknown else {}
    shapes.update(measured)
    for v in model.graph.output:
        if v.name not in model.consts and v.name not in declared:
            _reconcile_output(v.name, _dims_of(v.type), shapes, v.name in measured, notes)
    return shapes


def _made_up(d) -> bool:
    """An unknown length, or a symbol inference or the runtime fallback invented."""
    return d is None or isinstance(d, str) and d.startswith(("unk__", "spa_dyn_"))


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("?" if _made_up(d) else repr(d) for d in dims) + "]"


def _reconcile_output(name: str, claimed: tuple | None, shapes: dict, measured: bool,
                      notes: list | None) -> None:
    """A graph output's declared shape against the computed one (`measured`: by ONNX
    Runtime, whose symbolic axes are proven dynamic): the computed shape wins."""
    if claimed is None:
        return
    computed = shapes.get(name)
    if computed is None:
        why = (f"graph output {name!r} is declared {_fmt_dims(claimed)} but neither shape "
               "inference nor ONNX Runtime can compute its shape; the declared shape is not "
               "used and the nodes computing it are not pruned")
    elif len(computed) != len(claimed) or any(
            isinstance(a, int) and (isinstance(b, int) and a != b or
                                    measured and not isinstance(b, int))
            for a, b in zip(claimed, computed)):
        why = (f"graph output {name!r} is declared {_fmt_dims(claimed)} but computes "
               f"{_fmt_dims(computed)}; the computed shape is used")
    else:  # agree: the declared one may fix (or name) an axis the computation left symbolic
        shapes[name] = tuple(a if isinstance(a, int) or isinstance(a, str) and _made_up(b)
                             else b for a, b in zip(claimed, computed))
        return
    if notes is not None and why not in notes:
        notes.append(why)


_INCONSISTENT = re.compile(r"\(op_type:(\w+), node name: ([^)]*)\): \[ShapeInferenceError\] "
                           r"((?:Incompatible|[^\n(]*mismatch)[^\n(]*)")


def _raise_if_inconsistent(model: Model, message: str) -> None:
    """Strict inference found a contradiction in the model's own shapes: refuse it."""
    m = _INCONSISTENT.search(message)
    if m:
        op, node, reason = m.groups()
        raise SpaError(f"inconsistent shapes: {reason.strip()}", file=model.path, node=node,
                       op=op)


def _runtime_shapes(model: Model, names: list[str], shapes: dict) -> dict[str, tuple]:
    """Fill unknown shapes by running the model twice on dummy inputs whose symbolic
    dimensions differ (2 and 3): an axis whose length is equal in both runs is static."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    from ..runtime import dummy_inputs, session_for
    m = onnx.ModelProto()
    m.CopyFrom(model.proto)
    del m.graph.value_info[:]
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    runs = []
    try:
        sess = session_for(m, optimize=not model.streaming)  # (no folded copies of weights)
        out_names = [o.name for o in sess.get_outputs()]
        for sym in (2, 4):
            feeds = dummy_inputs(model, sym_value=sym, seed=0)
            runs.append(dict(zip(out_names, sess.run(out_names, feeds))))
    except Exception:
        return {}
    result = {}
    for n in names:
        if n not in runs[0] or n not in runs[1]:
            continue
        a, b = np.shape(runs[0][n]), np.shape(runs[1][n])
        if len(a) != len(b):
            continue
        prev = shapes.get(n)
        dims = []
        for k, (x, y) in enumerate(zip(a, b)):
            if x == y:
                dims.append(int(x))
            else:
                p = prev[k] if prev is not None and len(prev) == len(a) else None
                dims.append(p if isinstance(p, str) else f"spa_dyn_{n}_{k}")
        result[n] = tuple(dims)
    return result


def _infer_dtypes(model: Model) -> dict[str, int]:
    out = {}
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if v.type.HasField("tensor_type"):
            out[v.name] = v.type.tensor_type.elem_type
    return out


# ------------------------------------------------------------------------------------------
# saving


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file through a temporary file in the same directory and a rename."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".spa-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def external_data_threshold() -> int:
    """Serialised size above which a model is written with external data (bytes)."""
    v = os.environ.get("SPA_EXTERNAL_DATA_THRESHOLD")
    if v is None or not v.strip():
        return EXTERNAL_DATA_THRESHOLD
    try:
        return int(float(v))
    except ValueError:
        raise SpaError(f"SPA_EXTERNAL_DATA_THRESHOLD must be a number of bytes, got {v!r}")


def save_atomic(proto: onnx.ModelProto, path: str, *, external_data: bool | None = None,
                threshold: int | None = None) -> None:
    """Write next to the target and rename: no partial file survives a failure. A model
    whose weights SPA holds in external files (spa.ir.external), or whose serialised size
    exceeds `threshold` (default external_data_threshold(): 1.8 GB), is written with
    external data: the tensors of 1 KiB or more (except shape-sized integer tensors) go to
    one file beside the model, `<name>.data`, streamed tensor by tensor. Never writes over
    an input file."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        raise SpaError("the output directory does not exist", file=path)
    data_name = os.path.basename(path) + ".data"
    for p in (path, os.path.join(d, data_name)):
        if external.is_protected(p):
            raise SpaError("this is an input file (a model SPA loaded or its external data); "
                           "SPA never writes over its input", file=p)
    refs = external.has_refs(proto)
    if external_data is None:
        limit = external_data_threshold() if threshold is None else threshold
        try:
            size = proto.ByteSize()
        except Exception:  # (some protobuf builds refuse to size a message over 2 GB)
            size = limit + 1
        external_data = refs or size > limit
    data = None
    if not external_data:
        if refs:  # asked for one file: bring the referenced weights into it
            proto = _materialized(proto)
        try:
            data = proto.SerializeToString(deterministic=True)
        except ValueError:  # over protobuf's 2 GB limit
            external_data = True
    if external_data:
        _save_external(proto, path, data_name)
        return
    with atomic_output(path, ".onnx.tmp") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_output(path: str, suffix: str = ".tmp"):
    """A binary file to write `path` through: a temporary file in the same directory,
    given the mode a plain open() would, renamed over `path` when the block ends without
    an exception (removed when it raises)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".spa-", suffix=suffix, dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        _usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _usual_mode(path: str) -> None:
    """Temporary files are created 0600; the output gets what a plain open() would give."""
    try:
        with open("/proc/self/status") as f:  # (reading the umask without changing it)
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _materialized(proto: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for k, t in enumerate(m.graph.initializer):
        if external.ref_of(t) is not None:
            m.graph.initializer[k].CopyFrom(external.materialize(t))
    return m


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data")


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and attribute tensors, subgraphs included, in file order."""
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                yield from a.tensors
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_tensors(g)


def _inline(t: TensorProto) -> bool:
    """Tensors that stay in the model file: under 1 KiB, and integer tensors of up to 4096
    elements (shape operands: ONNX Runtime's shape inference does not read external data)."""
    return _tensor_nbytes(t) < EXTERNAL_TENSOR_MIN_BYTES or (
        t.data_type in (TensorProto.INT64, TensorProto.INT32) and math.prod(t.dims) <= 4096)


def _save_external(proto: onnx.ModelProto, path: str, data_name: str) -> None:
    """The model file and its data file, both through temporary files: tensors are written
    one at a time (referenced weights are copied or sliced chunk by chunk, never loaded
    whole), then the data file and the model are renamed into place."""
    d = os.path.dirname(path)
    m = onnx.ModelProto()
    m.CopyFrom(proto)  # weights held by reference cost nothing to copy
    fd_model = fd_data = None
    tmp = tmp_data = ""
    try:
        fd_model, tmp = tempfile.mkstemp(prefix=".spa-", suffix=".onnx.tmp", dir=d)
        fd_data, tmp_data = tempfile.mkstemp(prefix=".spa-", suffix=".data.tmp", dir=d)
        w = external.DataWriter(fd_data)
        for t in _all_tensors(m.graph):
            ref = external.ref_of(t)
            if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED) or _inline(t):
                if ref is not None:
                    t.CopyFrom(external.materialize(t))
                continue
            if ref is None:
                if t.data_location == TensorProto.EXTERNAL:
                    raise SpaError(f"tensor {t.name!r} refers to external data SPA did not "
                                   "load; nothing was written", file=path)
                raw = t.raw_data if t.HasField("raw_data") else \
                    numpy_helper.from_array(numpy_helper.to_array(t), t.name).raw_data
                offset = w.align(len(raw))
                w.write_bytes(raw)
                length = len(raw)
            else:
                offset = w.align(ref.nbytes)
                w.write_tensor(ref)
                length = ref.nbytes
            for f in _DATA_FIELDS:
                t.ClearField(f)
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value=data_name)
            t.external_data.add(key="offset", value=str(offset))
            t.external_data.add(key="length", value=str(length))
        os.close(fd_data)
        fd_data = None
        try:
            data = m.SerializeToString(deterministic=True)
        except ValueError:
            raise SpaError("the model is over protobuf's 2 GB limit even with its weights in "
                           "external data (the graph itself is too large); nothing was written",
                           file=path)
        with os.fdopen(fd_model, "wb") as f:
            fd_model = None
            f.write(data)
        # an older output at `path` goes first: a crash between the two renames then leaves
        # no model rather than an old model next to new data
        _usual_mode(tmp)
        _usual_mode(tmp_data)
        if os.path.lexists(path):
            os.unlink(path)
        os.replace(tmp_data, os.path.join(d, data_name))
        os.replace(tmp, path)
    except BaseException:
        for fd in (fd_model, fd_data):
            if fd is not None:
                os.close(fd)
        for p in (tmp, tmp_data):
            if p and os.path.exists(p):
                os.unlink(p)
        raise
