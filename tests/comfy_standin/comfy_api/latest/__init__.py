"""Stand-in for comfy_api/latest/__init__.py (ComfyUI v0.8.0): ComfyExtension and the io / ui modules."""

from abc import ABC, abstractmethod

from . import _io as io
from . import _ui as ui


class ComfyExtension(ABC):
    async def on_load(self) -> None:  # noqa: B027 - ComfyUI's has an empty body too
        """Called when an extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list:
        """Returns a list of nodes that this extension provides."""


IO = io
UI = ui

__all__ = ["ComfyExtension", "io", "IO", "ui", "UI"]
