"""Hostile and broken inputs (tests/corpus/make_corpus.py): every case ends in a clear error
(exit 3, a message naming the problem) or a correct result — never a crash, a hang, a
partial output, or a changed input file."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "corpus"))
from make_corpus import cases  # noqa: E402

CORPUS_DIR = os.path.join(os.path.dirname(__file__), "..", ".cache", "corpus")
CASES = cases(CORPUS_DIR)
VERIFY_OK = {"float16.onnx", "control_flow_if.onnx", "long_chain.onnx"}


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("name,path,expect", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(name, path, expect, tmp_path):
    before = digest(path)
    out = tmp_path / "out.onnx"
    args = ["prune", path, "-o", str(out)] + (["--verify"] if name in VERIFY_OK else [])
    p = subprocess.run([sys.executable, "-m", "spa", *args], capture_output=True, text=True,
                       timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    assert digest(path) == before, "the input file was modified"
    leftovers = [f for f in os.listdir(tmp_path) if f != "out.onnx"]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if expect == "ok" or (expect == "ok-or-error" and p.returncode == 0):
        assert p.returncode == 0, p.stderr
        assert out.exists()
        if name in VERIFY_OK:
            assert "PASS" in p.stdout, p.stdout
    else:
        assert p.returncode == 3, (p.returncode, p.stderr)
        assert not out.exists(), "an output file was written on failure"
        needle = expect.split(":", 1)[1] if ":" in expect else ""
        assert needle in p.stderr, p.stderr
        assert os.path.basename(path) in p.stderr or os.path.dirname(path) in p.stderr


def test_analyze_refuses_the_same_way(tmp_path):
    bad = [c for c in CASES if c[2].startswith("error")][:8]
    for name, path, expect in bad:
        p = subprocess.run([sys.executable, "-m", "spa", "analyze", path], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 3 and "Traceback" not in p.stderr, (name, p.stderr)
