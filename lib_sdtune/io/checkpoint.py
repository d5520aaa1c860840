"""Open a model file as a lazy state-dict source: names and shapes now, tensors on demand.

`.safetensors` is read tensor by tensor. `.ckpt`/`.pt`/`.pth`/`.bin` only through
`torch.load(weights_only=True)`, which refuses pickled code; nothing else is opened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch

from ..errors import SdtuneError, UnsafeFileError
from .safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class StateDictSource(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> tensor that loads tensors only when asked.

    `shape(k)` and `dtype(k)` answer from the header without loading; `metadata` holds the
    safetensors `__metadata__` (empty for other formats).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, Optional[torch.dtype]],
                 loader, metadata: Optional[Mapping[str, str]] = None, path: Optional[Path] = None):
        self._shapes = dict(shapes)
        self._dtypes = dict(dtypes)
        self._loader = loader
        self.metadata = dict(metadata or {})
        self.path = path

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        return self._loader(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> Optional[torch.dtype]:
        return self._dtypes[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def numel(self, key: str) -> int:
        n = 1
        for s in self._shapes[key]:
            n *= s
        return n


def source_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None
                        ) -> StateDictSource:
    """Wrap in-memory (or meta-device) tensors as a source."""
    return StateDictSource({k: tuple(v.shape) for k, v in tensors.items()},
                           {k: v.dtype for k, v in tensors.items()}, tensors.__getitem__, metadata)


def source_from_shapes(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float16) -> StateDictSource:
    """A source of meta tensors with the given shapes: checks full-size layouts without any memory."""
    def make(key: str) -> torch.Tensor:
        return torch.empty(shapes[key], dtype=dtype, device="meta")

    return StateDictSource({k: tuple(v) for k, v in shapes.items()}, {k: dtype for k in shapes}, make)


def _unwrap(obj, path: Path) -> dict:
    """Find the tensor dict inside a torch checkpoint ({"state_dict": ...} as Lightning saves)."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SdtuneError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SdtuneError(f"{path}: contains no tensors")
    return tensors


def open_checkpoint(path: str | os.PathLike) -> StateDictSource:
    """Open a model file safely; refuses anything that would need unpickling code."""
    p = Path(path)
    if p.is_dir():
        raise SdtuneError(f"{p}: a folder, not a model file (a diffusers model folder needs its model_index.json)")
    if not p.is_file():
        raise SdtuneError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        sf = SafetensorsFile(p)
        shapes = {k: i.shape for k, i in sf.tensors.items()}
        dtypes = {k: sf.dtype(k) for k in sf.tensors}
        return StateDictSource(shapes, dtypes, sf.get_tensor, sf.metadata, p)
    if suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise UnsafeFileError(_pickle_refusal(p, e)) from e
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only raises UnpicklingError for any non-tensor object
            raise UnsafeFileError(_pickle_refusal(p, e)) from e
        tensors = _unwrap(obj, p)
        src = source_from_tensors(tensors)
        src.path = p
        return src
    raise SdtuneError(f"{p}: unsupported file type {suffix or '(none)'}; sdtune reads .safetensors, "
                      f"and {', '.join(PICKLE_SUFFIXES)} only as plain tensors")


def _pickle_refusal(p: Path, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"{p}: refused to load. This pickle file holds more than plain tensors, and loading it could run "
            f"code hidden in it ({first}). Convert it to .safetensors with a tool you trust, or download the "
            f".safetensors version of the model.")
