"""Fuzzing the loader and the analyzer with mutated model bytes: every input either loads
and analyzes, or fails with SpaError (the documented error) — never another exception and
never a hang. CI runs SPA_FUZZ_EXAMPLES (default 60); a long campaign:
`SPA_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py -q`."""
from __future__ import annotations

import os
import sys
import tempfile

from hypothesis import given, settings, strategies as st, HealthCheck

import spa
from spa.errors import SpaError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "corpus"))
from make_corpus import small_cnn  # noqa: E402

N = int(os.environ.get("SPA_FUZZ_EXAMPLES", "60"))
SEED = small_cnn().SerializeToString()


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            break
        p = pos % len(b)
        if kind == 0:
            b[p] ^= 1 << (val % 8)
        elif kind == 1:
            b[p] = val % 256
        elif kind == 2:
            del b[p:p + 1 + val % 16]
        elif kind == 3:
            b[p:p] = bytes([val % 256]) * (1 + val % 8)
        else:
            b = b[:p]
    return bytes(b)


@settings(max_examples=N, deadline=10_000, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 20), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_mutated_models_load_or_fail_cleanly(ops):
    data = mutate(SEED, ops)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.onnx")
        with open(p, "wb") as f:
            f.write(data)
        try:
            model = spa.load(p)
            spa.analyze(model)
        except SpaError as exc:
            assert exc.file == p or p in str(exc)
            return
        # it loaded: pruning it must give a valid model or a clean error too
        try:
            res = spa.prune(model, ratio=0.5)
            assert len(res.proto.graph.node) == len(model.graph.node)
        except SpaError:
            pass
