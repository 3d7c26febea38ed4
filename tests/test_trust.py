"""Trust by default (issue 12): the oracle runs on every prune and names where a wrong
rewrite departs; costs at the deployed input shapes; every prune says how far the outputs
moved, and obspa refuses a model worse than plain slicing."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import spa
import spa.api
from models.synthetic import G, load_proto, save_tmp
from spa import deviation
from spa.cli import main
from spa.errors import UsageError
from spa.evaluate import GateError
from spa.verify import VerificationError


def cnn(spatial=("H", "W"), classes: int = 10, seed: int = 0):
    """conv-bn-relu x2, global pooling, a classifier: spatial dims symbolic or static."""
    g = G(seed=seed)
    x = g.input(["N", 3, *spatial], name="images")
    h = g.op("Relu", [g.bn(g.conv(x, 3, 32), 32)])     # 32: prunable under --round-to auto
    h = g.op("Relu", [g.bn(g.conv(h, 32, 32), 32)])    # (a multiple of both blocks, 8 and 16)
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h])])
    g.output(g.op("Gemm", [h, g.w(classes, 32), g.w(classes)], transB=1))
    return g.model()


def layernorm_mlp():
    """A MatMul chain whose hidden width passes a LayerNorm (approximate) beside an exact
    hidden group."""
    g = G()
    x = g.input(["B", 6, 8])
    h = g.op("MatMul", [x, g.w(8, 12)])
    h = g.op("LayerNormalization", [h, g.w(12, positive=True), g.w(12)], axis=-1)
    h = g.op("Relu", [g.op("MatMul", [h, g.w(12, 16)])])
    g.output(g.op("MatMul", [h, g.w(16, 4)]))
    return g.model()


def _break_weight(monkeypatch, name: str):
    """Make the rewrite wrong: the weight `name` is perturbed after slicing."""
    real = spa.api.apply_plan

    def broken(model, analysis, plan, *a, **k):
        proto = real(model, analysis, plan, *a, **k)
        for t in proto.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 1.0, name))
        return proto
    monkeypatch.setattr(spa.api, "apply_plan", broken)


def test_verification_is_on_by_default():
    res = spa.prune(load_proto(cnn(spatial=(8, 8))), ratio=0.5)
    assert res.verify is not None and res.verify.passed is True
    assert res.report()["verify"]["checked_groups"] == sorted(res.plan.keep)
    off = spa.prune(load_proto(cnn(spatial=(8, 8))), ratio=0.5, verify=False)
    assert off.verify is None


def test_a_wrong_rewrite_names_the_first_departing_tensor(monkeypatch, tmp_path, capsys):
    proto = cnn(spatial=(8, 8))
    conv2 = proto.graph.node[3]   # conv, bn, relu, conv: the second conv's weight breaks
    assert conv2.op_type == "Conv"
    _break_weight(monkeypatch, conv2.input[1])
    with pytest.raises(VerificationError) as err:
        spa.prune(load_proto(proto), ratio=0.5)
    msg = str(err.value)
    assert f"tensor {conv2.output[0]!r}" in msg and repr(conv2.name) in msg, msg
    assert err.value.exit_code == 1
    # the CLI: exit 1, the node named, nothing written
    src, out = save_tmp(proto, str(tmp_path)), str(tmp_path / "out.onnx")
    assert main(["prune", src, "-o", out, "--ratio", "0.5"]) == 1
    assert conv2.name in capsys.readouterr().err and not os.path.exists(out)
    # --no-verify writes it (and says the check was skipped)
    assert main(["prune", src, "-o", out, "--ratio", "0.5", "--no-verify"]) == 0
    assert "verify: skipped" in capsys.readouterr().out and os.path.exists(out)


def test_approximate_plans_check_their_exact_part():
    res = spa.prune(load_proto(layernorm_mlp()), ratio=0.5)
    ana = res.analysis
    approx = [g for g in res.plan.keep if not ana.groups[g].exact]
    exact = [g for g in res.plan.keep if ana.groups[g].exact]
    assert approx and exact
    v = res.verify
    assert v.passed is True and v.checked_groups == exact and v.unchecked_groups == approx
    # the whole plan moved the outputs (approximate), which the deviation reports
    assert res.deviation.models["pruned"]["overall"] > 1e-6


def test_every_prune_reports_its_deviation(tmp_path, capsys):
    res = spa.prune(load_proto(cnn(spatial=(8, 8))), ratio=0.5)
    m = res.deviation.models["pruned"]
    assert res.deviation.samples == deviation.SAMPLES and "synthetic" in res.deviation.on
    assert 0 < m["overall"] < 10 and 0 <= m["top1_agreement"] <= 1
    assert res.report()["deviation"]["models"]["pruned"] == m
    src = save_tmp(cnn(spatial=(8, 8)), str(tmp_path))
    assert main(["prune", src, "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "deviation from the original: output error" in out and "top-1 agreement" in out


def test_judge_refuses_worse_than_slicing_destroyed_and_chance():
    def dev(pruned, sliced=0.5, agree=0.9):
        d = deviation.Deviation("x", 8, ["y"])
        d.models = {"pruned": {"overall": pruned, "top1_agreement": agree},
                    "sliced": {"overall": sliced, "top1_agreement": None}}
        return d
    assert deviation.judge(dev(0.3)) == []
    assert "plain slicing" in deviation.judge(dev(0.6))[0]
    assert any("not below" in w for w in deviation.judge(dev(1.2, sliced=1.5)))
    assert "agreement" in deviation.judge(dev(0.3, agree=0.2))[0]
    # embeddings (unit rows) are not classifiers; logits are
    assert not deviation._is_classifier(np.eye(4, dtype=np.float32))
    assert deviation._is_classifier(np.arange(8, dtype=np.float32).reshape(2, 4))


def test_obspa_worse_than_slicing_is_refused_unless_forced(monkeypatch, tmp_path, capsys):
    real = spa.api.measure_deviation

    def worse(model, protos, calib, **kw):
        d = real(model, protos, calib, **kw)
        d.models["pruned"]["overall"] = d.models["sliced"]["overall"] * 2 + 1e-3
        return d
    monkeypatch.setattr(spa.api, "measure_deviation", worse)
    src, out = save_tmp(cnn(spatial=(8, 8)), str(tmp_path)), str(tmp_path / "o.onnx")
    args = ["prune", src, "-o", out, "--criterion", "obspa", "--ratio", "0.5"]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "larger than plain slicing" in err and "--force" in err and not os.path.exists(out)
    assert main(args + ["--force"]) == 0 and os.path.exists(out)
    with pytest.raises(GateError):
        spa.prune(src, criterion="obspa", ratio=0.5)


def test_calib_none_is_gone(tmp_path, capsys):
    src = save_tmp(cnn(spatial=(8, 8)), str(tmp_path))
    assert main(["prune", src, "-o", str(tmp_path / "o.onnx"), "--criterion", "obspa",
                 "--calib", "none"]) == 2
    assert "--calib synthetic" in capsys.readouterr().err
    with pytest.raises(UsageError):
        spa.prune(src, criterion="obspa", calib="none")


def test_dynamic_spatial_dims_need_an_input_shape(tmp_path, capsys):
    src, out = save_tmp(cnn(), str(tmp_path)), str(tmp_path / "o.onnx")
    assert main(["analyze", src]) == 0
    text = capsys.readouterr().out
    assert "dynamic input axes counted as 1" in text and "--input-shape images=1x3xHxW" in text
    assert main(["prune", src, "-o", out, "--target", "flops:0.5"]) == 2
    err = capsys.readouterr().err
    assert "--input-shape images=1x3xHxW" in err and not os.path.exists(out)
    # a ratio needs no costs; params do not depend on the input size
    assert main(["prune", src, "-o", out, "--ratio", "0.5"]) == 0
    assert main(["prune", src, "-o", out, "--target", "params:0.5"]) == 0
    # with the shape: costed there, and the budget is met at it
    assert main(["prune", src, "-o", out, "--target", "flops:0.5",
                 "--input-shape", "images=1x3x32x32"]) == 0
    assert "achieved" in capsys.readouterr().out
    assert main(["analyze", src, "--input-shape", "images=1x3x32x32"]) == 0
    assert "images=1x3x32x32" in capsys.readouterr().out
    assert main(["bench", src, out, "--input-shape", "images=1x3x32x32", "--repeat", "2",
                 "--batch", "1", "2"]) == 0
    assert main(["verify", src, out, "--input-shape", "images=1x3x32x32"]) == 0


def test_input_shape_costs_and_errors():
    model = load_proto(cnn())
    at1 = spa.stats(model)["macs"]
    from spa.ir import input_shapes
    input_shapes.apply(model, {"images": (1, 3, 32, 32)})
    at32 = spa.stats(model)["macs"]
    # the convolutions scale with H·W, the classifier does not
    assert at32 > 500 * at1
    static = load_proto(cnn(spatial=(32, 32)))
    assert at32 == spa.stats(static)["macs"]
    for bad in (["images=1x3x32"], ["nope=1x3x8x8"], ["images=2x4x8x8"], ["images:1x3"],
                ["images=1x3x0x8"]):
        with pytest.raises(UsageError):
            input_shapes.apply(load_proto(cnn()), input_shapes.parse(bad))
    # the model itself keeps its dynamic axes
    res = spa.prune(load_proto(cnn()), target="flops:0.5", input_shapes={"images": (1, 3, 32, 32)})
    dims = res.proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["H", "W"]
    assert res.after["macs"] <= 0.5 * res.before["macs"] * 1.05


def test_a_model_onnxruntime_cannot_run_is_refused_unless_no_verify(tmp_path, capsys):
    """A custom-domain op ONNX Runtime does not know: the oracle cannot run, so the default
    refuses (exit 3, the reason and --no-verify named, nothing written); with --no-verify
    the model is pruned and the deviation says it was not measured."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "corpus"))
    from make_corpus import cases
    path = dict((n, p) for n, p, _ in cases(str(tmp_path / "corpus")))["custom_domain.onnx"]
    out = tmp_path / "o.onnx"
    assert main(["prune", path, "-o", str(out), "--round-to", "1"]) == 3
    err = capsys.readouterr().err
    assert "cannot run the original" in err and "--no-verify" in err and "Mystery" in err
    assert not out.exists()
    assert main(["prune", path, "-o", str(out), "--round-to", "1", "--no-verify"]) == 0
    o = capsys.readouterr().out
    assert "verify: skipped" in o and "deviation from the original: not measured" in o
    assert out.exists()
