"""Latency budgets (measured tables, the latency cost metric, the measured loop), `spa bench`
output, and the deployment gate (`spa eval`, `spa prune --eval --max-drop`, exit code 4).

Latency numbers on a shared machine are noisy: these tests check the mechanics (tables,
cache, monotone predictions, selections that meet the predicted budget, the report of the
measured rounds), not how close a measurement lands."""
from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import onnx
import pytest

import spa
from models.synthetic import G
from spa import latency
from spa.analysis import analyze
from spa.criteria import score
from spa.evaluate import GateError, gate, load_dataset, read_idx
from spa.ir import load
from spa.select import global_rank, knapsack, uniform_for_target


def spa_cli(*args, env=None):
    p = subprocess.run([sys.executable, "-m", "spa", *map(str, args)], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


def has_cuda() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def classifier(seed: int = 0) -> onnx.ModelProto:
    """conv-BN-relu x2, global pool, 10 logits: a small classifier with prunable widths."""
    g = G(seed=seed)
    x = g.input(["N", 3, 16, 16], name="image")
    h = g.op("Relu", [g.bn(g.conv(x, 3, 32), 32)])
    h = g.op("Relu", [g.bn(g.conv(h, 32, 48), 48)])
    h = g.op("Relu", [g.bn(g.conv(h, 48, 32), 32)])
    g.output(g.op("Gemm", [g.op("Flatten", [g.op("GlobalAveragePool", [h])]),
                           g.w(10, 32), g.w(10)], transB=1))
    return g.model()


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    path = d / "cls.onnx"
    onnx.save(classifier(), path)
    return path


@pytest.fixture(scope="module")
def data(cls_model, tmp_path_factory):
    """64 samples labelled with the original model's own predictions (accuracy 100 %), and
    the same samples without labels."""
    import onnxruntime as ort
    d = tmp_path_factory.mktemp("data")
    x = np.random.default_rng(1).standard_normal((64, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(str(cls_model), providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"image": x})[0].argmax(1).astype(np.int64)
    labelled, bare = d / "val.npz", d / "bare.npz"
    np.savez(labelled, image=x, labels=labels)
    np.savez(bare, image=x)
    return labelled, bare


# ------------------------------------------------------------------------------------------
# the gate


def test_gate_passes_writes_report(cls_model, data, tmp_path):
    out, rep, plan = tmp_path / "p.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    rc, o, e = spa_cli("prune", cls_model, "-o", out, "--ratio", "0.75", "--round-to", "1", "--verify",
                       "--eval", data[0], "--max-drop", "100", "--report", rep,
                       "--plan-out", plan)
    assert rc == 0, e
    assert out.exists() and plan.exists() and "gate PASS" in o
    ev = json.loads(rep.read_text())["eval"]
    assert ev["passed"] and ev["samples"] == 64 and ev["accuracy_before"] == 1.0
    assert ev["drop_points"] > 0, "the test needs a pruned model that loses accuracy"


def test_gate_fails_exit_4_writes_nothing(cls_model, data, tmp_path):
    out, rep, plan = tmp_path / "p.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    rc, o, e = spa_cli("prune", cls_model, "-o", out, "--ratio", "0.75", "--round-to", "1", "--verify",
                       "--eval", data[0], "--max-drop", "0.5", "--report", rep,
                       "--plan-out", plan)
    assert rc == 4, (o, e)
    assert "gate FAIL" in o and "accuracy dropped" in e and "nothing written" in e
    assert not out.exists() and not rep.exists() and not plan.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".spa-")]


def test_deviation_gate_without_labels(cls_model, data, tmp_path):
    out = tmp_path / "p.onnx"
    rc, o, e = spa_cli("prune", cls_model, "-o", out, "--ratio", "0.5", "--eval", data[1],
                       "--max-deviation", "1e-6")
    assert rc == 4 and "deviation" in e and not out.exists()
    rc, o, e = spa_cli("prune", cls_model, "-o", out, "--ratio", "0.5", "--eval", data[1],
                       "--max-deviation", "1e6")
    assert rc == 0 and out.exists(), e
    # no data at all: the deviation is judged on seeded random inputs
    rc, o, e = spa_cli("prune", cls_model, "-o", tmp_path / "q.onnx", "--ratio", "0.5",
                       "--max-deviation", "1e-6")
    assert rc == 4 and "random inputs" in o
    # the accuracy gate needs labels
    rc, o, e = spa_cli("prune", cls_model, "-o", out, "--eval", data[1], "--max-drop", "1")
    assert rc == 2 and "labels" in e


def test_gate_usage_errors(cls_model, tmp_path):
    rc, _, e = spa_cli("prune", cls_model, "-o", tmp_path / "p.onnx", "--max-drop", "1")
    assert rc == 2 and "--eval" in e
    rc, _, e = spa_cli("prune", cls_model, "-o", tmp_path / "p.onnx", "--eval",
                       tmp_path / "missing.npz")
    assert rc == 2 and "no data set" in e
    assert not (tmp_path / "p.onnx").exists()


def test_spa_eval(cls_model, data, tmp_path):
    rc, o, e = spa_cli("eval", cls_model, "--dataset", data[0])
    assert rc == 0 and "100.00%" in o, e
    rc, o, _ = spa_cli("eval", cls_model, "--dataset", data[0], "--json")
    assert json.loads(o)["accuracy"] == 1.0
    pruned = tmp_path / "p.onnx"
    assert spa_cli("prune", cls_model, "-o", pruned, "--ratio", "0.75", "--round-to", "1")[0] == 0
    rc, o, e = spa_cli("eval", pruned, "--dataset", data[0], "--baseline", cls_model,
                       "--max-drop", "0.5")
    assert rc == 4 and "accuracy dropped" in e
    rc, o, e = spa_cli("eval", cls_model, "--dataset", data[0], "--baseline", cls_model,
                       "--max-drop", "0", "--max-deviation", "0")
    assert rc == 0 and "gate PASS" in o, e


def test_gate_api(cls_model, data):
    m = load(str(cls_model))
    res = spa.prune(m, ratio=0.75, round_to=1)
    g = gate(m.proto, res.proto, load_dataset(str(data[0])), max_drop=0.5)
    assert not g.passed and g.drop > 0.5 and g.to_json()["failures"]
    assert isinstance(GateError("x"), spa.SpaError) and GateError.exit_code == 4


def _write_idx(path, arr: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    head = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    (gzip.open if gz else open)(path, "wb").write(head + arr.tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_dataset(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    lbls = np.arange(5, dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", imgs, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", lbls, gz)
    ds = load_dataset(str(tmp_path))
    x = ds.inputs[None]
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    assert np.allclose(x[:, 0] * 255, imgs) and list(ds.labels) == list(range(5))
    assert np.array_equal(read_idx(str(tmp_path / f"t10k-labels-idx1-ubyte{ext}")), lbls)


def test_fashion_mnist_missing_is_a_clear_error(cls_model, tmp_path):
    rc, _, e = spa_cli("eval", cls_model, "--dataset", "fashion-mnist",
                       env={"SPA_FMNIST_DIR": str(tmp_path / "none")})
    assert rc == 3 and "apt-get install dataset-fashion-mnist" in e


def test_fashion_mnist_reader_matches_the_zoo_reader():
    from models import fmnist
    if not fmnist.available():
        pytest.skip("dataset-fashion-mnist not installed")
    ds = load_dataset("fashion-mnist")
    images, labels = fmnist.load_fmnist("test")
    assert np.array_equal(ds.inputs[None], images) and np.array_equal(ds.labels, labels)


# ------------------------------------------------------------------------------------------
# latency


@pytest.fixture(scope="module")
def lat(cls_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("latcache")
    m = load(str(cls_model))
    a = analyze(m)
    settings = latency.LatencySettings(cache_dir=str(cache))
    lm = latency.attach(m, a, settings)
    return m, a, lm, cache


def test_latency_tables_and_fit(lat):
    m, a, lm, cache = lat
    assert len(lm.tables) == 4 and not lm.skipped       # 3 convs and the Gemm
    assert lm.measured_points > 0 and os.path.exists(lm.cache_path)
    assert os.path.dirname(lm.cache_path) == str(cache)
    cm = spa.cost.cost_model(a)
    assert isinstance(cm, latency.LatencyCost)
    # the model predicts the measured dense latency exactly
    assert cm.original["latency"] == pytest.approx(lm.dense_ms * 1e6, rel=1e-6)
    for t in lm.tables:                       # monotone: fewer channels, never slower
        for k in range(t.ms.ndim):
            assert (np.diff(t.ms, axis=k) >= 0).all()
    # removing channels never predicts a slower model, and linearize agrees in sign
    total, saving = cm.linearize(np.zeros(a.n_channels, bool), "latency")
    assert total == pytest.approx(cm.original["latency"])
    assert (saving >= 0).all() and saving.sum() > 0
    rng = np.random.default_rng(0)
    prev = cm.original["latency"]
    removed = np.zeros(a.n_channels, bool)
    for c in rng.permutation(a.n_channels)[:a.n_channels // 2]:
        removed[c] = True
        now = cm.evaluate(removed, ("latency",))["latency"]
        assert now <= prev + 1e-6
        prev = now
    # the other metrics are the base cost model's
    assert cm.evaluate(removed, ("macs",)) == cm.base.evaluate(removed, ("macs",))


def test_latency_cache_is_reused(lat):
    m, _, lm, cache = lat
    a2 = analyze(m)
    lm2 = latency.attach(m, a2, latency.LatencySettings(cache_dir=str(cache)))
    assert lm2.measured_points == 0 and lm2.dense_ms == lm.dense_ms
    assert [t.ms.tolist() for t in lm2.tables] == [t.ms.tolist() for t in lm.tables]
    other = latency.attach(m, analyze(m), latency.LatencySettings(cache_dir=str(cache),
                                                                   batch=2))
    assert other.cache_path != lm.cache_path


@pytest.mark.parametrize("select", [global_rank, knapsack, uniform_for_target],
                         ids=["global", "knapsack", "uniform"])
def test_selections_meet_predicted_latency(lat, select):
    m, a, lm, _ = lat
    scores = score(a, "l2")
    cm = spa.cost.cost_model(a)
    # the floor (every group at the default max_group_loss of 0.9) is measured, so it moves
    # with the machine's load: ask for targets between it and the dense latency
    from spa.select.local import uniform
    floor = cm.evaluate(uniform(a, scores, 0.9).removed(a), ("latency",))["latency"]
    floor /= cm.original["latency"]
    assert floor < 0.95
    for f in (round(floor + 0.6 * (1 - floor), 3), round(floor + 0.25 * (1 - floor), 3)):
        plan = select(a, scores, ("latency", f))
        plan.validate(a)
        got = cm.evaluate(plan.removed(a), ("latency",))["latency"] / cm.original["latency"]
        assert got <= f + 1e-9
        if select is not uniform_for_target:
            assert got >= f - 0.02 - 1e-9
        assert plan.options["achieved"] == pytest.approx(got, abs=1e-6)
        assert plan.options["target"] == {"metric": "latency", "fraction": f}


def test_prune_to_latency_reports_rounds(cls_model, tmp_path):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    args = ("--select", "global", "--round-to", "8", "--latency-rounds", "2", "--report", rep,
            "--verify")
    env = {"SPA_CACHE_DIR": str(tmp_path)}
    # the reachable floor is measured (it moves with the machine's load): an unreachable
    # target is refused with the floor named and nothing written; the tables are cached, so
    # the second run sees the same floor and asks for a target above it
    rc, o, e = spa_cli("prune", cls_model, "-o", out, "--target", "latency:0.05", *args,
                       env=env)
    assert rc == 2 and "cannot be met" in e and not out.exists() and not rep.exists()
    floor = float(re.search(r"reachable: ([0-9.]+)", e).group(1))
    assert 0.05 < floor < 0.95
    f = round(floor + 0.5 * (1 - floor), 3)
    rc, o, e = spa_cli("prune", cls_model, "-o", out, "--target", f"latency:{f}", *args,
                       env=env)
    assert rc == 0, e
    assert f"asked {f}, predicted" in o and "measured" in o and "PASS" in o
    r = json.loads(rep.read_text())
    lat = r["latency"]
    assert 1 <= len(lat["rounds"]) <= 2
    assert lat["asked"] == f and lat["measured"] > 0 and lat["model"]["align"] == 8
    assert r["target"] == {"metric": "latency", "fraction": f}
    assert os.listdir(tmp_path / "latency")


def test_latency_usage_errors(cls_model, tmp_path):
    rc, _, e = spa_cli("prune", cls_model, "-o", tmp_path / "p.onnx", "--target",
                       "latency:0.5", "--batch", "0")
    assert rc == 2 and "--batch" in e
    if not has_cuda():
        rc, _, e = spa_cli("prune", cls_model, "-o", tmp_path / "p.onnx", "--target",
                           "latency:0.5", "--provider", "cuda")
        assert rc == 2 and "onnxruntime-gpu" in e
    assert not (tmp_path / "p.onnx").exists()


# ------------------------------------------------------------------------------------------
# bench


def test_bench_json_spread_and_ratio(cls_model, tmp_path):
    out = tmp_path / "p.onnx"
    assert spa_cli("prune", cls_model, "-o", out, "--ratio", "0.5")[0] == 0
    rc, o, e = spa_cli("bench", cls_model, out, "--repeat", "5", "--warmup", "2", "--json")
    assert rc == 0, e
    rows = json.loads(o)
    assert len(rows) == 2 and rows[0]["speedup"] == 1.0
    for r in rows:
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["runs"] == 5
        assert r["spread"] >= 0 and r["speedup_p10"] <= r["speedup_p90"]
    rc, o, _ = spa_cli("bench", cls_model, "--repeat", "3", "--json", tmp_path / "b.json")
    assert rc == 0 and "1.00x" in o and json.loads((tmp_path / "b.json").read_text())
    if not has_cuda():
        rc, _, e = spa_cli("bench", cls_model, "--provider", "cuda")
        assert rc == 2 and "CUDAExecutionProvider" in e
