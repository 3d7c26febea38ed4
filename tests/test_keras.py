"""Keras 3 / TensorFlow through tf2onnx: the converter (converters/keras.py), the Keras zoo
(models/keras_zoo.py) and the trained Fashion-MNIST CNN (models/trained/keras_cnn.*).

* round trip: Keras output vs ONNX Runtime output of the export, <= 1e-5 relative;
* every Keras zoo model and the trained CNN pruned at 30 % and 50 % with the masked-
  equivalence oracle (spa.prune(do_verify=True)), and the pruned model run;
* `spa convert keras` on a .keras file, a SavedModel directory and bad paths;
* the docs/frameworks.md Keras example runs as written.

Zoo exports are cached in .cache/zoo/<name>.onnx (models.keras_zoo.cached_export).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import spa  # noqa: E402
from converters.keras import check_outputs, export  # noqa: E402
from oracle_util import assert_oracle_passes  # noqa: E402
from models import keras_zoo  # noqa: E402
from models.registry import KERAS_ZOO, REPO_ROOT, TRAINED_DIR  # noqa: E402
from spa.errors import SpaError, UsageError  # noqa: E402
from spa.ir import load  # noqa: E402
from spa.rewrite.apply import check  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
# Keras' own model.save calls np.array on TF tensors (numpy 2 deprecation inside keras)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TRAINED_ONNX = TRAINED_DIR / "keras_cnn.onnx"
TRAINED_KERAS = TRAINED_DIR / "keras_cnn.keras"
NAMES = [s.name for s in KERAS_ZOO]


@pytest.fixture(scope="module")
def zoo():
    """name -> (Keras model, cached ONNX path)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (keras_zoo.build(name), keras_zoo.cached_export(name))
        return cache[name]
    return get


def _session(path_or_proto):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    src = path_or_proto if isinstance(path_or_proto, (str, Path)) else \
        path_or_proto.SerializeToString()
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src, opts,
                                providers=["CPUExecutionProvider"])


def _tiny(name="tiny"):
    L = keras.layers
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", name="conv")(inp)
    x = L.ReLU(name="relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(4, name="head")(x)
    return keras.Model(inp, out, name=name)


# ------------------------------------------------------------------ export and round trip


@pytest.mark.parametrize("name", NAMES)
def test_round_trip(zoo, name):
    model, path = zoo(name)
    assert check_outputs(model, path, batch=3) <= 1e-5
    proto = onnx.load(str(path))
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == list(model.inputs[0].shape[1:])
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == 18
    # parameters that tf2onnx stores unchanged keep their Keras names
    assert "logits/kernel" in {t.name for t in proto.graph.initializer}


def test_names_layouts_and_folding(zoo):
    """Initializers named after Keras variables hold exactly those values (in ONNX layout);
    BatchNorm is folded into the convs by tf2onnx's grappler step."""
    from onnx import numpy_helper

    model, path = zoo("keras_mobilenet")
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weights = {w.path: np.asarray(w.numpy()) for w in model.weights}
    named = [n for n in inits if n in weights]
    assert "b1_dw/kernel" in named and "sep/depthwise_kernel" in named, named
    for n in named:
        w = weights[n]
        assert inits[n].size == w.size
        if n.endswith("dw/kernel") or n.endswith("depthwise_kernel"):
            # (3, 3, C, 1) -> (C, 1, 3, 3)
            np.testing.assert_array_equal(inits[n][:, 0], np.transpose(w[..., 0], (2, 0, 1)))
    assert "BatchNormalization" not in {nd.op_type for nd in proto.graph.node}
    assert not any("/gamma" in n or "moving_mean" in n for n in inits)


def test_export_is_deterministic(tmp_path):
    """Same model, same bytes: tf2onnx's name counter and the object ids in the names and
    order of its Einsum lowering (MultiHeadAttention) are canonicalised. (Before, the second
    export in a process differed from the first.)"""
    L = keras.layers
    keras.utils.set_random_seed(2)
    inp = keras.Input((6, 8), name="tokens")
    x = L.MultiHeadAttention(2, 4, name="mha")(inp, inp)
    out = L.Dense(3, name="head")(L.GlobalAveragePooling1D(name="pool")(x))
    model = keras.Model(inp, out)
    paths = [export(model, tmp_path / f"m{i}.onnx") for i in range(2)]
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert digest[0] == digest[1]
    assert not any(re.search(r"\d{12,}", n.name) for n in onnx.load(str(paths[0])).graph.node)
    assert check_outputs(model, paths[0]) <= 1e-5


def test_opsets_and_nchw_input(tmp_path):
    model = _tiny()
    p13 = export(model, tmp_path / "m13.onnx", opset=13)
    p20 = export(model, tmp_path / "m20.onnx", opset=20)
    nchw = export(model, tmp_path / "nchw.onnx", inputs_as_nchw=True)
    for p, opset in ((p13, 13), (p20, 20), (nchw, 18)):
        proto = onnx.load(str(p))
        assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    assert check_outputs(model, p13) <= 1e-5 and check_outputs(model, p20) <= 1e-5
    assert check_outputs(model, nchw, inputs_as_nchw=True) <= 1e-5
    dims = onnx.load(str(nchw)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 8, 8]
    with pytest.raises(UsageError, match="opset 10"):
        export(model, tmp_path / "m10.onnx", opset=10)
    assert not (tmp_path / "m10.onnx").exists()


def test_unconvertible_op_is_refused(tmp_path):
    """tf2onnx leaves ops it cannot map in the graph (continue_on_error): refuse, name them,
    write nothing."""
    L = keras.layers
    inp = keras.Input((4,), name="x")
    out = L.Lambda(lambda t: tf.math.lgamma(t + 2.0), name="lgamma")(L.Dense(4, name="d")(inp))
    model = keras.Model(inp, out)
    with pytest.raises(SpaError, match="Lgamma"):
        export(model, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ pruning with the oracle


def _check_pruned(model, res, ratio, feeds):
    check(res.proto, model.proto)
    assert res.plan.keep, "nothing was pruned"
    assert res.after["params"] < res.before["params"]
    assert_oracle_passes(model, res, ratio)
    (before,) = _session(model.proto).run(None, feeds)
    (after,) = _session(res.proto).run(None, feeds)
    assert after.shape == before.shape and np.isfinite(after).all()
    return before, after


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", NAMES)
def test_zoo_oracle(zoo, name, ratio):
    model = load(str(zoo(name)[1]))
    res = spa.prune(model, ratio=ratio, do_verify=True, seed=1, round_to=1)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    _check_pruned(model, res, ratio, {"input": x})
    kept = res.after["params"] / res.before["params"]
    assert kept < 0.9, f"only {1 - kept:.1%} of the parameters removed"


@pytest.mark.skipif(not TRAINED_ONNX.is_file(), reason="models/trained/keras_cnn.onnx missing")
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_trained_oracle(ratio):
    from models.fmnist import available, load_fmnist

    model = load(str(TRAINED_ONNX))
    res = spa.prune(model, ratio=ratio, do_verify=True, seed=1, round_to=1)
    if available():
        x, labels = load_fmnist("test")
        x, labels = np.ascontiguousarray(x[:500]), labels[:500]
    else:
        x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
        labels = None
    before, after = _check_pruned(model, res, ratio, {"input": x})
    assert res.after["params"] / res.before["params"] < 0.9
    if labels is not None:   # the original is the trained model; the pruned one predicts
        assert (before.argmax(1) == labels).mean() >= 0.88
        assert (after.argmax(1) == before.argmax(1)).mean() > 0.3


@pytest.mark.skipif(not (TRAINED_ONNX.is_file() and TRAINED_KERAS.is_file()),
                    reason="trained Keras CNN missing")
def test_trained_sidecar_and_round_trip():
    meta = json.loads((TRAINED_DIR / "keras_cnn.json").read_text())
    assert meta["framework"] == "keras" and meta["accuracy"] >= 0.90
    assert meta["input_shape"] == [1, 1, 28, 28]
    assert (REPO_ROOT / meta["path"]).resolve() == TRAINED_ONNX.resolve()
    assert check_outputs(TRAINED_KERAS, TRAINED_ONNX, inputs_as_nchw=True) <= 1e-5


# ------------------------------------------------------------------ CLI


def test_cli_convert_keras_file_and_savedmodel(tmp_path):
    from spa.cli import main

    model = _tiny()
    model.save(tmp_path / "tiny.keras")
    out = tmp_path / "tiny.onnx"
    assert main(["convert", "keras", str(tmp_path / "tiny.keras"), "-o", str(out)]) == 0
    onnx.checker.check_model(onnx.load(str(out)))
    assert check_outputs(model, out) <= 1e-5
    assert {"conv/kernel", "head/kernel"} <= {t.name for t in onnx.load(str(out)).graph.initializer}

    model.export(str(tmp_path / "saved"), verbose=False)
    out2 = tmp_path / "saved.onnx"
    assert main(["convert", "keras", str(tmp_path / "saved"), "-o", str(out2),
                 "--opset", "17"]) == 0
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 3)).astype(np.float32)
    sess = _session(out2)
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
    ref = model(x).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_cli_convert_keras_bad_inputs(tmp_path, capsys):
    from spa.cli import main

    out = tmp_path / "out.onnx"
    assert main(["convert", "keras", str(tmp_path / "missing.keras"), "-o", str(out)]) == 2
    assert "missing.keras" in capsys.readouterr().err
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip file")
    assert main(["convert", "keras", str(garbage), "-o", str(out)]) == 3
    assert "garbage.keras" in capsys.readouterr().err
    assert main(["convert", "keras", str(garbage), "-o", str(garbage)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert garbage.read_bytes() == b"not a zip file"
    (tmp_path / "empty_dir").mkdir()
    assert main(["convert", "keras", str(tmp_path / "empty_dir"), "-o", str(out)]) == 2
    assert "saved_model.pb" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_dir", "garbage.keras"]


# ------------------------------------------------------------------ docs


def test_docs_example_runs(tmp_path):
    """The Keras example in docs/frameworks.md runs as written."""
    text = (REPO_ROOT / "docs" / "frameworks.md").read_text()
    block = re.search(r"<!-- example:keras -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/frameworks.md lost its Keras example"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "small.onnx").is_file()
    json.loads((tmp_path / "plan.json").read_text())
