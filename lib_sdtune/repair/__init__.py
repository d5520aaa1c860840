"""Over-fit repair: text-encoder override and blend for checkpoints, TE surgery for LoRA files.

Entry points (plain functions over typed configs, with `progress(done, total, info)` and `cancelled()`):
`override_te(TeOverrideConfig)`, `blend_te(TeBlendConfig)`, `repair_lora_te(LoraTeConfig)`.
Merging back toward a base model is `merge` (weighted_sum), not repeated here.
"""

from .config import LoraTeConfig, TeBlendConfig, TeOverrideConfig
from .lora_te import LoraTeResult, repair_lora_te
from .te import TeRepairResult, blend_te, override_te

__all__ = ["LoraTeConfig", "LoraTeResult", "TeBlendConfig", "TeOverrideConfig", "TeRepairResult", "blend_te",
           "override_te", "repair_lora_te"]
