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
    """Prune, then assert the contract: valid output, same graph, masked equivalence.
    Exact counts (round_to=1): the rules are under test, not the default widths."""
    model = load_proto(proto)
    res = spa.prune(model, ratio=ratio, criterion=criterion, seed=seed, do_verify=True,
                    exact_only=exact_only, round_to=1)
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


# ------------------------------------------------------------------------------------------
# benchmark-sized models (benchmarks/engine.py): real topologies, seeded random weights


def _he(g: G, *shape) -> str:
    """A weight with He-normal scale (fan-in = product of all but the first axis)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    return g.w(*shape, scale=float(np.sqrt(2.0 / max(fan_in, 1))))


def _conv_bn(g: G, x: str, cin: int, cout: int, k: int, stride: int = 1,
             relu: bool = True) -> str:
    """Conv (no bias) -> BatchNormalization [-> Relu], as torchvision exports it."""
    y = g.op("Conv", [x, _he(g, cout, cin, k, k)], kernel_shape=[k, k], pads=[k // 2] * 4,
             strides=[stride, stride])
    y = g.bn(y, cout)
    return g.op("Relu", [y]) if relu else y


def resnet50_like(image: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 v1.5 topology (bottlenecks 3-4-6-3, widths 64..2048, stride on the 3x3,
    projection shortcuts), input [batch, 3, image, image], ~25.6 M parameters."""
    g = G(opset=18, seed=seed)
    x = g.input(["batch", 3, image, image], name="input")
    y = _conv_bn(g, x, 3, 64, 7, stride=2)
    y = g.op("MaxPool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 0 else 1
            cout = width * 4
            h = _conv_bn(g, y, cin, width, 1)
            h = _conv_bn(g, h, width, width, 3, stride=stride)
            h = _conv_bn(g, h, width, cout, 1, relu=False)
            short = _conv_bn(g, y, cin, cout, 1, stride=stride, relu=False) \
                if b == 0 else y
            y = g.op("Relu", [g.op("Add", [h, short])])
            cin = cout
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    y = g.op("Gemm", [y, g.w(classes, cin, scale=0.02), g.w(classes, scale=0.0)], transB=1)
    g.output(y)
    return g.model()


def _linear(g: G, x: str, din: int, dout: int) -> str:
    return g.op("Add", [g.op("MatMul", [x, g.w(din, dout, scale=0.02)]), g.w(dout, scale=0.02)])


def _layer_norm(g: G, x: str, d: int) -> str:
    return g.op("LayerNormalization", [x, g.w(d, scale=0.1, positive=True), g.w(d, scale=0.02)],
                axis=-1, epsilon=1e-12)


def bert_base_like(layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072,
                   seq: int = 128, vocab: int = 30522, classes: int = 2,
                   seed: int = 0) -> onnx.ModelProto:
    """BERT-base encoder as HF exports it: word + position + token-type embeddings
    (Gather), LayerNorm, per layer hand-written multi-head attention (Q/K/V MatMul + bias,
    Reshape to heads, Transpose, scaled scores + additive mask, Softmax) and an erf-GELU
    FFN, post-LN residuals; pooler (first token, dense, Tanh) and a classifier.
    Inputs input_ids / token_type_ids [batch, seq] int64, attention_mask [batch, 1, 1, seq]
    float (additive); ~110 M parameters at the defaults."""
    g = G(opset=18, seed=seed)
    dh = hidden // heads
    ids = g.input(["batch", seq], TensorProto.INT64, name="input_ids")
    tt = g.input(["batch", seq], TensorProto.INT64, name="token_type_ids")
    mask = g.input(["batch", 1, 1, seq], name="attention_mask")
    x = g.op("Gather", [g.w(vocab, hidden, scale=0.02), ids])
    pos = g.op("Gather", [g.w(512, hidden, scale=0.02), g.const(np.arange(seq, dtype=np.int64))])
    x = g.op("Add", [g.op("Add", [x, pos]), g.op("Gather", [g.w(2, hidden, scale=0.02), tt])])
    x = _layer_norm(g, x, hidden)
    split = g.ints(0, 0, heads, dh)
    merge = g.ints(0, 0, hidden)
    scale = g.const(np.float32(dh ** -0.5))
    half, one = g.const(np.float32(0.5)), g.const(np.float32(1.0))
    rsqrt2 = g.const(np.float32(2 ** -0.5))
    for _ in range(layers):
        q = g.op("Transpose", [g.op("Reshape", [_linear(g, x, hidden, hidden), split])],
                 perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [_linear(g, x, hidden, hidden), split])],
                 perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [_linear(g, x, hidden, hidden), split])],
                 perm=[0, 2, 1, 3])
        s = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask])
        o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
        o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), merge])
        x = _layer_norm(g, g.op("Add", [_linear(g, o, hidden, hidden), x]), hidden)
        h = _linear(g, x, hidden, ffn)
        h = g.op("Mul", [g.op("Mul", [h, half]),
                         g.op("Add", [g.op("Erf", [g.op("Mul", [h, rsqrt2])]), one])])
        x = _layer_norm(g, g.op("Add", [_linear(g, h, ffn, hidden), x]), hidden)
    first = g.op("Gather", [x, g.const(np.array(0, dtype=np.int64))], axis=1)
    pooled = g.op("Tanh", [_linear(g, first, hidden, hidden)])
    g.output(_linear(g, pooled, hidden, classes))
    return g.model()


def stacked(depth: int, width: int = 16, image: int = 8, classes: int = 10,
            seed: int = 0) -> onnx.ModelProto:
    """A chain of `depth` residual basic blocks (conv-BN-Relu-conv-BN, Add, Relu) at a small
    width: 7 nodes per block, for measuring how the engine scales with graph size."""
    g = G(opset=18, seed=seed)
    x = g.input(["batch", 3, image, image], name="input")
    y = _conv_bn(g, x, 3, width, 3)
    for _ in range(depth):
        h = _conv_bn(g, y, width, width, 3)
        h = _conv_bn(g, h, width, width, 3, relu=False)
        y = g.op("Relu", [g.op("Add", [h, y])])
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    g.output(g.op("Gemm", [y, g.w(classes, width, scale=0.1), g.w(classes, scale=0.0)],
                  transB=1))
    return g.model()
