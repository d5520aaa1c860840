"""Atomic file writes: a temp file in the target folder, fsync, rename.

An interrupted or failed write leaves no partial file and never clobbers the old one,
because the rename is the only step that touches the final name.
"""

from __future__ import annotations

import contextlib
import glob
import os
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
    remove_stale_temps(target)
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


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temp files a killed writer of `target` left behind (their pid is gone)."""
    removed = []
    prefix = f".{target.name}."
    for cand in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid_part = cand.name[len(prefix):].split(".", 1)[0]
        if pid_part.isdigit() and not _pid_alive(int(pid_part)):
            with contextlib.suppress(OSError):
                cand.unlink()
                removed.append(cand)
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
