"""Generated documentation: the op coverage table (from the rule registry) and the CLI
reference (from the argument parser). `python -m spa.docgen` rewrites both; a test fails
when the committed files are stale."""
from __future__ import annotations

import os
import sys

from . import ops
from .cli import build_parser

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def ops_table() -> str:
    by_rule: dict = {}
    for op, r in sorted(ops.RULES.items()):
        by_rule.setdefault(id(r), (r, []))[1].append(op)
    lines = ["# Op coverage", "",
             "Generated from the rule registry by `python -m spa.docgen`; do not edit.", "",
             "Every op listed here has a rule (`spa/ops/`): it states how the channels of its",
             "inputs and outputs are coupled, how the node shrinks when channels go, and (where",
             "marked) what it costs. Any other op is *opaque*: the dims that touch it are",
             "frozen and `spa analyze` lists them.", "",
             f"{len(ops.RULES)} op types, {len(by_rule)} rules.", "",
             "| ops | module | rule | shrink hook | MACs |", "|---|---|---|---|---|"]
    for r, names in sorted(by_rule.values(), key=lambda x: (x[0].family, x[1][0])):
        lines.append(f"| {', '.join(names)} | `spa/ops/{r.family}.py` | {r.doc} | "
                     f"{'yes' if r.shrink else '-'} | {'yes' if r.macs else '-'} |")
    return "\n".join(lines) + "\n"


def cli_reference() -> str:
    parser = build_parser()
    out = ["# CLI reference", "",
           "Generated from the argument parser by `python -m spa.docgen`; do not edit.", "",
           "Exit codes: 0 success; 1 verification failed (the pruned model does not match the",
           "masked original); 2 usage error; 3 the model, plan or data file cannot be",
           "processed (the message names the file, the node and the reason); 4 the pruned",
           "model failed the deployment gate (`--max-drop`, `--max-deviation`). On any failure",
           "no output file is written; the input file is never modified; output is written",
           "atomically; the same input and options give byte-identical output.", "",
           "```", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        out += [f"## spa {name}", "", "```", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


GENERATED = {"ops.md": ops_table, "cli.md": cli_reference}


def write_between(doc: str, begin: str, end: str, body: str) -> None:
    """Replace what lies between the markers ``begin`` and ``end`` in the file ``doc`` with
    ``body`` (appending the marked block when the markers are missing), atomically; the
    benchmarks write their tables into docs/ with it."""
    from .ir import write_text_atomic
    with open(doc) as f:
        text = f.read()
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(doc, text)


def main() -> int:
    os.environ.setdefault("COLUMNS", "100")
    for name, fn in GENERATED.items():
        with open(os.path.join(DOCS, name), "w") as f:
            f.write(fn())
        print(f"wrote docs/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
