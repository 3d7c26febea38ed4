"""The ONNX graph as a pure JAX function of its parameters and inputs.

`Engine.forward(params, feeds)` walks the graph in topological order and evaluates each node
with its implementation in `spa/engine/ops.py`. Trainable parameters and graph inputs are
JAX arrays (traced under `jit`, differentiated by `grad`); every other constant stays a
numpy array, so that shape subgraphs (Shape → Gather → Concat → Reshape …) are evaluated on
concrete values while tracing: input shapes are known at trace time, so every Reshape
target, Slice bound or Resize size is a Python int, and `jit` compiles once per input shape.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from ..errors import SpaError, UsageError
from ._jax import J, load
from .ops import IMPLS, _np_dtype, impl_key, is_float

OBJECTIVES = ("auto", "ce", "self", "mse", "kd")

# Operand positions that must be known at trace time (shapes, axes, sizes, conditions).
_RED = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
STATIC_OPERANDS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Split": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "Pad": (1, 3), "Resize": (1, 2, 3), "Upsample": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "TopK": (1,), "OneHot": (1,), "Trilu": (1,),
    "CumSum": (1,), "Dropout": (1, 2), "If": (0,), "Loop": (0, 1), "NonZero": (0,),
    "Compress": (1,), **{r: (1,) for r in _RED}}
# Float operands that are statistics or quantisation parameters, not weights.
NOT_WEIGHTS: dict[str, tuple[int, ...]] = {
    "BatchNormalization": (3, 4), "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2)}


def _as_model(model):
    from ..ir import model as ir

    if isinstance(model, ir.Model):
        m = model
    elif isinstance(model, onnx.ModelProto):
        m = ir.from_proto(model)
    elif isinstance(model, (str, os.PathLike)):
        m = ir.load(os.fspath(model))
    else:
        raise UsageError(f"Engine needs a spa.ir.Model, an onnx.ModelProto or a path, not "
                         f"{type(model).__name__}")
    if m.proto.functions:  # model-local functions: inline them (a copy; the input is kept)
        proto = onnx.inliner.inline_local_functions(m.proto)
        m = ir.from_proto(proto, path=m.path)
    return m


def _subgraphs(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode() for s in v]
        out[a.name] = v
    return out


class Ctx:
    """What an op implementation sees of its node and of the engine."""

    __slots__ = ("engine", "node", "attrs", "xp", "env")

    def __init__(self, engine, node, env):
        self.engine, self.node, self.env = engine, node, env
        self.attrs = engine._attrs_of(node)
        self.xp = None

    def attr(self, name, default=None):
        return self.attrs.get(name, default)

    @property
    def opset(self) -> int:
        return self.engine.opset

    @property
    def float_dtype(self):
        return self.engine.float_dtype

    def dtype(self, onnx_type: int):
        dt = _np_dtype(onnx_type)
        return self.engine.float_dtype if np.issubdtype(dt, np.floating) else dt

    def error(self, reason: str) -> SpaError:
        return self.engine.model.error(reason, self.node)

    def static(self, v, what: str) -> np.ndarray:
        if isinstance(v, np.ndarray):
            return v
        try:
            return np.asarray(v)
        except Exception:  # a tracer: the value depends on graph inputs or parameters
            raise self.error(f"the {what} operand is computed from runtime values (graph "
                             "inputs or trainable parameters); the gradient engine needs it "
                             "at trace time") from None

    def run_subgraph(self, graph, bind: dict) -> list:
        return self.engine._run_subgraph(graph, self.env, bind)


class Engine:
    """Evaluate an ONNX model in JAX with its weights as inputs.

    `trainable`: names of float initializers / Constant-node tensors that are parameters
    (default: every floating constant with ndim >= 1 that feeds the data path as a weight;
    not shape operands, BatchNormalization running statistics or quantisation parameters).
    `dtype`: the float type everything floating is computed in ("float32", or "float64"
    when JAX runs with `jax_enable_x64`).
    """

    def __init__(self, model, *, trainable=None, dtype="float32"):
        load()
        self.model = m = _as_model(model)
        self.path = m.path
        self.float_dtype = np.dtype(dtype)
        if not np.issubdtype(self.float_dtype, np.floating):
            raise UsageError(f"Engine dtype must be a float type, not {dtype!r}")
        self.opset = m.opset
        self.input_names: list[str] = list(m.input_names)
        self.output_names: list[str] = list(m.output_names)
        self._nodes = list(m.nodes)
        self._attr_cache: dict[int, dict] = {}
        for node in self._nodes:
            self._check_supported(node)
        consts = {k: self._to_float(v) for k, v in m.consts.items()}
        weights = self.default_trainable() if trainable is None else list(trainable)
        for name in weights:
            if name not in consts:
                raise UsageError(f"trainable tensor {name!r} is not an initializer or "
                                 f"Constant-node tensor of {self.path or 'the model'}")
            if not is_float(consts[name]):
                raise UsageError(f"trainable tensor {name!r} is not floating "
                                 f"({consts[name].dtype})")
        self.params: dict[str, np.ndarray] = {k: consts[k] for k in weights}
        self._consts = {k: v for k, v in consts.items() if k not in self.params}
        self._const_outputs = set(m.const_node)
        self._class = self._find_class_output()
        self._jit_forward = J.jax.jit(self.forward)
        self._cache: dict = {}

    # -- setup -------------------------------------------------------------------------
    def _to_float(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v)
        return v.astype(self.float_dtype) if is_float(v) and v.dtype != self.float_dtype else v

    def _attrs_of(self, node) -> dict:
        a = self._attr_cache.get(id(node))
        if a is None:
            a = self._attr_cache[id(node)] = _attrs(node)
        return a

    def _check_supported(self, node) -> None:
        if impl_key(node) not in IMPLS:
            dom = f" (domain {node.domain!r})" if node.domain not in ("", "ai.onnx") else ""
            raise self.model.error(f"the gradient engine (spa.engine) has no implementation "
                                   f"of op {node.op_type}{dom}", node)
        for g in _subgraphs(node):
            for n in g.node:
                self._check_supported(n)

    def static_operands(self) -> set[str]:
        """Tensors whose values must be known at trace time (shape operands and everything
        they are computed from, up to Shape/Size of runtime tensors)."""
        m = self.model
        need: set[str] = set()
        frontier = [n.input[k] for n in self._nodes
                    for k in STATIC_OPERANDS.get(n.op_type, ()) if k < len(n.input)
                    and n.input[k]]
        while frontier:
            t = frontier.pop()
            if t in need:
                continue
            need.add(t)
            p = m.producer.get(t)
            if p is not None and p.op_type not in ("Shape", "Size") and t not in m.consts:
                frontier.extend(i for i in p.input if i)
        return need

    def default_trainable(self) -> list[str]:
        m = self.model
        static = self.static_operands()
        out = []
        for name, v in m.consts.items():
            if not is_float(v) or np.ndim(v) < 1 or name in static:
                continue
            for node in m.consumers.get(name, []):
                pos = [k for k, i in enumerate(node.input) if i == name]
                skip = set(STATIC_OPERANDS.get(node.op_type, ())) | \
                    set(NOT_WEIGHTS.get(node.op_type, ()))
                if node.op_type not in ("Shape", "Size") and any(k not in skip for k in pos):
                    out.append(name)
                    break
                if not pos:  # read by a subgraph
                    out.append(name)
                    break
        return out

    # -- evaluation --------------------------------------------------------------------
    def forward(self, params, feeds: dict) -> list:
        """The model's outputs (JAX arrays, in `output_names` order) for `params` (name ->
        array; missing trainable parameters take their initial values) and `feeds`."""
        env = self._evaluate(params, feeds)
        return [J.jnp.asarray(env[o]) for o in self.output_names]

    def _evaluate(self, params, feeds: dict) -> dict:
        jnp = J.jnp
        env: dict = dict(self._consts)
        for k, v in self.params.items():
            env[k] = v
        for k, v in (params or {}).items():
            if k not in env:
                raise UsageError(f"parameter {k!r} is not a constant of "
                                 f"{self.path or 'the model'}")
            env[k] = jnp.asarray(v, dtype=self.float_dtype)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UsageError(f"missing graph input(s) {missing} (the model takes "
                             f"{self.input_names})")
        for n in self.input_names:
            v = feeds[n]
            dt = getattr(v, "dtype", None)
            if dt is not None and np.issubdtype(np.dtype(dt), np.floating):
                env[n] = jnp.asarray(v, dtype=self.float_dtype)
            else:
                env[n] = jnp.asarray(v)
        self._execute(self._nodes, env, top=True)
        return env

    def run(self, feeds: dict, params=None) -> list[np.ndarray]:
        """Jitted forward (compiled once per input shape); numpy outputs."""
        p = self.params if params is None else params
        outs = self._jit_forward(p, {n: feeds[n] for n in self.input_names
                                     if n in feeds} if isinstance(feeds, dict) else feeds)
        return [np.asarray(o) for o in outs]

    def _execute(self, nodes, env: dict, top: bool = False) -> None:
        jax = J.jax
        for node in nodes:
            if top and node.op_type == "Constant" and node.output[0] in env:
                continue
            impl = IMPLS[impl_key(node)]
            try:
                args = [env[i] if i else None for i in node.input]
            except KeyError as exc:
                raise self.model.error(f"input {exc.args[0]!r} is not available", node)
            while args and args[-1] is None:
                args.pop()
            c = Ctx(self, node, env)
            static = all(a is None or isinstance(a, np.ndarray) for a in args)
            try:
                if static and impl.numpy:
                    c.xp = np
                    outs = impl.fn(c, *args)
                elif static:
                    c.xp = J.jnp
                    with jax.ensure_compile_time_eval():
                        outs = impl.fn(c, *args)
                        outs = tuple(np.asarray(o) for o in
                                     (outs if isinstance(outs, tuple) else (outs,)))
                else:
                    c.xp = J.jnp
                    outs = impl.fn(c, *args)
            except SpaError:
                raise
            except Exception as exc:
                raise self.model.error(f"evaluating the node failed: {type(exc).__name__}: "
                                       f"{exc}", node) from exc
            if not isinstance(outs, tuple):
                outs = (outs,)
            for k, name in enumerate(node.output):
                if not name:
                    continue
                if k >= len(outs):
                    raise self.model.error(f"the engine does not compute output {k} "
                                           f"({name!r}) of this node", node)
                v = outs[k]
                if isinstance(v, (np.ndarray, np.generic, bool, int, float)):
                    v = np.asarray(v)
                if is_float(v) and v.dtype != self.float_dtype:
                    v = v.astype(self.float_dtype)
                env[name] = v

    def _run_subgraph(self, graph, outer: dict, bind: dict) -> list:
        env = dict(outer)
        for t in graph.initializer:
            env[t.name] = self._to_float(onnx.numpy_helper.to_array(t))
        env.update(bind)
        for node in graph.node:
            self._check_supported(node)
        self._execute(list(graph.node), env)
        return [env[o.name] for o in graph.output]

    # -- objectives --------------------------------------------------------------------
    def _find_class_output(self) -> tuple[int, str, bool]:
        """(index of the class output, tensor holding its logits, whether those are the
        input of a final Softmax): the first float graph output; when it is a Softmax over
        axis 1 (through Identity nodes), the logits are the Softmax's input."""
        m = self.model
        k = next((i for i, o in enumerate(self.output_names) if m.dtypes.get(o)
                  and np.issubdtype(_np_dtype(m.dtypes[o]), np.floating)), 0)
        name = self.output_names[k] if self.output_names else ""
        t = name
        while t in m.producer and m.producer[t].op_type in ("Identity",) and \
                t not in m.consts:
            t = m.producer[t].input[0]
        p = m.producer.get(t)
        if p is not None and p.op_type == "Softmax" and p.domain in ("", "ai.onnx"):
            rank = m.rank(t)
            axis = self._attrs_of(p).get("axis", 1 if self.opset < 13 else -1)
            if rank is not None and (axis if axis >= 0 else axis + rank) == 1 and \
                    (self.opset >= 13 or rank == 2):
                return k, p.input[0], True
        return k, name, False

    @property
    def class_output(self) -> int:
        """Index (in `output_names`) of the output the classification objectives use: the
        first float output."""
        return self._class[0]

    def resolve_objective(self, objective: str, labels, logits) -> str:
        """The objective "auto" stands for, given the class logits (or their shape)."""
        if objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {objective!r} (choose from "
                             f"{', '.join(OBJECTIVES)})")
        if objective != "auto":
            return objective
        classifier = len(getattr(logits, "shape", ())) == 2 and is_float(logits)
        if labels is not None and classifier:
            return "ce"
        return "self" if classifier else "mse"

    def logits(self, params, feeds):
        """The class logits: the class output, or the input of its final Softmax."""
        return J.jnp.asarray(self._evaluate(params, feeds)[self._class[1]])

    def _reference(self, reference, feeds):
        """Reference outputs and reference logits (stop-gradient)."""
        jax, jnp = J.jax, J.jnp
        sg = jax.lax.stop_gradient
        if reference is None:
            env = self._evaluate(self.params, feeds)
            return ([sg(jnp.asarray(env[o])) for o in self.output_names],
                    sg(jnp.asarray(env[self._class[1]])))
        if isinstance(reference, dict):
            reference = [reference[n] for n in self.output_names]
        elif not isinstance(reference, (list, tuple)):
            reference = [reference]
        ref = [sg(jnp.asarray(r)) for r in reference]
        if len(ref) != len(self.output_names):
            raise UsageError(f"reference has {len(ref)} outputs, the model "
                             f"{len(self.output_names)}")
        cls = ref[self._class[0]]
        # after a final Softmax the reference holds probabilities: their log is the logits
        # up to a per-row constant, which softmax and argmax ignore
        ref_logits = jnp.log(jnp.maximum(cls, jnp.finfo(cls.dtype).tiny)) if self._class[2] \
            else cls
        return ref, ref_logits

    def loss(self, params, feeds, labels=None, reference=None, objective="auto", *,
             temperature: float = 4.0):
        """A scalar loss of the outputs (pure, differentiable in `params`).

        The classification objectives use the class logits: the first float output, or the
        input of its final Softmax (so exported softmax classifiers get a true
        cross-entropy). ce: cross-entropy of the logits (class axis 1) to integer `labels`;
        self: cross-entropy to the argmax of the reference (the model's own predictions);
        kd: temperature² · KL(softmax(ref/T) ‖ softmax(logits/T)) over axis 1; mse: mean
        squared distance of every float output to the reference, summed over outputs. The
        reference defaults to the outputs of the initial parameters `self.params`. auto: ce
        with labels, else self for a classifier (logits of shape [N, C]), else mse.
        """
        jax, jnp = J.jax, J.jnp
        env = self._evaluate(params, feeds)
        logits = jnp.asarray(env[self._class[1]])
        obj = self.resolve_objective(objective, labels, logits)
        if obj in ("ce", "self", "kd") and not is_float(logits):
            raise UsageError(f"objective {obj!r} needs a float output (the model's outputs "
                             f"{self.output_names} have none)")
        if obj == "ce":
            if labels is None:
                raise UsageError("objective 'ce' needs labels")
            return _cross_entropy(logits, jnp.asarray(labels))
        ref, ref_logits = self._reference(reference, feeds)
        if obj == "self":
            return _cross_entropy(logits, jnp.argmax(ref_logits, axis=1))
        if obj == "kd":
            t = float(temperature)
            pt = jax.nn.softmax(ref_logits / t, axis=1)
            kl = jnp.sum(pt * (jax.nn.log_softmax(ref_logits / t, axis=1) -
                               jax.nn.log_softmax(logits / t, axis=1)), axis=1)
            return jnp.mean(kl) * t * t
        total = 0.0
        for name, r in zip(self.output_names, ref):
            o = env[name]
            if is_float(o):
                total = total + jnp.mean((jnp.asarray(o) - r) ** 2)
        return jnp.asarray(total, self.float_dtype)


def _cross_entropy(logits, labels):
    jax, jnp = J.jax, J.jnp
    logp = jax.nn.log_softmax(logits, axis=1)
    lab = jnp.expand_dims(labels.astype(jnp.int32), 1)
    if lab.ndim != logp.ndim:
        raise UsageError(f"labels of shape {tuple(labels.shape)} do not fit logits of shape "
                         f"{tuple(logits.shape)} (expected [N] for [N, C] logits)")
    return -jnp.mean(jnp.take_along_axis(logp, lab, axis=1))
