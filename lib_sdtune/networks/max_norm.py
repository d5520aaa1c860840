"""Max-norm regularisation (sd-scripts' `--scale_weight_norms`), after each optimizer step.

For every module, ‖scale · ΔW‖_F is clamped to `max_norm` by multiplying each of the factors ΔW is
linear in by `ratio ** (1 / count)` (sd-scripts: √ratio on `lora_up` and `lora_down`); the returned
figures are what sd-scripts logs: "Keys Scaled", "Average key norm" and the largest norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SdtuneError
from .network import LoraNetwork

__all__ = ["MaxNormResult", "apply_max_norm"]


@dataclass(frozen=True)
class MaxNormResult:
    keys_scaled: int
    mean_norm: float
    max_norm: float


@torch.no_grad()
def apply_max_norm(network: LoraNetwork, max_norm: float) -> MaxNormResult:
    """Clamp every module's ΔW norm to `max_norm` (multiplier ignored, as sd-scripts)."""
    if max_norm <= 0:
        raise SdtuneError(f"scale_weight_norms must be positive, got {max_norm}")
    scaled, norms = 0, []
    for m in network:
        norm = float(m.raw_delta().norm())
        clamped = max(norm, max_norm / 2)  # sd-scripts clamps from below before the ratio
        ratio = min(clamped, max_norm) / clamped
        if ratio != 1:
            scaled += 1
            factors = m.norm_factors()
            for p in factors:
                p.mul_(ratio ** (1.0 / len(factors)))
        norms.append(norm * ratio)
    if not norms:
        return MaxNormResult(0, 0.0, 0.0)
    return MaxNormResult(scaled, sum(norms) / len(norms), max(norms))
