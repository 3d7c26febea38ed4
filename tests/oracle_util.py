"""The oracle assertion shared by the zoo tests (torch, jax, keras, trained models)."""
from __future__ import annotations

import spa


def assert_oracle_passes(model, res, ratio, seed: int = 1):
    """``res`` (spa.prune with do_verify at ``ratio``) passes the masked-equivalence oracle.
    A plan that also prunes approximate (norm-coupled) groups cannot be checked exactly: then
    its exact-only plan must pass, and the full plan's deviation must stay bounded. Returns
    that exact-only result (None when the plan was exact)."""
    v = res.verify
    if v.exact:
        assert v.passed, f"oracle mismatch {v.max_rel_error:.3g}"
        return None
    exact = spa.prune(model, ratio=ratio, do_verify=True, seed=seed, exact_only=True)
    assert exact.verify.passed, f"oracle mismatch {exact.verify.max_rel_error:.3g}"
    assert 0 < v.max_rel_error < 10
    return exact
