"""Real pretrained models shipped inside pip packages: PaddleOCR PP-OCR det/rec/cls
(from `rapidocr`, Apache-2.0). Pruned at 30 % and 50 %, they must pass the oracle."""
from __future__ import annotations

import pytest

import spa
from models.registry import rapidocr_entries
from spa.ir import load
from spa.rewrite.apply import check

ENTRIES = {e.name: e for e in rapidocr_entries()}
NAMES = ["ppocrv6_det_small", "ppocrv6_rec_small", "ppocr_mobile_v2_cls"]


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", NAMES)
def test_paddleocr(models, name, ratio):
    if name not in ENTRIES:
        pytest.skip("rapidocr is not installed (it is in the dev extra)")
    e = ENTRIES[name]
    model = models.setdefault(name, load(e.path))
    shapes = {model.input_names[0]: e.input_shape}
    res = spa.prune(model, ratio=ratio, do_verify=True, input_shapes=shapes)
    check(res.proto, model.proto)
    assert len(res.plan.keep) >= 10
    assert res.after["params"] < 0.75 * res.before["params"]
    if res.verify.exact:
        assert res.verify.passed, res.verify.max_rel_error
    else:
        exact = spa.prune(model, ratio=ratio, do_verify=True, input_shapes=shapes,
                          exact_only=True)
        assert exact.verify.passed, exact.verify.max_rel_error


def test_rapidocr_is_installed_in_the_test_environment():
    assert set(NAMES) <= set(ENTRIES), "make test installs rapidocr (dev extra)"
