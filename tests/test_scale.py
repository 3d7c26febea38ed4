"""Scoring at scale: big weights are scored in blocks of rows, read from their data files
(never mapped whole), with the same scores as the whole tensor; float16 and bfloat16
weights are scored (in float32) like float32 ones; Constant-node weights stored as external
data stay in their files until something reads them."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import spa
from models.synthetic import G, load_proto, oracle
from spa.criteria import core, evaluate
from spa.ir import external
from spa.ir.model import load

BF16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)


def mlp(dtype=np.float32, seed: int = 1) -> onnx.ModelProto:
    """SwiGLU MLP with a residual and a norm, weights of `dtype` (the graph computes in it)."""
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = G(opset=23, seed=seed)
    x = g.input(["B", 12], onnx_type)

    def w(*shape, positive=False):
        a = g.rng.standard_normal(shape).astype(np.float32) * 0.5
        return g.const((np.abs(a) + 0.5 if positive else a).astype(dtype))

    h = g.op("MatMul", [x, w(12, 24)])
    h = g.op("RMSNormalization", [h, w(24, positive=True)], axis=-1)
    gate = g.op("MatMul", [h, w(24, 40)])
    a = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]),
                     g.op("MatMul", [h, w(24, 40)])])
    h = g.op("Add", [h, g.op("MatMul", [a, w(40, 24)])])
    g.output(g.op("MatMul", [h, w(24, 6)]), onnx_type)
    return g.model()


def save_external(proto, d) -> str:
    p = os.path.join(d, "m.onnx")
    onnx.save(proto, p, save_as_external_data=True, location="m.onnx.data",
              size_threshold=256, convert_attribute=True)
    return p


CRITS = ("l1", "l2", "lamp", "bn_scale")


def scores(model, crit):
    return evaluate(spa.analyze(model), crit)[0]


@pytest.mark.parametrize("streamed", [True, False])
def test_blockwise_scores_equal_whole_tensor_scores(tmp_path, monkeypatch, streamed):
    """Tensors over BLOCK_BYTES are scored a few rows at a time; the scores are those of
    the whole tensor. Streamed weights are read block by block and never mapped."""
    proto = mlp()
    model = load(save_external(proto, str(tmp_path))) if streamed else load_proto(proto)
    assert model.streaming == streamed
    whole = {c: scores(model, c) for c in CRITS}
    monkeypatch.setattr(core, "BLOCK_BYTES", 100)  # 1..2 rows of the 24 x 40 weights
    reads = []
    if streamed:
        real = external.ExternalTensor.read_rows

        def read_rows(self, a, b):
            row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
            reads.append((b - a) * row <= max(100, row))  # one block, or one row
            return real(self, a, b)

        def no_map(self):
            raise AssertionError("a weight was mapped whole while scoring")

        monkeypatch.setattr(external.ExternalTensor, "read_rows", read_rows)
        monkeypatch.setattr(external.ExternalTensor, "array", no_map)
    for c in CRITS:
        got = scores(model, c)
        assert len(got) == len(whole[c]) and any(s.any() for s in got)
        for a, b in zip(got, whole[c]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    if streamed:
        assert reads and all(reads)  # blocks of rows, not whole tensors


@pytest.mark.parametrize("dtype", [BF16, np.float16])
def test_half_precision_weights_are_scored(dtype):
    """bfloat16 / float16 weights get magnitude scores (computed in float32): the same as
    the float32 twin holding the same values, so the same channels are kept; pruning at 0.5
    passes the oracle (checked in float32)."""
    low = mlp(dtype)
    twin = onnx.ModelProto()
    twin.CopyFrom(mlp(np.float32))
    for t, lt in zip(twin.graph.initializer, low.graph.initializer):  # the same values
        if t.data_type == TensorProto.FLOAT:
            a = onnx.numpy_helper.to_array(lt).astype(np.float32)
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    m_low, m_twin = load_proto(low), load_proto(twin)
    for c in CRITS:
        s_low, s_twin = scores(m_low, c), scores(m_twin, c)
        assert len(s_low) == len(s_twin) >= 2
        for a, b in zip(s_low, s_twin):
            assert a.any()
            np.testing.assert_allclose(a, b, rtol=1e-12)
    res = oracle(low, ratio=0.5, exact_only=True)  # (the residual stream passes a norm)
    ref = spa.prune(m_twin, ratio=0.5, exact_only=True)
    assert res.plan.keep == ref.plan.keep and res.plan.keep
    assert res.verify.exact and res.verify.passed


def constant_node_mlp() -> onnx.ModelProto:
    """Weights in Constant nodes (as some exporters write them), not initializers."""
    g = G(opset=18, seed=7)
    x = g.input(["B", 16])

    def w(*shape):
        out = g._name("cw")
        g.nodes.append(helper.make_node("Constant", [], [out], name=g._name("Constant"),
                                        value=onnx.numpy_helper.from_array(
                                            g.rng.standard_normal(shape).astype(np.float32),
                                            out + "_value")))
        return out

    h = g.op("Relu", [g.op("MatMul", [x, w(16, 256)])])
    h = g.op("Relu", [g.op("MatMul", [h, w(256, 64)])])
    g.output(g.op("MatMul", [h, w(64, 4)]))
    return g.model()


def test_constant_node_weights_stay_out_of_the_skeleton(tmp_path):
    """The checker and shape inference see Constant-node weights as typed inputs (the
    skeleton), not as copies of their data; the model still prunes and verifies, and the
    same with the Constant values in external data."""
    from spa.ir.model import _skeleton
    proto = constant_node_mlp()
    weights = sum(len(n.attribute[0].t.raw_data) for n in proto.graph.node
                  if n.op_type == "Constant")
    model = load_proto(proto)
    sk = _skeleton(model)
    assert weights > 60_000 and sk.ByteSize() < 4096
    assert not any(n.op_type == "Constant" for n in sk.graph.node)
    assert {n.output[0] for n in proto.graph.node if n.op_type == "Constant"} <= \
        {v.name for v in sk.graph.input}
    res = oracle(proto, ratio=0.5)
    assert res.verify.passed
    narrower = [n for n in res.proto.graph.node if n.op_type == "Constant"]
    assert sum(len(n.attribute[0].t.raw_data) for n in narrower) < weights
    # Constant values stored as external data (loaded: they are not initializers)
    p = save_external(proto, str(tmp_path))
    m = load(p)
    assert sorted(m.const_node) == sorted(n.output[0] for n in proto.graph.node
                                          if n.op_type == "Constant")
    out = spa.prune(m, ratio=0.5, do_verify=True)
    assert out.verify.passed and out.plan.keep == res.plan.keep
