"""sdtune's ComfyUI nodes: one module per area, each node a thin shell over one lib_sdtune call."""

from comfy_api.latest import ComfyExtension, io

from .dataset import SdtuneDataset, SdtuneEditTags, SdtuneWd14Tag
from .lora_tools import (
    SdtuneLoraBake,
    SdtuneLoraExtract,
    SdtuneLoraInfo,
    SdtuneLoraMerge,
    SdtuneLoraResize,
    SdtuneLoraTe,
)
from .merge import SdtuneMergeCheckpoints
from .model_info import SdtuneModelInfo
from .plan import SdtunePlan
from .repair import SdtuneDiagnose, SdtuneTeBlend, SdtuneTeOverride
from .train import SdtuneTrainLora

NODES: list[type[io.ComfyNode]] = [
    SdtuneDataset, SdtuneWd14Tag, SdtuneEditTags, SdtunePlan, SdtuneTrainLora, SdtuneMergeCheckpoints,
    SdtuneTeOverride, SdtuneTeBlend, SdtuneLoraBake, SdtuneLoraMerge, SdtuneLoraResize, SdtuneLoraExtract,
    SdtuneLoraTe, SdtuneLoraInfo, SdtuneDiagnose, SdtuneModelInfo,
]


class SdtuneExtension(ComfyExtension):
    """Registers every sdtune node with ComfyUI."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
