"""Errors a person can act on: every message names the file, the node and the reason."""
from __future__ import annotations


class SpaError(Exception):
    """The model (or a plan / data file) cannot be processed. CLI exit code 3."""

    exit_code = 3

    def __init__(self, reason: str, *, file: str | None = None, node: str | None = None,
                 op: str | None = None):
        self.reason, self.file, self.node, self.op = reason, file, node, op
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.file:
            where.append(f"file {self.file}")
        if self.node is not None:
            where.append(f"node {self.node!r}" + (f" ({self.op})" if self.op else ""))
        return (", ".join(where) + ": " if where else "") + self.reason


class PlanError(SpaError):
    """A plan does not fit the model or violates a group constraint."""


class UsageError(SpaError):
    """Bad command-line usage. CLI exit code 2."""

    exit_code = 2
