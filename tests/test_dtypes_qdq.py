"""bfloat16 models and quantized (QDQ) models: pruned and checked by the oracle, or their
channels refused (frozen, with the node named) -- never a wrong model."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import spa
from models.synthetic import G, load_proto, oracle
from spa.ir import external
from spa.ir.model import load

BF16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)


def bf16_weight(g: G, *shape) -> str:
    return g.const(g.rng.standard_normal(shape).astype(np.float32).astype(BF16))


def bf16_mlp() -> onnx.ModelProto:
    """A bfloat16 model end to end (inputs, weights, outputs), SwiGLU and residual."""
    g = G(opset=18, seed=1)
    x = g.input(["B", 8], TensorProto.BFLOAT16)
    h = g.op("MatMul", [x, bf16_weight(g, 8, 16)])
    gate = g.op("MatMul", [h, bf16_weight(g, 16, 32)])
    a = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]),
                     g.op("MatMul", [h, bf16_weight(g, 16, 32)])])
    h = g.op("Add", [h, g.op("MatMul", [a, bf16_weight(g, 32, 16)])])
    g.output(g.op("MatMul", [h, bf16_weight(g, 16, 4)]), TensorProto.BFLOAT16)
    return g.model()


def test_bfloat16_model_is_pruned_and_verified():
    res = oracle(bf16_mlp())
    assert res.verify.exact and res.verify.passed
    assert any("bfloat16" in n for n in res.verify.notes)
    # the weights stay bfloat16, narrower
    old = {t.name: t for t in bf16_mlp().graph.initializer}
    for t in res.proto.graph.initializer:
        assert t.data_type == old[t.name].data_type
    assert res.after["params"] < res.before["params"]
    # bfloat16 weights count as parameters (they are what the groups own)
    assert res.before["params"] == sum(int(np.prod(t.dims)) for t in old.values()
                                       if t.data_type == TensorProto.BFLOAT16)


def test_bfloat16_weights_cast_to_float():
    g = G(opset=18, seed=2)
    x = g.input(["B", 8])
    w1 = g.op("Cast", [bf16_weight(g, 8, 16)], to=TensorProto.FLOAT)
    h = g.op("Relu", [g.op("MatMul", [x, w1])])
    w2 = g.op("Cast", [bf16_weight(g, 16, 4)], to=TensorProto.FLOAT)
    g.output(g.op("MatMul", [h, w2]))
    res = oracle(g.model())
    assert res.plan.keep and res.verify.passed


def test_bfloat16_with_external_data_streams(tmp_path, monkeypatch):
    monkeypatch.setattr(external, "ORT_INLINE_BYTES", 256)  # hand bf16 weights to ORT as is
    p = str(tmp_path / "m.onnx")
    onnx.save(bf16_mlp(), p, save_as_external_data=True, location="m.data",
              size_threshold=256)
    model = load(p)
    assert model.streaming and model.consts[model.graph.initializer[1].name].dtype == BF16
    _, _, names, values = external.ort_initializers(model.proto)
    assert names and {v.data_type() for v, _ in values} == {"tensor(bfloat16)"}
    res = spa.prune(model, ratio=0.5, do_verify=True)
    assert res.verify.passed
    out = str(tmp_path / "out.onnx")
    spa.save(res.proto, out, source=p)
    back = load(out, stream=False)
    ref = load_proto(bf16_mlp())
    kept = res.plan.kept_indices(res.analysis)
    for t in res.proto.graph.initializer:
        want = ref.consts[t.name]
        for (name, ax), idx in sorted(kept.items()):
            if name == t.name:
                want = np.take(want, idx, axis=ax)
        np.testing.assert_array_equal(back.consts[t.name].astype(np.float32),
                                      want.astype(np.float32))


def qdq(g: G, t: str, scale, zero_point, axis=None) -> str:
    kw = {} if axis is None else {"axis": axis}
    q = g.op("QuantizeLinear", [t, g.const(scale), g.const(zero_point)], **kw)
    return g.op("DequantizeLinear", [q, g.const(scale), g.const(zero_point)], **kw)


def test_activation_qdq_per_tensor_and_per_channel():
    """QDQ around activations (as onnxruntime.quantization writes it): elementwise, so the
    channels pass through; per-channel scales are sliced with them. The oracle runs
    without ONNX Runtime's QDQ fusions (not bit-exact, and blocked by the masks)."""
    g = G(opset=18, seed=4)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    y = qdq(g, y, np.float32(0.05), np.uint8(128))
    y = g.op("Relu", [g.conv(y, 6, 6)])
    y = qdq(g, y, np.full(6, 0.05, np.float32), np.zeros(6, np.int8), axis=1)
    g.output(g.conv(y, 6, 2))
    res = oracle(g.model())
    assert res.verify.passed and res.verify.max_rel_error == 0.0
    assert any("quantize" in n for n in res.verify.notes)
    scales = [t for t in res.proto.graph.initializer if t.data_type == TensorProto.FLOAT
              and list(t.dims) == [3]]
    assert scales, "per-channel scales are sliced with their channels"


def test_qdq_transformer_mlp():
    g = G(opset=18, seed=5)
    x = g.input(["B", 4, 8])
    h = qdq(g, g.op("MatMul", [x, g.w(8, 16)]), np.float32(0.02), np.int8(0))
    wq = g.const(g.rng.integers(-120, 120, (16, 32)).astype(np.int8))
    w = g.op("DequantizeLinear", [wq, g.const(np.full(32, 0.01, np.float32)),
                                  g.const(np.zeros(32, np.int8))], axis=1)
    a = g.op("Relu", [g.op("MatMul", [h, w])])
    a = qdq(g, a, np.float32(0.03), np.uint8(0))
    g.output(g.op("MatMul", [a, g.w(32, 3)]))
    res = oracle(g.model())
    assert res.verify.passed
    assert 32 in [res.analysis.groups[k].channels for k in res.plan.keep]


def blocked(length: int = 16, block: int = 4) -> onnx.ModelProto:
    """Weight-only blocked quantization (opset 21 block_size), both MatMuls: the second
    one's blocked axis is the hidden axis the first one produces."""
    g = G(opset=21, seed=6)
    x = g.input(["B", 8])
    wq = g.const(g.rng.integers(-100, 100, (8, length)).astype(np.int8))
    w = g.op("DequantizeLinear", [wq, g.const(np.full((8 // 4, length), 0.01, np.float32))],
             axis=0, block_size=4)
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, w]), g.w(length)])])
    nb = -(-length // block)
    wq2 = g.const(g.rng.integers(-100, 100, (length, 4)).astype(np.int8))
    w2 = g.op("DequantizeLinear", [wq2, g.const(np.full((nb, 4), 0.01, np.float32))],
              axis=0, block_size=block)
    g.output(g.op("MatMul", [h, w2]))
    return g.model()


def test_blocked_quantization_prunes_whole_blocks():
    res = oracle(blocked())
    assert res.verify.passed
    (gid, keep), = res.plan.keep.items()
    assert res.analysis.groups[gid].channels == 4  # 16 hidden units = 4 blocks of 4
    kept = res.plan.kept_indices(res.analysis)
    hidden = [idx for (t, ax), idx in kept.items() if len(idx) % 4 == 0 and len(idx) > 4]
    assert hidden and all(len(i) == 4 * len(keep) for i in hidden)
    scales = {tuple(t.dims) for t in res.proto.graph.initializer
              if t.data_type == TensorProto.FLOAT}
    assert (len(keep), 4) in scales and (2, 4 * len(keep)) in scales


def test_blocked_quantization_with_a_partial_block_is_frozen():
    model = load_proto(blocked(length=14))  # 14 = 3 blocks of 4, the last one partial
    ana = spa.analyze(model)
    assert not ana.groups, "a partial last block: the hidden axis must not be pruned"
    reasons = " ".join(r for f in ana.frozen for r in f["reasons"])
    assert "inconsistent lengths" in reasons


def test_qlinear_ops_are_opaque_and_named():
    """QOperator format (QLinearMatMul): no rule, so SPA never guesses: the node is
    listed as opaque and the channels it reads are frozen; the float part is still pruned."""
    g = G(opset=18, seed=7)
    x = g.input(["B", 8])
    h = g.op("Relu", [g.op("MatMul", [x, g.w(8, 16)])])
    h = g.op("Relu", [g.op("MatMul", [h, g.w(16, 16)])])
    q = g.op("QuantizeLinear", [h, g.const(np.float32(0.05)), g.const(np.uint8(128))])
    s, zp = g.const(np.float32(0.05)), g.const(np.uint8(128))
    wq = g.const(g.rng.integers(0, 255, (16, 4)).astype(np.uint8))
    y = g.op("QLinearMatMul", [q, s, zp, wq, g.const(np.float32(0.01)), g.const(np.uint8(128)),
                               g.const(np.float32(0.1)), g.const(np.uint8(128))])
    g.output(g.op("DequantizeLinear", [y, g.const(np.float32(0.1)), g.const(np.uint8(128))]))
    model = load_proto(g.model())
    ana = spa.analyze(model)
    assert [o["op"] for o in ana.opaque] == ["QLinearMatMul"]
    assert ana.opaque[0]["node"].startswith("QLinearMatMul")
    res = oracle(g.model())
    assert [res.analysis.groups[k].channels for k in res.plan.keep] == [16]
    names = [t.name for t in res.proto.graph.initializer if list(t.dims) == [16, 4]]
    assert names, "the weights the opaque node reads keep their shape"


@pytest.mark.parametrize("external_data", [False, True])
def test_int4_weights(tmp_path, external_data):
    """Packed 4-bit weights (opset 21): sliced through numpy's unpacked view and packed
    again; with external data they are read whole (packed types cannot be mapped)."""
    g = G(opset=21, seed=8)
    x = g.input(["B", 8])
    int4 = helper.tensor_dtype_to_np_dtype(TensorProto.INT4)
    wq = g.const(g.rng.integers(-8, 8, (8, 256)).astype(int4))
    w = g.op("DequantizeLinear", [wq, g.const(np.full(256, 0.1, np.float32))], axis=1)
    h = g.op("Relu", [g.op("MatMul", [x, w])])
    g.output(g.op("MatMul", [h, g.w(256, 4)]))
    proto = g.model()
    if not external_data:
        oracle(proto)
        return
    p = str(tmp_path / "m.onnx")
    onnx.save(proto, p, save_as_external_data=True, location="m.data", size_threshold=512)
    model = load(p)
    assert model.consts.ref(proto.graph.initializer[0].name) is None  # read, not mapped
    res = spa.prune(model, ratio=0.5, do_verify=True)
    assert res.verify.passed
    spa.save(res.proto, str(tmp_path / "out.onnx"), source=p)
    assert os.path.exists(tmp_path / "out.onnx")
