"""Atomic writes of many small files at once (captions): temp files, one flush to disk, renames.

`io.atomic.atomic_write` fsyncs every file, about 0.5 ms each here: 5 s for 10,000 captions. This
writes every temp file first, makes them durable together (one `syncfs` of the dataset's file system
on Linux, else one fsync per file), then renames each over its target and fsyncs each folder once.
Folders are handled in parallel threads. Temp names are `.<name>.<pid>.b<n>.tmp`, the pattern
`atomic_write` also cleans when the writing process has died.
Each file is still replaced atomically: a reader sees the old caption or the new one, never a mix,
and a failure before the renames leaves every target untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..io.atomic import _pid_alive, fsync_dir

SMALL_BATCH = 16  # up to this many files, fsync each one (cheaper than flushing the whole file system)
THREADS = 4  # folders written at once


def _syncfs(folder: Path) -> bool:
    """Flush the file system holding `folder` (Linux syncfs); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(folder, os.O_RDONLY)
    except (OSError, AttributeError):
        return False
    try:
        return getattr(libc, "syncfs", None) is not None and libc.syncfs(fd) == 0
    finally:
        os.close(fd)


def _sync_all(folders: set[str]) -> bool:
    """syncfs once per file system the folders are on; False when any could not be flushed that way."""
    devices: dict[int, str] = {}
    for folder in folders:
        devices.setdefault(os.stat(folder).st_dev, folder)
    return all(_syncfs(Path(folder)) for folder in devices.values())


def remove_stale_batch_temps(folder: str, names: set[str]) -> None:
    """Delete temp files of these targets left by a killed writer (one folder scan, not one per file)."""
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return
    for name in entries:
        parts = name[1:-4].rsplit(".", 2)
        if len(parts) == 3 and parts[0] in names and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


@dataclass
class _Folder:
    """The writes going to one folder: (target name, temp name, bytes or None), and what was done so far."""

    path: str
    jobs: list[tuple[str, str, bytes | None]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    renamed: int = 0
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)


def _write_temps(f: _Folder, fsync_each: bool) -> None:
    """Create and fill every temp file of one folder."""
    remove_stale_batch_temps(f.path, {name for name, _, _ in f.jobs})
    for name, tmp_name, data in f.jobs:
        if data is None:
            continue
        tmp = os.path.join(f.path, tmp_name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        f.created.append(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync_each:
                os.fsync(fd)
            st = os.fstat(fd)
            f.stamps[name] = (st.st_mtime_ns, st.st_size)
        finally:
            os.close(fd)


def _rename_all(f: _Folder) -> None:
    """Move every temp of one folder over its target, delete the targets meant to go, fsync the folder once."""
    for name, tmp_name, data in f.jobs:
        target = os.path.join(f.path, name)
        if data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
        else:
            os.replace(os.path.join(f.path, tmp_name), target)
            f.renamed += 1
    fsync_dir(f.path)


def _each(folders: list[_Folder], fn, *args) -> None:
    """Run fn on every folder (in threads when there are several: directory operations of different folders
    proceed in parallel in the kernel); re-raise the first error after all have stopped."""
    if len(folders) == 1 or THREADS == 1:
        for f in folders:
            fn(f, *args)
        return
    with ThreadPoolExecutor(max_workers=min(THREADS, len(folders)), thread_name_prefix="sdtune-write") as pool:
        futures = [pool.submit(fn, f, *args) for f in folders]
    for fut in futures:
        fut.result()


def write_many(files: Mapping[str | os.PathLike, bytes | None]) -> dict[str, tuple[int, int]]:
    """Replace each path's content atomically (None deletes it); returns (mtime_ns, size) by path string."""
    folders: dict[str, _Folder] = {}
    pid = os.getpid()
    for n, (target, data) in enumerate(files.items()):
        folder, name = os.path.split(os.fspath(target))
        f = folders.get(folder)
        if f is None:
            f = folders[folder] = _Folder(folder)
        f.jobs.append((name, f".{name}.{pid}.b{n}.tmp", data))
    groups = list(folders.values())
    fsync_each = len(files) <= SMALL_BATCH
    try:
        _each(groups, _write_temps, fsync_each)
        made = [f.path for f in groups if f.created]
        if made and not fsync_each and not _sync_all(set(made)):
            for f in groups:
                for tmp in f.created:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        _each(groups, _rename_all)
    except BaseException:
        for f in groups:
            for tmp in f.created[f.renamed:]:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        raise
    return {os.path.join(f.path, name): st for f in groups for name, st in f.stamps.items()}
