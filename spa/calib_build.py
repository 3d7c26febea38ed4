"""`spa calib`: a calibration file (.npz) from a folder of images or a text file, no code.

The file is what `spa prune --calib FILE` (and `--eval FILE`) reads (spa.activations): one
array per graph input, keyed by the input's name, first axis = samples, plus `labels`
(int64, one per sample) with `--labels`. Everything about the arrays comes from the model's
graph inputs: the image layout (NCHW or NHWC: the channel axis is axis 1 or 3, the one of
size 1 or 3), the spatial size, the number of channels (1: grayscale, 3: RGB), the sequence
length and the dtypes; what the model does not say is asked for (`--layout`, `--size`,
`--seq-len`) and anything that does not fit is an error that names the file and the
mismatch, before anything is written.

Images (`build_images`): every image file under the folder (recursively, sorted by path),
or a seeded sample of `count` of them (in the sample's order); EXIF orientation applied,
converted to RGB or L, resized (bilinear) so the shorter side covers the crop (or to
`resize`), center-cropped to the model's height x width, scaled to [0, 1] and normalised
with `mean` / `std` (per channel, on the [0, 1] scale). A uint8 model input gets the raw
0..255 pixels. `labels=True`: the class of an image is its first subfolder; classes are
numbered in sorted order.

Text (`build_text`): one sample per non-empty line (or, `pack=True`, the token stream of all
lines cut into full sequences), tokenised with a Hugging Face `tokenizers` tokenizer
(tokenizer.json, or a folder with tokenizer.json or a BERT vocab.txt), the model's special
tokens added, truncated and padded to the sequence length; `attention_mask` (1 = token,
0 = padding), `token_type_ids` (zeros) and `position_ids` (0..L-1) are filled for the model
inputs of those names.

The same inputs and options give a byte-identical file (fixed entry order and zip
timestamps); it is written through a temporary file in the same directory and a rename.

Pillow and tokenizers are optional (`pip install 'spa-prune[calib]'`): imported only here,
inside the functions that need them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from .errors import SpaError, UsageError
from .ir.model import atomic_output

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm")
LAYOUTS = ("nchw", "nhwc")
_INSTALL = ("spa calib needs {lib} to read {what}: pip install 'spa-prune[calib]' "
            "-c constraints.txt")
_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
          TensorProto.DOUBLE: np.float64}
_IMAGE_TYPES = {**_FLOAT, TensorProto.UINT8: np.uint8}
_ID_TYPES = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32}
_MASK_TYPES = {**_ID_TYPES, **_FLOAT, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
               TensorProto.BOOL: np.bool_}
#: zip entry date of every array (the earliest a zip file can hold): reruns are identical
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# ------------------------------------------------------------------------------------------
# the model's graph inputs


@dataclass
class _Input:
    name: str
    dims: list | None          # per axis: int (static), str or None (dynamic); None: no shape
    elem: int

    @property
    def type_name(self) -> str:
        known = _MASK_TYPES.get(self.elem)
        return np.dtype(known).name if known is not None else \
            TensorProto.DataType.Name(self.elem).lower()

    def shape_text(self) -> str:
        if self.dims is None:
            return "(no shape declared)"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


@dataclass
class _Model:
    where: str                 # the file (or "<model>" for a ModelProto)
    inputs: list[_Input]
    path: str | None = None


def _static(d) -> bool:
    return isinstance(d, int)


def _load_model(model) -> _Model:
    """The graph inputs (not initializers) of a path or an onnx.ModelProto; weights (and
    external data) are not read."""
    if isinstance(model, onnx.ModelProto):
        proto, where, path = model, "<model>", None
    else:
        path = os.fspath(model)
        where = path
        if not os.path.isfile(path):
            raise SpaError("no such file", file=path)
        try:
            proto = onnx.load_model(path, load_external_data=False)
        except Exception as exc:  # protobuf decode errors of any kind
            raise SpaError(f"not a valid ONNX model ({type(exc).__name__}: {exc})", file=path)
    inits = {t.name for t in proto.graph.initializer}
    inputs = []
    for v in proto.graph.input:
        if v.name in inits:
            continue
        if not v.type.HasField("tensor_type"):
            raise SpaError(f"graph input {v.name!r} is not a tensor (a sequence, map or "
                           "optional); spa calib cannot fill it", file=where)
        tt = v.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                    else (d.dim_param or None) for d in tt.shape.dim]
        inputs.append(_Input(v.name, dims, tt.elem_type))
    if not inputs:
        raise SpaError("the model has no graph inputs to make calibration data for",
                       file=where)
    return _Model(where, inputs, path)


def _not_filled(m: _Model, others: list[_Input], what: str) -> None:
    if others:
        names = ", ".join(f"{i.name!r} ({i.type_name} {i.shape_text()})" for i in others)
        raise SpaError(f"graph input(s) {names} are not {what}: spa calib cannot fill them "
                       "(write the .npz with numpy: one array per graph input, keyed by its "
                       "name, first axis = samples)", file=m.where)


def _pick_input(m: _Model, name: str | None) -> _Input | None:
    if name is None:
        return None
    for i in m.inputs:
        if i.name == name:
            return i
    raise UsageError(f"--input {name!r} is not a graph input of the model (the inputs are "
                     f"{', '.join(repr(i.name) for i in m.inputs)})", file=m.where)


def _sample(n_total: int, count: int | None, seed: int, what: str, where: str) -> list[int]:
    """All indices in order, or a seeded sample of `count` of them (in the sample's order)."""
    if count is None:
        return list(range(n_total))
    if count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    if count > n_total:
        raise UsageError(f"--count {count}, but there are only {n_total} {what}", file=where)
    return [int(k) for k in np.random.default_rng(seed).permutation(n_total)[:count]]


# ------------------------------------------------------------------------------------------
# images


@dataclass
class _ImageSpec:
    input: _Input
    layout: str                # nchw | nhwc
    channels: int
    height: int
    width: int
    dtype: type


def _parse_floats(value, option: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        try:
            out = [float(p) for p in parts]
        except ValueError:
            raise UsageError(f"{option} {value!r}: expected comma-separated numbers, e.g. "
                             "0.485,0.456,0.406")
    else:
        out = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
    if not out or not all(np.isfinite(out)):
        raise UsageError(f"{option} {value!r}: expected finite numbers, one per channel")
    return out


def _parse_size(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        mm = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", value)
        if not mm:
            raise UsageError(f"--size {value!r}: expected HEIGHTxWIDTH or one number, e.g. "
                             "224x224 or 224")
        h = int(mm.group(1))
        w = int(mm.group(2)) if mm.group(2) else h
    else:
        h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise UsageError(f"--size {value!r}: height and width must be at least 1")
    return h, w


def _image_spec(m: _Model, input_name: str | None, layout: str | None,
                size) -> _ImageSpec:
    chosen = _pick_input(m, input_name)
    if chosen is None:
        if len(m.inputs) == 1:
            chosen = m.inputs[0]
        else:
            rank4 = [i for i in m.inputs if i.dims is not None and len(i.dims) == 4]
            if len(rank4) != 1:
                raise UsageError(f"the model has {len(m.inputs)} graph inputs "
                                 f"({', '.join(repr(i.name) for i in m.inputs)}), "
                                 f"{'several' if rank4 else 'none'} with 4 axes (an image "
                                 "batch); name the image input with --input NAME",
                                 file=m.where)
            chosen = rank4[0]
    _not_filled(m, [i for i in m.inputs if i is not chosen], f"the image input "
                f"{chosen.name!r}")
    if chosen.elem not in _IMAGE_TYPES:
        raise SpaError(f"model input {chosen.name!r} has type {chosen.type_name}; images "
                       "give float32, float16, float64 or uint8", file=m.where)
    dims = chosen.dims if chosen.dims is not None else [None] * 4
    if len(dims) != 4:
        raise SpaError(f"model input {chosen.name!r} has {len(dims)} axes "
                       f"{chosen.shape_text()}, images give 4 (samples, channels, height, "
                       "width; or samples, height, width, channels)", file=m.where)
    if layout is not None:
        lay = str(layout).lower()
        if lay not in LAYOUTS:
            raise UsageError(f"--layout {layout!r}: expected nchw or nhwc")
        ax = 1 if lay == "nchw" else 3
        if _static(dims[ax]) and dims[ax] not in (1, 3):
            raise SpaError(f"--layout {lay}: axis {ax} of model input {chosen.name!r} "
                           f"{chosen.shape_text()} has size {dims[ax]}, not 1 (grayscale) or "
                           "3 (RGB) channels", file=m.where)
    else:
        cand = [lay for lay, ax in (("nchw", 1), ("nhwc", 3)) if dims[ax] in (1, 3)]
        if len(cand) == 1:
            lay = cand[0]
        elif len(cand) == 2 or not (_static(dims[1]) or _static(dims[3])):
            why = ("axes 1 and 3 could both be the channels" if cand
                   else "its channel axis is not declared")
            raise UsageError(f"cannot tell the layout of model input {chosen.name!r} "
                             f"{chosen.shape_text()}: {why}; give --layout nchw or "
                             "--layout nhwc", file=m.where)
        else:
            raise SpaError(f"model input {chosen.name!r} {chosen.shape_text()} has no "
                           "channel axis of size 1 (grayscale) or 3 (RGB) at axis 1 (NCHW) "
                           "or 3 (NHWC); spa calib makes grayscale or RGB images",
                           file=m.where)
    cax, hax, wax = (1, 2, 3) if lay == "nchw" else (3, 1, 2)
    channels = dims[cax] if _static(dims[cax]) else 3   # a dynamic channel axis: RGB
    want = _parse_size(size)
    hw = [dims[hax], dims[wax]]
    for k, (d, axis) in enumerate(zip(hw, ("height", "width"))):
        if _static(d):
            if want is not None and want[k] != d:
                raise UsageError(f"--size {want[0]}x{want[1]}: model input {chosen.name!r} "
                                 f"{chosen.shape_text()} has {axis} {d}", file=m.where)
        elif want is None:
            raise UsageError(f"model input {chosen.name!r} {chosen.shape_text()} has a "
                             f"dynamic {axis}; give --size HEIGHTxWIDTH (e.g. --size "
                             "224x224)", file=m.where)
        else:
            hw[k] = want[k]
    return _ImageSpec(chosen, lay, int(channels), int(hw[0]), int(hw[1]),
                      _IMAGE_TYPES[chosen.elem])


def _image_files(folder: str) -> list[tuple[str, tuple[str, ...]]]:
    """(path, path parts relative to `folder`) of every image file below it, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
                continue
            p = os.path.join(root, f)
            found.append((p, tuple(os.path.relpath(p, folder).split(os.sep))))
    found.sort(key=lambda t: t[1])
    return found


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise UsageError(_INSTALL.format(lib="Pillow", what="images"))
    return Image, ImageOps


def _read_image(path: str, spec: _ImageSpec, resize: int | None) -> np.ndarray:
    """uint8 [H, W, C] (C = 1 or 3): oriented, converted, resized, center-cropped."""
    Image, ImageOps = _pil()
    H, W = spec.height, spec.width
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("L" if spec.channels == 1 else "RGB")
            w, h = im.size
            cover = max(W / w, H / h)
            scale = cover if resize is None else max(resize / min(w, h), cover)
            nw, nh = max(W, int(round(w * scale))), max(H, int(round(h * scale)))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - W) // 2, (nh - H) // 2
            im = im.crop((left, top, left + W, top + H))
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SpaError(f"cannot read the image ({type(exc).__name__}: {exc})", file=path)
    return a.reshape(H, W, spec.channels)


def _images(model, images, *, count=None, seed=0, mean=None, std=None, layout=None,
            size=None, resize=None, input=None, labels=False) -> tuple[dict, dict]:
    m = _load_model(model)
    mean_v, std_v = _parse_floats(mean, "--mean"), _parse_floats(std, "--std")
    spec = _image_spec(m, input, layout, size)
    C = spec.channels
    for opt, v in (("--mean", mean_v), ("--std", std_v)):
        if v is None:
            continue
        if spec.dtype == np.uint8:
            raise UsageError(f"{opt}: model input {spec.input.name!r} is uint8 (raw 0..255 "
                             "pixels); normalisation is the model's own", file=m.where)
        if len(v) not in (1, C):
            raise UsageError(f"{opt} has {len(v)} values; model input "
                             f"{spec.input.name!r} has {C} channel(s) (give 1 or {C})")
    if mean_v is not None and not all(0.0 <= x <= 1.0 for x in mean_v):
        raise UsageError(f"--mean {','.join(f'{x:g}' for x in mean_v)}: the pixels are scaled "
                         "to [0, 1] before --mean/--std, so the mean lies in [0, 1] (e.g. "
                         "0.485,0.456,0.406, not 123.675,116.28,103.53)")
    if std_v is not None and not all(x > 0 for x in std_v):
        raise UsageError("--std values must be positive")
    if resize is not None and int(resize) < 1:
        raise UsageError(f"--resize must be at least 1, got {resize}")
    folder = os.fspath(images)
    if not os.path.isdir(folder):
        raise UsageError("no such folder of images", file=folder)
    files = _image_files(folder)
    if not files:
        raise UsageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder",
                         file=folder)
    classes = None
    if labels:
        top = [p for p, parts in files if len(parts) < 2]
        if top:
            raise UsageError("--labels takes each image's class from its subfolder "
                             "(FOLDER/CLASS/image.png); this image lies directly in the "
                             "folder", file=top[0])
        classes = sorted({parts[0] for _, parts in files})
    order = _sample(len(files), count, seed, "images", folder)
    _pil()  # the install hint before any work
    shape = (len(order), C, spec.height, spec.width) if spec.layout == "nchw" else \
        (len(order), spec.height, spec.width, C)
    out = np.empty(shape, dtype=spec.dtype)
    if spec.dtype != np.uint8:
        mu = np.asarray(mean_v if mean_v is not None else [0.0], np.float64)
        sd = np.asarray(std_v if std_v is not None else [1.0], np.float64)
    for k, idx in enumerate(order):
        a = _read_image(files[idx][0], spec, None if resize is None else int(resize))
        if spec.dtype != np.uint8:
            a = (a.astype(np.float64) / 255.0 - mu) / sd
        out[k] = a.transpose(2, 0, 1) if spec.layout == "nchw" else a
    arrays = {spec.input.name: out}
    if classes is not None:
        index = {c: j for j, c in enumerate(classes)}
        arrays["labels"] = np.asarray([index[files[i][1][0]] for i in order], np.int64)
    info = {"source": folder, "of": len(files), "what": "images", "layout": spec.layout,
            "size": (spec.height, spec.width), "classes": classes,
            "normalised": mean_v is not None or std_v is not None}
    _check_arrays(m, arrays)
    return arrays, info


def build_images(model, images, *, output: str | None = None, count: int | None = None,
                 seed: int = 0, mean=None, std=None, layout: str | None = None, size=None,
                 resize: int | None = None, input: str | None = None,
                 labels: bool = False) -> dict[str, np.ndarray]:
    """Calibration arrays for `model` (a path or onnx.ModelProto) from the image files
    under the folder `images`; written to `output` (.npz, atomically) when given.

    mean / std: per channel on the [0, 1] scale (a sequence or "0.485,0.456,0.406");
    layout: "nchw" / "nhwc" when the model's shape does not tell; size: (H, W) or "HxW"
    for dynamic spatial axes; resize: the shorter side before the center crop (default:
    just enough to cover it); input: the image input's name (models with several inputs);
    labels: add `labels` from each image's first subfolder (classes in sorted order)."""
    _check_output(output, [model, images])
    arrays, _ = _images(model, images, count=count, seed=seed, mean=mean, std=std,
                        layout=layout, size=size, resize=resize, input=input, labels=labels)
    if output is not None:
        write_npz(output, arrays)
    return arrays


# ------------------------------------------------------------------------------------------
# text


@dataclass
class _TextSpec:
    ids: _Input
    roles: dict[str, str]      # input name -> ids | mask | type | position
    seq_len: int
    inputs: list[_Input] = field(default_factory=list)


def _text_spec(m: _Model, input_name: str | None, seq_len: int | None) -> _TextSpec:
    chosen = _pick_input(m, input_name)
    roles: dict[str, str] = {}
    candidates, unknown = [], []
    for i in m.inputs:
        low = i.name.lower()
        if i is chosen:
            continue
        if "mask" in low:
            roles[i.name] = "mask"
        elif "token_type" in low or "segment" in low:
            roles[i.name] = "type"
        elif "position" in low:
            roles[i.name] = "position"
        elif i.elem in _ID_TYPES:
            candidates.append(i)
        else:
            unknown.append(i)
    if chosen is None:
        named = [i for i in candidates if i.name.lower() == "input_ids"]
        if len(candidates) == 1 or len(named) == 1:
            chosen = candidates[0] if len(candidates) == 1 else named[0]
        elif candidates:
            raise UsageError(f"several graph inputs could take the token ids "
                             f"({', '.join(repr(i.name) for i in candidates)}); name it "
                             "with --input NAME", file=m.where)
        else:
            raise SpaError("no graph input takes token ids (an int64 or int32 input other "
                           "than attention masks, token type and position ids); the inputs "
                           f"are {', '.join(f'{i.name!r} ({i.type_name})' for i in m.inputs)}",
                           file=m.where)
    unknown += [i for i in candidates if i is not chosen]
    _not_filled(m, unknown, "token ids, an attention mask, token type ids or position ids")
    roles = {chosen.name: "ids", **roles}
    by_name = {i.name: i for i in m.inputs}
    text_inputs = [by_name[n] for n in roles]
    for i in text_inputs:
        role = roles[i.name]
        ok = _MASK_TYPES if role == "mask" else _ID_TYPES
        if i.elem not in ok:
            what = {"ids": "token ids", "type": "token type ids", "position": "position ids",
                    "mask": "an attention mask"}[role]
            raise SpaError(f"model input {i.name!r} has type {i.type_name}; {what} are "
                           + ("0/1 numbers" if role == "mask" else "integers (int64 or int32)"),
                           file=m.where)
        if i.dims is not None and len(i.dims) != 2:
            raise SpaError(f"model input {i.name!r} has {len(i.dims)} axes {i.shape_text()}, "
                           "text gives 2 (samples, sequence)", file=m.where)
    statics = {i.name: i.dims[1] for i in text_inputs if i.dims is not None
               and _static(i.dims[1])}
    if len(set(statics.values())) > 1:
        raise SpaError("the text inputs disagree on the sequence length ("
                       + ", ".join(f"{n!r}: {d}" for n, d in statics.items()) + ")",
                       file=m.where)
    if seq_len is not None and int(seq_len) < 1:
        raise UsageError(f"--seq-len must be at least 1, got {seq_len}")
    if statics:
        L = next(iter(statics.values()))
        if seq_len is not None and int(seq_len) != L:
            raise UsageError(f"--seq-len {seq_len}: model input "
                             f"{next(iter(statics))!r} has sequence length {L}", file=m.where)
    elif seq_len is None:
        sym = chosen.dims[1] if chosen.dims is not None else None
        raise UsageError(f"model input {chosen.name!r} {chosen.shape_text()} has a dynamic "
                         f"sequence axis{f' ({sym!r})' if sym else ''}; give --seq-len N "
                         "(e.g. --seq-len 128)", file=m.where)
    else:
        L = int(seq_len)
    return _TextSpec(chosen, roles, int(L), text_inputs)


def _load_tokenizer(spec):
    """A `tokenizers` tokenizer (a copy: settings are changed) from a tokenizer.json, a
    folder with tokenizer.json or vocab.txt (BERT WordPiece), or a Tokenizer object."""
    try:
        from tokenizers import BertWordPieceTokenizer, Tokenizer
    except ImportError:
        raise UsageError(_INSTALL.format(lib="tokenizers", what="text"))
    if isinstance(spec, Tokenizer):
        return Tokenizer.from_str(spec.to_str())
    if spec is None:
        raise UsageError("--text needs --tokenizer (a tokenizer.json file, or a folder with "
                         "tokenizer.json or vocab.txt)")
    path = os.fspath(spec)
    vocab = None
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        elif os.path.isfile(os.path.join(path, "vocab.txt")):
            vocab = os.path.join(path, "vocab.txt")
        else:
            raise UsageError("the tokenizer folder has neither tokenizer.json nor vocab.txt",
                             file=path)
    elif not os.path.isfile(path):
        raise UsageError("tokenizer not found (give a tokenizer.json file, or a folder with "
                         "tokenizer.json or a BERT vocab.txt)", file=path)
    elif path.lower().endswith(".txt"):
        vocab = path
    try:
        if vocab is not None:
            lower = True
            cfg = os.path.join(os.path.dirname(vocab), "tokenizer_config.json")
            if os.path.isfile(cfg):
                with open(cfg, encoding="utf-8") as f:
                    lower = bool(json.load(f).get("do_lower_case", True))
            return BertWordPieceTokenizer(vocab, lowercase=lower)
        return Tokenizer.from_file(path)
    except Exception as exc:  # the library raises plain Exceptions for malformed files
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SpaError(f"cannot read the tokenizer ({type(exc).__name__}: {text})",
                       file=vocab or path)


def _pad_id(tok) -> int:
    pad = tok.padding
    if pad and pad.get("pad_id") is not None:
        return int(pad["pad_id"])
    for t in ("[PAD]", "<pad>", "<PAD>", "<|pad|>"):
        k = tok.token_to_id(t)
        if k is not None:
            return int(k)
    return 0


def _encode(tok, line: str, number: int, path: str, **kw):
    try:
        return tok.encode(line, **kw)
    except Exception as exc:  # e.g. a WordLevel model without an unknown token
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SpaError(f"the tokenizer fails on line {number} ({type(exc).__name__}: "
                       f"{text})", file=path)


def _read_lines(path: str) -> list[tuple[int, str]]:
    if not os.path.isfile(path):
        raise UsageError("no such text file", file=path)
    try:
        with open(path, encoding="utf-8") as f:
            return [(k + 1, s.strip()) for k, s in enumerate(f) if s.strip()]
    except UnicodeDecodeError as exc:
        raise SpaError(f"the text file is not UTF-8 ({exc})", file=path)


def _text(model, text, tokenizer, *, seq_len=None, count=None, seed=0, pack=False,
          input=None) -> tuple[dict, dict]:
    m = _load_model(model)
    spec = _text_spec(m, input, seq_len)
    L = spec.seq_len
    tok = _load_tokenizer(tokenizer)
    path = os.fspath(text)
    lines = _read_lines(path)
    if not lines:
        raise SpaError("the text file has no non-empty line", file=path)
    pad_id = _pad_id(tok)
    tok.no_padding()
    n_special = tok.num_special_tokens_to_add(False)
    if L <= n_special:
        raise UsageError(f"sequence length {L} leaves no room for text: the tokenizer adds "
                         f"{n_special} special tokens")
    rows: list[list[int]]
    if pack:
        from tokenizers import Encoding
        tok.no_truncation()
        stream = Encoding.merge([_encode(tok, s, k, path, add_special_tokens=False)
                                 for k, s in lines], growing_offsets=True)
        if not stream.ids:
            raise SpaError("the text file gives no tokens", file=path)
        body = L - n_special
        stream.truncate(body)
        pieces = [stream] + list(stream.overflowing)
        if len(pieces) > 1 and len(pieces[-1].ids) < body:
            pieces.pop()   # keep full sequences only
        order = _sample(len(pieces), count, seed, f"packed sequences of {L} tokens", path)
        rows = [list(tok.post_process(pieces[k]).ids) for k in order]
        of, what = len(pieces), f"packed sequences from {len(lines)} lines"
    else:
        tok.enable_truncation(max_length=L)
        order = _sample(len(lines), count, seed, "non-empty lines", path)
        rows = []
        for k in order:
            ids = _encode(tok, lines[k][1], lines[k][0], path).ids
            if not ids:
                raise SpaError(f"line {lines[k][0]} gives no tokens", file=path)
            rows.append(list(ids))
        of, what = len(lines), "non-empty lines"
    n = len(rows)
    ids = np.full((n, L), pad_id, dtype=np.int64)
    mask = np.zeros((n, L), dtype=np.int64)
    for k, r in enumerate(rows):
        r = r[:L]
        ids[k, :len(r)] = r
        mask[k, :len(r)] = 1
    arrays = {}
    for i in m.inputs:   # graph input order
        role = spec.roles[i.name]
        a = {"ids": ids, "mask": mask, "type": np.zeros((n, L), np.int64),
             "position": np.broadcast_to(np.arange(L, dtype=np.int64), (n, L))}[role]
        arrays[i.name] = np.ascontiguousarray(a.astype(_MASK_TYPES[i.elem]))
    info = {"source": path, "of": of, "what": what, "seq_len": L,
            "tokens": int(mask.sum()), "positions": int(mask.size)}
    _check_arrays(m, arrays)
    return arrays, info


def build_text(model, text, tokenizer, *, output: str | None = None,
               seq_len: int | None = None, count: int | None = None, seed: int = 0,
               pack: bool = False, input: str | None = None) -> dict[str, np.ndarray]:
    """Calibration arrays for `model` (a path or onnx.ModelProto) from the text file `text`
    (one sample per non-empty line; `pack`: all lines' tokens cut into full sequences),
    tokenised with `tokenizer` (tokenizer.json, a folder with tokenizer.json or vocab.txt,
    or a tokenizers.Tokenizer); written to `output` (.npz, atomically) when given.

    seq_len: needed when the model's sequence axis is dynamic; input: the token ids
    input's name when the model does not make it clear."""
    _check_output(output, [model, text, tokenizer])
    arrays, _ = _text(model, text, tokenizer, seq_len=seq_len, count=count, seed=seed,
                      pack=pack, input=input)
    if output is not None:
        write_npz(output, arrays)
    return arrays


# ------------------------------------------------------------------------------------------
# checking and writing


def _check_arrays(m: _Model, arrays: dict[str, np.ndarray]) -> None:
    """What spa.activations.load_calibration_file checks, on our own result (a bug here
    should fail before a file is written)."""
    n = None
    for i in m.inputs:
        a = arrays[i.name]
        assert a.dtype == np.dtype(_MASK_TYPES.get(i.elem, _IMAGE_TYPES.get(i.elem))), i.name
        if i.dims is not None:
            assert a.ndim == len(i.dims), i.name
            assert all(a.shape[k] == d for k, d in enumerate(i.dims) if k and _static(d)), \
                i.name
        assert n is None or a.shape[0] == n
        n = a.shape[0]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise SpaError(f"array {i.name!r} came out with NaN/Inf values", file=m.where)


def _check_output(output, inputs) -> None:
    if output is None:
        return
    out = os.path.abspath(os.fspath(output))
    if os.path.isdir(out):
        raise UsageError("the output path is a folder", file=os.fspath(output))
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError("the output directory does not exist", file=os.fspath(output))
    if os.path.exists(out):
        for p in inputs:
            if isinstance(p, (str, os.PathLike)) and os.path.exists(p) and \
                    os.path.samefile(out, p):
                raise UsageError("the output path is an input file; spa never overwrites "
                                 "its input", file=os.fspath(output))


def write_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz numpy.load reads, byte-identical for the same arrays: entries in the dict's
    order, uncompressed, with a fixed date and mode set here (numpy.savez gets the same
    date only from zipfile's ZipInfo default, and appends ".npz" to other names). Written
    to a temporary file in the same directory, then renamed over `path`."""
    path = os.path.abspath(os.fspath(path))
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        raise UsageError("the output directory does not exist", file=path)
    with atomic_output(path, ".npz.tmp") as f, \
            zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fid:
                np.lib.format.write_array(fid, np.ascontiguousarray(a), allow_pickle=False)


# ------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `spa calib` on an argparse subparsers object."""
    c = subparsers.add_parser(
        "calib", help="write a calibration .npz from a folder of images or a text file",
        description="Write a calibration file (.npz: one array per graph input, first axis "
                    "= samples) for --calib / --eval from images or text. Shapes, layout and "
                    "dtypes come from the model's inputs.")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True, help="the .npz file to write")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR",
                     help="a folder of image files (searched recursively, sorted by path)")
    src.add_argument("--text", metavar="FILE", help="a UTF-8 text file, one sample per line")
    c.add_argument("--count", type=int, metavar="N",
                   help="a seeded random sample of N images / lines (default: all, in path / "
                        "line order)")
    c.add_argument("--seed", type=int, default=0, help="seed of the --count sample "
                                                       "(default 0)")
    c.add_argument("--input", metavar="NAME",
                   help="the graph input the images / token ids feed (when not clear)")
    g = c.add_argument_group("images")
    g.add_argument("--mean", metavar="M[,M,M]",
                   help="per-channel mean subtracted from pixels scaled to [0,1], e.g. "
                        "0.485,0.456,0.406")
    g.add_argument("--std", metavar="S[,S,S]",
                   help="per-channel std the pixels are divided by, e.g. 0.229,0.224,0.225")
    g.add_argument("--layout", choices=LAYOUTS,
                   help="when the model's input shape does not tell the channel axis")
    g.add_argument("--size", metavar="HxW",
                   help="crop size, needed when the model's spatial axes are dynamic")
    g.add_argument("--resize", type=int, metavar="S",
                   help="resize the shorter side to S before the center crop (default: just "
                        "enough to cover the crop)")
    g.add_argument("--labels", action="store_true",
                   help="add 'labels': each image's class is its subfolder (sorted order)")
    t = c.add_argument_group("text")
    t.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json, or a folder with tokenizer.json or a BERT vocab.txt")
    t.add_argument("--seq-len", type=int, metavar="N",
                   help="sequence length, needed when the model's sequence axis is dynamic")
    t.add_argument("--pack", action="store_true",
                   help="pack the lines' tokens into full sequences instead of one line each")
    c.set_defaults(fn=run)
    return c


_IMAGE_OPTS = ("mean", "std", "layout", "size", "resize", "labels")
_TEXT_OPTS = ("tokenizer", "seq_len", "pack")


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(args) -> int:
    """`spa calib`: raises SpaError / UsageError (the CLI maps them to exit codes 3 / 2)."""
    image_mode = args.images is not None
    wrong = [_opt(o) for o in (_TEXT_OPTS if image_mode else _IMAGE_OPTS)
             if getattr(args, o, None) not in (None, False)]
    if wrong:
        raise UsageError(f"{', '.join(wrong)} only apply to "
                         f"{'--text' if image_mode else '--images'}")
    _check_output(args.output, [args.model, args.images or args.text, args.tokenizer])
    if image_mode:
        arrays, info = _images(args.model, args.images, count=args.count, seed=args.seed,
                               mean=args.mean, std=args.std, layout=args.layout,
                               size=args.size, resize=args.resize, input=args.input,
                               labels=args.labels)
    else:
        if args.tokenizer is None:
            raise UsageError("--text needs --tokenizer (a tokenizer.json file, or a folder "
                             "with tokenizer.json or vocab.txt)")
        arrays, info = _text(args.model, args.text, args.tokenizer, seq_len=args.seq_len,
                             count=args.count, seed=args.seed, pack=args.pack,
                             input=args.input)
    write_npz(args.output, arrays)
    n = next(iter(arrays.values())).shape[0]
    sampled = f", seed {args.seed}" if args.count is not None else ""
    print(f"wrote {args.output}: {n} samples from {info['source']} ({info['of']} "
          f"{info['what']}{sampled})")
    for name, a in arrays.items():
        if name != "labels":
            print(f"  {name}: {a.dtype.name} [{', '.join(map(str, a.shape))}]")
    if image_mode:
        h, w = info["size"]
        print(f"  {info['layout'].upper()}, center-cropped to {h}x{w}"
              + (", --mean/--std applied" if info["normalised"] else ""))
        if info["classes"] is not None:
            cl = info["classes"]
            shown = ", ".join(f"{j}={c}" for j, c in enumerate(cl[:20]))
            print(f"  labels: {len(cl)} classes ({shown}{', ...' if len(cl) > 20 else ''})")
    else:
        print(f"  sequence length {info['seq_len']}: {info['tokens']} of {info['positions']} "
              "positions are tokens, the rest padding")
    return 0
