"""The scikit-learn zoo: an MLPClassifier converted with skl2onnx (zipmap=False) matches
scikit-learn in ONNX Runtime, and prunes at 30 % / 50 % through the oracle."""
from __future__ import annotations

import numpy as np
import pytest

import spa
from models.registry import FRAMEWORK_ZOO_BY_NAME, SKLEARN_ZOO
from spa.ir import load
from spa.rewrite.apply import check

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")
ort = pytest.importorskip("onnxruntime")
from models import sklearn_zoo  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(fitted estimator, path of its ONNX export) per zoo name, built once per module."""
    out = tmp_path_factory.mktemp("sklearn_zoo")
    cache = {}

    def get(name):
        if name not in cache:
            clf = sklearn_zoo.make(name)
            path = sklearn_zoo.export(name, out / f"{name}.onnx")
            cache[name] = clf, path
        return cache[name]
    return get


def test_registry_rows():
    assert [s.name for s in SKLEARN_ZOO] == ["mlp_digits"]
    spec = FRAMEWORK_ZOO_BY_NAME["mlp_digits"]
    assert spec.framework == "sklearn" and spec.trained and spec.input_shape == (1, 64)


@pytest.mark.parametrize("name", [s.name for s in SKLEARN_ZOO])
def test_round_trip(exported, name):
    clf, path = exported(name)
    x, y = sklearn_zoo.digits()
    test_x = x[sklearn_zoo.N_TRAIN:]
    assert clf.score(test_x, y[sklearn_zoo.N_TRAIN:]) > 0.85  # it learned something
    model = load(str(path))
    domains = {o.domain: o.version for o in model.proto.opset_import}
    assert 11 <= domains[""] <= 23
    assert not any(n.op_type == "ZipMap" for n in model.proto.graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"input": test_x})
    want = clf.predict_proba(test_x)
    rel = np.abs(proba - want).max() / np.abs(want).max()
    assert rel <= 1e-5, rel
    np.testing.assert_array_equal(label, clf.predict(test_x))


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", [s.name for s in SKLEARN_ZOO])
def test_prune_oracle(exported, name, ratio):
    _, path = exported(name)
    model = load(str(path))
    res = spa.prune(model, ratio=ratio, do_verify=True, seed=1)
    check(res.proto, model.proto)
    # both hidden layers are groups; each loses `ratio` of its units
    assert len(res.plan.keep) == 2
    assert sorted(res.plan.sizes.values()) == [32, 64]
    for gid, keep in res.plan.keep.items():
        n = res.plan.sizes[gid]
        assert len(keep) == n - int(np.floor(ratio * n + 1e-9))
    assert res.after["params"] < (1 - ratio / 2) * res.before["params"]
    assert res.verify.exact and res.verify.passed, res.verify.max_rel_error
