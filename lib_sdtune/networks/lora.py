"""One LoRA/LoCon module with kohya sd-scripts' math (`networks/lora.py` `LoRAModule`), removable.

`y = org(x) + lora_up(lora_down(x)) * multiplier * scale`, `scale = alpha / rank`; `lora_down` is a
Linear(in, r) or a Conv2d(in, r) with the original kernel/stride/padding, `lora_up` a Linear(r, out) or
1x1 Conv2d(r, out); down is kaiming-uniform(a=sqrt(5)), up is zeros, so a new module is a no-op.
While training, sd-scripts' three dropouts apply: module dropout skips the update with probability p,
neuron dropout drops rank activations, rank dropout zeroes whole ranks per sample and rescales by 1/(1-p).
The wrapped layer's `forward` is swapped (as sd-scripts does) and put back exactly by `remove()`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..errors import SdtuneError
from .forward_swap import ForwardSwap

__all__ = ["LoraModule"]


def _fp32(value: float) -> float:
    """alpha as sd-scripts holds it (an fp32 buffer), so the in-memory scale equals the saved file's."""
    return float(torch.tensor(float(value), dtype=torch.float32))


class LoraModule(ForwardSwap, nn.Module):
    """The low-rank update of one nn.Linear or nn.Conv2d, as sd-scripts trains and saves it."""

    def __init__(self, name: str, org_module: nn.Module, rank: int, alpha: Optional[float] = None,
                 multiplier: float = 1.0, dropout: Optional[float] = None, rank_dropout: Optional[float] = None,
                 module_dropout: Optional[float] = None):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise SdtuneError(f"LoRA {name!r}: cannot wrap a {type(org_module).__name__} (Linear or Conv2d only)")
        if rank < 1:
            raise SdtuneError(f"LoRA {name!r}: rank must be at least 1, got {rank}")
        self.lora_name = name
        self.rank = int(rank)
        self.alpha = _fp32(rank if alpha is None or alpha == 0 else alpha)
        self.multiplier = float(multiplier)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        w = org_module.weight
        factory: dict[str, Any] = {"device": w.device, "dtype": torch.float32 if w.device.type != "meta" else w.dtype}
        if isinstance(org_module, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(org_module.in_channels, rank, org_module.kernel_size,
                                                  org_module.stride, org_module.padding, bias=False, **factory)
            self.lora_up: nn.Module = nn.Conv2d(rank, org_module.out_channels, 1, 1, bias=False, **factory)
        else:
            self.lora_down = nn.Linear(org_module.in_features, rank, bias=False, **factory)
            self.lora_up = nn.Linear(rank, org_module.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        # kept in a list so the original layer is not a submodule (not in parameters() or state_dict())
        self._org: list[nn.Module] = [org_module]
        self.merged = False

    @property
    def scale(self) -> float:
        """alpha / rank, the factor sd-scripts applies to up(down(x))."""
        return self.alpha / self.rank

    def set_alpha(self, alpha: Optional[float]) -> None:
        """Set alpha (None/0 -> rank, as sd-scripts reads a file without `.alpha`)."""
        self.alpha = _fp32(self.rank if alpha is None or alpha == 0 else alpha)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update alone: up(down(x)) * multiplier * scale, with neuron/rank dropout while training."""
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        scale = self.scale
        if self.training and self.dropout:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            mask = torch.rand((lx.size(0), self.rank), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # text encoder: (batch, tokens, rank)
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # conv: (batch, rank, h, w)
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        return self.lora_up(lx) * (self.multiplier * scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped layer's output plus the update (skipped while merged, or by module dropout)."""
        y = self.wrapped_forward(x, *args, **kwargs)
        if self.merged or self.multiplier == 0:
            return y
        if self.training and self.module_dropout and torch.rand(1) < self.module_dropout:
            return y
        return y + self.lora_forward(x).to(y.dtype)

    def raw_delta(self) -> torch.Tensor:
        """scale * (up @ down) with the original weight's shape, before the multiplier, in fp32."""
        delta = self.lora_up.weight.float().flatten(1) @ self.lora_down.weight.float().flatten(1)
        return delta.reshape(self.org_module.weight.shape) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW with the original weight's shape: multiplier * scale * (up @ down), in fp32."""
        return self.raw_delta() * self.multiplier

    def norm_factors(self) -> list[nn.Parameter]:
        """Parameters ΔW is linear in (max-norm rescales each by ratio ** (1 / count), as sd-scripts)."""
        return [self.lora_up.weight, self.lora_down.weight]

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the original weight (forward then skips the update)."""
        if self.merged:
            return
        w = self.org_module.weight
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the original weight again (exact up to float rounding)."""
        if not self.merged:
            return
        w = self.org_module.weight
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"name={self.lora_name}, rank={self.rank}, alpha={self.alpha:g}, multiplier={self.multiplier:g}"
