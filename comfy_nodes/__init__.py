"""sdtune's ComfyUI nodes: one module per area, each node a thin shell over one lib_sdtune call."""

from comfy_api.latest import ComfyExtension, io

from .model_info import SdtuneModelInfo


class SdtuneExtension(ComfyExtension):
    """Registers every sdtune node with ComfyUI."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SdtuneModelInfo]
