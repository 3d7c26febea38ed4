"""Apply a plan: the same graph with narrower tensors.

Node names, tensor names, initializer names, op types, graph inputs and outputs stay.
Constants are sliced generically along every pruned axis; each op's `shrink` hook updates
what slicing cannot (group counts, split sizes, slice bounds, shape literals). A shape
operand shared by nodes that now need different values is cloned for the odd ones out.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import SpaError
from ..ir import external
from ..ir.model import Model, _skeleton, structural_check
from ..ops import registry
from ..ops.registry import Node


class Shrinker:
    def __init__(self, model, proto: onnx.ModelProto, kept: dict):
        self.model, self.proto, self.kept_ = model, proto, kept
        self.copy_of = {id(n): proto.graph.node[k] for k, n in enumerate(model.graph.node)}
        self.requests: dict[str, list[tuple]] = {}
        self.elem_writes: dict[str, dict[int, int]] = {}
        self.new_inits: list[onnx.TensorProto] = []
        self.names = {t.name for t in proto.graph.initializer} | \
            {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}

    def kept(self, key) -> np.ndarray | None:
        return self.kept_.get(key)

    def old_len(self, key) -> int:
        return self.model.shapes[key[0]][key[1]]

    def new_len(self, key) -> int:
        k = self.kept_.get(key)
        return self.old_len(key) if k is None else len(k)

    def _node(self, n: Node) -> onnx.NodeProto:
        return self.copy_of[id(n.proto)]

    def set_attr(self, n: Node, name: str, value) -> None:
        node = self._node(n)
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)
        node.attribute.append(onnx.helper.make_attribute(name, value))
        _sort_attrs(node, n.proto)

    def del_attr(self, n: Node, name: str) -> None:
        node = self._node(n)
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)

    def set_input(self, n: Node, k: int, value: np.ndarray) -> None:
        self.requests.setdefault(n.i(k), []).append((n, k, value))

    def add_input(self, n: Node, k: int, value: np.ndarray, suffix: str) -> None:
        node = self._node(n)
        name = self._fresh(f"{n.name}_{suffix}")
        self.new_inits.append(numpy_helper.from_array(value, name))
        while len(node.input) < k:
            node.input.append("")
        if len(node.input) == k:
            node.input.append(name)
        else:
            node.input[k] = name

    def set_const_elem(self, name: str, idx: int, value: int) -> None:
        w = self.elem_writes.setdefault(name, {})
        if w.get(idx, value) != value:
            raise SpaError(f"shape constant {name!r} would need two different values",
                           file=self.model.path)
        w[idx] = value

    def _fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def finish(self, write_const) -> None:
        for name, reqs in self.requests.items():
            uses = [(id(node), k) for node in self.model.consumers.get(name, [])
                    for k, i in enumerate(node.input) if i == name]
            values = [v for _, _, v in reqs]
            same = all(np.array_equal(v, values[0]) for v in values)
            if same and len(reqs) == len(uses) and name not in self.model.output_names:
                write_const(name, values[0])
                continue
            for n, k, v in reqs:
                new = self._fresh(f"{name}__spa_{n.name}")
                self.new_inits.append(numpy_helper.from_array(
                    v.astype(self.model.consts[name].dtype), new))
                self._node(n).input[k] = new
        for name, writes in self.elem_writes.items():
            arr = self.model.consts[name].copy()
            flat = arr.reshape(-1)
            for idx, v in writes.items():
                flat[idx] = v
            write_const(name, arr)
        self.proto.graph.initializer.extend(self.new_inits)


def take_kept(arr: np.ndarray, name: str, kept: dict) -> np.ndarray:
    """`arr`, the value of constant `name` in its original shape, sliced along every axis
    the plan prunes (`kept`: Plan.kept_indices)."""
    for ax in range(arr.ndim):
        idx = kept.get((name, ax))
        if idx is not None:
            arr = np.take(arr, idx, axis=ax)
    return arr


def _sliced_consts(model, kept: dict, values: dict | None = None) -> dict:
    """Constants with pruned axes, sliced (`values`: replacement values of some constants,
    in their original shapes, e.g. reconstructed weights; they are all returned). Weights
    held in external data files are not read here: they become Pending tensors, sliced
    chunk by chunk when the model is written (spa.ir.external)."""
    values = values or {}
    by_tensor: dict[str, list] = {}
    for (t, ax), idx in kept.items():
        if t in model.consts:
            by_tensor.setdefault(t, []).append((ax, idx))
    out = {t: np.array(v, order="C", copy=True) for t, v in values.items()
           if t not in by_tensor}
    refs = getattr(model.consts, "ref", lambda name: None)
    for t, axes in by_tensor.items():
        ref = refs(t) if t not in values else None
        if ref is not None and t not in model.const_node:
            out[t] = external.pending(ref, sorted(axes, key=lambda a: a[0]))
            continue
        out[t] = np.array(take_kept(values.get(t, model.consts[t]), t, kept), order="C",
                          copy=True)
    return out


def _copy_fields(dst, src, skip: str) -> None:
    """Copy every set field of a protobuf message except `skip`."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _copy_with(src: onnx.ModelProto, new_inits: dict) -> onnx.ModelProto:
    """A copy of the model in which the initializers named in `new_inits` are replaced,
    without copying their old data first (weights dominate the cost of a copy)."""
    proto = onnx.ModelProto()
    _copy_fields(proto, src, skip="graph")
    g, sg = proto.graph, src.graph
    _copy_fields(g, sg, skip="initializer")
    for t in sg.initializer:
        if t.name in new_inits:
            new = new_inits[t.name]
            nt = new.tensor(t.name) if isinstance(new, external.Pending) else \
                numpy_helper.from_array(new, t.name)
            nt.doc_string = t.doc_string
            g.initializer.append(nt)
        else:
            g.initializer.append(t)
    return proto


def _sort_attrs(node: onnx.NodeProto, original: onnx.NodeProto) -> None:
    order = {a.name: k for k, a in enumerate(original.attribute)}
    attrs = sorted(node.attribute, key=lambda a: (order.get(a.name, 1 << 20), a.name))
    del node.attribute[:]
    node.attribute.extend(attrs)


def apply_plan(model, analysis, plan, updates=None) -> onnx.ModelProto:
    """Return a new ModelProto with the plan applied (the input model is not modified).
    `updates` (spa.rewrite.reconstruct.Updates): new values of constants (original shapes)
    and new bias inputs, from a weight reconstruction; they are sliced like the rest."""
    plan.validate(analysis)
    kept = plan.kept_indices(analysis)
    sliced = _sliced_consts(model, kept, updates.consts if updates else None)
    proto = _copy_with(model.proto, sliced)
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node
                   if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}

    def write_const(name: str, arr: np.ndarray) -> None:
        t = numpy_helper.from_array(np.array(arr, order="C", copy=True), name)
        if name in inits:
            old = inits[name]
            t.doc_string = old.doc_string
            old.CopyFrom(t)
        elif name in const_nodes:
            node = const_nodes[name]
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(t)
                    break
            else:  # value_floats / value_ints forms
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("value", t))
        else:
            raise SpaError(f"constant {name!r} not found while rewriting", file=model.path)

    # 1. constants sliced along their pruned axes (initializers were placed by _copy_with)
    for t, arr in sliced.items():
        if t not in inits:
            write_const(t, arr)
    # 2. attributes and shape operands, by each op's rule
    s = Shrinker(model, proto, kept)
    for node in model.nodes:
        r = registry.get(node)
        if r is None or r.shrink is None:
            continue
        n = Node(node, model)
        touched = any((t, ax) in kept for t in list(node.input) + list(node.output) if t
                      for ax in range(model.rank(t) or 0))
        if touched:
            r.shrink(n, s)
    if updates:  # bias inputs added by the reconstruction (sliced along the node's outputs)
        by_name = {model.node_name(node): node for node in model.nodes}
        for (name, k), value in sorted(updates.new_inputs.items()):
            idx = kept.get(updates.new_input_dims[(name, k)])  # the weight's output dim
            s.add_input(Node(by_name[name], model), k, value if idx is None else value[idx],
                        "bias")
    s.finish(write_const)
    # 3. declared intermediate shapes
    for vi in g.value_info:
        shp = model.shapes.get(vi.name)
        tt = vi.type.tensor_type
        if shp is None or not vi.type.HasField("tensor_type"):
            continue
        if len(tt.shape.dim) != len(shp):
            vi.type.tensor_type.ClearField("shape")
            continue
        for ax, d in enumerate(tt.shape.dim):
            if (vi.name, ax) in kept:
                d.Clear()
                d.dim_value = len(kept[(vi.name, ax)])
            elif isinstance(shp[ax], int) and d.HasField("dim_value") and d.dim_value != shp[ax]:
                d.dim_value = shp[ax]  # exporter wrote a wrong shape: use the inferred one
    return proto


def check(proto: onnx.ModelProto, original: onnx.ModelProto | None = None,
          path: str | None = None) -> None:
    """The output must pass the full ONNX checker (with strict shape inference). Where the
    original itself does not pass the full check (ops whose shapes ONNX cannot infer, e.g.
    function ops), the pruned model must pass the structural check."""
    try:  # on the skeleton (weights as typed inputs): same graph, nothing big serialised
        onnx.checker.check_model(_skeleton(Model(proto=proto)), full_check=True)
        return
    except Exception as exc:
        error = exc
    if original is not None:
        try:
            onnx.checker.check_model(_skeleton(Model(proto=original)), full_check=True)
        except Exception:
            try:  # (weights held by reference in external files: check the skeleton)
                structural_check(_skeleton(Model(proto=proto)) if external.has_refs(proto)
                                 else proto)
                return
            except Exception as exc:
                error = exc
    raise SpaError(f"internal error: the pruned model fails onnx.checker ({error}); "
                   "nothing was written", file=path)
