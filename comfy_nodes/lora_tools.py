"""LoRA tool nodes: bake into a checkpoint, merge, resize, extract, strip or scale the TE part, info.

New files go to ComfyUI's loras (or checkpoints) folder under new names; inputs are never changed.
"""

from __future__ import annotations

import json

from comfy_api.latest import io, ui

from lib_sdtune.merge.blocks import parse_blocks

from .shared import (
    NONE,
    HostProgress,
    core_errors,
    model_list,
    model_path,
    new_output,
    optional_model_path,
    whole_device,
)

DYNAMIC = [NONE, "sv_ratio", "sv_fro", "sv_cumulative"]
DYNAMIC_TIP = ("choose each module's rank (rank is then the maximum): sv_ratio keeps singular values above "
               "S_max/param, sv_fro the share param of the Frobenius norm, sv_cumulative the share param of the sum "
               "of singular values; none: the fixed rank")
LORA_OUTPUT_TIP = ("the new LoRA in the loras folder ('/' for sub-folders); a taken name gets a number: files are "
                   "never overwritten")
LBW_TIP = ("LoRA Block Weight values: 17 (SD) or 12 (SDXL) as the LBW extension writes them, 26 BASE,IN00..IN11,MID,"
           "OUT00..OUT11 for SD1/SD2, 20/21 for SDXL, or a preset name; BASE is the text encoder(s); empty: none")


def _energy(report: list) -> str:
    if not report:
        return ""
    return f"mean share of ΔW kept (Frobenius norm): {sum(r.fro_retained for r in report) / len(report):.2%}"


def _output(text: str, *values) -> io.NodeOutput:
    return io.NodeOutput(*values, text, ui=ui.PreviewText(text))


class SdtuneLoraBake(io.ComfyNode):
    """Bake up to three LoRA/LyCORIS files into a checkpoint's weights (a new checkpoint file)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        loras, more = model_list("loras"), model_list("loras", with_none=True)
        return io.Schema(
            node_id="SdtuneLoraBake",
            display_name="Bake LoRA into Checkpoint (sdtune)",
            category="sdtune/lora",
            description="Adds LoRA/LyCORIS files (LoRA, LoCon, LoHa, LoKr, full, DoRA) into a checkpoint's weights, "
                        "streamed tensor by tensor, and writes a new checkpoint; other tensors are copied unchanged.",
            inputs=[
                io.Combo.Input("ckpt_name", options=model_list("checkpoints"), tooltip="the checkpoint"),
                io.Combo.Input("lora_1", options=loras, tooltip="the first LoRA to bake in"),
                io.Float.Input("strength_1", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="its strength (as in Load LoRA)"),
                io.String.Input("blocks_1", default="", tooltip="block weights of the first LoRA: " + LBW_TIP),
                io.Combo.Input("lora_2", options=more, default=NONE, tooltip="a second LoRA, or none"),
                io.Float.Input("strength_2", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="the second LoRA's strength"),
                io.Combo.Input("lora_3", options=more, default=NONE, tooltip="a third LoRA, or none"),
                io.Float.Input("strength_3", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="the third LoRA's strength"),
                io.Combo.Input("dtype", options=["keep", "fp16", "bf16", "fp32"], default="keep",
                               tooltip="dtype of the float weights written; keep: each tensor keeps its own"),
                io.String.Input("output_name", default="sdtune/baked",
                                tooltip="the new file in the checkpoints folder ('/' for sub-folders); a taken name "
                                        "gets a number: files are never overwritten"),
            ],
            outputs=[io.String.Output(display_name="ckpt_name"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ckpt_name: str, lora_1: str, strength_1: float, blocks_1: str, lora_2: str, strength_2: float,
                lora_3: str, strength_3: float, dtype: str, output_name: str) -> io.NodeOutput:
        from lib_sdtune.merge.lora_bake import BakeConfig, LoraInput, bake_loras

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            loras = [LoraInput(model_path("loras", lora_1), strength_1, parse_blocks(blocks_1))]
            for name, strength in ((lora_2, strength_2), (lora_3, strength_3)):
                path = optional_model_path("loras", name)
                if path:
                    loras.append(LoraInput(path, strength))
            out, name = new_output("checkpoints", output_name)
            config = BakeConfig(model_path("checkpoints", ckpt_name), tuple(loras), str(out),
                                dtype=None if dtype == "keep" else dtype)
            with whole_device():
                result = bake_loras(config, progress=progress.progress, cancelled=progress.cancelled)
        lines = [f"wrote {name}", f"{result.architecture}, {result.changed} of {result.tensors} tensors changed in "
                                  f"{result.seconds:.1f} s"]
        for lora in loras:
            lines.append(f"{lora.path} x{lora.strength:g}: {result.applied[lora.path]} modules baked")
            missing = result.unmatched.get(lora.path)
            if missing:
                lines.append(f"  {len(missing)} modules match no layer and were NOT baked: {', '.join(missing[:5])}")
        return _output("\n".join(lines), name)


class SdtuneLoraMerge(io.ComfyNode):
    """Merge up to three LoRAs into one: exact concatenation, or SVD to a rank."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        loras, more = model_list("loras"), model_list("loras", with_none=True)
        return io.Schema(
            node_id="SdtuneLoraMerge",
            display_name="Merge LoRAs (sdtune)",
            category="sdtune/lora",
            description="Merges LoRA/LoCon files into one. With rank 0 they are concatenated along the rank (exact: "
                        "the result is the sum of ratio x each LoRA); with a rank the sum is factored by SVD.",
            inputs=[
                io.Combo.Input("lora_1", options=loras, tooltip="the first LoRA"),
                io.Float.Input("ratio_1", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="its weight"),
                io.Combo.Input("lora_2", options=loras, tooltip="the second LoRA"),
                io.Float.Input("ratio_2", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="its weight"),
                io.Combo.Input("lora_3", options=more, default=NONE, tooltip="a third LoRA, or none"),
                io.Float.Input("ratio_3", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="its weight"),
                io.Int.Input("rank", default=0, min=0, max=1024,
                             tooltip="SVD to this rank (the maximum with a dynamic rule); 0: exact concatenation"),
                io.Combo.Input("dynamic", options=DYNAMIC, default=NONE, tooltip=DYNAMIC_TIP),
                io.Float.Input("param", default=0.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="the dynamic rule's parameter (e.g. sv_fro 0.9)"),
                io.String.Input("output_name", default="sdtune/merged_lora", tooltip=LORA_OUTPUT_TIP),
            ],
            outputs=[io.String.Output(display_name="lora_name"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_1: str, ratio_1: float, lora_2: str, ratio_2: float, lora_3: str, ratio_3: float,
                rank: int, dynamic: str, param: float, output_name: str) -> io.NodeOutput:
        from lib_sdtune.merge.lora_merge import LoraMergeConfig, merge_loras

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            loras = [(model_path("loras", lora_1), ratio_1), (model_path("loras", lora_2), ratio_2)]
            third = optional_model_path("loras", lora_3)
            if third:
                loras.append((third, ratio_3))
            out, name = new_output("loras", output_name)
            config = LoraMergeConfig(tuple(loras), str(out), rank=rank or None,
                                     dynamic=None if dynamic == NONE else dynamic,
                                     param=param if dynamic != NONE else None)
            result = merge_loras(config, progress=progress.progress, cancelled=progress.cancelled)
        ranks = set(result.ranks.values())
        rank_text = str(ranks.pop()) if len(ranks) == 1 else "per module"
        lines = [f"wrote {name}", f"{result.mode}: {result.modules} modules, rank {rank_text}, {result.seconds:.1f} s",
                 _energy(result.report)]
        return _output("\n".join(line for line in lines if line), name)


class SdtuneLoraResize(io.ComfyNode):
    """Change a LoRA's rank (fixed or dynamic) and report how much of each update is kept."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneLoraResize",
            display_name="Resize LoRA (sdtune)",
            category="sdtune/lora",
            description="Resizes a LoRA/LoCon by SVD of each module's update; alpha is set so the scale stays the "
                        "same. The report gives the share of the update kept.",
            inputs=[
                io.Combo.Input("lora_name", options=model_list("loras"), tooltip="the LoRA to resize"),
                io.Int.Input("rank", default=8, min=1, max=1024, tooltip="the new rank (the maximum when dynamic)"),
                io.Combo.Input("dynamic", options=DYNAMIC, default=NONE, tooltip=DYNAMIC_TIP),
                io.Float.Input("param", default=0.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="the dynamic rule's parameter (e.g. sv_fro 0.9)"),
                io.String.Input("output_name", default="sdtune/resized", tooltip=LORA_OUTPUT_TIP),
            ],
            outputs=[io.String.Output(display_name="lora_name"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_name: str, rank: int, dynamic: str, param: float, output_name: str) -> io.NodeOutput:
        from lib_sdtune.merge.lora_resize import ResizeConfig, resize_lora

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            out, name = new_output("loras", output_name)
            config = ResizeConfig(model_path("loras", lora_name), str(out), rank=rank,
                                  dynamic=None if dynamic == NONE else dynamic,
                                  param=param if dynamic != NONE else None)
            result = resize_lora(config, progress=progress.progress, cancelled=progress.cancelled)
        lines = [f"wrote {name} ({len(result.modules)} modules, {result.seconds:.1f} s)", _energy(result.modules)]
        lines += [f"  {r.name}: rank {r.old_rank} -> {r.new_rank}, {r.fro_retained:.1%} kept" for r in result.modules]
        return _output("\n".join(line for line in lines if line), name)


class SdtuneLoraExtract(io.ComfyNode):
    """Extract a LoRA approximating tuned - base from two checkpoints."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneLoraExtract",
            display_name="Extract LoRA (sdtune)",
            category="sdtune/lora",
            description="Extracts a LoRA approximating TUNED - BASE (checkpoints of one architecture) by SVD per "
                        "layer, as sd-scripts' extract_lora_from_models.py; the SVDs run on ComfyUI's device.",
            inputs=[
                io.Combo.Input("base", options=model_list("checkpoints"), tooltip="the base checkpoint"),
                io.Combo.Input("tuned", options=model_list("checkpoints"), tooltip="the fine-tuned checkpoint"),
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip="rank of linear layers (and 1x1 convs)"),
                io.Int.Input("conv_rank", default=0, min=0, max=1024,
                             tooltip="rank of 3x3 convs (LoCon); 0: no ResNet/sampling layers"),
                io.Combo.Input("svd", options=["exact", "randomized"], default="exact",
                               tooltip="exact SVD, or a randomized one (much faster, slightly less exact)"),
                io.Float.Input("min_diff", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="keep the text encoder(s) only if a weight differs by more than this"),
                io.String.Input("output_name", default="sdtune/extracted", tooltip=LORA_OUTPUT_TIP),
            ],
            outputs=[io.String.Output(display_name="lora_name"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, base: str, tuned: str, rank: int, conv_rank: int, svd: str, min_diff: float,
                output_name: str) -> io.NodeOutput:
        from lib_sdtune.merge.lora_extract import ExtractConfig, extract_lora

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            out, name = new_output("loras", output_name)
            with whole_device() as device:
                config = ExtractConfig(model_path("checkpoints", base), model_path("checkpoints", tuned), str(out),
                                       rank=rank, conv_rank=conv_rank or None, svd=svd, min_diff=min_diff,
                                       device=str(device))
                result = extract_lora(config, progress=progress.progress, cancelled=progress.cancelled)
        te = (f"text encoder kept (max |diff| {result.te_max_diff:.4g})" if result.te_kept else
              f"text encoder unchanged (max |diff| {result.te_max_diff:.4g} <= {min_diff:g}): U-Net only")
        lines = [f"wrote {name}",
                 f"{result.architecture}, {result.te_modules} text-encoder and {result.unet_modules} U-Net modules, "
                 f"{svd} SVD, {result.seconds:.1f} s", te,
                 f"mean share of ΔW kept (Frobenius norm): {result.mean_fro_retained:.2%}"]
        return _output("\n".join(lines), name)


class SdtuneLoraTe(io.ComfyNode):
    """Strip or scale a LoRA's text-encoder part and scale its U-Net blocks (a new file)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneLoraTe",
            display_name="LoRA TE Strip / Scale (sdtune)",
            category="sdtune/lora",
            description="Writes a new LoRA with the text-encoder modules removed (strip) or their update multiplied "
                        "(scale; alpha is kept), and optionally each U-Net block's update multiplied by its block "
                        "weight. For an over-fitted LoRA whose text encoder part breaks prompts.",
            inputs=[
                io.Combo.Input("lora_name", options=model_list("loras"), tooltip="the LoRA/LyCORIS file"),
                io.Combo.Input("text_encoder", options=["strip", "scale", "keep"], default="strip",
                               tooltip="remove the text-encoder modules, scale their update by 'scale', or keep "
                                       "them (to scale U-Net blocks only)"),
                io.Float.Input("scale", default=0.5, min=-10.0, max=10.0, step=0.01,
                               tooltip="the factor on the text-encoder update (with text_encoder = scale)"),
                io.String.Input("unet_blocks", default="", tooltip="U-Net block factors: " + LBW_TIP),
                io.Combo.Input("te", options=["both", "1", "2"], default="both",
                               tooltip="which text encoder: both, or for SDXL LoRAs only 1 (CLIP-L) or 2 (bigG)"),
                io.String.Input("output_name", default="sdtune/lora_te", tooltip=LORA_OUTPUT_TIP),
            ],
            outputs=[io.String.Output(display_name="lora_name"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_name: str, text_encoder: str, scale: float, unet_blocks: str, te: str,
                output_name: str) -> io.NodeOutput:
        from lib_sdtune.repair import LoraTeConfig, repair_lora_te

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            out, name = new_output("loras", output_name)
            config = LoraTeConfig(model_path("loras", lora_name), str(out), strip=text_encoder == "strip",
                                  scale=scale if text_encoder == "scale" else None,
                                  unet_blocks=parse_blocks(unet_blocks), te=te)
            result = repair_lora_te(config, progress=progress.progress, cancelled=progress.cancelled)
        lines = [f"wrote {name}", f"{result.te_modules} text-encoder modules: {result.stripped} stripped; "
                                  f"{len(result.scaled)} modules scaled, {result.seconds:.1f} s"]
        if result.unplaced:
            lines.append(f"{len(result.unplaced)} U-Net modules are in no block and were left as they were, e.g. "
                         f"{result.unplaced[0]}")
        return _output("\n".join(lines), name)


class SdtuneLoraInfo(io.ComfyNode):
    """What a LoRA/LyCORIS file is: algorithm, rank, base model, module counts, trained tags."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneLoraInfo",
            display_name="LoRA Info (sdtune)",
            category="sdtune/lora",
            description="Reads a LoRA/LyCORIS file's header (any tool's): algorithm, rank(s), alpha, base model "
                        "version, text-encoder and U-Net module counts, trained tag frequencies, hashes.",
            inputs=[io.Combo.Input("lora_name", options=model_list("loras"), tooltip="the LoRA/LyCORIS file")],
            outputs=[io.String.Output(display_name="report_json")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name: str) -> str:
        import os

        import folder_paths

        path = folder_paths.get_full_path("loras", lora_name)
        return f"{path}:{os.path.getmtime(path) if path else 0}"

    @classmethod
    def execute(cls, lora_name: str) -> io.NodeOutput:
        from lib_sdtune.networks.lora_info import format_lora_info, inspect_lora

        with core_errors():
            info = inspect_lora(model_path("loras", lora_name))
        return io.NodeOutput(json.dumps(info.to_dict(), indent=2), ui=ui.PreviewText(format_lora_info(info)))
