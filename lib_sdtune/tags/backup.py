"""Caption backups: the original captions an editing session changes, in one JSON file under the dataset.

Layout: `<dataset>/.sdtune_backups/captions-<UTC time>.json`::

    {"format": "sdtune caption backup 1", "dataset": "...",
     "files": {"10_name/0001.txt": "original text", "10_name/0002.txt": null, ...},
     "bytes_base64": {"10_name/0003.txt": "..."}}

`files` maps each changed caption (path relative to the dataset) to its text before the session; `null`
means it did not exist (restoring deletes it); captions that are not UTF-8 are kept as base64. One JSON
file, not a zip of small files: writing 10,000 zip members alone takes longer than the edit. The first
write of a session creates it; later writes add the captions they change for the first time (rewritten
atomically), so it always holds the state before the session. `restore_backup` puts it back.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdtuneError
from ..io.atomic import atomic_write
from .store import LoadConfig, load_captions

BACKUP_DIR = ".sdtune_backups"
FORMAT = "sdtune caption backup 1"


def _stamp() -> str:
    """UTC time for backup names, sortable."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


@dataclass
class CaptionBackup:
    """The originals of every caption changed so far in one session, and the zip that holds them."""

    dataset: Path
    prefix: str = "captions"
    path: Path | None = None
    originals: dict[str, bytes | None] = field(default_factory=dict)  # relative path -> bytes (None: absent)

    def add(self, originals: dict[str, bytes | None]) -> Path | None:
        """Record captions not yet backed up and rewrite the zip if any were new; returns the zip path."""
        new = {k: v for k, v in originals.items() if k not in self.originals}
        if not new:
            return self.path
        self.originals.update(new)
        if self.path is None:
            folder = self.dataset / BACKUP_DIR
            folder.mkdir(parents=True, exist_ok=True)
            base, n = f"{self.prefix}-{_stamp()}", 1
            self.path = folder / f"{base}.json"
            while self.path.exists():
                n += 1
                self.path = folder / f"{base}-{n}.json"
        texts: dict[str, str | None] = {}
        binary: dict[str, str] = {}
        for rel, data in sorted(self.originals.items()):
            try:
                texts[rel] = None if data is None else data.decode("utf-8")
            except UnicodeDecodeError:
                binary[rel] = base64.b64encode(data).decode("ascii")
        doc = {"format": FORMAT, "dataset": str(self.dataset), "files": texts, "bytes_base64": binary}
        with atomic_write(self.path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, ensure_ascii=False, indent=0)
        return self.path


def list_backups(dataset: str | os.PathLike) -> list[Path]:
    """Caption backup files of a dataset, oldest first."""
    folder = Path(dataset) / BACKUP_DIR
    return sorted(folder.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if folder.is_dir() else []


@dataclass(frozen=True)
class RestoreResult:
    """What a restore wrote, deleted, and where the captions it replaced were saved."""

    restored: list[Path]
    deleted: list[Path]
    backup: Path | None


def restore_backup(dataset: str | os.PathLike, backup: str | os.PathLike | None = None,
                   config: LoadConfig | None = None) -> RestoreResult:
    """Put back the captions of a backup (the newest when none is named); the current ones are backed up first."""
    dataset = Path(dataset)
    if backup is None:
        found = list_backups(dataset)
        if not found:
            raise SdtuneError(f"{dataset}: no caption backup in {dataset / BACKUP_DIR}")
        backup = found[-1]
    backup = Path(backup)
    try:
        doc = json.loads(backup.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
        wanted: dict[str, bytes | None] = {
            rel: None if text is None else text.encode("utf-8") for rel, text in doc["files"].items()}
        wanted.update({rel: base64.b64decode(b) for rel, b in doc.get("bytes_base64", {}).items()})
    except (OSError, KeyError, ValueError, AttributeError) as e:
        raise SdtuneError(f"{backup}: not a readable sdtune caption backup ({e})") from e
    for rel in wanted:
        target = (dataset / rel).resolve()
        if dataset.resolve() not in target.parents:
            raise SdtuneError(f"{backup}: entry {rel!r} points outside the dataset; refusing to restore it")
    if config is None:  # the extension the backed-up captions have
        config = LoadConfig(Path(next(iter(wanted))).suffix if wanted else ".txt")
    store = load_captions(dataset, config)
    by_caption = {store.rel(it.caption_path): i for i, it in enumerate(store.items)}
    missing = [rel for rel in wanted if rel not in by_caption]
    if missing:
        raise SdtuneError(f"{backup}: {len(missing)} caption(s) belong to images that are gone or to another "
                          f"caption extension (first: {missing[0]}); restore with the matching extension")
    changes = {by_caption[rel]: data for rel, data in wanted.items() if store.items[by_caption[rel]].raw != data}
    saved = CaptionBackup(dataset, prefix="before-restore")
    saved.add({store.rel(store.items[i].caption_path): store.items[i].raw for i in changes})
    store.write_bytes(changes)
    restored = [store.items[i].caption for i, d in changes.items() if d is not None]
    deleted = [store.items[i].caption for i, d in changes.items() if d is None]
    return RestoreResult(restored, deleted, saved.path)
