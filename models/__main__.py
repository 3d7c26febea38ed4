"""`python -m models list | export` — the model registry from the command line.

`list` prints one JSON object per line (name, framework, family, input_shape, trained,
accuracy, path) and imports no deep-learning framework. `path` names only a file that
exists: a row whose file is not built yet has `"path": null` and `build`, the command
that makes it (e.g. `python -m models export resnet20`). `export` builds the zoo's ONNX
cache (default <repo>/.cache/zoo, or $SPA_ZOO_CACHE) that `list` points at.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from models.registry import (DEFAULT_EXPORTER, EXPORTERS, FRAMEWORK_ZOO_BY_NAME,
                             TORCH_ZOO_BY_NAME, all_entries)


def _list(args) -> int:
    cache = Path(args.cache_dir) if args.cache_dir else None
    for entry in all_entries(cache, exporter=args.exporter):
        if args.framework and entry.framework != args.framework:
            continue
        print(json.dumps(entry.to_json()))
    return 0


def _export_other_frameworks(args) -> list:
    """Export the jax/keras/sklearn zoo entries named (all of them when none is named)."""
    import importlib

    from models.registry import default_cache_dir
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    wanted = [s for n, s in FRAMEWORK_ZOO_BY_NAME.items() if not args.names or n in args.names]
    failures = []
    for spec in wanted:
        path = spec.onnx_path(cache)
        if path.exists() and not args.force:
            print(path)
            continue
        try:
            mod = importlib.import_module(spec.module or f"models.{spec.framework}_zoo")
            print(mod.export(spec.name, path))
        except Exception as exc:  # report every failure, export the rest
            failures.append(spec.name)
            print(f"FAILED {spec.name} ({spec.framework}): {type(exc).__name__}: {exc}"
                  .splitlines()[0], file=sys.stderr)
    return failures


def _export(args) -> int:
    from models.export import DEFAULT_OPSET, export_zoo

    unknown = [n for n in args.names
               if n not in TORCH_ZOO_BY_NAME and n not in FRAMEWORK_ZOO_BY_NAME]
    if unknown:
        print(f"error: unknown zoo model(s) {', '.join(unknown)}; see `python -m models list`",
              file=sys.stderr)
        return 2
    exporters = EXPORTERS if args.exporter == "all" else (args.exporter,)
    failures = []
    failures += _export_other_frameworks(args)
    torch_names = [n for n in args.names if n in TORCH_ZOO_BY_NAME]
    if args.names and not torch_names:
        return 1 if failures else 0

    def on_error(name, exc):
        failures.append((name, exporter, exc))
        print(f"FAILED {name} ({exporter}): {type(exc).__name__}: {exc}".splitlines()[0],
              file=sys.stderr)

    for exporter in exporters:
        t0 = time.perf_counter()
        paths = export_zoo(args.cache_dir, exporter, opset=args.opset or DEFAULT_OPSET,
                           names=torch_names or None, force=args.force, on_error=on_error)
        for path in paths.values():
            print(path)
        print(f"{exporter}: {len(paths)} model(s) in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="print the registry, one JSON object per line")
    p.add_argument("--framework", help="only this framework (torch, jax, keras, sklearn, paddle)")
    p.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER,
                   help="which exported file a torch zoo entry's path names (default %(default)s)")
    p.add_argument("--cache-dir", help="torch zoo export cache (default <repo>/.cache/zoo)")
    p.set_defaults(func=_list)

    p = sub.add_parser("export", help="export the torch zoo to ONNX (cached)")
    p.add_argument("names", nargs="*", help="zoo models to export (default: all)")
    p.add_argument("--exporter", choices=[*EXPORTERS, "all"], default=DEFAULT_EXPORTER)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--cache-dir", help="output directory (default <repo>/.cache/zoo)")
    p.add_argument("--force", action="store_true", help="re-export even if cached")
    p.set_defaults(func=_export)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
