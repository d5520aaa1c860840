"""The LoRA tools panel: info, bake into a checkpoint, merge, resize and extract, each a sub-tab over one core call.

Files are picked from the host's LoRA and checkpoint folders; LoRAs are written to the first LoRA folder,
baked checkpoints to the checkpoint output folder. Long work runs as a background job with a Stop button.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from ..errors import SdtuneError
from ..host import list_files
from ..merge.blocks import parse_blocks
from .compat import quick_event
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
    optional_float,
    optional_int,
    output_path,
    run_job,
    wire_job,
)

SLOTS = 4  # LoRAs a bake or merge takes at once from the panel
KEEP = "keep"  # dtype choice: each tensor keeps its own
DTYPES = (KEEP, "fp16", "bf16", "fp32")
NO_DYNAMIC = "fixed rank"
DYNAMIC = (NO_DYNAMIC, "sv_ratio", "sv_fro", "sv_cumulative")


def _dtype(value: Optional[str]) -> Optional[str]:
    return None if not value or value == KEEP else value


def _dynamic(value: Optional[str]) -> Optional[str]:
    return None if not value or value == NO_DYNAMIC else value


def _rank(value, what: str = "rank") -> int:
    rank = optional_int(value, what)
    if rank is None:
        raise SdtuneError(f"{what}: enter a rank of 1 or more")
    return rank


def lora_info(ctx: UiContext, name: Optional[str]) -> tuple[str, dict]:
    """`lora info` on a listed LoRA: (report text, the --json fields); errors as text."""
    from ..networks.lora_info import format_lora_info, inspect_lora

    try:
        info = inspect_lora(listed(name, ctx.folders.loras, "LoRA"))
    except SdtuneError as e:
        return f"Error: {e}", {}
    return format_lora_info(info), info.to_dict()


def describe_bake(result) -> str:
    lines = [f"Wrote {result.output}",
             f"{result.architecture}: {result.changed} of {result.tensors} tensors changed in {result.seconds:.1f} s"]
    for path, n in result.applied.items():
        lines.append(f"{Path(path).name}: {n} modules baked")
        missing = result.unmatched.get(path)
        if missing:
            lines.append(f"  {len(missing)} modules match no layer and were NOT baked: {', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}")
    return "\n".join(lines)


@guarded
def run_bake(ctx: UiContext, checkpoint: Optional[str], dtype: str, output: str, overwrite: bool,
             *slots) -> Iterator[Update]:
    """Bake up to SLOTS LoRAs (slots: LoRA name, strength, block weights, ...) into a checkpoint."""
    from ..merge.lora_bake import BakeConfig, LoraInput, bake_loras

    ckpt = listed(checkpoint, ctx.folders.checkpoints, "checkpoint")
    loras = tuple(LoraInput(listed(name, ctx.folders.loras, "LoRA"), float(strength),
                            parse_blocks(blocks, "block weights"))
                  for name, strength, blocks in zip(slots[0::3], slots[1::3], slots[2::3]) if name)
    if not loras:
        raise SdtuneError("LoRA: choose at least one LoRA to bake")
    out = output_path(output, checkpoint_output_roots(ctx), bool(overwrite), create=True)
    config = BakeConfig(ckpt, loras, str(out), dtype=_dtype(dtype), overwrite=bool(overwrite))
    yield from run_job(ctx, f"bake -> {out.name}", lambda jc: bake_loras(config, jc.progress, jc.cancelled),
                       describe_bake, writes="checkpoint")


def _energy(report: list, top: int = 8) -> list[str]:
    """The modules that lost the most, and the mean share of ΔW kept."""
    if not report:
        return []
    worst = sorted(report, key=lambda r: r.fro_retained)[:top]
    lines = [f"mean Frobenius norm of ΔW kept: {sum(r.fro_retained for r in report) / len(report):.2%}",
             "modules that lost the most (rank, sum(S) kept, Frobenius kept):"]
    lines += [f"  {r.name}: {r.old_rank} -> {r.new_rank}, {r.sum_retained:.1%}, {r.fro_retained:.1%}" for r in worst]
    return lines


def describe_lora_merge(result) -> str:
    ranks = sorted(set(result.ranks.values()))
    rank = ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} per module"
    return "\n".join([f"Wrote {result.output}", f"{result.mode}: {result.modules} modules, rank {rank}, "
                                                 f"{result.seconds:.1f} s", *_energy(result.report)])


@guarded
def run_lora_merge(ctx: UiContext, rank, conv_rank, dynamic: str, param, clamp, dtype: str, output: str,
                   overwrite: bool, *slots) -> Iterator[Update]:
    """Merge up to SLOTS LoRAs (slots: LoRA name, ratio, ...): concatenation, or SVD to a rank."""
    from ..merge.lora_merge import LoraMergeConfig, merge_loras

    loras = tuple((listed(name, ctx.folders.loras, "LoRA"), float(ratio))
                  for name, ratio in zip(slots[0::2], slots[1::2]) if name)
    if not loras:
        raise SdtuneError("LoRA: choose the LoRAs to merge")
    out = output_path(output, lora_output_roots(ctx), bool(overwrite), create=True)
    config = LoraMergeConfig(loras, str(out), rank=optional_int(rank, "rank"),
                             conv_rank=optional_int(conv_rank, "conv rank"), dynamic=_dynamic(dynamic),
                             param=optional_float(param, "dynamic parameter"),
                             clamp_quantile=optional_float(clamp, "clamp quantile"), dtype=_dtype(dtype),
                             overwrite=bool(overwrite))
    yield from run_job(ctx, f"LoRA merge -> {out.name}", lambda jc: merge_loras(config, jc.progress, jc.cancelled),
                       describe_lora_merge, writes="lora")


def describe_resize(result) -> str:
    return "\n".join([f"Wrote {result.output} ({len(result.modules)} modules, {result.seconds:.1f} s)",
                      *_energy(result.modules)])


@guarded
def run_resize(ctx: UiContext, lora: Optional[str], rank, conv_rank, dynamic: str, param, dtype: str, output: str,
               overwrite: bool) -> Iterator[Update]:
    """Resize a LoRA to a rank (fixed, or the maximum of a dynamic rule)."""
    from ..merge.lora_resize import ResizeConfig, resize_lora

    src = listed(lora, ctx.folders.loras, "LoRA")
    out = output_path(output, lora_output_roots(ctx), bool(overwrite), create=True)
    config = ResizeConfig(src, str(out), rank=_rank(rank), conv_rank=optional_int(conv_rank, "conv rank"),
                          dynamic=_dynamic(dynamic), param=optional_float(param, "dynamic parameter"),
                          dtype=_dtype(dtype), overwrite=bool(overwrite))
    yield from run_job(ctx, f"resize -> {out.name}", lambda jc: resize_lora(config, jc.progress, jc.cancelled),
                       describe_resize, writes="lora")


def describe_extract(result) -> str:
    te = (f"text encoder kept (max |diff| {result.te_max_diff:.4g})" if result.te_kept else
          f"text encoder unchanged (max |diff| {result.te_max_diff:.4g}): U-Net only")
    return "\n".join([f"Wrote {result.output}",
                      f"{result.architecture}: {result.te_modules} text-encoder and {result.unet_modules} U-Net "
                      f"modules, {result.seconds:.1f} s", te,
                      f"mean Frobenius norm of ΔW kept: {result.mean_fro_retained:.2%}"])


@guarded
def run_extract(ctx: UiContext, base: Optional[str], tuned: Optional[str], rank, conv_rank, clamp, min_diff,
                svd: str, device: str, output: str, overwrite: bool) -> Iterator[Update]:
    """Extract a LoRA of TUNED - BASE (fp16)."""
    from ..merge.lora_extract import ExtractConfig, extract_lora

    base_path = listed(base, ctx.folders.checkpoints, "base checkpoint")
    tuned_path = listed(tuned, ctx.folders.checkpoints, "tuned checkpoint")
    out = output_path(output, lora_output_roots(ctx), bool(overwrite), create=True)
    min_diff_value = optional_float(min_diff, "min diff")
    config = ExtractConfig(base_path, tuned_path, str(out), rank=_rank(rank),
                           conv_rank=optional_int(conv_rank, "conv rank"),
                           clamp_quantile=optional_float(clamp, "clamp quantile"),
                           min_diff=0.01 if min_diff_value is None else min_diff_value, svd=svd or "exact",
                           device=device or "cpu", overwrite=bool(overwrite))
    yield from run_job(ctx, f"extract -> {out.name}", lambda jc: extract_lora(config, jc.progress, jc.cancelled),
                       describe_extract, uses_gpu=config.device != "cpu", writes="lora")


def build_lora_panel(gr, ctx: UiContext) -> None:
    """Add the LoRA tools panel's components and events to the current gradio Blocks context."""
    folders = ctx.folders
    lora_dd, ckpt_dd = [], []  # dropdowns the Refresh button fills

    def loras(label: str, **kw):
        dd = gr.Dropdown(choices=list_files(folders.loras, LORA_EXTS), label=label, **kw)
        lora_dd.append(dd)
        return dd

    def ckpts(label: str, **kw):
        dd = gr.Dropdown(choices=list_files(folders.checkpoints), label=label, **kw)
        ckpt_dd.append(dd)
        return dd

    def output_row(prefix: str, placeholder: str, roots):
        with gr.Row():
            out = gr.Textbox(label="Output name", placeholder=placeholder, elem_id=f"sdtune_lora_{prefix}_output",
                             info=f"saved in {roots[0]}" if roots else "no folder configured")
            over = gr.Checkbox(label="Overwrite an existing file", value=False)
        return out, over

    refresh = gr.Button("Refresh file lists", elem_id="sdtune_lora_refresh")
    lora_roots, ckpt_roots = lora_output_roots(ctx), checkpoint_output_roots(ctx)
    with gr.Tabs(elem_id="sdtune_lora_tabs"):
        with gr.Tab("Info"):
            with gr.Row():
                info_name = loras("LoRA", elem_id="sdtune_lora_info_file")
                info_btn = gr.Button("Inspect", variant="primary", elem_id="sdtune_lora_info_run")
            info_text = gr.Textbox(label="Report", lines=8, interactive=False, elem_id="sdtune_lora_info_report")
            info_json = gr.JSON(label="Details (the fields of `lora info --json`)")
            info_btn.click(fn=lambda name: lora_info(ctx, name), inputs=[info_name], outputs=[info_text, info_json],
                           **quick_event(gr))

        with gr.Tab("Bake into checkpoint"):
            bake_ckpt = ckpts("Checkpoint", elem_id="sdtune_lora_bake_ckpt")
            bake_slots = []
            for i in range(SLOTS):
                with gr.Row():
                    bake_slots += [loras(f"LoRA {i + 1}", elem_id=f"sdtune_lora_bake_{i}"),
                                   gr.Slider(minimum=-2.0, maximum=2.0, value=1.0, step=0.05, label="Strength"),
                                   gr.Textbox(label="Block weights (LBW values or preset; blank: none)")]
            bake_dtype = gr.Radio(choices=list(DTYPES), value=KEEP, label="dtype of the float weights")
            bake_out, bake_over = output_row("bake", "baked.safetensors", ckpt_roots)
            wire_job(gr, ctx, job_controls(gr, ctx, "lora_bake", "Bake", 6), run_bake,
                     [bake_ckpt, bake_dtype, bake_out, bake_over, *bake_slots])

        with gr.Tab("Merge LoRAs"):
            merge_slots = []
            for i in range(SLOTS):
                with gr.Row():
                    merge_slots += [loras(f"LoRA {i + 1}", elem_id=f"sdtune_lora_merge_{i}"),
                                    gr.Slider(minimum=-2.0, maximum=2.0, value=1.0, step=0.05, label="Ratio")]
            with gr.Row():
                merge_rank = gr.Number(value=0, precision=0, label="Rank (0: exact concatenation)")
                merge_conv = gr.Number(value=0, precision=0, label="3x3 conv rank (0: the rank)")
                merge_dyn = gr.Dropdown(choices=list(DYNAMIC), value=NO_DYNAMIC, label="Dynamic rank (SVD)")
                merge_param = gr.Textbox(label="Dynamic parameter", placeholder="e.g. 0.9")
                merge_clamp = gr.Textbox(label="Clamp quantile", placeholder="off (sd-scripts: 0.99)")
            merge_dtype = gr.Radio(choices=list(DTYPES), value=KEEP, label="Output dtype (keep: the first file's)")
            merge_out, merge_over = output_row("merge", "merged_lora.safetensors", lora_roots)
            wire_job(gr, ctx, job_controls(gr, ctx, "lora_merge", "Merge", 8), run_lora_merge,
                     [merge_rank, merge_conv, merge_dyn, merge_param, merge_clamp, merge_dtype, merge_out, merge_over,
                      *merge_slots])

        with gr.Tab("Resize"):
            resize_lora_dd = loras("LoRA", elem_id="sdtune_lora_resize_file")
            with gr.Row():
                resize_rank = gr.Number(value=8, precision=0, label="New rank (the maximum when dynamic)")
                resize_conv = gr.Number(value=0, precision=0, label="3x3 conv rank (0: the rank)")
                resize_dyn = gr.Dropdown(choices=list(DYNAMIC), value=NO_DYNAMIC, label="Dynamic rank")
                resize_param = gr.Textbox(label="Dynamic parameter", placeholder="e.g. 0.9")
            resize_dtype = gr.Radio(choices=list(DTYPES), value=KEEP, label="Output dtype (keep: the input's)")
            resize_out, resize_over = output_row("resize", "resized.safetensors", lora_roots)
            wire_job(gr, ctx, job_controls(gr, ctx, "lora_resize", "Resize", 8), run_resize,
                     [resize_lora_dd, resize_rank, resize_conv, resize_dyn, resize_param, resize_dtype, resize_out,
                      resize_over])

        with gr.Tab("Extract from checkpoints"):
            with gr.Row():
                ex_base = ckpts("Base checkpoint", elem_id="sdtune_lora_extract_base")
                ex_tuned = ckpts("Tuned checkpoint", elem_id="sdtune_lora_extract_tuned")
            with gr.Row():
                ex_rank = gr.Number(value=32, precision=0, label="Rank")
                ex_conv = gr.Number(value=0, precision=0, label="3x3 conv rank (0: no ResNet layers)")
                ex_clamp = gr.Textbox(value="0.99", label="Clamp quantile (blank: off)")
                ex_min = gr.Textbox(value="0.01", label="Keep the text encoder if it differs by more than")
            with gr.Row():
                ex_svd = gr.Radio(choices=["exact", "randomized"], value="exact", label="SVD")
                ex_device = gr.Radio(choices=devices(ctx), value="cpu", label="Device")
            ex_out, ex_over = output_row("extract", "extracted.safetensors", lora_roots)
            wire_job(gr, ctx, job_controls(gr, ctx, "lora_extract", "Extract", 6), run_extract,
                     [ex_base, ex_tuned, ex_rank, ex_conv, ex_clamp, ex_min, ex_svd, ex_device, ex_out, ex_over])

    def refresh_lists():
        lora_names, ckpt_names = list_files(folders.loras, LORA_EXTS), list_files(folders.checkpoints)
        return [gr.update(choices=lora_names)] * len(lora_dd) + [gr.update(choices=ckpt_names)] * len(ckpt_dd)

    refresh.click(fn=refresh_lists, inputs=[], outputs=[*lora_dd, *ckpt_dd], **quick_event(gr))
