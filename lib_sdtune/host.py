"""What a face tells the core about its host: model folders, and where UI paths may point.

Paths that come from a UI are resolved and confined to these folders, so a crafted request
cannot make sdtune read or write elsewhere on the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import SdtuneError

CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".sft")


@dataclass(frozen=True)
class HostFolders:
    """Model and dataset folders of the host (A1111 `models/…`, ComfyUI `folder_paths`, or the CLI's)."""

    checkpoints: Sequence[Path] = field(default_factory=tuple)
    loras: Sequence[Path] = field(default_factory=tuple)
    datasets: Sequence[Path] = field(default_factory=tuple)

    @classmethod
    def under(cls, models_dir: str | os.PathLike, datasets_dir: str | os.PathLike | None = None) -> HostFolders:
        """The A1111 layout below one models folder: `Stable-diffusion/`, `Lora/`."""
        root = Path(models_dir)
        return cls(checkpoints=(root / "Stable-diffusion",), loras=(root / "Lora",),
                   datasets=(Path(datasets_dir),) if datasets_dir else ())


def confine(path: str | os.PathLike, roots: Iterable[Path], what: str = "file") -> Path:
    """Resolve `path` (absolute, or relative to the first root) and refuse it outside every root."""
    roots = [Path(r).resolve() for r in roots]
    if not roots:
        raise SdtuneError(f"no folder is configured for this {what}")
    p = Path(path)
    resolved = (p if p.is_absolute() else roots[0] / p).resolve()
    for root in roots:
        if resolved == root or root in resolved.parents:
            return resolved
    raise SdtuneError(f"{path}: outside the allowed {what} folders ({', '.join(str(r) for r in roots)})")


def list_files(roots: Iterable[Path], exts: Sequence[str] = CHECKPOINT_EXTS) -> list[str]:
    """Files under the roots (recursively) as paths relative to their root, sorted, for dropdowns."""
    found: list[str] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
                found.append(p.relative_to(root).as_posix())
    return found


def resolve_listed(name: str, roots: Iterable[Path], what: str = "model") -> Path:
    """The file a dropdown entry names, confined to the roots it was listed from."""
    roots = list(roots)
    for root in roots:
        cand = Path(root) / name
        if cand.is_file():
            return confine(cand, roots, what)
    raise SdtuneError(f"{name}: no such {what} in {', '.join(str(r) for r in roots)}")
