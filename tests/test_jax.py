"""JAX / Flax: the jax2onnx export of the flax zoo (converters/jax.py, models/jax_zoo.py),
SPA on those graphs and on the trained flax CNN, and the way back to the nnx module.

Exports are cached in .cache/zoo/<name>.onnx (re-made when models/jax_zoo.py, the converter
or a version changes, see models.jax_zoo.export_cached).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("jax2onnx")
ort = pytest.importorskip("onnxruntime")

import spa  # noqa: E402
from oracle_util import assert_oracle_passes  # noqa: E402
from converters.jax import (MapBackError, apply_plan, parse_input_shape, read_record,  # noqa: E402
                            run, to_onnx)
from models import jax_zoo  # noqa: E402
from models.registry import JAX_ZOO, TRAINED_DIR  # noqa: E402
from spa.plan import Plan  # noqa: E402
from spa.rewrite.apply import check  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NAMES = [s.name for s in JAX_ZOO]
TRAINED = TRAINED_DIR / "flax_cnn.onnx"
RTOL = 1e-5


def _ort(proto_or_path, xs):
    data = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") \
        else str(proto_or_path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs)})


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


_MODELS: dict = {}
_PRUNED: dict = {}


def _model(name):
    if name not in _MODELS:
        path = TRAINED if name == "flax_cnn" else jax_zoo.export_cached(name)
        _MODELS[name] = spa.load(str(path))
    return _MODELS[name]


def _pruned(name, ratio):
    key = (name, ratio)
    if key not in _PRUNED:
        # exact counts: the map-back is under test, not the default widths (round_to auto)
        _PRUNED[key] = spa.prune(_model(name), ratio=ratio, do_verify=True, seed=1,
                                 round_to=1)
    return _PRUNED[key]


def test_registry_matches_zoo():
    assert set(NAMES) == set(jax_zoo.ZOO)
    for spec in JAX_ZOO:
        assert spec.framework == "jax"
        assert tuple(spec.input_shape) == jax_zoo.ZOO[spec.name].input_shape


@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name):
    """The flax module and ONNX Runtime on its export agree; initializers carry the
    parameter names and the file records its export settings."""
    model = _model(name)
    xs = jax_zoo.ZOO[name].example_inputs(batch=3, seed=2)
    y = np.asarray(run(jax_zoo.make(name), *xs))
    out = _ort(model.proto, xs)[0]
    assert out.shape == y.shape
    assert _rel(y, out) <= RTOL
    inits = {t.name for t in model.proto.graph.initializer}
    assert {"head.kernel", "head.bias"} <= inits or {"fc2.kernel", "fc2.bias"} <= inits
    rec = read_record(model.proto)
    assert rec["opset"] == 18 and rec["inputs"][0][0][0] == "batch"
    assert [i.name for i in model.proto.graph.input] == \
        ["input_ids" if name == "jax_transformer_tiny" else "input"]
    assert [o.name for o in model.proto.graph.output] == ["output"]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", [*NAMES, "flax_cnn"])
def test_oracle(name, ratio):
    """Every jax zoo model and the trained flax CNN, pruned at 30 % and 50 %, pass the
    masked-equivalence oracle (approximate groups: the exact-only plan passes)."""
    if name == "flax_cnn" and not TRAINED.is_file():
        pytest.skip("models/trained/flax_cnn.onnx missing")
    model = _model(name)
    res = _pruned(name, ratio)
    check(res.proto, model.proto)
    assert res.plan.keep, "nothing was pruned"
    assert res.after["params"] / res.before["params"] < 0.9
    exact = assert_oracle_passes(model, res, ratio)
    assert exact is None or exact.plan.keep, "the exact-only plan prunes nothing"


def _groups_of_kind(name, kind):
    return [g for g in spa.analyze(_model(name)).groups if g.kind == kind]


def test_analysis_sees_through_jax2onnx():
    """NHWC Transposes around the convs, the NHWC Flatten and the attention reshapes do not
    freeze anything: every conv/linear width and every attention block is a group."""
    assert len(_groups_of_kind("jax_cnn_bn", "channels")) == 4       # 3 convs + fc1
    assert len(_groups_of_kind("jax_resnet_small", "channels")) == 6
    assert [g.channels for g in _groups_of_kind("jax_transformer_tiny", "heads")] == [4, 4]


@pytest.mark.parametrize("name", NAMES)
def test_map_back(name):
    """The plan at 50 % applied to a fresh module; the shrunk module, exported again,
    computes what SPA's pruned graph computes."""
    model, res = _model(name), _pruned(name, 0.5)
    module = jax_zoo.make(name)
    report = apply_plan(module, model, res.plan)
    assert report["tensors"] and not report["values_differ"] and not report["unused"]
    pruned_shapes = {t.name: list(t.dims) for t in res.proto.graph.initializer}
    for path, (old, new) in report["tensors"].items():
        assert old != new and np.prod(new) < np.prod(old)
    for tensor, paths in report["initializers"].items():
        if len(paths) == 1 and paths[0] in report["tensors"] and tensor == paths[0]:
            assert np.prod(pruned_shapes[tensor]) == np.prod(report["tensors"][paths[0]][1])
    again = to_onnx(module, jax_zoo.ZOO[name].specs(), param_names=False)
    xs = jax_zoo.ZOO[name].example_inputs(batch=3, seed=5)
    assert _rel(_ort(again, xs)[0], _ort(res.proto, xs)[0]) <= RTOL
    if name == "jax_transformer_tiny":
        a = report["attributes"]
        assert a["blocks.0.attn.num_heads"][0] == 4 and a["blocks.0.attn.num_heads"][1] < 4
        assert a["embed.features"] == [32, 16]
        assert module.blocks[0].attn.head_dim == 8          # whole heads go
    if name == "jax_cnn_bn":
        assert module.conv2.feature_group_count == 2        # every group loses channels
        assert module.conv2.in_features == module.conv1.out_features == 8
        assert module.fc1.in_features == 4 * 4 * module.conv3.out_features


def test_map_back_runs_the_module_and_undoes_on_error():
    """example_inputs: the shrunk module itself (JAX) is compared with SPA's graph; a
    rtol it cannot meet raises, and the module is left exactly as it was."""
    model, res = _model("jax_cnn_bn"), _pruned("jax_cnn_bn", 0.5)
    xs = jax_zoo.ZOO["jax_cnn_bn"].example_inputs(batch=2, seed=3)
    module = jax_zoo.make("jax_cnn_bn")
    before = np.asarray(module.conv1.kernel.get_value()).copy()
    with pytest.raises(MapBackError, match="differs from SPA's pruned graph"):
        apply_plan(module, model, res.plan, example_inputs=xs, rtol=0.0)
    assert np.array_equal(np.asarray(module.conv1.kernel.get_value()), before)
    assert module.conv1.out_features == 16
    report = apply_plan(module, model, res.plan, example_inputs=xs)
    assert report["attributes"]["conv1.out_features"] == [16, 8]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # jax2onnx reads `.value`
def test_map_back_without_export_record(tmp_path):
    """A file written by plain jax2onnx (const_N names, no record) maps back too: the
    converter re-exports with jax2onnx's defaults and the file's inputs and opset."""
    from jax2onnx import to_onnx as j2o
    import onnx

    module = jax_zoo.make("jax_cnn_bn")
    path = tmp_path / "plain.onnx"
    j2o(module, [("B", 32, 32, 3)], opset=18, return_mode="file", output_path=str(path))
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]      # stale NHWC shapes, see converters.jax
    onnx.save(proto, str(path))
    model = spa.load(str(path))
    assert read_record(model.proto) is None
    res = spa.prune(model, ratio=0.5, seed=1, round_to=1)
    report = apply_plan(module, model, res.plan)
    assert "conv1.kernel" in report["tensors"]
    assert any(re.fullmatch(r"(const|kernel)_\w+", t) for t in report["initializers"])
    xs = jax_zoo.ZOO["jax_cnn_bn"].example_inputs(batch=2, seed=4)
    again = to_onnx(module, jax_zoo.ZOO["jax_cnn_bn"].specs(), param_names=False)
    assert _rel(_ort(again, xs)[0], _ort(res.proto, xs)[0]) <= RTOL


def test_map_back_refusals(tmp_path):
    """Another architecture, another model's plan, and a cut the module cannot express are
    refused with the reason; nothing changes."""
    from flax import nnx
    import jax

    model, res = _model("jax_cnn_bn"), _pruned("jax_cnn_bn", 0.5)
    other = jax_zoo.make("jax_resnet_small")
    with pytest.raises(MapBackError, match="does not export to this file's graph"):
        apply_plan(other, model, res.plan)
    with pytest.raises(spa.PlanError):
        apply_plan(jax_zoo.make("jax_resnet_small"), _model("jax_resnet_small"), res.plan)

    class Box(nnx.Module):
        """A [2, 8] parameter flattened into a per-feature bias of 16 features."""

        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)
            self.b = nnx.Param(jax.random.normal(rngs.params(), (2, 8)))
            self.c = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.c(jax.nn.relu(self.a(x) + self.b[...].reshape(-1)))

    from converters.jax import export
    module = Box(nnx.Rngs(0))
    path = export(module, (1, 8), tmp_path / "box.onnx")
    x = np.ones((2, 8), np.float32)
    # the same 4 features of both halves: b is cut to [2, 4]
    report = apply_plan(module, str(path), Plan({0: [0, 1, 2, 3, 8, 9, 10, 11]}, {0: 16}),
                        example_inputs=x)
    assert report["tensors"]["b"] == [[2, 8], [2, 4]]
    module = Box(nnx.Rngs(0))
    with pytest.raises(MapBackError, match=r"b: the plan keeps a set of its elements that "
                                           r"is no slice"):
        apply_plan(module, str(path), Plan({0: [0, 1, 2, 3, 4, 5, 8, 9]}, {0: 16}))
    assert module.b.get_value().shape == (2, 8) and module.a.out_features == 16


# --------------------------------------------------------------------------- CLI


def test_cli_convert_jax(tmp_path, capsys):
    from spa.cli import main

    out = tmp_path / "cnn.onnx"
    assert main(["convert", "jax", "models.jax_zoo:cnn_bn", "--input-shape", "1x32x32x3",
                 "-o", str(out)]) == 0
    m = spa.load(str(out))
    assert [i.name for i in m.proto.graph.input] == ["input"]
    assert read_record(m.proto)["inputs"] == [[["batch", 32, 32, 3], "float32"]]
    # same module, same options -> the same bytes as the cached zoo export
    assert out.read_bytes() == jax_zoo.export_cached("jax_cnn_bn").read_bytes()
    for bad, msg in (("models.jax_zoo:no_such", "no attribute"),
                     ("no_such_pkg_xyz:f", "cannot import"),
                     ("models.jax_zoo:ZOO", "not callable"),
                     ("models.jax_zoo:make", "failed")):
        bad_out = tmp_path / "bad.onnx"
        assert main(["convert", "jax", bad, "--input-shape", "1x32x32x3",
                     "-o", str(bad_out)]) == 2
        assert msg in capsys.readouterr().err
        assert not bad_out.exists() and not list(tmp_path.glob(".bad*"))
    assert parse_input_shape("1x16:int32") == [((1, 16), "int32")]
    # jax2onnx writes ReduceMean in its opset-18 form at opset 17: refused, nothing written
    low = tmp_path / "low.onnx"
    assert main(["convert", "jax", "models.jax_zoo:transformer_tiny", "--input-shape",
                 "1x16:int32", "--opset", "17", "-o", str(low)]) == 3
    assert "opset 18 or higher" in capsys.readouterr().err and not low.exists()


# --------------------------------------------------------------------------- trained model


def test_trained_sidecar():
    side = TRAINED_DIR / "flax_cnn.json"
    if not side.is_file():
        pytest.skip("models/trained/flax_cnn.json missing")
    meta = json.loads(side.read_text())
    assert meta["framework"] == "jax" and meta["input_shape"] == [1, 1, 28, 28]
    assert meta["accuracy"] >= 0.90 and (REPO / meta["path"]).is_file()
    model = _model("flax_cnn")
    assert [i.name for i in model.proto.graph.input] == ["input"]
    assert os.path.getsize(REPO / meta["path"]) < 4 << 20


# --------------------------------------------------------------------------- docs


def test_docs_example_runs(tmp_path):
    """The python example in docs/frameworks.md's JAX section runs as written."""
    text = (REPO / "docs" / "frameworks.md").read_text()
    block = re.search(r"<!-- example:jax -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/frameworks.md lost its jax example"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "plan.json").is_file()


def test_half_precision_variables_are_refused(tmp_path):
    """bfloat16 variables cannot hold the probe's codes: not found in the graph, and a plan
    that shrinks their tensors is refused with that reason."""
    from flax import nnx
    import jax
    import jax.numpy as jnp

    from converters.jax import export

    class Half(nnx.Module):
        def __init__(self, rngs):
            kw = dict(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=rngs)
            self.a = nnx.Linear(8, 16, **kw)
            self.c = nnx.Linear(16, 4, **kw)

        def __call__(self, x):
            return self.c(jax.nn.relu(self.a(x.astype(jnp.bfloat16)))).astype(jnp.float32)

    module = Half(nnx.Rngs(0))
    path = export(module, (1, 8), tmp_path / "half.onnx")
    with pytest.raises(MapBackError, match="float16/bfloat16 cannot hold the probe's codes"):
        apply_plan(module, str(path), Plan({0: list(range(8))}, {0: 16}))
    assert module.a.kernel.get_value().shape == (8, 16)
