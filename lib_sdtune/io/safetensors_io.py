"""Safetensors reading by tensor name and a streaming, atomic writer.

The reader parses the JSON header itself (names, shapes, dtypes, metadata) so inspecting a
7 GB checkpoint reads a few hundred KB; tensors are loaded one at a time through `safe_open`.
The writer computes the header up front from names, dtypes and shapes, then writes tensors one
at a time into a temp file that is renamed over the target only when every tensor is in.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from ..errors import SdtuneError
from .atomic import atomic_write

# safetensors dtype names, and the on-disk order the reference implementation uses
# (dtype rank descending, then name), so files and data hashes match `safetensors.torch.save`.
_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                   ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPE_TO_ST[getattr(torch, _name)] = _st
ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
_ST_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
            "F64", "I64", "U64"]
_ST_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def st_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F16", "BF16", ...)."""
    try:
        return _DTYPE_TO_ST[dtype]
    except KeyError:
        raise SdtuneError(f"dtype {dtype} cannot be stored in a safetensors file") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # offset inside the data section
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse a safetensors header: (tensors, metadata, byte offset of the data section)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise SdtuneError(f"{p}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > p.stat().st_size - 8:
                raise SdtuneError(f"{p}: not a safetensors file (header length {n} is impossible)")
            raw = fh.read(n)
    except OSError as e:
        raise SdtuneError(f"{p}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdtuneError(f"{p}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise SdtuneError(f"{p}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            tensors[name] = TensorInfo(info["dtype"], tuple(int(s) for s in info["shape"]), int(start), int(end))
        except (KeyError, TypeError, ValueError) as e:
            raise SdtuneError(f"{p}: malformed header entry for tensor {name!r}") from e
    return tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n


class SafetensorsFile:
    """A safetensors file opened for reading tensors by name, one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_offset = read_header(self.path)
        self._handle = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype | None:
        return ST_TO_DTYPE.get(self.tensors[name].dtype)

    def get_tensor(self, name: str) -> torch.Tensor:
        """Load one tensor with a plain read (no mmap), so peak RAM stays near this tensor's size."""
        info = self.tensors[name]
        dtype = ST_TO_DTYPE.get(info.dtype)
        if dtype is None:
            raise SdtuneError(f"{self.path}: tensor {name!r} has dtype {info.dtype}, which this torch cannot hold")
        size = info.end - info.start
        if size == 0:
            return torch.empty(info.shape, dtype=dtype)
        if self._handle is None:
            self._handle = open(self.path, "rb")
        buf = bytearray(size)
        self._handle.seek(self.data_offset + info.start)
        if self._handle.readinto(buf) != size:
            raise SdtuneError(f"{self.path}: file is truncated inside tensor {name!r}")
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _layout(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Tensor order in the data section: dtype rank descending, then name (as safetensors does)."""
    return sorted(specs, key=lambda k: (-_ST_RANK.index(specs[k][0]), k))


def build_header(specs: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None
                 ) -> tuple[bytes, dict[str, tuple[int, int]], list[str]]:
    """Header bytes (length prefix included), per-tensor data ranges, and the write order."""
    order = _layout(specs)
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise SdtuneError(f"safetensors metadata must map strings to strings; bad entries: {bad[:5]}")
        header["__metadata__"] = dict(metadata)
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        size = _ST_SIZE[dtype]
        for s in shape:
            size *= int(s)
        ranges[name] = (offset, offset + size)
        header[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ranges, order


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor; the file appears only when all are written.

    Use as a context manager: `with SafetensorsWriter(path, specs, meta) as w: w.write(name, t)`.
    Any exception (or a missing tensor) discards the temp file and leaves `path` untouched.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[str, Iterable[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.specs = {k: (d, tuple(int(s) for s in shape)) for k, (d, shape) in specs.items()}
        self.header, self.ranges, self.order = build_header(self.specs, metadata)
        self._written: set[str] = set()
        self._ctx = None
        self._fh = None

    def __enter__(self) -> SafetensorsWriter:
        self._ctx = atomic_write(self.path, "wb")
        self._fh = self._ctx.__enter__()
        self._fh.write(self.header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor at its place in the data section (any order)."""
        if name not in self.specs:
            raise SdtuneError(f"{self.path}: tensor {name!r} was not declared in the header")
        dtype, shape = self.specs[name]
        if st_dtype_name(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise SdtuneError(f"{self.path}: tensor {name!r} is {st_dtype_name(tensor.dtype)}{list(tensor.shape)}, "
                              f"declared {dtype}{list(shape)}")
        start, end = self.ranges[name]
        data = tensor_bytes(tensor)
        self._fh.seek(len(self.header) + start)
        self._fh.write(data)
        self._written.add(name)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            missing = [k for k in self.order if k not in self._written]
            if missing:
                err = SdtuneError(f"{self.path}: {len(missing)} declared tensors were never written "
                                  f"(first: {missing[0]}); nothing was saved")
                self._ctx.__exit__(SdtuneError, err, None)
                raise err
            self._fh.seek(0, os.SEEK_END)
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write a dict of tensors (streamed one by one, in file order)."""
    specs = {k: (st_dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata) as w:
        for name in w.order:
            w.write(name, tensors[name])
    return Path(path)


def iter_tensors(sf: SafetensorsFile, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so peak RAM stays near one tensor."""
    for name in names if names is not None else sf.keys():
        yield name, sf.get_tensor(name)


def write_metadata(path: str | os.PathLike, metadata: Mapping[str, str], out: str | os.PathLike | None = None) -> Path:
    """Rewrite a file's metadata (to `out`, or atomically in place); tensors are copied unchanged."""
    src = SafetensorsFile(path)
    specs = {k: (i.dtype, i.shape) for k, i in src.tensors.items()}
    header, ranges, order = build_header(specs, metadata)
    target = Path(out) if out is not None else src.path
    with open(src.path, "rb") as fin, atomic_write(target, "wb") as fout:
        fout.write(header)
        for name in order:
            info = src.tensors[name]
            fin.seek(src.data_offset + info.start)
            remaining = info.end - info.start
            while remaining:
                chunk = fin.read(min(remaining, 16 << 20))
                if not chunk:
                    raise SdtuneError(f"{src.path}: file is truncated inside tensor {name!r}")
                fout.write(chunk)
                remaining -= len(chunk)
    return target
