"""`ui`: serve the sdtune WebUI on its own (the same blocks the A1111/Forge tab shows)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the standalone WebUI",
                       description="Serve the sdtune WebUI without A1111/ComfyUI. Model dropdowns list files "
                                   "under MODELS_DIR/Stable-diffusion and MODELS_DIR/Lora (the A1111 layout).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7870, help="port (default 7870)")
    p.add_argument("--models-dir", default="models", help="models folder in the A1111 layout (default ./models)")
    p.add_argument("--datasets-dir", default=None, help="folder of training datasets")
    p.set_defaults(func=run_ui)


def run_ui(args: argparse.Namespace) -> int:
    from ..errors import SdtuneError
    from ..host import HostFolders

    try:
        import gradio  # noqa: F401

        from ..webui.app import build_blocks
    except ImportError as e:
        raise SdtuneError("the standalone UI needs gradio: pip install 'gradio>=3.41.2'") from e
    folders = HostFolders.under(args.models_dir, args.datasets_dir)
    build_blocks(folders).queue().launch(server_name=args.host, server_port=args.port)
    return 0
