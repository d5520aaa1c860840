"""Model nodes: what a checkpoint is (architecture, components, hashes, key check)."""

from __future__ import annotations

import json
import os

import folder_paths
from comfy_api.latest import io, ui

from lib_sdtune.models.inspect import format_model_info, inspect_model

from .shared import core_errors, model_list


class SdtuneModelInfo(io.ComfyNode):
    """Show `model info` for a checkpoint from ComfyUI's checkpoints folders."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneModelInfo",
            display_name="Model Info (sdtune)",
            category="sdtune/model",
            description="Architecture (sd1/sd2/sd2-v/sdxl/sdxl-refiner), parameter counts, dtype and the hashes "
                        "A1111/Civitai show; with load_check, loads every component and lists key mismatches.",
            inputs=[
                io.Combo.Input("ckpt_name", options=model_list("checkpoints"), tooltip="the checkpoint to inspect"),
                io.Boolean.Input("load_check", default=False, tooltip="load every component and report keys"),
            ],
            outputs=[io.String.Output(display_name="report_json")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, ckpt_name: str, load_check: bool) -> str:
        path = folder_paths.get_full_path("checkpoints", ckpt_name)
        return f"{path}:{os.path.getmtime(path) if path else 0}:{load_check}"

    @classmethod
    def execute(cls, ckpt_name: str, load_check: bool) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        with core_errors():
            info = inspect_model(path, load=load_check)
        return io.NodeOutput(json.dumps(info.to_dict(), indent=2), ui=ui.PreviewText(format_model_info(info)))
