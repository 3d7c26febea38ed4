"""Fashion-MNIST loading, the calibration set, and the committed trained models.

Reads the real IDX files from Debian's dataset-fashion-mnist package; the data tests skip
(saying how to install it) where the package is missing.
"""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from models import fmnist

TRAINED = Path(__file__).resolve().parents[1] / "models" / "trained"
NEED_DATA = pytest.mark.skipif(
    not fmnist.available(),
    reason=f"Fashion-MNIST not found in {fmnist.DATA_DIR}: `{fmnist.INSTALL_HINT}`",
)


@NEED_DATA
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_loader_shapes_dtypes_ranges(split, n):
    x, y = fmnist.load_fmnist(split)
    assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert 0.2 < float(x[:2000].mean()) < 0.4  # raw pixels, not normalised
    assert set(np.unique(y).tolist()) == set(range(10))
    assert np.bincount(y).min() == n // 10  # Fashion-MNIST is exactly balanced


def test_loader_rejects_bad_split():
    with pytest.raises(ValueError, match="train"):
        fmnist.load_fmnist("val")


def test_missing_files_error_names_path_and_package(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        fmnist.load_fmnist("test", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert not fmnist.available(tmp_path)


def _write_idx(path, arr, gz):
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_parser_on_synthetic_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    lbl = np.arange(7, dtype=np.uint8) % 10
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", img, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", lbl, gz)
    x, y = fmnist.load_fmnist("test", data_dir=tmp_path)
    assert x.shape == (7, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0] * 255, img.astype(np.float32))
    np.testing.assert_array_equal(y, lbl.astype(np.int64))


def test_idx_parser_rejects_truncated_file(tmp_path):
    p = tmp_path / "t10k-labels-idx1-ubyte"
    p.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="bytes"):
        fmnist._read_idx(p)


@NEED_DATA
def test_write_calib_layout_and_determinism(tmp_path):
    a = fmnist.write_calib(tmp_path / "a.npz", n=64, seed=3, input_name="x")
    b = fmnist.write_calib(tmp_path / "b.npz", n=64, seed=3, input_name="x")
    assert a.read_bytes() == b.read_bytes()  # same options, same bytes
    d = np.load(a)
    assert sorted(d.files) == ["labels", "x"]
    assert d["x"].shape == (64, 1, 28, 28) and d["x"].dtype == np.float32
    assert d["labels"].shape == (64,) and d["labels"].dtype == np.int64
    # drawn from the training split: each sample is a training image with its label
    train_x, train_y = fmnist.load_fmnist("train")
    flat = train_x.reshape(len(train_x), -1)
    for i in (0, 63):
        j = np.flatnonzero((flat == d["x"][i].reshape(-1)).all(1))
        assert len(j) and d["labels"][i] in train_y[j]


@pytest.mark.skipif(not (TRAINED / "fmnist_calib512.npz").exists(), reason="no calib file")
def test_committed_calib_file():
    d = np.load(TRAINED / "fmnist_calib512.npz")
    assert sorted(d.files) == ["input", "labels"]
    x, y = d["input"], d["labels"]
    assert x.shape == (512, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (512,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and 0 <= y.min() and y.max() <= 9


TRAINED_MODELS = sorted(TRAINED.glob("*.onnx"))


@NEED_DATA
@pytest.mark.parametrize("onnx_path", TRAINED_MODELS, ids=[p.stem for p in TRAINED_MODELS])
def test_trained_model_matches_recorded_accuracy(onnx_path):
    pytest.importorskip("onnxruntime")
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    assert meta["name"] == onnx_path.stem
    assert meta["input_shape"] == [1, 1, 28, 28]
    assert meta["path"] == f"models/trained/{onnx_path.name}"
    acc = fmnist.evaluate_onnx(onnx_path, limit=2000)
    assert abs(acc - meta["accuracy"]) <= 0.015, (acc, meta["accuracy"])


def test_trained_table_in_docs_is_current():
    from models import trained_table
    assert trained_table.current_block() == trained_table.block(), (
        "docs/zoo.md's trained-model table is stale: python -m models.trained_table --write")


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("onnx_path", TRAINED_MODELS, ids=[p.stem for p in TRAINED_MODELS])
def test_trained_model_prunes_under_the_oracle(onnx_path, ratio):
    """Every committed trained model, pruned at 30 % and 50 % of every group, passes the
    masked-equivalence oracle (the plan's exact part when it also has approximate groups)."""
    pytest.importorskip("onnxruntime")
    import spa
    from spa.rewrite.apply import check
    from oracle_util import assert_oracle_passes
    model = spa.load(str(onnx_path))
    res = spa.prune(model, ratio=ratio, do_verify=True, seed=1)
    check(res.proto, model.proto)
    assert res.after["params"] < 0.9 * res.before["params"]
    assert_oracle_passes(model, res, ratio)
