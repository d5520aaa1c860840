"""ComfyUI entry point of the sdtune node pack (V3 API).

ComfyUI imports this folder as a package and awaits `comfy_entrypoint()`. Importing it anywhere
else is cheap and safe: nothing of ComfyUI or gradio is imported until ComfyUI calls the entry.
"""

WEB_DIRECTORY = "./comfy_nodes/web"


async def comfy_entrypoint():
    """Return the sdtune ComfyExtension (called by ComfyUI at start-up)."""
    from .comfy_nodes import SdtuneExtension

    return SdtuneExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
