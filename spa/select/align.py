"""Which group sizes `--round-to` rounds: the one place that decides the width multiple of
every group.

`--round-to N` (an integer) keeps every group of at least N channels at a multiple of N,
whatever its channels feed. `--round-to auto` (the default of `spa prune` and `spa.prune`)
uses the channel block of the target provider (spa.latency.default_round_to: 16 floats on
AVX-512 CPUs, 8 on AVX2, 8 for CUDA) and rounds only the groups where it helps: those with a
member dim that a rule tagged "channel_block" (the rule's op runs its fast kernels only at
multiples of the block; today the convolution rules, see docs/speed.md "Default widths").
Groups smaller than the block are left as they are, as with an integer N. Matrix products
are not tagged: ONNX Runtime's GEMM runs any width at about the same rate.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import UsageError

AUTO = "auto"
#: the member tag (spa.analysis.Coupler.tag) that asks for block-aligned widths
TAG = "channel_block"


def parse_round_to(value) -> int | str:
    """`--round-to` / round_to=: "auto" or an integer >= 1 (also given as a string);
    UsageError otherwise."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == AUTO:
            return AUTO
        try:
            value = int(v)
        except ValueError:
            raise UsageError(f"--round-to must be 'auto' or an integer >= 1, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--round-to must be 'auto' or an integer >= 1, got {value!r}")
    return value


def resolve(round_to, provider: str = "cpu") -> tuple[int, str | None]:
    """(block, scope): "auto" is the provider's channel block for the groups tagged TAG
    (scope TAG); an integer N is N for every group (scope None)."""
    round_to = parse_round_to(round_to)
    if round_to == AUTO:
        from ..latency import default_round_to
        return int(default_round_to(provider)), TAG
    return round_to, None


def group_alignment(analysis, block: int, scope: str | None = None) -> list[int]:
    """Width multiple of every group: `block` for the groups of at least `block` channels
    (and, with scope TAG, with a member tagged TAG), else 1."""
    if block < 1:
        raise UsageError(f"round_to must be >= 1, got {block}")
    out = []
    for grp in analysis.groups:
        ok = block > 1 and grp.channels >= block and (
            scope is None or any(scope in m.get("tags", ()) for m in grp.members))
        out.append(block if ok else 1)
    return out


def units(analysis, round_to) -> list[int]:
    """Per-group width multiples from what the selections take as `round_to`: an integer
    (every group, see group_alignment) or one value per group (from group_alignment)."""
    if isinstance(round_to, Sequence) and not isinstance(round_to, str):
        u = [int(x) for x in round_to]
        if len(u) != len(analysis.groups) or min(u, default=1) < 1:
            raise UsageError(f"round_to per group needs {len(analysis.groups)} values >= 1, "
                             f"got {len(u)}")
        return u
    if isinstance(round_to, bool) or not isinstance(round_to, int):
        raise UsageError(f"round_to must be an integer >= 1 or one per group, got "
                         f"{round_to!r} (resolve 'auto' with spa.select.align.resolve)")
    return group_alignment(analysis, round_to)


def option(round_to):
    """What a selection records as its "round_to" option (JSON-plain): the integer, or the
    largest per-group multiple (spa.api records the resolved "auto" and its scope)."""
    if isinstance(round_to, Sequence) and not isinstance(round_to, str):
        return max((int(x) for x in round_to), default=1)
    return round_to
