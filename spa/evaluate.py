"""Accuracy on a labelled data set, and the gate a deployment pipeline puts after pruning.

Data sets (`load_dataset`):

- `fashion-mnist`: the test split (10 000 images) of the IDX files of Debian's
  `dataset-fashion-mnist` package in /usr/share/datasets/fashion-mnist (or $SPA_FMNIST_DIR),
  fed to the model's first input as float32 N x 1 x 28 x 28 in [0, 1];
- a directory of IDX files (`t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`,
  or exactly one `*images*` and one `*labels*` file), read the same way;
- `FILE.npz`: one array per graph input, keyed by the input's name (first axis: samples),
  and optionally `labels` (int, one per sample). Without labels only the output deviation
  can be judged.

spa reads the IDX format itself (a few lines of numpy): it may not import the reference zoo
(models/), which depends on it.

The gate (`gate`) runs the original and the pruned model on the same samples and fails when
the top-1 accuracy drops by more than `max_drop` points (percentage points), or when the
relative output deviation ||pruned - original|| / ||original|| (L2 over all outputs and
samples) exceeds `max_deviation` -- the check for models that are not classifiers, or data
without labels. A failed gate is a `GateError`: the CLI exits with code 4 and writes nothing.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np

from .errors import SpaError, UsageError

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_HINT = "apt-get install dataset-fashion-mnist"
NAMED = ("fashion-mnist", "fmnist")


class GateError(SpaError):
    """The pruned model fails the accuracy / deviation gate. CLI exit code 4."""

    exit_code = 4


@dataclass
class Dataset:
    name: str
    inputs: dict            # graph input name (or None: the model's first input) -> array
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


# ------------------------------------------------------------------------------------------
# reading


def read_idx(path: str) -> np.ndarray:
    """One IDX file (optionally gzipped): big-endian header (0, 0, type, ndim), one uint32
    per dimension, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SpaError(f"cannot read the IDX file ({exc})", file=path)
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
             0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in types:
        raise SpaError(f"not an IDX file (header {data[:4]!r})", file=path)
    dt = np.dtype(types[data[2]])
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise SpaError("truncated IDX header", file=path)
    shape = tuple(int(x) for x in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    n = int(np.prod(shape)) if shape else 0
    if len(data) - offset != n * dt.itemsize:
        raise SpaError(f"IDX header says {shape} ({n * dt.itemsize} bytes), the file holds "
                       f"{len(data) - offset}", file=path)
    return np.frombuffer(data, dt, offset=offset).reshape(shape).astype(dt.newbyteorder("="))


def _find_idx(d: str) -> tuple[str, str]:
    files = sorted(os.listdir(d))
    for img, lbl in (("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                     ("test-images-idx3-ubyte", "test-labels-idx1-ubyte")):
        for ext in (".gz", ""):
            if img + ext in files and lbl + ext in files:
                return os.path.join(d, img + ext), os.path.join(d, lbl + ext)
    imgs = [f for f in files if "idx" in f and "images" in f]
    lbls = [f for f in files if "idx" in f and "labels" in f]
    if len(imgs) == 1 and len(lbls) == 1:
        return os.path.join(d, imgs[0]), os.path.join(d, lbls[0])
    raise SpaError("no IDX test split here: expected t10k-images-idx3-ubyte[.gz] and "
                   "t10k-labels-idx1-ubyte[.gz] (or exactly one *images* and one *labels* "
                   "IDX file)", file=d)


def _from_idx(name: str, d: str) -> Dataset:
    img_path, lbl_path = _find_idx(d)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise SpaError(f"images {images.shape} and labels {labels.shape} do not match", file=d)
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= np.float32(255.0)
    if x.ndim == 3:                   # N x H x W -> N x 1 x H x W (one channel)
        x = x[:, None]
    return Dataset(name, {None: np.ascontiguousarray(x)}, labels.astype(np.int64))


def load_dataset(spec: str) -> Dataset:
    """`fashion-mnist`, a directory of IDX files, or an .npz file (see the module doc)."""
    if spec.lower() in NAMED:
        d = os.environ.get("SPA_FMNIST_DIR", FMNIST_DIR)
        if not os.path.isdir(d):
            raise SpaError(f"Fashion-MNIST is not installed: no directory {d}. Install it "
                           f"with `{FMNIST_HINT}` (as root), point SPA_FMNIST_DIR at a folder "
                           "of its IDX files, or pass --eval FILE.npz")
        return _from_idx("fashion-mnist", d)
    if os.path.isdir(spec):
        return _from_idx(spec, spec)
    if not os.path.isfile(spec):
        raise UsageError(f"no data set {spec!r}: give fashion-mnist, a directory of IDX files "
                         "or an .npz file (arrays keyed by input name, plus `labels`)")
    try:
        with np.load(spec, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error
        raise SpaError(f"not a readable .npz file ({type(exc).__name__}: {exc})", file=spec)
    labels = arrays.pop("labels", None)
    if not arrays:
        raise SpaError("the .npz file holds no input arrays (one per graph input, keyed by "
                       "its name)", file=spec)
    n = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(n) != 1 or -1 in n:
        raise SpaError("the input arrays must share their first axis (the samples)", file=spec)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != n.pop() or \
                not np.issubdtype(labels.dtype, np.integer):
            raise SpaError("`labels` must be integers, one per sample", file=spec)
        labels = labels.astype(np.int64)
    return Dataset(spec, arrays, labels)


# ------------------------------------------------------------------------------------------
# running


def _inputs(proto, consts=()) -> list:
    init = {t.name for t in proto.graph.initializer} | set(consts)
    return [v for v in proto.graph.input if v.name not in init]


def bind(dataset: Dataset, proto) -> tuple[dict, int | None]:
    """Feeds (input name -> all samples) and the batch size the model fixes (or None)."""
    ins = _inputs(proto)
    names = [v.name for v in ins]
    feeds = {}
    for key, arr in dataset.inputs.items():
        name = names[0] if key is None and names else key
        if name not in names:
            raise SpaError(f"the data set has an array {name!r} but the model's inputs are "
                           f"{names}", file=dataset.name)
        feeds[name] = arr
    missing = [n for n in names if n not in feeds]
    if missing:
        raise SpaError(f"the data set gives no array for the model input(s) {missing}",
                       file=dataset.name)
    fixed = None
    for v in ins:
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            fixed = int(dims[0].dim_value)
    return feeds, fixed


def run(proto, dataset: Dataset, *, provider: str = "cpu", threads: int = 0,
        batch: int = 256, limit: int | None = None) -> list[np.ndarray]:
    """All outputs of the model on the data set's samples (in batches)."""
    from .bench import make_session
    feeds, fixed = bind(dataset, proto)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    step = fixed or batch
    sess = make_session(proto, provider, threads)
    out_names = [o.name for o in sess.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in out_names]
    types = {v.name: v.type.tensor_type.elem_type for v in _inputs(proto)}
    from .runtime import _NP
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk = {}
        for k, arr in feeds.items():
            a = np.asarray(arr[start:stop])
            if k in types and types[k] in _NP:
                a = a.astype(_NP[types[k]], copy=False)
            if fixed and stop - start < fixed:   # a model with a fixed batch: pad, then cut
                pad = np.zeros((fixed - (stop - start),) + a.shape[1:], a.dtype)
                a = np.concatenate([a, pad])
            chunk[k] = np.ascontiguousarray(a)
        try:
            res = sess.run(out_names, chunk)
        except Exception as exc:  # noqa: BLE001 - wrong shapes / types: say which
            shapes = {k: v.shape for k, v in chunk.items()}
            raise SpaError(f"the model does not run on the data set's samples {shapes} "
                           f"({type(exc).__name__}: {exc})", file=dataset.name)
        for p, r in zip(parts, res):
            p.append(np.asarray(r)[:stop - start])
    return [np.concatenate(p) for p in parts]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose largest logit (last axis) is the label."""
    if logits.ndim < 2 or logits.shape[0] != labels.shape[0]:
        raise SpaError(f"the first output {logits.shape} is not one score vector per sample "
                       f"({labels.shape[0]} samples): not a classifier, use --max-deviation")
    pred = logits.reshape(logits.shape[0], -1, logits.shape[-1])[:, 0].argmax(axis=-1)
    return float((pred == labels).mean())


def deviation(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """||a - b|| / ||b|| over all outputs and samples (L2)."""
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(a, b))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b)
    return float(np.sqrt(num / den)) if den > 0 else (0.0 if num == 0 else float("inf"))


def evaluate(proto, dataset: Dataset, **kw) -> dict:
    """{"samples", "accuracy" (None without labels)} of one model."""
    outs = run(proto, dataset, **kw)
    n = outs[0].shape[0] if outs else 0
    acc = top1(outs[0], dataset.labels[:n]) if dataset.labels is not None else None
    return {"samples": int(n), "accuracy": acc}


@dataclass
class GateResult:
    dataset: str
    samples: int
    accuracy_before: float | None
    accuracy_after: float | None
    deviation: float
    max_drop: float | None
    max_deviation: float | None

    @property
    def drop(self) -> float | None:
        """Accuracy lost, in percentage points (negative: the pruned model is better)."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return 100.0 * (self.accuracy_before - self.accuracy_after)

    @property
    def failures(self) -> list[str]:
        out = []
        if self.max_drop is not None and self.drop is not None and self.drop > self.max_drop:
            out.append(f"top-1 accuracy dropped {self.drop:.2f} points "
                       f"({100 * self.accuracy_before:.2f}% -> {100 * self.accuracy_after:.2f}%"
                       f"), more than --max-drop {self.max_drop:g}")
        if self.max_deviation is not None and not self.deviation <= self.max_deviation:
            out.append(f"relative output deviation {self.deviation:.4g} exceeds "
                       f"--max-deviation {self.max_deviation:g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        parts = [f"eval on {self.dataset} ({self.samples} samples):"]
        if self.drop is not None:
            parts.append(f"top-1 {100 * self.accuracy_before:.2f}% -> "
                         f"{100 * self.accuracy_after:.2f}% ({-self.drop:+.2f} points)")
        parts.append(f"output deviation {self.deviation:.4g}")
        gated = self.max_drop is not None or self.max_deviation is not None
        if gated:
            parts.append("gate PASS" if self.passed else "gate FAIL")
        return " ".join(parts)

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "samples": self.samples,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "drop_points": self.drop, "deviation": self.deviation,
                "max_drop": self.max_drop, "max_deviation": self.max_deviation,
                "passed": self.passed, "failures": self.failures}


def check_gate_args(dataset, max_drop, max_deviation) -> None:
    """Usage errors before anything is loaded."""
    if max_drop is not None and dataset is None:
        raise UsageError("--max-drop needs --eval fashion-mnist|DIR|FILE.npz (labelled data)")
    if max_drop is not None and not max_drop >= 0:
        raise UsageError(f"--max-drop must be >= 0 points, got {max_drop}")
    if max_deviation is not None and not max_deviation >= 0:
        raise UsageError(f"--max-deviation must be >= 0, got {max_deviation}")


def gate(original, pruned, dataset: Dataset | None, *, max_drop: float | None = None,
         max_deviation: float | None = None, provider: str = "cpu", threads: int = 0,
         batch: int = 256, limit: int | None = None, seed: int = 0) -> GateResult:
    """Run both models on the data set (or, without one, on seeded random inputs: then only
    the deviation is judged) and judge the pruned one. Never raises on a failed gate; the
    caller decides (GateResult.passed)."""
    if dataset is None:
        from .ir.model import from_proto
        from .runtime import dummy_inputs
        m = from_proto(original, infer=False)
        feeds = {}
        for s in range(4):
            for k, v in dummy_inputs(m, seed=seed + s, sym_value=2).items():
                feeds.setdefault(k, []).append(v)
        dataset = Dataset("random inputs", {k: np.concatenate(v) for k, v in feeds.items()},
                          None)
        batch = 2
    elif max_drop is not None and dataset.labels is None:
        raise UsageError(f"{dataset.name} has no `labels`: the accuracy gate (--max-drop) "
                         "needs them; use --max-deviation for unlabelled data")
    kw = dict(provider=provider, threads=threads, batch=batch, limit=limit)
    a, b = run(original, dataset, **kw), run(pruned, dataset, **kw)
    n = a[0].shape[0] if a else 0
    acc_a = acc_b = None
    if dataset.labels is not None:
        try:
            acc_a, acc_b = top1(a[0], dataset.labels[:n]), top1(b[0], dataset.labels[:n])
        except SpaError:
            if max_drop is not None:
                raise
    return GateResult(dataset.name, int(n), acc_a, acc_b, deviation(b, a), max_drop,
                      max_deviation)
