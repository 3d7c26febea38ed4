"""SPA: structural pruning of any ONNX model.

    import spa
    result = spa.prune("model.onnx", ratio=0.5, criterion="l2", do_verify=True)
    spa.save(result.proto, "pruned.onnx")
"""
from .errors import SpaError, PlanError, UsageError
from .api import load, analyze, prune, make_plan, save, stats, Plan, PruneResult
from .verify import verify, VerifyResult

__version__ = "0.1.0"
__all__ = ["SpaError", "PlanError", "UsageError", "load", "analyze", "prune", "make_plan",
           "save", "stats", "Plan", "PruneResult", "verify", "VerifyResult"]
