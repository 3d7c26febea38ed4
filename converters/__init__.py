"""Framework converters: export a model to ONNX, and carry an SPA plan back onto the source
model's parameters so that the pruned model can be fine-tuned in its own framework.

One module per framework; each imports its framework lazily (inside functions), so that
importing the package costs nothing. Layering: ``models → converters → spa``; spa never
imports converters.

- ``converters.torch`` — PyTorch: ``export`` (dynamo or legacy exporter; ``keep_bn=True``
  keeps parameter names for the way back), ``apply_plan`` (shrink the ``nn.Module`` in place),
  ``convert`` (what ``spa convert torch`` runs).
- ``converters.jax`` — JAX/Flax: ``export`` / ``to_onnx`` (a flax ``nnx.Module`` through
  jax2onnx; initializers named after the parameters by probing the exporter),
  ``apply_plan`` (shrink the nnx module's variables and layer widths in place),
  ``convert`` / ``cli_main`` (what ``spa convert jax`` runs).
- ``converters.keras`` — Keras 3 / TensorFlow: ``export`` (a Keras model, a ``.keras`` file
  or a SavedModel directory through tf2onnx; dynamic batch, opset 18, initializers named
  after the Keras variables they hold), ``check_outputs`` (Keras vs ONNX Runtime),
  ``cli_main`` (what ``spa convert keras`` runs). No map-back (docs/frameworks.md).
"""

FRAMEWORKS = ("torch", "jax", "keras")
