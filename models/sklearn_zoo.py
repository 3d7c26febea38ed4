"""The scikit-learn part of the zoo: a seeded MLPClassifier converted with skl2onnx.

Imported only to export (it imports scikit-learn and skl2onnx); the metadata lives in
models/registry.py:SKLEARN_ZOO. ``export(name, path)`` trains the model (seconds) and
writes the ONNX file atomically.

Conversion choices (skl2onnx 1.20, see docs/zoo.md):

* ``zipmap=False``: by default skl2onnx ends a classifier with an ``ai.onnx.ml`` ``ZipMap``
  that turns the probabilities into a sequence of {class: probability} maps. That output is
  not a tensor (SPA's oracle and most runtimes' tensor APIs cannot compare it); without it
  the second output, ``probabilities``, is a plain float tensor [N, n_classes].
* The first output, ``label`` (int64 [N]), stays: ArgMax over the probabilities, then
  ``ArrayFeatureExtractor`` (``ai.onnx.ml``) maps the index to the class label. It sits
  after the classifier layer (whose outputs are not prunable anyway), so it costs nothing.
* ``target_opset=18``; skl2onnx writes the lowest opset the graph needs (16 for the main
  domain, 1 for ``ai.onnx.ml``), inside the 11-23 range SPA supports.

The graph: Cast, then (MatMul, Add, Relu) per hidden layer, MatMul + Add + Softmax: each
hidden layer's units are one prunable group.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

#: opset asked of skl2onnx (it may write a lower one: the lowest the graph needs)
TARGET_OPSET = 18
#: the digits images are 8x8 with values 0..16; the models see them scaled to [0, 1]
N_FEATURES = 64
N_TRAIN = 1500


def digits():
    """sklearn's digits (1797 8x8 images, bundled with scikit-learn: no download), scaled to
    [0, 1] as float32; the first N_TRAIN rows train, the rest test."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


def make(name: str):
    """The fitted estimator of the zoo entry `name` (deterministic: fixed random_state)."""
    from sklearn.neural_network import MLPClassifier

    if name != "mlp_digits":
        raise KeyError(f"unknown scikit-learn zoo model {name!r}")
    x, y = digits()
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), random_state=0, max_iter=300)
    return clf.fit(x[:N_TRAIN], y[:N_TRAIN])


def to_onnx(clf):
    """The skl2onnx conversion of a fitted classifier (input "input" [N, 64] float32)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    return convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
                           target_opset=TARGET_OPSET, options={id(clf): {"zipmap": False}})


def export(name: str, path) -> Path:
    """Train the zoo entry `name` and write its ONNX conversion to `path` (atomically)."""
    from spa.ir import save_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(to_onnx(make(name)), str(path))
    return path
