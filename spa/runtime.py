"""ONNX Runtime helpers shared by shape inference, the oracle and benchmarks."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from .errors import SpaError

_NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
       TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64, TensorProto.INT32: np.int32,
       TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.BOOL: np.bool_}


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an (ONNX Runtime) error message, for a SpaError; the type's name
    when it says nothing."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def session_for(proto: onnx.ModelProto, providers: list[str] | None = None, threads: int = 0,
                optimize: bool = True):
    """An InferenceSession on an in-memory model. Weights SPA holds in external data files
    (spa.ir.external) are handed to ONNX Runtime to use in place. `optimize=False` runs the
    graph as written (no fusions: e.g. QDQ pairs are not turned into QLinear kernels)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures surface as exceptions, not log spam
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto, keep = add_external_initializers(proto, opts)
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=providers or ["CPUExecutionProvider"])
    sess._spa_external = keep  # ONNX Runtime reads these buffers: keep them alive
    return sess


def add_external_initializers(proto: onnx.ModelProto, opts) -> tuple:
    """Give ONNX Runtime the weights SPA holds by reference (spa.ir.external), to use in
    place (no prepacking copies either): returns the model to serialise and what must
    outlive the session."""
    from .ir.external import ort_initializers
    proto, folder, names, values = ort_initializers(proto)
    if names:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      folder)
        opts.add_session_config_entry("session.disable_prepacking", "1")
        for name, (v, _) in zip(names, values):
            opts.add_initializer(name, v)
    return proto, values


def index_bound(model, name: str) -> int | None:
    """Largest safe value for an integer input: the smallest table it indexes (Gather)."""
    bound = None
    frontier, seen = [name], set()
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        for node in model.consumers.get(t, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == t:
                shape = model.shapes.get(node.input[0])
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                if shape and isinstance(shape[axis], int):
                    bound = shape[axis] if bound is None else min(bound, shape[axis])
            elif node.op_type in ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze",
                                  "Flatten"):
                frontier.append(node.output[0])
    return bound


def dummy_inputs(model, *, sym_value: int = 2, seed: int = 0, batch: int | None = None,
                 shapes: dict | None = None) -> dict:
    """Seeded random feeds for every graph input. Symbolic dims: the first axis (batch) gets
    `batch` or `sym_value`, other axes 16·sym_value (sequence lengths, image sizes that must
    be multiples of 32); a symbol used twice gets one value. `shapes` overrides per input."""
    rng = np.random.default_rng(seed)
    feeds = {}
    symbols: dict[str, int] = {}
    for v in model.graph.input:
        if v.name in model.consts:
            continue
        tt = v.type.tensor_type
        dims = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
                continue
            value = (batch or sym_value) if k == 0 else 16 * sym_value
            if d.HasField("dim_param") and d.dim_param:
                value = symbols.setdefault(d.dim_param, value)
            dims.append(value)
        if shapes and v.name in shapes:
            dims = list(shapes[v.name])
        dtype = _NP.get(tt.elem_type)
        if tt.elem_type == TensorProto.BFLOAT16:  # (ml_dtypes; spa.verify runs float32 twins)
            feeds[v.name] = rng.standard_normal(dims).astype(
                onnx.helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16))
            continue
        if dtype is None:
            raise SpaError(f"graph input {v.name!r} has an unsupported element type "
                           f"{onnx.TensorProto.DataType.Name(tt.elem_type)}", file=model.path)
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[v.name] = rng.random(dims) < 0.5
        else:
            hi = index_bound(model, v.name) or 2
            feeds[v.name] = rng.integers(0, hi, size=dims).astype(dtype)
    return feeds
