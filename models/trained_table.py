"""The table of trained models in docs/zoo.md, made from the sidecars (models/trained/*.json).

    python -m models.trained_table          # print it
    python -m models.trained_table --write  # put it into docs/zoo.md between the markers

tests/test_fmnist.py fails when the table in docs/zoo.md is stale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "trained"
DOC = ROOT / "docs" / "zoo.md"
BEGIN, END = "<!-- trained-table:begin -->", "<!-- trained-table:end -->"
SCRIPTS = {"torch": "models/train.py", "keras": "models/train_keras.py",
           "jax": "models/train_jax.py"}


def _stages(r: dict) -> list[dict]:
    """The training stages of a recipe, first first (`models.train --init` records the
    checkpoint's recipe under `continued_from`)."""
    return (_stages(r["continued_from"]) if r.get("continued_from") else []) + [r]


def _recipe(r: dict) -> str:
    lrs = "/".join(str(s.get("lr", "?")) for s in _stages(r))
    parts = [f"{r.get('optimizer', '?')} lr {lrs}"]
    if r.get("wd") is not None:
        parts.append(f"wd {r['wd']}")
    if r.get("batch") is not None:
        parts.append(f"batch {r['batch']}")
    if r.get("epochs") is not None:
        parts.append("+".join(str(s["epochs"]) for s in _stages(r)) + " epochs")
    if r.get("schedule"):
        parts.append(str(r["schedule"]))
    if r.get("seed") is not None:
        parts.append(f"seed {r['seed']}")
    return ", ".join(parts)


def markdown(trained_dir: Path = TRAINED) -> str:
    rows = ["| name | framework | family | input | params | top-1 (ONNX Runtime, 10k test) "
            "| recipe | train time (CPU) | script |", "|---|---|---|---|---|---|---|---|---|"]
    for sidecar in sorted(trained_dir.glob("*.json")):
        m = json.loads(sidecar.read_text())
        r = m.get("recipe", {})
        secs = sum(s.get("train_seconds") or 0 for s in _stages(r))
        t = f"{secs / 60:.0f} min" if secs else "–"
        threads = r.get("threads")
        if secs and threads:
            t += f" ({threads} thread{'s' if threads > 1 else ''})"
        shape = "x".join(str(d) for d in m["input_shape"])
        rows.append(f"| `{m['name']}` | {m['framework']} | {m['family']} | {shape} | "
                    f"{m.get('params', 0):,} | {100 * m['accuracy']:.2f} % | {_recipe(r)} | "
                    f"{t} | `{SCRIPTS.get(m['framework'], '?')}` |")
    return "\n".join(rows) + "\n"


def block(trained_dir: Path = TRAINED) -> str:
    return f"{BEGIN}\n{markdown(trained_dir)}{END}"


def current_block(doc: Path = DOC) -> str | None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        return None
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.trained_table",
                                description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help=f"update {DOC.relative_to(ROOT)}")
    a = p.parse_args(argv)
    if not a.write:
        print(markdown(), end="")
        return 0
    from spa.ir import write_text_atomic
    text = DOC.read_text()
    old = current_block()
    text = text.replace(old, block()) if old else text.rstrip("\n") + "\n\n" + block() + "\n"
    write_text_atomic(str(DOC), text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
