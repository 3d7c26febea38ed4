"""The gradient engine (spa/engine): ONNX graphs evaluated in JAX must equal ONNX Runtime on
every op it implements and on every zoo model, its gradients must equal finite differences,
and gradient_stats must return the averages it promises."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

jax = pytest.importorskip("jax")

from models.registry import (FRAMEWORK_ZOO_BY_NAME, TORCH_ZOO, framework_zoo_entries,  # noqa: E402
                             rapidocr_entries, trained_entries)
from spa.engine import Engine, gradient_stats, supported_ops  # noqa: E402
from spa.errors import SpaError, UsageError  # noqa: E402
from spa.ir import load  # noqa: E402
from spa.ir.model import Model, from_proto  # noqa: E402
from spa.runtime import dummy_inputs, session_for  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from engine_cases import CASES, build  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
# Forward checks compile with XLA's cheap settings (about half the compile time; the
# numerics are those of the same ops, unfused).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def forward(eng, feeds):
    outs = jax.jit(eng.forward, compiler_options=FAST)(eng.params, feeds)
    return [np.asarray(o) for o in outs]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.nanmax(np.abs(a - b)) / (np.nanmax(np.abs(b)) + 1e-12))


def assert_close(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    if np.issubdtype(ref.dtype, np.floating):
        assert (np.isnan(ours) == np.isnan(ref)).all(), f"{what}: NaNs differ"
        err = rel_err(ours, ref)
        assert err <= TOL, f"{what}: max relative error {err:.3g} > {TOL}"
    else:
        assert (ours == ref).all(), f"{what}: {ours.ravel()[:8]} != {ref.ravel()[:8]}"


def _model(proto, loose):
    if not loose:
        return from_proto(proto)
    m = Model(proto=proto)  # the loader refuses deprecated / too new ops: index directly
    m.index()
    m.infer_shapes()
    return m


@pytest.fixture
def x64():
    """float64 in JAX for this test only (finite differences need it)."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


# ------------------------------------------------------------------------------------------
# every op, against ONNX Runtime

GROUPS = sorted({(c.opset, c.loose) for c in CASES})


# ops whose derivative is zero almost everywhere (steps) or whose outputs are not floats
NOT_DIFFERENTIABLE = {"Floor", "Ceil", "Round", "Sign", "Hardmax", "ArgMax", "ArgMin",
                      "QuantizeLinear", "IsNaN", "IsInf", "Shape", "Size", "Cast", "Mod",
                      "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "NonZero",
                      "Dropout", "Constant", "ConstantOfShape", "EyeLike", "Range"}
GROUP_IDS = [f"opset{o}{'-loose' if lo else ''}" for o, lo in GROUPS]


def _inputs_of(tag, names):
    return [k for k in names if k.startswith(tag) and k[len(tag):].startswith("_in")
            and k[len(tag) + 3:].isdigit()]


@pytest.mark.parametrize("opset,loose", GROUPS, ids=GROUP_IDS)
def test_ops_match_onnxruntime_and_finite_differences(opset, loose, x64):
    """Every op case against ONNX Runtime, and reverse mode through every differentiable
    one: the gradient with respect to its float inputs, projected on a random direction,
    equals the central difference of its randomly weighted outputs. The cases are
    independent nodes of one graph per opset, so one compiled function (outputs and VJP, in
    float64) checks them all, each on its own."""
    cases = [c for c in CASES if (c.opset, c.loose) == (opset, loose)]
    proto, feeds, outs = build(cases, opset)
    sess = session_for(proto)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    eng = Engine(_model(proto, loose), dtype="float64")
    differentiable = {c.name for c in cases if c.grad and c.op not in NOT_DIFFERENTIABLE}
    # differentiate with respect to the float inputs of the differentiable cases only (the
    # other cases stay out of the transposed graph: a smaller compilation)
    x0 = {k: v.astype(np.float64) for k, v in feeds.items() if v.dtype.kind == "f"
          and k.rsplit("_in", 1)[0] in differentiable}
    rest = {k: v for k, v in feeds.items() if k not in x0}

    def raw(x):
        return eng.forward(eng.params, {**x, **rest})

    def outputs_and_grad(x, ct):
        y, pullback = jax.vjp(raw, x)
        return y, pullback(ct)[0]
    f = jax.jit(outputs_and_grad, compiler_options=FAST)
    rng = np.random.default_rng(9)
    shapes = jax.eval_shape(raw, x0)
    weights = [rng.standard_normal(y.shape)
               if np.dtype(y.dtype).kind == "f" and tag in differentiable else None
               for (tag, _), y in zip(outs, shapes)]
    cts = [np.zeros(y.shape, y.dtype) if w is None else w for w, y in zip(weights, shapes)]
    y0, grad = f(x0, cts)
    bad = []
    for (tag, name), v in zip(outs, y0):
        try:
            assert_close(np.asarray(v), ref[name], f"{tag} ({name})")
        except AssertionError as exc:
            bad.append(str(exc))
    direction = {k: rng.standard_normal(v.shape) for k, v in x0.items()}
    eps = 1e-6
    yp, _ = f({k: v + eps * direction[k] for k, v in x0.items()}, cts)
    ym, _ = f({k: v - eps * direction[k] for k, v in x0.items()}, cts)
    for tag in dict.fromkeys(t for t, _ in outs):
        mine = _inputs_of(tag, x0)
        if tag not in differentiable or not mine:
            continue
        ana = sum(float(np.vdot(np.asarray(grad[k]), direction[k])) for k in mine)
        fd = sum(float(np.vdot(w, (np.asarray(a) - np.asarray(b)) / (2 * eps)))
                 for (t, _), w, a, b in zip(outs, weights, yp, ym) if t == tag and w is not None)
        if not np.isfinite(ana) or abs(ana - fd) > 1e-5 * max(1.0, abs(fd)):
            bad.append(f"{tag}: gradient {ana} vs finite difference {fd}")
    assert not bad, "\n".join(bad)


def test_integer_ops_in_float32_mode():
    """The default mode (float32, JAX's 32-bit integers): the op cases that produce or
    consume integers or booleans, against ONNX Runtime."""
    cases = [c for c in CASES if not c.loose and c.opset == 18 and c.op not in (
        "LSTM", "GRU", "RNN") and (c.op in NOT_DIFFERENTIABLE or any(
            a is not None and np.asarray(a).dtype.kind != "f" for a in c.inputs))]
    proto, feeds, outs = build(cases, 18)
    sess = session_for(proto)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    ours = forward(Engine(_model(proto, False)), feeds)
    bad = []
    for (tag, name), v in zip(outs, ours):
        try:
            assert_close(v, ref[name], f"{tag} ({name})")
        except AssertionError as exc:
            bad.append(str(exc))
    assert len(cases) > 40 and not bad, "\n".join(bad)


def test_every_op_is_tested_and_every_rule_has_an_implementation():
    from spa.ops import RULES
    tested = {c.key for c in CASES} | {"If", "Loop"}  # control flow: test_control_flow
    assert set(supported_ops()) <= tested, sorted(set(supported_ops()) - tested)
    assert set(RULES) <= set(supported_ops()), sorted(set(RULES) - set(supported_ops()))


def test_docs_op_list_is_fresh():
    from spa.engine.__main__ import DOC, current_block, op_block
    with open(DOC) as f:
        assert current_block(f.read()) == op_block(), \
            "docs/engine.md op list is stale: run python -m spa.engine"


def _graph(nodes, inputs, outputs, inits=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_control_flow():
    """If with a trace-time condition (shape-derived) and a Loop with a constant trip count
    are unrolled; both agree with ONNX Runtime."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    then = helper.make_graph([helper.make_node("Add", ["x", "one"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    two = helper.make_tensor("two", TensorProto.INT64, [], [2])
    trip = helper.make_tensor("trip", TensorProto.INT64, [], [3])
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "x"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["acc_out"], ["scan_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, None)])
    tru = helper.make_tensor("tru", TensorProto.BOOL, [], [True])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ReduceProd", ["s"], ["n"], keepdims=0),
             helper.make_node("Greater", ["n", "two"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
             helper.make_node("Loop", ["trip", "tru", "y"], ["z", "zs"], body=body)]
    proto = _graph(nodes, [x], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
                                helper.make_tensor_value_info("zs", TensorProto.FLOAT, None)],
                   [one, two, trip, tru])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    ref = session_for(proto).run(None, feeds)
    ours = Engine(from_proto(proto)).run(feeds)
    for a, b in zip(ours, ref):
        assert_close(a, b, "control flow")


def test_lstm_layout_matches_sequence_first():
    """ONNX Runtime has no batch-first (layout=1) LSTM; it must equal layout 0 transposed."""
    rng = np.random.default_rng(1)
    T, B, I, H = 4, 3, 5, 2
    w, r, b = (rng.standard_normal(s).astype(np.float32)
               for s in ((1, 4 * H, I), (1, 4 * H, H), (1, 8 * H)))
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    outs = []
    for layout in (0, 1):
        xin = helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                            [T, B, I] if layout == 0 else [B, T, I])
        node = helper.make_node("LSTM", ["x", "w", "r", "b"], ["y", "h", "c"], hidden_size=H,
                                layout=layout)
        proto = _graph([node], [xin], [helper.make_tensor_value_info(n, TensorProto.FLOAT,
                                                                     None)
                                       for n in "yhc"],
                       [onnx.numpy_helper.from_array(a, n) for a, n in ((w, "w"), (r, "r"),
                                                                         (b, "b"))])
        feed = x if layout == 0 else x.transpose(1, 0, 2)
        outs.append(Engine(from_proto(proto)).run({"x": feed}))
    (y0, h0, c0), (y1, h1, c1) = outs
    np.testing.assert_allclose(y1, y0.transpose(2, 0, 1, 3), rtol=1e-6)
    np.testing.assert_allclose(h1, h0.transpose(1, 0, 2), rtol=1e-6)
    np.testing.assert_allclose(c1, c0.transpose(1, 0, 2), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# every zoo model, against ONNX Runtime

# Every torch model through the dynamo exporter; the legacy (TorchScript) exports of two
# models whose shapes are computed at runtime only there (Shape -> Gather -> Unsqueeze ->
# Concat -> Reshape; Shape -> Div -> Cast channel-shuffle arithmetic), which the engine must
# evaluate at trace time (the dynamo graphs of vit_mha, gpt_gqa_tiny and lstm_classifier
# have such chains themselves). The other legacy graphs use the same ops as their dynamo
# twins (each checked on its own cases) and would double the compile time; all 46 exports
# were checked when the engine was written.
LEGACY_TOO = {"shufflenetv2_small", "bert_tiny"}
ZOO = [pytest.param(("torch", s.name, exp), id=f"{s.name}-{exp}")
       for s in TORCH_ZOO for exp in ("dynamo", "legacy")
       if exp == "dynamo" or s.name in LEGACY_TOO] + \
    [pytest.param(("framework", e.name, None), id=e.name) for e in framework_zoo_entries()] + \
    [pytest.param(("file", e.name, e.path), id=e.name) for e in trained_entries()] + \
    [pytest.param(("file", e.name, e.path), id=e.name) for e in rapidocr_entries()]


def _zoo_model(kind, name, where):
    if kind == "torch":
        pytest.importorskip("torch")
        from models.export import export_zoo_entry
        return load(str(export_zoo_entry(name, exporter=where)))
    if kind == "framework":  # the jax / keras / sklearn zoo and pretrained exports, cached
        spec = FRAMEWORK_ZOO_BY_NAME[name]
        if spec.framework == "jax":
            pytest.importorskip("jax2onnx")
            from models import jax_zoo
            return load(str(jax_zoo.export_cached(name)))
        if spec.framework == "keras":
            pytest.importorskip("tf2onnx")
            from models import keras_zoo
            return load(str(keras_zoo.cached_export(name)))
        if spec.module == "models.minilm":
            pytest.importorskip("torch")
            from models import minilm
            return load(str(minilm.cached_export()))
        if spec.framework == "sklearn":
            pytest.importorskip("skl2onnx")
            path = spec.onnx_path()
            if not path.is_file():  # (fitted in about a second)
                from models import sklearn_zoo
                sklearn_zoo.export(name, path)
            return load(str(path))
        pytest.fail(f"no loader for the {spec.framework} zoo entry {name}")
    return load(where)


@pytest.mark.parametrize("entry", ZOO)
def test_zoo_matches_onnxruntime(entry):
    m = _zoo_model(*entry)
    feeds = dummy_inputs(m, batch=2, seed=3)
    ref = session_for(m.proto).run(None, feeds)
    eng = Engine(m)
    assert eng.params, "no trainable parameters found"
    for name, a, b in zip(eng.output_names, forward(eng, feeds), ref):
        assert_close(a, b, f"{entry[1]} output {name}")


# ------------------------------------------------------------------------------------------
# gradients against finite differences (float64)

# Gradients with respect to the parameters of whole models (every op's own reverse mode is
# checked on its cases above; float64 convolutions are slow on XLA's CPU backend, so the
# CNNs are represented by their ops there).
GRAD_MODELS = [("torch", "bert_tiny", "dynamo"), ("torch", "lstm_classifier", "dynamo")]


@pytest.mark.parametrize("entry", GRAD_MODELS, ids=[e[1] for e in GRAD_MODELS])
def test_gradients_match_finite_differences(entry, x64):
    m = _zoo_model(*entry)
    eng = Engine(m, dtype="float64")
    assert len(eng.params) >= 4
    feeds = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
             for k, v in dummy_inputs(m, batch=2, seed=4).items()}
    rng = np.random.default_rng(5)
    # perturbed parameters, so that "self" (cross-entropy to the original argmax) has a
    # gradient of every part of the network
    params = {k: v + 0.05 * rng.standard_normal(v.shape) * (np.abs(v).mean() + 1e-3)
              for k, v in eng.params.items()}
    ref = [np.asarray(r) for r in jax.jit(eng.forward)(eng.params, feeds)]

    def f(p):
        return eng.loss(p, feeds, reference=ref, objective="self")
    loss = jax.jit(f, compiler_options=FAST)
    grad = jax.jit(jax.grad(f), compiler_options=FAST)(params)
    checked = 0
    for name in rng.choice(sorted(params), size=min(5, len(params)), replace=False):
        flat = params[name].reshape(-1)
        for idx in rng.choice(flat.size, size=min(2, flat.size), replace=False):
            eps = 1e-6 * max(1.0, abs(flat[idx]))
            plus, minus = dict(params), dict(params)
            for sign, d in ((1, plus), (-1, minus)):
                v = params[name].copy().reshape(-1)
                v[idx] += sign * eps
                d[name] = v.reshape(params[name].shape)
            fd = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
            g = float(np.asarray(grad[name]).reshape(-1)[idx])
            assert abs(g - fd) <= 1e-5 * max(1.0, abs(fd)), f"{name}[{idx}]: {g} vs {fd}"
            checked += 1
    assert checked >= 5


# ------------------------------------------------------------------------------------------
# objectives and gradient_stats on a small classifier


def _mlp(seed=0):
    """x[N, 6] -> Gemm(8) -> Relu -> Gemm(4) -> logits, plus a second, regression output."""
    rng = np.random.default_rng(seed)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 6)), ("b1", (8,)), ("w2", (4, 8)), ("b2", (4,)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], transB=1),
             helper.make_node("Tanh", ["a"], ["aux"])]
    proto = _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
                    helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 8])], inits)
    return from_proto(proto)


def test_softmax_classifier_uses_the_logits(x64):
    """An exported classifier that ends in Softmax: cross-entropy and distillation use the
    Softmax's input (a true cross-entropy), also from a reference of probabilities."""
    m = _mlp(5)
    g = m.proto.graph
    g.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    g.output[0].name = "probs"
    eng = Engine(from_proto(m.proto), dtype="float64")
    assert eng.class_output == 0
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 6))
    y = rng.integers(0, 4, size=4)
    p = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in eng.params.items()}
    logits, _ = _np_forward(p, x)
    ce = -_log_softmax(logits)[np.arange(4), y].mean()
    assert float(eng.loss(p, {"x": x}, y)) == pytest.approx(ce, rel=1e-10)
    probs_ref = eng.run({"x": x})  # probabilities of the initial parameters
    for obj in ("kd", "self"):
        assert float(eng.loss(p, {"x": x}, reference=probs_ref, objective=obj)) == \
            pytest.approx(float(eng.loss(p, {"x": x}, objective=obj)), rel=1e-9)


def _np_forward(p, x):
    a = np.maximum(x @ p["w1"].T + p["b1"], 0)
    return a @ p["w2"].T + p["b2"], np.tanh(a)


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_objectives_match_their_definitions(x64):
    eng = Engine(_mlp(), dtype="float64")
    assert sorted(eng.params) == ["b1", "b2", "w1", "w2"]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 6))
    y = rng.integers(0, 4, size=5)
    p = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in eng.params.items()}
    logits, aux = _np_forward(p, x)
    ref_logits, ref_aux = _np_forward(eng.params, x)
    ce = -_log_softmax(logits)[np.arange(5), y].mean()
    own = -_log_softmax(logits)[np.arange(5), ref_logits.argmax(1)].mean()
    mse = ((logits - ref_logits) ** 2).mean() + ((aux - ref_aux) ** 2).mean()
    t = 3.0
    pt = np.exp(_log_softmax(ref_logits / t))
    kd = (pt * (_log_softmax(ref_logits / t) - _log_softmax(logits / t))).sum(1).mean() * t * t
    feeds = {"x": x}
    assert float(eng.loss(p, feeds, y)) == pytest.approx(ce, rel=1e-10)
    assert float(eng.loss(p, feeds, y, objective="ce")) == pytest.approx(ce, rel=1e-10)
    assert float(eng.loss(p, feeds)) == pytest.approx(own, rel=1e-10)
    assert float(eng.loss(p, feeds, objective="mse")) == pytest.approx(mse, rel=1e-10)
    assert float(eng.loss(p, feeds, objective="kd", temperature=t)) == pytest.approx(kd,
                                                                                      rel=1e-10)
    ref = eng.run(feeds)  # an explicit reference equals the default one
    assert float(eng.loss(p, feeds, reference=ref, objective="mse")) == pytest.approx(mse)
    with pytest.raises(UsageError, match="labels"):
        eng.loss(p, feeds, objective="ce")
    with pytest.raises(UsageError, match="unknown objective"):
        eng.loss(p, feeds, objective="nope")


def test_gradient_stats_averages(x64):
    eng = Engine(_mlp(1), dtype="float64")
    rng = np.random.default_rng(3)
    n = 7  # not a multiple of the batch size: the last chunk is padded / shorter
    x = rng.standard_normal((n, 6))
    y = rng.integers(0, 4, size=n)
    batch_loss = jax.jit(lambda p, xb, yb: eng.loss(p, {"x": xb}, yb))
    batch_grad = jax.jit(jax.grad(lambda p, xb, yb: eng.loss(p, {"x": xb}, yb)))
    p0 = {k: np.asarray(v) for k, v in eng.params.items()}
    g = batch_grad(p0, x, y)
    for per_sample in (True, False):
        st = gradient_stats(eng, {"x": x}, y, batch_size=3, hvp="hg", per_sample=per_sample)
        assert st.samples == n and st.objective == "ce"
        assert st.fisher_mode == ("per-sample" if per_sample else "micro-batch")
        assert st.loss == pytest.approx(float(batch_loss(p0, x, y)), rel=1e-10)
        for k in p0:
            np.testing.assert_allclose(st.grad[k], g[k], rtol=1e-9, atol=1e-12)
            assert (st.fisher[k] >= 0).all()
        if per_sample:  # exact: the mean of the squared per-sample gradients
            per = [batch_grad(p0, x[i:i + 1], y[i:i + 1]) for i in range(n)]
            for k in p0:
                np.testing.assert_allclose(st.fisher[k], np.mean([q[k] ** 2 for q in per], 0),
                                           rtol=1e-9, atol=1e-12)
        else:  # micro-batches of 3, 3, 1: sum_b (B_b / n) * B_b * g_b^2
            parts = [(0, 3), (3, 6), (6, 7)]
            gb = [batch_grad(p0, x[s:e], y[s:e]) for s, e in parts]
            for k in p0:
                want = sum((e - s) ** 2 / n * q[k] ** 2 for (s, e), q in zip(parts, gb))
                np.testing.assert_allclose(st.fisher[k], want, rtol=1e-9, atol=1e-12)
        # H·g against the directional derivative of the gradient along g
        eps = 1e-6
        plus = {k: p0[k] + eps * st.grad[k] for k in p0}
        minus = {k: p0[k] - eps * st.grad[k] for k in p0}
        gp, gm = batch_grad(plus, x, y), batch_grad(minus, x, y)
        for k in p0:
            fd = (np.asarray(gp[k]) - np.asarray(gm[k])) / (2 * eps)
            np.testing.assert_allclose(st.hg[k], fd, rtol=1e-5, atol=1e-8)
        assert any(np.abs(st.hg[k]).max() > 0 for k in p0)


def test_gradient_stats_reference_objectives(x64):
    """mse / kd against the initial parameters' outputs, at moved parameters: the mean
    gradient equals the gradient of the mean loss, per-sample Fisher or not."""
    eng = Engine(_mlp(2), dtype="float64")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6))
    p = {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in eng.params.items()}
    for objective, per_sample in (("mse", True), ("kd", False)):
        st = gradient_stats(eng, {"x": x}, params=p, objective=objective, batch_size=2,
                            per_sample=per_sample)
        g = jax.jit(jax.grad(lambda q: eng.loss(q, {"x": x}, objective=objective)))(p)
        assert st.objective == objective and st.loss > 0
        for k in p:
            np.testing.assert_allclose(st.grad[k], g[k], rtol=1e-9, atol=1e-12)


def test_sampled_fisher(x64):
    """objective="sampled": the true Fisher. For a classifier the Fisher of the last bias
    is E_y[(p - e_y)²] = p(1 - p); for a non-classifier it is informative where the
    empirical Fisher of mse at the reference point is zero."""
    eng = Engine(_mlp(3), dtype="float64")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((400, 6))
    st = gradient_stats(eng, {"x": x}, objective="sampled", batch_size=100)
    assert st.objective == "sampled" and st.fisher_mode == "per-sample"
    z, _ = _np_forward(eng.params, x)
    prob = np.exp(_log_softmax(z))
    want = (prob * (1 - prob)).mean(0)
    np.testing.assert_allclose(st.fisher["b2"], want, rtol=0.2)
    again = gradient_stats(eng, {"x": x}, objective="sampled", batch_size=100)
    np.testing.assert_array_equal(again.fisher["b2"], st.fisher["b2"])  # seeded

    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    proto = _graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
                   [onnx.numpy_helper.from_array(w, "w")])
    conv = Engine(from_proto(proto), dtype="float64")
    xs = {"x": rng.standard_normal((6, 2, 4, 4))}
    assert not np.any(gradient_stats(conv, xs).fisher["w"])  # mse to itself: zero
    st = gradient_stats(conv, xs, objective="sampled", batch_size=4)
    assert (st.fisher["w"] >= 0).all() and (st.fisher["w"] > 0).all()


def test_gradient_stats_on_a_zoo_model():
    """float32 on a real model: self-distillation objective without labels, per-sample
    Fisher, shapes and signs."""
    m = _zoo_model("torch", "plain_cnn", "dynamo")
    eng = Engine(m)
    x = dummy_inputs(m, batch=6, seed=7)
    st = gradient_stats(eng, x, batch_size=4, max_samples=5)
    assert st.samples == 5 and st.objective == "self" and st.fisher_mode == "per-sample"
    assert st.hg is None and np.isfinite(st.loss) and st.loss > 0
    for k, v in eng.params.items():
        assert st.grad[k].shape == v.shape and st.fisher[k].shape == v.shape
        assert (st.fisher[k] >= 0).all() and np.isfinite(st.grad[k]).all()
        # Cauchy–Schwarz: the squared mean is at most the mean square
        assert (st.grad[k] ** 2 <= st.fisher[k] * (1 + 1e-3) + 1e-12).all()
    assert sum(float(np.abs(v).sum()) for v in st.grad.values()) > 0


# ------------------------------------------------------------------------------------------
# errors and the lazy import


def test_unsupported_op_names_node_op_and_file(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    proto = _graph([helper.make_node("Relu", ["x"], ["r"], name="act"),
                    helper.make_node("Softmax", ["r"], ["s"], name="sm"),
                    helper.make_node("Custom", ["s"], ["y"], name="mystery", domain="acme")],
                   [x], [y])
    proto.opset_import.append(helper.make_opsetid("acme", 1))
    path = tmp_path / "odd.onnx"
    onnx.save(proto, path)
    with pytest.raises(SpaError) as err:
        Engine(str(path))
    msg = str(err.value)
    assert "odd.onnx" in msg and "mystery" in msg and "Custom" in msg and "acme" in msg


def test_runtime_shape_operand_is_a_clear_error():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    proto = _graph([helper.make_node("Reshape", ["x", "s"], ["y"], name="rs")], [x, s],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    eng = Engine(from_proto(proto))
    with pytest.raises(SpaError, match="rs.*trace time"):
        eng.run({"x": np.ones((2, 3), np.float32), "s": np.array([3, 2])})


def test_bad_trainable_and_feeds():
    m = _mlp()
    with pytest.raises(UsageError, match="not an initializer"):
        Engine(m, trainable=["nope"])
    eng = Engine(m, trainable=["w2"])
    assert list(eng.params) == ["w2"]
    with pytest.raises(UsageError, match="missing graph input"):
        eng.run({})


def test_import_spa_does_not_import_jax():
    code = ("import sys, spa, spa.engine, spa.engine.core, spa.engine.stats; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_missing_jax_is_a_usage_error(monkeypatch):
    from spa.engine import _jax
    monkeypatch.setattr(_jax.J, "jax", None)
    monkeypatch.setitem(sys.modules, "jax", None)  # import jax -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'spa-prune\[jax\]'"):
        Engine(_mlp())
