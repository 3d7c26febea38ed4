"""Reconstruction: the least-squares update of the weights that read pruned channels.

When a plan removes input slices of a layer ("consumer": a Conv, ConvTranspose, Gemm or
MatMul with a constant weight), the kept weights can take over part of what the removed
inputs contributed. With the layer's input second moment H = Σ x xᵀ (over calibration
data or a surrogate, `spa.criteria.obspa`), the output W x is best approximated from the
kept inputs K by

    W'_K = W H_{:,K} H_{KK}⁻¹                       (least squares on the calibration inputs)

and, where the layer has a bias (or can be given one without changing the graph's
structure), x is augmented with a constant 1 that is never removed: its coefficient is
the bias compensation for the mean contribution of the removed inputs.

This module knows how each consumer's weight is laid out as a matrix (`Consumer`: rows =
outputs, columns = the entries of H) and does the algebra; the Hessians come from the
criterion. `reconstruct` turns a plan into `Updates`: new values of constants (in their
original shapes; `apply_plan` then slices them as usual) and new bias inputs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from ..errors import SpaError

#: damping: λ = DAMP · mean(diag H) is added to the diagonal before solving
DAMP = 0.01


# ------------------------------------------------------------------------------------------
# robust symmetric positive (semi)definite algebra


def damped(H: np.ndarray, damp: float = DAMP, n: int | None = None) -> np.ndarray:
    """H + λI with λ = damp · mean of the first `n` diagonal entries (the inputs; not the
    constant-1 entry), and at least a tiny absolute floor so an all-zero H stays solvable."""
    n = len(H) if n is None else n
    d = np.diag(H)[:n]
    lam = damp * float(d.mean()) if n and d.mean() > 0 else damp
    lam = max(lam, 1e-12)
    out = H.copy()
    out[np.diag_indices_from(out)] += lam
    return out


def inv_psd(A: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix: Cholesky, falling back to an
    eigendecomposition with the small eigenvalues clipped (a pseudo-inverse)."""
    if A.size == 0:
        return A.copy()
    try:
        c = scipy.linalg.cho_factor(A, lower=False, check_finite=False)
        out = scipy.linalg.cho_solve(c, np.eye(len(A)), check_finite=False)
        if np.isfinite(out).all():
            return (out + out.T) / 2
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        pass
    if not np.isfinite(A).all():
        raise SpaError("the Hessian has NaN/Inf entries (non-finite activations on the "
                       "calibration data?)")
    w, v = np.linalg.eigh((A + A.T) / 2)
    cut = max(float(w.max()), 0.0) * 1e-10
    inv = np.where(w > cut, 1.0 / np.where(w > cut, w, 1.0), 0.0)
    return (v * inv) @ v.T


def solve_psd(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A⁻¹ B for symmetric positive definite A (same fallback as `inv_psd`)."""
    try:
        c = scipy.linalg.cho_factor(A, lower=False, check_finite=False)
        out = scipy.linalg.cho_solve(c, B, check_finite=False)
        if np.isfinite(out).all():
            return out
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        pass
    return inv_psd(A) @ B


# ------------------------------------------------------------------------------------------
# consumers: how a weight is a matrix, and how its input is a set of rows


@dataclass
class Consumer:
    """One layer that reads a group's channels through a constant weight (for a grouped
    convolution: one of its groups). Its weight, seen as a matrix M (rows × d), acts on
    the rows of its input unfolded into d features (H is d × d, plus one constant-1 entry
    when `intercept`)."""
    node: str                     # node name
    op: str
    x: str                        # the input activation
    weight: str                   # constant name
    in_axis: int                  # the weight axis whose elements are the input slices
    out_axis: int                 # the weight axis of the outputs
    kind: str                     # conv | convT | dense | dense_left
    mode: str = "full"            # full: conv inputs unfolded over the kernel; channel
    kernel: tuple = ()            # kernel spatial shape
    strides: tuple = ()
    dilations: tuple = ()
    pads: tuple = ()              # begin..., end...
    part: tuple | None = None     # (g, groups) of a grouped convolution
    trans_x: bool = False         # Gemm transA: features on axis 0
    bias: str | None = None       # bias constant (read by this node only)
    bias_node: str | None = None  # node that adds the bias (MatMul + Add)
    bias_add: int | None = None   # input index where a new bias may be added
    bias_scale: float = 1.0       # bias += bias_scale · delta (Gemm alpha / beta)
    shared: bool = False          # the weight is read by other nodes too: never updated
    n_in: int = 0                 # elements of the input dim (of this part)
    n_out: int = 0                # outputs (of this part)
    owners: list = field(default_factory=list)  # per input element: channel ids owning it

    @property
    def kprod(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1

    @property
    def d(self) -> int:
        return self.n_in * self.kprod if self.mode == "full" else self.n_in

    @property
    def intercept(self) -> bool:
        return not self.shared and (self.bias is not None or self.bias_add is not None)

    @property
    def hkey(self) -> tuple:
        """Consumers with equal keys see the same unfolded rows (one Hessian)."""
        return (self.x, self.kind, self.mode, self.kernel, self.strides, self.dilations,
                self.pads, self.part, self.trans_x, self.n_in)

    def h_index(self, elems) -> np.ndarray:
        """Columns of M (entries of H) of the given input elements."""
        e = np.asarray(elems, np.int64)
        if self.mode == "full" and self.kprod > 1:
            return (e[:, None] * self.kprod + np.arange(self.kprod)[None, :]).reshape(-1)
        return e

    # -- weight <-> matrix --------------------------------------------------------------
    def _slice(self, W: np.ndarray) -> np.ndarray:
        if self.part is None:
            return W
        g, _ = self.part
        return W[g * self.n_out:(g + 1) * self.n_out]

    def matrix(self, W: np.ndarray) -> np.ndarray:
        W = np.asarray(W, np.float64)
        if self.kind == "conv":
            Wp = self._slice(W)
            if self.mode == "full":
                return Wp.reshape(self.n_out, self.n_in * self.kprod)
            return Wp.reshape(self.n_out, self.n_in, self.kprod).transpose(0, 2, 1) \
                .reshape(self.n_out * self.kprod, self.n_in)
        if self.kind == "convT":   # W: (in, out, *k)
            return W.reshape(self.n_in, self.n_out * self.kprod).T
        if self.kind == "dense":
            return W if self.in_axis == 1 else W.T
        if self.kind == "dense_left":
            return W
        raise ValueError(self.kind)

    def write_matrix(self, W: np.ndarray, M: np.ndarray) -> None:
        """Write matrix M back into weight array W (in place, original layout)."""
        if self.kind == "conv":
            if self.mode == "full":
                Wp = M.reshape((self.n_out, self.n_in) + tuple(self.kernel))
            else:
                Wp = M.reshape(self.n_out, self.kprod, self.n_in).transpose(0, 2, 1) \
                    .reshape((self.n_out, self.n_in) + tuple(self.kernel))
            if self.part is None:
                W[...] = Wp
            else:
                g, _ = self.part
                W[g * self.n_out:(g + 1) * self.n_out] = Wp
        elif self.kind == "convT":
            W[...] = M.T.reshape(W.shape)
        elif self.kind == "dense":
            W[...] = M if self.in_axis == 1 else M.T
        else:
            W[...] = M

    def bias_delta(self, delta_rows: np.ndarray) -> np.ndarray:
        """Per-output bias change from the constant-1 column of the updated matrix."""
        if self.kind == "conv" and self.mode == "channel":
            return delta_rows.reshape(self.n_out, self.kprod).sum(axis=1)
        if self.kind == "convT":
            return delta_rows.reshape(self.n_out, self.kprod).sum(axis=1)
        return delta_rows

    # -- input -> rows ---------------------------------------------------------------------
    def n_rows(self, x_shape) -> int:
        """Rows a batch of this input shape gives."""
        if self.kind == "conv" and self.mode == "full":
            return int(x_shape[0]) * int(np.prod(self._out_spatial(x_shape[2:])))
        if self.kind in ("conv", "convT"):
            return int(x_shape[0]) * int(np.prod(x_shape[2:]))
        if self.kind == "dense":
            return int(x_shape[1]) if self.trans_x else int(np.prod(x_shape[:-1]))
        return int(np.prod(x_shape[:-2])) * int(x_shape[-1])

    def _out_spatial(self, spatial) -> list[int]:
        nd = len(self.kernel)
        return [(spatial[i] + self.pads[i] + self.pads[i + nd] -
                 self.dilations[i] * (self.kernel[i] - 1) - 1) // self.strides[i] + 1
                for i in range(nd)]

    def part_of(self, x: np.ndarray) -> np.ndarray:
        """The input channels this consumer reads (its group of a grouped convolution)."""
        if self.part is None or self.kind not in ("conv", "convT"):
            return x
        g, _ = self.part
        return x[:, g * self.n_in:(g + 1) * self.n_in]

    def rows(self, x: np.ndarray, pick: np.ndarray | None = None) -> np.ndarray:
        """Input rows (n, d) float32 of a batch; `pick`: indices of the rows to keep (in the
        batch's row order: sample-major, then positions)."""
        x = self.part_of(x)
        if self.kind == "conv" and self.mode == "full":
            xp = self.padded(x)
            osz = self._out_spatial(x.shape[2:])
            return self.unfold(xp, pick, x.shape[0], osz)
        if self.kind in ("conv", "convT"):
            r = np.moveaxis(x, 1, -1).reshape(-1, self.n_in)
        elif self.kind == "dense":
            r = x.T if self.trans_x else x.reshape(-1, x.shape[-1])
        else:
            r = np.moveaxis(x, -2, -1).reshape(-1, x.shape[-2])
        r = r if pick is None else r[pick]
        return np.ascontiguousarray(r, dtype=np.float32)

    def padded(self, x: np.ndarray) -> np.ndarray:
        nd = len(self.kernel)
        if not any(self.pads):
            return x
        return np.pad(x, [(0, 0), (0, 0)] + [(self.pads[i], self.pads[i + nd])
                                             for i in range(nd)])

    def windows(self, xp: np.ndarray, osz) -> np.ndarray:
        """A strided view (B, C, *out positions, *kernel offsets) of the padded input: the
        input entry every kernel offset of every output position reads."""
        nd = len(self.kernel)
        span = [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilations)]
        win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
        return win[(slice(None), slice(None))
                   + tuple(slice(0, o * s, s) for o, s in zip(osz, self.strides))
                   + tuple(slice(None, None, d) for d in self.dilations)]

    def unfold(self, xp: np.ndarray, idx: np.ndarray | None, B: int, osz) -> np.ndarray:
        """Rows `idx` (sample-major, then output positions; None: all) of the padded input
        unfolded over the kernel: (rows, C·k) float32, channel-major like the weight."""
        C = xp.shape[1]
        if idx is None:  # one strided copy per kernel offset
            out = np.empty((B,) + tuple(osz) + (C, self.kprod), np.float32)
            offsets = itertools.product(*[range(k) for k in self.kernel])
            for k, off in enumerate(offsets):
                sel = tuple(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in
                            zip(off, self.dilations, osz, self.strides))
                out[..., k] = np.moveaxis(xp[(slice(None), slice(None)) + sel], 1, -1)
            return out.reshape(-1, C * self.kprod)
        win = self.windows(xp, osz)
        b, *pos = np.unravel_index(np.asarray(idx, np.int64), [B] + list(osz))
        out = np.asarray(win[(b, slice(None)) + tuple(pos)], dtype=np.float32)
        return out.reshape(len(idx), C * self.kprod)


# ------------------------------------------------------------------------------------------
# the update


@dataclass
class Updates:
    """What reconstruction changes: constants (original shapes, before slicing) and bias
    inputs to add ((node name, input index) -> values over the node's original outputs)."""
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    new_inputs: dict[tuple, np.ndarray] = field(default_factory=dict)
    new_input_dims: dict[tuple, tuple] = field(default_factory=dict)  # -> (weight, out axis)
    layers: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.consts or self.new_inputs)


def ls_update(M: np.ndarray, H: np.ndarray, keep: np.ndarray, damp: float = DAMP,
              n_inputs: int | None = None) -> np.ndarray:
    """The least-squares optimum on the kept columns `keep` of the matrix M (rows × D, the
    constant-1 column, if any, last and zero) under the second moment H (D × D), with
    damping: M'[:, keep] = M Hd[:, keep] Hd[keep, keep]⁻¹, zeros elsewhere."""
    Hd = damped(H, damp, n_inputs)
    out = np.zeros_like(M)
    if len(keep):
        X = M @ Hd[:, keep]
        out[:, keep] = solve_psd(Hd[np.ix_(keep, keep)], X.T).T
    return out


def quad_error(D: np.ndarray, H: np.ndarray) -> float:
    """tr(D H Dᵀ): the output error energy of a weight change D on inputs with moment H."""
    return float(np.einsum("ij,ij->", D @ H, D))


def cross_update(M: np.ndarray, C: np.ndarray, Ht: np.ndarray, damp: float = DAMP,
                 n_inputs: int | None = None, prior: np.ndarray | None = None) -> np.ndarray:
    """Least squares from other inputs: the matrix W minimising E‖M x − W x̃‖² given the
    cross moment C = E[x x̃ᵀ] (D × k) and the moment Ht = E[x̃ x̃ᵀ] (k × k, damped):
    W = M C Ht⁻¹. With x̃ = x restricted to the kept entries this is `ls_update`. With a
    `prior` (rows × k), the damping pulls W towards it instead of towards zero:
    W = (M C + λ prior)(Ht + λI)⁻¹, the minimiser of E‖M x − W x̃‖² + λ‖W − prior‖²."""
    Hd = damped(Ht, damp, n_inputs)
    rhs = M @ C
    if prior is not None:
        rhs = rhs + (np.diag(Hd) - np.diag(Ht))[None, :] * prior
    return solve_psd(Hd, rhs.T).T


class Writer:
    """Collects new consumer matrices into new constant values and bias inputs. Writing a
    consumer again replaces what was written for it before (weights and its bias slice
    are set from the original values, not accumulated)."""

    def __init__(self, model, start: Updates | None = None):
        self.model = model
        self.work: dict[str, np.ndarray] = {}
        self.new_inputs: dict[tuple, np.ndarray] = {}
        self.dims: dict[tuple, tuple] = {}
        self.dtypes: dict[tuple, np.dtype] = {}
        if start is not None:
            self.work = {n: np.array(a, np.float64) for n, a in start.consts.items()}
            self.new_inputs = {k: np.array(a, np.float64) for k, a in start.new_inputs.items()}
            self.dims = dict(start.new_input_dims)
            self.dtypes = {k: a.dtype for k, a in start.new_inputs.items()}

    def write(self, c: Consumer, Mn: np.ndarray) -> str | None:
        """Mn: the consumer's new matrix over all d inputs (zeros where removed), plus the
        constant-1 column when `c.intercept`: its bias change. Returns the bias action."""
        model = self.model
        Wn = self.work.setdefault(c.weight, np.array(model.consts[c.weight], np.float64))
        c.write_matrix(Wn, Mn[:, :c.d])
        if not c.intercept:
            return None
        delta = c.bias_delta(Mn[:, c.d]) * c.bias_scale
        g, groups = c.part if c.part is not None else (0, 1)
        rows = slice(g * c.n_out, (g + 1) * c.n_out)
        if c.bias is not None:
            orig = np.asarray(model.consts[c.bias], np.float64).reshape(-1)
            b = self.work.setdefault(c.bias, orig.reshape(model.consts[c.bias].shape).copy())
            b.reshape(-1)[rows] = orig[rows] + delta.reshape(-1)
            return "compensated"
        key = (c.node, c.bias_add)
        b = self.new_inputs.setdefault(key, np.zeros(c.n_out * groups))
        b[rows] = delta.reshape(-1)
        self.dtypes[key] = model.consts[c.weight].dtype
        self.dims[key] = (c.weight, c.out_axis)
        return "added"

    def updates(self, layers: list[dict] | None = None) -> Updates:
        consts = self.model.consts
        return Updates({n: a.astype(consts[n].dtype) for n, a in self.work.items()},
                       {k: a.astype(self.dtypes[k]) for k, a in self.new_inputs.items()},
                       dict(self.dims), list(layers or []))


def reconstruct(model, analysis, plan, consumers: list[Consumer],
                hessians: list[np.ndarray], *, damp: float = DAMP) -> Updates:
    """Least-squares updates of every consumer that loses input slices under `plan`, each
    on its own original inputs. `hessians[k]` belongs to `consumers[k]`: (d+1)² with the
    constant-1 entry last."""
    removed = analysis.removed_table(plan.removed(analysis))
    writer = Writer(model)
    layers = []
    for c, H in zip(consumers, hessians):
        mask = analysis.removed_mask((c.weight, c.in_axis), removed)
        if mask is None or not mask.any():
            continue
        gone = np.zeros(c.d + 1, bool)
        gone[c.h_index(np.nonzero(mask)[0])] = True
        use = c.d + 1 if c.intercept else c.d
        Hc = H[:use, :use]
        W = model.consts[c.weight]
        M = np.zeros((c.matrix(W).shape[0], use))
        M[:, :c.d] = c.matrix(W)
        keep = np.nonzero(~gone[:use])[0]
        energy = quad_error(M, Hc)
        sliced = M.copy()
        sliced[:, gone[:use]] = 0
        err_slice = quad_error(sliced - M, Hc)
        entry = {"node": c.node, "weight": c.weight, "removed_inputs": int(mask.sum()),
                 "inputs": int(len(mask)), "energy": energy,
                 "predicted_rel_error_sliced": float(np.sqrt(err_slice / energy))
                 if energy > 0 else 0.0}
        if c.shared:
            entry["updated"] = False
            entry["why"] = "weight shared with other nodes"
            entry["predicted_rel_error"] = entry["predicted_rel_error_sliced"]
            layers.append(entry)
            continue
        Mn = ls_update(M, Hc, keep, damp, c.d)
        err = quad_error(Mn - M, Hc)
        if err > err_slice:  # damping made it worse on the data: keep the plain slice
            Mn, err = sliced, err_slice
        entry.update({"updated": True, "predicted_rel_error":
                      float(np.sqrt(err / energy)) if energy > 0 else 0.0})
        bias = writer.write(c, Mn)
        if bias:
            entry["bias"] = bias
        layers.append(entry)
    return writer.updates(layers)
