"""Batch tag edits: each operation, selections, undo/redo, the once-per-session backup, atomicity, conflicts."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from lib_sdtune.errors import SdtuneError
from lib_sdtune.tags import atomic_batch
from lib_sdtune.tags.backup import BACKUP_DIR, MANIFEST, list_backups, read_backup, restore_backup
from lib_sdtune.tags.history import EditConfig, EditSession, edit_captions
from lib_sdtune.tags.ops import (
    AddTag,
    Dedupe,
    EscapeParens,
    RemoveTag,
    ReplaceTag,
    SortTags,
    Underscores,
)
from lib_sdtune.tags.store import load_captions

CAPTIONS = {
    "10_a/1.png": "alice, long_hair, smile, smile",
    "10_a/2.png": "alice, short_hair, ^_^, hat",
    "10_a/3.png": "bob, long_hair, hatsune miku (vocaloid)",
    "5_b/4.png": None,
}


def make(root: Path, captions=CAPTIONS) -> Path:
    for rel, text in captions.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(p)
        if text is not None:
            p.with_suffix(".txt").write_text(text, encoding="utf-8")
    return root


def caps(root: Path) -> dict:
    return {rel: (root / rel).with_suffix(".txt").read_text("utf-8") if (root / rel).with_suffix(".txt").exists()
            else None for rel in CAPTIONS}


def run(root: Path, *ops, where=None):
    return EditSession.open(root).apply(list(ops), where)


@pytest.mark.parametrize("ops, where, expect", [
    ([AddTag("trig")], "long_hair OR NOT *", {"10_a/1.png": "trig, alice, long_hair, smile, smile",
                                              "10_a/3.png": "trig, bob, long_hair, hatsune miku (vocaloid)",
                                              "5_b/4.png": "trig"}),
    ([AddTag("smile")], "alice", {"10_a/1.png": "smile, alice, long_hair",
                                  "10_a/2.png": "smile, alice, short_hair, ^_^, hat"}),
    ([AddTag("end", "end")], "bob", {"10_a/3.png": "bob, long_hair, hatsune miku (vocaloid), end"}),
    ([RemoveTag("smile")], None, {"10_a/1.png": "alice, long_hair"}),
    ([RemoveTag(r".*_hair", regex=True)], None, {"10_a/1.png": "alice, smile, smile", "10_a/2.png": "alice, ^_^, hat",
                                                "10_a/3.png": "bob, hatsune miku (vocaloid)"}),
    ([ReplaceTag("long_hair", "long hair")], None, {"10_a/1.png": "alice, long hair, smile, smile",
                                                    "10_a/3.png": "bob, long hair, hatsune miku (vocaloid)"}),
    ([ReplaceTag("hat", "cap, red headwear")], None, {"10_a/2.png": "alice, short_hair, ^_^, cap, red headwear"}),
    ([ReplaceTag(r"^(\w+)_hair$", r"\1 hair", regex=True)], "NOT bob",
     {"10_a/1.png": "alice, long hair, smile, smile", "10_a/2.png": "alice, short hair, ^_^, hat"}),
    ([Dedupe()], None, {"10_a/1.png": "alice, long_hair, smile"}),
    ([SortTags("alpha", keep_first=1)], "alice", {"10_a/2.png": "alice, ^_^, hat, short_hair"}),
    ([Underscores("spaces")], None, {"10_a/1.png": "alice, long hair, smile, smile",
                                     "10_a/2.png": "alice, short hair, ^_^, hat",
                                     "10_a/3.png": "bob, long hair, hatsune miku (vocaloid)"}),
    ([EscapeParens()], None, {"10_a/3.png": r"bob, long_hair, hatsune miku \(vocaloid\)"}),
])
def test_each_operation(tmp_path, ops, where, expect):
    root = make(tmp_path)
    before = caps(root)
    result = run(root, *ops, where=where)
    after = caps(root)
    assert {k: v for k, v in after.items() if v != before[k]} == expect
    assert sorted(p.name for p in result.changed) == sorted(Path(k).with_suffix(".txt").name for k in expect)


def test_sort_by_frequency_and_unescape_and_back_to_underscores(tmp_path):
    root = make(tmp_path)
    run(root, SortTags("frequency"), where="bob")  # long_hair (2 images) before bob (1), then by name
    assert caps(root)["10_a/3.png"] == "long_hair, bob, hatsune miku (vocaloid)"
    run(root, EscapeParens(), Underscores("spaces"))
    run(root, EscapeParens(unescape=True), Underscores("underscores"))
    assert caps(root)["10_a/3.png"] == "long_hair, bob, hatsune_miku_(vocaloid)"
    assert caps(root)["10_a/2.png"] == "alice, short_hair, ^_^, hat"


def test_undo_redo_restore_exact_bytes_including_bom_and_created_files(tmp_path):
    root = make(tmp_path)
    (root / "10_a/2.txt").write_bytes(b"\xef\xbb\xbfalice, short_hair\r\n")
    original = {p: p.read_bytes() for p in root.rglob("*.txt")}
    s = EditSession.open(root)
    s.apply([AddTag("trig")])
    s.apply([RemoveTag("alice")])
    assert caps(root)["10_a/2.png"] == "trig, short_hair" and caps(root)["5_b/4.png"] == "trig"
    s.undo()
    assert caps(root)["10_a/2.png"] == "trig, alice, short_hair"
    s.undo()
    now = {p: p.read_bytes() for p in root.rglob("*.txt") if BACKUP_DIR not in p.parts}
    assert now == original  # 4.txt deleted again, BOM back
    assert not s.can_undo and s.can_redo
    s.redo()
    s.redo()
    assert caps(root)["10_a/2.png"] == "trig, short_hair"
    with pytest.raises(SdtuneError, match="nothing to redo"):
        s.redo()
    s.undo()
    s.apply([Dedupe()])  # a new edit clears the redo stack
    assert not s.can_redo


def test_first_write_makes_one_backup_holding_the_originals(tmp_path):
    root = make(tmp_path)
    original = caps(root)
    s = EditSession.open(root)
    s.apply([AddTag("trig")], where="bob")
    s.apply([RemoveTag("smile")])
    s.apply([AddTag("x")])
    backups = list_backups(root)
    assert len(backups) == 1 and backups[0].parent == root / BACKUP_DIR
    assert read_backup(backups[0]) == {"10_a/3.txt": original["10_a/3.png"].encode(), "5_b/4.txt": None,
                                       "10_a/1.txt": original["10_a/1.png"].encode(),
                                       "10_a/2.txt": original["10_a/2.png"].encode()}
    kept = backups[0] / "10_a" / "1.txt"
    assert kept.read_text("utf-8") == original["10_a/1.png"]
    assert kept.stat().st_nlink == 1  # the original file itself (a hard link), now only in the backup
    result = restore_backup(root)
    assert caps(root) == original and [p.name for p in result.deleted] == ["4.txt"]
    assert result.backup is not None and len(list_backups(root)) == 2  # restore saved what it replaced
    assert load_captions(root).items[0].image.name == "1.png"  # the backup folder is not part of the dataset


def test_no_change_writes_nothing_and_makes_no_backup(tmp_path):
    root = make(tmp_path)
    r = run(root, RemoveTag("not there"))
    assert r.changed == [] and r.backup is None and not (root / BACKUP_DIR).exists()


def test_dry_run_and_one_shot_edit(tmp_path):
    root = make(tmp_path)
    before = caps(root)
    r = edit_captions(EditConfig(root, (AddTag("trig"),), where="alice", dry_run=True))
    assert r.dry_run and len(r.changed) == 2 and caps(root) == before
    r = edit_captions(EditConfig(root, (AddTag("trig"),), where="alice"))
    assert caps(root)["10_a/1.png"].startswith("trig, ") and (r.backup / MANIFEST).is_file()


def test_unreadable_captions_are_skipped_not_rewritten(tmp_path):
    root = make(tmp_path)
    bad = root / "10_a/2.txt"
    bad.write_bytes(b"\xff\xfe alice")
    r = run(root, AddTag("trig"))
    assert bad.read_bytes() == b"\xff\xfe alice" and [p.name for p in r.skipped_unreadable] == ["2.txt"]


def test_a_caption_changed_by_another_program_stops_the_write(tmp_path):
    root = make(tmp_path)
    s = EditSession.open(root)
    p = root / "10_a/3.txt"
    p.write_text("changed elsewhere, and longer than before", encoding="utf-8")
    with pytest.raises(SdtuneError, match="changed on disk"):
        s.apply([AddTag("trig")])
    assert p.read_text("utf-8") == "changed elsewhere, and longer than before"
    assert caps(root)["10_a/1.png"] == CAPTIONS["10_a/1.png"]


def test_a_failed_write_leaves_every_caption_and_no_temp_file(tmp_path, monkeypatch):
    root = make(tmp_path)
    before = caps(root)
    calls = {"n": 0}
    real_write = os.write

    def flaky(fd, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(atomic_batch.os, "write", flaky)
    s = EditSession.open(root, backup=False)
    with pytest.raises(OSError):
        s.apply([AddTag("trig")])
    assert caps(root) == before
    assert not [p for p in root.rglob("*.tmp")]
    assert not s.can_undo


def test_large_batches_use_one_file_system_flush(tmp_path, monkeypatch):
    captions = {f"10_a/{i}.png": f"t{i}, common" for i in range(atomic_batch.SMALL_BATCH + 5)}
    root = make(tmp_path, captions)
    fsyncs = []
    monkeypatch.setattr(atomic_batch.os, "fsync", lambda fd: fsyncs.append(fd))
    EditSession.open(root, backup=False).apply([RemoveTag("common")])
    assert (root / "10_a/3.txt").read_text() == "t3"
    assert len(fsyncs) < 5  # folders only (or per file where syncfs is missing: then this test is moot)


def test_bad_ops_are_refused(tmp_path):
    with pytest.raises(SdtuneError, match="single tag"):
        AddTag("a, b")
    with pytest.raises(SdtuneError, match="regular expression"):
        run(make(tmp_path), RemoveTag("(", regex=True))
    with pytest.raises(SdtuneError, match="no tag operation"):
        run(tmp_path)


def test_a_backup_is_a_copy_where_hard_links_fail(tmp_path, monkeypatch):
    root = make(tmp_path)
    original = caps(root)

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    r = run(root, AddTag("trig"))
    assert (r.backup / "10_a" / "1.txt").read_text("utf-8") == original["10_a/1.png"]
    restore_backup(root)
    assert caps(root) == original


def test_restore_refuses_entries_outside_the_dataset(tmp_path):
    root = make(tmp_path / "ds")
    s = EditSession.open(root)
    s.apply([AddTag("trig")])
    backup = list_backups(root)[0]
    doc = json.loads((backup / MANIFEST).read_text("utf-8"))
    (backup / "evil.txt").write_text("x")
    doc["absent"].append("../evil.txt")
    (backup / MANIFEST).write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(SdtuneError, match="outside the dataset"):
        restore_backup(root, backup)
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(SdtuneError, match="no caption backup"):
        restore_backup(make(tmp_path / "other"))


def test_undo_refuses_when_a_caption_changed_meanwhile(tmp_path):
    root = make(tmp_path)
    s = EditSession.open(root)
    s.apply([AddTag("trig")])
    (root / "10_a/1.txt").write_text("edited by hand, much longer now", encoding="utf-8")
    with pytest.raises(SdtuneError, match="changed on disk"):
        s.undo()
    assert (root / "10_a/1.txt").read_text("utf-8") == "edited by hand, much longer now"
    assert s.can_undo


def test_restore_finds_the_caption_extension_from_the_backup(tmp_path):
    from lib_sdtune.tags.store import LoadConfig

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("x, y", encoding="utf-8")
    EditSession(load_captions(tmp_path, LoadConfig(".caption"))).apply([RemoveTag("x")])
    assert (tmp_path / "a.caption").read_text("utf-8") == "y"
    restore_backup(tmp_path)
    assert (tmp_path / "a.caption").read_text("utf-8") == "x, y"


def test_undo_history_is_bounded_in_bytes(tmp_path, monkeypatch):
    from lib_sdtune.tags import history

    root = make(tmp_path)
    monkeypatch.setattr(history, "UNDO_BYTES", 300)
    s = EditSession.open(root)
    for k in range(5):
        s.apply([AddTag(f"tag{k}")])
    undo, _ = s.history()
    assert 1 <= len(undo) < 5
    while s.can_undo:
        s.undo()
    assert caps(root)["10_a/1.png"].startswith("tag")  # only the kept steps could be undone
    restore_backup(root)
    assert caps(root) == {k: v for k, v in CAPTIONS.items()}  # the backup still has the originals


def test_preview_shows_old_and_new_tags_without_writing(tmp_path):
    root = make(tmp_path)
    before = caps(root)
    s = EditSession.open(root)
    pv = s.preview([RemoveTag("smile"), AddTag("x", "end")], where="smile")
    assert {s.store.items[i].image.name: pair for i, pair in pv.items()} == {
        "1.png": (["alice", "long_hair", "smile", "smile"], ["alice", "long_hair", "x"])}
    assert caps(root) == before and not s.can_undo
