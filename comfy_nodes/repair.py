"""Repair nodes: diagnose over-fitting (a checkpoint or a LoRA against its base), and give a checkpoint another
model's text encoder(s) or a blend of the two."""

from __future__ import annotations

import json
from typing import Optional

from comfy_api.latest import io, ui

from .shared import (
    Dataset,
    DatasetHandle,
    HostProgress,
    core_errors,
    model_list,
    model_path,
    new_output,
    optional_model_path,
    png_to_image,
    whole_device,
)

TE_TIP = "which text encoder: both, or for SDXL only 1 (CLIP-L) or 2 (OpenCLIP bigG)"
OUTPUT_TIP = ("the new file in the checkpoints folder ('/' for sub-folders); a taken name gets a number: files are "
              "never overwritten")


def _te_report(name: str, result, how: str) -> str:
    return "\n".join([f"wrote {name}",
                      f"{result.architecture}: text encoder {'+'.join(result.encoders)} {how} ({result.te_tensors} "
                      f"tensors), {result.tensors - result.te_tensors} other tensors copied bit for bit, "
                      f"{result.seconds:.1f} s"])


class SdtuneTeOverride(io.ComfyNode):
    """A checkpoint with the text encoder(s) of another (a fine-tune whose TE over-fitted gets the base's back)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneTeOverride",
            display_name="TE Override (sdtune)",
            category="sdtune/repair",
            description="Writes a new checkpoint: the model with the donor's text encoder(s), bit for bit; every "
                        "other tensor is copied unchanged. For SDXL, pick TE1, TE2 or both.",
            inputs=[
                io.Combo.Input("model", options=model_list("checkpoints"), tooltip="the checkpoint to repair"),
                io.Combo.Input("donor", options=model_list("checkpoints"),
                               tooltip="the checkpoint whose text encoder(s) it gets (usually its base model)"),
                io.Combo.Input("te", options=["both", "1", "2"], default="both", tooltip=TE_TIP),
                io.Combo.Input("position_ids", options=["reset", "keep"], default="reset",
                               tooltip="CLIP position_ids: reset to 0..76 (int64, fixes broken ones) or keep the "
                                       "model's exactly"),
                io.String.Input("output_name", default="sdtune/te_override", tooltip=OUTPUT_TIP),
            ],
            outputs=[io.String.Output(display_name="ckpt_name"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: str, donor: str, te: str, position_ids: str, output_name: str) -> io.NodeOutput:
        from lib_sdtune.repair import TeOverrideConfig, override_te

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            out, name = new_output("checkpoints", output_name)
            config = TeOverrideConfig(model_path("checkpoints", model), model_path("checkpoints", donor), str(out),
                                      te=te, position_ids=position_ids)
            with whole_device():
                result = override_te(config, progress=progress.progress, cancelled=progress.cancelled)
        text = _te_report(name, result, "from the donor")
        return io.NodeOutput(name, text, ui=ui.PreviewText(text))


class SdtuneTeBlend(io.ComfyNode):
    """A checkpoint whose text encoder is blended toward another's, as a whole or layer by layer."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneTeBlend",
            display_name="TE Blend (sdtune)",
            category="sdtune/repair",
            description="Writes a new checkpoint with TE = (1-alpha)*model.TE + alpha*donor.TE (computed in fp32); "
                        "every other tensor is copied bit for bit. Per-layer alphas give each encoder layer its "
                        "own share.",
            inputs=[
                io.Combo.Input("model", options=model_list("checkpoints"), tooltip="the checkpoint to repair"),
                io.Combo.Input("donor", options=model_list("checkpoints"),
                               tooltip="the checkpoint whose text encoder is blended in (usually its base model)"),
                io.Float.Input("alpha", default=0.5, min=-1.0, max=2.0, step=0.01,
                               tooltip="A1111 semantics: the weight of the donor (0 keeps the model's TE, 1 takes "
                                       "the donor's)"),
                io.String.Input("layers", default="", multiline=True,
                                tooltip="optional per-layer alphas, one comma-separated line per encoder (12 "
                                        "values for CLIP-L, 23/24 for SD2, 32 for SDXL's TE2); keys outside the "
                                        "layers use alpha; empty: alpha everywhere"),
                io.Combo.Input("te", options=["both", "1", "2"], default="both", tooltip=TE_TIP),
                io.String.Input("output_name", default="sdtune/te_blend", tooltip=OUTPUT_TIP),
            ],
            outputs=[io.String.Output(display_name="ckpt_name"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: str, donor: str, alpha: float, layers: str, te: str, output_name: str) -> io.NodeOutput:
        from lib_sdtune.errors import SdtuneError
        from lib_sdtune.repair import TeBlendConfig, blend_te

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            try:
                per_layer = tuple(tuple(float(v) for v in line.split(",") if v.strip())
                                  for line in layers.splitlines() if line.strip())
            except ValueError:
                raise SdtuneError(f"layers: expected comma-separated numbers, got {layers!r}") from None
            out, name = new_output("checkpoints", output_name)
            config = TeBlendConfig(model_path("checkpoints", model), model_path("checkpoints", donor), str(out),
                                   alpha=alpha, layers=per_layer, te=te)
            with whole_device():
                result = blend_te(config, progress=progress.progress, cancelled=progress.cancelled)
        text = _te_report(name, result, f"blended at alpha {alpha:g}" + (" per layer" if per_layer else ""))
        return io.NodeOutput(name, text, ui=ui.PreviewText(text))


class SdtuneDiagnose(io.ComfyNode):
    """Over-fit report of a tuned checkpoint or a LoRA against its base: verdicts with the repair, and a chart."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneDiagnose",
            display_name="Diagnose Over-fit (sdtune)",
            category="sdtune/repair",
            description="Measures, without generating images, how far a fine-tuned checkpoint or a LoRA moved from "
                        "its base: text-encoder drift on the dataset's tags and on control prompts (SDXL: each "
                        "encoder), U-Net block drift, LoRA module norms. Each verdict names the repair to run "
                        "(TE Override, TE Blend, LoRA TE Strip / Scale, a lower strength).",
            inputs=[
                io.Combo.Input("base", options=model_list("checkpoints"),
                               tooltip="the base model the checkpoint or LoRA was trained from"),
                io.Combo.Input("model", options=model_list("checkpoints", with_none=True), default="none",
                               tooltip="the fine-tuned checkpoint to diagnose (none when diagnosing a LoRA)"),
                io.Combo.Input("lora", options=model_list("loras", with_none=True), default="none",
                               tooltip="the LoRA/LyCORIS to diagnose (none when diagnosing a checkpoint)"),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="the strength the LoRA is judged at (as in Load LoRA)"),
                io.Int.Input("max_tags", default=64, min=0, max=1000,
                             tooltip="how many of the most frequent training tags to test (0: control prompts only)"),
                Dataset.Input("dataset", optional=True,
                              tooltip="optional: the training dataset, whose caption tags are tested; without it "
                                      "the tags come from the file's ss_tag_frequency"),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="chart"),
                     io.String.Output(display_name="report_json")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, base: str, model: str, lora: str, lora_strength: float, max_tags: int,
                dataset: Optional[DatasetHandle] = None) -> io.NodeOutput:
        from lib_sdtune.repair.diagnose import DiagnoseConfig, diagnose

        progress = HostProgress(cls.hidden.unique_id)
        with core_errors(progress):
            with whole_device() as device:
                config = DiagnoseConfig(model_path("checkpoints", base),
                                        model=optional_model_path("checkpoints", model),
                                        lora=optional_model_path("loras", lora),
                                        dataset=str(dataset.path) if dataset is not None else None,
                                        lora_strength=lora_strength, max_tags=max_tags, device=str(device))
                report = diagnose(config, progress=progress.progress, cancelled=progress.cancelled)
            text = report.format_text()
            chart = png_to_image(report.chart_png())
        return io.NodeOutput(text, chart, json.dumps(report.to_dict(), indent=2), ui=ui.PreviewText(text))
