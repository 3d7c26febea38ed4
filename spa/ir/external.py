"""External data without loading it (models over ONNX's 2 GB protobuf limit).

A model loaded with external data keeps its weights in their files: each initializer is an
`ExternalTensor` (file, offset, shape, dtype) that is memory-mapped, read-only, only when
something reads it, so analysis and scoring touch one weight at a time. A weight that the
rewrite slices becomes a `Pending` tensor (a source tensor and the kept indices per axis):
nothing is computed until the pruned model is written, and then it is read in chunks of
rows and written straight into the output's data file. Peak memory is a few chunks, not
the model, and the input files are only ever opened for reading.

In memory, such tensors stay `data_location = EXTERNAL` in the ModelProto, with a location
that only SPA resolves: the absolute path of a data file that `spa.ir.load` checked (inside
the model's directory, long enough) or a `spa-pending:N` token. `save_atomic` writes them
out with relative locations; `spa.runtime.session_for` hands them to ONNX Runtime as
external initializers. A ModelProto holding such tensors is not a file format: write it
with `spa.ir.save_atomic` (or `spa.save`), not `onnx.save`.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import SpaError

#: bytes read per step when slicing or copying a weight
CHUNK_BYTES = 32 << 20
PENDING_PREFIX = "spa-pending:"
#: element types that can be memory-mapped as they are stored (fixed size, not packed)
MAPPABLE = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
            TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
            TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64,
            TensorProto.BOOL, TensorProto.COMPLEX64, TensorProto.COMPLEX128,
            TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
            TensorProto.FLOAT8E5M2FNUZ}

# data files SPA checked and reads from: realpath -> (size, mtime_ns, device, inode)
_SOURCES: dict[str, tuple] = {}
# files SPA must never write over (input models and their data files):
# (device, inode) -> the path it was loaded from
_PROTECTED: dict[tuple[int, int], str] = {}
_PENDING: dict[str, "Pending"] = {}
_COUNTER = itertools.count()


def _stat_key(st) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)


def register_source(path: str) -> str:
    """Remember a checked external data file (its size and mtime, to notice a change)."""
    full = os.path.realpath(path)
    st = os.stat(full)
    _SOURCES[full] = _stat_key(st)
    _PROTECTED[(st.st_dev, st.st_ino)] = full
    return full


def protect(path: str) -> None:
    """Never write over this file (an input model)."""
    try:
        st = os.stat(path)
    except OSError:
        return
    _PROTECTED[(st.st_dev, st.st_ino)] = os.path.realpath(path)


def is_protected(path: str) -> bool:
    """`path` is a file SPA loaded as input (the same file: hard links too; an inode that a
    deleted input left behind and the system reused is not)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    known = _PROTECTED.get((st.st_dev, st.st_ino))
    try:
        return known is not None and os.path.samefile(known, path)
    except OSError:
        return False


def np_dtype(data_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


@dataclass(frozen=True, eq=False)
class ExternalTensor:
    """A weight stored in a checked data file: mapped or read on demand, never written."""
    path: str
    offset: int
    shape: tuple
    data_type: int

    @property
    def dtype(self) -> np.dtype:
        return np_dtype(self.data_type)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def _check(self) -> None:
        try:
            now = _stat_key(os.stat(self.path))
        except OSError as exc:
            raise SpaError(f"external data file disappeared while SPA was reading it ({exc})",
                           file=self.path)
        if now != _SOURCES.get(self.path):
            raise SpaError("external data file changed while SPA was reading it; nothing "
                           "was written, run again", file=self.path)

    def array(self) -> np.ndarray:
        """The tensor as a read-only memory map (pages are read when touched and released
        with the array)."""
        self._check()
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                       shape=self.shape)
        return mm.view(np.ndarray)

    def read_rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b (axis 0) read into memory (not mapped: the memory goes with the array)."""
        self._check()
        shape = (b - a,) + tuple(self.shape[1:])
        out = np.empty(shape, self.dtype)
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + a * row)
            got = 0
            while got < len(buf):
                n = f.readinto(buf[got:])
                if not n:
                    raise SpaError("external data file ended early", file=self.path)
                got += n
        return out


@dataclass(frozen=True, eq=False)
class Pending:
    """A sliced weight not computed yet: `source` with only the kept indices of some axes."""
    source: ExternalTensor
    take: tuple  # ((axis, kept indices, ascending), ...) sorted by axis

    @property
    def data_type(self) -> int:
        return self.source.data_type

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    @property
    def shape(self) -> tuple:
        s = list(self.source.shape)
        for ax, idx in self.take:
            s[ax] = len(idx)
        return tuple(s)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def chunks(self):
        """The sliced tensor in C order, piece by piece: the source is read once, in order,
        one block of rows at a time."""
        src = self.source
        first = dict(self.take).get(0)
        rest = [(ax, idx) for ax, idx in self.take if ax != 0]
        row = max(1, math.prod(src.shape[1:]) * src.dtype.itemsize)
        step = max(1, CHUNK_BYTES // row)
        for a in range(0, src.shape[0], step):
            b = min(a + step, src.shape[0])
            if first is not None:
                lo, hi = np.searchsorted(first, [a, b])
                if lo == hi:
                    continue
                blk = src.read_rows(int(first[lo]), int(first[hi - 1]) + 1)
                blk = blk[first[lo:hi] - first[lo]]
            else:
                blk = src.read_rows(a, b)
            for ax, idx in rest:
                blk = np.take(blk, idx, axis=ax)
            yield np.ascontiguousarray(blk)

    def array(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        flat, k = out.reshape(-1), 0
        for c in self.chunks():
            flat[k:k + c.size] = c.reshape(-1)
            k += c.size
        return out

    def tensor(self, name: str) -> TensorProto:
        """The in-memory TensorProto that stands for this tensor until it is written."""
        token = f"{PENDING_PREFIX}{next(_COUNTER)}"
        _PENDING[token] = self
        t = TensorProto(name=name, data_type=self.data_type, dims=list(self.shape))
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=token)
        t.external_data.add(key="length", value=str(self.nbytes))
        return t


def pending(ref, axes: list[tuple[int, np.ndarray]]) -> Pending:
    """`ref` (an ExternalTensor or a Pending) with only `axes`' kept indices."""
    take = {}
    if isinstance(ref, Pending):
        take = {ax: idx for ax, idx in ref.take}
        ref = ref.source
    for ax, idx in axes:
        idx = np.asarray(idx, dtype=np.int64)
        take[ax] = take[ax][idx] if ax in take else idx
    for ax, idx in take.items():
        if len(idx) and not (np.diff(idx) > 0).all():
            raise SpaError(f"internal error: kept indices of axis {ax} are not ascending")
    return Pending(ref, tuple(sorted(take.items(), key=lambda p: p[0])))


def _info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def ref_of(t: TensorProto):
    """The ExternalTensor / Pending an in-memory tensor stands for, or None when the tensor
    holds its data (or is external data SPA did not check, which it never reads)."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    info = _info(t)
    loc = info.get("location", "")
    if loc.startswith(PENDING_PREFIX):
        p = _PENDING.get(loc)
        if p is None:
            raise SpaError(f"tensor {t.name!r} refers to unknown pending data {loc!r}")
        return p
    if os.path.isabs(loc) and loc in _SOURCES:
        return ExternalTensor(loc, int(info.get("offset", 0) or 0),
                              tuple(int(d) for d in t.dims), t.data_type)
    return None


def has_refs(proto: onnx.ModelProto) -> bool:
    return any(ref_of(t) is not None for t in proto.graph.initializer)


def materialize(t: TensorProto) -> TensorProto:
    """An in-memory copy of a tensor SPA holds by reference."""
    ref = ref_of(t)
    if ref is None:
        return t
    nt = numpy_helper.from_array(np.ascontiguousarray(ref.array()), t.name)
    if t.doc_string:
        nt.doc_string = t.doc_string
    return nt


#: tensors held by reference below this size are copied into the model given to ONNX
#: Runtime (its shape inference reads small constants, e.g. Reshape targets)
ORT_INLINE_BYTES = 1 << 20


def ort_initializers(proto: onnx.ModelProto):
    """What ONNX Runtime needs to run a model whose weights SPA holds by reference:
    (model, folder, names, values). Small tensors are copied into the model; each big one
    keeps an external-data entry that points into its source file (relative to `folder`,
    for ONNX Runtime's path checks) and its array is handed over with
    SessionOptions.add_initializer, which ONNX Runtime uses in place: source weights stay
    memory-mapped (page cache, not a copy), pruned ones are computed once. `values` (the
    OrtValues and their arrays) must outlive the session."""
    import onnxruntime as ort
    refs = [(k, t, ref_of(t)) for k, t in enumerate(proto.graph.initializer)]
    refs = [(k, t, r) for k, t, r in refs if r is not None]
    if not refs:
        return proto, None, [], []
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    big = [(k, t, r) for k, t, r in refs if r.nbytes >= ORT_INLINE_BYTES]
    folder = os.path.commonpath([os.path.dirname(_source(r).path) for _, _, r in big]) \
        if big else None
    names, values = [], []
    for k, t, ref in refs:
        ct = copy.graph.initializer[k]
        if ref.nbytes < ORT_INLINE_BYTES:
            ct.CopyFrom(materialize(t))
            continue
        src = _source(ref)
        del ct.external_data[:]
        ct.external_data.add(key="location", value=os.path.relpath(src.path, folder))
        ct.external_data.add(key="offset", value=str(src.offset))
        ct.external_data.add(key="length", value=str(ref.nbytes))
        arr = np.ascontiguousarray(ref.array())
        if arr.dtype.kind in "biufc":
            v = ort.OrtValue.ortvalue_from_numpy(arr)
        else:  # ml_dtypes (bfloat16, float8): hand ORT the bits with the ONNX type
            bits = arr.view(np.uint16 if arr.dtype.itemsize == 2 else np.uint8)
            v = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, t.data_type)
        names.append(t.name)
        values.append((v, arr))
    return copy, folder, names, values


def _source(ref) -> ExternalTensor:
    return ref if isinstance(ref, ExternalTensor) else ref.source


# ------------------------------------------------------------------------------------------
# writing


class DataWriter:
    """Appends tensors to a data file (the output's, opened by save_atomic)."""

    def __init__(self, fd: int):
        self.fd, self.pos = fd, 0

    def align(self, nbytes: int) -> int:
        """Start of the next tensor: 64 KiB aligned for tensors of 1 MiB and more (so that
        readers can memory-map them), 64 bytes otherwise."""
        a = 65536 if nbytes >= (1 << 20) else 64
        pad = -self.pos % a
        if pad:
            self._write(memoryview(bytes(pad)))
        return self.pos

    def _write(self, buf: memoryview) -> None:
        while len(buf):
            n = os.write(self.fd, buf)
            buf = buf[n:]
            self.pos += n

    def write_array(self, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr).reshape(-1)
        if sys.byteorder != "little" and a.dtype.itemsize > 1 and a.dtype.kind in "iufc":
            a = a.astype(a.dtype.newbyteorder("<"))
        self._write(memoryview(a.view(np.uint8)))

    def write_bytes(self, data: bytes) -> None:
        self._write(memoryview(data))

    def copy_from(self, ref: ExternalTensor) -> None:
        """The bytes of a source tensor, copied by the kernel where it can."""
        ref._check()
        left, src_off = ref.nbytes, ref.offset
        with open(ref.path, "rb", buffering=0) as f:
            try:
                while left:
                    n = os.copy_file_range(f.fileno(), self.fd, min(left, 1 << 30), src_off,
                                           self.pos)
                    if n <= 0:
                        raise OSError("copy_file_range copied nothing")
                    left, src_off, self.pos = left - n, src_off + n, self.pos + n
                os.lseek(self.fd, self.pos, os.SEEK_SET)
                return
            except (OSError, AttributeError):  # other filesystem, old kernel, no such call
                os.lseek(self.fd, self.pos, os.SEEK_SET)
        for chunk in _range_chunks(ref, src_off, left):
            self._write(memoryview(chunk))

    def write_tensor(self, ref) -> None:
        if isinstance(ref, ExternalTensor):
            self.copy_from(ref)
        else:
            for c in ref.chunks():
                self.write_array(c)


def _range_chunks(ref: ExternalTensor, start: int, length: int):
    with open(ref.path, "rb") as f:
        f.seek(start)
        while length:
            data = f.read(min(length, CHUNK_BYTES))
            if not data:
                raise SpaError("external data file ended early", file=ref.path)
            length -= len(data)
            yield data
