"""How far a prune moved the model's outputs: measured on every prune, for every criterion.

A pruner in front of deployment must never hand out a destroyed model without a word. So
every prune runs the original and the pruned model on the same inputs -- the first
`SAMPLES` calibration samples, or synthetic ones when the prune had no data
(spa.activations.synthesize) -- and reports, per graph output, the relative error
‖y_pruned − y‖ / ‖y‖ and, where the output is a score vector per sample ([N, C], C ≥ 2, not
unit-normalised rows: a classifier), the top-1 agreement with the original.

For magnitude and gradient criteria (prune, then fine-tune; prune at init) this is
information. A criterion that promises a usable model without fine-tuning (obspa) is also
held to it by `judge`: its result must not be worse than plain slicing of the same plan, its
outputs must stay closer to the original's than zero would (relative error < 1), and a
classifier must agree with the original on at least `AGREEMENT_BOUND` of the samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: samples the deviation is measured on (the first of the calibration, or synthetic ones)
SAMPLES = 32
#: obspa is refused below this top-1 agreement with the original (classifiers)
AGREEMENT_BOUND = 0.5
#: obspa is refused at or above this relative output error (no better than outputs of zero)
ERROR_BOUND = 1.0


def _is_classifier(y: np.ndarray) -> bool:
    if y.ndim != 2 or y.shape[1] < 2 or not np.issubdtype(y.dtype, np.floating):
        return False
    norms = np.linalg.norm(y.astype(np.float64), axis=1)
    return not bool(np.all(np.abs(norms - 1.0) < 1e-3))   # unit rows: embeddings


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    den = float(np.sqrt(np.sum(b ** 2)))
    num = float(np.sqrt(np.sum((a - b) ** 2)))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


@dataclass
class Deviation:
    """The pruned model(s) against the original on `on`."""
    on: str
    samples: int
    outputs: list[str]
    #: per model ("pruned", and for obspa "sliced": the same plan without reconstruction):
    #: {"rel_error": {output: e}, "overall": e, "top1_agreement": a or None}
    models: dict = field(default_factory=dict)
    refused: list = field(default_factory=list)   # why `judge` refuses the pruned model
    #: why nothing could be measured (ONNX Runtime cannot run the original, e.g. a custom
    #: op); None when measured
    skipped: str | None = None
    notes: list = field(default_factory=list)     # how the models were run, when not plainly

    def to_json(self) -> dict:
        return {"on": self.on, "samples": self.samples, "models": self.models,
                "agreement_bound": AGREEMENT_BOUND, "error_bound": ERROR_BOUND,
                **({"refused": self.refused} if self.refused else {}),
                **({"skipped": self.skipped} if self.skipped else {}),
                **({"notes": self.notes} if self.notes else {})}

    def summary(self, name: str = "pruned") -> str:
        if self.skipped:
            return f"not measured: {self.skipped}"
        m = self.models[name]
        s = f"output error {m['overall']:.4g} (relative, {self.samples} {self.on})"
        if m["top1_agreement"] is not None:
            s += f", top-1 agreement with the original {100 * m['top1_agreement']:.1f} %"
        return s


def samples_for(model, calib=None, *, n: int = SAMPLES, seed: int = 0):
    """The Calibration to measure on, and what it is: the first `n` samples of `calib`
    when it holds samples, else `n` synthetic ones."""
    from .activations import synthesize
    if calib is not None and getattr(calib, "arrays", None):
        return calib, f"{calib.mode} calibration samples"
    return (synthesize(model, n=n, seed=seed + 7, batch_stats=False),
            "synthetic samples (no calibration data)")


def measure(model, protos: dict, calib=None, *, n: int = SAMPLES, seed: int = 0) -> Deviation:
    """Run the original and each of `protos` ({name: ModelProto}) on the same samples.
    bfloat16 models run as float32 twins (exact; ONNX Runtime has few bfloat16 CPU kernels).
    When ONNX Runtime cannot run the original (a custom op, an input it cannot feed) the
    result says so in `skipped` instead of failing the prune: the oracle and the output-shape
    check have already passed or said why they could not run."""
    from .activations import run_outputs
    from .runtime import first_line
    from .verify import _uses_bfloat16, float32_twin
    names = list(model.output_names)
    twin = _uses_bfloat16(model.proto)
    prep = float32_twin if twin else (lambda p: p)
    try:
        cal, on = samples_for(model, calib, n=n, seed=seed)
        ref = run_outputs(prep(model.proto), names, cal, limit=n)
    except Exception as e:   # noqa: BLE001 -- onnxruntime raises its own untyped errors
        return Deviation("nothing", 0, names, skipped="ONNX Runtime could not run the "
                         f"original ({first_line(e, 300)})")
    count = int(next(iter(ref.values())).shape[0]) if ref else 0
    dev = Deviation(on, min(n, count), names)
    if twin:
        dev.notes.append("bfloat16 model: run as float32 twins (bfloat16 -> float32 is exact)")
    for key, proto in protos.items():
        out = run_outputs(prep(proto), names, cal, limit=n)
        per = {o: _rel(out[o], ref[o]) for o in names}
        num = sum(per[o] ** 2 * float(np.sum(np.asarray(ref[o], np.float64) ** 2))
                  for o in names if np.isfinite(per[o]))
        den = sum(float(np.sum(np.asarray(ref[o], np.float64) ** 2)) for o in names)
        overall = float("inf") if any(not np.isfinite(e) for e in per.values()) else \
            (float(np.sqrt(num / den)) if den > 0 else 0.0)
        agree = None
        y0 = np.asarray(ref[names[0]]) if names else None
        if y0 is not None and _is_classifier(y0) and out[names[0]].shape == y0.shape:
            agree = float(np.mean(np.argmax(out[names[0]], 1) == np.argmax(y0, 1)))
        dev.models[key] = {"rel_error": {o: round(e, 6) for o, e in per.items()},
                           "overall": round(overall, 6), "top1_agreement": agree}
    return dev


def judge(dev: Deviation, *, compare: str | None = "sliced") -> list[str]:
    """Why the pruned model must not be written as a no-fine-tuning result (empty: fine).
    Sets and returns dev.refused. Nothing measured (dev.skipped): nothing to refuse on."""
    if dev.skipped:
        return []
    m = dev.models["pruned"]
    why = []
    if compare in dev.models and m["overall"] > dev.models[compare]["overall"]:
        why.append(f"its output error {m['overall']:.4g} is larger than plain slicing of the "
                   f"same plan would give ({dev.models[compare]['overall']:.4g})")
    if not m["overall"] < ERROR_BOUND:
        why.append(f"its output error {m['overall']:.4g} is not below {ERROR_BOUND:g} (the "
                   "outputs are no closer to the original's than zeros)")
    if m["top1_agreement"] is not None and m["top1_agreement"] < AGREEMENT_BOUND:
        why.append(f"its top-1 agreement with the original is "
                   f"{100 * m['top1_agreement']:.1f} % (< {100 * AGREEMENT_BOUND:g} %)")
    dev.refused = why
    return why
