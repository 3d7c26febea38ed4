"""Property-based tests: random DAGs of the supported ops, random plans, and the oracle.

CI runs a bounded number of examples (SPA_HYPOTHESIS_EXAMPLES, default 25 per generator);
a long campaign is `SPA_HYPOTHESIS_EXAMPLES=2000 pytest tests/test_property.py`.
"""
from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings, strategies as st, HealthCheck

import spa
from models.synthetic import G, load_proto
from spa.rewrite.apply import check
from test_rules import attention

N = int(os.environ.get("SPA_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(max_examples=N, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def cnn_dag(draw) -> G:
    g = G(opset=draw(st.sampled_from([14, 17, 18])), seed=draw(st.integers(0, 9)))
    x = g.input(["N", 3, 6, 6])
    c0 = draw(st.sampled_from([4, 6, 8]))
    first = g.op("Relu", [g.conv(x, 3, c0)])
    tensors = [first]
    chans = {first: c0}          # channel count of every tensor we can build on
    for _ in range(draw(st.integers(2, 9))):
        t = draw(st.sampled_from(tensors))
        c = chans[t]
        kind = draw(st.sampled_from(["conv", "dw", "gconv", "bn", "act", "add", "mul", "concat",
                                     "split", "slice", "pool", "se", "gather"]))
        if kind == "conv":
            co = draw(st.sampled_from([4, 6, 8, 12]))
            y, cy = g.conv(t, c, co, k=draw(st.sampled_from([1, 3])),
                           bias=draw(st.booleans())), co
        elif kind == "dw":
            y, cy = g.conv(t, c, c, group=c), c
        elif kind == "gconv" and c % 2 == 0:
            y, cy = g.conv(t, c, c, group=2), c
        elif kind == "bn":
            y, cy = g.bn(t, c), c
        elif kind == "act":
            y, cy = g.op(draw(st.sampled_from(["Relu", "Sigmoid", "Tanh", "HardSwish"])), [t]), c
        elif kind == "add":
            same = [u for u in tensors if chans[u] == c and u != t]
            if not same:
                continue
            y, cy = g.op(draw(st.sampled_from(["Add", "Mul", "Max"])),
                         [t, draw(st.sampled_from(same))]), c
        elif kind == "mul":
            y, cy = g.op("Mul", [t, g.w(c, 1, 1)]), c
        elif kind == "concat":
            u = draw(st.sampled_from(tensors))
            y, cy = g.op("Concat", [t, u], axis=1), c + chans[u]
        elif kind == "split" and c >= 2:
            a = draw(st.integers(1, c - 1))
            y1, y2 = g.op("Split", [t, g.ints(a, c - a)], n_out=2, axis=1)
            tensors.append(y1)
            chans[y1] = a
            y, cy = y2, c - a
        elif kind == "slice" and c >= 2:
            a = draw(st.integers(0, c - 2))
            b = draw(st.integers(a + 1, c))
            y, cy = g.op("Slice", [t, g.ints(a), g.ints(b), g.ints(1)]), b - a
        elif kind == "pool":
            y, cy = g.op("MaxPool", [t], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), c
        elif kind == "se":
            s = g.op("Relu", [g.conv(g.op("GlobalAveragePool", [t]), c, 2, k=1)])
            y, cy = g.op("Mul", [t, g.op("Sigmoid", [g.conv(s, 2, c, k=1)])]), c
        elif kind == "gather" and c >= 2:
            idx = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
            y, cy = g.op("Gather", [t, g.ints(*idx)], axis=1), len(idx)
        else:
            continue
        tensors.append(y)
        chans[y] = cy
    last = tensors[-1]
    c = chans[last]
    if draw(st.booleans()):
        f = g.op("Flatten", [g.op("GlobalAveragePool", [last])])
    else:
        f = g.op("Flatten", [g.op("MaxPool", [last], kernel_shape=[2, 2], strides=[2, 2])])
        c = c * 9
    g.output(g.op("Gemm", [f, g.w(3, c), g.w(3)], transB=1))
    return g


def seq_dag(draw) -> G:
    g = G(opset=18, seed=draw(st.integers(0, 9)))
    d = draw(st.sampled_from([8, 12, 16]))
    x = g.input(["B", 5, 4])
    h = g.op("MatMul", [x, g.w(4, d)])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["mlp", "attn", "gqa", "ln", "swiglu"]))
        if kind == "mlp":
            f = draw(st.sampled_from([8, 16]))
            h = g.op("Add", [h, g.op("MatMul", [g.op("Relu", [g.op("MatMul", [h, g.w(d, f)])]),
                                                g.w(f, d)])])
        elif kind == "swiglu":
            f = draw(st.sampled_from([8, 16]))
            gate = g.op("Mul", [g.op("Sigmoid", [g.op("MatMul", [h, g.w(d, f)])]),
                                g.op("MatMul", [h, g.w(d, f)])])
            h = g.op("Add", [h, g.op("MatMul", [gate, g.w(f, d)])])
        elif kind in ("attn", "gqa"):
            heads = 4
            kv = 2 if kind == "gqa" else 4
            h = g.op("Add", [h, attention(g, h, d, heads, kv_heads=kv)])
        else:
            h = g.op("LayerNormalization", [h, g.w(d, positive=True), g.w(d)], axis=-1)
    g.output(g.op("MatMul", [h, g.w(d, 3)]))
    return g


def _check(g: G, ratio: float, seed: int, criterion: str):
    proto = g.model()
    model = load_proto(proto)
    res = spa.prune(model, ratio=ratio, criterion=criterion, seed=seed, do_verify=True)
    check(res.proto, proto)
    v = res.verify
    if v.exact:
        assert v.passed, f"oracle mismatch {v.max_rel_error}"
    else:
        assert np.isfinite(v.max_rel_error)
        exact = spa.prune(model, ratio=ratio, criterion=criterion, seed=seed, do_verify=True,
                          exact_only=True)
        assert exact.verify.passed
    return res


@SETTINGS
@given(st.data(), st.floats(0.1, 0.9), st.integers(0, 1000),
       st.sampled_from(["l1", "l2", "random"]))
def test_random_cnn_dags(data, ratio, seed, criterion):
    _check(cnn_dag(data.draw), ratio, seed, criterion)


@SETTINGS
@given(st.data(), st.floats(0.1, 0.9), st.integers(0, 1000),
       st.sampled_from(["l1", "l2", "random"]))
def test_random_sequence_dags(data, ratio, seed, criterion):
    _check(seq_dag(data.draw), ratio, seed, criterion)
