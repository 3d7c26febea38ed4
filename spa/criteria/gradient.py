"""Gradient criteria: first-order Taylor, diagonal Fisher / OBD, and the three
pruning-at-initialisation scores SNIP, GraSP and CroP. Formulas and references:
docs/criteria.md.

The gradients come from spa.engine (JAX evaluating the ONNX graph; no source framework):
g = ∂L/∂w averaged over the calibration samples, F = the diagonal empirical Fisher (mean of
per-sample squared gradients), Hg = the Hessian-gradient product. L is the cross-entropy
with the calibration labels; without labels, the engine's "auto" objective (the model's own
predictions as targets, or for non-classifiers the distance to its own outputs).
"""
from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .core import Criterion


def _stat(ctx, kind: str, name: str) -> np.ndarray:
    return np.asarray(getattr(ctx.stats, kind)[name], np.float64)


def _has(*kinds):
    def accepts(ctx, key, arr):
        for k in kinds:
            d = getattr(ctx.stats, k, None)
            if d is None or key[0] not in d or np.shape(d[key[0]]) != arr.shape:
                return False
        return True
    return accepts


def _wg(a, name, ctx):
    return a.astype(np.float64) * _stat(ctx, "grad", name)


def _abs_wg(a, name, ctx):
    return np.abs(_wg(a, name, ctx))


def _obd(a, name, ctx):
    return 0.5 * _stat(ctx, "fisher", name) * np.square(a, dtype=np.float64)


def _whg(a, name, ctx):
    return a.astype(np.float64) * _stat(ctx, "hg", name)


def _abs_whg(a, name, ctx):
    return np.abs(_whg(a, name, ctx))


TAYLOR = Criterion("taylor", "first-order Taylor: |Σ w·g| over a member slice, the estimated "
                   "loss change when the slice is zeroed", weight=_wg, member_post=np.abs,
                   accepts=_has("grad"), needs=("grad",))
HESSIAN = Criterion("hessian", "OBD with the diagonal Fisher as Hessian: Σ ½·F·w² over the "
                    "slice", weight=_obd, accepts=_has("fisher"), needs=("fisher",))
SNIP = Criterion("snip", "SNIP connection sensitivity: Σ |w·g| over the slice",
                 weight=_abs_wg, accepts=_has("grad"), needs=("grad",))
GRASP = Criterion("grasp", "GraSP: Σ w·(Hg) over the slice (= −S of the paper; removing "
                  "high-S weights preserves gradient flow best)", weight=_whg,
                  accepts=_has("hg"), needs=("grad", "hg"), default_normalize="standardization")
CROP = Criterion("crop", "CroP: Σ |w·(Hg)| over the slice (keep what gradient flow depends "
                 "on, in either direction)", weight=_abs_whg, accepts=_has("hg"),
                 needs=("grad", "hg"))

CRITERIA = {c.name: c for c in (TAYLOR, HESSIAN, SNIP, GRASP, CROP)}


def compute_stats(model, calib, needs, *, samples: int | None = None, batch_size: int = 32,
                  name: str = "this criterion"):
    """Gradient statistics (`needs`: any of grad, fisher, hg, or a Criterion) of `model` on
    calibration `calib` (a spa.activations.Calibration with samples), from spa.engine."""
    if isinstance(needs, Criterion):
        name, needs = needs.name, needs.needs
    if calib is None or not calib.n_samples:
        raise UsageError(f"criterion {name!r} needs calibration data: give --calib FILE.npz "
                         "(one array per graph input, first axis = samples, optional "
                         "'labels')")
    if samples is not None and samples < 1:
        raise UsageError(f"--calib-samples must be >= 1, got {samples}")
    from ..engine import Engine, gradient_stats  # jax, lazily
    st = gradient_stats(Engine(model), calib.arrays, labels=calib.labels,
                        batch_size=batch_size, fisher="fisher" in needs,
                        hvp="hg" if "hg" in needs else "none", max_samples=samples)
    for kind in needs:
        d = getattr(st, kind, None) or {}
        if not any(np.any(v) for v in d.values()):
            raise UsageError(f"criterion {name!r}: the {_WHAT[kind]} is zero everywhere on the "
                             f"calibration data (objective {getattr(st, 'objective', '?')!r}"
                             f"{_WHY.get(getattr(st, 'objective', ''), '')}); there is nothing "
                             "to rank channels by: use a data-free criterion or obspa",
                             file=model.path)
    return st


_WHAT = {"grad": "loss gradient", "fisher": "Fisher diagonal", "hg": "Hessian-gradient "
         "product"}
_WHY = {"mse": ": the distance of a model to its own outputs is 0 at its own weights, and so "
               "is its gradient; a non-classifier needs a task loss"}
