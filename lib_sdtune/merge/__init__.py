"""Checkpoint merging (methods, block weights, recipes), streamed with memory near one tensor.

Entry point: `merge_checkpoints(MergeConfig(...), progress, cancelled)`; re-run a stored recipe with
`config_from_recipe(load_recipe(file), output)`.
"""

from .blocks import PRESETS, SD_SLOTS, SDXL_SLOTS, resolve_blocks, unet_slot
from .checkpoint_merge import MergeResult, merge_checkpoints
from .config import MergeConfig, validate_config
from .methods import METHODS, MergeMethod, get_method
from .pipeline import MergeCancelled
from .recipe import RECIPE_KEY, config_from_recipe, load_recipe

__all__ = ["METHODS", "PRESETS", "RECIPE_KEY", "SDXL_SLOTS", "SD_SLOTS", "MergeCancelled", "MergeConfig",
           "MergeMethod", "MergeResult", "config_from_recipe", "get_method", "load_recipe", "merge_checkpoints",
           "resolve_blocks", "unet_slot", "validate_config"]
