"""all-MiniLM-L6-v2 (real pretrained sentence encoder) pruned by SPA without fine-tuning.

    python benchmarks/minilm.py                   # run what is not cached yet, print the table
    python benchmarks/minilm.py --only l2 --write  # one method; put the table into docs/zoo.md
    python benchmarks/minilm.py --ratios issue --only obspa-docs   # one setting
    python benchmarks/minilm.py --force           # re-run everything
    python benchmarks/minilm.py --report --write  # only the table, from the saved rows

The model is models/minilm.py's export (BertModel + mean pooling + L2 norm, sequence length
128). For each method and setting — 30 % or 50 % of every group (the 12 heads of each of
the 6 attention blocks and the 1536 FFN channels of each of the 6 FFNs), or `issue`
(issue #5: a third of the heads, 4 of 12 per layer, and half of the FFN channels; a ratio
per group kind, `spa.prune(ratio={"heads": 1/3, "channels": 0.5})`) — it records the heads
and FFN channels kept, the parameters, the oracle on the structural plan, the cosine
similarity between the pruned and the original model's sentence embeddings on the 40
sentences of `models.minilm.EVAL_SENTENCES` (mean and minimum over the sentences), and the
pruning time of `spa.prune` (wall and process CPU seconds, load average; without the
oracle and the evaluation, which run after it).

Methods: `l2` (magnitude), and `obspa` (OBS saliency + least-squares reconstruction of the
kept weights, docs/obspa.md) with calibrations: `none` (moments propagated from the
LayerNorms), `synthetic` (spa's generated inputs: 256 sequences of token ids uniform over
the vocabulary, random 0/1 attention mask), `sentences` (the 32
`models.minilm.CALIB_SENTENCES`, tokenized and saved as an .npz keyed by input name;
disjoint from the evaluation sentences; each is about 12 tokens, so most of the 128
positions are padding, which obspa leaves out through the attention mask), `packed` (32
sequences of the same sentences joined in random orders and cut at 128 tokens: every
position a real token), `docs` (128 sequences of 128 tokens packed from Python
standard-library docstring sentences, `models.minilm.docstring_sentences`: 16,384 real
tokens of technical English, none of them evaluation sentences) and `mixed` (256 of those
docstring sentences, one per sequence, plus the 32 calibration sentences four times: 384
short sequences, padding masked; with `damp=0.1`), `mixed-global` the
same with `select="global"` (the heads and FFN channels removed wherever they cost least,
across layers, instead of the same number per layer).

Each (method, setting) row is saved to .cache/minilm/<method>-<setting>.json, so runs can
be split; the table is made from all saved rows.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import spa  # noqa: E402
from models import minilm  # noqa: E402
from spa.docgen import write_between  # noqa: E402
from spa.ir import load, write_text_atomic  # noqa: E402
from spa.rewrite.apply import apply_plan  # noqa: E402

CACHE = os.path.join(ROOT, ".cache", "minilm")
DOC = os.path.join(ROOT, "docs", "zoo.md")
BEGIN, END = "<!-- minilm.py:begin -->", "<!-- minilm.py:end -->"
METHODS = ("l2", "obspa-none", "obspa-synthetic", "obspa-sentences", "obspa-packed",
           "obspa-docs", "obspa-mixed", "obspa-mixed-global")
#: spa.prune options of a method beyond its calibration: `mixed` is regularised harder
#: (few real rows per FFN input, and calibration text partly unlike the evaluation's)
OPTIONS = {"obspa-mixed": {"damp": 0.1},
           "obspa-mixed-global": {"damp": 0.1, "select": "global"}}
MIXED_DOCS = 256
#: the 32 calibration sentences (everyday English, like the evaluation's) weigh 4× in `mixed`
MIXED_REPEAT = 4
#: a fraction of every group, or "issue": a third of the heads and half of the FFN channels
#: (issue #5's MiniLM setting)
RATIOS = ("0.3", "0.5", "issue")
ISSUE = {"heads": 1 / 3, "channels": 0.5}
DOCS_SEQUENCES = 128


def docstring_sentences() -> list[str]:
    """`models.minilm.docstring_sentences()`, cached (parsing the stdlib takes a while)."""
    path = os.path.join(CACHE, "docstring_sentences.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = minilm.docstring_sentences()
    write_text_atomic(path, json.dumps(out) + "\n")
    return out


def packed_docs(n: int = DOCS_SEQUENCES) -> list[str]:
    """`n` texts of about 128 tokens: docstring sentences in a seeded random order, joined
    until each text has at least 126 WordPiece tokens (then cut at 128 by the tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm.model_dir()))
    sents = docstring_sentences()
    order = np.random.default_rng(0).permutation(len(sents))
    texts, k = [], 0
    while len(texts) < n and k < len(order):
        cur, length = [], 0
        while length < minilm.SEQ_LEN - 2 and k < len(order):
            cur.append(sents[order[k]])
            length += len(tok.tokenize(sents[order[k]]))
            k += 1
        texts.append(" ".join(cur))
    return texts


def calibration_file(kind: str) -> str:
    """Calibration data as an .npz keyed by graph input name. `sentences`: the 32
    calibration sentences, one per sequence (about 12 tokens, the rest padding: the
    attention mask leaves the padding out of obspa's statistics). `packed`: 32 sequences,
    each the 32 sentences joined in a seeded random order and cut at 128 tokens, so that
    every position is a real token. `docs`: 128 sequences of 128 tokens of Python
    standard-library docstring sentences (`packed_docs`: about 1,100 sentences, 16,384
    real tokens). `mixed`: 256 docstring sentences (seeded choice), one per sequence, and
    the 32 calibration sentences repeated 4 times (so that the everyday English they share
    with the use weighs as much as the technical text)."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"calib_{kind}.npz")
    texts = list(minilm.CALIB_SENTENCES)
    if kind == "docs":
        texts = packed_docs()
    if kind == "mixed":  # docstring sentences one per sequence, then the 32 sentences ×4
        sents = docstring_sentences()
        order = np.random.default_rng(0).permutation(len(sents))[:MIXED_DOCS]
        texts = [sents[i] for i in order] + texts * MIXED_REPEAT
    if kind == "packed":
        rng = np.random.default_rng(0)
        texts = [" ".join(texts[j] for j in rng.permutation(len(texts))) for _ in texts]
    feeds = minilm.tokenize(texts)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **feeds)
    os.replace(tmp, path)
    return path


def run_one(model, method: str, ratio: str, base_emb, feeds) -> dict:
    kw = {}
    if method.startswith("obspa"):
        calib = method.split("-")[1]
        kw = {"criterion": "obspa", "calib": calibration_file(calib)
              if calib in ("sentences", "packed", "docs", "mixed") else calib,
              **OPTIONS.get(method, {})}
    t0, c0 = time.perf_counter(), time.process_time()
    res = spa.prune(model, ratio=ISSUE if ratio == "issue" else float(ratio), seed=0, **kw)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    load = os.getloadavg()[0]
    # the oracle (on the structural plan) is not part of the pruning time
    res.verify = spa.api._verify(model, apply_plan(model, res.analysis, res.plan),
                                 res.analysis, res.plan)
    groups = sorted(res.analysis.groups, key=lambda g: g.id)
    kept = {g.id: len(res.plan.keep.get(g.id, range(g.channels))) for g in groups}
    heads = [kept[g.id] for g in groups if g.kind == "heads"]
    ffn = [kept[g.id] for g in groups if g.kind == "channels" and g.channels == 1536]
    emb = minilm.embed(res.proto, feeds)
    cos = minilm.cosine(base_emb, emb)
    return {"method": method, "ratio": ratio, "options": OPTIONS.get(method, {}),
            "heads_kept": heads, "heads_total": 12 * len(heads),
            "ffn_kept": ffn, "ffn_total": 1536 * len(ffn),
            "params_before": res.before["params"], "params_after": res.after["params"],
            "macs_before": res.before["macs"], "macs_after": res.after["macs"],
            "oracle_passed": bool(res.verify.passed), "oracle_exact": bool(res.verify.exact),
            "oracle_max_rel_error": float(res.verify.max_rel_error),
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "cos_median": float(np.median(cos)), "n_sentences": int(len(cos)),
            "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "loadavg": round(load, 1),
            **({"obspa_timings": res.obspa["timings"],
                "obspa_calibration": res.obspa["calibration"],
                "obspa_measured": res.obspa["measured"],
                "obspa_layers": res.obspa["layer_errors"]} if res.obspa else {})}


def label(ratio) -> str:
    """What a row removed: "30%" of every group, or the issue's setting."""
    if str(ratio) == "issue":
        return "heads 1/3, FFN 1/2"
    return f"{float(ratio):.0%}"


def timing(r: dict) -> str:
    if "cpu_seconds" not in r:
        return f"{r['seconds']:.0f} s (with oracle, eval), {r.get('loadavg', '?')}"
    return f"{r['seconds']:.0f} s ({r['cpu_seconds']:.0f} s), {r['loadavg']}"


def table(rows: list[dict]) -> str:
    order = {m: k for k, m in enumerate(METHODS)}
    rows = sorted(rows, key=lambda r: (str(r["ratio"]), order.get(r["method"], 99)))
    lines = ["| pruned | method | heads kept (per layer) | FFN channels kept | params | "
             "MACs | oracle | cosine mean | cosine min | time: wall (CPU), load |",
             "|---:|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        oracle = (f"pass ({r['oracle_max_rel_error']:.1e})" if r["oracle_passed"]
                  else f"FAIL ({r['oracle_max_rel_error']:.1e})")
        lines.append(
            f"| {label(r['ratio'])} | {r['method']} | {sum(r['heads_kept'])}/{r['heads_total']} "
            f"({', '.join(map(str, r['heads_kept']))}) | {sum(r['ffn_kept'])}/{r['ffn_total']} "
            f"| {r['params_after'] / 1e6:.2f} M of {r['params_before'] / 1e6:.2f} M "
            f"| {r['macs_after'] / r['macs_before']:.0%} | {oracle} "
            f"| {r['cos_mean']:.3f} | {r['cos_min']:.3f} | {timing(r)} |")
    if rows:
        lines.append("")
        lines.append(f"Cosine similarity between the pruned and the original model's sentence "
                     f"embeddings on {rows[0]['n_sentences']} sentences, no fine-tuning. "
                     "MACs at sequence length 128, batch 1 (spa.cost). The oracle checks the "
                     "structural plan (before obspa's reconstruction).")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    with open(DOC) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
    write_between(DOC, BEGIN, END, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=METHODS, help="methods to run (default all)")
    ap.add_argument("--report", action="store_true", help="run nothing: table of saved rows")
    ap.add_argument("--ratios", nargs="*", choices=RATIOS, default=list(RATIOS),
                    help="0.3, 0.5: that fraction of every group; issue: 1/3 of the heads "
                         "and 1/2 of the FFN channels")
    ap.add_argument("--force", action="store_true", help="re-run cached rows")
    ap.add_argument("--write", action="store_true", help="write the table into docs/zoo.md")
    args = ap.parse_args()
    os.makedirs(CACHE, exist_ok=True)
    model = None
    for method in [] if args.report else args.only or METHODS:
        for ratio in args.ratios:
            out = os.path.join(CACHE, f"{method}-{ratio}.json")
            if os.path.exists(out) and not args.force:
                continue
            if model is None:
                model = load(str(minilm.cached_export()))
                feeds = minilm.tokenize(minilm.EVAL_SENTENCES)
                base = minilm.embed(model.path, feeds)
            row = run_one(model, method, ratio, base, feeds)
            write_text_atomic(out, json.dumps(row, indent=1) + "\n")
            print(json.dumps(row), flush=True)
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(CACHE, "*.json")))]
    rows = [r for r in rows if isinstance(r, dict) and "method" in r]
    text = table(rows)
    print(text)
    if args.write:
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
