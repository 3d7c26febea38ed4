"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read with numpy only.

The zoo's trained models are judged on this data set because a Debian package ships it:
nothing is downloaded at run time, and the same bytes are on every machine. This module
must stay importable with numpy alone (no torch, no onnxruntime at module level), so that
the core's accuracy checks and the tests can use it without a training stack.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DATA_DIR = Path(os.environ.get("SPA_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

# Per-pixel statistics of the 60k training images in [0, 1]; the models put these inside
# the graph (first op), so an ONNX file takes raw pixels.
MEAN = 0.2860
STD = 0.3530

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(stem: str, data_dir: Path) -> Path:
    """The IDX file ``stem`` in ``data_dir``, gzipped or not."""
    for name in (stem + ".gz", stem):
        path = data_dir / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {data_dir / (stem + '.gz')} (nor {data_dir / stem}). "
        f"Install the data set with `{INSTALL_HINT}` (as root), or point SPA_FMNIST_DIR "
        "at a folder holding the IDX files."
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (big-endian header: magic, then one uint32 per dimension)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type {data[2]:#x} is not uint8 (0x08)")
    ndim = data[3]
    shape = tuple(int(x) for x in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    n = int(np.prod(shape)) if shape else 0
    if len(data) - offset != n:
        raise ValueError(f"{path}: header says {shape} = {n} bytes, file has {len(data) - offset}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def load_fmnist(split: str = "train", data_dir: str | Path | None = None):
    """Return ``(images, labels)`` of one split.

    images: float32, N×1×28×28, values in [0, 1] (raw pixels / 255; the models normalise);
    labels: int64, N, in 0..9. ``split`` is 'train' (60000) or 'test' (10000).
    The arrays are cached per process and returned read-only; copy before changing them.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    key = (str(data_dir), split)
    if key not in _CACHE:
        img_stem, lbl_stem = _FILES[split]
        raw = _read_idx(_find(img_stem, data_dir))
        labels = _read_idx(_find(lbl_stem, data_dir)).astype(np.int64)
        if raw.ndim != 3 or raw.shape[1:] != (28, 28) or raw.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{data_dir}: unexpected Fashion-MNIST shapes {raw.shape} / {labels.shape}"
            )
        images = (raw.astype(np.float32) / np.float32(255.0))[:, None, :, :]
        images.flags.writeable = False
        labels.flags.writeable = False
        _CACHE[key] = (images, labels)
    return _CACHE[key]


def available(data_dir: str | Path | None = None) -> bool:
    """True when all four IDX files are present (for skipping tests and report columns)."""
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    try:
        for stems in _FILES.values():
            for stem in stems:
                _find(stem, data_dir)
    except FileNotFoundError:
        return False
    return True


def write_calib(path, n: int = 512, seed: int = 0, input_name: str = "input") -> Path:
    """Write a calibration set of ``n`` training images to ``path`` (.npz).

    Keys: ``input_name`` -> float32 n×1×28×28 in [0, 1] (first axis = samples), and
    ``labels`` -> int64 n. Drawn without replacement from the TRAINING split with a seeded
    generator, so it never overlaps the test set used for accuracy. Written atomically.
    """
    if input_name == "labels":
        raise ValueError("input_name 'labels' would collide with the labels array")
    images, labels = load_fmnist("train")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(images.shape[0], size=n, replace=False))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _write_npz(tmp, {input_name: np.ascontiguousarray(images[idx]), "labels": labels[idx].copy()})
    os.replace(tmp, path)
    return path


def _write_npz(path: Path, arrays: dict) -> None:
    """np.savez_compressed with fixed zip timestamps, so the same arrays give the same bytes."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def evaluate_onnx(path, batch: int = 500, limit: int | None = None,
                  providers=("CPUExecutionProvider",), threads: int = 0) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of an ONNX classifier on the test split.

    The model must take raw [0, 1] pixels N×1×28×28 as its first input and return 10
    logits as its first output. ``limit`` evaluates only the first ``limit`` test images;
    ``threads`` > 0 caps ONNX Runtime's intra-op threads (0: its default).
    """
    import onnxruntime as ort  # lazy: this module is importable with numpy alone

    images, labels = load_fmnist("test")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=list(providers))
    input_name = sess.get_inputs()[0].name
    correct = 0
    for start in range(0, images.shape[0], batch):
        x = np.ascontiguousarray(images[start:start + batch])
        logits = sess.run(None, {input_name: x})[0]
        correct += int((np.asarray(logits).argmax(axis=1) == labels[start:start + batch]).sum())
    return correct / images.shape[0]
