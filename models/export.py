"""Export the torch zoo to ONNX, atomically and with caching.

The export itself lives in ``converters/torch.py`` (``converters.torch.export``); the zoo
uses its *deployment* mode (``keep_bn=False``), which is what this module always did:

* ``dynamo`` — ``torch.onnx.export(..., dynamo=True, optimize=True)``: torch.export +
  onnxscript. Its native opset is 18; asking for another opset makes it run the
  onnxscript version converter afterwards, which is the part that goes wrong (see below).
* ``legacy`` — ``torch.onnx.export(..., dynamo=False, do_constant_folding=True)``: the
  TorchScript tracer, with symbolic functions up to opset 20.

Default opset 18 for both (checked on the whole zoo with torch 2.13 / onnxscript 0.7.2 /
onnxruntime 1.31): it is the dynamo exporter's native opset (no version conversion), the
legacy exporter supports it fully, it has LayerNormalization (17) and the ReduceMean-with-
axes-input form (18), and every ONNX Runtime we care about runs it. docs/zoo.md has the
per-opset results. For exports whose pruning plans map back onto the torch module, see
``converters.torch.export(..., keep_bn=True)`` and docs/frameworks.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from converters.torch import DEFAULT_OPSET, EXPORTERS, export_fingerprint

__all__ = ["DEFAULT_OPSET", "EXPORTERS", "export_torch", "export_zoo_entry", "export_zoo"]


def export_torch(module, example_inputs, path, exporter: str = "dynamo",
                 opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> Path:
    """Deployment export of `module` (BN folded): ``converters.torch.export(...,
    keep_bn=False)``. Inputs "input"/"input_ids", output "output", symbolic batch axis
    (give an example batch of at least 2); written atomically."""
    from converters.torch import export

    return export(module, example_inputs, path, exporter=exporter, opset=opset,
                  dynamic_batch=dynamic_batch, keep_bn=False)


def _fresh(path: Path, adopt: bool = True) -> bool:
    """A cached export is fresh when it is newer than the zoo's sources and was made by the
    current export code (its ``.fingerprint`` sidecar). A file from before sidecars existed
    was made with the same settings as today's deployment export: it is adopted."""
    if not path.is_file() or path.stat().st_mtime <= _zoo_source_mtime():
        return False
    side = path.with_name(path.name + ".fingerprint")
    fp = export_fingerprint()
    if not side.is_file():
        if not adopt:
            return False
        side.write_text(fp + "\n")
        return True
    return side.read_text().strip() == fp


def _stamp(path: Path) -> None:
    path.with_name(path.name + ".fingerprint").write_text(export_fingerprint() + "\n")


def _zoo_source_mtime() -> float:
    """Newest modification time of the zoo's sources (the export code is covered by
    ``converters.torch.export_fingerprint`` instead, so that editing the map-back code in
    converters/torch.py does not re-export the zoo)."""
    import models.registry as reg
    import models.torch_zoo as tz

    return max(os.path.getmtime(f) for f in (tz.__file__, reg.__file__))


def export_zoo_entry(name: str, outdir=None, exporter: str = "dynamo",
                     opset: int = DEFAULT_OPSET, force: bool = False,
                     keep_bn: bool = False) -> Path:
    """Export one zoo model to `outdir/<name>.<exporter>.onnx` (`….opset<N>.onnx` for a
    non-default opset; `<name>.<exporter>.mapback.onnx` with `keep_bn`, the export whose
    plans map back onto the torch module, see converters.torch), unless a cached file is newer than models/torch_zoo.py and
    models/registry.py and was made by the current export code (the exported model is a
    pure function of them)."""
    from models.registry import default_cache_dir
    from models.torch_zoo import ZOO

    entry = ZOO[name]
    path = entry.spec.onnx_path(exporter, Path(outdir) if outdir else default_cache_dir())
    if opset != DEFAULT_OPSET:
        path = path.with_name(f"{name}.{exporter}.opset{opset}.onnx")
    if keep_bn:
        path = path.with_name(path.name[:-len(".onnx")] + ".mapback.onnx")
    if not force and _fresh(path, adopt=not keep_bn):
        return path
    from converters.torch import export

    export(entry.factory(), entry.example_inputs(batch=2), path, exporter=exporter,
           opset=opset, dynamic_batch=True, keep_bn=keep_bn)
    _stamp(path)
    return path


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
