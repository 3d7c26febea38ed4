"""Elementwise ops: every axis maps to itself (numpy broadcasting for several inputs)."""
from __future__ import annotations

from .common import broadcast, same, touch, operand
from .registry import rule

UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf",
         "Softplus", "Softsign", "Mish", "Elu", "Selu", "Celu", "ThresholdedRelu", "Exp", "Log",
         "Sqrt", "Reciprocal", "Neg", "Abs", "Ceil", "Floor", "Round", "Sign", "Sin", "Cos",
         "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not",
         "IsNaN", "IsInf", "Identity", "Cast", "Swish", "BitwiseNot")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Less",
          "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
          "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Where")
_ROLE = {"Add": "bias", "Sub": "bias", "Mul": "scale", "Div": "scale"}


@rule(*UNARY)
def unary(n, c):
    """Elementwise: output axis k is input axis k."""
    same(n, c, n.i(0), n.o(0))


@rule(*BINARY)
def binary(n, c):
    """Elementwise with numpy broadcasting; per-channel constants are sliced, scalars kept."""
    ins = [t for t in n.inputs if t]
    broadcast(n, c, ins, n.o(0))
    role = _ROLE.get(n.op)
    for t in ins:
        if t in n.model.consts and role:
            for k in range(n.rank(t) or 0):
                c.role((t, k), role)


@rule("PRelu")
def prelu(n, c):
    """PRelu: the slope broadcasts like an elementwise operand (one slope per channel)."""
    broadcast(n, c, [n.i(0), n.i(1)], n.o(0))
    for k in range(n.rank(n.i(1)) or 0):
        c.role((n.i(1), k), "scale")


@rule("Clip")
def clip(n, c):
    """Clip: elementwise; min/max are scalars."""
    same(n, c, n.i(0), n.o(0))
    for t in n.inputs[1:]:
        operand(c, t or None)


@rule("Dropout")
def dropout(n, c):
    """Dropout (inference: identity); the optional mask has the input's shape."""
    same(n, c, n.i(0), n.o(0))
    same(n, c, n.i(0), n.o(1))
    for t in n.inputs[1:]:
        operand(c, t or None)


@rule("CastLike")
def cast_like(n, c):
    """CastLike: elementwise; the second input only gives the type."""
    same(n, c, n.i(0), n.o(0))
    touch(c, n.i(1))
