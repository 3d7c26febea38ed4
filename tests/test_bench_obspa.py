"""benchmarks/obspa.py's results file and doc table: rows recorded as they come, later rows
replace earlier ones, the table lands between the markers and nowhere else."""
import json

from bench_util import load_benchmark


def _bench():
    return load_benchmark("obspa")


def _rows(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def row(model, frac, method, top1, **kw):
    r = {"model": model, "fraction": frac, "method": method, "top1": top1, "base": 0.9,
         "achieved": frac - 0.001, "time_s": 1.5, "load": 3.0}
    r.update(kw)
    return r


def test_table_orders_and_replaces(tmp_path):
    b = _bench()
    f = str(tmp_path / "rows.jsonl")
    b._record(f, {"model": "m", "fraction": 1.0, "method": "unpruned", "top1": 0.9})
    _rows(f, [row("m", 0.3, "random", 0.1), row("m", 0.7, "taylor", 0.5),
              row("m", 0.7, "obspa-512", 0.8, out_err=0.05),
              row("m", 0.7, "taylor", 0.6)])        # a re-run replaces the first taylor row
    lines = b.table(f).splitlines()
    body = lines[2:]
    assert body[0].startswith("| m | 1.00 | unpruned | 1.0000 | 90.00 |")
    methods = [ln.split("|")[3].strip() for ln in body[1:]]
    assert methods == ["obspa-512", "taylor", "random"]        # 0.7 before 0.3, METHODS order
    taylor = body[2]
    assert "60.00 (-30.00)" in taylor and "50.00" not in taylor
    assert "0.050" in body[1] and taylor.rstrip().endswith("3.0 |")
    assert len(body) == 4


def test_write_doc_between_markers(tmp_path):
    b = _bench()
    f = str(tmp_path / "rows.jsonl")
    _rows(f, [row("m", 0.5, "l2-global", 0.2)])
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{b.BEGIN}\nold table\n{b.END}\noutro\n")
    b.write_doc(f, str(doc))
    text = doc.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert text.count(b.BEGIN) == 1 and "| m | 0.50 | l2-global |" in text
    doc2 = tmp_path / "doc2.md"
    doc2.write_text("no markers\n")
    b.write_doc(f, str(doc2))
    assert doc2.read_text().startswith("no markers\n\n" + b.BEGIN)
