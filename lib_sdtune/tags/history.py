"""An editing session over one loaded dataset: batch edits written at once, with undo/redo and a backup.

Every step writes its captions atomically (`atomic_batch`), after saving the originals of the captions
it touches for the first time into the session's backup zip (`backup.py`). Undo and redo write the
exact bytes back; a caption another program changed meanwhile stops the step before anything is written.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import SdtuneError
from .backup import CaptionBackup
from .ops import TagOp, apply_ops, select
from .store import CaptionStore, LoadConfig, check_unchanged, encode_caption, load_captions

UNDO_LIMIT = 100  # steps
UNDO_BYTES = 64 << 20  # caption bytes kept for undo/redo; the oldest steps go first (a host runs for days)


@dataclass
class Step:
    """One written change: per item index, caption bytes before and after (None: no caption file)."""

    label: str
    before: dict[int, bytes | None]
    after: dict[int, bytes | None]

    @property
    def size(self) -> int:
        """Bytes this step holds."""
        return sum(len(d) for side in (self.before, self.after) for d in side.values() if d is not None)


@dataclass(frozen=True)
class EditResult:
    """What an edit (or undo/redo) did."""

    selected: int
    changed: list[Path]
    backup: Path | None
    seconds: float
    dry_run: bool = False
    skipped_unreadable: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary (the CLI's `--json`)."""
        return {"selected": self.selected, "changed": len(self.changed), "files": [str(p) for p in self.changed],
                "backup": str(self.backup) if self.backup else None, "seconds": round(self.seconds, 4),
                "dry_run": self.dry_run, "skipped_unreadable": [str(p) for p in self.skipped_unreadable]}


def _locked(method):
    """Run a session method under the session's lock (a UI may send two requests at once)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class EditSession:
    """Batch edits of one dataset with undo/redo; the first write saves a backup of what it changes."""

    def __init__(self, store: CaptionStore, backup: bool = True, undo_limit: int = UNDO_LIMIT):
        self.store = store
        self.backup = CaptionBackup(store.root) if backup else None
        self.undo_limit = undo_limit
        self._undo: list[Step] = []
        self._redo: list[Step] = []
        self._lock = threading.RLock()

    @classmethod
    def open(cls, dataset: str | os.PathLike, config: LoadConfig | None = None, backup: bool = True) -> EditSession:
        """Load a dataset and start a session on it."""
        return cls(load_captions(dataset, config or LoadConfig()), backup=backup)

    @property
    def can_undo(self) -> bool:
        """True when there is a step to undo."""
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        """True when there is an undone step to redo."""
        return bool(self._redo)

    @_locked
    def apply(self, ops: Sequence[TagOp], where: str | None = None, indices: Sequence[int] | None = None,
              dry_run: bool = False, label: str = "") -> EditResult:
        """Run ops over the selection (an expression and/or item indices) and write the changed captions."""
        t0 = time.perf_counter()
        chosen = select(self.store, where, indices)
        pool = range(len(self.store.items)) if indices is None else indices
        skipped = [self.store.items[i].caption for i in pool if self.store.items[i].error]
        new_tags = apply_ops(self.store, ops, chosen)
        if dry_run:
            changed = [self.store.items[i].caption for i in new_tags]
            return EditResult(len(chosen), changed, None, time.perf_counter() - t0, True, skipped)
        after = {i: encode_caption(tags) for i, tags in new_tags.items()}
        step = Step(label or ", ".join(type(op).__name__ for op in ops), {}, after)
        backup = self.write_step(step)
        return EditResult(len(chosen), [self.store.items[i].caption for i in after], backup,
                          time.perf_counter() - t0, False, skipped)

    def preview(self, ops: Sequence[TagOp], where: str | None = None,
                indices: Sequence[int] | None = None) -> dict[int, tuple[list[str], list[str]]]:
        """What `apply` would change, writing nothing: item index -> (tags now, tags after)."""
        new_tags = apply_ops(self.store, ops, select(self.store, where, indices))
        return {i: (list(self.store.items[i].tags), tags) for i, tags in new_tags.items()}

    @_locked
    def write_tags(self, new_tags: dict[int, list[str]], label: str) -> EditResult:
        """Write given tag lists as one undoable step (used by the tagger)."""
        t0 = time.perf_counter()
        after = {i: encode_caption(t) for i, t in new_tags.items() if encode_caption(t) != self.store.items[i].raw}
        backup = self.write_step(Step(label, {}, after))
        return EditResult(len(new_tags), [self.store.items[i].caption for i in after], backup, time.perf_counter() - t0)

    def write_step(self, step: Step) -> Path | None:
        """Back up, write and record a step; its `before` is filled from the store."""
        items = self.store.items
        step.before = {i: items[i].raw for i in step.after}
        if not step.after:
            return self.backup.path if self.backup else None
        for i in step.after:  # before the backup links the files: they must still hold what was loaded
            check_unchanged(items[i])
        backup_path = self._backup(step.before)
        self.store.write_bytes(step.after, checked=True)
        self._undo.append(step)
        self._redo.clear()
        del self._undo[:-self.undo_limit]
        while len(self._undo) > 1 and sum(st.size for st in self._undo) > UNDO_BYTES:
            del self._undo[0]
        return backup_path

    def _backup(self, before: dict[int, bytes | None]) -> Path | None:
        """Save originals of captions this session has not changed yet."""
        if self.backup is None:
            return None
        items, rel = self.store.items, self.store.rel
        paths = {rel(items[i].caption_path): items[i].caption_path for i in before}
        return self.backup.add({rel(items[i].caption_path): data for i, data in before.items()}, paths)

    @_locked
    def undo(self) -> EditResult:
        """Write back the captions as they were before the last step."""
        if not self._undo:
            raise SdtuneError("nothing to undo in this editing session")
        return self._move(self._undo, self._redo, "before")

    @_locked
    def redo(self) -> EditResult:
        """Write again the last undone step."""
        if not self._redo:
            raise SdtuneError("nothing to redo in this editing session")
        return self._move(self._redo, self._undo, "after")

    def _move(self, source: list[Step], target: list[Step], side: str) -> EditResult:
        t0 = time.perf_counter()
        step = source[-1]
        data = getattr(step, side)
        for i in data:
            check_unchanged(self.store.items[i])
        backup_path = self._backup({i: self.store.items[i].raw for i in data})
        self.store.write_bytes(data, checked=True)
        target.append(source.pop())
        return EditResult(len(data), [self.store.items[i].caption for i in data], backup_path,
                          time.perf_counter() - t0)

    def history(self) -> tuple[list[str], list[str]]:
        """Labels of undoable and redoable steps, oldest first."""
        return [s.label for s in self._undo], [s.label for s in self._redo]


@dataclass(frozen=True)
class EditConfig:
    """A one-shot batch edit (the CLI's `tag edit`): ops over the images matching `where`."""

    dataset: Path
    ops: tuple[TagOp, ...]
    where: str | None = None
    caption_extension: str = ".txt"
    backup: bool = True
    dry_run: bool = False


def edit_captions(config: EditConfig, preview: dict | None = None) -> EditResult:
    """Load, edit and write a dataset in one go (atomic, backed up); fills `preview` (caption -> (old, new))."""
    session = EditSession.open(config.dataset, LoadConfig(config.caption_extension), backup=config.backup)
    if preview is not None:
        items = session.store.items
        preview.update({items[i].caption: pair for i, pair in session.preview(config.ops, config.where).items()})
    return session.apply(config.ops, config.where, dry_run=config.dry_run)
