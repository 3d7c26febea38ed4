"""What a model costs: parameters, multiply-accumulates and activation memory, from the op
rules -- for a model as it is, and for a plan without rewriting the model.

A plan only ever shortens dims: the new length of every `(tensor, axis)` is its old length
minus the elements the plan removes there (the analysis says which channel owns which
element). So the cost of a plan is the cost formula evaluated on the old shapes with those
lengths substituted, which is what `CostModel` does. It is built once per analysis and
keeps, per tensor and per node, only the dims that can change, so that evaluating a
candidate plan is a few vectorised numpy operations plus one `macs` call per affected node:
cheap enough to call in the loops of the budget selections (spa/select).

Units: `params` counts elements of the floating-point constants some node reads; `macs`
is the sum of the rules' multiply-accumulates; `memory` counts elements of every activation
(graph inputs and node outputs that are not constants). Costs are per sample: symbolic dims
(batch, sequence) count as 1. `plan_cost` equals `stats()` of the rewritten model exactly.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix

from .ir.model import is_float
from .ops import registry
from .ops.registry import Node

METRICS = ("params", "macs", "memory")
#: names a user may give a budget's metric, and the cost they mean
METRIC_ALIASES = {"flops": "macs", "macs": "macs", "params": "params", "memory": "memory",
                  # measured, not counted: spa.latency.attach() adds it to the cost model
                  "latency": "latency"}


def shapes_of(model) -> dict:
    """The shapes a model is costed at: those of --input-shape (spa.ir.input_shapes) when
    given, else its own (symbolic dims count as 1)."""
    return model.cost_shapes if getattr(model, "cost_shapes", None) else model.shapes


def _size(shape) -> int:
    out = 1
    for d in shape:
        out *= d if isinstance(d, int) else 1
    return int(out)


def _param_names(model) -> list[str]:
    dtype_of = getattr(model.consts, "dtype_of", lambda n: model.consts[n].dtype)
    return [name for name in model.consts  # (weights in external files are not read)
            if is_float(dtype_of(name)) and name in model.consumers]


def _activation_names(model) -> list[str]:
    seen, out = set(), []
    for name in model.input_names + [o for n in model.nodes for o in n.output]:
        if name and name not in model.consts and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def params(model) -> int:
    """Elements of floating-point constants that some node reads (the weights)."""
    shape = getattr(model.consts, "shape", lambda n: model.consts[n].shape)
    return sum(int(np.prod(shape(name), dtype=np.int64)) for name in _param_names(model))


def macs(model) -> int:
    total = 0
    for node in model.nodes:
        r = registry.get(node)
        if r is not None and r.macs is not None:
            total += int(r.macs(Node(node, model), shapes_of(model)))
    return total


def memory(model) -> int:
    """Elements of all activations (graph inputs and node outputs), per sample."""
    shapes = shapes_of(model)
    return sum(_size(shapes[t]) for t in _activation_names(model) if shapes.get(t) is not None)


def stats(model) -> dict:
    return {"params": params(model), "macs": macs(model), "memory": memory(model)}


class _Overlay:
    """model.shapes with some tensors' shapes replaced (what the `macs` functions read)."""

    __slots__ = ("new", "base")

    def __init__(self, new: dict, base: dict):
        self.new, self.base = new, base

    def get(self, key, default=None):
        s = self.new.get(key)
        return s if s is not None else self.base.get(key, default)

    def __getitem__(self, key):
        s = self.new.get(key)
        return s if s is not None else self.base[key]

    def __contains__(self, key):
        return key in self.new or key in self.base


class CostModel:
    """The cost of a model as a function of which channels a plan removes.

    Built once per analysis (`cost_model(analysis)` caches it). `evaluate(removed)` takes
    the removed global channel ids (or a boolean mask over all channels) and returns
    {"params", "macs", "memory"}; `linearize(removed)` also returns, per channel, how much
    each cost would drop if that channel went too (to first order), for the knapsack.
    """

    def __init__(self, analysis):
        self.analysis = a = analysis
        model = self.model = a.model
        self.n_channels = a.n_channels
        c = a.coupler
        # variable dims: those with at least one element owned by a channel
        var: dict[tuple, int] = {}
        s_dim, s_chan, m_dim, m_owner, m_chans = [], [], [], [], []
        n_multi = 0
        lengths = []
        for key in a.member_keys():
            ch = a.dim_channels(key)
            if ch is None:
                continue
            single = ch >= 0
            several = np.nonzero(ch == -2)[0]
            if not single.any() and not len(several):
                continue
            v = var[key] = len(lengths)
            lengths.append(len(ch))
            s_chan.append(ch[single])
            s_dim.append(np.full(int(single.sum()), v, np.int64))
            if len(several):
                d = c.dims[key]
                for j in several:
                    chans = a.multi[int(a.label[c.base[d] + j])]
                    m_chans.append(np.asarray(chans, np.int64))
                    m_owner.append(np.full(len(chans), n_multi, np.int64))
                    m_dim.append(v)
                    n_multi += 1
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        self.var = var
        self.n_var = len(lengths)
        self.length = np.asarray(lengths, np.int64)
        self.s_dim, self.s_chan = cat(s_dim), cat(s_chan)
        self.m_dim = np.asarray(m_dim, np.int64)
        self.m_owner, self.m_chans = cat(m_owner), cat(m_chans)
        self.n_multi = n_multi
        # elements each channel owns in each variable dim (duplicates summed)
        self.owns = csr_matrix((np.ones(len(self.s_dim)), (self.s_dim, self.s_chan)),
                               shape=(self.n_var, self.n_channels))
        self.owns_t = self.owns.T.tocsr()
        # which variable dims each tensor has
        by_tensor: dict[str, list[tuple[int, int]]] = {}
        for (t, ax), v in var.items():
            by_tensor.setdefault(t, []).append((ax, v))
        self.tensor_vars = {t: sorted(vs) for t, vs in by_tensor.items()}
        # params and memory: a fixed part plus size products over variable dims
        self.base = {"params": 0, "memory": 0, "macs": 0}
        self._prod_terms = {}
        for metric, names in (("params", _param_names(model)),
                              ("memory", _activation_names(model))):
            rows: dict[int, tuple[list, list]] = {}   # number of var dims -> (factors, idx)
            fixed = 0
            for t in names:
                shape = shapes_of(model).get(t)
                if shape is None:
                    continue
                vs = self.tensor_vars.get(t)
                if not vs:
                    fixed += _size(shape)
                    continue
                axes = {ax for ax, _ in vs}
                factor = _size([d for k, d in enumerate(shape) if k not in axes])
                fs, idx = rows.setdefault(len(vs), ([], []))
                fs.append(factor)
                idx.append([v for _, v in vs])
            self.base[metric] = fixed
            self._prod_terms[metric] = [(np.asarray(fs, np.int64), np.asarray(idx, np.int64))
                                        for fs, idx in rows.values()]
        # macs: nodes whose cost cannot change are summed once
        self._mac_nodes = []   # (rule.macs, Node, [(tensor, [(axis, var)])], [var ids])
        fixed = 0
        for proto in model.nodes:
            r = registry.get(proto)
            if r is None or r.macs is None:
                continue
            node = Node(proto, model)
            tensors = [t for t in dict.fromkeys(list(proto.input) + list(proto.output))
                       if t and t in self.tensor_vars]
            if not tensors:
                fixed += int(r.macs(node, shapes_of(model)))
                continue
            tv = [(t, self.tensor_vars[t]) for t in tensors]
            vids = sorted({v for _, vs in tv for _, v in vs})
            self._mac_nodes.append((r.macs, node, tv, vids))
        self.base["macs"] = fixed
        self.original = self.evaluate(np.zeros(0, np.int64))

    # -- evaluation ------------------------------------------------------------------------
    def _mask(self, removed) -> np.ndarray:
        removed = np.asarray(removed)
        if removed.dtype == bool and len(removed) == self.n_channels:
            return removed.astype(np.float64)
        rm = np.zeros(self.n_channels, np.float64)
        if len(removed):
            rm[removed.astype(np.int64)] = 1.0
        return rm

    def new_lengths(self, removed) -> np.ndarray:
        """New length of every variable dim when the given channels go."""
        rm = self._mask(removed)
        cnt = self.owns @ rm
        if self.n_multi:
            hit = np.bincount(self.m_owner, weights=rm[self.m_chans],
                              minlength=self.n_multi) > 0
            cnt += np.bincount(self.m_dim, weights=hit, minlength=self.n_var)
        return self.length - np.rint(cnt).astype(np.int64)

    def _shapes(self, tv, lens) -> dict:
        shapes = shapes_of(self.model)
        new = {}
        for t, vs in tv:
            s = list(shapes[t])
            for ax, v in vs:
                s[ax] = int(lens[v])
            new[t] = tuple(s)
        return new

    def _products(self, metric: str, lens: np.ndarray) -> int:
        total = self.base[metric]
        for fs, idx in self._prod_terms[metric]:
            total += int((fs * np.prod(lens[idx], axis=1)).sum())
        return total

    def _macs(self, lens: np.ndarray) -> int:
        total = self.base["macs"]
        shapes = shapes_of(self.model)
        for fn, node, tv, _ in self._mac_nodes:
            total += int(fn(node, _Overlay(self._shapes(tv, lens), shapes)))
        return total

    def evaluate(self, removed, metrics=METRICS) -> dict:
        lens = self.new_lengths(removed)
        out = {}
        for m in metrics:
            out[m] = self._macs(lens) if m == "macs" else self._products(m, lens)
        return out

    def linearize(self, removed, metric: str) -> tuple[int, np.ndarray]:
        """(cost, saving per channel): how much `metric` drops, to first order, when each
        channel is removed from the plan's widths (or comes back, for removed ones).

        The partial derivative of the cost by every variable dim's length is exact for the
        size products (params, memory) and a backward difference for the rules' `macs`
        (exact for the multilinear formulas of Conv, MatMul and Gemm); a channel's saving is
        the sum over the dims it owns elements of, of the partial times its element count.
        """
        lens = self.new_lengths(removed)
        grad = np.zeros(self.n_var, np.float64)
        if metric == "macs":
            shapes = shapes_of(self.model)
            total = self.base["macs"]
            for fn, node, tv, vids in self._mac_nodes:
                here = int(fn(node, _Overlay(self._shapes(tv, lens), shapes)))
                total += here
                for v in vids:
                    if lens[v] <= 0:
                        continue
                    lens[v] -= 1
                    grad[v] += here - int(fn(node, _Overlay(self._shapes(tv, lens), shapes)))
                    lens[v] += 1
        else:
            total = self.base[metric]
            lf = lens.astype(np.float64)
            for fs, idx in self._prod_terms[metric]:
                sub = lf[idx]
                size = fs * np.prod(sub, axis=1)
                total += int((fs * np.prod(lens[idx], axis=1)).sum())
                for k in range(idx.shape[1]):
                    with np.errstate(divide="ignore", invalid="ignore"):
                        part = np.where(sub[:, k] > 0, size / np.maximum(sub[:, k], 1), 0.0)
                    np.add.at(grad, idx[:, k], part)
        saving = self.owns_t @ grad
        if self.n_multi:
            saving += np.bincount(self.m_chans, weights=grad[self.m_dim][self.m_owner],
                                  minlength=self.n_channels)
        return int(total), saving


def cost_model(analysis) -> CostModel:
    """The analysis's cost model (built on first use, then kept on the analysis)."""
    cm = analysis.__dict__.get("_cost_model")
    if cm is None:
        cm = CostModel(analysis)
        analysis.__dict__["_cost_model"] = cm
    return cm


def plan_cost(analysis, plan_or_removed) -> dict:
    """{"params", "macs", "memory"} of the model after the plan, without rewriting it.

    `plan_or_removed`: a Plan, the removed global channel ids, or a boolean mask over all
    channels. Equals `stats()` of the rewritten model."""
    removed = plan_or_removed.removed(analysis) if hasattr(plan_or_removed, "removed") \
        else plan_or_removed
    return cost_model(analysis).evaluate(removed)
