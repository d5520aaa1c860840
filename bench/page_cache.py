"""Cold-read benches: evict input files from the page cache so each run reads them from disk."""

from __future__ import annotations

import os
from pathlib import Path


def drop_cache(*paths: Path) -> None:
    """Evict files from the page cache, so every run reads from disk (cold)."""
    for p in paths:
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
