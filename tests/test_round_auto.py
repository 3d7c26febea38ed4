"""`--round-to auto`, the default: the groups whose channels are a convolution's channels
keep widths that are multiples of the provider's channel block; matrix-product groups keep
exact counts; an integer N keeps its old meaning (every group)."""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

import spa
from models.synthetic import G, load_proto
from spa import latency
from spa.cli import main as cli_main
from spa.select.align import TAG, group_alignment, resolve

CONV, HIDDEN = 48, 44


def conv_then_mlp():
    """conv 3->48, conv 48->48 (conv groups), pooled, MatMul 48->44->10 (the 44 hidden units
    are a MatMul-only group)."""
    g = G(seed=1)
    x = g.input(["N", 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, CONV)])
    h = g.op("Relu", [g.conv(h, CONV, CONV)])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [h])])
    z = g.op("Relu", [g.op("MatMul", [f, g.w(CONV, HIDDEN)])])
    g.output(g.op("MatMul", [z, g.w(HIDDEN, 10)]))
    return g.model()


@pytest.fixture
def block(monkeypatch):
    """Pin the provider block (the CPU's vector width would make the test machine-dependent)."""
    def pin(b):
        monkeypatch.setattr(latency, "default_round_to", lambda provider: b)
        return b
    return pin


def kept(res):
    ana = res.analysis
    return {g: len(res.plan.keep.get(g, range(grp.channels))) for g, grp in
            enumerate(ana.groups)}


def groups(ana):
    conv = [g for g, grp in enumerate(ana.groups)
            if any(TAG in m.get("tags", ()) for m in grp.members)]
    mm = [g for g in range(len(ana.groups)) if g not in conv]
    return conv, mm


def test_rules_tag_conv_channels_only():
    ana = spa.analyze(load_proto(conv_then_mlp()))
    conv, mm = groups(ana)
    assert [ana.groups[g].channels for g in conv] == [CONV, CONV]
    assert [ana.groups[g].channels for g in mm] == [HIDDEN]
    assert group_alignment(ana, 16, TAG) == [16 if g in conv else 1 for g in range(3)]
    assert group_alignment(ana, 16) == [16, 16, 16]        # an integer: every group
    assert group_alignment(ana, 64) == [1, 1, 1]           # groups smaller than the block


@pytest.mark.parametrize("b", [16, 8])
def test_auto_is_the_default_and_rounds_conv_groups(block, b):
    block(b)
    m = load_proto(conv_then_mlp())
    res = spa.prune(m, ratio=0.6)                           # 48 -> 20, 44 -> 18
    ana = res.analysis
    conv, mm = groups(ana)
    k = kept(res)
    assert all(k[g] % b == 0 and k[g] >= 20 for g in conv)
    assert [k[g] for g in conv] == [32 if b == 16 else 24] * 2
    assert [k[g] for g in mm] == [HIDDEN - int(0.6 * HIDDEN)]   # 18: not rounded
    assert res.plan.options["round_to"] == b
    assert res.plan.options["round_to_scope"] == TAG
    assert res.verify.passed
    # a budget: the same rule in every selection
    for select in ("uniform", "global", "knapsack"):
        r = spa.prune(m, target="flops:0.5", select=select)
        kk = kept(r)
        assert all(kk[g] % b == 0 for g in conv), (select, kk)
        assert r.plan.options["achieved"] <= 0.5 and r.plan.options["round_to"] == b


def test_round_to_integer_keeps_its_meaning(block):
    block(16)
    m = load_proto(conv_then_mlp())
    exact = spa.prune(m, ratio=0.6, round_to=1)
    assert sorted(kept(exact).values()) == [18, 20, 20]
    assert exact.plan.options["round_to"] == 1 and "round_to_scope" not in exact.plan.options
    every = spa.prune(m, ratio=0.6, round_to=8)              # all groups, MatMul's too
    assert sorted(kept(every).values()) == [24, 24, 24]
    assert spa.prune(m, ratio=0.6, round_to="auto").plan.keep == \
        spa.prune(m, ratio=0.6).plan.keep


def test_cuda_block_and_bad_values(block):
    assert resolve("auto", "cuda") == (8, TAG)
    assert resolve(4) == (4, None) and resolve("12") == (12, None)
    m = load_proto(conv_then_mlp())
    for bad in (0, -1, "foo", 2.5, True):
        with pytest.raises(spa.UsageError, match="round-to"):
            spa.prune(m, ratio=0.5, round_to=bad)


def test_cli_round_to(tmp_path, block):
    src = tmp_path / "m.onnx"
    onnx.save(conv_then_mlp(), src)
    rep = tmp_path / "r.json"
    block(16)
    assert cli_main(["prune", str(src), "-o", str(tmp_path / "a.onnx"), "--ratio", "0.6",
                     "--round-to", "auto", "--report", str(rep)]) == 0
    opts = json.load(open(rep))["plan"]["options"]
    assert opts["round_to"] == 16 and opts["round_to_scope"] == TAG
    assert cli_main(["prune", str(src), "-o", str(tmp_path / "b.onnx"), "--ratio", "0.6",
                     "--round-to", "1", "--report", str(rep)]) == 0
    plan = json.load(open(rep))["plan"]
    assert sorted(len(g["keep"]) for g in plan["groups"]) == [18, 20, 20]
    for bad in ("0", "foo", "-3"):
        p = subprocess.run([sys.executable, "-m", "spa", "prune", str(src), "-o",
                            str(tmp_path / "c.onnx"), "--round-to", bad],
                           capture_output=True, text=True)
        assert p.returncode == 2 and "--round-to" in p.stderr, p.stderr
        assert not (tmp_path / "c.onnx").exists()
