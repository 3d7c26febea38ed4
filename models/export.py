"""Export torch modules (and the whole torch zoo) to ONNX, atomically and with caching.

Two exporters, both from torch 2.13:

* ``dynamo`` — ``torch.onnx.export(..., dynamo=True, optimize=True)``: torch.export +
  onnxscript. Its native opset is 18; asking for another opset makes it run the
  onnxscript version converter afterwards, which is the part that goes wrong (see below).
* ``legacy`` — ``torch.onnx.export(..., dynamo=False, do_constant_folding=True)``: the
  TorchScript tracer, with symbolic functions up to opset 20.

Default opset 18 for both (checked on the whole zoo with torch 2.13 / onnxscript 0.7.2 /
onnxruntime 1.31): it is the dynamo exporter's native opset (no version conversion), the
legacy exporter supports it fully, it has LayerNormalization (17) and the ReduceMean-with-
axes-input form (18), and every ONNX Runtime we care about runs it. docs/zoo.md has the
per-opset results.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "legacy")


@contextlib.contextmanager
def _quiet_loggers():
    """Silence the exporter's INFO/WARNING log lines (e.g. "torchvision is not installed")."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                               "onnxscript")]
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


def export_torch(module, example_inputs, path, exporter: str = "dynamo",
                 opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> Path:
    """Export `module` to ONNX at `path` and return the path.

    Inputs are named "input" ("input_ids" for integer inputs; "_1", "_2" … suffixes for
    further inputs), the output "output". With `dynamic_batch`, axis 0 of every input and
    of the output is symbolic ("batch"); use an example batch of at least 2 — torch.export
    specialises dimensions of size 1. The file is written to a temporary name in the same
    directory and renamed, so a failed export leaves no partial file behind.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = _input_names(example_inputs)
    module = module.eval()

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
                    module, example_inputs, dynamo=True, optimize=True,
                    opset_version=opset, input_names=input_names, output_names=["output"],
                    dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
                program.save(tmp, external_data=False)
            else:
                dynamic_axes = None
                if dynamic_batch:
                    dynamic_axes = {n: {0: "batch"} for n in [*input_names, "output"]}
                torch.onnx.export(
                    module, example_inputs, tmp, dynamo=False, do_constant_folding=True,
                    opset_version=opset, input_names=input_names, output_names=["output"],
                    dynamic_axes=dynamic_axes, verbose=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _zoo_source_mtime() -> float:
    """Newest modification time of the files an exported zoo model depends on."""
    import models.registry as reg
    import models.torch_zoo as tz

    return max(os.path.getmtime(f) for f in (tz.__file__, reg.__file__, __file__))


def export_zoo_entry(name: str, outdir=None, exporter: str = "dynamo",
                     opset: int = DEFAULT_OPSET, force: bool = False) -> Path:
    """Export one zoo model to `outdir/<name>.<exporter>.onnx` (`….opset<N>.onnx` for a
    non-default opset), unless a cached file is newer than models/torch_zoo.py,
    models/registry.py and this file (the exported model is a pure function of them)."""
    from models.registry import default_cache_dir
    from models.torch_zoo import ZOO

    entry = ZOO[name]
    path = entry.spec.onnx_path(exporter, Path(outdir) if outdir else default_cache_dir())
    if opset != DEFAULT_OPSET:
        path = path.with_name(f"{name}.{exporter}.opset{opset}.onnx")
    if not force and path.is_file() and path.stat().st_mtime > _zoo_source_mtime():
        return path
    model = entry.factory()
    return export_torch(model, entry.example_inputs(batch=2), path, exporter=exporter,
                        opset=opset, dynamic_batch=True)


def export_zoo(outdir=None, exporter: str = "dynamo", opset: int = DEFAULT_OPSET,
               names: Sequence[str] | None = None, force: bool = False,
               on_error=None) -> dict[str, Path]:
    """Export every zoo entry (or `names`) with `exporter`; returns {name: path}.

    A model that fails to export raises, unless `on_error(name, exc)` is given, in which
    case the model is reported there and left out of the result.
    """
    from models.torch_zoo import ZOO

    paths = {}
    for name in names or list(ZOO):
        try:
            paths[name] = export_zoo_entry(name, outdir, exporter, opset, force)
        except Exception as exc:  # noqa: BLE001 - reported to the caller's handler
            if on_error is None:
                raise
            on_error(name, exc)
    return paths
