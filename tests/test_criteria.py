"""Importance criteria: the formulas by hand on tiny graphs, the shared member -> channel
mapping (concat offsets, flatten blocks, head blocks, merged "-2" elements) against the
rewrite's own removal masks, aggregation and normalisation semantics, every criterion
through the oracle, and the errors when data is missing."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import spa
from models.synthetic import G, load_proto, oracle
from spa.analysis import analyze
from spa.criteria import (AGGREGATIONS, CRITERIA, DATA_CRITERIA, REGISTRY, evaluate,
                          importance, score)
from spa.criteria.aggregate import aggregate, member_pairs, normalize, slice_sums
from spa.errors import UsageError

DATA_FREE = [c for c in REGISTRY if not REGISTRY[c].needs]
GRADIENT = [c for c in REGISTRY if REGISTRY[c].needs]
ZOO = os.path.join(os.path.dirname(__file__), "..", ".cache", "zoo")


def spa_cli(*args):
    p = subprocess.run([sys.executable, "-m", "spa", *map(str, args)], capture_output=True,
                       text=True)
    return p.returncode, p.stdout, p.stderr


# ------------------------------------------------------------------------------------------
# tiny graphs whose scores are computed by hand


def two_convs():
    """x -> Conv(W1, b1) -> BN(γ, β, μ, σ²) -> Relu -> Conv(W2, b2): one group of 4."""
    g = G(seed=1)
    x = g.input([1, 2, 5, 5], name="x")
    w1, b1 = g.w(4, 2, 3, 3), g.w(4)
    h = g.op("Conv", [x, w1, b1], pads=[1, 1, 1, 1])
    h = g.op("Relu", [g.bn(h, 4)])
    w2 = g.w(3, 4, 3, 3)
    g.output(g.op("Conv", [h, w2, g.w(3)], pads=[1, 1, 1, 1]))
    model = load_proto(g.model())
    bn = next(n for n in model.nodes if n.op_type == "BatchNormalization")
    c = model.consts
    members = {"W1": c[w1], "b1": c[b1], "W2^T": c[w2].transpose(1, 0, 2, 3)}
    members.update({k: c[t] for k, t in zip(("gamma", "beta", "mean", "var"), bn.input[1:])})
    return model, members


def per_member(members, f):
    """Each member's slice score per channel, rows = members in graph order."""
    return np.array([[f(np.asarray(m[ch], np.float64)) for ch in range(4)]
                     for m in members.values()])


def dist_sums(rows):
    v = np.array([np.ravel(r) for r in rows], np.float64)
    return np.array([sum(np.linalg.norm(a - b) for b in v) for a in v])


def test_magnitude_formulas_by_hand():
    model, m = two_convs()
    ana = analyze(model)
    assert [g.channels for g in ana.groups] == [4]
    l1 = per_member(m, lambda s: np.abs(s).sum())
    sq = per_member(m, lambda s: np.square(s).sum())
    np.testing.assert_allclose(score(ana, "l1")[0], l1.sum(0), rtol=1e-6)
    np.testing.assert_allclose(score(ana, "l2")[0], np.sqrt(sq.sum(0)), rtol=1e-6)
    np.testing.assert_allclose(score(ana, "bn_scale")[0], np.abs(m["gamma"]), rtol=1e-6)
    s = sq.sum(0)
    lamp = np.array([s[c] / s[s >= s[c]].sum() for c in range(4)])
    np.testing.assert_allclose(score(ana, "lamp")[0], lamp, rtol=1e-6)
    fpgm = dist_sums(m["W1"]) + dist_sums(m["W2^T"])  # matrices only, not vectors
    np.testing.assert_allclose(score(ana, "fpgm")[0], fpgm, rtol=1e-6)
    rnd = np.random.default_rng(7).random(4)
    np.testing.assert_array_equal(score(ana, "random", seed=7)[0], rnd)


def test_aggregations_by_hand():
    model, m = two_convs()
    ana = analyze(model)
    l1 = per_member(m, lambda s: np.abs(s).sum())  # 7 members x 4 channels
    want = {"sum": l1.sum(0), "mean": l1.mean(0), "max": l1.max(0), "prod": l1.prod(0),
            "first": l1[0]}  # first: the producing conv's filters
    for how in AGGREGATIONS:
        np.testing.assert_allclose(score(ana, "l1", aggregate=how)[0], want[how], rtol=1e-6,
                                   err_msg=how)
    sq = per_member(m, lambda s: np.square(s).sum())
    np.testing.assert_allclose(score(ana, "l2", aggregate="max")[0], np.sqrt(sq.max(0)),
                               rtol=1e-6)
    with pytest.raises(UsageError, match="unknown aggregation"):
        score(ana, "l1", aggregate="median")


def stats_for(model, seed=0):
    """Made-up gradient statistics: the formulas do not care where they come from."""
    rng = np.random.default_rng(seed)
    fake = {n: rng.standard_normal(a.shape) for n, a in model.consts.items()
            if np.issubdtype(a.dtype, np.floating) and a.ndim}
    fisher = {n: np.square(v) + 0.1 for n, v in fake.items()}
    hg = {n: rng.standard_normal(v.shape) for n, v in fake.items()}
    return SimpleNamespace(grad=fake, fisher=fisher, hg=hg, samples=8, loss=0.0)


def test_gradient_formulas_by_hand():
    model, m = two_convs()
    ana = analyze(model)
    st = stats_for(model)
    bn = next(n for n in model.nodes if n.op_type == "BatchNormalization")
    conv1, conv2 = [n for n in model.nodes if n.op_type == "Conv"]
    names = {"W1": conv1.input[1], "b1": conv1.input[2], "W2^T": conv2.input[1]}
    names.update(zip(("gamma", "beta", "mean", "var"), bn.input[1:]))

    def stat(kind, k):
        a = getattr(st, kind)[names[k]]
        return a.transpose(1, 0, 2, 3) if k == "W2^T" else a

    def slices(f):
        return np.array([[f(np.asarray(m[k][c], np.float64), stat("grad", k)[c],
                            stat("fisher", k)[c], stat("hg", k)[c]) for c in range(4)]
                         for k in m])
    want = {
        "taylor": slices(lambda w, g, f, h: abs((w * g).sum())).sum(0),
        "snip": slices(lambda w, g, f, h: np.abs(w * g).sum()).sum(0),
        "hessian": slices(lambda w, g, f, h: 0.5 * (f * w * w).sum()).sum(0),
        "grasp": slices(lambda w, g, f, h: (w * h).sum()).sum(0),
        "crop": slices(lambda w, g, f, h: np.abs(w * h).sum()).sum(0),
    }
    for crit, expected in want.items():
        got = score(ana, crit, stats=st)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=crit)


def concat_model():
    """Two convs (3 and 5 channels) concatenated into a third: one group of 8 channels, the
    second conv's channels are the third one's input slices from offset 3 on."""
    g = G(seed=2)
    x = g.input([1, 2, 4, 4], name="x")
    wa, wb, w3 = g.w(3, 2, 1, 1), g.w(5, 2, 1, 1), g.w(2, 8, 1, 1)
    a = g.op("Relu", [g.op("Conv", [x, wa])])
    b = g.op("Relu", [g.op("Conv", [x, wb])])
    g.output(g.op("Conv", [g.op("Concat", [a, b], axis=1), w3]))
    return load_proto(g.model()), (wa, wb, w3)


def test_concat_offsets_by_hand():
    model, (wa, wb, w3) = concat_model()
    ana = analyze(model)
    c = model.consts
    assert [g.channels for g in ana.groups] == [8]
    want = [np.abs(c[wa][k]).sum() + np.abs(c[w3][:, k]).sum() for k in range(3)]
    want += [np.abs(c[wb][k]).sum() + np.abs(c[w3][:, 3 + k]).sum() for k in range(5)]
    np.testing.assert_allclose(score(ana, "l1")[0], want, rtol=1e-6)
    # FPGM compares slices within each member: a's 3 filters, b's 5, W3's 8 input slices
    cols = dist_sums(c[w3].transpose(1, 0, 2, 3))
    want = np.concatenate([dist_sums(c[wa]), dist_sums(c[wb])]) + cols
    np.testing.assert_allclose(score(ana, "fpgm")[0], want, rtol=1e-6)
    # "first": the filter of the conv that produces the channel (a or b), not W3
    first = [np.abs(c[wa][k]).sum() for k in range(3)] + \
        [np.abs(c[wb][k]).sum() for k in range(5)]
    np.testing.assert_allclose(score(ana, "l1", aggregate="first")[0], first, rtol=1e-6)


def test_flatten_blocks_by_hand():
    """Conv (3 channels of 4x4) -> Flatten -> Gemm: each channel owns 16 rows of the Gemm
    weight; FPGM compares those 16-row blocks as one vector."""
    g = G(seed=3)
    x = g.input([1, 2, 4, 4], name="x")
    wc, bc, wf = g.w(3, 2, 3, 3), g.w(3), g.w(48, 5)
    h = g.op("Relu", [g.op("Conv", [x, wc, bc], pads=[1, 1, 1, 1])])
    g.output(g.op("Gemm", [g.op("Flatten", [h]), wf, g.w(5)]))
    model = load_proto(g.model())
    ana = analyze(model)
    c = model.consts
    blocks = [c[wf][16 * k:16 * (k + 1)] for k in range(3)]
    want = [np.abs(c[wc][k]).sum() + abs(c[bc][k]) + np.abs(blocks[k]).sum() for k in range(3)]
    np.testing.assert_allclose(score(ana, "l1")[0], want, rtol=1e-6)
    np.testing.assert_allclose(score(ana, "fpgm")[0],
                               dist_sums(c[wc]) + dist_sums(blocks), rtol=1e-6)


def test_member_pairs_merged_elements():
    """An element derived from several channels (-2) counts towards each of them."""
    key = ("t", 0)
    stub = SimpleNamespace(dim_channels=lambda k: np.array([0, -2, 1, -1]),
                           coupler=SimpleNamespace(base=[0], dims={key: 0}),
                           label=np.array([0, 5, 1, 2]), multi={5: [0, 1]})
    pairs = member_pairs(stub, key)
    chans, vals = slice_sums(pairs, np.array([1.0, 10.0, 100.0, 1000.0]))
    assert chans.tolist() == [0, 1] and vals.tolist() == [11.0, 110.0]


def test_aggregate_and_normalize_semantics():
    members = [(np.array([0, 1]), np.array([2.0, 3.0])),
               (np.array([1, 2]), np.array([5.0, 7.0]))]
    assert aggregate(4, members, "sum").tolist() == [2, 8, 7, 0]
    assert aggregate(4, members, "mean").tolist() == [2, 4, 7, 0]
    assert aggregate(4, members, "max").tolist() == [2, 5, 7, 0]
    assert aggregate(4, members, "prod").tolist() == [2, 15, 7, 0]
    assert aggregate(4, members, "first").tolist() == [2, 3, 7, 0]
    s = np.array([1.0, 3.0, 2.0, 4.0])
    np.testing.assert_allclose(normalize(s, "mean"), s / 2.5)
    np.testing.assert_allclose(normalize(s, "max"), s / 4)
    np.testing.assert_allclose(normalize(s, "sum"), s / 10)
    np.testing.assert_allclose(normalize(s, "standardization"), (s - 2.5) / s.std())
    np.testing.assert_allclose(normalize(s, "lamp"), [1 / 10, 3 / 7, 2 / 9, 1.0])
    model, _ = two_convs()
    ana = analyze(model)
    raw = score(ana, "l1")[0]
    np.testing.assert_allclose(importance(ana, "l1", normalization="max")[0], raw / raw.max())


# ------------------------------------------------------------------------------------------
# the shared mapping against an independent path: the rewrite's removal masks


def zoo(name):
    path = os.path.join(ZOO, f"{name}.dynamo.onnx")
    if not os.path.exists(path):
        pytest.importorskip("torch")
        from models.export import export_zoo_entry
        path = str(export_zoo_entry(name, exporter="dynamo"))
    return spa.load(path)


@pytest.fixture(scope="module")
def zoo_models():
    cache = {}

    def get(name):
        if name not in cache:
            m = zoo(name)
            cache[name] = (m, analyze(m))
        return cache[name]
    return get


def l1_by_removal(ana, chans):
    """Σ|w| over everything that disappears when channel c alone is removed."""
    out = []
    for c in chans:
        total = 0.0
        for key in ana.member_keys():
            arr = ana.model.consts.get(key[0])
            if arr is None or not np.issubdtype(arr.dtype, np.floating) or not arr.ndim:
                continue
            gone = ana.removed_mask(key, np.array([c]))
            if gone is not None and gone.any():
                total += float(np.abs(np.take(arr, np.nonzero(gone)[0], axis=key[1]))
                               .sum(dtype=np.float64))
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("name", ["densenet_bc_small", "gpt_gqa_tiny", "bert_tiny"])
def test_mapping_matches_removal_masks(zoo_models, name):
    """Concat offsets (densenet), grouped-query heads (gpt) and head blocks (bert): every
    channel's l1 is the magnitude of exactly what the rewrite removes with it."""
    model, ana = zoo_models(name)
    if name != "densenet_bc_small":
        assert any(g.kind == "heads" for g in ana.groups)
    l1 = score(ana, "l1")
    for g, ch in enumerate(ana.group_chans):
        pick = sorted({0, len(ch) // 2, len(ch) - 1})
        np.testing.assert_allclose(l1[g][pick], l1_by_removal(ana, ch[pick]), rtol=1e-6,
                                   err_msg=f"group {g}")


# ------------------------------------------------------------------------------------------
# every criterion: finite scores of the right shapes, plans that pass the oracle


@pytest.mark.parametrize("name", ["densenet_bc_small", "bert_tiny"])
def test_every_criterion_on_zoo_models(zoo_models, name):
    model, ana = zoo_models(name)
    st = stats_for(model)
    for crit in list(REGISTRY):
        for how in AGGREGATIONS:
            s = score(ana, crit, stats=st, aggregate=how)
            assert [len(x) for x in s] == [g.channels for g in ana.groups], crit
            assert all(np.isfinite(x).all() for x in s), (crit, how)


@pytest.mark.parametrize("crit", DATA_FREE)
def test_data_free_criteria_pass_the_oracle(crit):
    g = G(seed=4)
    x = g.input([1, 3, 8, 8], name="x")
    h = g.op("Relu", [g.bn(g.conv(x, 3, 8), 8)])
    a = g.op("Relu", [g.bn(g.conv(h, 8, 6), 6)])
    b = g.op("Relu", [g.conv(h, 8, 4)])
    h = g.op("Concat", [a, b], axis=1)
    g.output(g.op("Gemm", [g.op("Flatten", [h]), g.w(640, 5), g.w(5)]))
    res = oracle(g.model(), criterion=crit, ratio=0.5)
    assert res.plan.criterion == crit and res.plan.options["aggregate"] == "sum"


def test_zoo_global_target_with_criteria(zoo_models):
    """Global selection to half the FLOPs on a concat model, with several criteria and
    aggregations, through the oracle."""
    model, _ = zoo_models("densenet_bc_small")
    for crit, how in (("fpgm", "mean"), ("bn_scale", "max"), ("lamp", "sum")):
        res = spa.prune(model, criterion=crit, aggregate=how, target="flops:0.5",
                        select="global", do_verify=True)
        assert res.verify.passed and res.after["macs"] <= 0.5 * res.before["macs"]
        assert res.plan.options["normalize"] == ("none" if crit == "lamp" else "mean")


def test_bn_scale_falls_back_to_l1_without_norm_layers():
    g = G(seed=5)
    x = g.input([1, 3, 6, 6], name="x")
    h = g.op("Relu", [g.bn(g.conv(x, 3, 6), 6)])   # group 0: has a BatchNorm
    h = g.op("Relu", [g.conv(h, 6, 5)])             # group 1: none
    g.output(g.conv(h, 5, 2))
    model = load_proto(g.model())
    ana = analyze(model)
    scores, notes = evaluate(ana, "bn_scale")
    bn = next(n for n in model.nodes if n.op_type == "BatchNormalization")
    np.testing.assert_allclose(scores[0], np.abs(model.consts[bn.input[1]]), rtol=1e-6)
    np.testing.assert_allclose(scores[1], score(ana, "l1")[1])
    assert notes and "l1" in notes[0] and "1" in notes[0]
    g = G(seed=6)
    x = g.input([1, 3, 6, 6], name="x")
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 4)]), 4, 2))
    with pytest.raises(UsageError, match="bn_scale"):
        score(analyze(load_proto(g.model())), "bn_scale")


# ------------------------------------------------------------------------------------------
# data requirements


def test_gradient_criteria_need_data():
    model, _ = two_convs()
    ana = analyze(model)
    for crit in GRADIENT:
        with pytest.raises(UsageError, match=crit):
            spa.prune(model, criterion=crit)
        with pytest.raises(UsageError, match=crit):
            score(ana, crit)
    with pytest.raises(UsageError, match="needs no data"):
        spa.prune(model, criterion="l1", calib="synthetic")
    assert set(GRADIENT) | {"obspa"} == set(DATA_CRITERIA)
    assert set(CRITERIA) == set(REGISTRY) | {"obspa"}


def test_cli_criteria_options(tmp_path):
    model, _ = two_convs()
    path = tmp_path / "m.onnx"
    onnx.save(model.proto, path)
    rc, out, err = spa_cli("prune", path, "-o", tmp_path / "a.onnx", "--criterion", "fpgm",
                           "--aggregate", "max", "--verify", "--plan-out", tmp_path / "p.json")
    assert rc == 0 and "PASS" in out, err
    assert '"aggregate": "max"' in (tmp_path / "p.json").read_text()
    rc, _, err = spa_cli("prune", path, "-o", tmp_path / "b.onnx", "--criterion", "taylor")
    assert rc == 2 and "taylor" in err and "--calib" in err
    assert not (tmp_path / "b.onnx").exists()
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 2, 5, 5), np.float32))
    with pytest.raises(UsageError, match="--calib-samples"):
        spa.prune(model, criterion="hessian", calib=str(tmp_path / "c.npz"), calib_samples=0)
    with pytest.raises(UsageError, match="aggregation"):
        spa.prune(model, aggregate="median")


# ------------------------------------------------------------------------------------------
# gradient criteria with the JAX engine


def engine():
    pytest.importorskip("jax")
    try:
        from spa.engine import Engine, gradient_stats  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"spa.engine not available: {exc}")


def test_gradient_criteria_with_the_engine(tmp_path):
    engine()
    g = G(seed=8)
    x = g.input(["N", 3, 8, 8], name="x")
    h = g.op("Relu", [g.bn(g.conv(x, 3, 8), 8)])
    h = g.op("Relu", [g.bn(g.conv(h, 8, 6), 6)])
    g.output(g.op("Gemm", [g.op("Flatten", [g.op("GlobalAveragePool", [h])]), g.w(6, 4)]))
    proto = g.model()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((24, 3, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 4, 24))
    model = load_proto(proto)
    res = spa.prune(model, criterion="hessian", calib=str(tmp_path / "c.npz"), ratio=0.5,
                    do_verify=True, calib_samples=16)
    assert res.verify.passed and res.plan.options["calib_samples"] == 16
    assert res.plan.options["objective"] == "ce"  # the labels were used
    # one set of statistics for all gradient criteria
    from spa.activations import load_calibration
    from spa.criteria.gradient import compute_stats
    from spa.rewrite.apply import apply_plan
    from spa.verify import verify
    ana = analyze(model)
    st = compute_stats(model, load_calibration(str(tmp_path / "c.npz"), model),
                       ("grad", "fisher", "hg"))
    assert st.samples == 24
    # the statistics are keyed like the members: a finite difference of the loss in ORT
    # along one weight of the Gemm agrees with the engine's gradient for that name
    import onnxruntime as ort
    data = np.load(tmp_path / "c.npz")
    wname = next(n for n in model.nodes if n.op_type == "Gemm").input[1]

    def loss(delta):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        t = next(t for t in p.graph.initializer if t.name == wname)
        a = onnx.numpy_helper.to_array(t).copy()
        a[2, 1] += delta
        t.CopyFrom(onnx.numpy_helper.from_array(a, wname))
        z = ort.InferenceSession(p.SerializeToString()).run(None, {"x": data["x"]})[0]
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -logp[np.arange(24), data["labels"]].mean()
    fd = (loss(1e-2) - loss(-1e-2)) / 2e-2
    assert st.grad[wname][2, 1] == pytest.approx(fd, rel=2e-2, abs=1e-5)
    for crit in GRADIENT:
        s = score(ana, crit, stats=st)
        assert all(np.isfinite(v).all() for v in s) and any(np.abs(v).sum() > 0 for v in s)
        plan = spa.make_plan(model, ana, ratio=0.5, criterion=crit, stats=st,
                             target="flops:0.6", select="global")
        assert plan.keep and verify(model, apply_plan(model, ana, plan), ana, plan).passed


def test_gradient_criteria_refuse_a_zero_objective(tmp_path):
    """A non-classifier without a task loss: the distance to its own outputs has a zero
    gradient at its own weights, so there is nothing to rank by (clear error, not zeros)."""
    engine()
    model, _ = two_convs()  # output: a feature map, not logits
    np.savez(tmp_path / "c.npz",
             x=np.random.default_rng(0).standard_normal((8, 2, 5, 5)).astype(np.float32))
    with pytest.raises(UsageError, match="zero everywhere"):
        spa.prune(model, criterion="snip", calib=str(tmp_path / "c.npz"))
