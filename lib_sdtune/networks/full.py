"""LyCORIS "full" (native fine-tuning as a diff): a trainable ΔW and Δbias the size of the layer.

Saved as LyCORIS's `FullModule` saves it (`<name>.diff`, `<name>.diff_b`, no alpha), which A1111's
`network_full.py`, ComfyUI and lycoris-lora load as `W += m * diff`. Written in-house rather than on
lycoris-lora 4.1.3's `FullModule`, which keeps a CPU copy of every original weight and deletes the
layer's `weight` attribute while applied (a second full copy of the model in RAM, and a layer the host
cannot use after an error).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..errors import SdtuneError
from .forward_swap import ForwardSwap

__all__ = ["FullModule"]


class FullModule(ForwardSwap, nn.Module):
    """`y = org(x) + m * op(x, diff, diff_b)`; ΔW = m * diff; mergeable and removable like the others."""

    algorithm = "full"
    rank = 0  # a full diff has no rank or alpha; these keep the adapter interface uniform
    alpha = 1.0
    scale = 1.0

    def __init__(self, name: str, org_module: nn.Module, multiplier: float = 1.0,
                 module_dropout: Optional[float] = None):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise SdtuneError(f"full {name!r}: cannot wrap a {type(org_module).__name__} (Linear or Conv2d only)")
        self.lora_name = name
        self.multiplier = float(multiplier)
        self.module_dropout = module_dropout or None
        w = org_module.weight
        dtype = torch.float32 if w.device.type != "meta" else w.dtype
        self.diff = nn.Parameter(torch.zeros(w.shape, dtype=dtype, device=w.device))
        bias = getattr(org_module, "bias", None)
        self.diff_b = nn.Parameter(torch.zeros(bias.shape, dtype=dtype, device=w.device)) if bias is not None else None
        self._org: list[nn.Module] = [org_module]
        self._merged_delta: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @property
    def merged(self) -> bool:
        return self._merged_delta is not None

    def set_alpha(self, alpha: Optional[float]) -> None:
        """Full diffs have no alpha (LyCORIS writes none); accepted and ignored for a uniform interface."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        org = self.org_module
        if isinstance(org, nn.Conv2d):
            return nn.functional.conv2d(x, weight, bias, org.stride, org.padding, org.dilation, org.groups)
        return nn.functional.linear(x, weight, bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped layer's output plus the diff's (skipped while merged, or by module dropout)."""
        y = self.wrapped_forward(x, *args, **kwargs)
        if self.merged or self.multiplier == 0:
            return y
        if self.training and self.module_dropout and torch.rand(1) < self.module_dropout:
            return y
        b = None if self.diff_b is None else self.diff_b * self.multiplier
        return y + self._op(x.to(self.diff.dtype), self.diff * self.multiplier, b).to(y.dtype)

    def raw_delta(self) -> torch.Tensor:
        """ΔW before the multiplier: the diff itself, in fp32."""
        return self.diff.detach().float()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = multiplier * diff, in fp32."""
        return self.raw_delta() * self.multiplier

    def norm_factors(self) -> list[nn.Parameter]:
        """The diff (max-norm rescales it directly)."""
        return [self.diff]

    def delta_bias(self) -> Optional[torch.Tensor]:
        """Δbias = multiplier * diff_b (None for a layer without bias)."""
        return None if self.diff_b is None else self.diff_b.detach().float() * self.multiplier

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW (and Δbias) into the layer."""
        if self.merged:
            return
        org, dw, db = self.org_module, self.delta_weight(), self.delta_bias()
        org.weight.copy_((org.weight.float() + dw.to(org.weight.device)).to(org.weight.dtype))
        if db is not None:
            org.bias.copy_((org.bias.float() + db.to(org.bias.device)).to(org.bias.dtype))
        self._merged_delta = (dw, db)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged ΔW/Δbias out again."""
        if self._merged_delta is None:
            return
        org, (dw, db) = self.org_module, self._merged_delta
        org.weight.copy_((org.weight.float() - dw.to(org.weight.device)).to(org.weight.dtype))
        if db is not None:
            org.bias.copy_((org.bias.float() - db.to(org.bias.device)).to(org.bias.dtype))
        self._merged_delta = None

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """`diff` (and `diff_b`) as LyCORIS saves them."""
        out = {"diff": self.diff.detach()}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b.detach()
        return out

    @torch.no_grad()
    def load_kohya_tensors(self, parts: Mapping[str, torch.Tensor]) -> None:
        """Copy `diff`/`diff_b` in; shapes must be the layer's."""
        if "diff" not in parts or set(parts) - {"diff", "diff_b"}:
            raise SdtuneError(f"full module {self.lora_name!r}: the file has {sorted(parts)}, a full diff needs "
                              "['diff'] and optionally ['diff_b'] (different algorithm)")
        for suffix, param in (("diff", self.diff), ("diff_b", self.diff_b)):
            if suffix not in parts:
                continue
            if param is None or tuple(parts[suffix].shape) != tuple(param.shape):
                have = None if param is None else list(param.shape)
                raise SdtuneError(f"{self.lora_name}.{suffix}: shape {list(parts[suffix].shape)} in the file, "
                                  f"{have} in the layer (different model)")
            param.copy_(parts[suffix].to(param.dtype))

    def extra_repr(self) -> str:
        return f"name={self.lora_name}, algorithm=full, multiplier={self.multiplier:g}"
