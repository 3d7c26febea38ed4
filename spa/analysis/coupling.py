"""From op rules to groups.

Every static axis of every tensor is a *dim*; every index along it is an *element*.
Rules union elements (identity, offsets, index lists) and record *products* (a merged
axis that is the row-major product of factor axes: Flatten, head split/merge, grouped
convolution). Connected components over elements are the channels that must go together;
connected components over dims are the groups. A merged element is derived from its
factor elements: it disappears when any of its factors does, which keeps every tensor
rectangular (whole heads, equal counts per conv group, whole feature blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import SpaError
from ..ir.model import is_float
from ..ops import registry
from ..ops.registry import Node

DimKey = tuple  # (tensor name, axis) or ("~virtual", name)


@dataclass
class Product:
    merged: DimKey
    factors: list[DimKey]
    node: str
    policy: str  # "outer": only the outermost prunable factor is pruned; "all"


@dataclass
class Group:
    id: int
    channels: int
    members: list[dict]          # {"tensor", "axis", "length", "role", "const"[, "tags"]}
    exact: bool
    approx_reasons: list[str] = field(default_factory=list)
    unit: int = 1                # elements one channel spans in its widest parameter member
    kind: str = "channels"       # channels | heads | groups

    def to_json(self) -> dict:
        return {"id": self.id, "channels": self.channels, "kind": self.kind, "unit": self.unit,
                "exact": self.exact, "approximate_because": self.approx_reasons,
                "constraints": {"min_channels": 1},
                "members": self.members}


class Coupler:
    """The object a rule talks to while analysing one node."""

    def __init__(self, model):
        self.model = model
        self.dims: dict[DimKey, int] = {}
        self.length: list[int] = []
        self.base: list[int] = []
        self.keys: list[DimKey] = []
        self.n_elems = 0
        self.e_src: list[np.ndarray] = []
        self.e_dst: list[np.ndarray] = []
        self.d_edges: set[tuple[int, int]] = set()
        self.products: list[Product] = []
        self.frozen: dict[int, list[str]] = {}
        self.approx: dict[int, list[str]] = {}
        self.roles: dict[DimKey, str] = {}
        self.tags: dict[DimKey, set[str]] = {}
        self.touched: set[DimKey] = set()
        self.structural: set[int] = set()
        self.hidden: dict[DimKey, list] = {}
        self.literal_uses: dict[tuple, list[DimKey]] = {}
        self.node: Node | None = None

    # -- dims ------------------------------------------------------------------------------
    def length_of(self, key: DimKey):
        if key[0] == "~virtual":
            return self.length[self.dims[key]]
        s = self.model.shapes.get(key[0])
        if s is None or key[1] >= len(s):
            return None
        return s[key[1]]

    def dim(self, key: DimKey) -> int | None:
        """Index of a static dim (allocating its elements), or None if not static."""
        d = self.dims.get(key)
        if d is not None:
            return d
        n = self.length_of(key)
        if not isinstance(n, int) or n < 0:
            return None
        d = len(self.keys)
        self.dims[key] = d
        self.keys.append(key)
        self.length.append(n)
        self.base.append(self.n_elems)
        self.n_elems += n
        return d

    def virtual(self, name: str, length: int) -> DimKey:
        key = ("~virtual", f"{self.node.name if self.node else ''}/{name}")
        if key not in self.dims:
            d = len(self.keys)
            self.dims[key] = d
            self.keys.append(key)
            self.length.append(length)
            self.base.append(self.n_elems)
            self.n_elems += length
        return key

    def _where(self) -> str:
        return f"{self.node.op} node {self.node.name!r}" if self.node else "graph"

    # -- relations --------------------------------------------------------------------------
    def hidden_of(self, key: DimKey) -> list:
        """Static atoms merged into a dynamic axis (outer→inner), as (dim key, length)."""
        return self.hidden.get(key, [])

    def hidden_atom(self, key: DimKey, length: int) -> DimKey:
        """A static atom merged (as the inner factor) into the dynamic axis `key`."""
        atom = self.virtual(f"hidden{len(self.hidden_of(key))}:{key[0]}/{key[1]}", length)
        self.hidden[key] = self.hidden_of(key) + [(atom, length)]
        return atom

    def couple(self, a: DimKey, b: DimKey) -> None:
        """Identity: index i of a is index i of b."""
        self.touched.update((a, b))
        la, lb = self.length_of(a), self.length_of(b)
        if la == 1 or lb == 1:
            return  # broadcasting: nothing to prune on a length-1 axis
        if not isinstance(la, int) or not isinstance(lb, int):
            if isinstance(la, int) or isinstance(lb, int):
                for k in (a, b):
                    self.freeze(k, "coupled to a dynamic dimension")
                return
            ha, hb = self.hidden_of(a), self.hidden_of(b)
            if ha and not hb:
                self.hidden[b] = ha
            elif hb and not ha:
                self.hidden[a] = hb
            elif ha and hb and ha is not hb:
                if [ln for _, ln in ha] == [ln for _, ln in hb]:
                    for (ka, _), (kb, _) in zip(ha, hb):
                        self.couple(ka, kb)
                else:
                    for k, _ in ha + hb:
                        self.freeze(k, "dynamic axes with different hidden factors meet")
            return
        if la != lb:
            raise SpaError(f"inconsistent shapes: axis {a[1]} of {a[0]!r} has length {la} but "
                           f"axis {b[1]} of {b[0]!r} has length {lb}", file=self.model.path,
                           node=self.node.name if self.node else None,
                           op=self.node.op if self.node else None)
        idx = np.arange(la)
        self.couple_idx(a, idx, b, idx)

    def couple_idx(self, a: DimKey, ia, b: DimKey, ib) -> None:
        """Index ia[k] of a is index ib[k] of b."""
        self.touched.update((a, b))
        da, db = self.dim(a), self.dim(b)
        if da is None or db is None:
            for k, d in ((a, da), (b, db)):
                if d is not None:
                    self.freeze(k, "coupled to a dynamic dimension")
            return
        ia, ib = np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
        if len(ia) == 0:
            return
        self.e_src.append(ia + self.base[da])
        self.e_dst.append(ib + self.base[db])
        if da != db:
            self.d_edges.add((min(da, db), max(da, db)))

    def product(self, merged: DimKey, factors: list[DimKey], policy: str = "outer") -> None:
        """merged index = row-major index over the factors (Flatten, head split, groups)."""
        self.touched.add(merged)
        self.touched.update(factors)
        lens = [self.length_of(f) for f in factors]
        lm = self.length_of(merged)
        if not isinstance(lm, int) or any(not isinstance(n, int) for n in lens) \
                or int(np.prod(lens)) != lm:
            for k in [merged, *factors]:
                self.freeze(k, "axes merge or split with dynamic or inconsistent lengths")
            return
        keep = [f for f, n in zip(factors, lens) if n > 1]
        if lm == 1:
            return
        if len(keep) == 1:
            self.couple(merged, keep[0])
            return
        for k in [merged, *keep]:
            self.dim(k)
        self.products.append(Product(merged, keep, self.node.name if self.node else "", policy))

    def freeze(self, key: DimKey, reason: str, structural: bool = False) -> None:
        """Never prune this dim. `structural`: an axis that is never a channel (spatial,
        kernel) -- not worth listing among the frozen dims of `spa analyze`."""
        self.touched.add(key)
        n = self.length_of(key)
        if not isinstance(n, int) or n <= 1:
            return
        if structural:
            self.structural.add(self.dim(key))
            return
        d = self.dim(key)
        if d is not None and self.length[d] > 1:
            self.frozen.setdefault(d, []).append(f"{self._where()}: {reason}")

    def approximate(self, key: DimKey, reason: str) -> None:
        n = self.length_of(key)
        if not isinstance(n, int) or n <= 1:
            return
        d = self.dim(key)
        if d is not None:
            self.approx.setdefault(d, []).append(f"{self._where()}: {reason}")

    def role(self, key: DimKey, role: str) -> None:
        """Tag a parameter dim for criteria: out (producer rows), in (consumer slices), …"""
        self.roles.setdefault(key, role)

    def tag(self, key: DimKey, tag: str) -> None:
        """Mark a dim with a hint for the selections and criteria (several per dim). In use:
        "channel_block" -- the op's fast kernels want this dim's length to be a multiple of
        the provider's channel block (spa.select.align, `--round-to auto`); "norm_scale" --
        the dim is a normalisation's scale γ (criterion bn_scale)."""
        self.tags.setdefault(key, set()).add(tag)

    def literal(self, const_name: str, index: int, key: DimKey) -> None:
        """A shape literal inside a shared constant must equal the length of `key`."""
        self.literal_uses.setdefault((const_name, index), []).append(key)


@dataclass
class Analysis:
    model: object
    coupler: Coupler
    label: np.ndarray                  # element -> class
    comp: np.ndarray                   # dim -> component
    groups: list[Group]
    chan_of_class: np.ndarray          # class -> global channel id (-1 none, -2 several)
    multi: dict[int, list[int]]        # class -> channel ids (when several)
    group_of_chan: np.ndarray          # channel -> group id
    local_of_chan: np.ndarray          # channel -> index within its group
    group_chans: list[np.ndarray]      # group id -> channel ids in local order
    frozen: list[dict]                 # frozen parameter dims with reasons
    opaque: list[dict]                 # nodes without a rule
    products: list[Product]

    # -- channel maps ----------------------------------------------------------------------
    def dim_channels(self, key: DimKey) -> np.ndarray | None:
        """Global channel id of every element of a dim (-1: not prunable, -2: several)."""
        c = self.coupler
        d = c.dims.get(key)
        if d is None:
            return None
        lab = self.label[c.base[d]:c.base[d] + c.length[d]]
        return self.chan_of_class[lab]

    def removed_table(self, removed) -> np.ndarray:
        """Boolean over all channels: True for the removed ones."""
        table = np.zeros(self.n_channels + 1, bool)  # last slot: index -1 (not prunable)
        table[np.asarray(removed, dtype=np.int64)] = True
        return table

    def removed_mask(self, key: DimKey, removed: np.ndarray) -> np.ndarray | None:
        """Boolean mask of elements removed from `key` when global channels `removed` go
        (`removed`: channel ids, or a table from `removed_table`)."""
        ch = self.dim_channels(key)
        if ch is None:
            return None
        table = removed if removed.dtype == bool else self.removed_table(removed)
        gone = table[np.where(ch >= 0, ch, self.n_channels)]
        several = np.nonzero(ch == -2)[0]
        if len(several):
            c = self.coupler
            d = c.dims[key]
            lab = self.label[c.base[d] + several]
            for k, cl in zip(several, lab):
                if table[self.multi[int(cl)]].any():
                    gone[k] = True
        return gone

    def member_keys(self) -> list[DimKey]:
        return [k for k in self.coupler.keys if k[0] != "~virtual"]

    def channel_keys(self) -> list[DimKey]:
        """The dims that own at least one prunable channel (the ones a plan can change)."""
        keys = self.__dict__.get("_channel_keys")
        if keys is None:
            c = self.coupler
            has = np.zeros(len(c.keys), bool)
            if c.n_elems:
                owned = self.chan_of_class[self.label] != -1
                dim_of = np.repeat(np.arange(len(c.keys)), c.length)
                has[np.unique(dim_of[owned])] = True
            keys = [k for d, k in enumerate(c.keys) if has[d] and k[0] != "~virtual"]
            self.__dict__["_channel_keys"] = keys
        return keys

    @property
    def n_channels(self) -> int:
        return len(self.group_of_chan)

    def to_json(self) -> dict:
        return {"groups": [g.to_json() for g in self.groups], "frozen": self.frozen,
                "opaque": self.opaque}


def _components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    m = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n)).tocsr()
    _, lab = connected_components(m, directed=True, connection="weak")
    del m
    return lab.astype(np.int64)


def analyze(model, progress=None) -> Analysis:
    """Run every node's rule, then resolve elements, dims and products into groups."""
    from .. import ops  # noqa: F401  (registers the rules)
    c = Coupler(model)
    opaque: list[dict] = []
    # graph interface: inputs and outputs never change shape
    for name in model.input_names + model.output_names:
        s = model.shapes.get(name)
        c.node = None
        if s is None and name in model.producer:
            _freeze_unknown_output(model, c, name)
        for ax in range(len(s or ())):
            c.freeze((name, ax), f"graph {'input' if name in model.input_names else 'output'}"
                     f" {name!r} keeps its shape")
    for k, proto in enumerate(model.nodes):
        if progress:
            progress(k, len(model.nodes))
        node = Node(proto, model)
        c.node = node
        r = registry.get(proto)
        tensors = [t for t in list(proto.input) + list(proto.output) if t]
        tensors += sorted(model.outer_refs.get(id(proto), ()))  # read inside subgraphs
        if r is None:
            if proto.op_type == "Constant" and proto.domain in ("", "ai.onnx"):
                continue
            opaque.append({"node": node.name, "op": proto.op_type, "domain": proto.domain})
            for t in tensors:
                for ax in range(len(model.shapes.get(t) or ())):
                    c.freeze((t, ax), "op has no rule (opaque): its dims are not pruned")
            continue
        c.touched = set()
        try:
            r.analyze(node, c)
        except SpaError:
            raise
        except Exception as exc:  # a rule that cannot handle this node freezes it
            for t in tensors:
                for ax in range(len(model.shapes.get(t) or ())):
                    c.freeze((t, ax), f"rule failed ({type(exc).__name__}: {exc})")
        # anything the rule did not map is frozen: never guess
        for t in tensors:
            s = model.shapes.get(t)
            for ax in range(len(s) if s is not None else 0):
                if (t, ax) not in c.touched:
                    c.freeze((t, ax), f"{proto.op_type} does not map axis {ax} of {t!r}")
            if s is None and t not in model.consts:
                pass  # unknown rank: nothing allocated for it, nothing can couple to it
    c.node = None
    # shared shape literals: all dims that read the same literal keep the same length
    for uses in c.literal_uses.values():
        for a, b in zip(uses, uses[1:]):
            c.couple(a, b)
    return _resolve(model, c, opaque)


def _freeze_unknown_output(model, c: Coupler, name: str) -> None:
    """A graph output whose rank nothing could compute (shape inference, ONNX Runtime):
    which of its axes are channels is unknown, so every axis of the tensors it is computed
    from is frozen, back through producers of unknown shape up to tensors of known shape."""
    why = (f"graph output {name!r} keeps its shape, which neither shape inference nor ONNX "
           "Runtime could compute: the tensors it is computed from are not pruned")
    frontier, seen = [name], set()
    while frontier:
        t = frontier.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        s = model.shapes.get(t)
        if s is not None:
            for ax in range(len(s)):
                c.freeze((t, ax), why)
            continue
        node = model.producer.get(t)
        if node is not None:
            frontier.extend(node.input)
            frontier.extend(sorted(model.outer_refs.get(id(node), ())))


def _unify_products(c: Coupler, label: np.ndarray) -> list:
    seen: dict[tuple, tuple] = {}   # (class, factor lengths) -> (product, merged index)
    edges = []
    for k, p in enumerate(c.products):
        dm = c.dims[p.merged]
        lens = tuple(c.length[c.dims[f]] for f in p.factors)
        cls = label[c.base[dm]:c.base[dm] + c.length[dm]]
        for j, cl in enumerate(cls.tolist()):
            first = seen.setdefault((cl, lens), (k, j))
            if first == (k, j):
                continue
            q, i = first
            if q == k:
                continue
            ui = np.unravel_index(i, lens)
            uj = np.unravel_index(j, lens)
            for fq, fk, a, b in zip(c.products[q].factors, p.factors, ui, uj):
                ea = c.base[c.dims[fq]] + int(a)
                eb = c.base[c.dims[fk]] + int(b)
                if label[ea] != label[eb]:
                    edges.append((np.array([ea]), np.array([eb])))
                    da, db = c.dims[fq], c.dims[fk]
                    if da != db:
                        c.d_edges.add((min(da, db), max(da, db)))
    return edges


def _resolve(model, c: Coupler, opaque: list[dict]) -> Analysis:
    n_dims = len(c.keys)
    # element ids fit in int32 below 2**31 elements: half the memory of the edge lists
    # (millions of elements for an LLM-sized graph) and no copy in scipy
    idx = np.int32 if c.n_elems < 2**31 - 1 else np.int64
    src = np.concatenate(c.e_src).astype(idx, copy=False) if c.e_src else np.zeros(0, idx)
    dst = np.concatenate(c.e_dst).astype(idx, copy=False) if c.e_dst else np.zeros(0, idx)
    c.e_src, c.e_dst = [], []  # (the per-rule pieces are in src/dst now)
    label = _components(c.n_elems, src, dst)
    # the same merged channels built twice from alike factors (K and V expanded the same
    # way for grouped-query attention): their factors are the same channels
    for _ in range(8):
        extra = _unify_products(c, label)
        if not extra:
            break
        src = np.concatenate([src] + [a.astype(idx) for a, _ in extra])
        dst = np.concatenate([dst] + [b.astype(idx) for _, b in extra])
        label = _components(c.n_elems, src, dst)
    del src, dst
    n_classes = int(label.max()) + 1 if len(label) else 0
    de = np.array(sorted(c.d_edges), dtype=np.int64).reshape(-1, 2)
    comp = _components(n_dims, de[:, 0], de[:, 1])
    n_comp = int(comp.max()) + 1 if n_dims else 0

    frozen = np.zeros(n_comp, bool)
    reasons: dict[int, list] = {}
    for d, rs in c.frozen.items():
        frozen[comp[d]] = True
        reasons.setdefault(int(comp[d]), []).append((d, rs))
    for d in c.structural:
        frozen[comp[d]] = True
    approx: dict[int, list[str]] = {}
    for d, rs in c.approx.items():
        approx.setdefault(int(comp[d]), []).extend(rs)
    has_param = np.zeros(n_comp, bool)
    for d, key in enumerate(c.keys):
        if key[0] != "~virtual" and key[0] in model.consts and \
                is_float(model.consts.dtype_of(key[0])):  # (bfloat16 too; nothing read)
            has_param[comp[d]] = True

    prods = c.products
    pm = [int(comp[c.dims[p.merged]]) for p in prods]
    pf = [[int(comp[c.dims[f]]) for f in p.factors] for p in prods]

    # merged classes derived by more than one product: their factors are frozen
    derived_by: dict[int, dict[tuple, int]] = {}
    elems = []
    for k, p in enumerate(prods):
        dm = c.dims[p.merged]
        lm = c.length[dm]
        cls = label[c.base[dm]:c.base[dm] + lm]
        unr = np.unravel_index(np.arange(lm), [c.length[c.dims[f]] for f in p.factors])
        fcls = [label[c.base[c.dims[f]] + u] for f, u in zip(p.factors, unr)]
        elems.append((cls, fcls))
        for j, cl in enumerate(cls.tolist()):
            derived_by.setdefault(cl, {})[tuple(int(f[j]) for f in fcls)] = k
    for cl, how in derived_by.items():
        if len(how) > 1:  # the same channels built from different factor channels
            ks = set(how.values())
            for k in ks:
                for fc in pf[k]:
                    if not frozen[fc]:
                        frozen[fc] = True
                        reasons.setdefault(fc, []).append(
                            (None, [f"axis split/merged in incompatible ways (node "
                                    f"{prods[k].node!r})"]))
    del derived_by  # (a dict per merged class: tens of MB for an LLM-sized graph)

    def settle():
        changed = True
        while changed:
            changed = False
            for k in range(len(prods)):
                if has_param[pm[k]]:
                    for fc in pf[k]:
                        if not has_param[fc]:
                            has_param[fc] = changed = True
                if frozen[pm[k]]:
                    for fc in pf[k]:
                        if not frozen[fc]:
                            frozen[fc] = changed = True
                            reasons.setdefault(fc, []).append(
                                (None, [f"merged into a frozen axis at node {prods[k].node!r}"]))
    settle()
    # policy: in a head split only the outermost prunable factor (the heads) is pruned
    cand = [[fc for fc in pf[k] if not frozen[fc] and has_param[fc]] for k in range(len(prods))]
    for k, p in enumerate(prods):
        if p.policy == "outer":
            for fc in cand[k][1:]:
                if fc != cand[k][0] and not frozen[fc]:
                    frozen[fc] = True
                    reasons.setdefault(fc, []).append(
                        (None, [f"inner factor of the axis split at node {p.node!r}: only the "
                                "outer factor (e.g. whole heads) is pruned"]))
    settle()
    # approximation flows from a merged axis back to the factors it is made of
    changed = True
    while changed:
        changed = False
        for k in range(len(prods)):
            if pm[k] in approx:
                for fc in pf[k]:
                    if fc not in approx or not set(approx[pm[k]]) <= set(approx[fc]):
                        approx.setdefault(fc, [])
                        new = [r for r in approx[pm[k]] if r not in approx[fc]]
                        if new:
                            approx[fc].extend(new)
                            changed = True

    # primary classes: in a prunable component and not derived from a product
    class_comp = np.full(n_classes, -1, np.int64)
    dim_of_elem = np.repeat(np.arange(n_dims, dtype=np.int32), c.length) if n_dims else \
        np.zeros(0, np.int32)
    first_elem = np.full(n_classes, np.iinfo(np.int64).max, np.int64)
    if c.n_elems:
        class_comp[label] = comp[dim_of_elem]
        np.minimum.at(first_elem, label, np.arange(c.n_elems))
    is_derived = np.zeros(n_classes, bool)
    for cls, _ in elems:
        is_derived[cls] = True
    comp_max_len = np.zeros(n_comp, np.int64)
    if n_dims:
        np.maximum.at(comp_max_len, comp, np.asarray(c.length, np.int64))
    prunable_comp = has_param & ~frozen & (comp_max_len > 1)
    primary = prunable_comp[class_comp] & ~is_derived if n_classes else np.zeros(0, bool)
    # channels: primaries ordered by group (first element), then by first element
    prim = np.nonzero(primary)[0]
    comp_first: dict[int, int] = {}
    for cl in prim[np.argsort(first_elem[prim], kind="stable")]:
        comp_first.setdefault(int(class_comp[cl]), int(first_elem[cl]))
    comp_order = sorted(comp_first, key=comp_first.get)
    comp_gid = {cm: g for g, cm in enumerate(comp_order)}
    order = sorted(prim.tolist(), key=lambda cl: (comp_gid[int(class_comp[cl])],
                                                  first_elem[cl]))
    chan_of_class = np.full(n_classes, -1, np.int64)
    chan_of_class[order] = np.arange(len(order))
    group_of_chan = np.array([comp_gid[int(class_comp[cl])] for cl in order], np.int64)
    local_of_chan = np.zeros(len(order), np.int64)
    group_chans: list[np.ndarray] = []
    bounds = np.searchsorted(group_of_chan, np.arange(len(comp_order) + 1))  # sorted by group
    for g in range(len(comp_order)):
        ids = np.arange(bounds[g], bounds[g + 1])
        local_of_chan[ids] = np.arange(len(ids))
        group_chans.append(ids)

    # derived classes inherit the channels of their factors (products may nest)
    multi: dict[int, list[int]] = {}
    derived_chans: dict[int, set[int]] = {}
    pending = list(range(len(prods)))
    for _ in range(len(prods) + 1):
        if not pending:
            break
        progress, rest = False, []
        for k in pending:
            # a product is ready when none of its factor classes is itself still unresolved
            cls, fcls = elems[k]
            ready = all(not is_derived[f].any() or all(int(x) in derived_chans for x in
                                                       np.unique(f[is_derived[f]]))
                        for f in fcls)
            if not ready:
                rest.append(k)
                continue
            progress = True
            for j, cl in enumerate(cls):
                s = derived_chans.setdefault(int(cl), set())
                for f in fcls:
                    fc = int(f[j])
                    if chan_of_class[fc] >= 0:
                        s.add(int(chan_of_class[fc]))
                    elif fc in derived_chans:
                        s |= derived_chans[fc]
        pending = rest
        if not progress:
            break
    for k in pending:  # circular derivations: leave those classes unprunable, freeze
        for fc in pf[k]:
            frozen[fc] = True
    for cl, s in derived_chans.items():
        if len(s) == 1:
            chan_of_class[cl] = next(iter(s))
        elif len(s) > 1:
            chan_of_class[cl] = -2
            multi[cl] = sorted(s)
    del derived_chans, elems  # (a set per merged class)

    ana = Analysis(model, c, label, comp, [], chan_of_class, multi, group_of_chan,
                   local_of_chan, group_chans, [], opaque, prods)
    # members: every dim with an element that maps to a group's channels
    members: dict[int, list[dict]] = {g: [] for g in range(len(comp_order))}
    unit = [1] * len(comp_order)
    kinds = ["channels"] * len(comp_order)
    for d, key in enumerate(c.keys):
        ch = ana.dim_channels(key)
        if ch is None:
            continue
        valid = ch[ch >= 0]
        gs = set(group_of_chan[valid].tolist()) if len(valid) else set()
        if (ch == -2).any():
            base = c.base[d]
            for j in np.nonzero(ch == -2)[0]:
                gs.update(int(group_of_chan[x]) for x in multi[int(label[base + j])])
        for g in sorted(gs):
            is_const = key[0] in model.consts
            entry = {"tensor": key[0], "axis": key[1], "length": c.length[d],
                     "role": c.roles.get(key, "param" if is_const else "activation"),
                     "const": bool(is_const)}
            if key in c.tags:
                entry["tags"] = sorted(c.tags[key])
            if key[0] == "~virtual":
                continue
            members[g].append(entry)
            if is_const and len(valid):
                per = np.bincount(local_of_chan[valid][group_of_chan[valid] == g])
                if len(per):
                    unit[g] = max(unit[g], int(per.max()))
    for k, p in enumerate(prods):  # an axis split into (heads, head_dim): whole heads
        if p.policy == "outer" and len(cand[k]) > 1 and cand[k][0] in comp_gid:
            kinds[comp_gid[cand[k][0]]] = "heads"
    for cm, g in comp_gid.items():
        ana.groups.append(Group(id=g, channels=len(group_chans[g]), members=members[g],
                                exact=cm not in approx, approx_reasons=approx.get(cm, []),
                                unit=unit[g], kind=kinds[g]))
    # frozen parameter dims, with the reasons that froze their component
    for cm in np.nonzero(frozen & has_param)[0]:
        rs = reasons.get(int(cm), [])
        if not rs:
            continue  # only structural reasons (spatial / kernel axes)
        dims = [c.keys[d] for d in np.nonzero(comp == cm)[0]
                if c.keys[d][0] in model.consts and c.length[d] > 1]
        if not dims:
            continue
        why = []
        for _, r in rs:
            for x in r:
                if x not in why:
                    why.append(x)
        ana.frozen.append({"dims": [{"tensor": t, "axis": a} for t, a in dims[:8]],
                           "n_dims": len(dims), "reasons": why[:6]})
    return ana
