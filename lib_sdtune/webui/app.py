"""The sdtune Blocks: mounted as a tab by A1111/Forge, or served alone by `python -m lib_sdtune ui`."""

from __future__ import annotations

from ..host import HostFolders
from .model_panel import build_model_panel


def build_blocks(folders: HostFolders):
    """Build the whole sdtune UI as one gr.Blocks (imports gradio only when called)."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False, title="sdtune") as blocks:
        with gr.Tabs(elem_id="sdtune_tabs"):
            with gr.Tab("Model", elem_id="sdtune_tab_model"):
                build_model_panel(gr, folders)
    return blocks
