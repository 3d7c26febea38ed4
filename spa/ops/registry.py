"""The rule registry: one entry per ONNX op type.

A rule is what JAX calls a primitive's rules, for ONNX operators: `analyze` states which
dims of the node's inputs and outputs are coupled and by which index map (through the
`Coupler` it is handed), `shrink` updates what slicing tensors cannot (attributes, shape
operands) when indices go away, and `macs` says what the node costs as a function of its
shapes. Everything else in SPA is generic code that never names an operator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx


@dataclass
class Rule:
    op_types: tuple[str, ...]
    analyze: Callable
    shrink: Callable | None = None
    macs: Callable | None = None
    doc: str = ""
    family: str = ""


RULES: dict[str, Rule] = {}


def rule(*op_types: str, shrink: Callable | None = None, macs: Callable | None = None):
    """Register `fn(node, coupler)` as the analysis rule for `op_types` (default domain)."""
    def deco(fn):
        para = (fn.__doc__ or "").strip().split("\n\n")[0]
        r = Rule(op_types, fn, shrink, macs, " ".join(x.strip() for x in para.split("\n")),
                 fn.__module__.rsplit(".", 1)[-1])
        for t in op_types:
            if t in RULES:
                raise ValueError(f"duplicate rule for {t}")
            RULES[t] = r
        return fn
    return deco


def get(node: onnx.NodeProto) -> Rule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


class Node:
    """A read-only view of a node with its shapes and constant operands, for rules."""

    __slots__ = ("proto", "model")

    def __init__(self, proto: onnx.NodeProto, model):
        self.proto, self.model = proto, model

    @property
    def op(self) -> str:
        return self.proto.op_type

    @property
    def name(self) -> str:
        return self.model.node_name(self.proto)

    @property
    def inputs(self) -> list[str]:
        return list(self.proto.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.proto.output)

    def i(self, k: int) -> str | None:
        return self.proto.input[k] if k < len(self.proto.input) and self.proto.input[k] else None

    def o(self, k: int = 0) -> str | None:
        return self.proto.output[k] if k < len(self.proto.output) and self.proto.output[k] \
            else None

    def attr(self, name: str, default=None):
        for a in self.proto.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def shape(self, tensor: str | None) -> tuple | None:
        return None if tensor is None else self.model.shapes.get(tensor)

    def rank(self, tensor: str | None) -> int | None:
        s = self.shape(tensor)
        return None if s is None else len(s)

    def const(self, k: int) -> np.ndarray | None:
        t = self.i(k)
        return None if t is None else self.model.consts.get(t)

    @property
    def opset(self) -> int:
        return self.model.opset
