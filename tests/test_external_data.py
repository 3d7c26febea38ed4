"""Models with external data (the > 2 GB path, on small models): weights are memory-mapped,
not loaded; sliced weights stay pending until the output is written chunk by chunk; the
output gets its own data file; the input files are never written; the switch to external
output is tested with a lowered threshold instead of GBs."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spa
from models.synthetic import G
from spa.cli import main as cli
from spa.errors import SpaError
from spa.ir import external, save_atomic
from spa.ir.model import load
from spa.runtime import dummy_inputs, session_for
from test_rules import attention

D, FFN = 32, 128


def llm_like() -> onnx.ModelProto:
    """Embedding-free decoder block stack: attention (grouped-query), SwiGLU MLP, RMSNorm."""
    g = G(opset=23, seed=3)
    x = g.input(["B", 4, 8])
    h = g.op("MatMul", [x, g.w(8, D)])
    for _ in range(2):
        n = g.op("RMSNormalization", [h, g.w(D, positive=True)], axis=-1)
        h = g.op("Add", [h, attention(g, n, D, 4, kv_heads=2)])
        gate = g.op("MatMul", [h, g.w(D, FFN)])
        a = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]),
                         g.op("MatMul", [h, g.w(D, FFN)])])
        h = g.op("Add", [h, g.op("MatMul", [a, g.w(FFN, D)])])
    g.output(g.op("MatMul", [h, g.w(D, 5)]))
    return g.model()


def save_external(proto, d, name="m.onnx", location="m.onnx.data"):
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, name)
    onnx.save(proto, p, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=1024)  # every tensor over 1 KB
    return p


def digests(d) -> dict:
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(d))}


def run_file(path, feeds):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


@pytest.fixture
def small_ort_inline(monkeypatch):
    """Hand ONNX Runtime every referenced weight over 4 KiB in place (the huge-model path)
    rather than copying tensors under 1 MiB into the model."""
    monkeypatch.setattr(external, "ORT_INLINE_BYTES", 4096)


def test_streaming_prune_oracle_and_untouched_input(tmp_path, small_ort_inline):
    src = save_external(llm_like(), tmp_path / "in")
    before = digests(tmp_path / "in")
    model = load(src)
    assert model.streaming
    big = [k for k in model.consts if model.consts.ref(k) is not None]
    assert len(big) >= 10  # the weights are held by reference ...
    arr = model.consts[big[0]]
    assert not arr.flags.writeable  # ... and read through read-only memory maps
    res = spa.prune(model, ratio=0.5, do_verify=True, exact_only=True)
    assert res.verify.passed and res.plan.keep
    kinds = {res.analysis.groups[g].kind for g in res.plan.keep}
    assert kinds == {"channels", "heads"}
    pending = [t for t in res.proto.graph.initializer
               if isinstance(external.ref_of(t), external.Pending)]
    assert pending, "sliced weights should stay pending until written"
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    spa.save(res.proto, str(out), source=src)
    assert sorted(os.listdir(out.parent)) == ["p.onnx", "p.onnx.data"]
    saved = onnx.load(str(out), load_external_data=False)
    locs = {e.value for t in saved.graph.initializer for e in t.external_data
            if e.key == "location"}
    assert locs == {"p.onnx.data"}
    # the written file runs in ONNX Runtime and equals the in-memory pruned model
    feeds = dummy_inputs(model, seed=5)
    got = run_file(str(out), feeds)
    mem = session_for(res.proto).run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(got, mem))
    # and the same plan through the load-everything path gives the same outputs
    eager = load(src, stream=False)
    assert not eager.streaming
    res2 = spa.prune(eager, plan=res.plan)
    ref = session_for(res2.proto).run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    assert digests(tmp_path / "in") == before


def test_cli_prune_external_verify_and_determinism(tmp_path, capsys):
    src = save_external(llm_like(), tmp_path / "in")
    before = digests(tmp_path / "in")
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}" / "p.onnx"
        out.parent.mkdir()
        assert cli(["prune", src, "-o", str(out), "--verify", "--exact-only"]) == 0
        assert "PASS" in capsys.readouterr().out
        assert sorted(os.listdir(out.parent)) == ["p.onnx", "p.onnx.data"]
        outs.append(digests(out.parent))
    assert outs[0] == outs[1], "same input and options must give byte-identical files"
    assert digests(tmp_path / "in") == before
    assert cli(["verify", src, str(tmp_path / "o0" / "p.onnx")]) == 0
    assert "PASS" in capsys.readouterr().out


def test_never_writes_over_an_input_data_file(tmp_path):
    # the input's data file is called "w.data": an output named "w" would write "w.data"
    src = save_external(llm_like(), tmp_path, location="w.data")
    before = digests(tmp_path)
    res = spa.prune(load(src), ratio=0.5)
    with pytest.raises(SpaError, match="never writes over its input"):
        spa.save(res.proto, str(tmp_path / "w"), source=src)
    with pytest.raises(SpaError, match="never writes over its input"):
        save_atomic(res.proto, str(tmp_path / "w.data"))
    assert digests(tmp_path) == before


def test_changed_source_is_refused_and_nothing_written(tmp_path):
    src = save_external(llm_like(), tmp_path / "in")
    res = spa.prune(load(src), ratio=0.5)
    with open(src + ".data", "ab") as f:  # someone rewrites the weights meanwhile
        f.write(b"\0" * 8)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SpaError, match="changed while SPA was reading"):
        spa.save(res.proto, str(out / "p.onnx"), source=src)
    assert os.listdir(out) == []


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    src = save_external(llm_like(), tmp_path / "in")
    res = spa.prune(load(src), ratio=0.5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "p.onnx").write_bytes(b"old output")

    def boom(self, ref):
        raise OSError("disk full")
    monkeypatch.setattr(external.DataWriter, "write_tensor", boom)
    with pytest.raises(OSError, match="disk full"):
        spa.save(res.proto, str(out / "p.onnx"), source=src)
    assert sorted(os.listdir(out)) == ["p.onnx"]  # no temporary files, old file intact
    assert (out / "p.onnx").read_bytes() == b"old output"


def test_lowered_threshold_writes_external_data(tmp_path, capsys, monkeypatch):
    """The > 2 GB switch, exercised on a small in-memory model (SPA_EXTERNAL_DATA_THRESHOLD
    in bytes; protobuf's own limit is 2 GB)."""
    src = tmp_path / "m.onnx"
    onnx.save(llm_like(), src)  # one file, no external data
    feeds = dummy_inputs(spa.load(str(src)), seed=1)
    for k, limit in enumerate(("20000", None)):
        if limit:
            monkeypatch.setenv("SPA_EXTERNAL_DATA_THRESHOLD", limit)
        else:
            monkeypatch.delenv("SPA_EXTERNAL_DATA_THRESHOLD", raising=False)
        out = tmp_path / f"o{k}" / "p.onnx"
        out.parent.mkdir()
        assert cli(["prune", str(src), "-o", str(out), "--verify", "--exact-only"]) == 0
        assert "PASS" in capsys.readouterr().out
        files = sorted(os.listdir(out.parent))
        if limit:
            assert files == ["p.onnx", "p.onnx.data"]
            assert os.path.getsize(out) < 20000 < os.path.getsize(str(out) + ".data")
        else:
            assert files == ["p.onnx"]
        a = run_file(str(out), feeds)
        b = session_for(onnx.load(str(out))).run(None, feeds)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    monkeypatch.setenv("SPA_EXTERNAL_DATA_THRESHOLD", "lots")
    assert cli(["prune", str(src), "-o", str(tmp_path / "x.onnx")]) == 3
    assert "SPA_EXTERNAL_DATA_THRESHOLD" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_threshold_parameter_and_replacing_an_external_output(tmp_path):
    proto = llm_like()
    out = tmp_path / "p.onnx"
    save_atomic(proto, str(out), threshold=10_000)
    assert sorted(os.listdir(tmp_path)) == ["p.onnx", "p.onnx.data"]
    first = digests(tmp_path)
    save_atomic(proto, str(out), threshold=10_000)  # same bytes again, over the old files
    assert digests(tmp_path) == first
    m = load(str(out))
    assert m.streaming
    np.testing.assert_array_equal(
        m.consts[proto.graph.initializer[1].name],
        onnx.numpy_helper.to_array(proto.graph.initializer[1]))
    save_atomic(m.proto, str(tmp_path / "single.onnx"), external_data=False)
    assert onnx.load(str(tmp_path / "single.onnx")).graph.initializer[1].raw_data
