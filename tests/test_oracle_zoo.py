"""Every torch zoo architecture, through both exporters, pruned at 30 % and 50 % of the
channels of every group, must pass the masked-equivalence oracle."""
from __future__ import annotations

import pytest

import spa
from models.registry import TORCH_ZOO
from oracle_util import assert_oracle_passes
from spa.ir import load
from spa.rewrite.apply import check

torch = pytest.importorskip("torch")
from models.export import export_zoo_entry  # noqa: E402

# Architectures whose prunable share is small by design, with the reason (checked below).
LIMITED = {
    "lstm_classifier": "the LSTM is opaque; only the MLP after it is pruned",
    "vit_mha": "nn.MultiheadAttention merges heads into the dynamic batch axis: attention "
               "frozen, MLPs pruned",
    "shufflenetv2_small": "channel shuffle interleaves the block outputs: they are frozen",
}


@pytest.fixture(scope="module")
def exported():
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            cache[(name, exporter)] = load(str(export_zoo_entry(name, exporter=exporter)))
        return cache[(name, exporter)]
    return get


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("name", [s.name for s in TORCH_ZOO])
def test_zoo_oracle(exported, name, exporter, ratio):
    model = exported(name, exporter)
    res = spa.prune(model, ratio=ratio, do_verify=True, seed=1, round_to=1)
    check(res.proto, model.proto)
    assert res.plan.keep, "nothing was pruned"
    kept = res.after["params"] / res.before["params"]
    assert kept < (0.99 if name in LIMITED else 0.9), f"only {1 - kept:.1%} of params removed"
    assert_oracle_passes(model, res, ratio)
