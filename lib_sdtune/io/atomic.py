"""Atomic file writes: a temp file in the target folder, fsync, rename.

An interrupted or failed write leaves no partial file and never clobbers the old one,
because the rename is the only step that touches the final name.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(folder: str | os.PathLike) -> None:
    """Persist a rename in `folder` (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a file object for a temp file beside `path`; on success it replaces `path` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists():
            with contextlib.suppress(OSError):
                os.chmod(tmp, target.stat().st_mode & 0o777)
        else:
            with contextlib.suppress(OSError):
                os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        fsync_dir(target.parent)
        folder = os.path.abspath(target.parent)
        _quiet_since[folder] = _folder_mtime(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]*\.tmp$")  # .<name>.<pid>.<random>.tmp, as atomic_write names them
_quiet_since: dict[str, int] = {}  # folder -> its mtime right after our last write there


def _folder_mtime(folder: str) -> int:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return -1


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files that killed writers left in `folder` (their pid is gone).

    The folder is listed only when something else changed it since our last write there: a folder of
    10,000 captions would otherwise be listed on every one of 10,000 writes.
    """
    key = os.path.abspath(folder)
    if _quiet_since.get(key) == _folder_mtime(key):
        return []
    removed = []
    with contextlib.suppress(OSError), os.scandir(key) as entries:
        for entry in entries:
            m = _TEMP_NAME.match(entry.name)
            if m and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
