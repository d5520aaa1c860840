"""The "Dataset" panel: browse a dataset's images with their captions, edit one caption, batch-edit tags with
undo/redo, tag images with a WD14 tagger, and lint the dataset.

All caption writes go through one `EditSession` per dataset folder (kept in the UiContext), so every edit,
including the tagger's, is atomic, backed up on first change, and undoable from the panel.
"""

# no `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation of the gallery
# handler to pass it the click, and it cannot resolve that name from a string
from pathlib import Path
from typing import Any, Sequence

from ..errors import SdtuneError
from ..host import list_folders, resolve_folder
from .context import UiContext
from .jobs_view import error_text, follow, job_status, progress_html, start_job

PAGE_SIZE = 30
THUMB = 192  # px, the longer side of a gallery thumbnail
TOP_TAGS = 200  # rows of the tag table
# batch operations: label -> what the two text fields mean
OPERATIONS = {
    "Add tags at the front": "tags (comma-separated); a trigger word goes first",
    "Add tags at the end": "tags (comma-separated)",
    "Remove tags": "tags (comma-separated)",
    "Replace a tag": "old tag -> replacement (several tags, or empty to remove)",
    "Remove tags matching a regex": "regular expression (matches whole tags)",
    "Replace with a regex": "regular expression -> replacement (\\1 for groups)",
    "Remove duplicate tags": "",
    "Sort tags alphabetically": "keep the first N tags in place (N, optional)",
    "Sort tags by frequency": "keep the first N tags in place (N, optional)",
    "Underscores to spaces": "",
    "Spaces to underscores": "",
    "Escape parentheses for A1111 prompts": "",
    "Unescape parentheses": "",
}
LINT_KINDS_SHOWN = 20  # findings listed per kind


# --- the editing session ----------------------------------------------------------------------------------
def open_session(ctx: UiContext, dataset: str, caption_ext: str = ".txt", reload: bool = False):
    """The editing session of a dataset folder (confined to the dataset roots), loaded once and kept."""
    from ..tags.history import EditSession
    from ..tags.store import LoadConfig

    root = resolve_folder(dataset, ctx.folders.datasets, "dataset")
    config = LoadConfig((caption_ext or ".txt").strip())
    key = (str(root), config.caption_extension)
    with ctx.lock:
        session = ctx.tag_sessions.get(key)
        if session is None or reload:
            session = ctx.tag_sessions[key] = EditSession.open(root, config)
    return session


def summary(session) -> str:
    """Markdown: counts, trigger-word candidates, problems, and the undo/redo history."""
    from ..tags.stats import compute_stats

    st = compute_stats(session.store)
    lines = [f"**{st.root}**: {st.images} images, {st.captioned} captioned, {len(st.frequency)} unique tags; "
             f"tags per image {st.tags_per_image['min']}..{st.tags_per_image['max']} "
             f"(mean {st.tags_per_image['mean']})"]
    if st.on_every_image:
        lines.append(f"On every captioned image (trigger-word candidates): {', '.join(st.on_every_image)}")
    for what, paths in (("without caption", st.without_caption), ("empty caption", st.empty_captions),
                        ("unreadable caption", [p for p, _ in st.unreadable_captions])):
        if paths:
            lines.append(f"{len(paths)} {what} (first: {session.store.rel(paths[0])})")
    lines.append(history_line(session))
    return "\n\n".join(lines)


def history_line(session) -> str:
    """What Undo and Redo would do."""
    undo, redo = session.history()
    parts = [f"Undo: {len(undo)} step(s)" + (f", last: {undo[-1]}" if undo else ""),
             f"Redo: {len(redo)} step(s)" + (f", next: {redo[-1]}" if redo else "")]
    return " | ".join(parts)


def tag_rows(session, top: int = TOP_TAGS) -> list[list[Any]]:
    """[tag, images] rows, most common first."""
    from ..tags.ops import tag_frequency

    freq = tag_frequency(session.store)
    return [[t, n] for t, n in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def page_of(session, where: str = "", page: int = 1, size: int = PAGE_SIZE) -> tuple[list[int], int, int]:
    """(item indices on this page, the page shown, number of pages) of the images matching `where`."""
    from ..tags.ops import select

    chosen = select(session.store, where or None)
    pages = max(1, -(-len(chosen) // size))
    page = min(max(1, int(page or 1)), pages)
    return chosen[(page - 1) * size:page * size], page, pages


def thumbnails(session, indices: Sequence[int]) -> list[tuple[Any, str]]:
    """(thumbnail, file name) per item: small PIL copies, so any host serves them from its own cache."""
    from PIL import Image

    out = []
    for i in indices:
        item = session.store.items[i]
        try:
            with Image.open(item.image) as im:
                im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a smaller scale
                thumb = im.convert("RGBA" if "A" in im.getbands() else "RGB")
                thumb.thumbnail((THUMB, THUMB))
        except OSError:
            thumb = Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
        out.append((thumb, item.image_name))
    return out


def caption_text(session, index: int) -> tuple[str, str]:
    """(label, caption) of one item for the editor."""
    item = session.store.items[index]
    label = f"**{session.store.rel(item.image)}**"
    if item.error:
        return f"{label}: caption unreadable ({item.error}); fix the file by hand", ""
    return f"{label} ({len(item.tags)} tags{'' if item.has_caption else ', no caption file yet'})", \
        ", ".join(item.tags)


def save_caption(session, index: int, text: str) -> str:
    """Write one image's caption as an undoable step."""
    from ..tags.text import split_tags

    item = session.store.items[index]
    result = session.write_tags({index: split_tags(text or "")}, f"caption of {item.image_name}")
    return f"Saved {session.store.rel(item.caption)}" if result.changed else "No change."


# --- batch edits ------------------------------------------------------------------------------------------
def _tags(text: str, what: str) -> list[str]:
    from ..tags.text import split_tags

    tags = split_tags(text or "")
    if not tags:
        raise SdtuneError(f"{what}: enter at least one tag")
    return tags


def _keep_first(text: str) -> int:
    text = (text or "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise SdtuneError(f"sort: {text!r} is not a number of tags to keep in place")
    return int(text)


def build_ops(operation: str, arg: str, replacement: str = "") -> tuple:
    """The tag operations one batch-edit choice means (comma-separated tags become one op each)."""
    from ..tags import ops as o

    if operation == "Add tags at the front":
        return tuple(o.AddTag(t, "front") for t in reversed(_tags(arg, "add")))  # keeps their order at the front
    if operation == "Add tags at the end":
        return tuple(o.AddTag(t, "end") for t in _tags(arg, "add"))
    if operation == "Remove tags":
        return tuple(o.RemoveTag(t) for t in _tags(arg, "remove"))
    if operation == "Replace a tag":
        return (o.ReplaceTag(_tags(arg, "replace")[0], (replacement or "").strip()),)
    if operation == "Remove tags matching a regex":
        if not (arg or "").strip():
            raise SdtuneError("remove by regex: enter a regular expression")
        return (o.RemoveTag(arg.strip(), regex=True),)
    if operation == "Replace with a regex":
        if not (arg or "").strip():
            raise SdtuneError("replace by regex: enter a regular expression")
        return (o.ReplaceTag(arg.strip(), replacement or "", regex=True),)
    simple = {"Remove duplicate tags": lambda: o.Dedupe(),
              "Sort tags alphabetically": lambda: o.SortTags("alpha", _keep_first(arg)),
              "Sort tags by frequency": lambda: o.SortTags("frequency", _keep_first(arg)),
              "Underscores to spaces": lambda: o.Underscores("spaces"),
              "Spaces to underscores": lambda: o.Underscores("underscores"),
              "Escape parentheses for A1111 prompts": lambda: o.EscapeParens(),
              "Unescape parentheses": lambda: o.EscapeParens(unescape=True)}
    if operation not in simple:
        raise SdtuneError(f"unknown operation {operation!r}; choose one from the list")
    return (simple[operation](),)


def preview_edit(session, operation: str, arg: str, replacement: str, where: str, limit: int = 20) -> str:
    """What a batch edit would change, writing nothing."""
    changes = session.preview(build_ops(operation, arg, replacement), where or None)
    if not changes:
        return "Nothing would change."
    lines = [f"{len(changes)} caption(s) would change:"]
    for i, (old, new) in list(changes.items())[:limit]:
        lines += [session.store.rel(session.store.items[i].caption), f"  - {', '.join(old)}", f"  + {', '.join(new)}"]
    if len(changes) > limit:
        lines.append(f"... and {len(changes) - limit} more")
    return "\n".join(lines)


def _described(result, verb: str) -> str:
    text = f"{verb} {len(result.changed)} caption(s) of {result.selected} selected in {result.seconds:.2f} s"
    if result.backup:
        text += f"; originals backed up in {result.backup}"
    if result.skipped_unreadable:
        text += f"; skipped {len(result.skipped_unreadable)} unreadable caption(s)"
    return text


def apply_edit(session, operation: str, arg: str, replacement: str, where: str) -> str:
    """Run a batch edit and write the changed captions (one undoable step)."""
    ops = build_ops(operation, arg, replacement)
    result = session.apply(ops, where or None, label=operation + (f" {arg.strip()}" if (arg or "").strip() else ""))
    return _described(result, "Changed")


def undo_edit(session) -> str:
    return _described(session.undo(), "Undid: restored")


def redo_edit(session) -> str:
    return _described(session.redo(), "Redid: rewrote")


# --- tagger and lint jobs ---------------------------------------------------------------------------------
def tagger_roots(ctx: UiContext) -> list[Path]:
    """Where tagger folders are looked for: the setting, $SDTUNE_TAGGER_DIR, the host's models/<tagger dirs>."""
    from ..tags.wd14_model import model_roots

    configured = [ctx.settings.tagger_dir] if ctx.settings.tagger_dir else []
    return model_roots(configured) + list(ctx.settings.tagger_roots)


def list_taggers(ctx: UiContext) -> list[str]:
    from ..tags.wd14_model import find_models

    return [str(p) for p in find_models(tagger_roots(ctx))]


def start_wd14(ctx: UiContext, session, tagger: str, threshold: float, character_threshold: float, mode: str):
    """Tag every image with the chosen tagger as a background job; the captions are one undoable step."""
    from ..tags.wd14 import Wd14Config, merge_tags, tag_dataset

    if not tagger or tagger not in list_taggers(ctx):
        raise SdtuneError("choose a WD14 tagger from the list (a folder with model.onnx and selected_tags.csv; "
                          "set its folder in the settings, or put it in models/interrogators)")
    cfg = Wd14Config(session.store.root, Path(tagger), float(threshold), float(character_threshold), mode=mode,
                     caption_extension=session.store.caption_extension, dry_run=True)

    def work(jc):
        found = tag_dataset(cfg, jc.progress, jc.cancelled)  # dry run: the tags, nothing written
        items = session.store.items
        index = {it.image: i for i, it in enumerate(items)}
        new = {index[r.image]: merge_tags(items[index[r.image]].tags, r.tags, mode)
               for r in found.images if not r.error and r.image in index}
        written = session.write_tags(new, f"WD14 tagger ({Path(tagger).name})")
        lines = [f"{len(found.images)} image(s) tagged, {len(written.changed)} caption(s) written"
                 + (" (stopped early: the images tagged so far were written)" if found.cancelled else "")]
        if written.backup:
            lines.append(f"originals backed up in {written.backup}; Undo takes the tagger's step back")
        lines += [f"skipped {p}: {e}" for p, e in found.errors]
        return "\n".join(lines)

    return start_job(ctx.jobs, f"WD14 tagging {session.store.root.name}", work, uses_gpu=False,
                     meta={"kind": "wd14"})


def start_lint(ctx: UiContext, session, resolution: int):
    """Check the dataset's images and captions as a background job; the report is its result."""
    from ..tags.lint import LintConfig, lint_dataset

    cfg = LintConfig(session.store.root, session.store.caption_extension, int(resolution or 512))

    def work(jc):
        report = lint_dataset(cfg, jc.progress, store=session.store)
        return "\n".join([f"{report.images} images checked in {report.seconds:.1f} s",
                          *report.summary_lines(LINT_KINDS_SHOWN, session.store.rel,
                                                " (`python -m lib_sdtune tag lint --json` lists all)")])

    return start_job(ctx.jobs, f"Lint {session.store.root.name}", work, uses_gpu=False, meta={"kind": "lint"})


def follow_text_job(job):
    """(progress bar, result text) while a text-result job runs."""
    for snap in follow(job):
        done = snap.result if snap.state == "done" else (f"Error: {snap.error}" if snap.state == "failed" else "")
        yield progress_html(snap), done or job_status(snap)


# --- the gradio panel -------------------------------------------------------------------------------------
def build_dataset_panel(gr, ctx: UiContext) -> None:
    """Add the Dataset panel's components and events to the current gradio Blocks context."""
    from .compat import follower_event, quick_event

    with gr.Row():
        dataset = gr.Dropdown(choices=list_folders(ctx.folders.datasets), value=None, label="Dataset folder",
                              allow_custom_value=True, elem_id="sdtune_ds_dataset", scale=4)
        ext = gr.Textbox(value=".txt", label="Caption extension", elem_id="sdtune_ds_ext", scale=1)
        load = gr.Button("Load", variant="primary", elem_id="sdtune_ds_load", scale=1)
        refresh = gr.Button("Refresh list", elem_id="sdtune_ds_refresh", scale=1)
    info = gr.Markdown(elem_id="sdtune_ds_summary")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                show_where = gr.Textbox(label="Show images whose tags match (empty: all)", scale=4,
                                        placeholder="blue hair AND NOT (hat OR cap)", elem_id="sdtune_ds_filter")
                page = gr.Number(value=1, precision=0, label="Page", elem_id="sdtune_ds_page", scale=1)
                prev_btn = gr.Button("◀", elem_id="sdtune_ds_prev", scale=0, min_width=40)
                next_btn = gr.Button("▶", elem_id="sdtune_ds_next", scale=0, min_width=40)
            gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, allow_preview=False,
                                 elem_id="sdtune_ds_gallery")
        with gr.Column(scale=2):
            picked = gr.Markdown("Click an image to edit its caption.", elem_id="sdtune_ds_picked")
            caption = gr.Textbox(label="Caption (comma-separated tags; Ctrl+Enter saves)", lines=4,
                                 elem_id="sdtune_ds_caption")
            save = gr.Button("Save caption", elem_id="sdtune_ds_save")
            tags = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"], label="Tags by frequency",
                                interactive=False, elem_id="sdtune_ds_tags")
    with gr.Accordion("Batch edit (Ctrl+Z / Ctrl+Y undo and redo outside text fields)", open=True,
                      elem_id="sdtune_ds_batch"):
        with gr.Row():
            operation = gr.Dropdown(choices=list(OPERATIONS), value="Add tags at the front", label="Operation",
                                    elem_id="sdtune_ds_op")
            arg = gr.Textbox(label="Tags / pattern", elem_id="sdtune_ds_arg",
                             info=OPERATIONS["Add tags at the front"])
            replacement = gr.Textbox(label="Replacement", elem_id="sdtune_ds_replacement")
            where = gr.Textbox(label="Only images matching (empty: all)", elem_id="sdtune_ds_where")
        with gr.Row():
            preview = gr.Button("Preview", elem_id="sdtune_ds_preview")
            apply = gr.Button("Apply", variant="primary", elem_id="sdtune_ds_apply")
            undo = gr.Button("Undo", elem_id="sdtune_ds_undo")
            redo = gr.Button("Redo", elem_id="sdtune_ds_redo")
        edit_result = gr.Textbox(label="Edit result", lines=6, interactive=False, elem_id="sdtune_ds_edit_result")
    with gr.Accordion("WD14 tagger", open=False, elem_id="sdtune_ds_wd14"):
        with gr.Row():
            tagger = gr.Dropdown(choices=list_taggers(ctx), label="Tagger", elem_id="sdtune_ds_tagger", scale=4)
            tagger_refresh = gr.Button("Refresh", elem_id="sdtune_ds_tagger_refresh", scale=1)
        with gr.Row():
            threshold = gr.Slider(0.0, 1.0, value=0.35, step=0.01, label="General tag threshold")
            char_threshold = gr.Slider(0.0, 1.0, value=0.85, step=0.01, label="Character tag threshold")
            mode = gr.Radio(choices=["append", "prepend", "overwrite", "skip"], value="append",
                            label="Existing captions")
        with gr.Row():
            tag_run = gr.Button("Tag images", variant="primary", elem_id="sdtune_ds_wd14_run")
            tag_stop = gr.Button("Stop", variant="stop", elem_id="sdtune_ds_wd14_stop")
        tag_bar = gr.HTML(elem_id="sdtune_ds_wd14_progress")
        tag_result = gr.Textbox(label="Tagger result", lines=4, interactive=False, elem_id="sdtune_ds_wd14_result")
    with gr.Accordion("Lint", open=False, elem_id="sdtune_ds_lint"):
        with gr.Row():
            resolution = gr.Number(value=512, precision=0, label="Training resolution (SDXL: 1024)")
            lint_run = gr.Button("Check the dataset", variant="primary", elem_id="sdtune_ds_lint_run")
        lint_bar = gr.HTML(elem_id="sdtune_ds_lint_progress")
        lint_report = gr.Textbox(label="Lint report", lines=10, interactive=False, elem_id="sdtune_ds_lint_report")
    page_items = gr.State([])  # item indices shown in the gallery, in order
    selected = gr.State(None)  # the item index being edited
    tag_job = gr.State(None)

    def view(session, filter_text: str, page_no: Any):
        indices, shown, pages = page_of(session, filter_text, page_no)
        label = f"Images, page {shown} of {pages} (click one to edit its caption)"
        return (summary(session), gr.update(value=thumbnails(session, indices), label=label), shown, indices,
                tag_rows(session))

    view_outputs = [info, gallery, page, page_items, tags]

    def failed(e: BaseException, n_more: int) -> tuple:
        return (error_text(e), *[gr.update() for _ in range(n_more)])

    def on_load(name, caption_ext, filter_text):
        try:
            session = open_session(ctx, name, caption_ext, reload=True)
            return (*view(session, filter_text, 1), "Click an image to edit its caption.", "", None)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            return failed(e, 7)

    def on_page(name, caption_ext, filter_text, page_no, step):
        try:
            session = open_session(ctx, name, caption_ext)
            return view(session, filter_text, int(page_no or 1) + step)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            return failed(e, 4)

    def on_select(name, caption_ext, indices, evt: gr.SelectData):
        try:
            session = open_session(ctx, name, caption_ext)
            index = indices[evt.index]
            label, text = caption_text(session, index)
            return label, text, index
        except Exception as e:  # noqa: BLE001 - shown in the panel
            return failed(e, 2)

    def on_save(name, caption_ext, index, text, filter_text, page_no):
        if index is None:
            return ("Click an image first.", *[gr.update() for _ in view_outputs])
        try:
            session = open_session(ctx, name, caption_ext)
            message = save_caption(session, int(index), text)
            return (message, *view(session, filter_text, page_no))
        except Exception as e:  # noqa: BLE001 - shown in the panel
            return failed(e, len(view_outputs))

    def edit_handler(action):
        def handler(name, caption_ext, op, a, r, w, filter_text, page_no, index):
            try:
                session = open_session(ctx, name, caption_ext)
                message = action(session, op, a, r, w)
                _, text = caption_text(session, int(index)) if index is not None else ("", gr.update())
                return (message, *view(session, filter_text, page_no), text)
            except Exception as e:  # noqa: BLE001 - shown in the panel
                return failed(e, len(view_outputs) + 1)
        return handler

    def on_preview(name, caption_ext, op, a, r, w):
        try:
            return preview_edit(open_session(ctx, name, caption_ext), op, a, r, w)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            return error_text(e)

    def on_tag(name, caption_ext, chosen, thr, cthr, how):
        try:
            job, error = start_wd14(ctx, open_session(ctx, name, caption_ext), chosen, thr, cthr, how)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            job, error = None, error_text(e)
        if job is None:
            yield "", error, None
            return
        for html_bar, text in follow_text_job(job):
            yield html_bar, text, job.id

    def on_lint(name, caption_ext, reso):
        try:
            job, error = start_lint(ctx, open_session(ctx, name, caption_ext), reso)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            job, error = None, error_text(e)
        if job is None:
            yield "", error
            return
        yield from follow_text_job(job)

    def on_tag_stop(job_id):
        if job_id is None or not ctx.jobs.cancel(int(job_id)):
            return "The tagger is not running."
        return "Stopping the tagger; the images tagged so far are written."

    refresh.click(fn=lambda: gr.update(choices=list_folders(ctx.folders.datasets)), inputs=[], outputs=[dataset],
                  **quick_event(gr))
    load.click(fn=on_load, inputs=[dataset, ext, show_where], outputs=[*view_outputs, picked, caption, selected])
    show_where.submit(fn=lambda n, e, f: on_page(n, e, f, 1, 0), inputs=[dataset, ext, show_where],
                      outputs=view_outputs)
    prev_btn.click(fn=lambda n, e, f, p: on_page(n, e, f, p, -1), inputs=[dataset, ext, show_where, page],
                   outputs=view_outputs, **quick_event(gr))
    next_btn.click(fn=lambda n, e, f, p: on_page(n, e, f, p, 1), inputs=[dataset, ext, show_where, page],
                   outputs=view_outputs, **quick_event(gr))
    gallery.select(fn=on_select, inputs=[dataset, ext, page_items], outputs=[picked, caption, selected])
    save.click(fn=on_save, inputs=[dataset, ext, selected, caption, show_where, page],
               outputs=[picked, *view_outputs], **quick_event(gr))
    operation.change(fn=lambda op: gr.update(info=OPERATIONS.get(op, "")), inputs=[operation], outputs=[arg])
    edit_inputs = [dataset, ext, operation, arg, replacement, where, show_where, page, selected]
    edit_outputs = [edit_result, *view_outputs, caption]
    preview.click(fn=on_preview, inputs=[dataset, ext, operation, arg, replacement, where], outputs=[edit_result])
    apply.click(fn=edit_handler(apply_edit), inputs=edit_inputs, outputs=edit_outputs)
    undo.click(fn=edit_handler(lambda s, *_: undo_edit(s)), inputs=edit_inputs, outputs=edit_outputs)
    redo.click(fn=edit_handler(lambda s, *_: redo_edit(s)), inputs=edit_inputs, outputs=edit_outputs)
    tagger_refresh.click(fn=lambda: gr.update(choices=list_taggers(ctx)), inputs=[], outputs=[tagger],
                         **quick_event(gr))
    tag_run.click(fn=on_tag, inputs=[dataset, ext, tagger, threshold, char_threshold, mode],
                  outputs=[tag_bar, tag_result, tag_job], **follower_event(gr))
    tag_stop.click(fn=on_tag_stop, inputs=[tag_job], outputs=[tag_result], **quick_event(gr))
    lint_run.click(fn=on_lint, inputs=[dataset, ext, resolution], outputs=[lint_bar, lint_report],
                   **follower_event(gr))

