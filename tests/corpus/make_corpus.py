"""Generate the hostile-input corpus (never hand-edited binaries): each case is a file (or
directory) plus what SPA must do with it: fail cleanly with exit 3 and a message naming the
problem, or succeed with a correct result.

    python tests/corpus/make_corpus.py OUT_DIR     # writes the cases and prints them
"""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from models.synthetic import G  # noqa: E402


def small_cnn(opset: int = 18, dtype=np.float32) -> onnx.ModelProto:
    g = G(opset)
    x = g.input(["N", 3, 8, 8], TensorProto.FLOAT if dtype == np.float32 else
                helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    h = g.op("Relu", [g.conv(x, 3, 8)])
    g.output(g.conv(h, 8, 2), helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    m = g.model()
    if dtype != np.float32:
        for t in m.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    return m


def _raw(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


def _graph(nodes, inputs, outputs, inits=(), opset=18, ir=9):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _w(name, *shape):
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def cases(out: str) -> list[tuple[str, str, str]]:
    """(name, path, expectation) with expectation 'ok' or 'error:<substring of message>'."""
    os.makedirs(out, exist_ok=True)
    made = []

    def put(name, data: bytes, expect: str):
        p = os.path.join(out, name)
        with open(p, "wb") as f:
            f.write(data)
        made.append((name, p, expect))

    good = _raw(small_cnn())
    put("empty.onnx", b"", "error:empty")
    put("not_protobuf.onnx", b"\xff\xfe this is text, not a model \x00" * 20, "error:")
    put("truncated.onnx", good[: len(good) // 2], "error:")
    put("tensor_not_model.onnx", numpy_helper.from_array(np.ones(8, np.float32), "t")
        .SerializeToString(), "error:")
    put("no_graph.onnx", _raw(onnx.ModelProto(ir_version=9)), "error:no ONNX graph")
    conv = helper.make_node("Conv", ["x", "w_missing"], ["y"], name="conv0")
    put("missing_initializer.onnx", _raw(_graph([conv], [_vi("x", [1, 3, 4, 4])],
                                                [_vi("y", None)])), "error:w_missing")
    relu = helper.make_node("Relu", ["nowhere"], ["y"], name="relu0")
    put("dangling_input.onnx", _raw(_graph([relu], [_vi("x", [1, 3])], [_vi("y", None)])),
        "error:nowhere")
    dup = [helper.make_node("Relu", ["x"], ["y"], name="a"),
           helper.make_node("Sigmoid", ["x"], ["y"], name="b")]
    put("duplicate_outputs.onnx", _raw(_graph(dup, [_vi("x", [1, 3])], [_vi("y", None)])),
        "error:more than once")
    cyc = [helper.make_node("Relu", ["b"], ["a"], name="r1"),
           helper.make_node("Relu", ["a"], ["b"], name="r2"),
           helper.make_node("Add", ["x", "b"], ["y"], name="add")]
    put("cycle.onnx", _raw(_graph(cyc, [_vi("x", [1, 3])], [_vi("y", None)])), "error:cycle")
    bad_arity = helper.make_node("Conv", ["x"], ["y"], name="conv_one_input")
    put("wrong_input_count.onnx", _raw(_graph([bad_arity], [_vi("x", [1, 3, 4, 4])],
                                              [_vi("y", None)])), "error:conv_one_input")
    inc = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
           helper.make_node("Relu", ["h"], ["r"], name="relu"),
           helper.make_node("Add", ["r", "bias"], ["s"], name="add_bad"),
           helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2")]
    put("inconsistent_shapes.onnx", _raw(_graph(inc, [_vi("x", [2, 4])], [_vi("y", None)],
                                                [_w("w1", 4, 6), _w("bias", 5), _w("w2", 6, 2)])),
        "error:")
    unknown_op = helper.make_node("FrobnicateChannels", ["x"], ["y"], name="frob")
    put("unknown_op.onnx", _raw(_graph([unknown_op], [_vi("x", [1, 3])], [_vi("y", None)])),
        "error:FrobnicateChannels")
    m = small_cnn()
    m.opset_import[0].version = 6
    put("opset_too_old.onnx", _raw(m), "error:opset 6")
    m = small_cnn()
    m.opset_import[0].version = 99
    put("opset_too_new.onnx", _raw(m), "error:opset 99")
    m = small_cnn()
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    put("no_default_opset.onnx", _raw(m), "error:opset")
    # a custom-domain node in the middle: opaque, the rest is pruned
    g = G(18)
    x = g.input(["N", 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, 8)])
    h = g.op("Mystery", [h], domain="com.example")
    h = g.op("Relu", [g.conv(h, 8, 6)])
    g.output(g.conv(h, 6, 2), shape=["N", 2, 8, 8])
    graph = helper.make_graph(g.nodes, "g", g.inputs, g.outputs, g.inits)
    custom = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                     helper.make_opsetid("com.example", 1)])
    custom.ir_version = 9
    # opaque node: its dims frozen; ONNX Runtime cannot run it, so the default verification
    # refuses (exit 3, naming --no-verify); tests/test_trust.py prunes it with --no-verify
    put("custom_domain.onnx", _raw(custom), "error:--no-verify")
    put("float16.onnx", _raw(small_cnn(dtype=np.float16)), "ok")
    absurd = _graph([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x", [1, 3])],
                    [_vi("y", None)])
    t = absurd.graph.initializer.add()
    t.name, t.data_type = "huge", TensorProto.FLOAT
    t.dims.extend([1 << 20, 1 << 20, 1 << 10])
    put("absurd_size.onnx", _raw(absurd), "error:absurd")
    # external data: missing, truncated, escaping the directory, symlink out
    for case in ("missing", "truncated", "escape", "absolute", "symlink"):
        d = os.path.join(out, f"ext_{case}")
        os.makedirs(d, exist_ok=True)
        m = small_cnn()
        w = m.graph.initializer[0]
        arr = numpy_helper.to_array(w)
        loc = {"missing": "gone.bin", "truncated": "w.bin", "escape": "../outside.bin",
               "absolute": "/etc/passwd", "symlink": "link.bin"}[case]
        if case == "truncated":
            with open(os.path.join(d, "w.bin"), "wb") as f:
                f.write(arr.tobytes()[:10])
        if case == "symlink":
            target = os.path.join(out, "outside_target.bin")
            with open(target, "wb") as f:
                f.write(arr.tobytes())
            link = os.path.join(d, "link.bin")
            if not os.path.lexists(link):
                os.symlink(target, link)
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value=loc)
        w.external_data.add(key="length", value=str(arr.nbytes))
        p = os.path.join(d, "model.onnx")
        with open(p, "wb") as f:
            f.write(m.SerializeToString())
        expect = {"missing": "missing", "truncated": "truncated", "escape": "escapes",
                  "absolute": "escapes", "symlink": "outside"}[case]
        made.append((f"ext_{case}", p, f"error:{expect}"))
    # control flow reading a channel axis inside its subgraph: If/Loop are opaque and the
    # outer tensors they read are frozen; the rest is still pruned
    g = G(18)
    x = g.input(["N", 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, 8)])
    then_g = helper.make_graph([helper.make_node("Relu", [h], ["t_out"], name="then_relu")],
                               "then", [], [_vi("t_out", None)])
    else_g = helper.make_graph([helper.make_node("Sigmoid", [h], ["e_out"], name="else_sig")],
                               "else", [], [_vi("e_out", None)])
    cond = g.const(np.array(True))
    y = g.op("If", [cond], then_branch=then_g, else_branch=else_g)
    z = g.op("Relu", [g.conv(y, 8, 6)])
    g.output(g.conv(z, 6, 2), shape=["N", 2, 8, 8])
    graph = helper.make_graph(g.nodes, "g", g.inputs, g.outputs, g.inits)
    cf = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    cf.ir_version = 9
    put("control_flow_if.onnx", _raw(cf), "ok")
    # long graph: 3000 nodes in a chain
    g = G(18)
    x = g.input(["N", 4])
    h = g.op("MatMul", [x, g.w(4, 8)])
    for _ in range(1500):
        h = g.op("Relu", [g.op("Add", [h, g.w(8)])])
    g.output(g.op("MatMul", [h, g.w(8, 2)]), shape=["N", 2])
    long = helper.make_model(helper.make_graph(g.nodes, "g", g.inputs, g.outputs, g.inits),
                             opset_imports=[helper.make_opsetid("", 18)])
    long.ir_version = 9
    put("long_chain.onnx", _raw(long), "ok")
    # deeply nested subgraphs (If inside If inside ...)
    inner = helper.make_graph([helper.make_node("Identity", ["x"], ["o0"], name="id0")], "b0",
                              [], [_vi("o0", None)])
    for k in range(1, 25):
        inner = helper.make_graph(
            [helper.make_node("Constant", [], [f"c{k}"], value=numpy_helper.from_array(
                np.array(True), f"cv{k}")),
             helper.make_node("If", [f"c{k}"], [f"o{k}"], then_branch=inner,
                              else_branch=helper.make_graph(
                                  [helper.make_node("Identity", ["x"], [f"e{k}"])], f"e{k}", [],
                                  [_vi(f"e{k}", None)]),
                              name=f"if{k}")], f"b{k}", [], [_vi(f"o{k}", None)])
    deep = _graph(list(inner.node), [_vi("x", [1, 3])], [_vi("o24", None)])
    put("deeply_nested.onnx", _raw(deep), "ok-or-error")
    return made


if __name__ == "__main__":
    for name, path, expect in cases(sys.argv[1] if len(sys.argv) > 1 else "corpus_out"):
        print(f"{name:28s} {expect:24s} {path}")
