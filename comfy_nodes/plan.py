"""Plan node: the planner's recommendation for a dataset and a checkpoint, as text and as the trainer's config."""

from __future__ import annotations

from comfy_api.latest import io, ui

from lib_sdtune.train.planner_rules import METHODS

from .shared import Dataset, DatasetHandle, Plan, core_errors, device_facts, model_list, model_path

AUTO = "auto"
OPTIMIZERS = ["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "Prodigy", "DAdaptAdam"]  # the planner's


class SdtunePlan(io.ComfyNode):
    """Recommend batch, learning rates, rank, epochs and memory settings, each with its reason."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtunePlan",
            display_name="Plan LoRA Training (sdtune)",
            category="sdtune/train",
            description="Scans the dataset and the checkpoint and recommends every training setting for ComfyUI's "
                        "device (GPU memory, bf16), each with its reason and source, plus the steps math. The plan "
                        "output feeds Train LoRA, whose own fields override single values.",
            inputs=[
                Dataset.Input("dataset", tooltip="the dataset from an sdtune Dataset node (kohya layout: "
                                                 "<folder>/<repeats>_<name>/ images and captions)"),
                io.Combo.Input("ckpt_name", options=model_list("checkpoints"),
                               tooltip="the base checkpoint to train on (SD1.x, SD2.x or SDXL; its family and "
                                       "v-prediction are detected)"),
                io.Combo.Input("method", options=list(METHODS), default="lora",
                               tooltip="network type: lora (attention and MLP layers), locon (also convolutions), "
                                       "loha or lokr (LyCORIS)"),
                io.Combo.Input("optimizer", options=[AUTO, *OPTIMIZERS], default=AUTO,
                               tooltip="auto: the planner's choice for the device (AdamW8bit on a GPU, AdamW on "
                                       "the CPU); the learning rates follow the optimizer chosen"),
            ],
            outputs=[Plan.Output(display_name="plan"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dataset: DatasetHandle, ckpt_name: str, method: str, optimizer: str) -> io.NodeOutput:
        from lib_sdtune.train.planner import plan_training

        with core_errors():
            vram_gb, bf16 = device_facts()
            plan = plan_training(dataset.path, model_path("checkpoints", ckpt_name), method, vram_gb=vram_gb,
                                 optimizer=None if optimizer == AUTO else optimizer, bf16=bf16)
        text = plan.to_text()
        return io.NodeOutput(plan, text, ui=ui.PreviewText(text))
