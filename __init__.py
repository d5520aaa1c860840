"""ComfyUI entry point of the sdtune node pack (V3 API).

ComfyUI imports this folder as a package and awaits `comfy_entrypoint()`. Importing it anywhere
else is cheap and safe: nothing of ComfyUI or gradio is imported until ComfyUI calls the entry.
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./comfy_nodes/web"


def _load_core() -> None:
    """Make the core importable as `lib_sdtune`, as in A1111 and the CLI, so one copy of it is loaded.

    ComfyUI imports this pack under a mangled path name and never puts its folder on sys.path; the core
    imports itself as `lib_sdtune`. Only that one name is registered; sys.path is left alone.
    """
    if "lib_sdtune" in sys.modules:
        return
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib_sdtune")
    spec = importlib.util.spec_from_file_location("lib_sdtune", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["lib_sdtune"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["lib_sdtune"]
        raise


async def comfy_entrypoint():
    """Return the sdtune ComfyExtension (called by ComfyUI at start-up)."""
    _load_core()
    from .comfy_nodes import SdtuneExtension

    return SdtuneExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
