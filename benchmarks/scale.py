"""Huge models: SPA on a synthetic ~1.3 B-parameter Llama-style decoder (5.4 GB of float32
weights in external data, past protobuf's 2 GB limit).

    python benchmarks/scale.py --layers 6 24    # generate, measure, write docs/scale.md, delete
    python benchmarks/scale.py --dir D --keep   # keep the model files in D/L<layers>
    python benchmarks/scale.py --layers 2 --no-write   # a quick small run

The model (generated here, never held in memory: each weight is drawn from its own seeded
generator and streamed to the data file) is a decoder-only transformer: token embedding
(Gather), per layer RMSNormalization, multi-head attention with rotary position
embeddings (cos/sin tables gathered at `position_ids`, as Hugging Face exports do) and a
causal mask, a SwiGLU MLP, residual adds; final RMSNormalization and an untied LM head.
Inputs `input_ids`, `position_ids` [batch, seq] int64, output logits [batch, seq, vocab].

Each stage runs in a fresh subprocess so that its peak memory is its own:
  1. prune: spa.ir.load (external data memory-mapped) -> analyze -> plan (l2, ratio 0.5,
     exact groups only: attention heads and MLP channels; the residual stream passes
     RMSNormalization and is approximate) -> rewrite (apply the plan, check the result,
     index the pruned model for its statistics, as spa.prune does) -> save (written with
     external data).
     Times per stage; peak RSS (VmHWM) and, sampled every 10 ms, the peaks of anonymous
     and file-backed resident memory (mapped weights are page cache: the kernel can drop
     them at any time).
  2. ort: the pruned file loads in ONNX Runtime (InferenceSession on the path) and runs
     one forward pass (batch 1, seq 8).
  3. oracle: the masked-equivalence oracle of spa.verify on the full model, reduced to one
     input (batch 1, seq 8) and run one model at a time: the masked original (original
     graph, removed channels silenced after every node) vs the pruned file; max relative
     error <= 1e-5 passes.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DOC = os.path.join(ROOT, "docs", "scale.md")
BEGIN, END = "<!-- scale.py:begin -->", "<!-- scale.py:end -->"
RATIO, CRITERION = 0.5, "l2"
SEQ = 8
POOL = 1 << 24  # standard normals the weights are drawn from (64 MiB)


# ------------------------------------------------------------------------------------------
# the model


def generate(path: str, *, layers: int = 24, hidden: int = 2048, heads: int = 16,
             kv_heads: int | None = None, ffn: int = 5504, vocab: int = 32000,
             max_pos: int = 4096, seed: int = 0) -> dict:
    """Write a Llama-style decoder to `path` + `path.data`, one weight at a time."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    kv_heads = kv_heads or heads
    dh = hidden // heads
    rep = heads // kv_heads
    data_name = os.path.basename(path) + ".data"
    nodes, inits, k = [], [], [0]
    f = open(path + ".data.tmp", "wb")
    pos = [0]

    def name(base):
        k[0] += 1
        return f"{base}_{k[0]}"

    pool = np.random.default_rng(seed).standard_normal(POOL, dtype=np.float32)

    def weight(tname, shape, kind="normal", scale=0.02):
        """Append a float32 weight to the data file (64 KiB aligned), in row chunks. Values:
        a seeded window of a pool of standard normals, each row scaled by its own seeded
        factor in [0.5, 1.5) (so channel norms differ; drawing 1.3 G fresh normals would
        cost minutes of CPU)."""
        pad = -pos[0] % 65536
        f.write(bytes(pad))
        pos[0] += pad
        rng = np.random.default_rng([seed, len(inits)])
        rows = shape[0]
        per_row = math.prod(shape[1:])
        step = max(1, (POOL // 4) // max(1, per_row))
        for a in range(0, rows, step):
            r = min(step, rows - a)
            start = int(rng.integers(0, POOL - r * per_row + 1))
            blk = pool[start:start + r * per_row].reshape(r, per_row) * \
                (np.float32(scale) * (0.5 + rng.random((r, 1), dtype=np.float32)))
            if kind != "normal":  # norm gains: around one
                blk += np.float32(1.0)
            f.write(blk.astype("<f4").tobytes())
        t = TensorProto(name=tname, data_type=TensorProto.FLOAT, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        nbytes = math.prod(shape) * 4
        for key, v in (("location", data_name), ("offset", str(pos[0])),
                       ("length", str(nbytes))):
            t.external_data.add(key=key, value=v)
        pos[0] += nbytes
        inits.append(t)
        return tname

    def const(tname, arr):
        inits.append(onnx.numpy_helper.from_array(np.asarray(arr), tname))
        return tname

    def op(op_type, inputs, **attrs):
        out = name(op_type.lower())
        nodes.append(helper.make_node(op_type, inputs, [out], name=name(op_type), **attrs))
        return out

    def rms(x, tname):
        return op("RMSNormalization", [x, weight(tname, (hidden,), "gain", 0.05)], axis=-1,
                  epsilon=1e-5)

    # shared constants
    split_q = const("shape_q", np.array([0, 0, heads, dh], np.int64))
    split_kv = const("shape_kv", np.array([0, 0, kv_heads, dh], np.int64))
    merge = const("shape_merge", np.array([0, 0, hidden], np.int64))
    scale = const("attn_scale", np.array(dh ** -0.5, np.float32))
    inv = 1.0 / (10000.0 ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    cos_t = const("rope_cos", np.cos(ang).astype(np.float32))
    sin_t = const("rope_sin", np.sin(ang).astype(np.float32))
    zero = const("zero_1", np.array([0], np.int64))
    half = const("half_dh", np.array([dh // 2], np.int64))
    full = const("full_dh", np.array([dh], np.int64))
    ax3 = const("axis_3", np.array([3], np.int64))

    ids, pos_ids = "input_ids", "position_ids"
    seq = op("Shape", [ids], start=1, end=2)                       # [T]
    one = const("axis_1", np.array([1], np.int64))
    cos = op("Unsqueeze", [op("Gather", [cos_t, pos_ids], axis=0), one])  # [B, 1, T, dh]
    sin = op("Unsqueeze", [op("Gather", [sin_t, pos_ids], axis=0), one])
    tt = op("Concat", [seq, seq], axis=0)
    neg = op("ConstantOfShape", [tt], value=onnx.numpy_helper.from_array(
        np.array([-1e9], np.float32), "neg"))
    mask = op("Trilu", [neg], upper=1)                             # [T, T], 0 on/below diag
    if rep > 1:
        unsq = const("axis_2", np.array([2], np.int64))
        expand = const("expand_kv", np.array([1, 1, rep, 1, 1], np.int64))
        merge_kv = const("shape_kv_heads", np.array([0, heads, -1, dh], np.int64))

    def rope(t):  # t [B, H, T, dh]
        x1 = op("Slice", [t, zero, half, ax3])
        x2 = op("Slice", [t, half, full, ax3])
        rot = op("Concat", [op("Neg", [x2]), x1], axis=3)
        return op("Add", [op("Mul", [t, cos]), op("Mul", [rot, sin])])

    x = op("Gather", [weight("embed_tokens", (vocab, hidden)), ids], axis=0)
    for layer in range(layers):
        p = f"layers.{layer}."
        h = rms(x, p + "input_norm")
        q = op("MatMul", [h, weight(p + "q_proj", (hidden, heads * dh))])
        kk = op("MatMul", [h, weight(p + "k_proj", (hidden, kv_heads * dh))])
        v = op("MatMul", [h, weight(p + "v_proj", (hidden, kv_heads * dh))])
        q = rope(op("Transpose", [op("Reshape", [q, split_q])], perm=[0, 2, 1, 3]))
        kk = rope(op("Transpose", [op("Reshape", [kk, split_kv])], perm=[0, 2, 1, 3]))
        v = op("Transpose", [op("Reshape", [v, split_kv])], perm=[0, 2, 1, 3])
        if rep > 1:  # [B, kv, T, dh] -> [B, kv, rep, T, dh] -> [B, heads, T, dh]
            kk = op("Reshape", [op("Expand", [op("Unsqueeze", [kk, unsq]), expand]), merge_kv])
            v = op("Reshape", [op("Expand", [op("Unsqueeze", [v, unsq]), expand]), merge_kv])
        s = op("MatMul", [q, op("Transpose", [kk], perm=[0, 1, 3, 2])])
        s = op("Add", [op("Mul", [s, scale]), mask])
        o = op("MatMul", [op("Softmax", [s], axis=-1), v])
        o = op("Reshape", [op("Transpose", [o], perm=[0, 2, 1, 3]), merge])
        x = op("Add", [x, op("MatMul", [o, weight(p + "o_proj", (heads * dh, hidden))])])
        h = rms(x, p + "post_attention_norm")
        g = op("MatMul", [h, weight(p + "gate_proj", (hidden, ffn))])
        u = op("MatMul", [h, weight(p + "up_proj", (hidden, ffn))])
        a = op("Mul", [op("Mul", [g, op("Sigmoid", [g])]), u])    # SiLU(gate) * up
        x = op("Add", [x, op("MatMul", [a, weight(p + "down_proj", (ffn, hidden))])])
    x = rms(x, "final_norm")
    logits = op("MatMul", [x, weight("lm_head", (hidden, vocab))])
    nodes[-1].output[0] = "logits"
    f.close()
    graph = helper.make_graph(
        nodes, "llama_like",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info(pos_ids, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", "seq", vocab])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)],
                          producer_name="spa benchmarks/scale.py")
    m.ir_version = 10
    with open(path + ".tmp", "wb") as out:
        out.write(m.SerializeToString())
    os.replace(path + ".data.tmp", path + ".data")
    os.replace(path + ".tmp", path)
    params = sum(math.prod(t.dims) for t in inits if t.data_type == TensorProto.FLOAT)
    largest = max(math.prod(t.dims) * 4 for t in inits)
    return {"params": int(params), "layers": layers, "hidden": hidden, "heads": heads,
            "kv_heads": kv_heads, "ffn": ffn, "vocab": vocab,
            "data_bytes": os.path.getsize(path + ".data"), "largest_tensor_bytes": largest}


# ------------------------------------------------------------------------------------------
# measurement helpers (inside the stage subprocesses)


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class Sampler:
    """Peaks of resident memory per stage, sampled every 10 ms: total, anonymous and
    file-backed (the kernel keeps only the total's high-water mark, VmHWM)."""

    def __init__(self):
        self.stage, self.peaks = None, {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self):
        s = _status()
        with self._lock:
            p = self.peaks.setdefault(self.stage, {"rss": 0, "anon": 0, "file": 0})
            p["rss"] = max(p["rss"], s.get("VmRSS", 0))
            p["anon"] = max(p["anon"], s.get("RssAnon", 0))
            p["file"] = max(p["file"], s.get("RssFile", 0))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.01)

    def mark(self, stage: str):
        self._sample()  # the end of the previous stage
        with self._lock:
            self.stage = stage
        self._sample()

    def stop(self):
        self._sample()
        self._stop.set()
        self._t.join()


def stage_prune(src: str, out: str) -> dict:
    import spa
    from spa.api import make_plan, stats
    from spa.ir.model import from_proto
    from spa.rewrite.apply import apply_plan, check

    sampler = Sampler()
    rec, marks = {}, {}
    rec["imports_rss"] = _status()["VmRSS"]  # interpreter, numpy, onnx, scipy, spa

    @contextlib.contextmanager
    def stage(name):
        """Wall and CPU time of a stage, its sampled peaks and VmHWM at its end."""
        sampler.mark(name)
        t, c = time.perf_counter(), time.process_time()
        yield
        rec[f"{name}_s"] = time.perf_counter() - t
        rec[f"{name}_cpu"] = time.process_time() - c
        marks[name] = _status()["VmHWM"]

    with stage("load"):
        model = spa.load(src)
    with stage("analyze"):
        ana = spa.analyze(model)
    with stage("plan"):
        plan = make_plan(model, ana, ratio=RATIO, criterion=CRITERION, exact_only=True)
    with stage("rewrite"):
        proto = apply_plan(model, ana, plan)
        check(proto, model.proto, model.path)
        after = stats(from_proto(proto, path=model.path))  # as spa.prune does
    with stage("save"):
        spa.save(proto, out, source=src)
    with open(out + ".plan.json", "w") as f:  # for the oracle stage
        f.write(plan.dumps())
    sampler.stop()
    before = stats(model)
    rec.update(before=before, after=after, groups=len(ana.groups),
               groups_pruned=len(plan.keep),
               kept={str(g): f"{len(k)}/{ana.groups[g].channels}" for g, k in plan.keep.items()},
               kinds=sorted({ana.groups[g].kind for g in plan.keep}),
               vmhwm_after=marks, stage_peaks=sampler.peaks,
               peak_anon=max(p["anon"] for p in sampler.peaks.values()),
               peak_file=max(p["file"] for p in sampler.peaks.values()),
               maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               streaming=model.streaming)
    return rec


def stage_ort(out: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    t = time.perf_counter()
    opts = ort.SessionOptions()
    sess = ort.InferenceSession(out, opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    vocab = sess.get_outputs()[0].shape[-1]
    ids = np.random.default_rng(0).integers(0, vocab, (1, SEQ)).astype(np.int64)
    t = time.perf_counter()
    logits = sess.run(None, {"input_ids": ids, "position_ids": np.arange(SEQ)[None]})[0]
    run_s = time.perf_counter() - t
    return {"load_s": load_s, "run_s": run_s, "shape": list(logits.shape),
            "finite": bool(np.isfinite(logits).all()), "vmhwm": _status()["VmHWM"]}


def stage_oracle(src: str, out: str) -> dict:
    """spa.verify's oracle, one session at a time (each holds the whole model)."""
    import gc
    import numpy as np
    import spa
    from spa.plan import Plan
    from spa.runtime import session_for
    from spa.verify import _rel, masked_model

    model = spa.load(src)
    ana = spa.analyze(model)
    plan = Plan.load(out + ".plan.json")  # the plan the prune stage applied
    plan.validate(ana)
    kept = plan.kept_indices(ana)
    vocab = model.consts.shape("embed_tokens")[0]
    feeds = {"input_ids": np.random.default_rng(1).integers(0, vocab, (1, SEQ))
             .astype(np.int64), "position_ids": np.arange(SEQ, dtype=np.int64)[None]}
    res, times = {}, {}
    for label, proto in (("original", lambda: model.proto),
                         ("masked", lambda: masked_model(model, kept)),
                         ("pruned", lambda: spa.load(out).proto)):
        t = time.perf_counter()
        s = session_for(proto())
        res[label] = s.run(["logits"], feeds)[0]
        times[label] = time.perf_counter() - t
        del s
        gc.collect()
    err = _rel(res["pruned"], res["masked"])
    change = _rel(res["pruned"], res["original"])
    return {"max_rel_error": err, "max_rel_change": change, "passed": bool(err <= 1e-5),
            "exact": not plan.touches_approximate(ana), "seconds": times,
            "vmhwm": _status()["VmHWM"]}


# ------------------------------------------------------------------------------------------
# driver


def _run_stage(*args) -> dict:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--stage", *args],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"stage {args[0]} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


WEIGHT_STAGES = ("plan", "rewrite", "save")


def overheads(info: dict, pr: dict) -> dict:
    """What the run costs without the weights, and what reading them adds on top."""
    base = pr["vmhwm_after"]["analyze"]  # load + analyze read no weight
    peak = max(pr["stage_peaks"][s]["rss"] for s in WEIGHT_STAGES)
    return {"imports": pr["imports_rss"], "base": base,
            "base_file": max(pr["stage_peaks"][s]["file"] for s in ("load", "analyze")),
            "weights_peak": peak, "excess": max(0, peak - base),
            "ratio": max(0, peak - base) / info["largest_tensor_bytes"]}


def render_sizes(runs: list) -> list[str]:
    """One row per model size: time and memory against the weights' bytes."""
    lines = ["", "Scaling (the same prune at each size, each in a fresh process):", "",
             "| layers | parameters | data file | largest tensor | CPU time: load+analyze | "
             "plan | rewrite+save | total CPU | CPU s per GB | peak RSS | load+analyze peak | "
             "peak above it |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for info, pr in runs:
        o = overheads(info, pr)
        cpu = {s: pr[s + "_cpu"] for s in ("load", "analyze", "plan", "rewrite", "save")}
        total = sum(cpu.values())
        lines.append(
            f"| {info['layers']} | {info['params'] / 1e9:.3f} B | {_gb(info['data_bytes'])} | "
            f"{_mb(info['largest_tensor_bytes'])} | {cpu['load'] + cpu['analyze']:.1f} s | "
            f"{cpu['plan']:.1f} s | {cpu['rewrite'] + cpu['save']:.1f} s | {total:.1f} s | "
            f"{total / (info['data_bytes'] / 1e9):.2f} | {_mb(pr['maxrss'])} | "
            f"{_mb(o['base'])} | {_mb(o['excess'])} |")
    return lines


def render(info: dict, pr: dict, ort_r: dict, orc: dict, cmd: str,
           runs: list | None = None) -> str:
    largest = info["largest_tensor_bytes"]
    target = 1.5 * largest
    o = overheads(info, pr)
    b, a = pr["before"], pr["after"]
    lines = [
        BEGIN,
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"`{cmd}`; load average {info['loadavg']} when it started (other jobs share the "
        "machine: the wall times are mostly waiting; CPU time is this process's own).",
        "",
        f"Model: {info['layers']} layers, hidden {info['hidden']}, {info['heads']} heads "
        f"({info['kv_heads']} kv), SwiGLU {info['ffn']}, vocab {info['vocab']}: "
        f"{info['params'] / 1e9:.3f} B parameters, float32, data file "
        f"{_gb(info['data_bytes'])}; largest tensor {_mb(largest)} (embedding, LM head).",
        "",
        "| stage | wall time | CPU time | VmHWM after | peak RSS in the stage | "
        "of which anonymous | file-backed (mapped weights) |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in ("load", "analyze", "plan", "rewrite", "save"):
        p = pr["stage_peaks"][st]
        lines.append(f"| {st} | {pr[st + '_s']:.1f} s | {pr[st + '_cpu']:.1f} s | "
                     f"{_mb(pr['vmhwm_after'][st])} | {_mb(p['rss'])} | {_mb(p['anon'])} | "
                     f"{_mb(p['file'])} |")
    stages = ("load", "analyze", "plan", "rewrite", "save")
    total = sum(pr[s + "_s"] for s in stages)
    cpu = sum(pr[s + "_cpu"] for s in stages)
    lines += [
        f"| **total** | **{total:.1f} s** | **{cpu:.1f} s** | **{_mb(pr['maxrss'])}** | | | |",
        "",
        f"- Peak RSS {_mb(pr['maxrss'])} = {pr['maxrss'] / info['data_bytes']:.3f} x the model "
        f"size, {pr['maxrss'] / largest:.2f} x the largest tensor (target: below 1.5 x the "
        f"largest tensor, {_mb(target)}, plus a small overhead). Sampled peaks: anonymous "
        f"memory {_mb(pr['peak_anon'])}, file-backed (memory-mapped weights, page cache) "
        f"{_mb(pr['peak_file'])}.",
        f"- Overhead: {_mb(o['imports'])} once the libraries are imported (interpreter, "
        f"numpy, onnx, scipy, spa); a peak of {_mb(o['base'])} through load + analyze, which "
        f"read no weight (file-backed at most {_mb(o['base_file'])}): the protobuf, the shapes and "
        f"the analysis' tables, which grow with the graph's dims, not with the weights' "
        f"bytes. The stages that read weights (plan, rewrite, save) peak at "
        f"{_mb(o['weights_peak'])}: {_mb(o['excess'])} above that, "
        f"**{o['ratio']:.2f} x the largest tensor** (target: at most 1.5 x).",
        f"- Pruned: {pr['groups_pruned']} of {pr['groups']} groups ({', '.join(pr['kinds'])}; "
        f"exact groups only), params {b['params'] / 1e9:.3f} B -> {a['params'] / 1e9:.3f} B "
        f"({a['params'] / b['params']:.1%}), MACs/token {b['macs'] / 1e9:.2f} G -> "
        f"{a['macs'] / 1e9:.2f} G; output {_gb(pr['out_bytes'])} "
        f"(model file {pr['out_model_bytes'] / 1e3:.0f} kB + data file), written with "
        f"external data; input files byte-identical before and after: "
        f"{'yes' if pr['input_unchanged'] else 'NO'}.",
        f"- ONNX Runtime {ort_r['version']}: InferenceSession on the pruned file "
        f"{ort_r['load_s']:.1f} s, one forward pass (batch 1, seq {SEQ}) {ort_r['run_s']:.2f} s, "
        f"logits {ort_r['shape']}, all finite: {'yes' if ort_r['finite'] else 'NO'} "
        f"(that process's peak RSS {_mb(ort_r['vmhwm'])}).",
        f"- Oracle (spa.verify's masked equivalence on the whole model, reduced to one input "
        f"of batch 1, seq {SEQ}, and run one model at a time): max relative error "
        f"{orc['max_rel_error']:.3g} vs the masked original -> "
        f"**{'PASS' if orc['passed'] else 'FAIL'}** (tolerance 1e-5); the pruning changed "
        f"the logits by {orc['max_rel_change']:.3g} (relative) vs the unpruned model. "
        f"Sessions+runs: original {orc['seconds']['original']:.1f} s, masked "
        f"{orc['seconds']['masked']:.1f} s, pruned {orc['seconds']['pruned']:.1f} s.",
    ]
    if runs and len(runs) > 1:
        lines += render_sizes(runs)
    lines.append(END)
    return "\n".join(lines)


def write_doc(block: str) -> None:
    from spa.ir import write_text_atomic
    text = open(DOC).read() if os.path.exists(DOC) else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    write_text_atomic(DOC, text)


def _digest(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def measure(args, layers: int, full: bool) -> tuple:
    """Generate (or reuse) the model with `layers` layers in its own folder, prune it in a
    fresh process; `full`: also ONNX Runtime and the oracle on the pruned file."""
    d = os.path.join(args.dir, f"L{layers}")
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "llama.onnx")
    out = os.path.join(d, "llama-pruned.onnx")
    print(f"disk free in {d}: {shutil.disk_usage(d).free / 1e9:.1f} GB")
    t = time.perf_counter()
    shape = dict(layers=layers, hidden=args.hidden, heads=args.heads,
                 kv_heads=args.kv_heads, ffn=args.ffn, vocab=args.vocab)
    meta = src + ".json"
    if args.reuse and os.path.exists(meta) and os.path.exists(src + ".data"):
        info = json.load(open(meta))
        if info.get("args") != shape:
            raise SystemExit(f"{src} was generated with other options; drop --reuse")
    else:
        info = generate(src, **shape)
        info["args"] = shape
        with open(meta, "w") as f:
            json.dump(info, f)
        print(f"generated {info['params'] / 1e9:.3f} B params, {_gb(info['data_bytes'])} "
              f"in {time.perf_counter() - t:.1f} s")
    info["loadavg"] = open("/proc/loadavg").read().split()[0]
    ort_r = orc = None
    try:
        digests = {p: _digest(p) for p in (src, src + ".data")}
        pr = _run_stage("prune", src, out)
        pr["input_unchanged"] = digests == {p: _digest(p) for p in digests}
        pr["out_model_bytes"] = os.path.getsize(out)
        pr["out_bytes"] = pr["out_model_bytes"] + (os.path.getsize(out + ".data")
                                                   if os.path.exists(out + ".data") else 0)
        print(json.dumps(pr, indent=1))
        if full:
            ort_r = _run_stage("ort", out)
            import onnxruntime
            ort_r["version"] = onnxruntime.__version__
            print(json.dumps(ort_r, indent=1))
            orc = _run_stage("oracle", src, out)
            print(json.dumps(orc, indent=1))
    finally:
        for p in (out, out + ".data", out + ".plan.json") + (
                () if args.keep else (src, src + ".data", meta)):
            if os.path.exists(p):
                os.unlink(p)
    return info, pr, ort_r, orc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(ROOT, ".cache", "scale"))
    ap.add_argument("--layers", type=int, nargs="+", default=[24],
                    help="decoder layers; several sizes: each is pruned and measured (the "
                    "scaling table), ONNX Runtime and the oracle run on the largest")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse models kept by an earlier --keep run")
    ap.add_argument("--no-write", action="store_true", help="print, do not update docs")
    ap.add_argument("--json", help="also write the raw measurements to this file")
    ap.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        kind, *rest = args.stage
        fn = {"prune": stage_prune, "ort": stage_ort, "oracle": stage_oracle}[kind]
        print(json.dumps(fn(*rest)))
        return 0
    sizes = sorted(set(args.layers))
    runs = []
    for layers in sizes:
        info, pr, ort_r, orc = measure(args, layers, full=layers == sizes[-1])
        runs.append((info, pr))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ort": ort_r, "oracle": orc}, f, indent=1)
    cmd = "python benchmarks/scale.py" + ("" if args.layers == [24] else
                                          " --layers " + " ".join(map(str, args.layers)))
    block = render(info, pr, ort_r, orc, cmd, runs)
    print(block)
    if not args.no_write:
        write_doc(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
