"""The Repair panel: diagnose an over-fitted LoRA or checkpoint against its base (report, chart, verdicts), then
repair it: each verdict's recommended fix is one click away, filling the fix form from the verdict's command.

Fixes: TE override with a donor, TE blend, LoRA TE strip / scale (with optional LBW), and merging the U-Net back
toward the base (the checkpoint U-Net verdict's repair). A "Rank epochs" part picks the epoch of a run to keep.
Every long action is a background job with progress and Stop; outputs never replace a file unasked.
"""

from __future__ import annotations

import io
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..errors import SdtuneError
from ..host import list_files, list_folders, resolve_folder
from .compat import follower_event, quick_event
from .context import UiContext
from .tools_common import (
    LORA_EXTS,
    Update,
    checkpoint_output_roots,
    devices,
    guarded,
    job_controls,
    listed,
    lora_output_roots,
    output_path,
    run_job,
    status_html,
    wire_job,
)

TE_OVERRIDE, TE_BLEND, LORA_STRIP, LORA_SCALE, MERGE_BACK = (
    "TE override", "TE blend", "LoRA TE strip", "LoRA TE scale", "Merge U-Net back")
TOOLS = (TE_OVERRIDE, TE_BLEND, LORA_STRIP, LORA_SCALE, MERGE_BACK)
LORA_TOOLS = (LORA_STRIP, LORA_SCALE)
TE_CHOICES = ("both", "1", "2")
MAX_FIXES = 4  # verdict buttons (a diagnosis has at most one TE and one U-Net repair per encoder)
NO_DATASET = "(none: the file's own tags)"
NO_BASE = "(none: losses only)"
KINDS = ("LoRA", "Checkpoint")

# which form fields each tool uses (the rest are hidden)
TOOL_FIELDS: dict[str, tuple[str, ...]] = {
    TE_OVERRIDE: ("model", "donor", "te", "position_ids"),
    TE_BLEND: ("model", "donor", "alpha", "layers", "te", "position_ids"),
    LORA_STRIP: ("lora", "unet_blocks", "te"),
    LORA_SCALE: ("lora", "scale", "unet_blocks", "te"),
    MERGE_BACK: ("model", "donor", "alpha", "dtype"),
}
POSITION_IDS_DEFAULT = {TE_OVERRIDE: "reset", TE_BLEND: "keep"}


@dataclass
class FixForm:
    """The repair form's inputs, in the order the components are passed to the handler."""

    tool: str = TE_OVERRIDE
    model: Optional[str] = None  # the checkpoint to repair
    donor: Optional[str] = None  # TE donor; for Merge U-Net back, the base to merge toward
    alpha: float = 0.5  # TE blend: donor share; Merge U-Net back: share of the base in the U-Net
    layers: str = ""  # TE blend: per-layer alphas, one comma list per encoder, one encoder per line
    lora: Optional[str] = None
    scale: float = 0.5
    unet_blocks: str = ""  # LoRA: LBW values or preset (blank: none)
    te: str = "both"
    position_ids: str = "reset"
    dtype: str = "fp16"
    output: str = ""
    overwrite: bool = False


FIX_FIELDS = [f.name for f in fields(FixForm)]


def _layers(text: str) -> tuple[tuple[float, ...], ...]:
    try:
        return tuple(tuple(float(v) for v in line.split(",") if v.strip())
                     for line in (text or "").replace(";", "\n").splitlines() if line.strip())
    except ValueError:
        raise SdtuneError(f"layers: expected comma-separated numbers, one line per text encoder, got {text!r}") \
            from None


def _lbw(text: str) -> object:
    text = (text or "").strip()
    if not text:
        return None
    if "," not in text:
        return text
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SdtuneError(f"U-Net blocks: expected numbers separated by commas or a preset name, got {text!r}") \
            from None


def describe_te(result) -> str:
    how = "from the donor" if result.tool == "te-override" else "blended"
    return "\n".join([f"Wrote {result.output}",
                      f"{result.architecture}: text encoder {'+'.join(result.encoders)} {how} ({result.te_tensors} "
                      f"tensors), {result.tensors - result.te_tensors} other tensors copied bit for bit, "
                      f"{result.seconds:.1f} s"])


def describe_lora_te(result) -> str:
    lines = [f"Wrote {result.output}", f"{result.te_modules} text-encoder modules: {result.stripped} stripped; "
                                       f"{len(result.scaled)} modules scaled, {result.seconds:.1f} s"]
    if result.unplaced:
        lines.append(f"{len(result.unplaced)} U-Net modules are in no LBW block and were left as they were, e.g. "
                     f"{result.unplaced[0]}")
    return "\n".join(lines)


@guarded
def run_fix(ctx: UiContext, *values) -> Iterator[Update]:
    """Run the repair the form describes as a background job, yielding (status, result, job id)."""
    from ..merge import MergeConfig, merge_checkpoints
    from ..repair import LoraTeConfig, TeBlendConfig, TeOverrideConfig, blend_te, override_te, repair_lora_te
    from .merge_panel import describe_merge

    f = FixForm(*values)
    if f.tool not in TOOLS:
        raise SdtuneError(f"repair: choose one of {', '.join(TOOLS)}")
    ckpts, over = ctx.folders.checkpoints, bool(f.overwrite)
    if f.tool in LORA_TOOLS:
        lora = listed(f.lora, ctx.folders.loras, "LoRA")
        out = output_path(f.output, lora_output_roots(ctx), over, create=True)
        config = LoraTeConfig(lora, str(out), strip=f.tool == LORA_STRIP,
                              scale=float(f.scale) if f.tool == LORA_SCALE else None, unet_blocks=_lbw(f.unet_blocks),
                              te=f.te, overwrite=over)
        yield from run_job(ctx, f"LoRA TE -> {out.name}", lambda jc: repair_lora_te(config, jc.progress, jc.cancelled),
                           describe_lora_te, writes="lora")
        return
    model = listed(f.model, ckpts, "model")
    donor = listed(f.donor, ckpts, "base" if f.tool == MERGE_BACK else "donor")
    out = output_path(f.output, checkpoint_output_roots(ctx), over, create=True)
    if f.tool == MERGE_BACK:
        alpha = float(f.alpha)
        merge = MergeConfig((model, donor), str(out), alpha=alpha, unet_alpha=alpha, te_alpha=0.0, vae_alpha=0.0,
                            dtype=f.dtype)
        yield from run_job(ctx, f"merge back -> {out.name}", lambda jc: merge_checkpoints(merge, jc.progress,
                                                                                          jc.cancelled),
                           describe_merge, writes="checkpoint")
    elif f.tool == TE_OVERRIDE:
        te = TeOverrideConfig(model, donor, str(out), te=f.te, position_ids=f.position_ids, overwrite=over)
        yield from run_job(ctx, f"TE override -> {out.name}", lambda jc: override_te(te, jc.progress, jc.cancelled),
                           describe_te, writes="checkpoint")
    else:
        blend = TeBlendConfig(model, donor, str(out), alpha=float(f.alpha), layers=_layers(f.layers), te=f.te,
                              position_ids=f.position_ids, overwrite=over)
        yield from run_job(ctx, f"TE blend -> {out.name}", lambda jc: blend_te(blend, jc.progress, jc.cancelled),
                           describe_te, writes="checkpoint")


def on_tool(tool: str) -> tuple[dict[str, bool], Optional[str]]:
    """(field -> shown, position_ids default or None) for a tool."""
    used = TOOL_FIELDS.get(tool, ())
    return {name: name in used for name in ("model", "donor", "alpha", "layers", "lora", "scale", "unet_blocks", "te",
                                            "position_ids", "dtype")}, POSITION_IDS_DEFAULT.get(tool)


def as_listed(path: str, roots: Iterable[Path]) -> Optional[str]:
    """A path as the dropdown entry of the folder it lies in (None when it is in none of them)."""
    p = Path(path).resolve()
    for root in roots:
        root = Path(root).resolve()
        if root in p.parents:
            return p.relative_to(root).as_posix()
    return None


def _output_name(path: str, roots: list[Path]) -> str:
    """What to type in the output box for a suggested output path: relative to the first output folder, the
    absolute path inside another one, else just the file name."""
    if roots and (rel := as_listed(path, roots[:1])) is not None:
        return rel
    return str(Path(path).resolve()) if as_listed(path, roots) is not None else Path(path).name


def _folder_name(folder: Path, roots: list[Path]) -> Optional[str]:
    """What to type in the run-folder box for a folder: relative to the first root ("." for the root itself),
    the absolute path inside another root, None outside them."""
    folder = Path(folder).resolve()
    for i, root in enumerate(Path(r).resolve() for r in roots):
        if folder == root or root in folder.parents:
            return folder.relative_to(root).as_posix() if i == 0 else str(folder)
    return None


def fix_from_command(ctx: UiContext, command: str) -> dict[str, Any]:
    """The repair form's values for a verdict's sdtune command, read by the CLI's own parser."""
    from ..cli import build_parser

    argv = shlex.split(command)
    if "lib_sdtune" in argv:
        argv = argv[argv.index("lib_sdtune") + 1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        raise SdtuneError(f"this verdict's command is not one the Repair panel can fill in: {command}") from None
    ckpts, loras = list(ctx.folders.checkpoints), list(ctx.folders.loras)
    if args.command == "merge":
        if len(args.models) != 2 or args.unet_alpha is None:
            raise SdtuneError(f"this verdict's merge is not a U-Net merge-back: {command}")
        return {"tool": MERGE_BACK, "model": as_listed(args.models[0], ckpts),
                "donor": as_listed(args.models[1], ckpts), "alpha": args.unet_alpha, "dtype": args.dtype,
                "output": _output_name(args.output, checkpoint_output_roots(ctx))}
    sub = getattr(args, "subcommand", None)
    if args.command == "repair" and sub in ("te-override", "te-blend"):
        fix = {"tool": TE_OVERRIDE if sub == "te-override" else TE_BLEND, "model": as_listed(args.model, ckpts),
               "donor": as_listed(args.donor, ckpts), "te": args.te, "position_ids": args.position_ids,
               "output": _output_name(args.output, checkpoint_output_roots(ctx))}
        if sub == "te-blend":
            fix.update(alpha=args.alpha, layers="\n".join(args.layers))
        return fix
    if args.command == "repair" and sub == "lora-te":
        fix = {"tool": LORA_STRIP if args.strip else LORA_SCALE, "lora": as_listed(args.lora, loras), "te": args.te,
               "unet_blocks": args.unet_blocks or "", "output": _output_name(args.output, lora_output_roots(ctx))}
        if not args.strip:
            fix["scale"] = args.scale
        return fix
    raise SdtuneError(f"this verdict's command is not one the Repair panel can fill in: {command}")


def fix_values(fix: Optional[dict]) -> list:
    """The repair form's values for a prefilled fix (None: leave that field as it is); Overwrite is cleared."""
    if not fix:
        return [None] * len(FIX_FIELDS)
    return [False if name == "overwrite" else fix.get(name) for name in FIX_FIELDS]


@dataclass
class DiagnosisView:
    """What the panel shows of a diagnosis: the report, its chart, and the fixes its verdicts recommend."""

    text: str
    chart: Any  # a PIL image
    fixes: list[dict] = field(default_factory=list)  # each: label + the repair form's values
    run_dir: Optional[str] = None  # the folder of earlier epochs, for "Rank epochs"
    data: dict = field(default_factory=dict)  # report.to_dict()


def diagnosis_view(ctx: UiContext, report) -> DiagnosisView:
    """The report as text, chart image and one prefilled fix per distinct repair command of a triggered verdict."""
    from PIL import Image

    from ..repair.epochs import earlier_epochs

    fixes, seen, notes = [], set(), []
    for v in report.verdicts:
        if not v.triggered or not v.command or v.command in seen:
            continue
        seen.add(v.command)
        try:
            fix = fix_from_command(ctx, v.command)
        except SdtuneError as e:
            notes.append(str(e))
            continue
        fix["label"] = f"Fix: {v.symptom} -> {fix['tool']}"
        fixes.append(fix)
    run_dir = None
    if report.kind == "lora" and (folder := earlier_epochs(report.model)) is not None:
        run_dir = _folder_name(folder, list(ctx.folders.loras) + list(ctx.folders.checkpoints))
    text = report.format_text() + "".join(f"note: {n}\n" for n in notes)
    chart = Image.open(io.BytesIO(report.chart_png()))
    chart.load()
    return DiagnosisView(text, chart, fixes[:MAX_FIXES], run_dir, report.to_dict())


@dataclass
class DiagnoseForm:
    """The diagnosis inputs, in component order."""

    kind: str = "LoRA"
    lora: Optional[str] = None
    model: Optional[str] = None
    base: Optional[str] = None
    dataset: str = NO_DATASET
    strength: float = 1.0
    max_tags: float = 64
    device: str = "cpu"


DIAGNOSE_FIELDS = [f.name for f in fields(DiagnoseForm)]


@guarded
def run_diagnose(ctx: UiContext, *values) -> Iterator[Update]:
    """Diagnose in a background job, yielding (status, DiagnosisView when done else "", job id)."""
    from ..repair.diagnose import DiagnoseConfig, diagnose

    f = DiagnoseForm(*values)
    base = listed(f.base, ctx.folders.checkpoints, "base")
    is_lora = f.kind == "LoRA"
    tuned = listed(f.lora, ctx.folders.loras, "LoRA") if is_lora else listed(f.model, ctx.folders.checkpoints, "model")
    dataset = None if not f.dataset or f.dataset == NO_DATASET else str(resolve_folder(f.dataset,
                                                                                       ctx.folders.datasets))
    max_tags = float(f.max_tags if f.max_tags not in (None, "") else 64)
    if max_tags != int(max_tags):
        raise SdtuneError(f"max tags: {f.max_tags!r} must be a whole number")
    config = DiagnoseConfig(base, model=None if is_lora else tuned, lora=tuned if is_lora else None, dataset=dataset,
                            lora_strength=float(f.strength), max_tags=int(max_tags), device=f.device or "cpu")
    yield from run_job(ctx, f"diagnose {Path(tuned).name}", lambda jc: diagnose(config, jc.progress, jc.cancelled),
                       lambda report: diagnosis_view(ctx, report), uses_gpu=config.device != "cpu")


@guarded
def run_pick_epoch(ctx: UiContext, run_dir: str, base: Optional[str], device: str) -> Iterator[Update]:
    """Rank a training run's epoch files (against a base when given), yielding (status, ranking text, job id)."""
    from ..repair.epochs import pick_epoch

    roots = list(ctx.folders.loras) + list(ctx.folders.checkpoints)
    folder = str(resolve_folder((run_dir or "").strip() or ".", roots, "run"))
    base_path = None if not base or base == NO_BASE else listed(base, ctx.folders.checkpoints, "base")
    device = device or "cpu"
    yield from run_job(ctx, f"rank epochs of {Path(folder).name}",
                       lambda jc: pick_epoch(folder, base_path, jc.progress, jc.cancelled, device=device),
                       lambda ranking: ranking.format_text(), uses_gpu=base_path is not None and device != "cpu")


def build_repair_panel(gr, ctx: UiContext) -> None:
    """Add the Repair panel's components and events to the current gradio Blocks context."""
    folders = ctx.folders
    ckpt_dd, lora_dd = [], []

    def ckpts(label: str, **kw):
        dd = gr.Dropdown(choices=list_files(folders.checkpoints), label=label, **kw)
        ckpt_dd.append(dd)
        return dd

    def loras(label: str, **kw):
        dd = gr.Dropdown(choices=list_files(folders.loras, LORA_EXTS), label=label, **kw)
        lora_dd.append(dd)
        return dd

    refresh = gr.Button("Refresh file lists", elem_id="sdtune_repair_refresh")
    with gr.Accordion("Diagnose", open=True):
        d: dict = {}
        with gr.Row():
            d["kind"] = gr.Radio(choices=list(KINDS), value="LoRA", label="Diagnose a", elem_id="sdtune_repair_kind")
            d["lora"] = loras("LoRA", elem_id="sdtune_repair_lora")
            d["model"] = ckpts("Tuned checkpoint", visible=False, elem_id="sdtune_repair_model")
            d["base"] = ckpts("Base checkpoint (what it was trained from)", elem_id="sdtune_repair_base")
        with gr.Row():
            d["dataset"] = gr.Dropdown(choices=[NO_DATASET, *list_folders(folders.datasets)], value=NO_DATASET,
                                       label="Dataset (its tags are tested)", elem_id="sdtune_repair_dataset")
            d["strength"] = gr.Slider(minimum=0.0, maximum=2.0, value=1.0, step=0.05, label="LoRA strength")
            d["max_tags"] = gr.Number(value=64, precision=0, label="Tags tested (most frequent)")
            d["device"] = gr.Radio(choices=devices(ctx), value="cpu", label="Device")
        diag = job_controls(gr, ctx, "repair_diagnose", "Diagnose", 18, "Report")
        diag_chart = gr.Image(label="Chart", type="pil", interactive=False, elem_id="sdtune_repair_chart")
        with gr.Row():
            fix_buttons = [gr.Button(f"Fix {i + 1}", visible=False, elem_id=f"sdtune_repair_fix_{i}")
                           for i in range(MAX_FIXES)]
        fixes_state = gr.State([])

    with gr.Accordion("Repair", open=True):
        r: dict = {}
        r["tool"] = gr.Radio(choices=list(TOOLS), value=TE_OVERRIDE, label="Repair", elem_id="sdtune_repair_tool")
        with gr.Row():
            r["model"] = ckpts("Checkpoint to repair", elem_id="sdtune_repair_fix_model")
            r["donor"] = ckpts("Donor / base (its text encoder, or the model to merge toward)",
                               elem_id="sdtune_repair_fix_donor")
            r["lora"] = loras("LoRA to repair", visible=False, elem_id="sdtune_repair_fix_lora")
        with gr.Row():
            r["alpha"] = gr.Slider(minimum=0.0, maximum=1.0, value=0.5, step=0.01, visible=False,
                                   label="alpha (TE blend: donor share; merge back: share of the base in the U-Net)")
            r["scale"] = gr.Slider(minimum=0.0, maximum=2.0, value=0.5, step=0.05, visible=False,
                                   label="Text-encoder scale")
            r["te"] = gr.Radio(choices=list(TE_CHOICES), value="both", label="SDXL text encoder(s)")
            r["position_ids"] = gr.Radio(choices=["reset", "keep"], value="reset", label="CLIP position_ids")
            r["dtype"] = gr.Radio(choices=["fp16", "bf16", "fp32"], value="fp16", visible=False, label="Output dtype")
        r["layers"] = gr.Textbox(label="Per-layer alphas (optional): one comma list per text encoder, one per line",
                                 lines=2, visible=False)
        r["unet_blocks"] = gr.Textbox(label="U-Net block weights (optional LBW values or preset)", visible=False)
        with gr.Row():
            r["output"] = gr.Textbox(label="Output name", placeholder="repaired.safetensors",
                                     elem_id="sdtune_repair_output")
            r["overwrite"] = gr.Checkbox(label="Overwrite an existing file", value=False)
        fix_controls = job_controls(gr, ctx, "repair", "Run repair")

    with gr.Accordion("Rank epochs (which epoch of a run to keep)", open=False):
        with gr.Row():
            run_dir = gr.Textbox(label="Run folder (relative to the LoRA folder; '.' for the folder itself)",
                                 value=".", elem_id="sdtune_repair_run_dir")
            epoch_base = gr.Dropdown(choices=[NO_BASE, *list_files(folders.checkpoints)], value=NO_BASE,
                                     label="Base (measures drift per epoch)", elem_id="sdtune_repair_epoch_base")
            epoch_device = gr.Radio(choices=devices(ctx), value="cpu", label="Device")
        epoch_controls = job_controls(gr, ctx, "repair_epochs", "Rank epochs", 10, "Ranking")

    def keep(value):
        return gr.update() if value is None else value

    def diagnose_events(*values):
        for line, view, jid in run_diagnose(ctx, *values):
            status = status_html(ctx, line, jid)
            if not isinstance(view, DiagnosisView):
                yield [status, gr.update(), gr.update(), gr.update(), gr.update(), jid,
                       *(gr.update() for _ in fix_buttons)]
                continue
            yield [status, view.text, view.chart, view.fixes, keep(view.run_dir), jid,
                   *(gr.update(visible=i < len(view.fixes), value=view.fixes[i]["label"] if i < len(view.fixes)
                               else f"Fix {i + 1}") for i in range(MAX_FIXES))]

    def fill(i: int):
        def go(fixes):
            return [keep(v) for v in fix_values(fixes[i] if fixes and i < len(fixes) else None)]
        return go

    def tool_changed(tool):
        shown, position_ids = on_tool(tool)
        return [gr.update(visible=shown[n]) for n in shown] + [keep(position_ids)]

    def refresh_lists():
        c, lo = list_files(folders.checkpoints), list_files(folders.loras, LORA_EXTS)
        return ([gr.update(choices=c)] * len(ckpt_dd) + [gr.update(choices=lo)] * len(lora_dd) +
                [gr.update(choices=[NO_DATASET, *list_folders(folders.datasets)]), gr.update(choices=[NO_BASE, *c])])

    fix_form = [r[name] for name in FIX_FIELDS]
    shown_fields = list(on_tool(TE_OVERRIDE)[0])
    refresh.click(fn=refresh_lists, inputs=[], outputs=[*ckpt_dd, *lora_dd, d["dataset"], epoch_base],
                  **quick_event(gr))
    d["kind"].change(fn=lambda kind: [gr.update(visible=kind == "LoRA"), gr.update(visible=kind != "LoRA")],
                     inputs=[d["kind"]], outputs=[d["lora"], d["model"]])
    diag.run.click(fn=diagnose_events, inputs=[d[name] for name in DIAGNOSE_FIELDS],
                   outputs=[diag.status, diag.result, diag_chart, fixes_state, run_dir, diag.job_id, *fix_buttons],
                   **follower_event(gr))
    for i, button in enumerate(fix_buttons):
        button.click(fn=fill(i), inputs=[fixes_state], outputs=fix_form, **quick_event(gr))
    r["tool"].change(fn=tool_changed, inputs=[r["tool"]], outputs=[*(r[n] for n in shown_fields), r["position_ids"]])
    wire_job(gr, ctx, fix_controls, run_fix, fix_form)
    wire_job(gr, ctx, epoch_controls, run_pick_epoch, [run_dir, epoch_base, epoch_device])
