"""The "Train" panel: a base model and a dataset in, the planner's settings with their reasons shown, a LoRA
trained in the background with live step, loss and ETA, a loss chart and the sample images of each epoch.

The run goes to `<LoRA folder>/<output name>/` (the LoRA files, the loss log and chart, samples), so the
WebUI lists the result at once; an existing run of that name is kept unless "Overwrite" is ticked.
Settings left blank use the plan's values; a run's settings are the plan plus what the form changes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import SdtuneError
from ..host import confine, list_files, list_folders, resolve_folder, resolve_listed
from ..io.atomic import atomic_write_text
from .context import UiContext
from .jobs_view import clock, error_text, follow, progress_html, start_job

KIND = "train"
PLAN_CHOICE = "(the plan's)"
# Settings the form shows as fields (sd-scripts names); blank = the plan's value
FIELDS = (("max_train_epochs", "Epochs"), ("train_batch_size", "Batch size"), ("resolution", "Resolution"),
          ("unet_lr", "U-Net learning rate"), ("text_encoder_lr", "Text encoder learning rate"),
          ("network_alpha", "Network alpha"), ("lr_scheduler", "LR scheduler"),
          ("mixed_precision", "Mixed precision"), ("save_every_n_epochs", "Save every N epochs"), ("seed", "Seed"))
# changing these changes the number of steps: the plan's warm-up then follows as a share of the new total
DURATION_KEYS = ("max_train_epochs", "max_train_steps", "train_batch_size", "resolution", "min_bucket_reso",
                 "max_bucket_reso", "gradient_accumulation_steps")
# settings the form sets itself (typed under More settings they would skip its checks)
FORM_KEYS = {"pretrained_model_name_or_path": "Base model", "train_data_dir": "Dataset folder",
             "reg_data_dir": "Regularization images", "output_dir": "Output name", "output_name": "Output name",
             "sample_prompts": "Sample prompts"}
# path settings allowed under More settings, each confined to one kind of host folder
PATH_KEYS = {"resume": "loras", "network_weights": "loras", "logging_dir": "loras", "dataset_config": "datasets",
             "vae": "vaes"}
CHART_SECONDS = 2.0  # redraw the loss chart at most this often while a run goes
MAX_SAMPLES = 24  # newest sample images shown
_NAME = re.compile(r"[A-Za-z0-9_][\w.-]*")


@dataclass
class TrainForm:
    """What the Train panel's fields hold."""

    model: str = ""
    dataset: str = ""
    method: str = "lora"
    rank: Optional[float] = None  # network_dim; 0/None = the plan's
    output_name: str = ""
    overwrite: bool = False
    optimizer: str = PLAN_CHOICE
    reg: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # FIELDS key -> text (blank = the plan's)
    extra: str = ""  # more settings, one `key = value` per line
    prompts: str = ""  # sample prompts, one per line (sd-scripts prompt-file syntax)


@dataclass
class PreparedRun:
    """A checked form: the config to train, the notes to show, and where the files go."""

    cfg: Any  # TrainConfig
    notes: list[str]
    run_dir: Path
    name: str
    changed: list[str]  # "key = value" the form changed from the plan


# --- the plan ---------------------------------------------------------------------------------------------
def _output_name(text: str) -> Optional[str]:
    name = (text or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    if not name:
        return None
    if not _NAME.fullmatch(name):
        raise SdtuneError(f"output name {name!r}: use letters, digits, '_', '-' and '.' only (no folders)")
    return name


def make_plan(ctx: UiContext, form: TrainForm):
    """The planner's recommendation for the chosen model, dataset, method and optimizer."""
    from ..train.planner import plan_training

    if not form.model:
        raise SdtuneError("choose a base model (the list shows the checkpoint folders)")
    model = resolve_listed(form.model, ctx.folders.checkpoints, "checkpoint")
    dataset = resolve_folder(form.dataset, ctx.folders.datasets, "dataset")
    reg = resolve_folder(form.reg, ctx.folders.datasets, "regularization") if (form.reg or "").strip() else None
    optimizer = None if form.optimizer in ("", None, PLAN_CHOICE) else form.optimizer
    return plan_training(dataset, model, form.method or "lora", vram_gb=None, optimizer=optimizer,
                         reg_data_dir=reg, output_name=_output_name(form.output_name))


def plan_fields(plan, precision: str = "auto") -> list[str]:
    """The value each FIELDS setting will take, as the form's text fields show it: the plan's, and the
    host's default mixed precision where one is set."""
    out = []
    for key, _ in FIELDS:
        value = precision if key == "mixed_precision" and precision != "auto" else plan.config.get(key)
        out.append("" if value is None else str(value))
    return out


def plan_summary(plan) -> str:
    """The plan for people: every value with its reason and source, the steps math and the warnings."""
    return plan.to_text()


# --- form -> config ---------------------------------------------------------------------------------------
def _unquote(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def _extra_lines(ctx: UiContext, text: str) -> list[str]:
    """`key = value` lines (blank lines and # comments skipped): keys checked against the train settings, the
    form's own keys refused, and paths confined to the folder kind they belong to."""
    from ..train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    lines = []
    for number, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        where = f"More settings, line {number}"
        if not sep or key not in names:
            raise SdtuneError(f"{where}: {line!r} is not `key = value` with a train setting name (sd-scripts names, "
                              "e.g. noise_offset = 0.05)")
        if key in FORM_KEYS:
            raise SdtuneError(f"{where}: {key} is set by the '{FORM_KEYS[key]}' field; use that instead")
        if key in PATH_KEYS and _unquote(value):
            kind = PATH_KEYS[key]
            value = json.dumps(str(confine(_unquote(value), getattr(ctx.folders, kind), f"{key} ({kind})")))
        lines.append(f"{key}={value}")
    return lines


def _existing_outputs(run_dir: Path, name: str) -> list[Path]:
    """Files an earlier run of this name left (its LoRA files, its log)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name.startswith(name) and p.suffix in (".safetensors", ".json"))


def prepare_run(ctx: UiContext, form: TrainForm) -> PreparedRun:
    """Check the form and build the run's config: the plan, then the form's changes, then the extra lines."""
    from ..train.config import apply_overrides

    if not ctx.folders.loras:
        raise SdtuneError("no LoRA folder is configured, so there is nowhere to save the result")
    plan = make_plan(ctx, form)
    name = _output_name(form.output_name) or plan.config["output_name"]
    run_dir = confine(Path(ctx.folders.loras[0]) / name, ctx.folders.loras, "output")
    found = _existing_outputs(run_dir, name)
    if found and not form.overwrite:
        raise SdtuneError(f"{run_dir} already holds a run named {name!r} ({found[0].name}); choose another output "
                          "name, or tick 'Overwrite existing files'")
    changes: dict[str, Any] = {}
    for key, _ in FIELDS:
        text = str(form.fields.get(key) or "").strip()
        if text and text != str(plan.config.get(key, "")):
            changes[key] = text
    if form.rank and int(form.rank) != plan.config.get("network_dim"):
        changes["network_dim"] = int(form.rank)
    precision = ctx.settings.precision
    if "mixed_precision" not in changes and precision != "auto" and precision != plan.config.get("mixed_precision"):
        changes["mixed_precision"] = precision
    extra = _extra_lines(ctx, form.extra)
    extra_keys = {line.split("=", 1)[0] for line in extra}
    if "max_train_steps" in extra_keys and not {"max_train_epochs"} & (set(changes) | extra_keys):
        changes["max_train_epochs"] = None  # sd-scripts lets epochs win over steps: a step count typed here wins
    warmup = plan.config.get("lr_warmup_steps")
    if ((set(changes) | extra_keys) & set(DURATION_KEYS) and "lr_warmup_steps" not in extra_keys
            and isinstance(warmup, (int, float)) and warmup >= 1 and plan.steps.total_steps):
        changes["lr_warmup_steps"] = round(warmup / plan.steps.total_steps, 4)  # the same share of the new total
    cfg, notes = plan.train_config({**changes, "output_dir": str(run_dir), "output_name": name}, "the Train tab")
    if extra:
        cfg = apply_overrides(cfg, extra)
    prompts = [p.strip() for p in (form.prompts or "").splitlines() if p.strip()]
    if prompts:
        run_dir.mkdir(parents=True, exist_ok=True)
        prompt_file = run_dir / f"{name}-prompts.txt"
        atomic_write_text(prompt_file, "\n".join(prompts) + "\n")
        cfg.sample_prompts = str(prompt_file)
        if not cfg.sample_every_n_epochs and not cfg.sample_every_n_steps:
            cfg.sample_every_n_epochs = 1
    shown = [f"{k} = {'(unset)' if v is None else v}" for k, v in changes.items()]
    shown += [line.replace("=", " = ", 1) for line in extra]
    return PreparedRun(cfg, notes, run_dir, name, shown)


def start_training(ctx: UiContext, form: TrainForm):
    """Check the form and start the run as a GPU job; (job, None) or (None, readable error)."""
    from ..train.trainer import train

    try:
        run = prepare_run(ctx, form)
    except SdtuneError as e:
        return None, f"Error: {e}"
    device = ctx.settings.device

    def work(jc):
        def progress(step: int, total: int, info: dict) -> None:
            jc.progress(step, total, info)
            if info.get("loss") is not None:
                jc.record("loss", step, info["loss"])

        result = train(run.cfg, progress=progress, cancelled=jc.cancelled, device=device, notes=run.notes,
                       save_on_cancel=True)
        if result.outputs:
            ctx.outputs_written("lora")
        return result

    meta = {"kind": KIND, "run_dir": str(run.run_dir), "name": run.name, "changed": run.changed}
    return start_job(ctx.jobs, f"Train {run.name}", work, uses_gpu=True, meta=meta)


# --- following a run --------------------------------------------------------------------------------------
def train_line(snap) -> str:
    """One status line: epoch, step, loss, speed and ETA while running; how it ended afterwards."""
    info = snap.info
    if snap.state == "failed":
        return f"Error: {snap.error}"
    if snap.state == "running":
        if not snap.total:
            return (f"Running: {snap.title} | {snap.message or 'loading the model and caching latents'} | "
                    f"elapsed {clock(snap.elapsed)}")
        parts = [f"Running: {snap.title}", f"epoch {info.get('epoch', '?')}/{info.get('epochs', '?')}",
                 f"step {snap.done}/{snap.total} ({snap.fraction:.0%})"]
        if info.get("loss") is not None:
            parts.append(f"loss {info['loss']:.4f} (average {info.get('avg_loss', info['loss']):.4f})")
        if info.get("it_per_s"):
            parts.append(f"{info['it_per_s']:.2f} it/s")
        if info.get("eta_s") is not None:
            parts.append(f"ETA {clock(info['eta_s'])}")
        parts.append(f"elapsed {clock(snap.elapsed)}")
        return " | ".join(parts)
    result = snap.result
    if snap.state == "cancelled" or (result is not None and result.cancelled):
        where = f"; resumable state in {result.state_dir}" if result is not None and result.state_dir else ""
        return f"Stopped: {snap.title} at step {result.steps if result else snap.done}{where}"
    loss = f", final loss {result.final_loss:.4f}" if result is not None and result.final_loss is not None else ""
    steps = result.steps if result is not None else snap.done
    return f"Done: {snap.title} | {steps} steps in {clock(snap.elapsed)}{loss}"


def result_text(snap) -> str:
    """What the run wrote (or why it stopped) for the Result box."""
    if snap.state == "failed":
        return f"Error: {snap.error}"
    result = snap.result
    if result is None:
        return ""
    lines = []
    if result.outputs:
        lines.append("LoRA files written:")
        lines += [f"  {p}" for p in result.outputs]
    if result.state_dir:
        lines.append(f"resumable state: {result.state_dir} (resume = {result.state_dir} under More settings)")
    if result.log_paths:
        lines.append("loss log and chart: " + ", ".join(str(p) for p in result.log_paths))
    if result.validation_losses:
        lines.append("validation loss per epoch: " + ", ".join(f"{e}: {v:.4f}" for e, v in result.validation_losses))
    if result.samples:
        lines.append(f"{len(result.samples)} sample image(s) in {Path(result.samples[0]).parent}")
    changed = snap.meta.get("changed") or []
    if changed:
        lines.append("changed from the plan: " + "; ".join(changed))
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _read_log(path: Path) -> tuple[list[tuple[int, float]], list[int]]:
    """(validation (step, loss) points, epoch end steps) from a run's `<name>-log.json`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], []
    ends, total, validation = [], 0, []
    for e in data.get("epochs", []):
        total += int(e.get("steps") or 0)
        ends.append(total)
        if e.get("validation_loss") is not None:
            validation.append((total, float(e["validation_loss"])))
    return validation, ends


def loss_chart(snap, log_path: Optional[Path] = None):
    """The run's loss chart (per step, moving average, validation per epoch) as a PIL image."""
    from PIL import Image

    from ..train.run_log import draw_loss_curve

    losses = [y for _, y in snap.series.get("loss", ())]
    validation, ends = _read_log(log_path) if log_path is not None else ([], [])
    return Image.open(io.BytesIO(draw_loss_curve(losses, validation, ends or [len(losses)])))


def _sample_label(path: Path, name: str) -> str:
    """`<name>_e000002_0_<time>.png` -> "epoch 2 #0"; `<name>_000010_...` -> "step 10 #0"."""
    parts = path.stem[len(name) + 1:].split("_")
    if len(parts) >= 2:
        label, index = parts[0], parts[1]
        if label.startswith("e") and label[1:].isdigit():
            return f"epoch {int(label[1:])} #{index}"
        if label.isdigit():
            return f"step {int(label)} #{index}"
    return path.name


def sample_files(run_dir: Path, name: str) -> list[Path]:
    """The run's sample images, oldest first (the newest MAX_SAMPLES)."""
    folder = run_dir / "sample"
    if not folder.is_dir():
        return []
    found = sorted((p for p in folder.glob(f"{name}_*.png")), key=lambda p: (p.stat().st_mtime, p.name))
    return found[-MAX_SAMPLES:]


def sample_gallery(files: list[Path], name: str) -> list[tuple[Any, str]]:
    """(image, label) pairs for the gallery (PIL copies: the host serves them from its own cache)."""
    from PIL import Image

    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append((im.copy(), _sample_label(p, name)))
        except OSError:
            continue
    return out


def latest_train_job(ctx: UiContext):
    """The newest Train job (running or not), or None."""
    for snap in ctx.jobs.jobs():
        if snap.meta.get("kind") == KIND:
            return ctx.jobs.get(snap.id)
    return None


def follow_training(job, poll: float = 0.5) -> Iterator[tuple[Any, ...]]:
    """(status line, progress bar, chart or None, samples or None, result text) while the run goes; chart and
    samples are None when unchanged since the last yield."""
    run_dir, name = Path(job.meta.get("run_dir", ".")), job.meta.get("name", "")
    log_path = run_dir / f"{name}-log.json"
    drawn_steps, drawn_at, shown_samples = -1, 0.0, None
    for snap in follow(job, poll):
        line = train_line(snap)
        steps = len(snap.series.get("loss", ()))
        chart = None
        if not snap.running or (steps != drawn_steps and time.time() - drawn_at >= CHART_SECONDS):
            chart, drawn_steps, drawn_at = loss_chart(snap, log_path), steps, time.time()
        samples = None
        files = sample_files(run_dir, name)
        if files != shown_samples:
            shown_samples, samples = files, sample_gallery(files, name)
        yield line, progress_html(snap, line), chart, samples, result_text(snap) if not snap.running else ""


def stop_training(ctx: UiContext, job_id: Optional[int]) -> str:
    """The Stop button: the panel's job, else the newest running Train job, stops after its current step."""
    job = ctx.jobs.get(int(job_id)) if job_id is not None else None
    job = job if job is not None and job.state == "running" else latest_train_job(ctx)
    if job is None or job.state != "running":
        return "Nothing is training."
    ctx.jobs.cancel(job.id)
    return f"Stopping {job.title} after the current step (a resumable state and the LoRA so far are saved)…"


# --- the gradio panel -------------------------------------------------------------------------------------
def build_train_panel(gr, ctx: UiContext) -> None:
    """Add the Train panel's components and events to the current gradio Blocks context."""
    from ..train.optimizers import KNOWN_OPTIMIZERS
    from ..train.planner_rules import METHODS
    from .compat import follower_event, quick_event

    with gr.Row():
        model = gr.Dropdown(choices=list_files(ctx.folders.checkpoints), label="Base model",
                            elem_id="sdtune_train_model", scale=3)
        dataset = gr.Dropdown(choices=list_folders(ctx.folders.datasets), value=None, label="Dataset folder",
                              allow_custom_value=True, elem_id="sdtune_train_dataset", scale=3,
                              info="the folder holding the <repeats>_<name> image folders")
        refresh = gr.Button("Refresh lists", elem_id="sdtune_train_refresh", scale=1)
    with gr.Row():
        method = gr.Radio(choices=list(METHODS), value="lora", label="Method", elem_id="sdtune_train_method")
        rank = gr.Number(value=0, precision=0, label="Rank (network_dim; 0: the plan's)",
                         elem_id="sdtune_train_rank")
        output_name = gr.Textbox(label="Output name (empty: the plan's)", elem_id="sdtune_train_output_name",
                                 placeholder="my_lora")
        overwrite = gr.Checkbox(value=False, label="Overwrite existing files", elem_id="sdtune_train_overwrite")
    with gr.Accordion("Advanced settings (blank: the plan's value)", open=False, elem_id="sdtune_train_advanced"):
        with gr.Row():
            optimizer = gr.Dropdown(choices=[PLAN_CHOICE, *KNOWN_OPTIMIZERS], value=PLAN_CHOICE, label="Optimizer",
                                    info="the plan sets the learning rates for it", elem_id="sdtune_train_optimizer")
            reg = gr.Dropdown(choices=list_folders(ctx.folders.datasets), value=None, allow_custom_value=True,
                              label="Regularization images (optional)", elem_id="sdtune_train_reg")
        boxes = []
        for start in range(0, len(FIELDS), 5):
            with gr.Row():
                for key, label in FIELDS[start:start + 5]:
                    boxes.append(gr.Textbox(label=label, elem_id=f"sdtune_train_{key}"))
        extra = gr.Textbox(label="More settings (sd-scripts names, one `key = value` per line)", lines=3,
                           elem_id="sdtune_train_extra", placeholder="noise_offset = 0.05\nnetwork_dropout = 0.1")
        prompts = gr.Textbox(label="Sample prompts (one per line; images after every epoch)", lines=2,
                             elem_id="sdtune_train_prompts",
                             placeholder="my_trigger, 1girl, smiling --w 512 --h 512 --s 20 --d 42")
    with gr.Row():
        plan_btn = gr.Button("Plan", elem_id="sdtune_train_plan")
        start = gr.Button("Start", variant="primary", elem_id="sdtune_train_start")
        stop = gr.Button("Stop", variant="stop", elem_id="sdtune_train_stop")
        show = gr.Button("Show the running job", elem_id="sdtune_train_follow")
    bar = gr.HTML(elem_id="sdtune_train_progress")
    with gr.Row():
        chart = gr.Image(label="Loss (grey: per step, blue: average, orange: validation)", type="pil",
                         interactive=False, elem_id="sdtune_train_chart")
        samples = gr.Gallery(label="Samples", columns=4, elem_id="sdtune_train_samples")
    result = gr.Textbox(label="Result", lines=6, interactive=False, elem_id="sdtune_train_result")
    plan_text = gr.Textbox(label="The plan: each setting with its reason", lines=16, interactive=False,
                           elem_id="sdtune_train_plan_text")
    job_id = gr.State(None)

    form_inputs = [model, dataset, method, rank, output_name, overwrite, optimizer, reg, extra, prompts, *boxes]

    def form_of(values: tuple) -> TrainForm:
        m, d, meth, r, name, ow, opt, rg, ex, pr, *fields = values
        return TrainForm(m or "", d or "", meth or "lora", r, name or "", bool(ow), opt or PLAN_CHOICE, rg or "",
                         {k: (v or "") for (k, _), v in zip(FIELDS, fields)}, ex or "", pr or "")

    def refresh_lists():
        folders = list_folders(ctx.folders.datasets)
        return (gr.update(choices=list_files(ctx.folders.checkpoints)), gr.update(choices=folders),
                gr.update(choices=folders))

    def on_plan(*values):
        try:
            plan = make_plan(ctx, form_of(values))
        except Exception as e:  # noqa: BLE001 - shown in the panel
            return (error_text(e), gr.update(), gr.update(), *[gr.update() for _ in boxes])
        return (plan_summary(plan), plan.config.get("network_dim") or 0, plan.config["output_name"],
                *plan_fields(plan, ctx.settings.precision))

    def stream(job) -> Iterator[tuple]:
        for _, html_bar, pic, gallery, text in follow_training(job):
            yield (html_bar, gr.update() if pic is None else pic, gr.update() if gallery is None else gallery,
                   text, job.id)

    def on_start(*values):
        try:
            job, error = start_training(ctx, form_of(values))
        except Exception as e:  # noqa: BLE001 - shown in the panel
            job, error = None, error_text(e)
        if job is None:
            yield progress_html(None, error), gr.update(), gr.update(), error, None
            return
        yield from stream(job)

    def on_show():
        job = latest_train_job(ctx)
        if job is None:
            line = "Nothing has been trained since the WebUI started."
            yield progress_html(None, line), gr.update(), gr.update(), "", None
            return
        yield from stream(job)

    outputs = [bar, chart, samples, result, job_id]
    refresh.click(fn=refresh_lists, inputs=[], outputs=[model, dataset, reg], **quick_event(gr))
    plan_btn.click(fn=on_plan, inputs=form_inputs, outputs=[plan_text, rank, output_name, *boxes])
    start.click(fn=on_start, inputs=form_inputs, outputs=outputs, **follower_event(gr))
    show.click(fn=on_show, inputs=[], outputs=outputs, **follower_event(gr))
    stop.click(fn=lambda jid: stop_training(ctx, jid), inputs=[job_id], outputs=[result], **quick_event(gr))
