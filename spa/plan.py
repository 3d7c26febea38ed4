"""A plan is plain data: the kept channel indices of every pruned group, plus the
criterion and options that produced it. It can be saved, read back, diffed and replayed."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import PlanError

FORMAT = "spa-plan/1"


@dataclass
class Plan:
    keep: dict[int, list[int]]               # group id -> kept channel indices (sorted)
    sizes: dict[int, int]                    # group id -> channels before pruning
    criterion: str = "manual"
    options: dict = field(default_factory=dict)
    model_sha256: str | None = None

    # -- serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict:
        digest = None if self.model_sha256 is None else str(self.model_sha256)
        return {"format": FORMAT, "model_sha256": digest,
                "criterion": self.criterion, "options": self.options,
                "groups": [{"id": g, "channels": self.sizes[g], "keep": self.keep[g]}
                           for g in sorted(self.keep)]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, obj: dict, source: str | None = None) -> "Plan":
        try:
            if obj.get("format") != FORMAT:
                raise PlanError(f"not an SPA plan (format {obj.get('format')!r}, expected "
                                f"{FORMAT!r})", file=source)
            keep, sizes = {}, {}
            for g in obj["groups"]:
                gid = int(g["id"])
                if gid in keep:
                    raise PlanError(f"group {gid} appears twice", file=source)
                ks = g["keep"]
                if not isinstance(ks, list) or not all(isinstance(k, int) and
                                                       not isinstance(k, bool) for k in ks):
                    raise PlanError(f"group {gid}: 'keep' must be a list of integers",
                                    file=source)
                keep[gid] = list(ks)
                sizes[gid] = int(g["channels"])
            return cls(keep, sizes, obj.get("criterion", "manual"), obj.get("options", {}),
                       obj.get("model_sha256"))
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"malformed plan ({type(exc).__name__}: {exc})", file=source)

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            with open(path) as f:
                obj = json.load(f)
        except OSError as exc:
            raise PlanError(f"cannot read plan: {exc.strerror}", file=path)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON ({exc})", file=path)
        if not isinstance(obj, dict):
            raise PlanError("plan must be a JSON object", file=path)
        return cls.from_json(obj, source=path)

    # -- meaning -----------------------------------------------------------------------------
    def validate(self, analysis, source: str | None = None) -> None:
        """Raise PlanError unless the plan fits this model's groups and constraints."""
        model = analysis.model
        ours = self.model_sha256
        same_object = isinstance(ours, ModelDigest) and ours.model is model
        if ours and not same_object and str(model_sha256(model)) != str(ours):
            raise PlanError("the plan was made for a different model (sha256 differs)",
                            file=source)
        n = len(analysis.groups)
        for g, ks in self.keep.items():
            if not 0 <= g < n:
                raise PlanError(f"group {g} does not exist (the model has {n} prunable "
                                "groups)", file=source)
            size = analysis.groups[g].channels
            if self.sizes.get(g) != size:
                raise PlanError(f"group {g} has {size} channels, the plan says "
                                f"{self.sizes.get(g)}", file=source)
            if len(set(ks)) != len(ks):
                raise PlanError(f"group {g}: duplicate indices in 'keep'", file=source)
            if any(not 0 <= k < size for k in ks):
                raise PlanError(f"group {g}: indices out of range 0..{size - 1}", file=source)
            if not ks:
                raise PlanError(f"group {g}: at least one channel must be kept", file=source)
        removed = analysis.removed_table(self.removed(analysis))
        for key in analysis.channel_keys():
            m = analysis.removed_mask(key, removed)
            if m is not None and len(m) and m.all():
                raise PlanError(f"the plan removes every index of {key[0]!r} axis {key[1]} "
                                "(at least one must stay)", file=source)

    def removed(self, analysis) -> np.ndarray:
        out = []
        for g, ks in self.keep.items():
            chans = analysis.group_chans[g]
            mask = np.ones(len(chans), bool)
            mask[list(ks)] = False
            out.append(chans[mask])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def kept_indices(self, analysis) -> dict[tuple, np.ndarray]:
        """Kept element indices of every dim that loses something."""
        ids = self.removed(analysis)
        kept = {}
        if not len(ids):
            return kept
        removed = analysis.removed_table(ids)
        for key in analysis.channel_keys():
            m = analysis.removed_mask(key, removed)
            if m is not None and m.any():
                kept[key] = np.nonzero(~m)[0]
        return kept

    def touches_approximate(self, analysis) -> list[int]:
        return [g for g, ks in self.keep.items()
                if len(ks) < analysis.groups[g].channels and not analysis.groups[g].exact]


class ModelDigest:
    """The sha256 of a model, computed only when it is needed (a plan written to disk, or a
    plan from disk checked against a model): hashing a 400 MB model costs half a second."""

    def __init__(self, model):
        self.model = model

    def __str__(self) -> str:
        h = self.model.__dict__.get("_sha256")
        if h is None:
            path = self.model.path
            if path and os.path.isfile(path):  # the bytes the model was loaded from
                d = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        d.update(chunk)
                h = d.hexdigest()
            else:
                h = hashlib.sha256(self.model.proto.SerializeToString(deterministic=True)
                                   ).hexdigest()
            self.model.__dict__["_sha256"] = h
        return h

    __repr__ = __str__


def model_sha256(model) -> ModelDigest:
    return ModelDigest(model)
