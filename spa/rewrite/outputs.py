"""After the rewrite: every graph output keeps the shape it has at run time.

Every axis of every graph output is frozen by the analysis, so a pruned model whose output
changes shape means the shapes SPA worked from were wrong (e.g. an exporter that declares a
CTC recogniser's [T, 1, classes] output as [1, seqlen]). One ONNX Runtime run of the
original and of the pruned model on the same seeded dummy inputs catches it before anything
is written.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import SpaError
from ..runtime import dummy_inputs, session_for
from ..verify import _BF16, _QDQ, _graphs, _uses_bfloat16, float32_twin

#: extra seeds run on the original to tell a data-dependent output length (NonZero,
#: NonMaxSuppression, ...) from one the pruning changed
_DATA_SEEDS = 2


def check_output_shapes(model, pruned_proto: onnx.ModelProto, *,
                        input_shapes: dict | None = None, seed: int = 0) -> dict | None:
    """Raise SpaError (exit 3) naming the first graph output whose runtime shape differs
    between the original (`model.proto`) and `pruned_proto`, both run once in ONNX Runtime
    on the same seeded dummy inputs (`input_shapes`: input name -> shape, overriding the
    dummy shapes). An axis whose length already varies in the original with the input
    values alone (same input shapes, other seeds) is data-dependent and not compared (those
    extra runs happen only when some output differs). bfloat16 models run as float32 twins
    and QDQ models without graph optimisations, as in spa.verify. Where the original cannot
    run in ONNX Runtime, the pruned model's inferred output shapes are compared with
    `model.shapes` instead. Returns the original's runtime output shapes ({name: tuple};
    None when they could not be measured)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        _static_check(model, pruned_proto)
        return None
    twin = _uses_bfloat16(model.proto)
    prep = float32_twin if twin else (lambda p: p)
    optimize = not any(n.op_type in _QDQ for g in _graphs(model.graph) for n in g.node)

    def feeds_for(s: int) -> dict:
        feeds = dummy_inputs(model, seed=s, sym_value=2, shapes=input_shapes)
        if twin:
            feeds = {k: v.astype(np.float32) if v.dtype == _BF16 else v
                     for k, v in feeds.items()}
        return feeds

    feeds = feeds_for(seed)
    try:
        s_orig = session_for(prep(model.proto), optimize=optimize)
        names = [o.name for o in s_orig.get_outputs()]
        before = dict(zip(names, map(_shape, s_orig.run(names, feeds))))
    except Exception:  # nothing to compare with at run time: compare the inferred shapes
        _static_check(model, pruned_proto)
        return None
    try:
        s_pruned = session_for(prep(pruned_proto), optimize=optimize)
        pnames = [o.name for o in s_pruned.get_outputs()]
        after = dict(zip(pnames, map(_shape, s_pruned.run(pnames, feeds))))
    except Exception as exc:
        raise SpaError(f"the pruned model does not run in ONNX Runtime ({type(exc).__name__}: "
                       f"{str(exc).strip()[:600]}); nothing written", file=model.path)
    del s_pruned
    reruns: list[dict] = []
    for name in names:
        a, b = before[name], after.get(name, "missing")
        if b == "missing":
            raise SpaError(f"graph output {name!r} is missing from the pruned model; nothing "
                           "written", file=model.path)
        if a is None or b is None or a == b:
            continue
        if len(a) == len(b):
            # (model.shapes cannot tell: with static inputs, a data-dependent length is the
            # same in both of its runtime measurements)
            diff = [k for k in range(len(a)) if a[k] != b[k]]
            if not reruns:  # lazily: only a model whose output differs pays for them
                for s in range(seed + 1, seed + 1 + _DATA_SEEDS):
                    reruns.append(dict(zip(names, map(_shape,
                                                      s_orig.run(names, feeds_for(s))))))
            if all(any(r[name] is None or len(r[name]) != len(a) or r[name][k] != a[k]
                       for r in reruns) for k in diff):
                continue  # data-dependent lengths: pruning may change them
        raise _changed(model, name, a, b)
    return before


def _shape(v) -> tuple | None:
    return tuple(int(d) for d in v.shape) if isinstance(v, np.ndarray) else None


def _changed(model, name: str, a, b) -> SpaError:
    return SpaError(f"graph output {name!r} would change shape from {a} to {b}; nothing "
                    "written", file=model.path)


def _static_check(model, pruned_proto: onnx.ModelProto) -> None:
    """Without a runtime reference: the pruned model's inferred output shapes (declared
    output shapes left out) against the model's own, static axes only."""
    from ..ir.model import Model, _dims_of, _skeleton
    try:
        sk = _skeleton(Model(proto=pruned_proto), declared_outputs=False)
        inferred = onnx.shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    except Exception:
        return
    for v in inferred.graph.output:
        a, b = model.shapes.get(v.name), _dims_of(v.type)
        if a is None or b is None:
            continue
        if len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x != y
                                   for x, y in zip(a, b)):
            raise _changed(model, v.name, tuple(a), tuple(b))
