"""The "Model" panel: pick a checkpoint from the model folders and see what it is.

Uses only constructs present in gradio 3.41 (A1111), 4.40 (Forge) and 5/6: gr.update,
Blocks/Row/Column, Dropdown, Checkbox, Button, Textbox, JSON.
"""

from __future__ import annotations

from ..errors import SdtuneError
from ..host import HostFolders, list_files, resolve_listed


def inspect_listed(folders: HostFolders, name: str, load: bool) -> tuple[str, dict]:
    """Run `model info` on a dropdown entry; errors come back as text, never as a traceback."""
    from ..models.inspect import format_model_info, inspect_model

    if not name:
        return "Choose a checkpoint first.", {}
    try:
        info = inspect_model(resolve_listed(name, folders.checkpoints), load=load)
    except SdtuneError as e:
        return f"Error: {e}", {}
    return format_model_info(info), info.to_dict()


def build_model_panel(gr, folders: HostFolders) -> None:
    """Add the panel's components and events to the current gradio Blocks context."""
    with gr.Row():
        ckpt = gr.Dropdown(choices=list_files(folders.checkpoints), label="Checkpoint", elem_id="sdtune_model_ckpt")
        refresh = gr.Button("Refresh", elem_id="sdtune_model_refresh")
    load = gr.Checkbox(label="Load every component and check keys (slower)", value=False)
    run = gr.Button("Inspect", variant="primary", elem_id="sdtune_model_inspect")
    report = gr.Textbox(label="Report", lines=12, interactive=False, elem_id="sdtune_model_report")
    details = gr.JSON(label="Details (the same fields as `model info --json`)")

    refresh.click(fn=lambda: gr.update(choices=list_files(folders.checkpoints)), inputs=[], outputs=[ckpt])
    run.click(fn=lambda name, do_load: inspect_listed(folders, name, do_load), inputs=[ckpt, load],
              outputs=[report, details])
