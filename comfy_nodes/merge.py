"""Merge Checkpoints node: every sdtune merge method, ratios and block weights, streamed into a new checkpoint.

Ratios follow A1111: alpha is the weight of model B (0 keeps A, 1 takes B). ComfyUI's own ModelMergeSimple
is the opposite (its ratio is the weight of model1).
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from lib_sdtune.merge import METHODS, PRESETS
from lib_sdtune.merge.blocks import parse_blocks

from .shared import (
    HostProgress,
    core_errors,
    model_list,
    model_path,
    new_output,
    optional_model_path,
    whole_device,
)

SIDES = {"merge": None, "keep A": 0.0, "take B": 1.0}
ALPHA_TIP = ("A1111 semantics: the weight of model B (0 keeps A, 1 takes B, 0.3 = 70% A + 30% B). ComfyUI's "
             "ModelMergeSimple ratio is the opposite (the weight of model1)")
BLOCKS_TIP = ("U-Net block weights for {what}, replacing it per block: 26 comma-separated values BASE,IN00..IN11,"
              "MID,OUT00..OUT11 (SD1/SD2), 20 or 21 for SDXL, or a preset ({presets}); BASE is the text "
              "encoder(s) and VAE; empty: none")


def method_tip() -> str:
    return "; ".join(f"{m.name}: {m.formula}" for m in METHODS.values())


class SdtuneMergeCheckpoints(io.ComfyNode):
    """Merge two or three checkpoints into a new file in ComfyUI's checkpoints folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        presets = ", ".join(PRESETS)
        return io.Schema(
            node_id="SdtuneMergeCheckpoints",
            display_name="Merge Checkpoints (sdtune)",
            category="sdtune/merge",
            description="Merges checkpoints of one architecture (SD1.x, SD2.x, SDXL) tensor by tensor, with little "
                        "memory, into a new .safetensors in the checkpoints folder; the recipe (inputs with sha256, "
                        "method, ratios) is stored in its metadata. " + ALPHA_TIP + ".",
            inputs=[
                io.Combo.Input("model_a", options=model_list("checkpoints"),
                               tooltip="model A, the base (alpha 0 keeps it)"),
                io.Combo.Input("model_b", options=model_list("checkpoints"), tooltip="model B (alpha 1 takes it)"),
                io.Combo.Input("model_c", options=model_list("checkpoints", with_none=True), default="none",
                               tooltip="model C, for the three-model methods (add_difference, triple_sum, "
                                       "sum_twice, train_difference, ties, dare); ignored by the others"),
                io.Combo.Input("method", options=list(METHODS), default="weighted_sum", tooltip=method_tip()),
                io.Float.Input("alpha", default=0.5, min=-1.0, max=2.0, step=0.01, tooltip=ALPHA_TIP),
                io.Float.Input("beta", default=0.0, min=-1.0, max=2.0, step=0.01,
                               tooltip="the second ratio of triple_sum/sum_twice (weight of C), ties (density "
                                       "kept) and dare (drop rate); 0: the method's default (0.25, 0.2, 0.9)"),
                io.Combo.Input("text_encoder", options=list(SIDES), default="merge",
                               tooltip="text encoder(s): merged like the rest, A's kept, or B's taken"),
                io.Combo.Input("vae", options=list(SIDES), default="merge",
                               tooltip="VAE: merged like the rest, A's kept, or B's taken"),
                io.String.Input("blocks", default="", tooltip=BLOCKS_TIP.format(what="alpha", presets=presets)),
                io.String.Input("blocks_beta", default="", tooltip=BLOCKS_TIP.format(what="beta", presets=presets)),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="seed of the random method (dare)"),
                io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="dtype of the merged weights"),
                io.Boolean.Input("prune", default=False, tooltip="drop EMA weights and the schedule buffers"),
                io.String.Input("output_name", default="sdtune/merged",
                                tooltip="the new file in the checkpoints folder ('/' for sub-folders); a taken name "
                                        "gets a number: files are never overwritten"),
            ],
            outputs=[io.String.Output(display_name="ckpt_name", tooltip="the new checkpoint as the loaders list it"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model_a: str, model_b: str, model_c: str, method: str, alpha: float, beta: float,
                text_encoder: str, vae: str, blocks: str, blocks_beta: str, seed: int, dtype: str, prune: bool,
                output_name: str) -> io.NodeOutput:
        from lib_sdtune.merge import MergeConfig, get_method, merge_checkpoints

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            spec = get_method(method)
            inputs = [model_path("checkpoints", model_a), model_path("checkpoints", model_b)]
            if spec.models == 3:
                third = optional_model_path("checkpoints", model_c)
                inputs += [third] if third else []
            out, name = new_output("checkpoints", output_name)
            config = MergeConfig(
                inputs=tuple(inputs), output=str(out), method=method, alpha=alpha,
                beta=(beta or None) if spec.beta is not None else None, te_alpha=SIDES[text_encoder],
                vae_alpha=SIDES[vae], blocks=parse_blocks(blocks),
                blocks_beta=parse_blocks(blocks_beta) if spec.beta is not None else None, seed=seed, dtype=dtype,
                prune_ema=prune, prune_schedule=prune)
            with whole_device():
                result = merge_checkpoints(config, progress=progress.progress, cancelled=progress.cancelled)
        lines = [f"wrote {name}", *result.details()]
        text = "\n".join(lines)
        return io.NodeOutput(name, text, ui=ui.PreviewText(text))
