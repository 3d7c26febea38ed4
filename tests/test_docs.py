"""Generated docs must match the code (run `python -m spa.docgen` after changing rules)."""
import os

import pytest

from spa import docgen


@pytest.mark.parametrize("name", sorted(docgen.GENERATED))
def test_generated_docs_are_fresh(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    path = os.path.join(docgen.DOCS, name)
    assert os.path.exists(path), f"docs/{name} missing: run python -m spa.docgen"
    with open(path) as f:
        assert f.read() == docgen.GENERATED[name](), \
            f"docs/{name} is stale: run python -m spa.docgen"


def test_every_rule_is_documented():
    from spa import ops
    assert all(r.doc for r in ops.RULES.values())
