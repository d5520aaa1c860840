"""`ui`: serve the sdtune WebUI on its own (the same blocks the A1111/Forge tab shows)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the standalone WebUI",
                       description="Serve the sdtune WebUI without A1111/ComfyUI. Model dropdowns list files "
                                   "under MODELS_DIR/Stable-diffusion, MODELS_DIR/Lora and MODELS_DIR/VAE (the "
                                   "A1111 layout); trained LoRAs go to MODELS_DIR/Lora/<name>/. Paths typed into "
                                   "the UI must stay inside these folders and DATASETS_DIR.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7870, help="port (default 7870)")
    p.add_argument("--models-dir", default="models", help="models folder in the A1111 layout (default ./models)")
    p.add_argument("--datasets-dir", default=None, help="folder of training datasets (default ./datasets)")
    p.add_argument("--output-dir", default=None,
                   help="folder for merged and repaired checkpoints (default: MODELS_DIR/Stable-diffusion)")
    p.add_argument("--tagger-dir", default=None,
                   help="WD14 tagger folder (model.onnx + selected_tags.csv), or a folder of them "
                        "(default: MODELS_DIR/interrogators, wd14_tagger, taggers)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "no"),
                   help="default mixed precision of the Train tab (default auto: the planner's choice)")
    p.set_defaults(func=run_ui)


def run_ui(args: argparse.Namespace) -> int:
    from ..errors import SdtuneError
    from ..host import HostFolders

    try:
        import gradio  # noqa: F401

        from ..webui.app import serve
        from ..webui.context import UiContext
        from ..webui.settings import ui_settings
    except ImportError as e:
        raise SdtuneError("the standalone UI needs gradio: pip install 'gradio>=3.41.2'") from e
    folders = HostFolders.under(Path(args.models_dir).resolve(), Path(args.datasets_dir or "datasets").resolve())
    settings = ui_settings({"sdtune_precision": args.precision, "sdtune_output_dir": args.output_dir or "",
                            "sdtune_tagger_dir": args.tagger_dir or ""}, Path(args.models_dir))
    serve(UiContext(folders, settings=settings), args.host, args.port)
    return 0
