"""Fine-tuning a pruned ONNX model without its source framework (`spa finetune`).

A pruned model usually needs a little training to recover its accuracy, and going back to
the framework it came from (mapping the plan onto a Keras or PaddlePaddle model, training
there, exporting again) is exactly the dependency SPA avoids. Here the ONNX graph itself is
trained: `spa.engine` evaluates it with JAX (differentiable, jit-compiled), optax updates the
parameters, and the output is the *same graph* -- same nodes, names, shapes and dtypes --
with only the values of the initializers (and Constant-node weights) replaced.

Training
    SGD with Nesterov momentum (default) or AdamW; cosine, one-cycle or constant learning
    rate over all steps; weight decay on weights of rank >= 2 only (not on biases or norm
    parameters); a seeded shuffle per epoch; the last partial batch of an epoch is dropped
    (every step has the same shapes, so the step is compiled once). Optional augmentation of
    image inputs: random crop after 2-pixel zero padding and/or horizontal flip.

Loss
    cross-entropy on the labels; with a teacher (the unpruned model, run by ONNX Runtime on
    the same augmented batch) ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``
    (Hinton et al.'s distillation). Without labels, distillation alone (alpha = 1); for an
    output that is not one score vector per sample, the mean squared error to the teacher's
    outputs.

BatchNormalization (``bn``)
    An ONNX BatchNormalization normalises with its stored running statistics. After
    pruning those statistics are stale: every channel that fed a BN lost some of its inputs,
    so its mean and variance moved. Re-estimating them from data ("BN recalibration") is
    known to recover much of the accuracy lost by pruning on its own, and training with
    fixed statistics would fit the weights to the stale ones. So, by default (``batch``),
    training does what the frameworks do: every BatchNormalization normalises with the
    statistics of the batch it sees (the graph that is trained feeds each BN the per-channel
    mean and variance of its input instead of its stored ones; gamma and beta keep their
    names and are trained), and the running statistics are recomputed from training samples
    (without augmentation) before every evaluation and for the model written: one pass in
    ONNX Runtime with the same batch-statistics graph, population mean and variance over
    ``bn_samples`` samples. ``--epochs 0`` therefore only recalibrates. ``fixed`` keeps the
    stored statistics and trains everything else (for batches too small for batch
    statistics, or to leave the statistics alone on purpose).

Data (`load_training_data`)
    ``fashion-mnist`` (the train split of the IDX files `spa eval` reads; the test split is
    evaluated after every epoch), a directory of IDX files (``train-images-idx3-ubyte[.gz]``
    and ``train-labels-idx1-ubyte[.gz]``, plus the test split if present), or ``FILE.npz``
    (one array per graph input, keyed by the input's name, first axis = samples, and
    optionally ``labels``). IDX images are N x 1 x H x W; a model whose input declares
    N x H x W x 1 (channels last, e.g. Keras) gets them transposed.

jax and optax are imported only when training starts: `import spa` never needs them.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import SpaError, UsageError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
BN_MODES = ("batch", "fixed")
AUGMENTS = ("none", "crop", "flip", "crop-flip")
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 5e-4, "adamw": 1e-2}
#: name suffix of the tensors the batch-statistics graph adds (never in a user's model)
TAG = "__spa_ft"


@dataclass
class Config:
    epochs: int = 1
    lr: float | None = None            # None: DEFAULT_LR[optimizer]
    optimizer: str = "sgd"
    schedule: str = "cosine"
    weight_decay: float | None = None  # None: DEFAULT_WD[optimizer]
    momentum: float = 0.9
    batch: int = 128
    seed: int = 0
    augment: str = "none"
    bn: str = "batch"
    bn_samples: int = 2048
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    limit: int | None = None           # train on a seeded random subset of N samples
    eval_limit: int | None = None
    threads: int = 0                   # ONNX Runtime threads (teacher, recalibration, eval)

    def check(self) -> None:
        """Usage errors, before anything is loaded."""
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r} (use {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r} (use {', '.join(SCHEDULES)})")
        if self.bn not in BN_MODES:
            raise UsageError(f"unknown --bn mode {self.bn!r} (use {', '.join(BN_MODES)})")
        if self.augment not in AUGMENTS:
            raise UsageError(f"unknown --augment {self.augment!r} (use {', '.join(AUGMENTS)})")
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            raise UsageError(f"--epochs must be an integer >= 0, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise UsageError(f"--wd must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.batch < 1:
            raise UsageError(f"--batch must be >= 1, got {self.batch}")
        if not 0 <= self.kd_alpha <= 1:
            raise UsageError(f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise UsageError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        for name, v in (("--limit", self.limit), ("--eval-limit", self.eval_limit),
                        ("--bn-samples", self.bn_samples)):
            if v is not None and v < 1:
                raise UsageError(f"{name} must be >= 1, got {v}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def wd(self) -> float:
        return self.weight_decay if self.weight_decay is not None else \
            DEFAULT_WD[self.optimizer]


# ------------------------------------------------------------------------------------------
# data


@dataclass
class TrainData:
    """Training samples bound to the model's inputs, and the test split (if any)."""
    name: str
    inputs: dict[str, np.ndarray]      # graph input name -> samples (first axis)
    labels: np.ndarray | None
    test: object | None = None         # spa.evaluate.Dataset keyed by input name
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def _idx_pair(d: str, split: str) -> tuple[str, str] | None:
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    for ext in (".gz", ""):
        img, lbl = (os.path.join(d, s + ext) for s in stems)
        if os.path.isfile(img) and os.path.isfile(lbl):
            return img, lbl
    return None


def _read_images(img: str, lbl: str) -> tuple[np.ndarray, np.ndarray]:
    from .evaluate import read_idx
    images, labels = read_idx(img), read_idx(lbl)
    if images.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise SpaError(f"images {images.shape} and labels {labels.shape} do not match",
                       file=img)
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= np.float32(255.0)
    if x.ndim == 3:
        x = x[:, None]
    return np.ascontiguousarray(x), labels.astype(np.int64)


def _input_dims(model, name: str) -> list:
    for v in model.graph.input:
        if v.name == name:
            return [d.dim_value if d.HasField("dim_value") else None
                    for d in v.type.tensor_type.shape.dim]
    return []


def _fit_layout(x: np.ndarray, dims: list) -> np.ndarray:
    """N x C x H x W images for a model that declares N x H x W x C: transpose."""
    if x.ndim == 4 and len(dims) == 4 and dims[3] == x.shape[1] and dims[1] != x.shape[1] \
            and (dims[1] in (None, x.shape[2])):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


def load_training_data(spec: str, model, *, test: str | None = None) -> TrainData:
    """`fashion-mnist`, a directory of IDX files or FILE.npz (see the module doc), bound to
    the model's graph inputs. `test`: another data set to evaluate on (default: the test
    split of fashion-mnist / the IDX directory; none for an .npz file)."""
    from .evaluate import FMNIST_DIR, FMNIST_HINT, NAMED, Dataset, bind, load_dataset
    names = model.input_names
    test_ds = None
    if spec.lower() in NAMED or os.path.isdir(spec):
        d = os.environ.get("SPA_FMNIST_DIR", FMNIST_DIR) if spec.lower() in NAMED else spec
        if not os.path.isdir(d):
            raise SpaError(f"Fashion-MNIST is not installed: no directory {d}. Install it "
                           f"with `{FMNIST_HINT}` (as root), point SPA_FMNIST_DIR at a folder "
                           "of its IDX files, or pass --data FILE.npz")
        pair = _idx_pair(d, "train")
        if pair is None:
            raise SpaError("no IDX training split here: expected train-images-idx3-ubyte[.gz] "
                           "and train-labels-idx1-ubyte[.gz]", file=d)
        if len(names) != 1:
            raise SpaError(f"IDX images feed one input, the model has {len(names)}: {names}; "
                           "use an .npz file keyed by input name", file=model.path)
        x, y = _read_images(*pair)
        x = _fit_layout(x, _input_dims(model, names[0]))
        name = "fashion-mnist" if spec.lower() in NAMED else spec
        data = TrainData(name, {names[0]: x}, y)
        if test is None and _idx_pair(d, "test") is not None:
            tx, ty = _read_images(*_idx_pair(d, "test"))
            test_ds = Dataset(f"{name} (test split)",
                              {names[0]: _fit_layout(tx, _input_dims(model, names[0]))}, ty)
    else:
        ds = load_dataset(spec)
        feeds, _ = bind(ds, model.proto)
        data = TrainData(spec, {k: _fit_layout(np.asarray(v), _input_dims(model, k))
                                for k, v in feeds.items()}, ds.labels)
    if test is not None:
        ds = load_dataset(test)
        feeds, _ = bind(ds, model.proto)
        test_ds = Dataset(ds.name, {k: _fit_layout(np.asarray(v), _input_dims(model, k))
                                    for k, v in feeds.items()}, ds.labels)
    data.test = test_ds
    for k, v in data.inputs.items():
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            raise SpaError(f"the training array {k!r} holds NaN or Inf", file=spec)
    _check_labels(data, model, spec)
    return data


def _check_labels(data: TrainData, model, spec: str) -> None:
    """Labels must index the classes of the model's first output (when its shape says how
    many there are): JAX would silently clamp an out-of-range index."""
    if data.labels is None or not model.output_names:
        return
    floats = [o for o in model.output_names if model.dtypes.get(o) in
              (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)]
    out = (floats or model.output_names)[0]    # the class output (as the engine picks it)
    shape = model.shapes.get(out)
    classes = shape[-1] if shape and isinstance(shape[-1], int) else None
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or (classes is not None and hi >= classes):
        raise SpaError(f"labels range over {lo}..{hi}, but the model's class output "
                       f"{out!r} has {classes} classes", file=spec)


def _subset(data: TrainData, limit: int | None, seed: int) -> TrainData:
    if limit is None or limit >= len(data):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=limit, replace=False))
    return TrainData(data.name, {k: v[idx] for k, v in data.inputs.items()},
                     None if data.labels is None else data.labels[idx], data.test,
                     data.notes + [f"trained on a seeded random subset of {limit} of "
                                   f"{len(data)} samples"])


def _image_inputs(data: TrainData) -> dict[str, int]:
    """Float rank-4 inputs and their channel axis (1: N x C x H x W, 3: N x H x W x C)."""
    out = {}
    for k, v in data.inputs.items():
        if v.ndim == 4 and np.issubdtype(v.dtype, np.floating):
            out[k] = 3 if v.shape[3] <= 4 < v.shape[1] else 1
    return out


def augment(x: np.ndarray, channel_axis: int, mode: str, rng: np.random.Generator,
            pad: int = 2) -> np.ndarray:
    """Random crop after `pad` pixels of zero padding and/or a random horizontal flip of a
    batch of images (N x C x H x W, or N x H x W x C with channel_axis 3)."""
    nhwc = channel_axis == 3
    if nhwc:
        x = x.transpose(0, 3, 1, 2)
    n, _, h, w = x.shape
    if "crop" in mode:
        padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        dy = rng.integers(0, 2 * pad + 1, n)
        dx = rng.integers(0, 2 * pad + 1, n)
        x = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if "flip" in mode:
        flip = rng.random(n) < 0.5
        x = np.where(flip[:, None, None, None], x[..., ::-1], x)
    if nhwc:
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


# ------------------------------------------------------------------------------------------
# BatchNormalization: batch-statistics graph and recalibration


@dataclass
class BNStat:
    node: str                  # node name (for messages)
    mean_init: str             # the running-mean initializer of the original model
    var_init: str
    batch_mean: str            # tensors of the batch-statistics graph
    batch_var: str


def batch_stats_graph(model) -> tuple[onnx.ModelProto, list[BNStat], list[str]]:
    """A copy of the model in which every inference BatchNormalization whose parameters
    are initializers normalises with the mean and (biased) variance of the batch it sees,
    as in training. The BN node itself stays (same name, gamma and beta the same
    initializers, same output): only its mean and variance inputs now come from two
    ReduceMean nodes over every axis but the channel axis. Those batch statistics are
    graph tensors, listed in the returned BNStat records (for recalibration). Also returns
    the names of the BatchNormalizations left as they are (statistics computed at run time
    or shared with another node, unknown input rank, training-mode nodes)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    g = proto.graph
    opset = model.opset
    nodes, stats, skipped, axes_made = [], [], [], set()
    for k, node in enumerate(g.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        r = model.rank(node.input[0]) if node.input else None
        # statistics written back must belong to this BN alone (exporters deduplicate
        # equal constants: two fresh BNs may share one all-zero mean)
        shared = len(node.input) >= 5 and (node.input[3] == node.input[4] or any(
            len(model.consumers.get(t, [])) != 1 for t in node.input[3:5]))
        if len(node.input) < 5 or len([o for o in node.output if o]) != 1 or shared or \
                r is None or r < 2 or not all(t in model.consts for t in node.input[1:5]) or \
                any(a.name == "training_mode" and a.i for a in node.attribute):
            nodes.append(node)
            skipped.append(model.node_name(node))
            continue
        axes = [0] + list(range(2, r))
        p = f"{node.output[0]}{TAG}{k}"
        x = node.input[0]
        axes_name = f"{TAG}_axes_r{r}"

        def mean(i, o, keep):
            if opset >= 18:
                if axes_name not in axes_made:
                    g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64),
                                                                 axes_name))
                    axes_made.add(axes_name)
                return helper.make_node("ReduceMean", [i, axes_name], [o], keepdims=keep,
                                        name=o)
            return helper.make_node("ReduceMean", [i], [o], axes=axes, keepdims=keep, name=o)
        bn = onnx.NodeProto()
        bn.CopyFrom(node)
        bn.input[3], bn.input[4] = p + "_mean", p + "_var"
        nodes += [mean(x, p + "_mean", 0), mean(x, p + "_mk", 1),
                  helper.make_node("Sub", [x, p + "_mk"], [p + "_d"], name=p + "_d"),
                  helper.make_node("Mul", [p + "_d", p + "_d"], [p + "_d2"], name=p + "_d2"),
                  mean(p + "_d2", p + "_var", 0), bn]
        stats.append(BNStat(model.node_name(node), node.input[3], node.input[4],
                            p + "_mean", p + "_var"))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return proto, stats, skipped


def recalibrate(train_proto: onnx.ModelProto, stats: list[BNStat], inputs: dict, n: int,
                *, batch: int = 256, threads: int = 0, path=None) -> dict[str, np.ndarray]:
    """Running statistics re-estimated on the first `n` samples of `inputs`: the
    population mean and variance of every BN's input, with every BN upstream normalising
    by its batch statistics (what a framework's running averages converge to, computed
    exactly). Returns {running-mean / running-var initializer name: value}."""
    from .activations import with_outputs
    from .runtime import session_for
    if not stats:
        return {}
    names = [t for s in stats for t in (s.batch_mean, s.batch_var)]
    sess = session_for(with_outputs(train_proto, names, only=True), threads=threads)
    total = min(n, len(next(iter(inputs.values()))))
    acc_m = {s.batch_mean: 0.0 for s in stats}
    acc_s = {s.batch_mean: 0.0 for s in stats}
    used = 0
    for start in range(0, total, batch):
        stop = min(total, start + batch)
        feeds = {k: np.ascontiguousarray(v[start:stop]) for k, v in inputs.items()}
        try:
            vals = dict(zip(names, sess.run(names, feeds)))
        except Exception as exc:  # ORT errors are plain RuntimeErrors
            raise SpaError(f"ONNX Runtime failed on the training samples while recomputing "
                           f"BatchNormalization statistics ({type(exc).__name__}: {exc})",
                           file=path)
        w = stop - start
        for s in stats:
            m = vals[s.batch_mean].astype(np.float64)
            acc_m[s.batch_mean] = acc_m[s.batch_mean] + w * m
            acc_s[s.batch_mean] = acc_s[s.batch_mean] + w * (vals[s.batch_var] + m * m)
        used += w
    out = {}
    for s in stats:
        m = acc_m[s.batch_mean] / used
        v = np.maximum(acc_s[s.batch_mean] / used - m * m, 0.0)
        out[s.mean_init], out[s.var_init] = m, v
    return out


# ------------------------------------------------------------------------------------------
# writing parameters back


def with_values(proto: onnx.ModelProto, values: dict[str, np.ndarray],
                path: str | None = None) -> onnx.ModelProto:
    """A copy of `proto` in which the initializers (and Constant-node tensors) named in
    `values` hold the new values, cast to their original dtype; names, shapes, dtypes and
    everything else unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    todo = dict(values)

    def fresh(t: onnx.TensorProto, value: np.ndarray) -> onnx.TensorProto:
        """`t` with new data (raw, little-endian) and every other field kept."""
        v = np.asarray(value)
        if tuple(v.shape) != tuple(t.dims):
            raise SpaError(f"internal error: new value of {t.name!r} has shape {v.shape}, "
                           f"the model's is {tuple(t.dims)}", file=path)
        new = onnx.TensorProto()
        new.CopyFrom(t)
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "external_data", "data_location"):
            new.ClearField(f)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        new.raw_data = numpy_helper.from_array(v.astype(dtype)).raw_data
        return new

    for i, t in enumerate(g.initializer):
        if t.name in todo:
            g.initializer[i].CopyFrom(fresh(t, todo.pop(t.name)))
    for node in g.node:
        if node.op_type == "Constant" and node.output and node.output[0] in todo:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    a.t.CopyFrom(fresh(a.t, todo.pop(node.output[0])))
    if todo:
        raise SpaError(f"internal error: no initializer or Constant node for {sorted(todo)[:5]}",
                       file=path)
    return out


# ------------------------------------------------------------------------------------------
# the training loop


@dataclass
class Result:
    proto: onnx.ModelProto
    history: list[dict]
    accuracy_before: float | None
    accuracy_after: float | None
    trained: list[str]                 # parameter names trained
    recalibrated: list[str]            # BN running statistics recomputed
    notes: list[str]
    seconds: float
    settings: dict = field(default_factory=dict)   # what the defaults resolved to

    def to_json(self) -> dict:
        return {"settings": self.settings, "history": self.history,
                "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "trained_parameters": len(self.trained),
                "recalibrated_statistics": len(self.recalibrated), "notes": self.notes,
                "seconds": round(self.seconds, 2)}


def _need_jax():
    try:
        import jax  # noqa: F401
        import optax  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"spa finetune trains with JAX and optax ({exc}): pip install "
                         "'spa-prune[jax]' -c constraints.txt")


def _teacher_session(teacher, model, threads: int):
    """ONNX Runtime session of the teacher; its inputs must be the student's."""
    from .runtime import session_for
    t_in = set(teacher.input_names)
    if t_in != set(model.input_names):
        raise UsageError(f"the teacher's inputs {sorted(t_in)} are not the pruned model's "
                         f"{sorted(model.input_names)}", file=teacher.path)
    return session_for(teacher.proto, threads=threads)


def _schedule(cfg: Config, steps: int):
    import optax
    lr = cfg.learning_rate
    steps = max(steps, 1)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps)
    if cfg.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(steps, lr, pct_start=0.15)
    return optax.constant_schedule(lr)


def _optimizer(cfg: Config, schedule, params: dict):
    import optax
    mask = {k: np.ndim(v) >= 2 for k, v in params.items()}
    if cfg.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=cfg.wd, mask=mask)
    return optax.chain(optax.add_decayed_weights(cfg.wd, mask),
                       optax.sgd(schedule, momentum=cfg.momentum or None,
                                 nesterov=cfg.momentum > 0))


def _final_softmax(model, name: str) -> bool:
    """Whether the output `name` is a Softmax over axis 1 (through Identity nodes)."""
    while name in model.producer and model.producer[name].op_type == "Identity":
        name = model.producer[name].input[0]
    node = model.producer.get(name)
    return node is not None and node.op_type == "Softmax" and node.domain in ("", "ai.onnx")


def _classifier(shape) -> bool:
    return len(shape) == 2 and shape[1] > 1


def _evaluate(proto, test, cfg: Config) -> float | None:
    if test is None or test.labels is None:
        return None
    from .evaluate import evaluate
    return evaluate(proto, test, threads=cfg.threads, limit=cfg.eval_limit)["accuracy"]


def finetune(model, data: TrainData, cfg: Config, *, teacher=None, log=print) -> Result:
    """Train the float parameters of `model` (a spa.ir.Model) on `data`; returns the model
    with the same graph and new parameter values (see the module doc)."""
    cfg.check()
    _need_jax()
    import jax
    import jax.numpy as jnp
    import optax
    from .engine import Engine
    from .ir.model import from_proto

    t0 = time.monotonic()
    notes = list(data.notes)
    if data.labels is None and teacher is None:
        raise UsageError(f"{data.name} has no `labels`: without labels the model can only "
                         "be trained to match a teacher; give --teacher ORIGINAL.onnx")
    data = _subset(data, cfg.limit, cfg.seed)
    n = len(data)
    fixed_batch = None
    for k in data.inputs:
        dims = _input_dims(model.proto, k)
        if dims and dims[0]:
            fixed_batch = dims[0]
    batch = fixed_batch or cfg.batch
    if fixed_batch and fixed_batch != cfg.batch:
        notes.append(f"the model fixes its batch size to {fixed_batch}: batches of "
                     f"{fixed_batch}")
    if n < batch:
        raise UsageError(f"{data.name} has {n} training samples, fewer than one batch of "
                         f"{batch}; lower --batch")
    steps_per_epoch = n // batch
    images = _image_inputs(data)
    if cfg.augment != "none" and not images:
        raise UsageError(f"--augment {cfg.augment} needs an image input (float, rank 4); "
                         f"{data.name} has none")

    # the graph that is trained, and the statistics that are recomputed
    stats: list[BNStat] = []
    if cfg.bn == "batch":
        train_proto, stats, skipped = batch_stats_graph(model)
        if skipped:
            notes.append(f"{len(skipped)} BatchNormalization(s) keep their stored statistics "
                         f"(statistics computed or shared with other nodes, unknown rank, training mode): "
                         f"{', '.join(skipped[:5])}")
    else:
        train_proto = model.proto
    if stats:
        notes.append(f"{len(stats)} BatchNormalization(s) trained with batch statistics; "
                     f"running statistics recomputed on {min(cfg.bn_samples, n)} training "
                     "samples")
    engine = Engine(from_proto(train_proto, path=model.path) if stats else model)
    running = {s.mean_init for s in stats} | {s.var_init for s in stats}
    if cfg.bn == "fixed":
        for node in model.nodes:
            if node.op_type == "BatchNormalization" and len(node.input) >= 5:
                running |= {node.input[3], node.input[4]}
    params0 = {k: np.asarray(v) for k, v in engine.params.items()}
    trainable = {k: jnp.asarray(v, jnp.float32) for k, v in params0.items()
                 if k not in running and np.issubdtype(np.asarray(v).dtype, np.floating)}
    frozen = {k: jnp.asarray(v) for k, v in params0.items() if k not in trainable}
    if not trainable:
        raise SpaError("the model has no trainable float parameters", file=model.path)

    tsess = _teacher_session(teacher, model, cfg.threads) if teacher is not None else None
    alpha = 1.0 if data.labels is None else (cfg.kd_alpha if tsess is not None else 0.0)
    T = float(cfg.kd_temperature)

    # the class scores: the engine's class output (the first float output) and its logits
    # (the input of a final Softmax, if there is one: then the teacher's output holds
    # probabilities, whose log is the logits up to a per-row constant)
    k_cls = engine.class_output
    cls_name = engine.output_names[k_cls] if engine.output_names else ""
    probs = _final_softmax(model, cls_name)

    def loss_fn(p, feeds, labels, t_out):
        params = {**frozen, **p}
        s = engine.logits(params, feeds)
        if not jnp.issubdtype(s.dtype, jnp.floating):
            raise SpaError("the model has no float output: nothing to train on",
                           file=model.path)
        loss, acc = 0.0, jnp.float32(0)
        if labels is not None and _classifier(s.shape):
            logp = jax.nn.log_softmax(s)
            ce = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
            loss = loss + (1.0 - alpha) * ce
            acc = jnp.mean(jnp.argmax(s, axis=1) == labels)
        elif labels is not None:
            raise SpaError(f"the output {cls_name!r} {tuple(s.shape)} is not one score vector "
                           "per sample: cross-entropy needs a classifier; give --teacher to "
                           "distil instead", file=model.path)
        if t_out is not None and alpha > 0:
            if _classifier(s.shape):
                t = t_out[k_cls]
                t = jnp.log(jnp.maximum(t, jnp.finfo(t.dtype).tiny)) if probs else t
                logpt = jax.nn.log_softmax(t / T)
                kl = jnp.sum(jnp.exp(logpt) * (logpt - jax.nn.log_softmax(s / T)), axis=1)
                loss = loss + alpha * T * T * jnp.mean(kl)
            else:
                outs = engine.forward(params, feeds)
                mse = sum(jnp.mean((o - t) ** 2) for o, t in zip(outs, t_out)
                          if jnp.issubdtype(o.dtype, jnp.floating))
                loss = loss + alpha * mse
        return loss, acc

    schedule = _schedule(cfg, steps_per_epoch * cfg.epochs)
    opt = _optimizer(cfg, schedule, trainable)
    opt_state = jax.jit(opt.init)(trainable)     # one compilation, not one per shape

    @jax.jit
    def step(p, state, i, feeds, labels, t_out):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, feeds, labels, t_out)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss, acc, schedule(i)

    def current(p) -> tuple[onnx.ModelProto, dict]:
        """The model with the parameters `p` (and, in batch mode, recalibrated stats)."""
        vals = {k: np.asarray(v) for k, v in p.items()}
        if stats:
            tp = with_values(train_proto, vals, model.path)
            vals.update(recalibrate(tp, stats, data.inputs, cfg.bn_samples, threads=cfg.threads,
                                    path=model.path))
        original = {**vals}
        return with_values(model.proto, original, model.path), original

    acc_before = _evaluate(model.proto, data.test, cfg)
    history = []
    if acc_before is not None:
        log(f"test accuracy before: {100 * acc_before:.2f}% ({data.test.name})")
    rng = np.random.default_rng(cfg.seed)
    p = trainable
    proto_now = None
    for epoch in range(cfg.epochs):
        te = time.monotonic()
        order = rng.permutation(n)
        tot_loss = tot_acc = 0.0
        report_every = max(1, steps_per_epoch // 10)
        for s_i in range(steps_per_epoch):
            idx = np.sort(order[s_i * batch:(s_i + 1) * batch])
            feeds = {k: v[idx] for k, v in data.inputs.items()}
            for k, axis in images.items():
                if cfg.augment != "none":
                    feeds[k] = augment(feeds[k], axis, cfg.augment, rng)
            t_out = None
            if tsess is not None:
                t_out = [jnp.asarray(o) for o in tsess.run(None, feeds)]
            labels = None if data.labels is None else jnp.asarray(data.labels[idx])
            p, opt_state, loss, acc, lr = step(p, opt_state,
                                               np.int32(epoch * steps_per_epoch + s_i),
                                               feeds, labels, t_out)
            loss = float(loss)
            if not math.isfinite(loss):
                raise SpaError(f"the loss became {loss} at epoch {epoch + 1}, step {s_i + 1}: "
                               "lower --lr", file=model.path)
            tot_loss += loss
            tot_acc += float(acc)
            if (s_i + 1) % report_every == 0 and s_i + 1 < steps_per_epoch:
                el = time.monotonic() - te
                log(f"  epoch {epoch + 1} step {s_i + 1}/{steps_per_epoch} loss "
                    f"{tot_loss / (s_i + 1):.4f} ({el / (s_i + 1):.3f} s/step)")
        proto_now, _ = current(p)
        acc_t = _evaluate(proto_now, data.test, cfg)
        row = {"epoch": epoch + 1, "loss": tot_loss / steps_per_epoch,
               "train_accuracy": (tot_acc / steps_per_epoch) if data.labels is not None
               and alpha < 1 else None,
               "lr_end": float(lr),
               "seconds": round(time.monotonic() - te, 2), "test_accuracy": acc_t}
        history.append(row)
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f}"
            + (f" train acc {100 * row['train_accuracy']:.2f}%"
               if row["train_accuracy"] is not None else "")
            + f" lr {row['lr_end']:.3g} {row['seconds']:.1f}s"
            + (f" test acc {100 * acc_t:.2f}%" if acc_t is not None else ""))
    if proto_now is None:          # --epochs 0: recalibration only
        proto_now, _ = current(p)
    acc_after = history[-1]["test_accuracy"] if history else _evaluate(proto_now, data.test,
                                                                        cfg)
    if not history and acc_after is not None:
        log(f"test accuracy after recalibration: {100 * acc_after:.2f}%")
    settings = {"lr": cfg.learning_rate, "weight_decay": cfg.wd, "batch": batch,
                "steps_per_epoch": steps_per_epoch, "samples": n, "kd_alpha": alpha,
                "loss": ("kd" if alpha == 1 else "ce" if alpha == 0 else
                         f"{alpha:g}*kd + {1 - alpha:g}*ce")}
    return Result(proto_now, history, acc_before, acc_after, sorted(trainable),
                  sorted(s for st in stats for s in (st.mean_init, st.var_init)), notes,
                  time.monotonic() - t0, settings)
