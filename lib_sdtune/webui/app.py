"""The sdtune Blocks: mounted as a tab by A1111/Forge, or served alone by `python -m lib_sdtune ui`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .context import UiContext
from .dataset_panel import build_dataset_panel
from .lora_panel import build_lora_panel
from .merge_panel import build_merge_panel
from .model_panel import build_model_panel
from .repair_panel import build_repair_panel
from .train_panel import build_train_panel

JAVASCRIPT_DIR = Path(__file__).resolve().parents[2] / "javascript"  # A1111 loads these files by itself


def build_blocks(ctx: UiContext):
    """Build the whole sdtune UI as one gr.Blocks (imports gradio only when called)."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False, title="sdtune") as blocks:
        with gr.Tabs(elem_id="sdtune_tabs"):
            with gr.Tab("Train", elem_id="sdtune_tab_train"):
                build_train_panel(gr, ctx)
            with gr.Tab("Dataset", elem_id="sdtune_tab_dataset"):
                build_dataset_panel(gr, ctx)
            with gr.Tab("Merge", elem_id="sdtune_tab_merge"):
                build_merge_panel(gr, ctx)
            with gr.Tab("LoRA tools", elem_id="sdtune_tab_lora"):
                build_lora_panel(gr, ctx)
            with gr.Tab("Repair", elem_id="sdtune_tab_repair"):
                build_repair_panel(gr, ctx)
            with gr.Tab("Model", elem_id="sdtune_tab_model"):
                build_model_panel(gr, ctx.folders)
    return blocks


def javascript() -> str:
    """The tab's javascript, for the standalone app (the WebUI injects javascript/*.js itself)."""
    scripts = sorted(JAVASCRIPT_DIR.glob("*.js")) if JAVASCRIPT_DIR.is_dir() else []
    return "\n".join(p.read_text(encoding="utf-8") for p in scripts)


def serve(ctx: UiContext, host: str = "127.0.0.1", port: int = 7870, **launch: Any) -> Any:
    """Build and serve the standalone app with the queue on (progress streams through it) and our javascript."""
    from .compat import launch_with_js

    blocks = build_blocks(ctx).queue()
    return launch_with_js(blocks, javascript(), server_name=host, server_port=port, **launch)
