"""Graph outputs keep their real shapes (issue 12, item 2): a declared output shape is only a
claim; what the graph computes is what the analysis freezes and what the pruned model must
keep (spa.rewrite.outputs.check_output_shapes)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper as h, numpy_helper as nh

import spa
from spa.rewrite.outputs import check_output_shapes

C = 12  # classes: the axis that must never be pruned


def _save(path, nodes, inputs, outputs, inits):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return str(path)


def _ctc(path, declared=(1, "seqlen"), classes=C):
    """Conv -> Relu -> mean over height -> Transpose to [T, 1, 8] -> MatMul: [T, 1, C],
    while the output claims [1, seqlen] (as the real CTC recogniser did)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             nh.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             nh.from_array(rng.standard_normal((8, classes)).astype(np.float32), "w2")]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c1"], ["r1"], name="relu"),
             h.make_node("ReduceMean", ["r1"], ["p"], axes=[2], keepdims=0, name="pool"),
             h.make_node("Transpose", ["p"], ["pt"], perm=[2, 0, 1], name="tr"),
             h.make_node("MatMul", ["pt", "w2"], ["out"], name="fc")]
    return _save(path, nodes, [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, "W"])],
                 [h.make_tensor_value_info("out", TensorProto.FLOAT, list(declared))], inits)


def _mlp(path, declared=(1, 10)):
    """[1, 6] -> Gemm -> Relu -> Gemm: [1, 12], declared [1, 10]."""
    rng = np.random.default_rng(1)
    inits = [nh.from_array(rng.standard_normal((6, 16)).astype(np.float32), "w1"),
             nh.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             nh.from_array(rng.standard_normal((16, C)).astype(np.float32), "w2"),
             nh.from_array(rng.standard_normal(C).astype(np.float32), "b2")]
    nodes = [h.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
             h.make_node("Relu", ["h1"], ["r1"], name="relu"),
             h.make_node("Gemm", ["r1", "w2", "b2"], ["out"], name="fc2")]
    return _save(path, nodes, [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                 [h.make_tensor_value_info("out", TensorProto.FLOAT, list(declared))], inits)


def _run(proto_or_path, feeds):
    data = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) \
        else open(proto_or_path, "rb").read()
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def _members(analysis, tensor):
    return [(m["tensor"], m["axis"], g.channels) for g in analysis.groups for m in g.members
            if m["tensor"] == tensor]


def test_output_declared_with_the_wrong_rank(tmp_path):
    path = _ctc(tmp_path / "ctc.onnx")
    model = spa.load(path)
    assert model.shapes["out"][1:] == (1, C)          # computed, not the declared [1, seqlen]
    assert any("'out'" in n and "declared [1, 'seqlen']" in n for n in model.shape_notes)
    analysis = spa.analyze(model)
    assert analysis.groups                            # the conv channels still prune
    assert not any(ax == 1 for _, ax, _ in _members(analysis, "w2"))  # the class axis: never
    assert not _members(analysis, "out")
    result = spa.prune(path, ratio=0.5, round_to=1)   # (auto would keep the 8 channels whole)
    assert result.plan.keep                           # something was pruned ...
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 20)).astype(np.float32)
    assert _run(result.proto, {"x": x}).shape == _run(path, {"x": x}).shape == (20, 1, C)


def test_output_declared_with_the_wrong_size(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    model = spa.load(path)
    assert model.shapes["out"] == (1, C)
    assert model.shape_notes == ["graph output 'out' is declared [1, 10] but computes "
                                 "[1, 12]; the computed shape is used"]
    analysis = spa.analyze(model)
    assert not any(ax == 1 for _, ax, _ in _members(analysis, "w2"))
    assert not _members(analysis, "b2")
    result = spa.prune(path, ratio=0.5)
    assert result.plan.keep
    x = np.random.default_rng(0).standard_normal((1, 6)).astype(np.float32)
    assert _run(result.proto, {"x": x}).shape == _run(path, {"x": x}).shape == (1, C)


def test_declared_shape_fills_a_symbolic_axis_and_agreeing_outputs_say_nothing(tmp_path):
    path = _ctc(tmp_path / "ok.onnx", declared=(20, 1, C))   # agrees; fixes T for W = 20
    model = spa.load(path)
    assert model.shapes["out"] == (20, 1, C)
    assert model.shape_notes == []


def test_output_shape_inference_cannot_tell_is_measured(tmp_path):
    """A Reshape whose target inference cannot follow (computed in float): ONNX Runtime
    measures the output, and its class axis is frozen."""
    base = _ctc(tmp_path / "base.onnx")
    m = onnx.load(base)
    g = m.graph
    g.node[-1].output[0] = "logits"
    g.initializer.append(nh.from_array(np.array([-1.0, 1.0, C], np.float32), "tgt_f"))
    g.node.extend([h.make_node("Floor", ["tgt_f"], ["tgt_r"], name="floor"),
                   h.make_node("Cast", ["tgt_r"], ["tgt"], to=TensorProto.INT64, name="cast"),
                   h.make_node("Reshape", ["logits", "tgt"], ["out"], name="reshape")])
    path = str(tmp_path / "measured.onnx")
    onnx.save(m, path)
    model = spa.load(path)
    assert model.shapes["out"][1:] == (1, C)
    assert any("'out'" in n for n in model.shape_notes)
    assert not any(ax == 1 for _, ax, _ in _members(spa.analyze(model), "w2"))


def test_output_of_unknown_rank_freezes_what_computes_it(tmp_path):
    model = spa.load(_mlp(tmp_path / "mlp.onnx"))
    del model.shapes["out"]        # as if neither inference nor ONNX Runtime could tell
    analysis = spa.analyze(model)
    assert not _members(analysis, "w2") and not _members(analysis, "r1")
    assert any("neither shape inference nor ONNX Runtime" in r
               for f in analysis.frozen for r in f["reasons"])


def test_check_output_shapes(tmp_path):
    path = _ctc(tmp_path / "ctc.onnx")
    model = spa.load(path)
    shapes = check_output_shapes(model, model.proto)       # the original itself: fine
    assert shapes == {"out": (32, 1, C)}                  # (W symbolic: 16 * 2)
    assert check_output_shapes(model, spa.prune(path, ratio=0.5).proto) is not None
    bad = onnx.ModelProto()
    bad.CopyFrom(model.proto)
    w2 = next(t for t in bad.graph.initializer if t.name == "w2")
    w2.CopyFrom(nh.from_array(nh.to_array(w2)[:, : C // 2].copy(), "w2"))  # drop classes
    with pytest.raises(spa.SpaError) as exc:
        check_output_shapes(model, bad)
    assert exc.value.exit_code == 3 and exc.value.file == path
    assert "graph output 'out' would change shape from (32, 1, 12) to (32, 1, 6)" in \
        str(exc.value) and "nothing written" in str(exc.value)
    with pytest.raises(spa.SpaError, match=r"from \(40, 1, 12\) to \(40, 1, 6\)"):
        check_output_shapes(model, bad, input_shapes={"x": (1, 3, 8, 40)})


def test_check_output_shapes_tolerates_data_dependent_lengths(tmp_path):
    """NonZero's count follows the values: a pruned model may change it."""
    rng = np.random.default_rng(2)
    inits = [nh.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w")]
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
             h.make_node("Relu", ["y"], ["r"], name="relu"),
             h.make_node("NonZero", ["r"], ["nz"], name="nz")]
    path = _save(tmp_path / "nz.onnx", nodes,
                 [h.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                 [h.make_tensor_value_info("nz", TensorProto.INT64, [2, "n"])], inits)
    model = spa.load(path)
    other = onnx.ModelProto()
    other.CopyFrom(model.proto)
    w = next(t for t in other.graph.initializer if t.name == "w")
    arr = nh.to_array(w).copy()
    arr[:, :4] = 0.0                     # same shapes, fewer non-zeros
    w.CopyFrom(nh.from_array(arr, "w"))
    check_output_shapes(model, other)    # the count is data-dependent: no error


def test_check_output_shapes_on_streamed_weights(tmp_path):
    """External data, memory-mapped (spa.ir.external): the check runs the weights in place,
    the pruned model's sliced weights still pending."""
    m = onnx.load(_ctc(tmp_path / "inline.onnx"))
    path = str(tmp_path / "ext.onnx")
    onnx.save(m, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    model = spa.load(path, stream=True)
    assert model.streaming
    result = spa.prune(model, ratio=0.5)
    assert check_output_shapes(model, result.proto) == {"out": (32, 1, C)}
    bad = onnx.ModelProto()
    bad.CopyFrom(result.proto)
    w2 = next(t for t in bad.graph.initializer if t.name == "w2")
    kept = w2.dims[0]                                    # the conv channels left
    w2.CopyFrom(nh.from_array(np.zeros((kept, C // 2), np.float32), "w2"))
    with pytest.raises(spa.SpaError, match="graph output 'out' would change shape"):
        check_output_shapes(model, bad)
