"""The framework-free gradient engine: any ONNX graph evaluated in JAX, jit-compiled, with
its weights as inputs, so that gradient-based pruning criteria and fine-tuning work on
models from any framework (docs/engine.md).

JAX is imported on first use (`Engine(...)`), never by `import spa` or `import spa.engine`;
without it the engine raises a UsageError that says how to install it.

    from spa.engine import Engine, gradient_stats
    eng = Engine("model.onnx")
    outs = eng.run({"input": x})                       # numpy outputs (jitted)
    st = gradient_stats(eng, {"input": calib}, labels)  # grad, fisher, (hg)
"""
from __future__ import annotations

from .core import OBJECTIVES, Engine
from .ops import supported_ops
from .stats import GradStats, gradient_stats

__all__ = ["Engine", "GradStats", "gradient_stats", "supported_ops", "OBJECTIVES"]
