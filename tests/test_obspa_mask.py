"""OBSPA on padded sequences: the positions a 0/1 attention mask marks as padding are left
out of the Hessians and of the least-squares fits (the model ignores them), read from the
model's mask input or from an explicit `row_mask` array of the calibration file."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import spa
from models.synthetic import G
from spa.activations import load_calibration, run_outputs
from spa.analysis import analyze
from spa.criteria.obspa import collect_hessians, find_consumers
from spa.errors import SpaError
from spa.ir.model import from_proto
from spa.runtime import session_for

N, S, D, HID = 48, 6, 8, 16


def pooled_ffn(seed=0):
    """x[N,S,8], attention_mask[N,S] -> FFN (MatMul+Add, Relu, MatMul+Add) per position ->
    mean over the positions the mask keeps -> y[N,4]: what a sentence encoder does."""
    g = G(seed=seed)
    x = g.input(["N", S, D], name="x")
    m = g.input(["N", S], onnx.TensorProto.INT64, name="attention_mask")
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((D, HID)).astype(np.float32)
    b1 = rng.uniform(-0.2, 0.3, HID).astype(np.float32)
    w2 = rng.standard_normal((HID, 4)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, g.const(w1, "w1")]), g.const(b1, "b1")])])
    y = g.op("Add", [g.op("MatMul", [h, g.const(w2, "w2")]), g.const(b2, "b2")])
    mf = g.op("Unsqueeze", [g.op("Cast", [m], to=onnx.TensorProto.FLOAT),
                            g.const(np.array([2], np.int64), "ax")])
    num = g.op("ReduceSum", [g.op("Mul", [y, mf]), g.const(np.array([1], np.int64), "ax1")],
               keepdims=0)
    den = g.op("ReduceSum", [mf, g.const(np.array([1], np.int64), "ax2")], keepdims=0)
    g.output(g.op("Div", [num, den]))
    return g.model()


def padded_feeds(seed: int, n: int = N):
    """Real positions: standard normal; padding: large values of another distribution."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, S + 1, n)
    mask = (np.arange(S)[None, :] < lengths[:, None]).astype(np.int64)
    x = rng.standard_normal((n, S, D)).astype(np.float32)
    pad = 6.0 + 4.0 * rng.standard_normal((n, S, D)).astype(np.float32)
    x = np.where(mask[:, :, None] == 1, x, pad).astype(np.float32)
    return {"x": x, "attention_mask": mask}


def consumer_of(model, weight):
    (c,) = [c for c in find_consumers(analyze(model)) if c.weight == weight]
    return c


def test_mask_input_is_found_and_hessian_uses_real_rows_only(tmp_path):
    model = from_proto(pooled_ffn())
    feeds = padded_feeds(1)
    np.savez(tmp_path / "c.npz", **feeds)
    cal = load_calibration(str(tmp_path / "c.npz"), model)
    assert cal.row_mask is not None and (cal.row_mask == feeds["attention_mask"]).all()
    assert any("attention_mask" in n and "padding" in n for n in cal.notes)
    c = consumer_of(model, "w2")
    h = run_outputs(model.proto, [c.x], cal, limit=N)[c.x].astype(np.float64)
    real = h[feeds["attention_mask"] == 1]                  # (rows, HID)
    (H,), info = collect_hessians(model, [c], cal)
    aug = np.hstack([real, np.ones((len(real), 1))])
    assert info["rows"][c.node] == len(real)
    np.testing.assert_allclose(H, aug.T @ aug / len(real), rtol=1e-5, atol=1e-6)
    # without the mask every position counts, and the padding changes H
    cal.row_mask = None
    (H_all,), info = collect_hessians(model, [c], cal)
    assert info["rows"][c.node] == N * S
    assert np.abs(H_all - H).max() > 0.1 * np.abs(H).max()


def test_explicit_row_mask_overrides_and_is_validated(tmp_path):
    model = from_proto(pooled_ffn())
    feeds = padded_feeds(1)
    np.savez(tmp_path / "ones.npz", **feeds, row_mask=np.ones((N, S), np.int8))
    cal = load_calibration(str(tmp_path / "ones.npz"), model)
    assert cal.row_mask is None        # all real: nothing left out, the input is not used
    first = np.zeros((N, S), np.int64)
    first[:, 0] = 1
    np.savez(tmp_path / "first.npz", **feeds, row_mask=first)
    cal = load_calibration(str(tmp_path / "first.npz"), model)
    assert (cal.row_mask == first.astype(bool)).all()
    (H,), info = collect_hessians(model, [consumer_of(model, "w2")], cal)
    assert sum(info["rows"].values()) == N
    for bad, why in ((np.ones((N, S + 1)), "shape"), (np.full((N, S), 2), "only 0 and 1")):
        np.savez(tmp_path / "bad.npz", **feeds, row_mask=bad)
        with pytest.raises(SpaError, match=why):
            load_calibration(str(tmp_path / "bad.npz"), model)


def test_masked_rows_fit_what_the_model_outputs(tmp_path):
    """Fitting padding rows wastes the least squares on positions the pooled output never
    sees: with the mask, the pruned model's output error on held-out data is lower."""
    proto = pooled_ffn()
    model = from_proto(proto)
    feeds = padded_feeds(1, 256)
    np.savez(tmp_path / "masked.npz", **feeds)
    np.savez(tmp_path / "unmasked.npz", **feeds, row_mask=np.ones((256, S), np.int8))
    test = padded_feeds(2, 256)
    y0 = session_for(proto).run(None, test)[0]
    errs = {}
    for kind in ("masked", "unmasked"):
        res = spa.prune(model, criterion="obspa", calib=str(tmp_path / f"{kind}.npz"),
                        ratio=0.5)
        y = session_for(res.proto).run(None, test)[0]
        errs[kind] = float(np.linalg.norm(y - y0) / np.linalg.norm(y0))
    assert errs["masked"] < 0.8 * errs["unmasked"], errs


def test_ratio_per_group_kind():
    """A ratio per group kind: a quarter of the heads and half of the other channels."""
    from models.synthetic import bert_base_like
    model = from_proto(bert_base_like(layers=1, hidden=32, heads=4, ffn=64, seq=8, vocab=50))
    res = spa.prune(model, ratio={"heads": 0.25, "channels": 0.5}, do_verify=True,
                    exact_only=True)
    groups = res.analysis.groups
    kinds = {g.kind for g in groups}
    assert {"heads", "channels"} <= kinds
    for g in groups:
        r = {"heads": 0.25, "channels": 0.5}.get(g.kind, 0.0) if g.exact else 0.0
        kept = len(res.plan.keep.get(g.id, range(g.channels)))
        assert kept == g.channels - int(np.floor(r * g.channels)), (g.kind, g.channels, kept)
    assert res.verify.passed
    with pytest.raises(spa.errors.UsageError, match="group kind"):
        spa.prune(model, ratio={"heads": 1.5})
