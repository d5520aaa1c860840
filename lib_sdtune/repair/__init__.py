"""Over-fit diagnosis and repair: TE override and blend for checkpoints, TE surgery for LoRA files, epoch picking.

Entry points (plain functions over typed configs, with `progress(done, total, info)` and `cancelled()`):
`diagnose(DiagnoseConfig)` -> DiagnosisReport (verdicts with the repair command each recommends),
`pick_epoch(run_dir)` -> EpochRanking, `override_te(TeOverrideConfig)`, `blend_te(TeBlendConfig)`,
`repair_lora_te(LoraTeConfig)`. Merging back toward a base model is `merge` (weighted_sum), not repeated here.
"""

from .config import LoraTeConfig, TeBlendConfig, TeOverrideConfig
from .diagnose import DiagnoseConfig, DiagnosisReport, Verdict, diagnose
from .epochs import EpochRanking, pick_epoch
from .lora_te import LoraTeResult, repair_lora_te
from .te import TeRepairResult, blend_te, override_te

__all__ = ["DiagnoseConfig", "DiagnosisReport", "EpochRanking", "LoraTeConfig", "LoraTeResult", "TeBlendConfig",
           "TeOverrideConfig", "TeRepairResult", "Verdict", "blend_te", "diagnose", "override_te", "pick_epoch",
           "repair_lora_te"]
