"""benchmarks/any_time.py's bookkeeping: the results file (rows replaced by key), the
resumable run loop (recorded runs are skipped), and the doc tables (seeds side by side,
differences to the dense model of the same seeds and recipe, written between markers)."""
import argparse
from pathlib import Path

from bench_util import load_benchmark


def _bench():
    return load_benchmark("any_time")


def torch_row(model, crit, seed, acc, steps=50, lr=0.02, macs=50, params=40):
    return {"key": f"init-torch/{model}/{crit}/{steps}/lr{lr}/seed{seed}",
            "section": "init-torch", "model": model, "criterion": crit,
            "select": "uniform" if crit in ("none", "random") else "global",
            "dense_macs": 100, "dense_params": 100,
            "macs": 100 if crit == "none" else macs, "params": 100 if crit == "none" else params,
            "accuracy": acc, "train_seconds": 10.0 * (seed + 1),
            "recipe": {"steps": steps, "batch": 128, "lr": lr, "seed": seed}}


def test_results_replace_by_key_and_pending_skips_done(tmp_path):
    b = _bench()
    f = tmp_path / "results.json"
    b.add_result(f, torch_row("m", "none", 0, 0.5))
    b.add_result(f, torch_row("m", "snip", 0, 0.4))
    b.add_result(f, torch_row("m", "snip", 0, 0.45))          # re-run replaces the row
    rows = b.load_results(f)
    assert [(r["criterion"], r["accuracy"]) for r in rows] == [("none", 0.5), ("snip", 0.45)]
    a = argparse.Namespace(results=str(f), criteria=["none", "snip", "random"],
                           models=["m", "n"], select="global")
    todo = list(b.pending(a, lambda name, crit, sel: f"init-torch/{name}/{crit}/50/lr0.02/"
                          f"seed0" if name == "m" else f"other/{name}/{crit}/{sel}"))
    assert [(c, n, s) for c, n, s, _k in todo] == [
        ("none", "n", "uniform"), ("snip", "n", "global"), ("random", "m", "uniform"),
        ("random", "n", "uniform")]


def test_init_torch_table_seeds_and_recipes(tmp_path):
    b = _bench()
    rows = [torch_row("m", "none", 0, 0.50), torch_row("m", "none", 1, 0.60),
            torch_row("m", "snip", 1, 0.58), torch_row("m", "snip", 0, 0.47),
            torch_row("m", "random", 0, 0.52),
            torch_row("m", "none", 0, 0.80, steps=300, lr=0.05),
            torch_row("m", "crop", 0, 0.70, steps=300, lr=0.05)]
    lines = b.render(rows)["init-torch"].splitlines()[2:]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    short = [(c[1], c[2], c[4], c[5], c[6]) for c in cells]
    assert short == [
        ("50 × 128, 0.02", "— (dense)", "50.00 / 60.00 (seed 0, 1)", "55.00 %", ""),
        ("50 × 128, 0.02", "`random`, uniform", "52.00 (seed 0)", "52.00 %", "+2.00"),
        # paired with the dense runs of seeds 0 and 1: (-3 + -2) / 2
        ("50 × 128, 0.02", "`snip`, global", "47.00 / 58.00 (seed 0, 1)", "52.50 %", "-2.50"),
        ("300 × 128, 0.05", "— (dense)", "80.00 (seed 0)", "80.00 %", ""),
        ("300 × 128, 0.05", "`crop`, global", "70.00 (seed 0)", "70.00 %", "-10.00")]
    assert cells[2][3] == "50.0 % / 40.0 %" and cells[2][7] == "15 s"


def test_table_writes_between_markers_only(tmp_path):
    b = _bench()
    f = tmp_path / "results.json"
    for r in (torch_row("m", "none", 0, 0.5), torch_row("m", "snip", 0, 0.4)):
        b.add_result(f, r)
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- any-time:init-torch -->\nold\n<!-- /any-time:init-torch -->\n"
                   "middle\n<!-- any-time:finetune -->\nold\n<!-- /any-time:finetune -->\n"
                   "end\n")
    b.main(["table", "--results", str(f), "--doc", str(doc)])
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| m | 50 × 128, 0.02 | `snip`, global |" in text and "middle\n" in text
    # the finetune table (no rows) is the header only
    ft = text.split("<!-- any-time:finetune -->\n")[1].split("<!-- /any-time:finetune")[0]
    assert ft.splitlines()[0].startswith("| model | original |") and len(ft.splitlines()) == 2
    assert Path(str(doc)).read_text().count("<!-- any-time:init-torch -->") == 1
