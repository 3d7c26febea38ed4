"""The CLI contract: outputs, exit codes, no partial output, input never modified,
byte-identical results, plans that round-trip and bad plans that are refused."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from models.synthetic import G
from test_rules import attention


def spa_cli(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "spa", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    g = G()
    x = g.input(["N", 3, 8, 8])
    h = g.op("Relu", [g.bn(g.conv(x, 3, 8), 8)])
    h = g.op("Add", [h, g.conv(g.op("Relu", [g.conv(h, 8, 12)]), 12, 8)])
    g.output(g.op("Gemm", [g.op("Flatten", [g.op("GlobalAveragePool", [h])]), g.w(4, 8)],
                  transB=1))
    p = tmp_path_factory.mktemp("m") / "cnn.onnx"
    onnx.save(g.model(), p)
    return p


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    g = G()
    x = g.input(["B", 4, 8])
    h = g.op("LayerNormalization", [g.op("Add", [x, attention(g, x, 8, 4)]),
                                    g.w(8, positive=True), g.w(8)], axis=-1)
    g.output(g.op("MatMul", [h, g.w(8, 2)]))
    p = tmp_path_factory.mktemp("m") / "tr.onnx"
    onnx.save(g.model(), p)
    return p


def test_analyze_table_and_json(cnn):
    rc, out, _ = spa_cli("analyze", cnn)
    assert rc == 0 and "prunable groups" in out and "frozen" in out
    rc, out, _ = spa_cli("analyze", cnn, "--json")
    data = json.loads(out)
    assert rc == 0 and data["params"] > 0 and data["flops"] == 2 * data["macs"] > 0
    assert sorted(g["channels"] for g in data["groups"]) == [8, 12]
    for g in data["groups"]:
        assert g["exact"] is True and g["constraints"]["min_channels"] == 1
        assert all({"tensor", "axis", "role"} <= set(m) for m in g["members"])


def test_prune_verify_plan_roundtrip(cnn, tmp_path):
    before = digest(cnn)
    out, plan, rep = tmp_path / "p.onnx", tmp_path / "plan.json", tmp_path / "r.json"
    rc, o, e = spa_cli("prune", cnn, "-o", out, "--ratio", "0.5", "--verify",
                       "--plan-out", plan, "--report", rep)
    assert rc == 0, e
    assert "PASS" in o and digest(cnn) == before
    report = json.loads(rep.read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert report["verify"]["passed"] is True
    # replaying the plan gives the same bytes; so does a second run
    out2, out3 = tmp_path / "p2.onnx", tmp_path / "p3.onnx"
    assert spa_cli("prune", cnn, "-o", out2, "--plan", plan)[0] == 0
    assert spa_cli("prune", cnn, "-o", out3, "--ratio", "0.5")[0] == 0
    assert digest(out) == digest(out2) == digest(out3)
    rc, o, _ = spa_cli("verify", cnn, out, "--plan", plan)
    assert rc == 0 and "PASS" in o
    rc, o, _ = spa_cli("verify", cnn, out)              # plan recovered from weights
    assert rc == 0 and "PASS" in o


def test_verify_detects_a_corrupted_model(cnn, tmp_path):
    out, plan = tmp_path / "p.onnx", tmp_path / "plan.json"
    assert spa_cli("prune", cnn, "-o", out, "--plan-out", plan)[0] == 0
    m = onnx.load(out)
    w = m.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.reshape(-1)[0] += 1.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, out)
    rc, o, _ = spa_cli("verify", cnn, out, "--plan", plan)
    assert rc == 1 and "FAIL" in o


@pytest.mark.parametrize("criterion", ["l1", "l2", "random"])
def test_criteria_and_seeds(cnn, tmp_path, criterion):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert spa_cli("prune", cnn, "-o", a, "--criterion", criterion, "--seed", 1)[0] == 0
    assert spa_cli("prune", cnn, "-o", b, "--criterion", criterion, "--seed", 1)[0] == 0
    assert digest(a) == digest(b)


def test_approximate_groups_report_deviation(transformer, tmp_path):
    rc, o, _ = spa_cli("prune", transformer, "-o", tmp_path / "p.onnx", "--verify")
    assert rc == 0 and "approximate" in o
    rc, o, _ = spa_cli("prune", transformer, "-o", tmp_path / "q.onnx", "--verify",
                       "--exact-only")
    assert rc == 0 and "PASS" in o


def _no_output(tmp_path):
    return [p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".tmp")] == []


def test_bad_inputs_exit_3_without_output(tmp_path, cnn):
    cases = {"empty.onnx": b"", "junk.onnx": b"this is not a protobuf \x00\xff" * 10}
    for name, data in cases.items():
        src = tmp_path / name
        src.write_bytes(data)
        rc, _, err = spa_cli("prune", src, "-o", tmp_path / "out" / "x.onnx")
        assert rc == 2 or rc == 3
        rc, _, err = spa_cli("prune", src, "-o", tmp_path / f"{name}.out.onnx")
        assert rc == 3 and name in err
        assert not (tmp_path / f"{name}.out.onnx").exists()
    rc, _, err = spa_cli("analyze", tmp_path / "missing.onnx")
    assert rc == 3 and "no such file" in err


def test_usage_errors_exit_2(cnn, tmp_path):
    assert spa_cli("prune", cnn)[0] == 2                               # no -o
    rc, _, err = spa_cli("prune", cnn, "-o", cnn)                      # output == input
    assert rc == 2 and "input" in err
    rc, _, err = spa_cli("prune", cnn, "-o", tmp_path / "nodir" / "x.onnx")
    assert rc == 2 and "directory" in err
    rc, _, err = spa_cli("prune", cnn, "-o", tmp_path / "x.onnx", "--ratio", "1.5")
    assert rc == 2 and not (tmp_path / "x.onnx").exists()
    assert spa_cli("prune", cnn, "-o", tmp_path / "x.onnx", "--criterion", "nope")[0] == 2


def test_bad_plans_are_refused(cnn, tmp_path):
    plan = tmp_path / "plan.json"
    assert spa_cli("prune", cnn, "-o", tmp_path / "ok.onnx", "--plan-out", plan)[0] == 0
    good = json.loads(plan.read_text())

    def attempt(mutate, expect):
        p = json.loads(json.dumps(good))
        mutate(p)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(p))
        out = tmp_path / "bad.onnx"
        rc, _, err = spa_cli("prune", cnn, "-o", out, "--plan", bad)
        assert rc == 3 and expect in err and not out.exists(), err

    attempt(lambda p: p["groups"][0].update(keep=[0, 0]), "duplicate")
    attempt(lambda p: p["groups"][0].update(keep=[999]), "out of range")
    attempt(lambda p: p["groups"][0].update(keep=[]), "at least one")
    attempt(lambda p: p["groups"][0].update(id=77), "does not exist")
    attempt(lambda p: p["groups"][0].update(channels=3), "channels")
    attempt(lambda p: p.update(model_sha256="0" * 64), "different model")
    attempt(lambda p: p.update(format="x"), "not an SPA plan")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, _, err = spa_cli("prune", cnn, "-o", tmp_path / "bad.onnx", "--plan", bad)
    assert rc == 3 and "JSON" in err


def test_bench_prints_ratios(cnn, tmp_path):
    out = tmp_path / "p.onnx"
    assert spa_cli("prune", cnn, "-o", out)[0] == 0
    rc, o, _ = spa_cli("bench", cnn, out, "--repeat", "5", "--batch", "1", "4")
    assert rc == 0 and o.count("x\n") == 4 and "1.00x" in o


def test_external_data_model(tmp_path):
    g = G()
    x = g.input(["N", 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 64)]), 64, 2))
    m = g.model()
    src = tmp_path / "ext.onnx"
    onnx.save(m, src, save_as_external_data=True, location="ext.data", size_threshold=16)
    assert (tmp_path / "ext.data").exists()
    out = tmp_path / "p.onnx"
    rc, o, e = spa_cli("prune", src, "-o", out, "--verify")
    assert rc == 0 and "PASS" in o, e
    onnx.checker.check_model(onnx.load(out))
