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
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_SKIPPED_DIRS = ("__pycache__",)  # plus every folder whose name starts with a dot (backups, .git)


@dataclass(frozen=True)
class HostFolders:
    """Model and dataset folders of the host (A1111 `models/…`, ComfyUI `folder_paths`, or the CLI's)."""

    checkpoints: Sequence[Path] = field(default_factory=tuple)
    loras: Sequence[Path] = field(default_factory=tuple)
    datasets: Sequence[Path] = field(default_factory=tuple)
    vaes: Sequence[Path] = field(default_factory=tuple)

    @classmethod
    def under(cls, models_dir: str | os.PathLike, datasets_dir: str | os.PathLike | None = None) -> HostFolders:
        """The A1111 layout below one models folder: `Stable-diffusion/`, `Lora/`, `VAE/`."""
        root = Path(models_dir)
        return cls(checkpoints=(root / "Stable-diffusion",), loras=(root / "Lora",),
                   datasets=(Path(datasets_dir),) if datasets_dir else (), vaes=(root / "VAE",))


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


def _is_dataset_folder(folder: Path) -> bool:
    """A folder holding images, or a kohya parent (`<repeats>_<name>` sub-folders)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    if any(e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS for e in entries):
        return True
    return any(e.is_dir() and e.name.split("_", 1)[0].isdigit() and "_" in e.name for e in entries)


def list_folders(roots: Iterable[Path], max_depth: int = 3) -> list[str]:
    """Dataset folders under the roots (image folders and kohya parents, `max_depth` levels down) as paths
    relative to their root, for dropdowns; hidden folders (backups) are skipped."""
    found: list[str] = []
    for root in roots:
        root = Path(root)
        todo = [(root, 0)] if root.is_dir() else []
        while todo:
            folder, depth = todo.pop()
            if depth and _is_dataset_folder(folder):
                found.append(folder.relative_to(root).as_posix())
            if depth < max_depth:
                try:
                    subs = [Path(e.path) for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")
                            and e.name not in _SKIPPED_DIRS]
                except OSError:
                    continue
                todo += [(s, depth + 1) for s in subs]
    return sorted(found)


def resolve_folder(name: str, roots: Iterable[Path], what: str = "dataset") -> Path:
    """The folder a dropdown entry or a typed path names (relative to any root, or absolute), confined to the
    roots; refused when it is not an existing folder."""
    roots = list(roots)
    name = (name or "").strip()
    if not name:
        raise SdtuneError(f"choose a {what} folder first")
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(r).resolve() / name for r in roots]
    for cand in candidates:
        if cand.is_dir():
            return confine(cand, roots, f"{what} folder")
    confine(candidates[0] if candidates else name, roots, f"{what} folder")  # outside the roots: say so first
    raise SdtuneError(f"{name}: no such {what} folder in {', '.join(str(r) for r in roots)}")
