"""Synthetic ONNX models built directly with onnx.helper (no framework needed): a small
graph builder for rule tests and property tests, the oracle check used by the tests, and
generators of ResNet-50-, BERT- and LLM-shaped models for benchmarks."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

import spa
from spa.ir.model import from_proto
from spa.rewrite.apply import check


class G:
    def __init__(self, opset: int = 18, seed: int = 0):
        self.opset, self.nodes, self.inits, self.inputs, self.outputs = opset, [], [], [], []
        self.rng = np.random.default_rng(seed)
        self.k = 0

    def _name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def input(self, shape, dtype=TensorProto.FLOAT, name: str | None = None) -> str:
        name = name or self._name("in")
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def const(self, arr, name: str | None = None) -> str:
        name = name or self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def w(self, *shape, scale: float = 0.5, positive: bool = False) -> str:
        a = self.rng.standard_normal(shape).astype(np.float32) * scale
        return self.const(np.abs(a) + 0.5 if positive else a, self._name("w"))

    def ints(self, *vals) -> str:
        return self.const(np.array(vals, dtype=np.int64))

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", **attrs):
        outs = [self._name(op_type.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=self._name(op_type + "_node"), domain=domain,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def output(self, name: str, dtype=TensorProto.FLOAT, shape=None) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def bn(self, x: str, c: int) -> str:
        return self.op("BatchNormalization", [x, self.w(c, positive=True), self.w(c),
                                              self.w(c), self.w(c, positive=True)])

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias=True,
             dims: int = 2) -> str:
        ins = [x, self.w(cout, cin // group, *([k] * dims))]
        if bias:
            ins.append(self.w(cout))
        return self.op("Conv", ins, pads=[k // 2] * (2 * dims), group=group)

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 9
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        types = {v.name: v.type for v in list(inferred.graph.value_info) +
                 list(inferred.graph.output) if v.type.tensor_type.HasField("shape")}
        for o in m.graph.output:
            if o.name in types:
                o.type.CopyFrom(types[o.name])
        onnx.checker.check_model(m)
        return m


def load_proto(proto: onnx.ModelProto):
    return from_proto(proto, path=None)


def oracle(proto: onnx.ModelProto, ratio: float = 0.5, criterion: str = "l2", seed: int = 0,
           exact_only: bool = False, expect_pruned: bool = True):
    """Prune, then assert the contract: valid output, same graph, masked equivalence."""
    model = load_proto(proto)
    res = spa.prune(model, ratio=ratio, criterion=criterion, seed=seed, do_verify=True,
                    exact_only=exact_only)
    out = res.proto
    check(out, proto)
    assert [n.name for n in out.graph.node] == [n.name for n in proto.graph.node]
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in proto.graph.node]
    assert [i.name for i in out.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    orig_inits = [t.name for t in proto.graph.initializer]
    assert [t.name for t in out.graph.initializer][:len(orig_inits)] == orig_inits
    if expect_pruned:
        assert res.plan.keep, "expected something to be pruned"
        assert res.after["params"] < res.before["params"]
    v = res.verify
    if v.exact:
        assert v.passed, f"masked equivalence failed: {v.max_rel_error}"
    else:
        assert np.isfinite(v.max_rel_error)
    return res


def save_tmp(proto: onnx.ModelProto, d: str | None = None, name: str = "m.onnx") -> str:
    d = d or tempfile.mkdtemp()
    p = os.path.join(d, name)
    onnx.save(proto, p)
    return p
