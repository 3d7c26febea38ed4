"""One small graph per rule family: the groups it must produce, and the oracle."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

import spa
from models.synthetic import G, load_proto, oracle


def groups_of(proto):
    return spa.analyze(load_proto(proto))


def conv_chain(dims=2, bias=True, opset=18):
    g = G(opset)
    x = g.input([1, 3] + [8] * dims)
    y = g.op("Relu", [g.conv(x, 3, 8, dims=dims, bias=bias)])
    y = g.conv(y, 8, 4, dims=dims, bias=bias)
    g.output(y)
    return g.model()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_chain(dims, bias):
    proto = conv_chain(dims, bias)
    ana = groups_of(proto)
    assert [gr.channels for gr in ana.groups] == [8]
    roles = {m["role"] for m in ana.groups[0].members if m["const"]}
    assert {"out", "in"} <= roles
    res = oracle(proto)
    assert res.plan.keep[0] == sorted(res.plan.keep[0]) and len(res.plan.keep[0]) == 4


@pytest.mark.parametrize("opset", [11, 13, 17, 21, 23])
def test_opsets(opset):
    res = oracle(conv_chain(2, True, opset=opset))
    assert res.proto.opset_import[0].version == opset


def test_conv_transpose_and_bn():
    g = G()
    x = g.input([1, 4, 6, 6])
    y = g.op("ConvTranspose", [x, g.w(4, 6, 2, 2), g.w(6)], strides=[2, 2])
    y = g.op("Relu", [g.bn(y, 6)])
    y = g.conv(y, 6, 2)
    g.output(y)
    ana = groups_of(g.model())
    assert [gr.channels for gr in ana.groups] == [6]
    oracle(g.model())


def test_depthwise_prunes_whole_groups():
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 8)])
    y = g.conv(y, 8, 8, group=8)           # depthwise: group attr must shrink
    y = g.conv(g.op("Relu", [y]), 8, 4)
    g.output(y)
    res = oracle(g.model())
    dw = [n for n in res.proto.graph.node if n.op_type == "Conv"][1]
    assert [a.i for a in dw.attribute if a.name == "group"] == [4]


def test_grouped_conv_keeps_equal_counts_per_group():
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    y = g.op("Relu", [g.conv(y, 16, 16, group=4)])
    y = g.conv(y, 16, 4)
    g.output(y)
    ana = groups_of(g.model())
    # 16 input channels = 4 groups x 4 per group; the per-group index is the channel
    assert sorted(gr.channels for gr in ana.groups) == [4, 4]
    res = oracle(g.model())
    w = {t.name: t for t in res.proto.graph.initializer}
    gconv = [n for n in res.proto.graph.node if n.op_type == "Conv"][1]
    assert [a.i for a in gconv.attribute if a.name == "group"] == [4]
    assert list(w[gconv.input[1]].dims)[:2] == [8, 2]


def test_depthwise_multiplier():
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 4)])
    y = g.op("Relu", [g.conv(y, 4, 8, group=4)])
    g.output(g.conv(y, 8, 2))
    res = oracle(g.model())
    assert res.plan.keep


@pytest.mark.parametrize("norm", ["InstanceNormalization", "PRelu"])
def test_per_channel_ops(norm):
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.conv(x, 3, 6)
    if norm == "PRelu":
        y = g.op("PRelu", [y, g.w(6, 1, 1)])
    else:
        y = g.op(norm, [y, g.w(6, positive=True), g.w(6)])
    g.output(g.conv(y, 6, 2))
    ana = groups_of(g.model())
    assert ana.groups[0].exact
    oracle(g.model())


@pytest.mark.parametrize("opset", [21])
def test_group_norm_is_approximate_and_keeps_groups(opset):
    g = G(opset=opset)
    x = g.input([1, 3, 8, 8])
    y = g.conv(x, 3, 8)
    c = 8 if opset >= 21 else 2   # scale/bias per channel (21) or per group (18)
    y = g.op("GroupNormalization", [y, g.w(c, positive=True), g.w(c)], num_groups=2)
    g.output(g.conv(y, 8, 2), shape=[1, 2, 8, 8])
    ana = groups_of(g.model())
    assert [gr.channels for gr in ana.groups] == [4] and not ana.groups[0].exact
    oracle(g.model(), exact_only=True, expect_pruned=False)
    oracle(g.model())


@pytest.mark.parametrize("scalar", [True, False])
def test_elementwise_broadcasting(scalar):
    g = G(opset=20)
    x = g.input([1, 3, 8, 8])
    y = g.conv(x, 3, 6)
    c = g.const(np.float32(0.5)) if scalar else g.w(6, 1, 1)
    for op in ("Add", "Mul", "Sub", "Max", "Min"):
        y = g.op(op, [y, c])
    y = g.op("Div", [y, g.w(6, 1, 1, positive=True)])
    for op in ("Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid",
               "HardSwish", "Erf", "LeakyRelu", "Mish", "Gelu", "Identity"):
        y = g.op(op, [y])
    y = g.op("Clip", [y, g.const(np.float32(-3)), g.const(np.float32(3))])
    y = g.op("Cast", [y], to=TensorProto.FLOAT)
    y = g.op("Dropout", [y])
    g.output(g.conv(y, 6, 2))
    oracle(g.model())


def test_se_gate():
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 8)])
    s = g.op("GlobalAveragePool", [y])
    s = g.op("Relu", [g.conv(s, 8, 4, k=1)])
    s = g.op("Sigmoid", [g.conv(s, 4, 8, k=1)])
    y = g.op("Mul", [y, s])
    g.output(g.conv(y, 8, 2))
    ana = groups_of(g.model())
    assert sorted(gr.channels for gr in ana.groups) == [4, 8]
    oracle(g.model())


def test_residual_stream_is_one_group():
    g = G()
    x = g.input([1, 3, 8, 8])
    h = g.conv(x, 3, 8)
    for _ in range(3):
        r = g.op("Relu", [g.bn(g.conv(h, 8, 8), 8)])
        h = g.op("Add", [h, g.conv(r, 8, 8)])
    g.output(g.op("Gemm", [g.op("Flatten", [g.op("GlobalAveragePool", [h])]), g.w(5, 8),
                           g.w(5)], transB=1))
    ana = groups_of(g.model())
    assert sorted(gr.channels for gr in ana.groups) == [8, 8, 8, 8]
    big = max(ana.groups, key=lambda gr: len(gr.members))
    assert sum(m["const"] for m in big.members) >= 8
    oracle(g.model())


def test_pooling_resize_pad():
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.conv(x, 3, 6)
    y = g.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = g.op("AveragePool", [y], kernel_shape=[2, 2])
    y = g.op("Resize", [y, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = g.op("Pad", [y, g.ints(0, 0, 1, 1, 0, 0, 1, 1)])
    y = g.op("GlobalMaxPool", [y])
    g.output(g.conv(y, 6, 2, k=1))
    oracle(g.model())


def test_resize_with_sizes_literal_is_rewritten():
    g = G()
    x = g.input([1, 3, 4, 4])
    y = g.conv(x, 3, 6)
    y = g.op("Resize", [y, "", "", g.ints(1, 6, 8, 8)], mode="nearest")
    g.output(g.conv(y, 6, 2))
    oracle(g.model())


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceL2"])
def test_reductions(op):
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.conv(x, 3, 6)
    y = g.op(op, [y, g.ints(2, 3)], keepdims=0)          # over space: channels pass
    g.output(g.op("Gemm", [y, g.w(4, 6), g.w(4)], transB=1))
    ana = groups_of(g.model())
    assert ana.groups[0].exact
    oracle(g.model())


def test_reduce_over_channels_exact_or_approximate():
    for op, exact in (("ReduceSum", True), ("ReduceMean", False)):
        g = G()
        x = g.input([1, 3, 8, 8])
        y = g.op("Relu", [g.conv(x, 3, 6)])
        s = g.op(op, [y, g.ints(1)], keepdims=1)
        g.output(g.conv(s, 1, 2, k=1))
        ana = groups_of(g.model())
        assert ana.groups[0].exact is exact
        oracle(g.model())


def test_concat_split_slice_gather():
    g = G()
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 4)])
    b = g.op("Relu", [g.conv(x, 3, 6)])
    c = g.op("Concat", [a, b], axis=1)                       # 10 channels
    s1, s2 = g.op("Split", [c, g.ints(3, 7)], n_out=2, axis=1)
    t = g.op("Slice", [s2, g.ints(1), g.ints(6), g.ints(1)])  # channels 1..5 of s2
    u = g.op("Gather", [s1, g.ints(2, 0)], axis=1)
    y = g.op("Concat", [t, u], axis=1)
    g.output(g.conv(y, 7, 2))
    ana = groups_of(g.model())
    assert sum(gr.channels for gr in ana.groups) == 10
    oracle(g.model())


def test_split_attribute_form_opset11():
    g = G(opset=11)
    x = g.input([1, 3, 8, 8])
    c = g.op("Relu", [g.conv(x, 3, 8)])
    s1, s2 = g.op("Split", [c], n_out=2, axis=1, split=[4, 4])
    g.output(g.op("Add", [g.conv(s1, 4, 2), g.conv(s2, 4, 2)]))
    oracle(g.model())


def test_split_equal_without_sizes():
    g = G(opset=18)
    x = g.input([1, 3, 8, 8])
    c = g.op("Relu", [g.conv(x, 3, 8)])
    s1, s2 = g.op("Split", [c], n_out=2, axis=1, num_outputs=2)
    g.output(g.op("Add", [g.conv(s1, 4, 2), g.conv(s2, 4, 2)]))
    oracle(g.model(), ratio=0.3)


def test_flatten_to_linear_prunes_feature_blocks():
    g = G()
    x = g.input([1, 3, 4, 4])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    f = g.op("Flatten", [y], axis=1)
    g.output(g.op("Gemm", [f, g.w(96, 5), g.w(5)]))
    ana = groups_of(g.model())
    grp = ana.groups[0]
    assert grp.channels == 6 and grp.unit == 16
    res = oracle(g.model())
    w = [t for t in res.proto.graph.initializer if list(t.dims)[1:] == [5]][0]
    assert w.dims[0] == 3 * 16


def test_nhwc_reshape_flatten():
    """jax/tf layout: Transpose to NHWC, then Reshape [N, H*W*C]: channel is innermost."""
    g = G()
    x = g.input(["N", 3, 4, 4])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    t = g.op("Transpose", [y], perm=[0, 2, 3, 1])
    f = g.op("Reshape", [t, g.ints(-1, 96)])
    g.output(g.op("MatMul", [f, g.w(96, 5)]))
    oracle(g.model())


def test_squeeze_unsqueeze_transpose_expand_tile():
    g = G()
    x = g.input([1, 3, 4, 4])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    p = g.op("GlobalAveragePool", [y])
    s = g.op("Squeeze", [p, g.ints(2, 3)])                    # [1, 6]
    u = g.op("Unsqueeze", [s, g.ints(2, 3)])                  # [1, 6, 1, 1]
    e = g.op("Expand", [u, g.ints(1, 6, 4, 4)])
    e = g.op("Tile", [e, g.ints(1, 1, 2, 2)])
    e = g.op("Transpose", [e], perm=[0, 1, 3, 2])
    g.output(g.conv(g.op("Add", [e, g.op("Tile", [y, g.ints(1, 1, 2, 2)])]), 6, 2))
    oracle(g.model())


@pytest.mark.parametrize("trans", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_transposes(trans):
    ta, tb = trans
    g = G()
    x = g.input([2, 5])
    a = g.op("Relu", [g.op("Gemm", [x, g.w(5, 8)])])
    if ta:
        a = g.op("Transpose", [a])
    b = g.w(3, 8) if tb else g.w(8, 3)
    g.output(g.op("Gemm", [a, b, g.w(3)], transA=ta, transB=tb))
    oracle(g.model())


def test_matmul_weight_behind_transpose():
    g = G()
    x = g.input(["B", 7, 5])
    h = g.op("Relu", [g.op("MatMul", [x, g.op("Transpose", [g.w(8, 5)])])])
    g.output(g.op("MatMul", [h, g.w(8, 3)]))
    ana = groups_of(g.model())
    assert [gr.channels for gr in ana.groups] == [8]
    oracle(g.model())


def test_embedding_gather_and_layernorm_is_approximate():
    g = G()
    ids = g.input(["B", 6], TensorProto.INT64)
    e = g.op("Gather", [g.w(11, 8), ids])
    e = g.op("LayerNormalization", [e, g.w(8, positive=True), g.w(8)], axis=-1)
    g.output(g.op("MatMul", [e, g.w(8, 3)]))
    ana = groups_of(g.model())
    assert [gr.channels for gr in ana.groups] == [8] and not ana.groups[0].exact
    res = oracle(g.model())
    assert res.verify.passed is None and res.verify.max_rel_error > 0


def test_decomposed_layernorm_and_rmsnorm_are_approximate():
    g = G()
    x = g.input(["B", 4, 5])
    h = g.op("MatMul", [x, g.w(5, 8)])
    mu = g.op("ReduceMean", [h, g.ints(-1)])
    d = g.op("Sub", [h, mu])
    var = g.op("ReduceMean", [g.op("Pow", [d, g.const(np.float32(2))]), g.ints(-1)])
    ln = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(1e-5))])])])
    ln = g.op("Add", [g.op("Mul", [ln, g.w(8)]), g.w(8)])
    ms = g.op("ReduceMean", [g.op("Mul", [ln, ln]), g.ints(-1)])
    rms = g.op("Mul", [ln, g.op("Reciprocal", [g.op("Sqrt", [ms])])])
    g.output(g.op("MatMul", [g.op("Mul", [rms, g.w(8)]), g.w(8, 3)]))
    ana = groups_of(g.model())
    assert len(ana.groups) == 1 and not ana.groups[0].exact
    oracle(g.model())


def test_softmax_over_channels_is_approximate():
    g = G()
    x = g.input([2, 5])
    h = g.op("Softmax", [g.op("MatMul", [x, g.w(5, 8)])], axis=-1)
    g.output(g.op("MatMul", [h, g.w(8, 3)]))
    assert not groups_of(g.model()).groups[0].exact


def attention(g, x, d, heads, kv_heads=None, t=4, shared_shape=False):
    """Hand-written (grouped-query) attention over x [B, T, D]."""
    kv_heads = kv_heads or heads
    dh = d // heads
    rep = heads // kv_heads
    q = g.op("MatMul", [x, g.w(d, d)])
    k = g.op("MatMul", [x, g.w(d, kv_heads * dh)])
    v = g.op("MatMul", [x, g.w(d, kv_heads * dh)])
    qs = g.ints(0, 0, heads, dh)
    q = g.op("Transpose", [g.op("Reshape", [q, qs])], perm=[0, 2, 1, 3])
    kvs = qs if shared_shape and rep == 1 else g.ints(0, 0, kv_heads, dh)
    k = g.op("Transpose", [g.op("Reshape", [k, kvs])], perm=[0, 2, 3, 1])
    v = g.op("Transpose", [g.op("Reshape", [v, kvs])], perm=[0, 2, 1, 3])
    if rep > 1:  # [B, kv, ...] -> [B, kv, rep, ...] -> [B, kv*rep, ...]
        k = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [k, g.ints(2)]),
                                             g.ints(1, 1, rep, 1, 1)]),
                             g.ints(0, heads, dh, -1)])
        v = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [v, g.ints(2)]),
                                             g.ints(1, 1, rep, 1, 1)]),
                             g.ints(0, heads, -1, dh)])
    s = g.op("Softmax", [g.op("Mul", [g.op("MatMul", [q, k]),
                                      g.const(np.float32(dh ** -0.5))])], axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [s, v])], perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.ints(0, 0, d)])
    return g.op("MatMul", [o, g.w(d, d)])


def test_multi_head_attention_prunes_whole_heads():
    g = G()
    x = g.input(["B", 4, 8])
    g.output(attention(g, x, 8, 4))
    ana = groups_of(g.model())
    heads = [gr for gr in ana.groups if gr.kind == "heads"]
    assert len(heads) == 1 and heads[0].channels == 4 and heads[0].unit == 2
    res = oracle(g.model())
    shapes = [t for t in res.proto.graph.initializer if list(t.dims) == [4]]
    assert any(list(np.frombuffer(t.raw_data, np.int64)) == [0, 0, 2, 2] for t in shapes)


def test_shared_reshape_constant_is_cloned():
    g = G()
    x = g.input(["B", 4, 8])
    g.output(attention(g, x, 8, 4, shared_shape=True))
    oracle(g.model())


def test_grouped_query_attention_keeps_q_heads_per_kv_head():
    g = G()
    x = g.input(["B", 4, 16])
    g.output(attention(g, x, 16, 8, kv_heads=2))
    ana = groups_of(g.model())
    heads = [gr for gr in ana.groups if gr.kind == "heads"]
    assert [gr.channels for gr in heads] == [2]
    res = oracle(g.model())
    # one kv head (and its 4 query heads) removed: q projection 16 -> 8 columns
    dims = sorted(tuple(t.dims) for t in res.proto.graph.initializer if len(t.dims) == 2)
    assert dims == [(8, 16), (16, 2), (16, 2), (16, 8)]


def test_dynamic_reshape_from_shape_follows_pruning():
    """Reshape target built at runtime from Shape(x) and constants (dynamic-batch exports)."""
    g = G()
    x = g.input(["B", 4, 8])
    q = g.op("MatMul", [x, g.w(8, 8)])
    sh = g.op("Shape", [q])
    b = g.op("Gather", [sh, g.const(np.array([0], np.int64))], axis=0)
    t = g.op("Gather", [sh, g.const(np.array([1], np.int64))], axis=0)
    tgt = g.op("Concat", [b, t, g.ints(4), g.ints(2)], axis=0)
    r = g.op("Reshape", [q, tgt])                          # [B, T, 4 heads, 2]
    r = g.op("Relu", [r])
    back = g.op("Reshape", [r, g.op("Concat", [b, t, g.ints(8)], axis=0)])
    g.output(g.op("MatMul", [back, g.w(8, 3)]))
    ana = groups_of(g.model())
    assert [gr.kind for gr in ana.groups] == ["heads"]
    oracle(g.model())


def test_opaque_ops_freeze_their_dims_but_not_the_rest():
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    z = g.op("LpNormalization", [y], axis=1)               # no rule: opaque
    h = g.op("Relu", [g.conv(z, 6, 5)])
    g.output(g.conv(h, 5, 2))
    ana = groups_of(g.model())
    assert [gr.channels for gr in ana.groups] == [5]
    assert [o["op"] for o in ana.opaque] == ["LpNormalization"]
    assert any("opaque" in r for f in ana.frozen for r in f["reasons"])
    oracle(g.model())


def test_lstm_is_opaque():
    g = G()
    x = g.input([5, 1, 4])
    h = g.op("Relu", [g.op("MatMul", [x, g.w(4, 6)])])
    y = g.op("LSTM", [h, g.w(1, 12, 6), g.w(1, 12, 3)], hidden_size=3)
    y = g.op("Squeeze", [y, g.ints(1)])
    z = g.op("Relu", [g.op("MatMul", [y, g.w(3, 7)])])
    g.output(g.op("MatMul", [z, g.w(7, 2)]))
    ana = groups_of(g.model())
    assert [gr.channels for gr in ana.groups] == [7]
    oracle(g.model())


def test_round_to():
    g = G()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    g.output(g.conv(y, 16, 2))
    res = spa.prune(load_proto(g.model()), ratio=0.7, round_to=4)
    assert len(res.plan.keep[0]) % 4 == 0 and len(res.plan.keep[0]) == 8


def test_quantize_dequantize_per_channel():
    g = G(opset=18)
    x = g.input([1, 3, 8, 8])
    wq = g.const(np.random.default_rng(0).integers(-100, 100, (6, 3, 3, 3)).astype(np.int8))
    w = g.op("DequantizeLinear", [wq, g.w(6, positive=True), g.const(np.zeros(6, np.int8))],
             axis=0)
    y = g.op("Relu", [g.op("Conv", [x, w], pads=[1, 1, 1, 1])])
    g.output(g.conv(y, 6, 2))
    oracle(g.model())


def test_scalar_shape_literals_keep_their_rank():
    """Legacy exports without constant folding: Reshape target = Concat(Unsqueeze(scalar))."""
    g = G()
    x = g.input(["B", 4, 8])
    q = g.op("MatMul", [x, g.w(8, 8)])
    sh = g.op("Shape", [q])
    b = g.op("Unsqueeze", [g.op("Gather", [sh, g.const(np.array(0, np.int64))]), g.ints(0)])
    t = g.op("Unsqueeze", [g.op("Gather", [sh, g.const(np.array(1, np.int64))]), g.ints(0)])
    heads = g.op("Unsqueeze", [g.const(np.array(4, np.int64)), g.ints(0)])
    dh = g.op("Unsqueeze", [g.const(np.array(2, np.int64)), g.ints(0)])
    r = g.op("Relu", [g.op("Reshape", [q, g.op("Concat", [b, t, heads, dh], axis=0)])])
    back = g.op("Reshape", [r, g.op("Concat", [b, t, g.ints(8)], axis=0)])
    g.output(g.op("MatMul", [back, g.w(8, 3)]))
    res = oracle(g.model())
    assert any(t.dims == [] for t in res.proto.graph.initializer if t.data_type == 7)


def test_computed_resize_scales_are_not_pruned():
    """Resize scales built by Concat from float constants are values, not channels."""
    g = G()
    x = g.input(["N", 3, 4, 4])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    scales = g.op("Concat", [g.const(np.ones(2, np.float32)),
                             g.const(np.full(2, 2.0, np.float32))], axis=0)
    y = g.op("Resize", [y, "", scales], mode="nearest")
    g.output(g.conv(y, 6, 2))
    ana = groups_of(g.model())
    assert [gr.channels for gr in ana.groups] == [6]
    oracle(g.model())
