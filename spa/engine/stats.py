"""Gradient statistics over a calibration set: the mean gradient, the diagonal empirical
Fisher, and the Hessian-gradient product, for gradient-based pruning criteria.

Per-sample gradients (for the Fisher) come from `jax.vmap` over single samples when the
per-sample gradients of one chunk fit a memory budget; otherwise the Fisher is estimated
from micro-batch gradients (`fisher_mode` says which was used).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ._jax import J, load

#: bytes the per-sample gradients of one vmapped chunk may take (gradients, squares, sums)
PER_SAMPLE_BUDGET = 1 << 30


@dataclass
class GradStats:
    """Averages over `samples` calibration samples.

    grad: mean gradient of the loss; fisher: mean over samples of the squared per-sample
    gradient (diagonal empirical Fisher), or None; hg: Hessian-gradient product H·g of the
    mean loss (forward-over-reverse), or None; loss: mean loss; objective: the objective
    used; fisher_mode: "per-sample" (exact, vmap) or "micro-batch" (estimate: the squared
    micro-batch gradient times the micro-batch size, averaged over samples; equals the
    per-sample mean square when the mean gradient is small against its spread).
    """

    grad: dict[str, np.ndarray]
    fisher: dict[str, np.ndarray] | None
    hg: dict[str, np.ndarray] | None
    loss: float
    samples: int
    objective: str = ""
    fisher_mode: str = ""
    timings: dict = field(default_factory=dict)


def _calib(engine, calib, labels, max_samples):
    if not isinstance(calib, dict):
        if len(engine.input_names) != 1:
            raise UsageError(f"calibration data must be a dict keyed by the inputs "
                             f"{engine.input_names}")
        calib = {engine.input_names[0]: calib}
    missing = [n for n in engine.input_names if n not in calib]
    if missing:
        raise UsageError(f"calibration data lacks input(s) {missing}; it has "
                         f"{sorted(calib)}")
    feeds = {n: np.asarray(calib[n]) for n in engine.input_names}
    sizes = {n: (v.shape[0] if v.ndim else 0) for n, v in feeds.items()}
    n = min(sizes.values())
    if len(set(sizes.values())) != 1 or n == 0:
        raise UsageError(f"calibration inputs must share a non-empty first (sample) axis; "
                         f"got {sizes}")
    if max_samples is not None:
        n = min(n, int(max_samples))
    feeds = {k: v[:n] for k, v in feeds.items()}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[0] < n:
            raise UsageError(f"{labels.shape[0]} labels for {n} calibration samples")
        labels = labels[:n]
    return feeds, labels, n


def _padded(feeds: dict, start: int, size: int, n: int) -> dict:
    """Samples [start, start + size), the missing tail filled with copies of sample `start`
    (so that every chunk has one shape and one compilation)."""
    idx = np.arange(start, start + size)
    idx[idx >= n] = start
    return {k: v[idx] for k, v in feeds.items()}


def _fixed_batch(engine) -> int | None:
    """The static first axis of the graph inputs, if the model fixes it."""
    m = engine.model
    dims = set()
    for n in engine.input_names:
        s = m.shapes.get(n)
        if s and isinstance(s[0], int):
            dims.add(s[0])
    return dims.pop() if len(dims) == 1 else None


def gradient_stats(engine, calib, labels=None, *, batch_size: int = 32, params=None,
                   fisher: bool = True, hvp: str = "none", objective: str = "auto",
                   max_samples: int | None = None, per_sample: bool | None = None,
                   temperature: float = 4.0, seed: int = 0) -> GradStats:
    """Mean gradient, diagonal empirical Fisher and (hvp="hg") H·g of `engine.loss` over a
    calibration set (`calib`: input name -> array, first axis = samples).

    The reference outputs (objectives self / mse / kd) are those of the engine's initial
    parameters. objective="sampled" (only here: it draws random targets, seeded by `seed`)
    gives the true Fisher instead of the empirical one: for a classifier, cross-entropy to
    labels drawn from the reference's softmax; otherwise squared error to the reference
    outputs plus standard normal noise. Unlike mse at the reference point (zero gradient),
    its Fisher is informative without labels; its mean gradient is only noise.

    `per_sample`: None chooses vmap per-sample gradients when they fit
    PER_SAMPLE_BUDGET (chunks of up to `batch_size` samples), else micro-batches.
    """
    import time

    load()
    jax, jnp = J.jax, J.jnp
    if hvp not in ("none", "hg"):
        raise UsageError(f"hvp must be 'none' or 'hg', not {hvp!r}")
    if batch_size < 1:
        raise UsageError("batch_size must be at least 1")
    feeds, labels, n = _calib(engine, calib, labels, max_samples)
    p = {k: jnp.asarray(v, engine.float_dtype) for k, v in
         (engine.params if params is None else params).items()}
    rp = {k: jnp.asarray(v, engine.float_dtype) for k, v in engine.params.items()}
    t0 = time.perf_counter()
    fixed = _fixed_batch(engine)
    # output shapes by tracing only (no compilation)
    first = {k: v[:fixed or 1] for k, v in feeds.items()}
    probe = jax.eval_shape(engine.forward, p, first)
    logits_shape = jax.eval_shape(engine.logits, p, first)
    classifier = len(logits_shape.shape) == 2 and np.issubdtype(logits_shape.dtype,
                                                                np.floating)
    obj = objective if objective == "sampled" else \
        engine.resolve_objective(objective, labels, logits_shape)
    if obj == "ce" and labels is None:
        raise UsageError("objective 'ce' needs labels")
    has_labels = obj == "ce"
    lab = labels if has_labels else np.zeros((n,), np.int32)
    n_params = sum(int(np.prod(v.shape)) for v in p.values())
    itemsize = np.dtype(engine.float_dtype).itemsize
    bs = int(batch_size)
    if fixed is not None and fixed != 1:
        bs = fixed
    chunk = max(1, min(bs, PER_SAMPLE_BUDGET // max(1, 4 * n_params * itemsize)))
    if per_sample is None:
        per_sample = fixed in (None, 1) and chunk >= min(bs, 4)
    elif per_sample and fixed not in (None, 1):
        raise UsageError(f"per-sample gradients need a model with a free batch axis "
                         f"(this one fixes it to {fixed})")
    if not fisher:
        per_sample = False
    if fixed is not None and fixed != 1 and n % fixed:
        n = n - n % fixed
        if n == 0:
            raise UsageError(f"the model fixes the batch to {fixed} but there are fewer "
                             "calibration samples")
    kw = dict(temperature=temperature)
    mode_ref = None  # how the loss gets its reference: labels / given / inside
    rng = np.random.default_rng(seed)
    noisy = False
    if obj == "sampled" and classifier:
        # the true Fisher: labels drawn from the model's own (reference) class distribution
        lf = engine._cache.get(("logits",))
        if lf is None:
            lf = engine._cache[("logits",)] = jax.jit(engine.logits)
        parts = []
        for s in range(0, n, bs):
            z = np.asarray(lf(rp, _padded(feeds, s, bs, n)), np.float64)[:min(bs, n - s)]
            pr = np.exp(z - z.max(axis=1, keepdims=True))
            cdf = np.cumsum(pr / pr.sum(axis=1, keepdims=True), axis=1)
            parts.append(np.minimum((cdf < rng.random((len(z), 1))).sum(axis=1),
                                    z.shape[1] - 1))
        lab = np.concatenate(parts)
        eff_obj, has_labels = "ce", True
    elif obj == "sampled":
        # a unit-variance Gaussian likelihood on every float output: targets = reference
        # outputs + standard normal noise, squared error
        if not all(len(r.shape) and r.shape[0] == (fixed or 1) for r in probe):
            raise UsageError("objective 'sampled' on a non-classifier needs outputs whose "
                             "first axis is the batch")
        eff_obj, mode_ref, noisy = "mse", "given", True
    elif obj == "self":
        # cross-entropy to the reference argmax = "ce" with those labels, computed up front
        # in batches (cheaper than a reference forward inside every per-sample gradient)
        k = engine.class_output  # (its argmax is that of the logits, Softmax or not)
        lab = np.concatenate([np.argmax(engine.run(_padded(feeds, s, bs, n), params=rp)[k],
                                        axis=1)[:min(bs, n - s)] for s in range(0, n, bs)])
        eff_obj, has_labels = "ce", True
    else:
        eff_obj = obj
        if obj in ("mse", "kd"):
            mode_ref = "given" if all(len(r.shape) and r.shape[0] == (fixed or 1)
                                      for r in probe) else "inside"

    def refs_for(fb):
        if mode_ref != "given":
            return []
        refs = [np.asarray(r) for r in engine.run(fb, params=rp)]
        if noisy:
            refs = [r + rng.standard_normal(r.shape).astype(r.dtype) if r.dtype.kind == "f"
                    else r for r in refs]
        return refs

    def batch_loss(q, f, lb, refs, ref_p):
        if mode_ref == "inside":
            refs = [jax.lax.stop_gradient(r) for r in engine.forward(ref_p, f)]
        return engine.loss(q, f, lb if has_labels else None, refs or None, eff_obj, **kw)

    key = (eff_obj, has_labels, mode_ref, float(temperature))
    grad_sum = {k: np.zeros(v.shape, np.float64) for k, v in p.items()}
    fish_sum = {k: np.zeros(v.shape, np.float64) for k, v in p.items()} if fisher else None
    loss_sum = 0.0
    if per_sample:
        fn = engine._cache.get(("ps",) + key)
        if fn is None:
            def one(q, f1, l1, r1, ref_p):
                f = {k: v[None] for k, v in f1.items()}
                return batch_loss(q, f, l1[None], [r[None] for r in r1], ref_p)

            def ps(q, fb, lb, refs, w, ref_p):
                losses, grads = jax.vmap(jax.value_and_grad(one),
                                         in_axes=(None, 0, 0, 0, None))(q, fb, lb, refs, ref_p)
                gs = {k: jnp.tensordot(w, g, 1) for k, g in grads.items()}
                fs = {k: jnp.tensordot(w, g * g, 1) for k, g in grads.items()}
                return jnp.sum(w * losses), gs, fs
            fn = engine._cache[("ps",) + key] = jax.jit(ps)
        step = chunk
        for s in range(0, n, step):
            e = min(s + step, n)
            idx = np.arange(s, s + step)
            idx[idx >= e] = s  # pad the last chunk (weight 0) so one compile serves all
            w = (np.arange(s, s + step) < e).astype(engine.float_dtype)
            fb = {k: v[idx] for k, v in feeds.items()}
            ls, gs, fs = fn(p, fb, lab[idx], refs_for(fb), w, rp)
            loss_sum += float(ls)
            for k in grad_sum:
                grad_sum[k] += np.asarray(gs[k], np.float64)
                fish_sum[k] += np.asarray(fs[k], np.float64)
        mode = "per-sample"
    else:
        fn = engine._cache.get(("mb",) + key)
        if fn is None:
            fn = engine._cache[("mb",) + key] = jax.jit(jax.value_and_grad(batch_loss))
        for s in range(0, n, bs):
            e = min(s + bs, n)
            fb = {k: v[s:e] for k, v in feeds.items()}
            ls, gs = fn(p, fb, lab[s:e], refs_for(fb), rp)
            b = e - s
            loss_sum += float(ls) * b
            for k in grad_sum:
                g = np.asarray(gs[k], np.float64)
                grad_sum[k] += g * b
                if fisher:
                    fish_sum[k] += g * g * b * b
        mode = "micro-batch" if fisher else ""
    grad = {k: (v / n).astype(engine.float_dtype) for k, v in grad_sum.items()}
    fish = None if not fisher else \
        {k: (v / n).astype(engine.float_dtype) for k, v in fish_sum.items()}
    timings = {"gradients_s": time.perf_counter() - t0}
    hg = None
    if hvp == "hg":
        t1 = time.perf_counter()
        fn = engine._cache.get(("hg",) + key)
        if fn is None:
            def hvp_fn(q, fb, lb, refs, ref_p, v):
                return jax.jvp(lambda r: jax.grad(batch_loss)(r, fb, lb, refs, ref_p), (q,),
                               (v,))[1]
            fn = engine._cache[("hg",) + key] = jax.jit(hvp_fn)
        gv = {k: jnp.asarray(v) for k, v in grad.items()}
        hg_sum = {k: np.zeros(v.shape, np.float64) for k, v in p.items()}
        for s in range(0, n, bs):
            e = min(s + bs, n)
            fb = {k: v[s:e] for k, v in feeds.items()}
            hv = fn(p, fb, lab[s:e], refs_for(fb), rp, gv)
            for k in hg_sum:
                hg_sum[k] += np.asarray(hv[k], np.float64) * (e - s)
        hg = {k: (v / n).astype(engine.float_dtype) for k, v in hg_sum.items()}
        timings["hg_s"] = time.perf_counter() - t1
    return GradStats(grad=grad, fisher=fish, hg=hg, loss=loss_sum / n, samples=n,
                     objective=obj, fisher_mode=mode, timings=timings)
