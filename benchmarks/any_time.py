"""Pruning at any time of a model's life, measured end to end (docs/any-time.md).

    python benchmarks/any_time.py init-torch --models resnet56 mobilenetv2
    python benchmarks/any_time.py init-onnx --models flax_cnn keras_cnn
    python benchmarks/any_time.py finetune --models resnet56 flax_cnn keras_cnn
    python benchmarks/any_time.py table          # rewrite the tables in docs/any-time.md

init-torch  prune at initialisation, then train from scratch in torch: the untrained
            module of models/train.py (built with its seed) is exported with
            converters.torch.export(keep_bn=True), scored by SPA with a gradient criterion
            on the labelled calibration images (models/trained/fmnist_calib512.npz) or
            with `random`, pruned to half the MACs (--target flops:0.5), the plan is carried
            back onto the module with converters.torch.apply_plan, and the shrunk module is
            trained with the same short recipe as the dense module ("none" criterion).
init-onnx   the same on the flax and the Keras CNN without their frameworks: the untrained
            model exported to ONNX, pruned at init by `spa prune`, trained from scratch by
            `spa finetune`, against the dense untrained ONNX model trained by `spa finetune`
            with the same settings.
finetune    train -> prune (`spa prune`, l2 / taylor, flops:0.5) -> `spa finetune` a few
            steps, on the trained zoo models.

Every finished run is appended to the JSON results file (--results) at once, so a run
that is cut off leaves what it finished; `table` renders the file into docs/any-time.md
between the <!-- any-time:NAME --> markers. Accuracies are top-1 on the 10 000 Fashion-MNIST
test images, measured with ONNX Runtime on ONNX files (models.fmnist.evaluate_onnx).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAINED = ROOT / "models" / "trained"
CALIB = TRAINED / "fmnist_calib512.npz"
RESULTS = ROOT / "benchmarks" / "any_time.json"
DOC = ROOT / "docs" / "any-time.md"
TARGET = "flops:0.5"
PY = sys.executable


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# --------------------------------------------------------------------------- results file

def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def add_result(path: Path, row: dict) -> None:
    """Append (or replace, by key) one row and write the file atomically."""
    from spa.ir import write_text_atomic

    rows = [r for r in load_results(path) if r.get("key") != row["key"]]
    rows.append(row)
    write_text_atomic(str(path), json.dumps(rows, indent=1) + "\n")


def done(path: Path, key: str) -> bool:
    return any(r.get("key") == key for r in load_results(path))


def macs_params(onnx_path) -> tuple[int, int]:
    import spa
    from spa.api import stats

    s = stats(spa.load(str(onnx_path)))
    return int(s["macs"]), int(s["params"])


def run_cmd(cmd: list[str], logfile: Path) -> float:
    """Run a command (logged to `logfile`), return its wall time; raise on failure."""
    t0 = time.time()
    log("$ " + shlex.join(cmd))
    with open(logfile, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"{cmd[:4]} failed with exit code {r.returncode} (see {logfile})")
    return time.time() - t0


def rel(p) -> str:
    """`p` relative to the repository when inside it, else absolute."""
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


# --------------------------------------------------------------------------- torch, at init

def train_module(model, name: str, steps: int, subset: int, seed: int, lr: float,
                 bn_samples: int = 2048):
    """models.train.train's recipe (SGD-Nesterov, weight decay, one-cycle schedule,
    crop+flip augmentation, batch 128) on `model` with peak learning rate `lr`, for one
    pass over a seeded random subset of `subset` training images (`steps` = subset /
    batch); then the BatchNorm running statistics are recomputed as population statistics
    of `bn_samples` images of the subset (no augmentation), as `spa finetune` does: after
    so few steps the running averages lag far behind the weights."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from models.fmnist import load_fmnist
    from models.train import MODELS, augment

    recipe = dict(MODELS[name][2], lr=lr)
    bs = recipe["batch"]
    if steps * bs != subset:
        raise ValueError(f"subset {subset} is not {steps} steps of {bs}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_fmnist("train")
    idx = np.random.default_rng(seed).permutation(len(images))[:subset]
    x_all = torch.from_numpy(np.array(images[idx]))
    y_all = torch.from_numpy(np.array(labels[idx]))
    model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe["wd"]},
              {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], epochs=1, steps_per_epoch=steps, pct_start=0.15,
        div_factor=10.0, final_div_factor=100.0)
    model.train()
    perm = torch.randperm(subset, generator=gen)
    t0 = time.time()
    for i in range(steps):
        b = perm[i * bs:(i + 1) * bs]
        x = augment(x_all[b], gen).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y_all[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i in (9, steps // 2, steps - 1):
            log(f"  step {i + 1}/{steps} loss {loss.item():.3f} "
                f"{(time.time() - t0) / (i + 1):.2f} s/step")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    with torch.no_grad():
        for s in range(0, bn_samples, 256):
            model(x_all[s:s + 256].contiguous(memory_format=torch.channels_last))
    recipe.update(steps=steps, train_images=subset, subset_seed=seed, seed=seed,
                  bn_recalibration=f"population statistics of {bn_samples} training images",
                  schedule="onecycle(pct_start=0.15, div 10, final div 100)",
                  nesterov=True, momentum=0.9, augmentation="random crop (pad 2) + flip",
                  threads=torch.get_num_threads())
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, recipe, time.time() - t0


def pending(a, key_of):
    """The runs of a subcommand not yet in its results file, criterion by criterion, as
    (criterion, model, selection, key); the selection is --select, or uniform for the
    data-free `none` and `random`."""
    for crit in a.criteria:
        for name in a.models:
            sel = "uniform" if crit in ("none", "random") else getattr(a, "select", None)
            key = key_of(name, crit, sel)
            if done(Path(a.results), key):
                log(f"{key}: done already")
                continue
            log(f"== {key}")
            yield crit, name, sel, key


def init_torch(a) -> None:
    import numpy as np
    import torch

    import spa
    from converters.torch import apply_plan, export
    from models.fmnist import evaluate_onnx
    from models.train import build, export_onnx

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = pending(a, lambda name, crit, sel: f"init-torch/{name}/{crit}/{sel}/"
                   f"{a.steps}x{a.subset}/lr{a.lr}/seed{a.seed}")
    for crit, name, select, key in runs:
        torch.manual_seed(a.seed)
        model = build(name)
        row = {"key": key, "section": "init-torch", "model": name, "criterion": crit,
               "select": select, "target": TARGET if crit != "none" else None}
        dense = work / f"{name}_init_s{a.seed}.onnx"
        t0 = time.time()
        if not dense.is_file():
            export(model, (torch.zeros(2, 1, 28, 28),), dense, exporter="legacy")
        row["dense_macs"], row["dense_params"] = macs_params(dense)
        if crit != "none":
            kw = dict(calib=str(CALIB)) if crit != "random" else {}
            res = spa.prune(str(dense), criterion=crit, target=TARGET, select=select,
                            seed=a.seed, **kw)
            x = torch.from_numpy(np.load(CALIB)["input"][:8])
            apply_plan(model, str(dense), res.plan, example_inputs=(x,), rtol=1e-3)
            row["prune_seconds"] = round(time.time() - t0, 1)
            row["plan_achieved"] = res.plan.options.get("achieved")
        model, recipe, secs = train_module(model, name, a.steps, a.subset, a.seed, a.lr)
        out = work / f"{name}_{crit}_{select}_s{a.seed}_trained.onnx"
        export_onnx(model, out)
        row["macs"], row["params"] = macs_params(out)
        row["accuracy"] = round(evaluate_onnx(out, threads=a.threads), 4)
        row.update(recipe=recipe, train_seconds=round(secs, 1), onnx=str(out),
                   finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        log(f"{key}: top-1 {row['accuracy']:.4f}, MACs {row['macs'] / row['dense_macs']:.3f}"
            f" of dense, train {secs:.0f} s")
        add_result(Path(a.results), row)


# --------------------------------------------------------------------------- ONNX only

def untrained_onnx(name: str, path: Path, seed: int) -> Path:
    """The untrained flax / Keras CNN of models/train_jax.py / train_keras.py (same
    architecture and seed as the trained zoo files), exported to ONNX."""
    if path.is_file():
        return path
    if name == "flax_cnn":
        from converters.jax import export
        from models.train_jax import build
        export(build(seed), (1, 1, 28, 28), path)
    elif name == "keras_cnn":
        from converters.keras import export
        from models.train_keras import _setup_tf, build
        _tf, keras = _setup_tf(1, seed)
        export(build(keras), path, inputs_as_nchw=True)
    else:
        raise ValueError(f"no untrained export for {name!r}")
    return path


def finetune_args(a) -> list[str]:
    args = ["--epochs", "1", "--limit", str(a.limit), "--seed", str(a.seed),
            "--threads", str(a.threads)]
    if a.optimizer:
        args += ["--optimizer", a.optimizer]
    if a.lr:
        args += ["--lr", str(a.lr)]
    return args


def ft_run(a, key: str, row: dict, src: Path, out: Path, logfile: Path) -> None:
    """`spa finetune src` with the run's settings; the accuracies are those its report
    gives (ONNX Runtime on the 10 000 test images, before and after training)."""
    rep = out.with_suffix(".report.json")
    cmd = [PY, "-m", "spa", "finetune", rel(src), "--data", "fashion-mnist",
           *finetune_args(a), "--report", rel(rep), "-o", rel(out)]
    secs = run_cmd(cmd, logfile)
    row["finetune_cmd"] = "spa " + shlex.join(cmd[3:])
    row["finetune_seconds"] = round(secs, 1)
    row["macs"], row["params"] = macs_params(out)
    report = json.loads(rep.read_text())  # spa finetune evaluates before and after (10k)
    row["accuracy_before"] = report["accuracy_before"]
    row["accuracy"] = report["accuracy_after"]
    row["finetune_settings"] = report.get("settings")
    row["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    log(f"{key}: top-1 {row['accuracy']:.4f} ({secs:.0f} s)")
    add_result(Path(a.results), row)


def prune_cmd(a, src: Path, crit: str, out: Path, logfile: Path, row: dict) -> None:
    cmd = [PY, "-m", "spa", "prune", rel(src), "--criterion", crit, "--target", TARGET,
           "--seed", str(a.seed)]
    if crit not in ("l1", "l2", "random", "fpgm", "lamp", "bn_scale"):
        cmd += ["--calib", rel(CALIB)]
    if a.round_to > 1:
        cmd += ["--round-to", str(a.round_to)]
    if a.select != "uniform" and crit != "random":
        cmd += ["--select", a.select]
    cmd += ["-o", rel(out)]
    row["prune_cmd"] = "spa " + shlex.join(cmd[3:])
    row["prune_seconds"] = round(run_cmd(cmd, logfile), 1)


def init_onnx(a) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    logfile = work / "init_onnx.log"
    runs = pending(a, lambda name, crit, sel: f"init-onnx/{name}/{crit}/{sel}/"
                   f"{a.optimizer or 'sgd'}/{a.limit}/seed{a.seed}")
    for crit, name, sel, key in runs:
        dense = untrained_onnx(name, work / f"{name}_init_s{a.seed}.onnx", a.seed)
        row = {"key": key, "section": "init-onnx", "model": name, "criterion": crit,
               "select": sel}
        row["dense_macs"], row["dense_params"] = macs_params(dense)
        src = dense
        if crit != "none":
            src = work / f"{name}_init_{crit}_{sel}.onnx"
            prune_cmd(a, dense, crit, src, logfile, row)
        ft_run(a, key, row, src, work / f"{name}_init_{crit}_{sel}_trained.onnx", logfile)


def finetune(a) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    logfile = work / "finetune.log"
    runs = pending(a, lambda name, crit, sel: f"finetune/{name}/{crit}/r{a.round_to}/"
                   f"{a.optimizer or 'sgd'}/{a.limit}")
    for crit, name, _sel, key in runs:
        orig = TRAINED / f"{name}.onnx"
        row = {"key": key, "section": "finetune", "model": name, "criterion": crit,
               "round_to": a.round_to,
               "original_accuracy": json.loads((TRAINED / f"{name}.json").read_text())
               ["accuracy"]}
        row["dense_macs"], row["dense_params"] = macs_params(orig)
        pruned = work / f"{name}_{crit}_r{a.round_to}.onnx"
        prune_cmd(a, orig, crit, pruned, logfile, row)
        ft_run(a, key, row, pruned, work / f"{name}_{crit}_r{a.round_to}_ft.onnx", logfile)


# --------------------------------------------------------------------------- tables

def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def _frac(r, dense=None) -> str:
    """MACs and parameters as fractions of the dense model: of `dense`'s ONNX file when
    given (the trained dense torch module, exported the same way), else of the file the
    run started from."""
    m, p = (dense["macs"], dense["params"]) if dense else (r["dense_macs"], r["dense_params"])
    return f"{100 * r['macs'] / m:.1f} % / {100 * r['params'] / p:.1f} %"


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _by_setting(rows: list[dict]) -> dict:
    """init-torch rows by (model, recipe label), in the order first seen; the recipe label
    is steps × batch and the peak learning rate, e.g. "50 × 128, 0.02"."""
    out: dict = {}
    for r in rows:
        rc = r["recipe"]
        out.setdefault((r["model"], f"{rc['steps']} × {rc['batch']}, {rc['lr']:g}"),
                       []).append(r)
    return out


def render(rows: list[dict]) -> dict[str, str]:
    tables = {}
    # at init, torch: one row per (model, recipe, criterion), the seeds side by side
    t = [r for r in rows if r["section"] == "init-torch"]
    lines = ["| model | recipe: steps × batch, peak lr | pruned at init with "
             "| MACs / params of dense | top-1 after training, per seed | mean "
             "| vs dense (same seeds) | train wall time |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    order = {"none": 0, "random": 1, "snip": 2, "grasp": 3, "crop": 4}
    for (name, recipe), runs in _by_setting(t).items():
        dense = {r["recipe"]["seed"]: r for r in runs if r["criterion"] == "none"}
        crits = {}
        for r in runs:
            crits.setdefault((r["criterion"], r["select"]), []).append(r)
        for (crit, select), rs in sorted(crits.items(),
                                         key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
            rs.sort(key=lambda r: r["recipe"]["seed"])
            label = "— (dense)" if crit == "none" else f"`{crit}`, {select}"
            ref = dense.get(rs[0]["recipe"]["seed"])
            paired = [(r, dense[r["recipe"]["seed"]]) for r in rs
                      if r["recipe"]["seed"] in dense]
            diff = "" if crit == "none" or not paired else \
                f"{100 * _mean(r['accuracy'] - d['accuracy'] for r, d in paired):+.2f}"
            seeds = " / ".join(f"{100 * r['accuracy']:.2f}" for r in rs)
            lines.append(f"| {name} | {recipe} | {label} | {_frac(rs[0], ref)} "
                         f"| {seeds} (seed {', '.join(str(r['recipe']['seed']) for r in rs)}) "
                         f"| {_pct(_mean(r['accuracy'] for r in rs))} | {diff} "
                         f"| {_mean(r['train_seconds'] for r in rs):.0f} s |")
    tables["init-torch"] = "\n".join(lines)
    # at init, ONNX only
    t = [r for r in rows if r["section"] == "init-onnx"]
    lines = ["| model | pruned at init with | MACs / params of dense | top-1 after `spa finetune` "
             "| vs dense | wall time |", "|---|---|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in t):
        mr = [r for r in t if r["model"] == name]
        dense = next((r for r in mr if r["criterion"] == "none"), None)
        for r in sorted(mr, key=lambda r: r["criterion"] != "none"):
            crit = "— (dense)" if r["criterion"] == "none" else \
                f"`{r['criterion']}`, {r['select']}"
            diff = "" if dense is None or r is dense else \
                f"{100 * (r['accuracy'] - dense['accuracy']):+.2f}"
            lines.append(f"| {name} | {crit} | {_frac(r)} | {_pct(r['accuracy'])} | {diff} "
                         f"| {r['finetune_seconds']:.0f} s |")
    tables["init-onnx"] = "\n".join(lines)
    # train -> prune -> fine-tune
    t = [r for r in rows if r["section"] == "finetune"]
    lines = ["| model | original | criterion | MACs / params | pruned, no fine-tuning "
             "| + `spa finetune` | steps × batch | wall time (fine-tune) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    order = {"resnet56": 0, "flax_cnn": 1, "keras_cnn": 2}
    for r in sorted(t, key=lambda r: (order.get(r["model"], 9), r["model"], r["criterion"])):
        st = r.get("finetune_settings") or {}
        lines.append(f"| {r['model']} | {_pct(r['original_accuracy'])} | `{r['criterion']}` "
                     f"| {_frac(r)} | {_pct(r['accuracy_before'])} | **{_pct(r['accuracy'])}** "
                     f"| {st.get('steps_per_epoch', '?')} × {st.get('batch', '?')} "
                     f"| {r['finetune_seconds']:.0f} s |")
    tables["finetune"] = "\n".join(lines)
    return tables


def table(a) -> None:
    from spa.ir import write_text_atomic

    doc = Path(a.doc)
    text = doc.read_text()
    for name, body in render(load_results(Path(a.results))).items():
        pat = re.compile(rf"(<!-- any-time:{name} -->\n)(?:.*?\n)?(<!-- /any-time:{name} -->)",
                         re.S)
        if not pat.search(text):
            log(f"no markers for {name} in {doc}; skipped")
            continue
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    write_text_atomic(str(doc), text)
    log(f"wrote {doc}")


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("init-torch", "init-onnx", "finetune", "table"):
        s = sub.add_parser(cmd)
        s.add_argument("--results", default=str(RESULTS))
        if cmd == "table":
            s.add_argument("--doc", default=str(DOC))
            continue
        s.add_argument("--models", nargs="+", required=True)
        s.add_argument("--work", default="/tmp/any_time")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--select", default="global" if cmd != "finetune" else "uniform",
                       help="selection for the data criteria (random: always uniform)")
        if cmd == "init-torch":
            s.add_argument("--criteria", nargs="+",
                           default=["none", "snip", "random", "grasp", "crop"])
            s.add_argument("--steps", type=int, default=100)
            s.add_argument("--subset", type=int, default=12800)
            s.add_argument("--lr", type=float, default=0.02,
                           help="peak learning rate (the zoo's 0.1 diverges in so few steps)")
        else:
            s.add_argument("--criteria", nargs="+", default=(
                ["none", "snip"] if cmd == "init-onnx" else ["l2", "taylor"]))
            s.add_argument("--limit", type=int, default=12800)
            s.add_argument("--optimizer", choices=["sgd", "adamw"])
            s.add_argument("--lr", type=float)
            s.add_argument("--round-to", type=int, default=1)
    a = p.parse_args(argv)
    {"init-torch": init_torch, "init-onnx": init_onnx, "finetune": finetune,
     "table": table}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
