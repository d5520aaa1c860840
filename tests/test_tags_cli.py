"""The `tag` CLI forms of the contract: stats, edit, restore, wd14, lint, each with --json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib_sdtune.demo.dataset import DemoDatasetSpec, write_demo_dataset

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT / ".pytest_cache" / "home"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lib_sdtune", "tag", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


def ok_json(*args) -> dict:
    out = run(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def demo(tmp_path):
    return write_demo_dataset(tmp_path / "ds", DemoDatasetSpec(images_per_concept=4))


def captions(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_text("utf-8") for p in sorted(root.rglob("*.txt"))
            if ".sdtune_backups" not in p.parts}


def test_stats(demo):
    info = ok_json("stats", demo.root)
    assert info["images"] == 8 and info["frequency"]["sdtdemo"] == 4
    assert set(info["ss_tag_frequency"]) == {"10_sdtdemo shape", "1_shape"}
    assert {"tags_per_image", "without_caption", "on_every_image", "empty_captions"} <= set(info)
    human = run("stats", demo.root)
    assert human.returncode == 0 and "8 images" in human.stdout


def test_edit_in_order_with_where_then_restore(demo):
    before = captions(demo.root)
    info = ok_json("edit", demo.root, "--remove", "sdtdemo", "--add", "mytrig", "--replace", "shape=thing",
                   "--where", "sdtdemo OR shape")
    assert info["changed"] == 8 and (Path(info["backup"]) / "sdtune_backup.json").is_file()
    after = captions(demo.root)
    assert all(c.startswith("mytrig, ") for c in after.values())
    assert not any("sdtdemo" in c.split(", ") or "shape" in c.split(", ") for c in after.values())
    assert any("thing" in c.split(", ") for c in after.values())
    dry = ok_json("edit", demo.root, "--append", "x", "--dry-run")
    assert dry["dry_run"] and dry["changed"] == 8 and captions(demo.root) == after
    restored = ok_json("restore", demo.root)
    assert len(restored["restored"]) == 8 and captions(demo.root) == before
    assert len(ok_json("restore", demo.root, "--list")["backups"]) == 2  # the edit's and the restore's
    assert len(ok_json("restore", demo.root, "--prune", "1")["deleted"]) == 1
    assert len(ok_json("restore", demo.root, "--list")["backups"]) == 1


def test_edit_errors_are_one_paragraph(demo):
    out = run("edit", demo.root, "--add", "x", "--where", "a AND (")
    assert out.returncode == 1 and "column" in out.stderr and "Traceback" not in out.stderr
    out = run("edit", demo.root)
    assert out.returncode == 1 and "at least one operation" in out.stderr
    out = run("edit", demo.root, "--replace", "no-equals-sign")
    assert out.returncode == 1 and "OLD=NEW" in out.stderr


def test_wd14(demo, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from test_tags_wd14 import write_model

    model = write_model(tmp_path / "tagger")
    info = ok_json("wd14", demo.train_dir, "--model-dir", model, "--threshold", "0.35", "--character-threshold",
                   "0.85", "--exclude", "watermark", "--mode", "overwrite")
    assert len(info["written"]) == 4 and info["backup"]
    tags = {Path(k).name: v for k, v in info["tags"].items()}
    assert all("long hair" in v and "watermark" not in v for v in tags.values())
    out = run("wd14", demo.train_dir, "--model-dir", tmp_path / "nothing-here")
    assert out.returncode == 1 and "no WD14 tagger" in out.stderr


def test_lint_and_fix(demo, tmp_path):
    report = ok_json("lint", demo.root, "--resolution", "64")
    assert report["counts"] == {"transparent": 1}
    assert ok_json("lint", demo.root, "--resolution", "72")["counts"] == {"transparent": 1, "tiny": 8}
    out = tmp_path / "fixed"
    fixed = ok_json("lint", demo.root, "--resolution", "64", "--fix", "-o", out)
    assert fixed["output"] == str(out.resolve()) and len(fixed["flattened"]) == 1 and fixed["copied"] == 8
    assert ok_json("lint", out, "--resolution", "64")["counts"] == {}
    bad = run("lint", demo.root, "--fix")
    assert bad.returncode == 1 and "output folder" in bad.stderr


def test_tag_modules_import_no_heavy_packages():
    code = ("import sys, lib_sdtune.cli, lib_sdtune.tags.wd14, lib_sdtune.tags.lint, lib_sdtune.tags.history\n"
            "print([m for m in ('onnxruntime', 'torch', 'huggingface_hub') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
