"""PyTorch: export an ``nn.Module`` to ONNX, and map an SPA plan back onto the module.

The way back works by *names*: both exporters name a parameter's initializer after the
parameter's ``state_dict`` key (``layers.0.conv1.0.weight``), as long as nothing rewrites
it. So ``export`` has two modes:

* ``keep_bn=True`` (the default; "map-back" mode) keeps every parameter and buffer as an
  initializer under its own name, in its own layout:

  - ``dynamo``: ``torch.onnx.export(dynamo=True, optimize=False)``, then our own pass list
    (``_optimize_keeping_parameters``): the onnxscript optimizer's passes *except* (1)
    BatchNorm→Conv fusion (it deletes the BN parameters and rewrites the conv weight under
    its old name), (2) initializer deduplication (two equal parameters -- e.g. the zero
    biases or unit BN scales of an untrained model -- would become one tensor: one name
    lost, and SPA would couple the two layers' channels), and (3) constant folding of any
    node that reads a parameter (e.g. ``Transpose(linear.weight)`` folded into an anonymous
    ``val_12``). Zero biases that the exporter *invents* for bias-free convs are still
    removed (torch 2.13 emits them with a wrong shape for Conv3d), a zero bias that is a
    real parameter is kept.
  - ``legacy``: ``torch.onnx.export(dynamo=False, do_constant_folding=False)``. With
    constant folding on, the TorchScript exporter fuses BN into the conv (eval mode) and
    folds ``Transpose(W)`` of 3-D Linear layers into new ``onnx::MatMul_*`` initializers.

* ``keep_bn=False`` is the deployment export (``models/export.py`` uses it for the zoo):
  dynamo with ``optimize=True`` / legacy with ``do_constant_folding=True`` -- BN folded,
  smaller graphs, but the plan can no longer be mapped back (``apply_plan`` says so).

``apply_plan(module, onnx_model, plan)`` shrinks the module in place: every parameter and
buffer is sliced along the axes the plan prunes in its initializer, and the module
attributes that describe widths (``out_channels``, ``groups``, ``in_features``,
``num_features``, ``normalized_shape``, ``embed_dim``, ``num_heads`` …) follow. See
docs/frameworks.md for what maps back and what does not.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from spa.errors import SpaError, UsageError

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "legacy")


class MapBackError(SpaError):
    """A plan cannot be carried over to the torch module (names which and why)."""


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_loggers():
    """Silence the exporter's INFO/WARNING log lines (e.g. "torchvision is not installed")."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                               "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _input_names(example_inputs: Sequence) -> list[str]:
    import torch

    names = []
    for i, x in enumerate(example_inputs):
        base = "input_ids" if not torch.is_floating_point(x) else "input"
        names.append(base if i == 0 else f"{base}_{i}")
    return names


def _optimize_keeping_parameters(model) -> None:
    """The onnxscript optimizer (what ``optimize=True`` runs), minus every step that renames,
    merges or rewrites a parameter. Works on the exporter's onnx_ir model, in place."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter.rules.common import _fuse_batchnorm, _remove_optional_bias

    params = set(model.graph.initializers)

    def should_fold(node):
        # never fold a node that reads a parameter: its output would replace it unnamed
        if any(v is not None and v.name in params and v.is_initializer() for v in node.inputs):
            return False
        return None

    class _KeepParameterBias:
        """Remove a zero bias only when the exporter invented it (not a parameter)."""

        def check(self, context, b, **kw):
            if b is not None and b.name in params:
                from onnxscript.rewriter._basics import MatchResult
                return MatchResult().fail("the bias is a parameter of the module")
            return super().check(context, b, **kw)

    bias_rules = [type(f"Keep{cls.__name__}", (_KeepParameterBias, cls), {})().rule()
                  for cls in (_remove_optional_bias.RemoveOptionalBiasFromConv,
                              _remove_optional_bias.RemoveOptionalBiasFromConvTranspose,
                              _remove_optional_bias.RemoveOptionalBiasFromGemm)]
    dropped = set(_fuse_batchnorm.rules.rules) | set(_remove_optional_bias.rules.rules)
    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if r not in dropped] + bias_rules
    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [_constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                should_fold=should_fold),
             rewriter.RewritePass(rules),
             common.RemoveUnusedNodesPass(),
             common.RemoveUnusedFunctionsPass(),
             common.RemoveUnusedOpsetsPass()],
            steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)


def export(module, example_inputs, path, exporter: str = "dynamo", opset: int = DEFAULT_OPSET,
           dynamic_batch: bool = True, keep_bn: bool = True) -> Path:
    """Export `module` to ONNX at `path` and return the path.

    `keep_bn=True` keeps every parameter under its state_dict name (BN not fused, nothing
    folded into a parameter) so that ``apply_plan`` can map a plan back; `keep_bn=False`
    is the smaller deployment export (BN folded). See the module docstring for the exact
    exporter settings and why.

    Inputs are named "input" ("input_ids" for integer inputs; "_1", "_2" … for further
    inputs), the output "output". With `dynamic_batch`, axis 0 of every input and of the
    output is symbolic ("batch"); give an example batch of at least 2 -- torch.export
    specialises dimensions of size 1. Opset 18 is the dynamo exporter's own opset (no
    version conversion) and fully supported by the legacy one. The file is written to a
    temporary name next to `path` and renamed: a failed export leaves nothing behind.
    The module is exported in eval mode and left in the mode it was in.
    """
    import torch

    if exporter not in EXPORTERS:
        raise UsageError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = _input_names(example_inputs)
    was_training = module.training
    module.eval()

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # Exporters are chatty (progress lines, deprecation warnings): keep the caller's
        # output clean; real failures raise.
        # No torch.no_grad(): under no_grad, eval-mode nn.MultiheadAttention takes its
        # fused fast path (aten::_native_multi_head_attention), which the legacy exporter
        # cannot export.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                _quiet_loggers():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dynamic_shapes = None
                if dynamic_batch:
                    batch = torch.export.Dim("batch")
                    dynamic_shapes = tuple({0: batch} for _ in example_inputs)
                program = torch.onnx.export(
                    module, example_inputs, dynamo=True, optimize=not keep_bn,
                    opset_version=opset, input_names=input_names, output_names=["output"],
                    dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
                if keep_bn:
                    _optimize_keeping_parameters(program.model)
                program.save(tmp, external_data=False)
            else:
                dynamic_axes = None
                if dynamic_batch:
                    dynamic_axes = {n: {0: "batch"} for n in [*input_names, "output"]}
                torch.onnx.export(
                    module, example_inputs, tmp, dynamo=False,
                    do_constant_folding=not keep_bn, opset_version=opset,
                    input_names=input_names, output_names=["output"],
                    dynamic_axes=dynamic_axes, verbose=False)
        os.replace(tmp, path)
    finally:
        module.train(was_training)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_fingerprint() -> str:
    """A hash of everything an export depends on besides the module: the export code in
    this file and the exporter versions. Caches of exported files compare it (an edit to
    the map-back code below does not invalidate them; one to the export settings does)."""
    import ast
    import hashlib
    import inspect
    import textwrap
    from importlib import metadata

    h = hashlib.sha256()
    for fn in (export, _optimize_keeping_parameters, _input_names):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
        if ast.get_docstring(tree) is not None:
            tree.body = tree.body[1:]       # code only: comments and docstrings may change
        h.update(ast.dump(tree).encode())
    for dist in ("torch", "onnxscript", "onnx-ir", "onnx"):
        try:
            h.update(f"{dist}=={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} missing".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- CLI helpers


def load_factory(spec: str):
    """``"pkg.module:fn"`` → the callable ``fn`` (a class or a function returning a module)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"expected 'package.module:factory', got {spec!r}")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {mod_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise UsageError(f"{spec!r} is not callable")
    return obj


def load_module(spec: str, state_dict: str | None = None):
    """Build the module from a factory spec and optionally load a state dict file
    (``torch.load(weights_only=True)``: plain tensors only, no pickled code)."""
    import torch

    module = load_factory(spec)()
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"{spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    if state_dict:
        try:
            sd = torch.load(state_dict, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UsageError("state dict file not found", file=state_dict) from None
        except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
            raise SpaError(f"cannot load the state dict ({type(exc).__name__}: {exc})",
                           file=state_dict) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        try:
            module.load_state_dict(sd)
        except (RuntimeError, TypeError) as exc:
            raise SpaError(f"state dict does not fit {spec}: {exc}", file=state_dict) from None
    return module.eval()


_DTYPES = ("float32", "float16", "float64", "int64", "int32")


def parse_input_shape(text: str) -> list[tuple[tuple[int, ...], str]]:
    """``"1x3x32x32"`` → [((1, 3, 32, 32), "float32")]. Several inputs are separated by
    commas; a ``:dtype`` suffix sets the dtype (``"1x16:int64"`` for token ids)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        shape, _, dtype = part.partition(":")
        dtype = dtype or "float32"
        if dtype not in _DTYPES:
            raise UsageError(f"--input-shape: unknown dtype {dtype!r} (one of {_DTYPES})")
        try:
            dims = tuple(int(d) for d in shape.lower().split("x"))
        except ValueError:
            raise UsageError(f"--input-shape: expected e.g. 1x3x32x32, got {part!r}") from None
        if not dims or any(d < 1 for d in dims):
            raise UsageError(f"--input-shape: dimensions must be >= 1, got {part!r}")
        out.append((dims, dtype))
    return out


def example_inputs(shapes, dynamic_batch: bool = True, seed: int = 0, int_high: int = 2):
    """Seeded random tensors for `parse_input_shape`'s result. With a dynamic batch, a
    batch of 1 is traced as 2 (torch.export would otherwise specialise it). Integer inputs
    are drawn from [0, int_high) (token ids that every vocabulary has)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xs = []
    for dims, dtype in shapes:
        if dynamic_batch and dims[0] == 1:
            dims = (2, *dims[1:])
        dt = getattr(torch, dtype)
        if dt.is_floating_point:
            xs.append(torch.randn(dims, generator=g).to(dt))
        else:
            xs.append(torch.randint(0, int_high, dims, generator=g, dtype=dt))
    return tuple(xs)


def convert(factory: str, input_shape: str, output: str, *, state_dict: str | None = None,
            exporter: str = "dynamo", opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
            keep_bn: bool = True) -> Path:
    """What ``spa convert torch`` does."""
    module = load_module(factory, state_dict)
    xs = example_inputs(parse_input_shape(input_shape), dynamic_batch)
    return export(module, xs, output, exporter=exporter, opset=opset,
                  dynamic_batch=dynamic_batch, keep_bn=keep_bn)


def cli_main(args) -> Path:
    """``spa convert torch`` (arguments parsed by spa.cli)."""
    return convert(args.factory, args.input_shape, args.output, state_dict=args.state_dict,
                   exporter=args.exporter, opset=args.opset, keep_bn=not args.fold_bn)


# --------------------------------------------------------------------------- map-back

# head counts (changed by head pruning) and per-head sizes (never: SPA removes whole heads)
_HEAD_COUNT = re.compile(r"(^|_)(heads?|nheads?|n_?kv|num_?kv|kv_?heads?|n_?head)$")
_PER_HEAD = re.compile(r"head_?(dim|size|width)|d_?head|dim_?head|(^|_)d_[kv]$|n_?rep$|"
                       r"kv_?groups|key_value_groups")


class _Tensor:
    """One parameter or buffer of the module (tied aliases share one entry)."""

    def __init__(self, name, owner, attr, tensor, is_param):
        self.names = [name]
        self.refs = [(owner, attr)]
        self.tensor, self.is_param = tensor, is_param
        self.old_shape = tuple(tensor.shape)
        self.onnx_name: str | None = None
        self.kept: dict[int, np.ndarray] = {}


def _module_tensors(module) -> dict[int, _Tensor]:
    """Every parameter and buffer (persistent or not), keyed by tensor identity."""
    table: dict[int, _Tensor] = {}
    for mname, m in module.named_modules(remove_duplicate=False):
        for kind, store in (("param", m._parameters), ("buffer", m._buffers)):
            for attr, t in store.items():
                if t is None:
                    continue
                full = f"{mname}.{attr}" if mname else attr
                e = table.get(id(t))
                if e is None:
                    table[id(t)] = _Tensor(full, m, attr, t, kind == "param")
                elif full not in e.names:
                    e.names.append(full)
                    e.refs.append((m, attr))
    return table


from converters._common import as_model as _as_model  # noqa: E402
from converters._common import as_plan as _as_plan  # noqa: E402


def apply_plan(module, model, plan, *, example_inputs=None, rtol: float = 1e-5,
               attributes: dict | None = None) -> dict:
    """Shrink `module` in place to match `plan`, a plan SPA made on `model` -- the ONNX
    file (path or ``spa.load``-ed Model) exported from this module by ``export(...,
    keep_bn=True)``. `plan` is a ``spa.Plan``, its JSON dict or a plan file.

    Parameters keep their identity (``p.data`` is replaced; tied weights stay tied; their
    ``.grad`` is cleared), so build the optimizer *after* calling this. Returns a report:
    ``{"tensors": {name: [old_shape, new_shape]}, "attributes": {"module.attr": [old,
    new]}, "ignored_constants": [...], "unused": [...]}``.

    With `example_inputs` (a tensor or a tuple, as the module's forward takes them), the
    shrunk module is also run on them and compared with SPA's pruned graph in ONNX Runtime
    (max |difference| <= `rtol` * max |output|). This catches what no parameter shape can
    show: forward code that fixes a width the plan changes (``x.reshape(b, n, d)`` with ``d``
    read from the input, ``chunk(2)`` where the plan cut two halves unequally).

    `attributes` sets module attributes by qualified name (``{"b2.c": 8}``; None leaves one
    unchanged) where the inference below would guess wrong or give up.

    Raises MapBackError naming the parameter or module when something cannot be carried
    over: a pruned initializer that is no parameter while some parameter is missing from
    the graph (the exporter folded or renamed it), a BatchNorm that was fused, shapes that
    disagree, a width attribute that cannot be inferred, or (with `example_inputs`) outputs
    that differ. On any error the module is left exactly as it was.
    """
    import torch

    from spa.analysis import analyze
    from spa.rewrite.apply import apply_plan as rewrite

    model = _as_model(model)
    plan = _as_plan(plan)
    source = model.path
    analysis = analyze(model)
    plan.validate(analysis, source=source)
    kept = plan.kept_indices(analysis)
    pruned = rewrite(model, analysis, plan)

    table = _module_tensors(module)
    by_name = {n: e for e in table.values() for n in e.names}
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    pruned_shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}

    # 1. initializers -> module tensors, by name
    problems: list[str] = []
    unmapped_pruned: list[str] = []
    ignored: list[str] = []
    for name, shape in inits.items():
        axes = {ax: kept[(name, ax)] for ax in range(len(shape)) if (name, ax) in kept}
        e = by_name.get(name)
        if e is None:
            if axes:
                arr = model.consts.get(name)
                if arr is not None and np.issubdtype(arr.dtype, np.floating):
                    unmapped_pruned.append(name)
                else:
                    ignored.append(name)
            continue
        if e.onnx_name is not None and e.onnx_name != name:
            problems.append(f"{name}: the same tensor as initializer {e.onnx_name!r}, "
                            "but the graph has both")
            continue
        e.onnx_name = name
        if tuple(shape) != e.old_shape:
            problems.append(f"{name}: shape {list(e.old_shape)} in the module but "
                            f"{list(shape)} in the ONNX graph (a different model, or an "
                            "exporter that changed its layout)")
            continue
        e.kept = axes
    if not any(e.onnx_name for e in table.values()):
        raise MapBackError("no initializer of the ONNX graph is named after a parameter or "
                           "buffer of this module: was it exported from this module with "
                           "converters.torch.export(..., keep_bn=True)?", file=source)
    # Exporters merge parameters with equal values into one initializer (the legacy one
    # does, e.g. the zero in_proj_bias of every nn.MultiheadAttention): a parameter missing
    # under its own name that equals a kept initializer is read through that initializer,
    # and SPA has coupled every reader of it, so it loses the same indices.
    for e in table.values():
        if e.onnx_name is not None or not e.old_shape:
            continue
        value = e.tensor.detach().cpu().numpy()
        same = [n for n, s in inits.items() if s == e.old_shape and n in model.consts
                and model.consts[n].dtype == value.dtype
                and np.array_equal(model.consts[n], value)]
        cuts = {tuple((ax, tuple(kept[(n, ax)])) for ax in range(len(e.old_shape))
                      if (n, ax) in kept) for n in same}
        if len(cuts) > 1:
            problems.append(f"{e.names[0]}: not in the graph under its own name, and equal "
                            f"to several initializers that lose different indices "
                            f"({', '.join(same[:4])})")
        elif same:
            e.onnx_name = same[0]
            e.kept = {ax: np.asarray(idx) for ax, idx in cuts.pop()}
    missing = [e for e in table.values() if e.onnx_name is None and e.old_shape]
    bn_missing = [e for e in missing if isinstance(e.refs[0][0],
                                                   torch.nn.modules.batchnorm._BatchNorm)
                  and e.refs[0][1] in ("weight", "bias", "running_mean", "running_var")]
    if bn_missing:
        problems.append(
            "BatchNorm parameters are not in the ONNX graph (fused into the preceding conv "
            "by the exporter; export with converters.torch.export(..., keep_bn=True)): "
            + ", ".join(e.names[0] for e in bn_missing[:8])
            + (f" (+{len(bn_missing) - 8})" if len(bn_missing) > 8 else ""))
    if unmapped_pruned and missing:
        problems.append(
            "the plan prunes initializers that are no parameter of the module: "
            + ", ".join(unmapped_pruned[:8])
            + (f" (+{len(unmapped_pruned) - 8})" if len(unmapped_pruned) > 8 else "")
            + "; and these parameters are not in the graph under their own names: "
            + ", ".join(e.names[0] for e in missing[:8])
            + (f" (+{len(missing) - 8})" if len(missing) > 8 else "")
            + " -- the exporter folded or renamed them (export with "
            "converters.torch.export(..., keep_bn=True))")
    if problems:
        raise MapBackError("cannot map the plan back onto the module:\n  "
                           + "\n  ".join(problems), file=source)

    # 2. slice, 3. width attributes -- undone if anything fails, so that an error leaves
    # the module as it was
    report = {"tensors": {}, "attributes": {}, "ignored_constants": sorted(unmapped_pruned
                                                                           + ignored),
              "unused": sorted(n for e in missing for n in e.names)}
    undo: list = []
    try:
        _slice(table, pruned_shapes, source, report, undo)
        _Attrs(module, table, analysis, pruned, source, report, undo, attributes).update()
        if example_inputs is not None:
            _check_outputs(module, pruned, example_inputs, rtol, source)
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    return report


def _slice(table, pruned_shapes, source, report, undo) -> None:
    import torch

    with torch.no_grad():
        for e in table.values():
            if not e.kept:
                continue
            t = e.tensor.detach()
            for ax, idx in sorted(e.kept.items()):
                t = t.index_select(ax, torch.as_tensor(idx, dtype=torch.long,
                                                       device=t.device))
            t = t.contiguous()
            new = tuple(t.shape)
            if e.onnx_name in pruned_shapes and pruned_shapes[e.onnx_name] != new:
                raise MapBackError(f"{e.names[0]}: sliced to {list(new)} but SPA's pruned "
                                   f"graph has {list(pruned_shapes[e.onnx_name])}",
                                   file=source)
            if e.is_param:
                p, data, grad = e.tensor, e.tensor.data, e.tensor.grad
                undo.append(lambda p=p, data=data, grad=grad: (setattr(p, "data", data),
                                                               setattr(p, "grad", grad)))
                p.data = t
                p.grad = None
            else:
                old = e.tensor
                for owner, attr in e.refs:
                    undo.append(lambda o=owner, a=attr, v=old: o._buffers.__setitem__(a, v))
                    owner._buffers[attr] = t
                undo.append(lambda e=e, v=old: setattr(e, "tensor", v))
                e.tensor = t
            for n in e.names:
                report["tensors"][n] = [list(e.old_shape), list(new)]


def _flat_outputs(y) -> list:
    import torch

    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _flat_outputs(v)]
    return []


def _check_outputs(module, pruned, example_inputs, rtol, source) -> None:
    """Run the shrunk module and SPA's pruned graph (ONNX Runtime) on the same inputs."""
    import onnxruntime as ort
    import torch

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ys = [y.detach().cpu().numpy() for y in _flat_outputs(module(*example_inputs))]
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported
        raise MapBackError(
            f"the shrunk module's forward fails ({type(exc).__name__}: {exc}). Its code "
            "probably fixes a width that the plan changes -- e.g. it reshapes to a width read "
            "from an input shape, or splits with chunk(), which always cuts equal parts",
            file=source) from exc
    finally:
        module.train(was_training)
    sess = ort.InferenceSession(pruned.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, example_inputs)}
    outs = sess.run(None, feeds)
    if len(outs) != len(ys):
        raise MapBackError(f"the module returns {len(ys)} tensors, the graph {len(outs)}",
                           file=source)
    for k, (a, b) in enumerate(zip(ys, outs)):
        if a.shape != b.shape:
            raise MapBackError(f"output {k}: shape {list(a.shape)} from the shrunk module, "
                               f"{list(b.shape)} from SPA's pruned graph", file=source)
        scale = float(np.nanmax(np.abs(b))) if b.size else 0.0
        err = float(np.nanmax(np.abs(a - b))) / max(scale, 1e-30) if b.size else 0.0
        if not err <= rtol:
            raise MapBackError(f"output {k}: the shrunk module differs from SPA's pruned graph "
                               f"by {err:.3g} (relative to max |output|; allowed {rtol:g})",
                               file=source)


class _Attrs:
    """Bring module attributes in line with the new parameter shapes."""

    def __init__(self, module, table, analysis, pruned, source, report, undo, overrides):
        self.module, self.table, self.analysis = module, table, analysis
        self.source, self.report, self.undo = source, report, undo
        self.overrides = dict(overrides or {})
        self.used: set[str] = set()
        self.groups_attr: dict[str, int] = {}
        for n in pruned.graph.node:
            if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1:
                g = next((a.i for a in n.attribute if a.name == "group"), 1)
                self.groups_attr[n.input[1]] = g
        self.own: dict[int, list[_Tensor]] = {}
        for e in table.values():
            for owner, attr in e.refs:
                self.own.setdefault(id(owner), []).append((attr, e))

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _key(mname, attr):
        return f"{mname}.{attr}" if mname else attr

    def _set(self, mname, m, attr, value):
        key = self._key(mname, attr)
        if key in self.overrides:          # the caller knows better
            self.used.add(key)
            value = self.overrides[key]
            if value is None:
                return
        old = getattr(m, attr)
        if old != value:
            self.undo.append(lambda: setattr(m, attr, old))
            setattr(m, attr, value)
            self.report["attributes"][key] = [old, value]

    def _fail(self, mname, m, why):
        raise MapBackError(f"module {mname or '<root>'!r} ({type(m).__name__}): {why}",
                           file=self.source)

    def _cannot_infer(self, mname, m, attr, v, why):
        self._fail(mname, m, f"cannot infer the new value of the integer attribute {attr!r} "
                   f"(was {v}): {why}. If the attribute is not a width, or you know its "
                   f"value, pass attributes={{{self._key(mname, attr)!r}: <value or None "
                   "to leave it>}} to apply_plan")

    def _apply_remaining_overrides(self):
        for key, value in self.overrides.items():
            if key in self.used:
                continue
            mname, _, attr = key.rpartition(".")
            try:
                m = self.module.get_submodule(mname)
            except AttributeError:
                m = None
            if m is None or not hasattr(m, attr):
                raise MapBackError(f"attributes: the module has no attribute {key!r}",
                                   file=self.source)
            if value is not None:
                self._set(mname, m, attr, value)

    def _tensor(self, m, attr):
        for a, e in self.own.get(id(m), ()):
            if a == attr:
                return e
        return None

    def _shape(self, m, attr):
        e = self._tensor(m, attr)
        return tuple(e.tensor.shape) if e is not None else None

    # -- known layers ----------------------------------------------------------------------
    def update(self):
        from torch import nn

        for mname, m in self.module.named_modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                self._conv(mname, m)
            elif isinstance(m, nn.Linear):
                w = self._shape(m, "weight")
                if w is None:
                    continue
                self._set(mname, m, "out_features", w[0])
                self._set(mname, m, "in_features", w[1])
            elif isinstance(m, nn.Bilinear):
                if self._changed(m):
                    self._fail(mname, m, "nn.Bilinear is not supported by the map-back")
            elif isinstance(m, (nn.modules.batchnorm._NormBase)):   # BatchNorm, InstanceNorm
                s = self._shape(m, "weight") or self._shape(m, "running_mean")
                if s is not None:
                    self._set(mname, m, "num_features", s[0])
            elif isinstance(m, nn.LayerNorm):
                s = self._shape(m, "weight")
                if s is not None:
                    self._set(mname, m, "normalized_shape", tuple(s))
            elif isinstance(m, nn.GroupNorm):
                self._group_norm(mname, m)
            elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                w = self._shape(m, "weight")
                if w is not None:
                    self._set(mname, m, "num_embeddings", w[0])
                    self._set(mname, m, "embedding_dim", w[1])
            elif isinstance(m, nn.PReLU):
                w = self._shape(m, "weight")
                if w is not None:
                    self._set(mname, m, "num_parameters", w[0])
            elif isinstance(m, nn.MultiheadAttention):
                self._mha(mname, m)
            elif isinstance(m, nn.RNNBase):
                if self._changed(m):
                    self._fail(mname, m, "recurrent layers are not supported by the map-back")
            elif type(m).__module__.startswith("torch.nn."):
                continue  # parameter-free torch layers (activations, pools, containers)
            else:
                self._custom(mname, m)
        self._apply_remaining_overrides()

    def _changed(self, m, recurse=False):
        mods = m.modules() if recurse else [m]
        return any(e.kept for mm in mods for _, e in self.own.get(id(mm), ()))

    def _conv(self, mname, m):
        e = self._tensor(m, "weight")
        if e is None or not self._changed(m):
            return
        w = tuple(e.tensor.shape)
        groups = self.groups_attr.get(e.onnx_name)
        if groups is None:
            self._fail(mname, m, "its weight feeds no Conv/ConvTranspose node of the ONNX "
                       "graph, so the new number of groups is unknown")
        if m.transposed:   # weight [in, out / groups, *k]
            in_ch, out_ch = w[0], w[1] * groups
        else:              # weight [out, in / groups, *k]
            in_ch, out_ch = w[1] * groups, w[0]
        if in_ch % groups or out_ch % groups:
            self._fail(mname, m, f"{in_ch} in / {out_ch} out channels do not divide into "
                       f"{groups} groups")
        self._set(mname, m, "in_channels", in_ch)
        self._set(mname, m, "out_channels", out_ch)
        self._set(mname, m, "groups", groups)

    def _group_norm(self, mname, m):
        e = self._tensor(m, "weight")
        if e is None or not e.kept:
            if self._changed(m):
                self._fail(mname, m, "GroupNorm without affine parameters: its new width is "
                           "unknown")
            return
        old_c, new_c = e.old_shape[0], e.tensor.shape[0]
        if self._is_heads(e.onnx_name, 0):    # whole groups went: groups keep their size
            per = old_c // m.num_groups
            groups = new_c // per
        else:                                 # every group lost the same channels
            groups = m.num_groups
        if groups < 1 or new_c % groups:
            self._fail(mname, m, f"{new_c} channels left do not divide into groups "
                       f"(num_groups was {m.num_groups})")
        self._set(mname, m, "num_groups", groups)
        self._set(mname, m, "num_channels", new_c)

    def _mha(self, mname, m):
        if not self._changed(m, recurse=True):
            return
        out_w = self._shape(m.out_proj, "weight")        # [E, E]
        if m._qkv_same_embed_dim:
            w = self._shape(m, "in_proj_weight")         # [3E, E]
            e_q, e_in = w[0] // 3, w[1]
            kdim = vdim = e_in
        else:
            q, k, v = (self._shape(m, f"{p}_proj_weight") for p in "qkv")
            e_q, e_in, kdim, vdim = q[0], q[1], k[1], v[1]
            if k[0] != e_q or v[0] != e_q:
                self._fail(mname, m, "q/k/v projections lost different numbers of rows")
        if not (e_q == e_in == out_w[0] == out_w[1]):
            self._fail(mname, m, "nn.MultiheadAttention needs its input width, its attention "
                       f"width and its output width to be equal (embed_dim), but the plan "
                       f"leaves input {e_in}, attention {e_q}, output {out_w[0]}: prune its "
                       "heads and the residual stream together, or not at all, or write the "
                       "attention with separate Linear layers")
        if e_q % m.head_dim:
            self._fail(mname, m, f"{e_q} attention features are not whole heads of "
                       f"{m.head_dim}")
        self._set(mname, m, "embed_dim", e_q)
        self._set(mname, m, "kdim", kdim)
        self._set(mname, m, "vdim", vdim)
        self._set(mname, m, "num_heads", e_q // m.head_dim)

    # -- hand-written modules -------------------------------------------------------------
    def _axes_in_subtree(self, m):
        """(old length, new length, in a heads group) for every parameter axis below m."""
        out = []
        seen = set()
        for mm in m.modules():
            for _, e in self.own.get(id(mm), ()):
                if id(e) in seen or e.onnx_name is None:
                    continue
                seen.add(id(e))
                new = tuple(e.tensor.shape)
                for ax, (a, b) in enumerate(zip(e.old_shape, new)):
                    out.append((a, b, self._is_heads(e.onnx_name, ax)))
        return out

    def _is_heads(self, name, ax) -> bool:
        ana = self.analysis
        ch = ana.dim_channels((name, ax))
        if ch is None:
            return False
        valid = ch[ch >= 0]
        gs = set(ana.group_of_chan[valid].tolist()) if len(valid) else set()
        several = np.nonzero(ch == -2)[0]    # derived from several channels
        if len(several):
            c = ana.coupler
            d = c.dims[(name, ax)]
            for cl in set(ana.label[c.base[d] + several].tolist()):
                gs.update(int(ana.group_of_chan[x]) for x in ana.multi[int(cl)])
        return any(ana.groups[g].kind == "heads" for g in gs)

    def _custom(self, mname, m):
        ints = {k: v for k, v in vars(m).items()
                if type(v) is int and not k.startswith("_")}
        if not ints or not self._changed(m, recurse=True):
            return
        axes = self._axes_in_subtree(m)
        changed = [(a, b, h) for a, b, h in axes if a != b]
        for attr, v in ints.items():
            if self._key(mname, attr) in self.overrides:
                self._set(mname, m, attr, v)
                continue
            if v <= 1 or _PER_HEAD.search(attr):
                continue   # SPA removes whole heads: per-head sizes and repeats stay
            if _HEAD_COUNT.search(attr):
                cands = {v * b // a for a, b, h in changed if h and a % v == 0
                         and (v * b) % a == 0}
                bad = [(a, b) for a, b, h in changed if h and a % v == 0 and (v * b) % a]
                if bad or len(cands) > 1:
                    self._cannot_infer(mname, m, attr, v,
                                       f"the heads below it shrink inconsistently "
                                       f"({sorted(cands)}{', ' if bad else ''}"
                                       f"{', '.join(f'{a}->{b}' for a, b in bad)})")
                if cands:
                    self._set(mname, m, attr, cands.pop())
                continue
            cands = {b for a, b, h in axes if a == v}
            if len(cands) > 1:
                self._cannot_infer(mname, m, attr, v, f"axes of length {v} below it now have "
                                   f"lengths {sorted(cands)}")
            if cands:
                self._set(mname, m, attr, cands.pop())
