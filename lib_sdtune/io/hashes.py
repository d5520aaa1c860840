"""The model hashes users see in the hosts and on Civitai.

- `sha256`: of the whole file; A1111 shows its first 10 hex digits (Civitai "AutoV2").
- `autov1`: A1111's legacy hash, sha256 of 64 KiB at offset 1 MiB, 8 hex digits; sd-scripts
  writes the same value as `sshs_legacy_hash`.
- `sshs_model_hash`: sd-scripts' hash of the safetensors data section (header excluded, so it
  survives metadata edits); A1111 uses it for LoRA hashes (first 12 digits, "AutoV3").
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from .safetensors_io import build_header, st_dtype_name, tensor_bytes

_BLOCK = 1 << 20
LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000  # A1111 / sd-scripts legacy hash window


@dataclass(frozen=True)
class FileHashes:
    """Every hash a host or sd-scripts may show for one file."""

    sha256: str
    autov1: str
    autov2: str
    sshs_model_hash: Optional[str] = None  # safetensors only
    autov3: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111 `model_hash` / sd-scripts `sshs_legacy_hash`: sha256 of 0x10000 bytes at 0x100000."""
    with open(path, "rb") as fh:
        fh.seek(LEGACY_OFFSET)
        return hashlib.sha256(fh.read(LEGACY_SIZE)).hexdigest()[:8]


def safetensors_data_hash(path: str | os.PathLike) -> str:
    """sd-scripts `addnet_hash_safetensors`: sha256 of everything after the header."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the whole file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(path: str | os.PathLike) -> FileHashes:
    """All hashes of a model file (safetensors also gets the data-section hash)."""
    p = Path(path)
    full = file_sha256(p)
    data_hash = safetensors_data_hash(p) if p.suffix.lower() == ".safetensors" else None
    return FileHashes(sha256=full, autov1=legacy_hash(p), autov2=full[:10], sshs_model_hash=data_hash,
                      autov3=data_hash[:12] if data_hash else None)


def precalculate_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of the file serialised with only the ss_* metadata, in memory.

    Streams tensor bytes through sha256 in the writer's order (= safetensors' order), so nothing is
    serialised twice: the data hash does not depend on the header, and the legacy hash reads only the
    64 KiB window at 1 MiB of header + data.
    """
    specs = {k: (st_dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
    header, _, order = build_header(specs, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    data_hash, legacy = hashlib.sha256(), hashlib.sha256()
    pos = 0
    for chunk in [memoryview(header)] + [tensor_bytes(tensors[n]) for n in order]:
        lo, hi = max(LEGACY_OFFSET, pos), min(LEGACY_OFFSET + LEGACY_SIZE, pos + len(chunk))
        if lo < hi:
            legacy.update(chunk[lo - pos:hi - pos])
        if pos > 0:  # everything after the header is the data section
            data_hash.update(chunk)
        pos += len(chunk)
    return data_hash.hexdigest(), legacy.hexdigest()[:8]
