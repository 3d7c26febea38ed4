"""The masked-equivalence oracle.

A pruned model P must equal the original O in which the removed channels are silenced.
We build that masked O generically: after every node, each output tensor is multiplied by
a 0/1 mask over its pruned axes. For exact groups P's outputs must then match the masked
O's to TOLERANCE (1e-4, relative); for approximate groups (the channels pass a
normalisation over the channel axis) the deviation is reported instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, TensorProto

from .activations import with_outputs
from .errors import SpaError
from .ir.external import materialize, np_dtype
from .runtime import dummy_inputs, first_line, session_for

_BF16 = np_dtype(TensorProto.BFLOAT16)
_MASKABLE = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
             TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
             TensorProto.INT32: np.int32, TensorProto.BFLOAT16: _BF16}
#: float32 noise of a correct rewrite reached 1.8e-5 on PP-OCRv6 rec small at the default
#: widths (blocked and unblocked conv kernels sum in different orders); wrong rewrites move
#: outputs by 1e-2 and more
TOLERANCE = 1e-4
#: ops after which ONNX Runtime's fusions change the arithmetic (QDQ -> QLinear kernels)
_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclass
class VerifyResult:
    exact: bool                       # every pruned group is exact
    max_rel_error: float              # pruned vs masked original, worst output
    max_rel_change: float             # pruned vs unmasked original (the pruning's effect)
    outputs: dict = field(default_factory=dict)
    tolerance: float = TOLERANCE
    approximate_groups: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # how the models were run, when not plainly
    #: spa.prune checks the exact part of a plan: the groups it checked, and the pruned
    #: approximate groups the oracle cannot check (None: the whole plan was given)
    checked_groups: list | None = None
    unchecked_groups: list | None = None

    @property
    def passed(self) -> bool | None:
        """True/False for exact plans; None (report only) for approximate ones."""
        if not self.exact:
            return None
        return bool(self.max_rel_error <= self.tolerance)

    def to_json(self) -> dict:
        return {"exact": self.exact, "passed": self.passed, "tolerance": self.tolerance,
                "max_rel_error": self.max_rel_error, "max_rel_change": self.max_rel_change,
                "approximate_groups": self.approximate_groups, "outputs": self.outputs,
                **({"checked_groups": self.checked_groups,
                    "unchecked_groups": self.unchecked_groups}
                   if self.checked_groups is not None else {}),
                **({"notes": self.notes} if self.notes else {})}


def masked_model(model, kept: dict) -> onnx.ModelProto:
    """The original model with every pruned element forced to zero after each node."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    g = proto.graph
    by_tensor: dict[str, list] = {}
    for (t, ax), idx in kept.items():
        if t not in model.consts and t in model.producer:
            by_tensor.setdefault(t, []).append((ax, idx))
    new_nodes = []
    for node in g.node:
        new_nodes.append(node)
        for j, out in enumerate(node.output):
            if out not in by_tensor:
                continue
            dtype = _MASKABLE.get(model.dtypes.get(out, TensorProto.FLOAT))
            if dtype is None:
                continue
            shape = model.shapes[out]
            mask = np.ones([1] * len(shape), dtype=bool)
            for ax, idx in by_tensor[out]:
                v = np.zeros(shape[ax], dtype=bool)
                v[idx] = True
                mshape = [1] * len(shape)
                mshape[ax] = shape[ax]
                mask = mask & v.reshape(mshape)
            pre = f"{out}__spa_premask"
            node.output[j] = pre
            mname, zname = f"{out}__spa_mask", f"{out}__spa_zero"
            g.initializer.append(numpy_helper.from_array(mask, mname))
            g.initializer.append(numpy_helper.from_array(np.zeros((), dtype=dtype), zname))
            # Where, not Mul: a masked -inf (attention masks) must become 0, not NaN
            new_nodes.append(onnx.helper.make_node("Where", [mname, pre, zname], [out],
                                                   name=f"{out}__spa_masknode"))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    return proto


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    na, nb = np.isnan(a), np.isnan(b)
    if (na != nb).any():
        return float("inf")
    ok = ~na & np.isfinite(b)
    if (np.isinf(a) != np.isinf(b)).any() or (np.isinf(a) & (a != b)).any():
        return float("inf")
    if not ok.any():
        return 0.0
    scale = max(np.abs(b[ok]).max(), 1e-12)
    return float(np.abs(a[ok] - b[ok]).max() / scale)


def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    yield from _graphs(sg)


_DTYPE_ATTRS = ("to", "dtype", "output_dtype")


def _uses_bfloat16(proto: onnx.ModelProto) -> bool:
    for g in _graphs(proto.graph):
        if any(t.data_type == TensorProto.BFLOAT16 for t in g.initializer):
            return True
        if any(v.type.tensor_type.elem_type == TensorProto.BFLOAT16
               for v in list(g.input) + list(g.output) + list(g.value_info)):
            return True
        for n in g.node:
            for a in n.attribute:
                if (a.type == onnx.AttributeProto.INT and a.name in _DTYPE_ATTRS and
                        a.i == TensorProto.BFLOAT16) or \
                        (a.type == onnx.AttributeProto.TENSOR and
                         a.t.data_type == TensorProto.BFLOAT16):
                    return True
    return False


def float32_twin(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every bfloat16 tensor, type and cast made float32. ONNX Runtime has
    few bfloat16 kernels on CPU; bfloat16 -> float32 is exact, so the twins of the
    original, the masked original and the pruned model compare the same structure."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)

    def up(t: onnx.TensorProto) -> None:
        if t.data_type == TensorProto.BFLOAT16:
            arr = numpy_helper.to_array(materialize(t)).astype(np.float32)
            nt = numpy_helper.from_array(arr, t.name)
            t.CopyFrom(nt)

    for g in _graphs(m.graph):
        for t in g.initializer:
            up(t)
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.tensor_type.elem_type == TensorProto.BFLOAT16:
                v.type.tensor_type.elem_type = TensorProto.FLOAT
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.INT and a.name in _DTYPE_ATTRS and \
                        a.i == TensorProto.BFLOAT16:
                    a.i = TensorProto.FLOAT
                elif a.type == onnx.AttributeProto.TENSOR:
                    up(a.t)
    return m


def verify(model, pruned: onnx.ModelProto, analysis, plan, *, seed: int = 0,
           batches: int = 2, input_shapes: dict | None = None) -> VerifyResult:
    kept = plan.kept_indices(analysis)
    approx = plan.touches_approximate(analysis)
    notes = []
    twin = _uses_bfloat16(model.proto)
    prep = float32_twin if twin else (lambda p: p)
    if twin:
        notes.append("bfloat16 model: compared as float32 twins (bfloat16 -> float32 is "
                     "exact; ONNX Runtime has few bfloat16 kernels on CPU)")
    optimize = not any(n.op_type in _QDQ for g in _graphs(model.graph) for n in g.node)
    if not optimize:
        notes.append("quantize/dequantize nodes: run without ONNX Runtime graph optimisations "
                     "(its QDQ fusions are not bit-exact, and the masks would block them in "
                     "one model only)")
    try:
        s_orig = session_for(prep(model.proto), optimize=optimize)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own untyped errors
        raise SpaError(f"ONNX Runtime cannot run the original model ({first_line(exc)}), so the "
                       "rewrite cannot be checked against the masked original. Register "
                       "the op's library with ONNX Runtime, or pass --no-verify "
                       "(verify=False) to write the pruned model unchecked; nothing written",
                       file=getattr(model, "path", None)) from None
    s_mask = session_for(prep(masked_model(model, kept)), optimize=optimize)
    s_pruned = session_for(prep(pruned), optimize=optimize)
    names = [o.name for o in s_orig.get_outputs()]
    worst, change, per = 0.0, 0.0, {}
    for b in range(batches):
        feeds = dummy_inputs(model, seed=seed + b, sym_value=2, shapes=input_shapes)
        if twin:
            feeds = {k: v.astype(np.float32) if v.dtype == _BF16 else v
                     for k, v in feeds.items()}
        o = s_orig.run(names, feeds)
        m = s_mask.run(names, feeds)
        p = s_pruned.run(names, feeds)
        for name, oo, mm, pp in zip(names, o, m, p):
            e, ch = _rel(pp, mm), _rel(pp, oo)
            per[name] = {"rel_error": max(e, per.get(name, {}).get("rel_error", 0.0)),
                         "rel_change": max(ch, per.get(name, {}).get("rel_change", 0.0))}
            worst, change = max(worst, e), max(change, ch)
    return VerifyResult(exact=not approx, max_rel_error=worst, max_rel_change=change,
                        outputs=per, approximate_groups=approx, notes=notes)


class VerificationError(SpaError):
    """The pruned model departs from the masked original (a wrong rewrite). CLI exit 1."""

    exit_code = 1


def exact_part(plan, analysis):
    """The plan restricted to its exact groups: what the oracle can prove. None when no
    exact group loses a channel."""
    from .plan import Plan
    keep = {g: k for g, k in plan.keep.items()
            if analysis.groups[g].exact and len(k) < analysis.groups[g].channels}
    if not keep:
        return None
    if len(keep) == len(plan.keep):
        return plan
    return Plan(keep, {g: plan.sizes[g] for g in keep}, plan.criterion, dict(plan.options),
                plan.model_sha256)


def locate_divergence(model, pruned: onnx.ModelProto, analysis, plan, *, seed: int = 0,
                      input_shapes: dict | None = None, tolerance: float = TOLERANCE):
    """The first tensor, in graph order, where the pruned model departs from the masked
    original: compares every node output the two models share (the rewrite keeps tensor
    names), the masked original's value restricted to the kept elements. Returns {"tensor",
    "node", "op", "rel_error" | "shape"} or None when every shared tensor agrees. Run only
    after a failed oracle: it makes every intermediate tensor an output."""
    kept = plan.kept_indices(analysis)
    twin = _uses_bfloat16(model.proto)
    prep = float32_twin if twin else (lambda p: p)
    optimize = not any(n.op_type in _QDQ for g in _graphs(model.graph) for n in g.node)
    pruned_names = {o for n in pruned.graph.node for o in n.output if o}
    order, producer = [], {}
    for node in model.nodes:
        for o in node.output:
            if o and o in pruned_names and o not in model.consts and \
                    model.dtypes.get(o, TensorProto.FLOAT) in _MASKABLE:
                order.append(o)
                producer[o] = node
    if not order:
        return None
    s_mask = session_for(with_outputs(prep(masked_model(model, kept)), order),
                         optimize=optimize)
    s_pruned = session_for(with_outputs(prep(pruned), order), optimize=optimize)
    feeds = dummy_inputs(model, seed=seed, sym_value=2, shapes=input_shapes)
    if twin:
        feeds = {k: v.astype(np.float32) if v.dtype == _BF16 else v for k, v in feeds.items()}
    m_vals = dict(zip(order, s_mask.run(order, feeds)))
    p_vals = dict(zip(order, s_pruned.run(order, feeds)))
    for t in order:
        m = np.asarray(m_vals[t])
        for (name, ax), idx in kept.items():
            if name == t and ax < m.ndim:
                m = np.take(m, idx, axis=ax)
        p = np.asarray(p_vals[t])
        node = producer[t]
        where = {"tensor": t, "node": model.node_name(node), "op": node.op_type}
        if p.shape != m.shape:
            return {**where, "shape": f"{tuple(p.shape)} instead of {tuple(m.shape)}"}
        e = _rel(p, m)
        if e > tolerance:
            return {**where, "rel_error": e}
    return None


def divergence_message(where: dict | None, result: VerifyResult) -> str:
    """What a user reads when the oracle fails (and can paste into a bug report)."""
    head = (f"the pruned model does not match the masked original (max relative error "
            f"{result.max_rel_error:.3g}, tolerance {result.tolerance:g})")
    if where is None:
        at = "; every intermediate tensor agrees, only the graph outputs differ"
    elif "shape" in where:
        at = (f"; it departs first at tensor {where['tensor']!r}, output of node "
              f"{where['node']!r} ({where['op']}): shape {where['shape']}")
    else:
        at = (f"; it departs first at tensor {where['tensor']!r}, output of node "
              f"{where['node']!r} ({where['op']}): relative error {where['rel_error']:.3g}")
    return (head + at + ". This is a bug in SPA (the rule of that op, most likely): please "
            "report it with the model and the plan; --no-verify writes the model anyway. "
            "Nothing written")
