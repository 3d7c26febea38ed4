"""`spa finetune`: training an ONNX model's parameters with the JAX engine, on a small real
data set (scikit-learn's 8x8 digits) and a small CNN with BatchNorms built with onnx.helper.

The contract checked here: loss goes down and test accuracy goes up (from random weights, and
after pruning a trained model), distillation works with and without labels, the output is the
same graph with only initializer values changed, the input file is never modified, the
recomputed BatchNorm statistics are the population statistics of the data, and bad input
gets a clear error and the right exit code."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

import spa  # noqa: E402
from models.synthetic import G  # noqa: E402
from spa import finetune as ft  # noqa: E402
from spa.cli import main  # noqa: E402
from spa.errors import UsageError  # noqa: E402
from spa.evaluate import evaluate, load_dataset  # noqa: E402
from spa.ir import load  # noqa: E402


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def cli(*args) -> int:
    return main([str(a) for a in args])


def cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu x2 (the second with stride 2) -> Flatten -> Gemm, random weights and
    random stored BN statistics: an untrained, 'damaged' classifier of 8x8 images."""
    g = G(opset=17, seed=seed)
    x = g.input(["N", 1, 8, 8], name="image")

    def conv_bn_relu(x, cin, cout, stride):
        w = g.w(cout, cin, 3, 3, scale=float(np.sqrt(2.0 / (cin * 9))))
        y = g.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                 strides=[stride, stride])
        return g.op("Relu", [g.bn(y, cout)])

    y = conv_bn_relu(conv_bn_relu(x, 1, 16, 1), 16, 32, 2)          # N x 32 x 4 x 4
    y = g.op("Gemm", [g.op("Flatten", [y]), g.w(10, 512, scale=0.05), g.w(10, scale=0.0)],
             transB=1)
    g.output(y)
    return g.model()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Digits split into train (1500, with and without labels) and test (297), the random
    CNN, and that CNN trained for 4 epochs by `spa finetune` (the teacher of later tests)."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = tmp_path_factory.mktemp("finetune")
    x, y = datasets.load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int64)
    np.savez(d / "train.npz", image=x[:1500], labels=y[:1500])
    np.savez(d / "train_unlabelled.npz", image=x[:1500])
    np.savez(d / "test.npz", image=x[1500:], labels=y[1500:])
    onnx.save(cnn(), d / "random.onnx")
    before = sha(d / "random.onnx")
    rc = cli("finetune", d / "random.onnx", "--data", d / "train.npz", "--test",
             d / "test.npz", "--epochs", 4, "--lr", 0.1, "--batch", 64,
             "-o", d / "trained.onnx", "--report", d / "trained.json")
    assert rc == 0
    assert sha(d / "random.onnx") == before, "the input model was modified"
    return d


def accuracy(path, test) -> float:
    return evaluate(onnx.load(str(path)), load_dataset(str(test)))["accuracy"]


def strip_values(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer's data removed (names, dims, dtypes kept)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for t in m.graph.initializer:
        t.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data"):
            t.ClearField(f)
    return m


def test_training_from_random_weights(work):
    rep = json.loads((work / "trained.json").read_text())
    losses = [h["loss"] for h in rep["history"]]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
    assert rep["accuracy_before"] < 0.4
    assert rep["accuracy_after"] > 0.85, rep
    assert rep["settings"]["loss"] == "ce" and rep["settings"]["steps_per_epoch"] == 1500 // 64
    # the accuracy in the report is the written model's, measured again with ONNX Runtime
    assert accuracy(work / "trained.onnx", work / "test.npz") == pytest.approx(
        rep["accuracy_after"])


def test_same_graph_only_values_change(work):
    a, b = onnx.load(str(work / "random.onnx")), onnx.load(str(work / "trained.onnx"))
    assert strip_values(a).SerializeToString(deterministic=True) == \
        strip_values(b).SerializeToString(deterministic=True)
    va = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    vb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    changed = [k for k in va if not np.array_equal(va[k], vb[k])]
    bn = [n for n in a.graph.node if n.op_type == "BatchNormalization"]
    # every weight, gamma, beta and the recomputed running statistics changed
    assert set(changed) == set(va), sorted(set(va) - set(changed))
    for n in bn:
        assert np.all(vb[n.input[4]] > 0)


def test_prune_then_finetune_with_distillation(work, tmp_path):
    """Prune the trained model to half its channels, then recover with labels + KD."""
    model = load(str(work / "trained.onnx"))
    res = spa.prune(model, ratio=0.75, round_to=1)
    spa.save(res.proto, str(tmp_path / "pruned.onnx"))
    acc_trained = accuracy(work / "trained.onnx", work / "test.npz")
    acc_pruned = accuracy(tmp_path / "pruned.onnx", work / "test.npz")
    assert acc_pruned < acc_trained - 0.05, (acc_pruned, acc_trained)
    rc = cli("finetune", tmp_path / "pruned.onnx", "--data", work / "train.npz", "--test",
             work / "test.npz", "--epochs", 2, "--lr", 0.05, "--batch", 64, "--teacher",
             work / "trained.onnx", "--kd-alpha", 0.5, "-o", tmp_path / "ft.onnx",
             "--report", tmp_path / "ft.json")
    assert rc == 0
    rep = json.loads((tmp_path / "ft.json").read_text())
    assert rep["accuracy_before"] == pytest.approx(acc_pruned)
    assert rep["accuracy_after"] > acc_pruned + 0.5 * (acc_trained - acc_pruned), rep
    assert rep["history"][-1]["loss"] < rep["history"][0]["loss"]
    assert rep["settings"]["loss"] == "0.5*kd + 0.5*ce"
    # the output has the pruned graph (narrower tensors), not the original's
    assert strip_values(onnx.load(str(tmp_path / "ft.onnx"))).SerializeToString(
        deterministic=True) == strip_values(onnx.load(str(tmp_path / "pruned.onnx"))) \
        .SerializeToString(deterministic=True)


def test_distillation_without_labels(work, tmp_path):
    """Unlabelled data: the student learns the teacher's outputs; its agreement with the
    teacher (and so its accuracy) goes up."""
    model = load(str(work / "trained.onnx"))
    spa.save(spa.prune(model, ratio=0.75, round_to=1).proto, str(tmp_path / "pruned.onnx"))
    rc = cli("finetune", tmp_path / "pruned.onnx", "--data", work / "train_unlabelled.npz",
             "--epochs", 2, "--lr", 0.05, "--batch", 64, "--teacher", work / "trained.onnx",
             "-o", tmp_path / "kd.onnx")
    assert rc == 0
    test = load_dataset(str(work / "test.npz"))
    from spa.evaluate import run
    t = run(onnx.load(str(work / "trained.onnx")), test)[0].argmax(1)
    agree = {k: float((run(onnx.load(str(tmp_path / f"{k}.onnx")), test)[0].argmax(1)
                       == t).mean()) for k in ("pruned", "kd")}
    assert agree["kd"] > agree["pruned"] + 0.05, agree
    assert accuracy(tmp_path / "kd.onnx", work / "test.npz") > \
        accuracy(tmp_path / "pruned.onnx", work / "test.npz")


def test_recalibration_is_population_statistics(work, tmp_path):
    """--epochs 0: weights untouched; the first BN's running statistics become the mean and
    variance of its input over the samples."""
    rc = cli("finetune", work / "random.onnx", "--data", work / "train.npz", "--epochs", 0,
             "--bn-samples", 1000, "-o", tmp_path / "recal.onnx")
    assert rc == 0
    a, b = onnx.load(str(work / "random.onnx")), onnx.load(str(tmp_path / "recal.onnx"))
    va = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    vb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    bn = [n for n in a.graph.node if n.op_type == "BatchNormalization"]
    stats = {n.input[k] for n in bn for k in (3, 4)}
    for k in va:
        assert np.array_equal(va[k], vb[k]) == (k not in stats), k
    from spa.activations import with_outputs
    from spa.runtime import session_for
    x = np.load(work / "train.npz")["image"][:1000]
    h = session_for(with_outputs(a, [bn[0].input[0]], only=True)).run(
        [bn[0].input[0]], {"image": x})[0]
    np.testing.assert_allclose(vb[bn[0].input[3]], h.mean(axis=(0, 2, 3)), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(vb[bn[0].input[4]], h.var(axis=(0, 2, 3)), rtol=1e-3,
                               atol=1e-5)


def test_bn_fixed_keeps_running_statistics_and_output_is_reproducible(work, tmp_path):
    for out in ("fixed.onnx", "again.onnx"):
        rc = cli("finetune", work / "trained.onnx", "--data", work / "train.npz", "--epochs",
                 1, "--lr", 0.01, "--bn", "fixed", "--limit", 256, "--augment", "crop-flip",
                 "-o", tmp_path / out)
        assert rc == 0
    # same input, same options: the same bytes (seeded shuffle and augmentation)
    assert sha(tmp_path / "fixed.onnx") == sha(tmp_path / "again.onnx")
    a, b = onnx.load(str(work / "trained.onnx")), onnx.load(str(tmp_path / "fixed.onnx"))
    va = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    vb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    for n in (n for n in a.graph.node if n.op_type == "BatchNormalization"):
        assert np.array_equal(va[n.input[3]], vb[n.input[3]])
        assert np.array_equal(va[n.input[4]], vb[n.input[4]])
        assert not np.array_equal(va[n.input[1]], vb[n.input[1]])  # gamma trained


def test_errors(work, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    # no labels and no teacher: usage error, nothing written
    rc = cli("finetune", work / "random.onnx", "--data", work / "train_unlabelled.npz",
             "--epochs", 1, "-o", out)
    assert rc == 2 and "--teacher" in capsys.readouterr().err and not out.exists()
    # not an .npz file
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert cli("finetune", work / "random.onnx", "--data", bad, "--epochs", 1, "-o", out) == 3
    assert "bad.npz" in capsys.readouterr().err
    # an array for an input the model does not have
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    assert cli("finetune", work / "random.onnx", "--data", tmp_path / "wrong.npz",
               "--epochs", 1, "-o", out) == 3
    assert "'pixels'" in capsys.readouterr().err
    # labels outside the model's 10 classes
    np.savez(tmp_path / "labels.npz", image=np.zeros((4, 1, 8, 8), np.float32),
             labels=np.array([0, 1, 2, 12]))
    assert cli("finetune", work / "random.onnx", "--data", tmp_path / "labels.npz",
               "--epochs", 1, "-o", out) == 3
    assert "10 classes" in capsys.readouterr().err
    # not a model
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    assert cli("finetune", junk, "--data", work / "train.npz", "--epochs", 1, "-o", out) == 3
    # the output is the input; bad options
    assert cli("finetune", work / "random.onnx", "--data", work / "train.npz", "--epochs", 1,
               "-o", work / "random.onnx") == 2
    assert cli("finetune", work / "random.onnx", "--data", work / "train.npz", "--epochs", 1,
               "--kd-alpha", 1.5, "-o", out) == 2
    # a teacher with other inputs
    g = G(opset=17)
    x = g.input(["N", 4], name="other")
    g.output(g.op("Relu", [x]))
    onnx.save(g.model(), tmp_path / "other.onnx")
    assert cli("finetune", work / "random.onnx", "--data", work / "train.npz", "--epochs", 1,
               "--teacher", tmp_path / "other.onnx", "-o", out) == 2
    assert not out.exists()
    capsys.readouterr()


def test_missing_jax_is_a_usage_error(work, monkeypatch):
    monkeypatch.setitem(sys.modules, "optax", None)   # `import optax` raises ImportError
    model = load(str(work / "random.onnx"))
    data = ft.load_training_data(str(work / "train.npz"), model)
    with pytest.raises(UsageError, match="spa-prune\\[jax\\]"):
        ft.finetune(model, data, ft.Config(epochs=1))


def test_import_spa_does_not_import_jax():
    code = ("import sys, spa, spa.cli, spa.finetune; "
            "assert 'jax' not in sys.modules and 'optax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_with_values_updates_constant_nodes_and_keeps_dtypes():
    from onnx import helper, numpy_helper
    w16 = numpy_helper.from_array(np.ones((2, 2), np.float16), "w16")
    c = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
        np.zeros(2, np.float32), "kval"))
    n1 = helper.make_node("MatMul", ["x", "w16"], ["y"])
    n2 = helper.make_node("Add", ["y", "k"], ["z"])
    g = helper.make_graph([c, n1, n2], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [1, 2])],
                          [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT16, None)],
                          [w16])
    m = helper.make_model(g)
    out = ft.with_values(m, {"w16": np.full((2, 2), 3.0, np.float32),
                             "k": np.array([1.0, 2.0], np.float32)})
    t = out.graph.initializer[0]
    assert t.name == "w16" and t.data_type == onnx.TensorProto.FLOAT16
    assert np.array_equal(numpy_helper.to_array(t), np.full((2, 2), 3.0, np.float16))
    kv = out.graph.node[0].attribute[0].t
    assert kv.name == "kval" and np.array_equal(numpy_helper.to_array(kv), [1.0, 2.0])
    assert m.graph.initializer[0].raw_data == w16.raw_data          # the input untouched
    with pytest.raises(spa.SpaError, match="shape"):
        ft.with_values(m, {"w16": np.ones((3, 2), np.float32)})


def test_augment_crop_and_flip():
    rng = np.random.default_rng(0)
    x = rng.random((16, 1, 8, 8)).astype(np.float32)
    a = ft.augment(x, 1, "flip", np.random.default_rng(1))
    flipped = [np.array_equal(a[i], x[i, :, :, ::-1]) for i in range(16)]
    same = [np.array_equal(a[i], x[i]) for i in range(16)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
    c = ft.augment(x, 1, "crop", np.random.default_rng(1))
    assert c.shape == x.shape and not np.array_equal(c, x)
    # every crop is a shifted window of the zero-padded image
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(16):
        assert any(np.array_equal(c[i], padded[i, :, dy:dy + 8, dx:dx + 8])
                   for dy in range(5) for dx in range(5))
    # channels last gives the same images, transposed; same seed, same result
    n = ft.augment(x.transpose(0, 2, 3, 1), 3, "crop-flip", np.random.default_rng(2))
    np.testing.assert_array_equal(n.transpose(0, 3, 1, 2),
                                  ft.augment(x, 1, "crop-flip", np.random.default_rng(2)))


@pytest.mark.parametrize("opset", [17, 18])   # ReduceMean axes: attribute / input
def test_batch_statistics_graph(opset):
    """The trained graph's BNs normalise with the batch's statistics (checked against numpy
    in ONNX Runtime); BNs whose statistics are shared with another node are left alone."""
    from spa.activations import with_outputs
    from spa.ir.model import from_proto
    from spa.runtime import session_for
    g = G(opset=opset, seed=1)
    x = g.input(["N", 3, 5, 5], name="x")
    y = g.bn(g.conv(x, 3, 4, k=1), 4)
    mean, var = g.w(4), g.w(4, positive=True)              # shared by two BNs
    a = g.op("BatchNormalization", [y, g.w(4), g.w(4), mean, var], epsilon=1e-3)
    b = g.op("BatchNormalization", [y, g.w(4), g.w(4), mean, var])
    g.output(g.op("Add", [a, b]))
    model = from_proto(g.model())
    proto, stats, skipped = ft.batch_stats_graph(model)
    assert len(stats) == 1 and len(skipped) == 2
    bn = [n for n in model.proto.graph.node if n.op_type == "BatchNormalization"][0]
    xv = np.random.default_rng(0).standard_normal((6, 3, 5, 5)).astype(np.float32) * 3 + 1
    names = [bn.input[0], bn.output[0], stats[0].batch_mean, stats[0].batch_var]
    h, out, m, v = session_for(with_outputs(proto, names)).run(names, {"x": xv})
    c = model.consts
    ref_m, ref_v = h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))
    np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, ref_v, rtol=1e-4, atol=1e-5)
    sh = (1, 4, 1, 1)
    ref = (h - ref_m.reshape(sh)) / np.sqrt(ref_v.reshape(sh) + 1e-5) * \
        c[bn.input[1]].reshape(sh) + c[bn.input[2]].reshape(sh)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # the shared-statistics BNs read the stored tensors, as before
    for n in proto.graph.node[-3:-1]:
        assert n.op_type == "BatchNormalization" and list(n.input[3:5]) == [mean, var]


def test_softmax_classifier_trains_on_its_logits(work, tmp_path):
    """A model whose output is Softmax probabilities: cross-entropy is taken on the
    Softmax's input (the engine's class logits), and a teacher's probabilities distil
    through their log. Trained with labels, then a fresh copy distilled without them."""
    def mlp(seed):
        g = G(opset=17, seed=seed)
        x = g.input(["N", 64], name="image")
        h = g.op("Relu", [g.op("Gemm", [x, g.w(32, 64, scale=0.2), g.w(32, scale=0.0)],
                               transB=1)])
        y = g.op("Gemm", [h, g.w(10, 32, scale=0.2), g.w(10, scale=0.0)], transB=1)
        g.output(g.op("Softmax", [y], axis=1))
        return g.model()
    z = np.load(work / "train.npz")
    np.savez(tmp_path / "flat.npz", image=z["image"].reshape(-1, 64), labels=z["labels"])
    np.savez(tmp_path / "flat_unlabelled.npz", image=z["image"].reshape(-1, 64))
    t = np.load(work / "test.npz")
    np.savez(tmp_path / "flat_test.npz", image=t["image"].reshape(-1, 64), labels=t["labels"])
    onnx.save(mlp(0), tmp_path / "mlp.onnx")
    onnx.save(mlp(1), tmp_path / "fresh.onnx")
    assert cli("finetune", tmp_path / "mlp.onnx", "--data", tmp_path / "flat.npz", "--test",
               tmp_path / "flat_test.npz", "--epochs", 3, "--lr", 0.1, "--batch", 64,
               "-o", tmp_path / "teacher.onnx", "--report", tmp_path / "t.json") == 0
    rep = json.loads((tmp_path / "t.json").read_text())
    assert rep["accuracy_after"] > 0.85 and rep["history"][-1]["loss"] < 0.5, rep
    assert cli("finetune", tmp_path / "fresh.onnx", "--data", tmp_path / "flat_unlabelled.npz",
               "--test", tmp_path / "flat_test.npz", "--epochs", 3, "--lr", 0.1, "--batch",
               64, "--teacher", tmp_path / "teacher.onnx", "-o", tmp_path / "student.onnx",
               "--report", tmp_path / "s.json") == 0
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["settings"]["loss"] == "kd"
    assert rep["accuracy_before"] < 0.3 and rep["accuracy_after"] > 0.8, rep
