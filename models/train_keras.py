"""Train the Keras reference CNN on Fashion-MNIST and export it to ONNX.

    python -m models.train_keras --epochs 5 --seed 0 --threads 1

writes models/trained/keras_cnn.keras (the trained Keras model, without optimizer state),
keras_cnn.onnx (exported with ``converters.keras.export(..., inputs_as_nchw=True)``: raw
[0, 1] pixels N×1×28×28 in -- the same layout as the torch models, the shared calibration
set and ``spa eval fashion-mnist`` -- 10 logits out) and keras_cnn.json (the accuracy
measured on the ONNX file with ONNX Runtime on the 10k test images, and the recipe).

The network is a small VGG-style CNN of our own: three Conv2D→BatchNorm→ReLU stages with
max pooling, then Flatten→Dense→Dropout→Dense. The Keras model itself is channels-last
(N×28×28×1, as Keras wants it); the data set's mean/std normalisation is its first layer
(``Rescaling``), so the exported graph takes raw pixels. Training is cheap on purpose
(one CPU thread, a few epochs of Adam with cosine decay, no augmentation): the point is a
genuinely trained model with realistic weights for the pruning tests, not a record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models.fmnist import MEAN, STD, evaluate_onnx, load_fmnist

TRAINED_DIR = Path(__file__).resolve().parent / "trained"
NAME = "keras_cnn"
FAMILY = "plain-cnn"


def _setup_tf(threads: int, seed: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    keras.utils.set_random_seed(seed)
    return tf, keras


def build(keras, widths=(32, 64, 64), hidden=128, dropout=0.3):
    """Channels-last CNN; raw [0, 1] pixels in, 10 logits out."""
    L = keras.layers
    inp = keras.Input((28, 28, 1), name="input")
    x = L.Rescaling(1.0 / STD, offset=-MEAN / STD, name="normalize")(inp)
    for i, w in enumerate(widths):
        x = L.Conv2D(w, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = L.BatchNormalization(name=f"bn{i + 1}")(x)
        x = L.ReLU(name=f"relu{i + 1}")(x)
        if i < len(widths) - 1:
            x = L.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(hidden, activation="relu", name="fc1")(x)
    x = L.Dropout(dropout, name="dropout")(x)
    out = L.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name=NAME)


def nhwc(images: np.ndarray) -> np.ndarray:
    """N×1×28×28 (models.fmnist) -> N×28×28×1 (Keras)."""
    return np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1)))


def train(epochs: int, seed: int, threads: int, lr: float, batch: int,
          limit: int | None = None, log=print):
    tf, keras = _setup_tf(threads, seed)
    x_train, y_train = load_fmnist("train")
    x_test, y_test = load_fmnist("test")
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    x_train, x_test = nhwc(x_train), nhwc(x_test)
    model = build(keras)
    steps = epochs * int(np.ceil(len(x_train) / batch))
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.01)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    recipe = {"optimizer": "adam", "lr": lr, "schedule": "cosine decay to 1% over all steps",
              "batch": batch, "epochs": epochs, "seed": seed, "threads": threads,
              "augmentation": "none", "dropout": 0.3, "train_images": int(len(x_train)),
              "keras": keras.__version__, "tensorflow": tf.__version__}
    log(f"{NAME}: {model.count_params()} params, {len(x_train)} images, recipe {recipe}")

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            log(f"epoch {epoch + 1}/{epochs} loss {logs['loss']:.4f} train acc "
                f"{logs['accuracy']:.4f} epoch {time.time() - self.t0:.1f}s")

    t0 = time.time()
    model.fit(x_train, y_train, batch_size=batch, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[EpochLog()])
    recipe["train_seconds"] = round(time.time() - t0, 1)
    logits = model.predict(x_test, batch_size=1000, verbose=0)
    acc = float((logits.argmax(1) == y_test).mean())
    log(f"keras test accuracy {acc:.4f}")
    # A fresh, uncompiled copy: the saved file holds the weights, not Adam's state.
    clean = build(keras)
    clean.set_weights(model.get_weights())
    return clean, recipe


def save_keras(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".keras", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_and_describe(keras_path: Path, out_dir: Path, recipe: dict, log=print) -> dict:
    """Export the saved model to ONNX (NCHW input), measure its accuracy with ONNX Runtime
    on the 10k test images and write the JSON sidecar."""
    from converters.keras import export, load_model
    from spa.ir import write_text_atomic

    model = load_model(keras_path)
    onnx_path = export(model, out_dir / f"{NAME}.onnx", inputs_as_nchw=True)
    acc = evaluate_onnx(onnx_path, threads=1)
    log(f"{NAME}: ONNX test accuracy {acc:.4f}")
    meta = {
        "name": NAME,
        "framework": "keras",
        "family": FAMILY,
        "input_shape": [1, 1, 28, 28],
        "accuracy": acc,
        "path": os.path.relpath(onnx_path, Path(__file__).resolve().parent.parent),
        "params": int(model.count_params()),
        "keras_path": os.path.relpath(keras_path, Path(__file__).resolve().parent.parent),
        "recipe": recipe,
    }
    write_text_atomic(str(out_dir / f"{NAME}.json"), json.dumps(meta, indent=2) + "\n")
    return meta


def _saved_recipe(out_dir: Path) -> dict:
    """The recipe of the saved model: from its sidecar, or else from the training log's
    "final recipe" line (when the export after training failed)."""
    sidecar, log_path = out_dir / f"{NAME}.json", out_dir / f"{NAME}.log"
    if sidecar.is_file():
        return json.loads(sidecar.read_text())["recipe"]
    if log_path.is_file():
        lines = [ln for ln in log_path.read_text().splitlines() if " final recipe " in ln]
        if lines:
            return json.loads(lines[-1].split(" final recipe ", 1)[1])
    raise SystemExit(f"--export-only: no recipe found in {sidecar} nor {log_path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.train_keras",
                                description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--limit-train", type=int, help="train on the first N images (timing runs)")
    p.add_argument("--no-export", action="store_true", help="train only (timing runs)")
    p.add_argument("--export-only", action="store_true",
                   help="skip training: export the saved keras_cnn.keras again (recipe kept "
                        "from the existing sidecar)")
    p.add_argument("--out-dir", default=str(TRAINED_DIR))
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    keras_path = out_dir / f"{NAME}.keras"

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if args.export_only:
        _setup_tf(args.threads, args.seed)
        recipe = _saved_recipe(out_dir)
    else:
        model, recipe = train(args.epochs, args.seed, args.threads, args.lr, args.batch,
                              args.limit_train, log)
        if args.no_export:
            return 0
        save_keras(model, keras_path)
        log(f"wrote {keras_path}")
        log(f"final recipe {json.dumps(recipe)}")
    meta = export_and_describe(keras_path, out_dir, recipe, log)
    log(json.dumps({k: meta[k] for k in ("name", "accuracy", "params", "path")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
