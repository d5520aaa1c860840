"""Merge inputs: safetensors read tensor by tensor (plain reads, hashed on the way), or whole state dicts.

A streamed input is hashed while it is read: tensors are requested in file order, the bytes between
them (header, tensors the merge does not need) are read and hashed in passing, and the rest of the
file at the end, so the sha256 the recipe records costs no second pass and every byte is read once.
If the merge needs an input's tensors out of file order, that input is hashed by a separate pass.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..errors import SdtuneError
from ..io.checkpoint import SAFETENSORS_SUFFIXES, open_checkpoint
from ..io.hashes import LEGACY_OFFSET, LEGACY_SIZE, file_sha256, legacy_hash
from ..io.safetensors_io import SafetensorsFile
from .buffers import BufferPool

_CHUNK = 8 << 20


@dataclass(frozen=True)
class InputHashes:
    """What the recipe records of one input file."""

    sha256: str
    autov1: str  # A1111's legacy hash (64 KiB at 1 MiB), cheap to check before a re-run
    size: int


class _Hasher:
    """sha256 and A1111's legacy hash of a file, fed with consecutive byte ranges.

    With `threaded`, the hashing runs in a thread of its own (bounded queue), so reading the next
    tensor does not wait for the hash of the last one; `on_done` is called once a range is hashed.
    """

    def __init__(self, threaded: bool = False) -> None:
        self.sha = hashlib.sha256()
        self.legacy = hashlib.sha256()
        self.pos = 0  # bytes handed over so far (hashed or queued)
        self._error: Optional[BaseException] = None
        self._queue: Optional[queue.Queue] = queue.Queue(maxsize=8) if threaded else None
        self._thread: Optional[threading.Thread] = None
        if self._queue is not None:
            self._thread = threading.Thread(target=self._run, name="sdtune-merge-hash", daemon=True)
            self._thread.start()

    def _consume(self, start: int, data: memoryview | bytes) -> None:
        lo, hi = max(LEGACY_OFFSET, start), min(LEGACY_OFFSET + LEGACY_SIZE, start + len(data))
        if lo < hi:
            self.legacy.update(data[lo - start:hi - start])
        self.sha.update(data)

    def _run(self) -> None:
        while True:
            item = self._queue.get()  # type: ignore[union-attr]
            if item is None:
                return
            start, data, on_done = item
            try:
                if self._error is None:
                    self._consume(start, data)
            except BaseException as e:  # reported by result()
                self._error = e
            finally:
                if on_done is not None:
                    on_done()

    def update(self, data: memoryview | bytes, on_done: Optional[Callable[[], None]] = None) -> None:
        start, self.pos = self.pos, self.pos + len(data)
        if self._queue is None:
            self._consume(start, data)
            if on_done is not None:
                on_done()
        else:
            self._queue.put((start, data, on_done))

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)  # type: ignore[union-attr]
            self._thread.join()
            self._thread = None

    def result(self) -> tuple[str, str]:
        """(sha256 hex, A1111 legacy hash) of everything fed."""
        self._stop()
        if self._error is not None:
            raise self._error
        return self.sha.hexdigest(), self.legacy.hexdigest()[:8]

    def close(self) -> None:
        self._stop()


class StreamingInput:
    """A safetensors input (header parsed by SafetensorsFile) read one tensor at a time, hashed in passing."""

    def __init__(self, path: Path, threaded_hash: bool = True):
        self.path = path
        self.file = SafetensorsFile(path)
        self.size = path.stat().st_size
        self.bytes_read = self.file.data_offset  # read_header read the header once
        items = sorted(self.file.tensors.items(), key=lambda kv: kv[1].start)
        self.tensors: dict[str, tuple[Optional[torch.dtype], tuple[int, ...]]] = {
            k: (self.file.dtype(k), i.shape) for k, i in items}  # key -> (dtype, shape), in file order
        self._hasher: Optional[_Hasher] = _Hasher(threaded_hash)
        self._fh = None
        self.extra_pass = False

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    def check_order(self, names: Sequence[str]) -> None:
        """Fall back to a separate hashing pass if `names` will not be requested in file order."""
        offsets = [self.file.tensors[n].start for n in names]
        if any(b < a for a, b in zip(offsets, offsets[1:])):
            self._drop_hasher()

    def _drop_hasher(self) -> None:
        """Hash by a separate pass at the end instead."""
        if self._hasher is not None:
            self._hasher.close()
        self._hasher, self.extra_pass = None, True

    def _handle(self):
        if self._fh is None:
            self._fh = open(self.path, "rb", buffering=0)
        return self._fh

    def _feed_until(self, target: int) -> None:
        """Read and hash the bytes from the hash position up to absolute offset `target`."""
        h = self._hasher
        if h is None or h.pos >= target:
            return
        fh = self._handle()
        fh.seek(h.pos)
        while h.pos < target:
            chunk = fh.read(min(_CHUNK, target - h.pos))
            if not chunk:
                raise SdtuneError(f"{self.path}: file is shorter than its header says")
            self.bytes_read += len(chunk)
            h.update(chunk)

    def get(self, name: str, pool: Optional[BufferPool] = None) -> tuple[torch.Tensor, Optional[bytearray]]:
        """Load one tensor with a plain read into a pooled buffer (no mmap); returns it and its buffer."""
        info = self.file.tensors[name]
        dtype = self.file.dtype(name)
        if dtype is None:
            raise SdtuneError(f"{self.path}: tensor {name!r} has dtype {info.dtype}, which this torch cannot hold")
        start, n = self.file.data_offset + info.start, info.end - info.start
        self._feed_until(start)
        tensor, buf = (pool or BufferPool(keep_bytes=0)).empty(info.shape, dtype)
        if buf is not None:
            if n != tensor.numel() * dtype.itemsize:
                raise SdtuneError(f"{self.path}: tensor {name!r} has {n} bytes for shape {list(info.shape)}")
            view = memoryview(buf)[:n]
            fh = self._handle()
            fh.seek(start)
            if fh.readinto(view) != n:
                raise SdtuneError(f"{self.path}: file is truncated inside tensor {name!r}")
            self.bytes_read += n
            h = self._hasher
            if h is not None:
                if h.pos == start and pool is not None:
                    pool.hold(buf)  # the hash thread gives it back when done
                    h.update(view, on_done=lambda: pool.release([buf]))
                elif h.pos == start:
                    h.update(bytes(view))
                else:  # asked out of file order after all: hash by a separate pass at the end
                    self._drop_hasher()
        return tensor, buf

    def finish(self) -> InputHashes:
        """Hash the rest of the file and return its hashes (a second pass only if reads were out of order)."""
        if self._hasher is None:
            self.bytes_read += self.size
            return InputHashes(file_sha256(self.path), legacy_hash(self.path), self.size)
        self._feed_until(self.size)
        sha, legacy = self._hasher.result()
        return InputHashes(sha, legacy, self.size)

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.close()
        self.file.close()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class MemoryInput:
    """An input loaded whole (.ckpt through torch.load(weights_only=True), or safetensors on request)."""

    def __init__(self, path: Path, threaded_hash: bool = True):
        self.path = path
        self.size = path.stat().st_size
        source = open_checkpoint(path)
        self._tensors = {k: source[k] for k in source}
        self.metadata: dict[str, str] = dict(source.metadata)
        self.bytes_read = self.size
        self.extra_pass = False

    @property
    def tensors(self) -> dict[str, tuple[Optional[torch.dtype], tuple[int, ...]]]:
        return {k: (t.dtype, tuple(t.shape)) for k, t in self._tensors.items()}

    def check_order(self, names: Sequence[str]) -> None:
        """Nothing to do: the file was read whole."""

    def get(self, name: str, pool: Optional[BufferPool] = None) -> tuple[torch.Tensor, Optional[bytearray]]:
        return self._tensors[name], None

    def finish(self) -> InputHashes:
        self.bytes_read += self.size
        return InputHashes(file_sha256(self.path), legacy_hash(self.path), self.size)

    def close(self) -> None:
        self._tensors = {}


MergeInput = StreamingInput | MemoryInput


def open_input(path: str | os.PathLike, label: str, in_memory: bool = False) -> MergeInput:
    """Open one merge input: streamed when it is safetensors (unless `in_memory`), else loaded whole."""
    p = Path(path)
    if not p.is_file():
        raise SdtuneError(f"{label}: {p} does not exist (or is not a file)")
    if p.suffix.lower() in SAFETENSORS_SUFFIXES and not in_memory:
        return StreamingInput(p)
    return MemoryInput(p)


def strip_vae_prefix(keys: Mapping[str, tuple], a_keys: Mapping[str, tuple], prefix: str) -> dict[str, str]:
    """Map A's `first_stage_model.*` keys to a VAE file's keys (bare `encoder.*` or already prefixed)."""
    out = {}
    for name in a_keys:
        if not name.startswith(prefix):
            continue
        bare = name[len(prefix):]
        if bare in keys:
            out[name] = bare
        elif name in keys:
            out[name] = name
    return out
