"""The Merge panel: two or three checkpoints, a method, ratios, block weights (sliders, presets and the
supermerger-style comma list kept in sync), a preview of the recipe the output will hold, then Run/Stop.

The handlers are plain functions of the form values (the tests call them directly); the builder only wires
them. Only constructs present in gradio 3.41 (A1111), 4.40 (Forge) and 6 are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Optional

from ..errors import SdtuneError
from ..host import HostFolders, list_files
from ..merge.blocks import PRESETS, SD_SLOTS, SDXL_SLOTS_VAE, resolve_blocks
from ..merge.config import OUTPUT_DTYPES, MergeConfig, validate_config
from ..merge.methods import METHODS, get_method
from .compat import quick_event
from .context import UiContext
from .tools_common import (
    Update,
    checkpoint_output_roots,
    guarded,
    job_controls,
    listed,
    optional_float,
    output_path,
    run_job,
    status_html,
    wire_job,
)

SLIDER_SLOTS: tuple[str, ...] = (*SD_SLOTS, "VAE")  # one slider each; VAE is shown for SDXL only
LAYOUTS = {"SD1/SD2": "sd", "SDXL": "sdxl"}  # radio choice -> blocks.py layout
CUSTOM = "custom"
NO_VAE = "None"
DEFAULT_BLOCK = 0.5


def vae_roots(folders: HostFolders) -> list[Path]:
    """Where a VAE to bake in is looked for: the host's VAE folders, then the checkpoint folders."""
    return [Path(p) for p in (*folders.vaes, *folders.checkpoints)]


def layout_slots(layout: str) -> tuple[str, ...]:
    """The slots the comma list holds in a layout ("sd" or "sdxl")."""
    return SDXL_SLOTS_VAE if layout == "sdxl" else SD_SLOTS


def _layout(label: str) -> str:
    """A layout radio choice (or a layout name) as the layout name."""
    return LAYOUTS.get(label, "sdxl" if label == "sdxl" else "sd")


def layout_choice(layout: str) -> str:
    """The radio choice of a layout name."""
    return next(k for k, v in LAYOUTS.items() if v == layout)


def preset_values(name: str) -> dict[str, float]:
    """A preset as {slot: value} over every slider (VAE follows BASE, as the core does without a VAE slot)."""
    values = dict(zip(SD_SLOTS, PRESETS[name]))
    values["VAE"] = values["BASE"]
    return values


def blocks_text(values: dict[str, float], layout: str) -> str:
    """The comma list of a layout's slots, as supermerger writes it."""
    return ",".join(f"{float(values[s]):g}" for s in layout_slots(_layout(layout)))


def parse_blocks_text(text: str, layout: str) -> dict[str, float]:
    """The comma list typed for a layout as {slot: value}: 26 values for SD; 20, 21 or 26 (converted) for SDXL."""
    try:
        numbers = [float(v) for v in (text or "").replace(" ", "").split(",") if v]
    except ValueError:
        raise SdtuneError(f"blocks: expected numbers separated by commas, got {text!r}") from None
    layout = _layout(layout)
    values = resolve_blocks(numbers, "sdxl" if layout == "sdxl" else "sd1", "blocks")
    assert values is not None
    values.setdefault("VAE", values["BASE"])
    return values


def matching_preset(text: str, layout: str) -> str:
    """The preset whose comma list in this layout is `text`, or CUSTOM."""
    try:
        values = parse_blocks_text(text, layout)
    except SdtuneError:
        return CUSTOM
    slots = layout_slots(_layout(layout))
    for name in PRESETS:
        preset = preset_values(name)
        if all(abs(values[s] - preset[s]) < 1e-5 for s in slots):  # the list has 6 digits
            return name
    return CUSTOM


def blocks_field(text: Optional[str]) -> object:
    """A free blocks field (blocks for beta): blank -> None, a preset name stays a name, else numbers."""
    text = (text or "").strip()
    if not text:
        return None
    if "," not in text:
        return text
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SdtuneError(f"blocks_beta: expected numbers separated by commas or a preset name, got {text!r}") from None


def detect_layout(folders: HostFolders, name: Optional[str]) -> Optional[str]:
    """The layout radio choice for a listed .safetensors checkpoint, from its header (None when unknown)."""
    from ..io.detect import detect_architecture
    from ..io.safetensors_io import read_header
    from ..merge.blocks import layout_for

    if not name or not name.lower().endswith((".safetensors", ".sft")):
        return None
    try:
        tensors = read_header(listed(name, folders.checkpoints, "model A"))[0]
        return layout_choice(layout_for(detect_architecture({k: t.shape for k, t in tensors.items()}).family))
    except SdtuneError:
        return None


@dataclass
class MergeForm:
    """The Merge panel's inputs, in the order the components are passed to the handlers."""

    model_a: Optional[str] = None
    model_b: Optional[str] = None
    model_c: Optional[str] = None
    method: str = "weighted_sum"
    alpha: float = 0.5
    beta: float = 0.25
    unet_alpha: str = ""
    te_alpha: str = ""
    vae_alpha: str = ""
    use_blocks: bool = False
    preset: str = CUSTOM
    blocks: str = ""
    blocks_beta: str = ""
    layout: str = "SD1/SD2"
    seed: float = 0
    dtype: str = "fp16"
    vae: str = NO_VAE
    prune: bool = False
    position_ids: str = "keep"
    output: str = ""
    overwrite: bool = False

    def to_config(self, ctx: UiContext, create: bool = False) -> MergeConfig:
        """The core config these values mean; every path confined to the host's folders."""
        method = get_method(self.method)
        models = [self.model_a, self.model_b, self.model_c][:method.models]
        inputs = tuple(listed(m, ctx.folders.checkpoints, f"model {role}") for role, m in zip("ABC", models))
        blocks: object = None
        if self.use_blocks:
            preset = self.preset if self.preset in PRESETS else CUSTOM
            if preset != CUSTOM and matching_preset(self.blocks, self.layout) == preset:
                blocks = preset  # the recipe records the preset's name
            else:
                values = parse_blocks_text(self.blocks, self.layout)
                blocks = tuple(values[s] for s in layout_slots(_layout(self.layout)))
        seed = float(self.seed or 0)
        if seed != int(seed):
            raise SdtuneError(f"seed: {self.seed!r} must be a whole number")
        vae = None if not self.vae or self.vae == NO_VAE else listed(self.vae, vae_roots(ctx.folders), "vae")
        output = output_path(self.output, checkpoint_output_roots(ctx), bool(self.overwrite), create)
        config = MergeConfig(
            inputs=inputs, output=str(output), method=self.method, alpha=float(self.alpha),
            beta=float(self.beta) if method.beta is not None else None,
            unet_alpha=optional_float(self.unet_alpha, "U-Net alpha"), te_alpha=optional_float(self.te_alpha,
                                                                                              "text encoder alpha"),
            vae_alpha=optional_float(self.vae_alpha, "VAE alpha"), blocks=blocks,
            blocks_beta=blocks_field(self.blocks_beta) if method.beta is not None else None,
            seed=int(seed), dtype=self.dtype, vae=vae, prune_ema=bool(self.prune), prune_schedule=bool(self.prune),
            position_ids=self.position_ids)
        validate_config(config)
        return config


FIELDS = [f.name for f in fields(MergeForm)]


def preview_recipe(ctx: UiContext, *values) -> tuple[str, str]:
    """(status, JSON): the recipe the output will hold (hashes are computed while merging), and where it goes."""
    from ..io.detect import detect_architecture
    from ..io.safetensors_io import read_header
    from ..merge.recipe import build_recipe
    from ..merge.sources import InputHashes

    try:
        config = MergeForm(*values).to_config(ctx)
        pending = "computed while merging"
        hashes = [InputHashes(pending, pending, Path(p).stat().st_size) for p in config.inputs]
        vae_hash = InputHashes(pending, pending, Path(config.vae).stat().st_size) if config.vae else None
        architecture, family = "known once read (not .safetensors)", None
        if config.inputs[0].lower().endswith((".safetensors", ".sft")):
            tensors = read_header(config.inputs[0])[0]
            info = detect_architecture({k: t.shape for k, t in tensors.items()}, "model A")
            architecture, family = info.architecture, info.family
        recipe = build_recipe(config, architecture, hashes, vae_hash)
        shown: dict = {"output": config.output, "replaces_existing_file": Path(config.output).exists(), **recipe}
        if family is not None:
            for name, blocks in (("alpha", config.blocks), ("beta", config.blocks_beta)):
                resolved = resolve_blocks(blocks, family, f"blocks{'' if name == 'alpha' else '_beta'}")
                if resolved is not None:
                    shown[f"block_weights_{name}"] = resolved
    except (SdtuneError, OSError) as e:
        return f"Error: {e}", ""
    return f"Preview: {Path(config.output).name} ({config.method}); press Run to write it.", \
        json.dumps(shown, indent=2, ensure_ascii=False)


def describe_merge(result) -> str:
    """The result for people (what the CLI prints)."""
    return "\n".join([f"Wrote {result.output}", *result.details()])


@guarded
def run_merge(ctx: UiContext, *values) -> Iterator[Update]:
    """Run: check the form, then merge in a background job, yielding (status, result, job id)."""
    from ..merge.checkpoint_merge import merge_checkpoints

    config = MergeForm(*values).to_config(ctx, create=True)
    yield from run_job(ctx, f"merge -> {Path(config.output).name}",
                       lambda jc: merge_checkpoints(config, jc.progress, jc.cancelled), describe_merge,
                       writes="checkpoint")


def on_method(name: str) -> tuple[str, dict, dict]:
    """(formula, beta slider update, model C update) for a method."""
    method = METHODS.get(name)
    if method is None:
        return f"Unknown method {name!r}", {"visible": False}, {"visible": True}
    beta = {"visible": False}
    if method.beta is not None:
        beta = {"visible": True, "value": method.beta.default,
                "label": f"beta: {method.beta.meaning} ({method.beta.low:g}..{method.beta.high:g})"}
    return f"**{name}**: `{method.formula}` ({method.models} models)", beta, {"visible": method.models == 3}


def on_preset(name: str, layout: str) -> list:
    """A preset picked: [comma list, every slider value]."""
    if name not in PRESETS:
        return [None] * (1 + len(SLIDER_SLOTS))
    values = preset_values(name)
    return [blocks_text(values, layout), *(values[s] for s in SLIDER_SLOTS)]


def on_sliders(layout: str, *values: float) -> tuple[str, str]:
    """A slider moved: (comma list, preset) — the list follows, the preset becomes whatever matches."""
    text = blocks_text(dict(zip(SLIDER_SLOTS, values)), layout)
    return text, matching_preset(text, layout)


def on_blocks_text(text: str, layout: str) -> list:
    """The comma list edited: [every slider value (None: unchanged), preset, status]."""
    try:
        values = parse_blocks_text(text, layout)
    except SdtuneError as e:
        return [None] * len(SLIDER_SLOTS) + [CUSTOM, f"Error: {e}"]
    return [values.get(s) for s in SLIDER_SLOTS] + [matching_preset(text, layout), ""]


def on_layout(layout: str, *values: float) -> list:
    """The layout switched: [comma list of the new layout, each slider shown or hidden]."""
    shown = set(layout_slots(_layout(layout)))
    return [blocks_text(dict(zip(SLIDER_SLOTS, values)), layout), *(s in shown for s in SLIDER_SLOTS)]


def build_merge_panel(gr, ctx: UiContext) -> None:
    """Add the Merge panel's components and events to the current gradio Blocks context."""
    folders = ctx.folders
    ckpts = list_files(folders.checkpoints)
    c: dict = {}
    with gr.Row():
        for role in "ABC":
            c[f"model_{role.lower()}"] = gr.Dropdown(choices=ckpts, label=f"Model {role}",
                                                     elem_id=f"sdtune_merge_{role.lower()}", visible=role != "C")
        refresh = gr.Button("Refresh", elem_id="sdtune_merge_refresh")
    with gr.Row():
        c["method"] = gr.Dropdown(choices=list(METHODS), value="weighted_sum", label="Method",
                                  elem_id="sdtune_merge_method")
        formula = gr.Markdown(on_method("weighted_sum")[0])
    with gr.Row():
        c["alpha"] = gr.Slider(minimum=-1.0, maximum=2.0, value=0.5, step=0.01, label="alpha (0 keeps A, 1 takes B)",
                               elem_id="sdtune_merge_alpha")
        c["beta"] = gr.Slider(minimum=-1.0, maximum=2.0, value=0.25, step=0.01, label="beta", visible=False,
                              elem_id="sdtune_merge_beta")
    with gr.Accordion("Ratios per part (blank: alpha, or the BASE block weight)", open=False):
        with gr.Row():
            c["unet_alpha"] = gr.Textbox(label="U-Net alpha", placeholder="alpha")
            c["te_alpha"] = gr.Textbox(label="Text encoder alpha", placeholder="BASE / alpha")
            c["vae_alpha"] = gr.Textbox(label="VAE alpha", placeholder="VAE / BASE / alpha")
    with gr.Accordion("Block weights (MBW) for alpha", open=False):
        c["use_blocks"] = gr.Checkbox(label="Use block weights (the U-Net by block; BASE = text encoder and VAE)",
                                      value=False, elem_id="sdtune_merge_use_blocks")
        with gr.Row():
            c["layout"] = gr.Radio(choices=list(LAYOUTS), value="SD1/SD2", label="Layout (set from model A)",
                                   elem_id="sdtune_merge_layout")
            c["preset"] = gr.Dropdown(choices=[CUSTOM, *PRESETS], value=CUSTOM, label="Preset",
                                      elem_id="sdtune_merge_preset")
        default = {s: DEFAULT_BLOCK for s in SLIDER_SLOTS}
        c["blocks"] = gr.Textbox(value=blocks_text(default, "sd"), label="Block weights, comma-separated "
                                 "(BASE,IN00..,MID,OUT00..; SDXL: ..,VAE)", elem_id="sdtune_merge_blocks")
        sliders = {}

        def slider(slot: str):
            sliders[slot] = gr.Slider(minimum=-1.0, maximum=2.0, value=DEFAULT_BLOCK, step=0.01, label=slot,
                                      visible=slot != "VAE", elem_id=f"sdtune_merge_block_{slot}")

        with gr.Row():
            for slot in ("BASE", "MID", "VAE"):
                slider(slot)
        with gr.Row():
            with gr.Column():
                for slot in SD_SLOTS[1:13]:
                    slider(slot)
            with gr.Column():
                for slot in SD_SLOTS[14:]:
                    slider(slot)
        c["blocks_beta"] = gr.Textbox(label="Block weights for beta (comma list or preset name; blank: none)")
    with gr.Accordion("Options", open=False):
        with gr.Row():
            c["dtype"] = gr.Radio(choices=list(OUTPUT_DTYPES), value="fp16", label="Output dtype")
            c["position_ids"] = gr.Radio(choices=["keep", "reset"], value="keep",
                                         label="CLIP position_ids (keep A's, or reset to 0..76)")
            c["seed"] = gr.Number(value=0, precision=0, label="Seed (dare)")
        with gr.Row():
            c["vae"] = gr.Dropdown(choices=[NO_VAE, *list_files(vae_roots(folders))], value=NO_VAE,
                                   label="Bake in VAE")
            c["prune"] = gr.Checkbox(label="Prune EMA weights and schedule buffers", value=False)
    with gr.Row():
        out_dir = checkpoint_output_roots(ctx)
        c["output"] = gr.Textbox(label="Output name", placeholder="merged.safetensors",
                                 info=f"saved in {out_dir[0]}" if out_dir else "no checkpoint folder configured",
                                 elem_id="sdtune_merge_output")
        c["overwrite"] = gr.Checkbox(label="Overwrite an existing file", value=False, elem_id="sdtune_merge_overwrite")
    preview_btn = gr.Button("Preview recipe", elem_id="sdtune_merge_preview")
    controls = job_controls(gr, ctx, "merge", "Run merge")
    preview = gr.Code(label="Recipe preview (what the output's metadata will hold)", language="json",
                      interactive=False, elem_id="sdtune_merge_recipe")

    form = [c[name] for name in FIELDS]
    slider_list = [sliders[s] for s in SLIDER_SLOTS]

    def refresh_lists():
        names = list_files(folders.checkpoints)
        return [gr.update(choices=names)] * 3 + [gr.update(choices=[NO_VAE, *list_files(vae_roots(folders))])]

    def method_changed(name):
        text, beta, model_c = on_method(name)
        return text, gr.update(**beta), gr.update(**model_c)

    def keep_or(value):
        return gr.update() if value is None else value

    refresh.click(fn=refresh_lists, inputs=[], outputs=[c["model_a"], c["model_b"], c["model_c"], c["vae"]],
                  **quick_event(gr))
    c["method"].change(fn=method_changed, inputs=[c["method"]], outputs=[formula, c["beta"], c["model_c"]])
    c["model_a"].change(fn=lambda name, layout: detect_layout(folders, name) or layout,
                        inputs=[c["model_a"], c["layout"]], outputs=[c["layout"]])

    def layout_changed(layout, *values):
        text, *shown = on_layout(layout, *values)
        return [text, *(gr.update(visible=v) for v in shown)]

    c["layout"].change(fn=layout_changed, inputs=[c["layout"], *slider_list], outputs=[c["blocks"], *slider_list])
    # .change (gradio 3.41 fires no .input when an option is picked): a preset set by the sliders or the list
    # matches them already, so filling them again changes nothing, and nothing loops
    c["preset"].change(fn=lambda name, layout: [keep_or(v) for v in on_preset(name, layout)],
                       inputs=[c["preset"], c["layout"]], outputs=[c["blocks"], *slider_list])
    for s in slider_list:
        s.input(fn=on_sliders, inputs=[c["layout"], *slider_list], outputs=[c["blocks"], c["preset"]])

    def blocks_edited(text, layout):
        *values, note = on_blocks_text(text, layout)
        return [*(keep_or(v) for v in values), status_html(ctx, note, None) if note else gr.update()]

    for event in (c["blocks"].blur, c["blocks"].submit):
        event(fn=blocks_edited, inputs=[c["blocks"], c["layout"]], outputs=[*slider_list, c["preset"],
                                                                            controls.status])

    def preview_events(*values):
        line, recipe = preview_recipe(ctx, *values)
        return status_html(ctx, line, None), recipe

    preview_btn.click(fn=preview_events, inputs=form, outputs=[controls.status, preview], **quick_event(gr))
    wire_job(gr, ctx, controls, run_merge, form)
