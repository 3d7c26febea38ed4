"""Data-free baselines: L1 / L2 magnitude of everything a channel owns, and random."""
from __future__ import annotations

import numpy as np

CRITERIA = ("l1", "l2", "random")


def _param_dims(analysis):
    model = analysis.model
    for key in analysis.member_keys():
        arr = model.consts.get(key[0])
        if arr is not None and np.issubdtype(arr.dtype, np.floating) and arr.ndim:
            yield key, arr


def score(analysis, criterion: str = "l2", seed: int = 0) -> list[np.ndarray]:
    """Importance of every channel of every group (higher = keep)."""
    n = analysis.n_channels
    if criterion == "random":
        rng = np.random.default_rng(seed)
        glob = rng.random(n)
    elif criterion in ("l1", "l2"):
        glob = np.zeros(n)
        powered = {}  # |w| or w², once per tensor (it may have several pruned axes)
        for key, arr in _param_dims(analysis):
            ch = analysis.dim_channels(key)
            if ch is None or not (ch >= 0).any() and not (ch == -2).any():
                continue
            axes = tuple(k for k in range(arr.ndim) if k != key[1])
            if key[0] not in powered:
                powered[key[0]] = np.abs(arr) if criterion == "l1" else np.square(arr)
            a = powered[key[0]]
            per = a.sum(axis=axes, dtype=np.float64) if axes else a.astype(np.float64)
            ok = ch >= 0
            np.add.at(glob, ch[ok], per[ok])  # (not bincount: that costs O(all channels))
            for j in np.nonzero(ch == -2)[0]:
                d = analysis.coupler.dims[key]
                cl = int(analysis.label[analysis.coupler.base[d] + j])
                for c in analysis.multi[cl]:
                    glob[c] += per[j]
        if criterion == "l2":
            glob = np.sqrt(glob)
    else:
        raise ValueError(f"unknown criterion {criterion!r} (available: {', '.join(CRITERIA)})")
    return [glob[ch] for ch in analysis.group_chans]
