"""The caption store: every image of a dataset folder (recursively) with its caption's tags.

Kohya folders (`10_name/`) are plain subfolders here. A caption is the file beside the image with the
image's stem and the caption extension (`.txt` by default, as kohya's `os.path.splitext(img)[0] + ext`).
Folders and files whose name starts with a dot (backups, `.git`) are skipped. A caption that is not
UTF-8 is kept with its bytes and an `error`, never rewritten by an edit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import SdtuneError
from .atomic_batch import write_many
from .text import join_tags, split_tags

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class LoadConfig:
    """How to read a dataset: caption extension (with its dot) and whether to descend into subfolders."""

    caption_extension: str = ".txt"
    recursive: bool = True

    def __post_init__(self) -> None:
        """Refuse extensions that could name the images themselves."""
        ext = self.caption_extension
        if not ext.startswith(".") or len(ext) < 2 or ext.lower() in IMAGE_EXTS or "/" in ext or "\\" in ext:
            raise SdtuneError(f"caption extension {ext!r}: use a dot and a name that is not an image type, "
                              f"such as .txt or .caption")


@dataclass
class CaptionItem:
    """One image and its caption as last read or written by sdtune (paths are built on demand: 10k Paths cost)."""

    folder: Path
    image_name: str
    caption_name: str
    tags: list[str]
    raw: bytes | None  # the caption file's bytes; None when there is no caption file
    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the caption file when read or written
    error: str | None = None  # why the caption could not be read; its tags are then empty
    bom: bool = False
    multiline: bool = False
    caption_path: str = ""  # the caption file as a string (what bulk writes use); filled in from folder + name

    def __post_init__(self) -> None:
        """Join the caption path once (bulk operations use it several times per item)."""
        if not self.caption_path:
            self.caption_path = os.path.join(self.folder, self.caption_name)

    @property
    def image(self) -> Path:
        """The image file."""
        return self.folder / self.image_name

    @property
    def caption(self) -> Path:
        """The caption file (it may not exist)."""
        return self.folder / self.caption_name

    @property
    def has_caption(self) -> bool:
        """True when a caption file exists."""
        return self.raw is not None


@dataclass
class CaptionStore:
    """A loaded dataset: items sorted by path, captions without an image, and the load time."""

    root: Path
    caption_extension: str
    items: list[CaptionItem]
    orphan_captions: list[Path] = field(default_factory=list)
    load_seconds: float = 0.0

    def rel(self, path: str | os.PathLike) -> str:
        """A path inside the dataset relative to its root, with forward slashes."""
        text, root = os.fspath(path), os.fspath(self.root).rstrip(os.sep) + os.sep
        if not text.startswith(root):
            return Path(text).relative_to(self.root).as_posix()
        rel = text[len(root):]
        return rel.replace(os.sep, "/") if os.sep != "/" else rel

    def unreadable(self) -> list[CaptionItem]:
        """Items whose caption could not be decoded (edits skip them)."""
        return [it for it in self.items if it.error]

    def write(self, new_tags: Mapping[int, list[str] | None]) -> None:
        """Write the tag lists of items by index (None deletes the caption file); atomic, conflict-checked."""
        self.write_bytes({i: None if t is None else encode_caption(t) for i, t in new_tags.items()})

    def write_bytes(self, changes: Mapping[int, bytes | None], checked: bool = False) -> None:
        """Write caption bytes of items by index (None deletes the file), all or nothing if any changed on disk.

        `checked`: the caller has just run `check_unchanged` on every item itself.
        """
        files: dict[str, bytes | None] = {}
        for i, data in changes.items():
            item = self.items[i]
            if not checked:
                check_unchanged(item)
            files[item.caption_path] = data
        stamps = write_many(files)
        for i, data in changes.items():
            item = self.items[i]
            item.raw, item.stamp, item.error = data, stamps.get(item.caption_path), None
            item.tags, item.bom, item.multiline = ([], False, False) if data is None else decode_caption(data)


def encode_caption(tags: list[str]) -> bytes:
    """Caption file bytes: tags joined with ", ", UTF-8 without BOM (kohya reads a BOM into the first tag)."""
    return join_tags(tags).encode("utf-8")


def decode_caption(data: bytes) -> tuple[list[str], bool, bool]:
    """(tags, had a BOM, had several non-empty lines); raises UnicodeDecodeError for non-UTF-8 bytes."""
    bom = data.startswith(BOM)
    text = data[3:].decode("utf-8") if bom else data.decode("utf-8")
    text = text.strip()
    multiline = ("\n" in text or "\r" in text) and sum(1 for line in text.splitlines() if line.strip()) > 1
    return split_tags(text), bom, multiline


def check_unchanged(item: CaptionItem) -> None:
    """Refuse to overwrite a caption that another program changed since sdtune read it."""
    try:
        st = os.stat(item.caption_path)
        now = (st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        now = None
    expected = item.stamp if item.raw is not None else None
    if now != expected:
        raise SdtuneError(f"{item.caption}: the caption changed on disk since it was loaded (another program or "
                          f"editor wrote it). Nothing was written; reload the dataset and redo the edit.")


def read_item(folder: Path, image_name: str, caption_name: str, exists: bool) -> CaptionItem:
    """Read one image's caption (if present) into an item."""
    if not exists:
        return CaptionItem(folder, image_name, caption_name, [], None)
    path = os.path.join(folder, caption_name)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        chunks = [os.read(fd, max(st.st_size, 1) + 1)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    data = b"".join(chunks)
    item = CaptionItem(folder, image_name, caption_name, [], data, (st.st_mtime_ns, st.st_size), caption_path=path)
    try:
        item.tags, item.bom, item.multiline = decode_caption(data)
    except UnicodeDecodeError as e:
        item.error = (f"not UTF-8 text (byte {e.start}); re-save it as UTF-8 in a text editor. "
                      f"sdtune leaves it untouched")
    return item


def _walk(folder: Path, recursive: bool, out: list[tuple[Path, list[str]]], seen: set[tuple[int, int]]) -> None:
    """Collect (folder, file names) for every non-hidden folder; symlinked folders are followed once."""
    st = os.stat(folder)
    if (st.st_dev, st.st_ino) in seen:
        return
    seen.add((st.st_dev, st.st_ino))
    names, subdirs = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subdirs.append(entry.name)
            else:
                names.append(entry.name)
    out.append((folder, names))
    if recursive:
        for name in sorted(subdirs):
            _walk(folder / name, recursive, out, seen)


def load_captions(root: str | os.PathLike, config: LoadConfig | None = None) -> CaptionStore:
    """Load every image under `root` with its caption; sorted by relative path."""
    t0 = time.perf_counter()
    config = config or LoadConfig()
    root = Path(root)
    if not root.is_dir():
        raise SdtuneError(f"{root}: not a folder. Give the dataset folder that holds the images and captions.")
    listing: list[tuple[Path, list[str]]] = []
    _walk(root, config.recursive, listing, set())
    ext = config.caption_extension
    items: list[CaptionItem] = []
    orphans: list[Path] = []
    for folder, names in listing:
        present = set(names)
        stems = set()
        for name in sorted(names):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_EXTS:
                stems.add(stem)
                cap = stem + ext
                items.append(read_item(folder, name, cap, cap in present))
        for name in names:
            if name.endswith(ext) and name[:-len(ext)] not in stems:
                orphans.append(folder / name)
    return CaptionStore(root, ext, items, sorted(orphans), time.perf_counter() - t0)
