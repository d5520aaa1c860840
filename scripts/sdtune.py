"""A1111/Forge face: adds the sdtune tab. Runs at every WebUI start and "Reload UI", so it only wires."""

from modules import script_callbacks, shared  # the WebUI's own modules

from lib_sdtune.host import HostFolders


def _host_folders() -> HostFolders:
    """The WebUI's checkpoint and LoRA folders (honours --ckpt-dir, --models-dir and --lora-dir)."""
    from pathlib import Path

    from modules import paths, sd_models

    checkpoints = [Path(sd_models.model_path)]
    if getattr(shared.cmd_opts, "ckpt_dir", None):
        checkpoints.append(Path(shared.cmd_opts.ckpt_dir))
    lora_dir = getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora"
    return HostFolders(checkpoints=tuple(checkpoints), loras=(Path(lora_dir),))


def on_ui_tabs():
    from lib_sdtune.webui.app import build_blocks

    return [(build_blocks(_host_folders()), "sdtune", "sdtune")]


script_callbacks.on_ui_tabs(on_ui_tabs)
