"""Dataset nodes: scan a dataset folder (statistics and lint), tag it with WD14, batch-edit its captions.

Each returns a dataset handle (SDTUNE_DATASET) for the next node and a readable report. Dataset folders
live in ComfyUI's input folder or in folders listed under `sdtune_datasets` in extra_model_paths.yaml;
any other path is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from comfy_api.latest import io, ui

from lib_sdtune.tags.store import IMAGE_EXTS

from .shared import (
    Dataset,
    DatasetHandle,
    HostProgress,
    core_errors,
    dataset_folder,
    tagger_roots,
)

CAPTION_EXTENSIONS = [".txt", ".caption"]
FOLDER_TIP = ("dataset folder: a folder inside ComfyUI's input folder (e.g. my_dataset), or an absolute path inside "
              "a folder listed under 'sdtune_datasets' in extra_model_paths.yaml. Kohya layout: "
              "<folder>/<repeats>_<name>/image.png + image.txt")
DATASET_TIP = "the dataset from an sdtune Dataset node"


def image_state(root: Path) -> str:
    """A fingerprint of the images under `root` (names, sizes, times); captions are left out so that our own
    caption edits do not make ComfyUI re-run everything downstream (training included)."""
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                st = os.stat(os.path.join(folder, name))
                h.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                         .encode())
    return h.hexdigest()


class SdtuneDataset(io.ComfyNode):
    """Open a dataset folder: tag statistics and the lint report (what would hurt training)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneDataset",
            display_name="Dataset (sdtune)",
            category="sdtune/dataset",
            description="Opens a dataset folder for the other sdtune nodes and reports its tag statistics (images "
                        "per tag, trigger-word candidates, missing captions) and lint findings (unreadable, "
                        "transparent, tiny, extreme-aspect and near-duplicate images, caption problems). Re-runs "
                        "when images are added, removed or replaced.",
            inputs=[
                io.String.Input("folder", default="", tooltip=FOLDER_TIP),
                io.Combo.Input("caption_extension", options=CAPTION_EXTENSIONS, default=".txt",
                               tooltip="the captions' file extension (kohya: .txt or .caption)"),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="the training resolution the lint checks images against (SD1 512, SDXL 1024)"),
                io.Boolean.Input("lint", default=True,
                                 tooltip="check every image (decodes them all; turn off for a quick look at a "
                                         "large dataset)"),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, caption_extension: str, resolution: int, lint: bool) -> str:
        try:
            return image_state(dataset_folder(folder))
        except Exception:  # noqa: BLE001 - execute reports the problem; here any value will do
            return ""

    @classmethod
    def execute(cls, folder: str, caption_extension: str, resolution: int, lint: bool) -> io.NodeOutput:
        from lib_sdtune.tags.lint import LintConfig, lint_dataset
        from lib_sdtune.tags.stats import compute_stats
        from lib_sdtune.tags.store import LoadConfig, load_captions

        with core_errors():
            root = dataset_folder(folder)
            store = load_captions(root, LoadConfig(caption_extension))
            stats = compute_stats(store)
            report = lint_dataset(LintConfig(root, caption_extension, resolution), store=store) if lint else None
        text = "\n".join(_stats_lines(stats) + (_lint_lines(report) if report is not None else []))
        return io.NodeOutput(DatasetHandle(root, caption_extension), text, ui=ui.PreviewText(text))


def _stats_lines(stats) -> list[str]:
    lines = [f"{stats.root}: {stats.images} images, {stats.captioned} captioned, {len(stats.frequency)} unique tags",
             "tags per image: " + ", ".join(f"{k} {v:g}" for k, v in stats.tags_per_image.items()),
             "on every captioned image (trigger-word candidates): " + (", ".join(stats.on_every_image) or "none")]
    for what, paths in (("without caption", stats.without_caption), ("empty caption", stats.empty_captions),
                        ("caption without image", stats.orphan_captions)):
        if paths:
            lines.append(f"{what}: {len(paths)} (first: {paths[0]})")
    lines += [f"unreadable caption: {path}: {error}" for path, error in stats.unreadable_captions]
    if stats.frequency:
        lines.append(f"top {min(20, len(stats.frequency))} tags (images):")
        lines += [f"  {n:6d}  {t}" for t, n in stats.frequency[:20]]
    return lines


def _lint_lines(report) -> list[str]:
    return [f"lint: {report.images} images checked", *report.summary_lines(10)]


def _taggers() -> dict[str, Path]:
    """Tagger folders found, by the name shown in the combo (relative to the folder searched)."""
    from lib_sdtune.tags.wd14_model import find_models

    out: dict[str, Path] = {}
    roots = tagger_roots()
    for found in find_models(roots):
        root = next((r.resolve() for r in roots if r.resolve() in found.parents), found.parent)
        out.setdefault(found.relative_to(root).as_posix(), found)
    return out


class SdtuneWd14Tag(io.ComfyNode):
    """Tag every image of a dataset with a WD14 ONNX tagger and write the captions (backed up first)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneWd14Tag",
            display_name="WD14 Tag Dataset (sdtune)",
            category="sdtune/dataset",
            description="Runs a WD14 tagger (SmilingWolf v2/v3 model.onnx + selected_tags.csv) over every image "
                        "and writes the tags into the captions. The captions it changes are backed up to "
                        "<dataset>/.sdtune_backups first (`python -m lib_sdtune tag restore` puts them back). "
                        "Cancel keeps the captions tagged so far.",
            inputs=[
                Dataset.Input("dataset", tooltip=DATASET_TIP),
                io.Combo.Input("tagger", options=sorted(_taggers()),
                               tooltip="a tagger folder (model.onnx + selected_tags.csv) in models/wd14_tagger, "
                                       "models/taggers, models/interrogators, $SDTUNE_TAGGER_DIR or a folder listed "
                                       "under 'sdtune_taggers' in extra_model_paths.yaml"),
                io.Float.Input("threshold", default=0.35, min=0.0, max=1.0, step=0.01,
                               tooltip="general tags scoring above this are written"),
                io.Float.Input("character_threshold", default=0.85, min=0.0, max=1.0, step=0.01,
                               tooltip="character tags scoring above this are written"),
                io.Combo.Input("mode", options=["append", "prepend", "overwrite", "skip"], default="append",
                               tooltip="existing captions: add the new tags after them, before them, replace them, "
                                       "or skip images that already have tags"),
                io.String.Input("exclude", default="", tooltip="comma-separated tags never to write"),
                io.Int.Input("max_tags", default=0, min=0, max=500,
                             tooltip="keep at most this many general tags per image (0: no limit)"),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dataset: DatasetHandle, tagger: str, threshold: float, character_threshold: float,
                mode: str, exclude: str, max_tags: int) -> io.NodeOutput:
        import comfy.model_management as mm

        from lib_sdtune.errors import SdtuneError
        from lib_sdtune.tags.wd14 import Wd14Config, tag_dataset

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            folder = _taggers().get(tagger)
            if folder is None:
                raise SdtuneError(f"tagger {tagger!r}: no such tagger folder any more; refresh the page")
            config = Wd14Config(dataset.path, folder, threshold, character_threshold, mode=mode,
                                exclude=tuple(t.strip() for t in exclude.split(",") if t.strip()),
                                max_tags=max_tags, caption_extension=dataset.caption_extension,
                                device="auto" if mm.get_torch_device().type == "cuda" else "cpu")
            result = tag_dataset(config, progress=progress.progress, cancelled=progress.cancelled)
            lines = [f"{len(result.images)} images tagged in {result.seconds:.1f} s, {len(result.written)} captions "
                     "written" + (" (cancelled: the rest were left as they were)" if result.cancelled else "")]
            if result.backup:
                lines.append(f"originals saved to {result.backup} (undo: python -m lib_sdtune tag restore "
                             f"{dataset.path})")
            lines += [f"skipped {p}: {e}" for p, e in result.errors]
            text = "\n".join(lines)
        return io.NodeOutput(dataset, text, ui=ui.PreviewText(text))


class SdtuneEditTags(io.ComfyNode):
    """Batch caption edits: trigger word, remove and replace tags (atomic, backed up)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneEditTags",
            display_name="Edit Tags (sdtune)",
            category="sdtune/dataset",
            description="Edits the captions of every image (or those matching 'where'): removes and replaces tags, "
                        "puts a trigger word first. All captions are written at once (atomic); the ones changed are "
                        "backed up to <dataset>/.sdtune_backups first.",
            inputs=[
                Dataset.Input("dataset", tooltip=DATASET_TIP),
                io.String.Input("trigger_word", default="",
                                tooltip="a tag put first in every caption (moved there if present); empty: none"),
                io.String.Input("remove", default="", tooltip="comma-separated tags to remove; empty: none"),
                io.String.Input("replace", default="", multiline=True,
                                tooltip="one OLD=NEW per line; NEW may hold several comma-separated tags, or be "
                                        "empty to remove OLD"),
                io.String.Input("where", default="",
                                tooltip="only images whose tags match this expression, e.g. blue hair AND NOT hat "
                                        "(OR, NOT, parentheses, quotes, * wildcards); empty: every image"),
                io.Boolean.Input("dedupe", default=False, tooltip="also drop repeated tags"),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dataset: DatasetHandle, trigger_word: str, remove: str, replace: str, where: str,
                dedupe: bool) -> io.NodeOutput:
        from lib_sdtune.tags.history import EditConfig, edit_captions

        with core_errors():
            ops = _edit_ops(trigger_word, remove, replace, dedupe)
            preview: dict = {}
            result = edit_captions(EditConfig(dataset.path, ops, where.strip() or None, dataset.caption_extension),
                                   preview)
        lines = [f"{result.selected} images selected, {len(result.changed)} captions changed in "
                 f"{result.seconds:.2f} s"]
        for path, (old, new) in list(preview.items())[:10]:
            lines += [f"{path}:", f"  - {', '.join(old)}", f"  + {', '.join(new)}"]
        if len(preview) > 10:
            lines.append(f"... and {len(preview) - 10} more")
        if result.backup:
            lines.append(f"originals saved to {result.backup} (undo: python -m lib_sdtune tag restore {dataset.path})")
        lines += [f"skipped unreadable caption {p}" for p in result.skipped_unreadable]
        text = "\n".join(lines)
        return io.NodeOutput(dataset, text, ui=ui.PreviewText(text))


def _edit_ops(trigger_word: str, remove: str, replace: str, dedupe: bool) -> tuple:
    """The node's fields as tag operations, in this order: remove, replace, trigger word, dedupe."""
    from lib_sdtune.errors import SdtuneError
    from lib_sdtune.tags.ops import AddTag, Dedupe, RemoveTag, ReplaceTag

    ops: list = [RemoveTag(t.strip()) for t in remove.split(",") if t.strip()]
    for line in replace.splitlines():
        if not line.strip():
            continue
        if "=" not in line:
            raise SdtuneError(f"replace: {line.strip()!r}: write it as OLD=NEW (NEW may be empty to remove OLD)")
        old, new = line.split("=", 1)
        ops.append(ReplaceTag(old.strip(), new.strip()))
    if trigger_word.strip():
        ops.append(AddTag(trigger_word.strip(), "front"))
    if dedupe:
        ops.append(Dedupe())
    if not ops:
        raise SdtuneError("nothing to do: give a trigger word, tags to remove or replace, or turn on dedupe")
    return tuple(ops)
