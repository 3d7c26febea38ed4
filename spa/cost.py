"""What a model costs: parameters and multiply-accumulates, from the op rules."""
from __future__ import annotations

import numpy as np

from .ops import registry
from .ops.registry import Node


def params(model) -> int:
    """Elements of floating-point constants that some node reads (the weights)."""
    total = 0
    for name, arr in model.consts.items():
        if np.issubdtype(arr.dtype, np.floating) and name in model.consumers:
            total += int(arr.size)
    return total


def macs(model) -> int:
    total = 0
    for node in model.nodes:
        r = registry.get(node)
        if r is not None and r.macs is not None:
            total += int(r.macs(Node(node, model), model.shapes))
    return total
