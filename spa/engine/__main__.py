"""`python -m spa.engine`: rewrite the generated op list in docs/engine.md (a test fails
when it is stale)."""
from __future__ import annotations

import os
import re
import sys

from .ops import supported_ops

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "docs", "engine.md")
BEGIN, END = "<!-- engine-ops:begin -->", "<!-- engine-ops:end -->"


def _wrap(names: list[str]) -> list[str]:
    lines, line = [], ""
    for name in names:
        item = f"`{name}`"
        if len(line) + len(item) + 2 > 92:
            lines.append(line.rstrip())
            line = ""
        line += item + ", "
    lines.append(line.rstrip(", ") + ".")
    return lines


def op_block() -> str:
    ops = supported_ops()
    default = [o for o in ops if ":" not in o]
    domains: dict[str, list[str]] = {}
    for o in ops:
        if ":" in o:
            d, name = o.split(":", 1)
            domains.setdefault(d, []).append(name)
    out = [BEGIN, f"{len(default)} op types of the default ONNX domain:", "", *_wrap(default)]
    for d, names in sorted(domains.items()):
        out += ["", f"{len(names)} of `{d}`:", "", *_wrap(names)]
    return "\n".join(out + [END])


def current_block(text: str) -> str | None:
    m = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), text, re.S)
    return m.group(0) if m else None


def main() -> int:
    from ..ir import write_text_atomic

    with open(DOC) as f:
        text = f.read()
    old = current_block(text)
    if old is None:
        print(f"{DOC}: no {BEGIN} … {END} block", file=sys.stderr)
        return 1
    write_text_atomic(DOC, text.replace(old, op_block()))
    print("wrote docs/engine.md (op list)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
