"""The Keras part of the reference zoo: small seeded Keras 3 models, exported with tf2onnx.

Each model is our own definition (Apache-2.0, like the rest of the project), channels-last
as Keras wants, with small inputs so that the oracle tests stay fast. They cover the
structures that tf2onnx's graphs put in front of a pruner:

* ``keras_plain_cnn`` -- Conv2D→BatchNorm→ReLU stages with max pooling and a
  Flatten→Dense head: the NHWC Flatten orders features (h, w, c), so each channel owns
  every C-th Dense input row, behind the Transpose tf2onnx leaves before the Reshape.
* ``keras_resnet`` -- basic residual blocks joined by ``Add``, one stage change with a
  strided 1×1 projection shortcut, global average pooling.
* ``keras_mobilenet`` -- MobileNetV2 inverted residuals (1×1 expand, ``DepthwiseConv2D``,
  linear 1×1 projection, ``Add`` when shapes allow) with ReLU6, and a ``SeparableConv2D``.
* ``keras_vit`` -- a two-block pre-LN transformer on 4×4 patches:
  ``LayerNormalization``, ``keras.layers.MultiHeadAttention`` (4 heads), a GELU MLP,
  mean pooling over the tokens.

Weights are seeded (``keras.utils.set_random_seed(0)``) and made non-trivial, as in the
torch zoo: BatchNorm/LayerNorm scales drawn from U(0.5, 1.5), shifts and all biases from
N(0, 0.1), BatchNorm moving statistics *calibrated* on one seeded random batch and then
perturbed. Untrained defaults (unit scales, zero biases) would be folded away or merged
by tf2onnx's optimizer (converters/keras.py) and would make pruning tests meaningless.
``export(name, path)`` builds one model and writes its ONNX file (opset 18, dynamic batch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SEED = 0


def _keras():
    from converters.keras import _quiet_tf

    _quiet_tf()
    import keras

    return keras


# --------------------------------------------------------------------------- builders


def plain_cnn(keras):
    L = keras.layers
    inp = keras.Input((32, 32, 3), name="input")
    x = inp
    for i, (w, pool) in enumerate([(16, False), (32, True), (48, True)]):
        x = L.Conv2D(w, 3, padding="same", use_bias=i == 2, name=f"conv{i + 1}")(x)
        x = L.BatchNormalization(name=f"bn{i + 1}")(x)
        x = L.ReLU(name=f"relu{i + 1}")(x)
        if pool:
            x = L.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(64, activation="relu", name="fc1")(x)
    out = L.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="keras_plain_cnn")


def resnet(keras):
    L = keras.layers

    def block(x, width, stride, name):
        y = L.Conv2D(width, 3, strides=stride, padding="same", use_bias=False,
                     name=f"{name}_conv1")(x)
        y = L.BatchNormalization(name=f"{name}_bn1")(y)
        y = L.ReLU(name=f"{name}_relu1")(y)
        y = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
        y = L.BatchNormalization(name=f"{name}_bn2")(y)
        if stride != 1 or x.shape[-1] != width:
            x = L.Conv2D(width, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
            x = L.BatchNormalization(name=f"{name}_proj_bn")(x)
        return L.ReLU(name=f"{name}_out")(L.Add(name=f"{name}_add")([x, y]))

    inp = keras.Input((32, 32, 3), name="input")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inp)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    x = block(x, 16, 1, "s1b1")
    x = block(x, 16, 1, "s1b2")
    x = block(x, 32, 2, "s2b1")
    x = block(x, 32, 1, "s2b2")
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="keras_resnet")


def mobilenet(keras):
    L = keras.layers

    def inverted(x, cout, stride, expand, name):
        cin = x.shape[-1]
        y = L.Conv2D(cin * expand, 1, use_bias=False, name=f"{name}_expand")(x)
        y = L.BatchNormalization(name=f"{name}_expand_bn")(y)
        y = L.ReLU(6.0, name=f"{name}_expand_relu")(y)
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                              name=f"{name}_dw")(y)
        y = L.ReLU(6.0, name=f"{name}_dw_relu")(L.BatchNormalization(name=f"{name}_dw_bn")(y))
        y = L.Conv2D(cout, 1, use_bias=False, name=f"{name}_project")(y)
        y = L.BatchNormalization(name=f"{name}_project_bn")(y)
        if stride == 1 and cin == cout:
            y = L.Add(name=f"{name}_add")([x, y])
        return y

    inp = keras.Input((32, 32, 3), name="input")
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = L.ReLU(6.0, name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    x = inverted(x, 16, 1, 4, "b1")
    x = inverted(x, 24, 2, 4, "b2")
    x = inverted(x, 24, 1, 4, "b3")
    x = L.SeparableConv2D(48, 3, padding="same", use_bias=False, name="sep")(x)
    x = L.ReLU(6.0, name="sep_relu")(L.BatchNormalization(name="sep_bn")(x))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.2, name="dropout")(x)
    out = L.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="keras_mobilenet")


def vit(keras):
    L = keras.layers
    dim, heads, mlp = 32, 4, 64
    inp = keras.Input((32, 32, 3), name="input")
    x = L.Conv2D(dim, 4, strides=4, name="patch")(inp)          # 8x8 patches
    x = L.Reshape((64, dim), name="tokens")(x)
    for i in range(2):
        y = L.LayerNormalization(epsilon=1e-5, name=f"b{i}_ln1")(x)
        y = L.MultiHeadAttention(heads, dim // heads, name=f"b{i}_mha")(y, y)
        x = L.Add(name=f"b{i}_add1")([x, y])
        y = L.LayerNormalization(epsilon=1e-5, name=f"b{i}_ln2")(x)
        y = L.Dense(mlp, activation="gelu", name=f"b{i}_fc1")(y)
        y = L.Dense(dim, name=f"b{i}_fc2")(y)
        x = L.Add(name=f"b{i}_add2")([x, y])
    x = L.LayerNormalization(epsilon=1e-5, name="ln")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    out = L.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="keras_vit")


BUILDERS = {
    "keras_plain_cnn": plain_cnn,
    "keras_resnet": resnet,
    "keras_mobilenet": mobilenet,
    "keras_vit": vit,
}


# --------------------------------------------------------------------------- weights


def _randomize(keras, model, rng: np.random.Generator) -> None:
    """Non-trivial norm parameters and biases; BatchNorm statistics calibrated on one seeded
    random batch (layer by layer, in graph order), then perturbed."""
    L = keras.layers
    for layer in model.layers:
        if isinstance(layer, (L.BatchNormalization, L.LayerNormalization)):
            if getattr(layer, "gamma", None) is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32"))
            if getattr(layer, "beta", None) is not None:
                layer.beta.assign(rng.normal(0, 0.1, layer.beta.shape).astype("float32"))
        for var in layer.weights:
            if var.path.endswith("/bias"):
                var.assign(rng.normal(0, 0.1, var.shape).astype("float32"))
    x = rng.standard_normal((8, *model.inputs[0].shape[1:])).astype("float32")
    for layer in model.layers:
        if not isinstance(layer, L.BatchNormalization):
            continue
        probe = keras.Model(model.inputs[0], layer.input)
        a = np.asarray(probe(x, training=False))
        axes = tuple(range(a.ndim - 1))
        mean, var = a.mean(axis=axes), a.var(axis=axes)
        layer.moving_mean.assign((mean + rng.normal(0, 0.05, mean.shape)).astype("float32"))
        layer.moving_variance.assign(
            (var * rng.uniform(0.8, 1.25, var.shape) + 1e-3).astype("float32"))


def build(name: str):
    """The seeded Keras model `name` (see BUILDERS)."""
    if name not in BUILDERS:
        raise KeyError(f"unknown Keras zoo model {name!r}; one of {sorted(BUILDERS)}")
    keras = _keras()
    keras.utils.set_random_seed(SEED)
    model = BUILDERS[name](keras)
    _randomize(keras, model, np.random.default_rng(SEED))
    return model


def export(name: str, path) -> Path:
    """Build zoo model `name` and export it to ONNX at `path` (opset 18, batch dynamic)."""
    from converters.keras import export as export_keras

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    path = export_keras(build(name), Path(path))
    path.with_name(path.name + ".fingerprint").write_text(_fingerprint() + "\n")
    return path


def _fingerprint() -> str:
    """What an export depends on besides the sources: the converter stack's versions."""
    from importlib import metadata

    parts = []
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx"):
        try:
            parts.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ";".join(parts)


def cached_export(name: str, cache_dir=None, force: bool = False) -> Path:
    """`<cache>/<name>.onnx` (the path `python -m models list` gives), exported unless a file
    there is newer than this module, the converter and the registry and was made with the
    same tensorflow/keras/tf2onnx/onnx versions (the export is a pure function of them)."""
    import converters.keras as ck
    import models.registry as reg

    path = reg.FRAMEWORK_ZOO_BY_NAME[name].onnx_path(Path(cache_dir) if cache_dir else None)
    side = path.with_name(path.name + ".fingerprint")
    newest = max(Path(f).stat().st_mtime for f in (__file__, ck.__file__, reg.__file__))
    if (not force and path.is_file() and path.stat().st_mtime > newest and side.is_file()
            and side.read_text().strip() == _fingerprint()):
        return path
    return export(name, path)
