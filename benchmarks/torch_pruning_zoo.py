"""Torch-Pruning 1.6.1 and SPA side by side on every torch zoo architecture, at 50 %.

    python benchmarks/torch_pruning_zoo.py                 # missing models only; print table
    python benchmarks/torch_pruning_zoo.py --write         # … and put it into docs/zoo.md
    python benchmarks/torch_pruning_zoo.py --force vit_mha # re-run these models

Torch-Pruning (on the torch module from models/torch_zoo.py): ``tp.pruner.BasePruner``
(1.6's name for MetaPruner) with ``tp.importance.MagnitudeImportance(p=2)``,
``pruning_ratio=0.5`` (local: every group loses half its channels, like SPA's uniform
ratio), the output layers ignored — as Torch-Pruning's documentation recommends for the final
classifier; found here as the Linear/Conv layers whose outputs reach the model output without
passing through another such layer (the classifier; U-Net's 1x1 head; both YOLO detection
convs; the GPT lm head) — and the attention layers declared through ``num_heads`` the way
Torch-Pruning's own ViT/BERT/LLM examples do (``nn.MultiheadAttention``; the qkv Linear of
the timm-style attention; the query/key/value Linears of the BERT attention; q/k/v of the
GQA attention with their query and key/value head counts), after which the modules' head
count and head size attributes are updated from ``pruner.num_heads`` as those examples do.
Defaults otherwise (``prune_head_dims=True``, ``prune_num_heads=False``). Recorded: did
``pruner.step()`` run, does the pruned module run on a fresh batch of 3, is the output shape
unchanged, parameters before/after (tied weights once). Exceptions: type and first line.

SPA (on the zoo's dynamo ONNX export, models/export.py): ``spa.prune(ratio=0.5, seed=1,
do_verify=True)``; the oracle result (for models with approximate groups, the exact-only plan
through the oracle, as tests/test_oracle_zoo.py does) and the parameters kept. The ONNX
parameter counts differ from torch's (BatchNorm folded into the convs by the exporter), so
compare the kept fractions.

Each model's row is saved to .cache/tp_zoo/<name>.json (with the versions used); the table is
built from all saved rows.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CACHE = os.path.join(ROOT, ".cache", "tp_zoo")
DOC = os.path.join(ROOT, "docs", "zoo.md")
BEGIN, END = "<!-- torch_pruning_zoo.py:begin -->", "<!-- torch_pruning_zoo.py:end -->"
RATIO = 0.5


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def output_layers(model, example) -> list:
    """The Linear/Conv modules whose outputs reach the model's output without another
    Linear/Conv in between (found by walking the autograd graph back from the output)."""
    import torch
    import torch.nn as nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
             nn.ConvTranspose2d, nn.ConvTranspose3d)
    produced = {}

    def hook(mod, _inputs, out):      # returns None: the output is left alone
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            produced.setdefault(out.grad_fn, mod)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.enable_grad():
            y = model(*example)
    finally:
        for h in hooks:
            h.remove()
    found, seen, todo = [], set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in produced:
            if produced[fn] not in found:
                found.append(produced[fn])
            continue
        todo.extend(f for f, _ in fn.next_functions)
    return found


def attention_heads(model) -> tuple[dict, list]:
    """Torch-Pruning's `num_heads` for the zoo's attention modules, and the fix-ups that
    set each module's head count/size from `pruner.num_heads` after pruning."""
    import torch.nn as nn

    from models import torch_zoo as tz

    heads, fixes = {}, []
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads

            def fix(p, m=m):
                m.num_heads = p.num_heads[m]
                m.head_dim = m.embed_dim // m.num_heads
            fixes.append(fix)
        elif isinstance(m, tz.QKVAttention):
            heads[m.qkv] = m.heads

            def fix(p, m=m):
                m.heads = p.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.heads)
            fixes.append(fix)
        elif isinstance(m, tz.BertSelfAttention):
            for lin in (m.query, m.key, m.value):
                heads[lin] = m.heads

            def fix(p, m=m):
                m.heads = p.num_heads[m.query]
                m.head_dim = m.query.out_features // m.heads
            fixes.append(fix)
        elif isinstance(m, tz.GQAttention):
            heads[m.q_proj] = m.n_heads
            heads[m.k_proj] = heads[m.v_proj] = m.n_kv

            def fix(p, m=m):
                m.n_heads, m.n_kv = p.num_heads[m.q_proj], p.num_heads[m.k_proj]
                m.head_dim = m.q_proj.out_features // m.n_heads
                m.n_rep = m.n_heads // m.n_kv
            fixes.append(fix)
    return heads, fixes


def run_torch_pruning(name: str) -> dict:
    import torch
    import torch_pruning as tp

    from models.torch_zoo import ZOO, num_params

    entry = ZOO[name]
    model = entry.factory()
    example = entry.example_inputs(batch=2)
    fresh = entry.example_inputs(batch=3, seed=1)
    row = {"tp_step": None, "tp_runs": None, "tp_shape_ok": None,
           "tp_params_before": num_params(model), "tp_params_after": None, "tp_error": None}
    with torch.no_grad():
        shape_before = tuple(model(*fresh).shape)
    ignored = output_layers(model, example)
    row["tp_ignored"] = [n for n, m in model.named_modules() if any(m is x for x in ignored)]
    heads, fixes = attention_heads(model)
    row["tp_num_heads"] = len(heads)
    t0 = time.perf_counter()
    try:
        pruner = tp.pruner.BasePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=RATIO, ignored_layers=ignored, num_heads=heads)
        pruner.step()
        for fix in fixes:
            fix(pruner)
        row["tp_step"] = True
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        row.update(tp_step=False, tp_error=first_line(exc))
        return row
    finally:
        row["tp_seconds"] = round(time.perf_counter() - t0, 2)
    row["tp_params_after"] = num_params(model)
    try:
        with torch.no_grad():
            shape_after = tuple(model.eval()(*fresh).shape)
        row["tp_runs"] = True
        row["tp_shape_ok"] = shape_after == shape_before
        if not row["tp_shape_ok"]:
            row["tp_error"] = f"output shape {shape_after}, was {shape_before}"
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        row.update(tp_runs=False, tp_error=first_line(exc))
    return row


def run_spa(name: str) -> dict:
    import spa
    from models.export import export_zoo_entry
    from spa.ir import load

    model = load(str(export_zoo_entry(name, exporter="dynamo")))
    t0 = time.perf_counter()
    row = {"spa_error": None}
    try:
        res = spa.prune(model, ratio=RATIO, do_verify=True, seed=1)
        v = res.verify
        row.update(spa_params_before=res.before["params"], spa_params_after=res.after["params"],
                   spa_groups=len(res.plan.keep), spa_groups_total=len(res.analysis.groups),
                   spa_exact=bool(v.exact), spa_max_rel_error=float(v.max_rel_error))
        if v.exact:
            row["spa_oracle"] = bool(v.passed)
        else:
            exact = spa.prune(model, ratio=RATIO, do_verify=True, seed=1, exact_only=True)
            row["spa_oracle"] = bool(exact.verify.passed)
            row["spa_exact_only_max_rel_error"] = float(exact.verify.max_rel_error)
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        row.update(spa_oracle=False, spa_error=first_line(exc))
    row["spa_seconds"] = round(time.perf_counter() - t0, 2)
    return row


def versions() -> dict:
    from importlib import metadata
    return {d: metadata.version(d) for d in ("torch", "torch-pruning", "onnx", "onnxruntime")}


def _yes(v) -> str:
    return "–" if v is None else ("yes" if v else "**no**")


def table(rows: list[dict]) -> str:
    from models.registry import TORCH_ZOO
    order = {s.name: k for k, s in enumerate(TORCH_ZOO)}
    rows = sorted(rows, key=lambda r: order.get(r["name"], 99))
    lines = ["| model | TP step | TP pruned model runs | TP output shape same | TP params "
             "kept | SPA oracle | SPA params kept | Torch-Pruning error (first line) |",
             "|---|---|---|---|---:|---|---:|---|"]
    for r in rows:
        tp_kept = (f"{r['tp_params_after'] / r['tp_params_before']:.1%}"
                   if r.get("tp_params_after") else "–")
        if r.get("spa_error"):
            spa_oracle, spa_kept = f"**error**: {r['spa_error']}", "–"
        else:
            spa_oracle = ("pass" if r["spa_oracle"] else "**FAIL**") + \
                ("" if r["spa_exact"] else " (exact-only plan; the full plan also prunes "
                 f"norm-coupled groups: deviation {r['spa_max_rel_error']:.2g})")
            spa_kept = f"{r['spa_params_after'] / r['spa_params_before']:.1%}"
        err = (r.get("tp_error") or "").replace("|", "\\|")
        if len(err) > 160:
            err = err[:157] + "..."
        lines.append(f"| `{r['name']}` | {_yes(r['tp_step'])} | {_yes(r['tp_runs'])} | "
                     f"{_yes(r['tp_shape_ok'])} | {tp_kept} | {spa_oracle} | {spa_kept} | "
                     f"{err} |")
    ok = sum(1 for r in rows if r["tp_step"] and r["tp_runs"] and r["tp_shape_ok"])
    spa_ok = sum(1 for r in rows if not r.get("spa_error") and r["spa_oracle"])
    v = rows[0]["versions"] if rows else {}
    lines += ["", f"Torch-Pruning: {ok}/{len(rows)} models pruned, runnable and with unchanged "
              f"output shapes; SPA: {spa_ok}/{len(rows)} through the oracle. "
              f"Versions: torch {v.get('torch')}, torch-pruning {v.get('torch-pruning')}, "
              f"onnx {v.get('onnx')}, onnxruntime {v.get('onnxruntime')}."]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    from spa.ir import write_text_atomic
    with open(DOC) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
    doc = doc[:doc.index(BEGIN)] + f"{BEGIN}\n{text}\n{END}" + doc[doc.index(END) + len(END):]
    write_text_atomic(DOC, doc)


def main(argv=None) -> int:
    import warnings

    from models.registry import TORCH_ZOO
    from spa.ir import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="zoo models (default: all)")
    ap.add_argument("--force", action="store_true", help="re-run models already saved")
    ap.add_argument("--write", action="store_true", help="write the table into docs/zoo.md")
    a = ap.parse_args(argv)
    known = [s.name for s in TORCH_ZOO]
    bad = [n for n in a.names if n not in known]
    if bad:
        ap.error(f"unknown zoo model(s): {', '.join(bad)}")
    os.makedirs(CACHE, exist_ok=True)
    warnings.simplefilter("ignore")
    for name in a.names or known:
        out = os.path.join(CACHE, f"{name}.json")
        if os.path.exists(out) and not a.force:
            continue
        try:
            row = {"name": name, **run_torch_pruning(name)}
        except Exception as exc:  # noqa: BLE001 - the harness itself failed on this model
            traceback.print_exc()
            row = {"name": name, "tp_step": False, "tp_runs": None, "tp_shape_ok": None,
                   "tp_params_before": None, "tp_params_after": None,
                   "tp_error": "harness: " + first_line(exc)}
        row.update(run_spa(name))
        row["versions"] = versions()
        write_text_atomic(out, json.dumps(row, indent=1) + "\n")
        print(json.dumps(row), flush=True)
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(CACHE, "*.json")))]
    rows = [r for r in rows if r["name"] in known]
    text = table(rows)
    print(text)
    if a.write:
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
