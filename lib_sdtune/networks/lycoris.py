"""LyCORIS adapters (LoHa, LoKr, DoRA, Tucker LoCon) on lycoris-lora's per-module classes, under sdtune's names.

Parameters, initialisation, saved keys, dropouts and the training forward are lycoris-lora's own
(`LohaModule`, `LokrModule`, `LoConModule` with `weight_decompose` for DoRA or `use_tucker` for a
Tucker-decomposed 3x3 conv: `lora_mid`, `hada_t1/t2`, `lokr_t2`). Attaching (a forward swap undone exactly),
ΔW and merging are sdtune's: ΔW follows A1111/ComfyUI (LoHa `(w1a@w1b)*(w2a@w2b)*alpha/r`, LoKr
`kron(w1, w2)*alpha/r`, scale 1 when both LoKr halves are full), because lycoris-lora 4.1.3's `merge_to`
applies the scale twice for LoHa/LoKr when alpha != rank.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from ..errors import SdtuneError
from .forward_swap import ForwardSwap

__all__ = ["ALGORITHMS", "LycorisModule", "loha_delta", "lokr_delta", "dora_merge", "tucker_rebuild"]

# sdtune algorithm -> lycoris-lora class ("lora" here is LoCon, used for DoRA = lora + weight_decompose)
_CLASSES: dict[str, type] = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}
ALGORITHMS = tuple(_CLASSES)


def _fp32(value: float) -> float:
    """A value rounded as an fp32 buffer holds it (the saved alpha)."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float,
               shape: tuple[int, ...]) -> torch.Tensor:
    """LoHa ΔW = (w1a @ w1b) * (w2a @ w2b) * scale, reshaped to the layer's weight shape (fp32)."""
    w1 = w1a.float() @ w1b.float()
    w2 = w2a.float() @ w2b.float()
    return (w1 * w2).reshape(shape) * scale


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """LoKr ΔW = kron(w1, w2) * scale (w2 may keep a conv's kernel axes), reshaped to the weight shape."""
    w1, w2 = w1.float(), w2.float().contiguous()
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2).reshape(shape) * scale


def tucker_rebuild(t: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker-decomposed conv: core `t` [r, r, k, k] with `up` [r, out] and `down` [r, in] -> [out, in, k, k]."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t.float(), up.float(), down.float())


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
               multiplier: float) -> torch.Tensor:
    """DoRA: (W + ΔW) rescaled per output row to `dora_scale`, blended by the multiplier (LyCORIS's rule)."""
    merged = weight.float() + delta
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    scale = dora_scale.float().reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return merged * scale


class LycorisModule(ForwardSwap, nn.Module):
    """One LyCORIS adapter (LoHa, LoKr, LoRA+DoRA or Tucker LoCon) on an nn.Linear/nn.Conv2d, removable, mergeable."""

    def __init__(self, name: str, org_module: nn.Module, algorithm: str, rank: int, alpha: Optional[float] = None,
                 multiplier: float = 1.0, factor: int = -1, weight_decompose: bool = False, use_tucker: bool = False,
                 dropout: Optional[float] = None, rank_dropout: Optional[float] = None,
                 module_dropout: Optional[float] = None):
        super().__init__()
        if algorithm not in _CLASSES:
            raise SdtuneError(f"LyCORIS {name!r}: unknown algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise SdtuneError(f"LyCORIS {name!r}: cannot wrap a {type(org_module).__name__} (Linear or Conv2d only)")
        if rank < 1:
            raise SdtuneError(f"LyCORIS {name!r}: rank must be at least 1, got {rank}")
        if algorithm == "lora" and not weight_decompose and not use_tucker:
            raise SdtuneError("plain LoRA is sdtune's LoraModule; LycorisModule('lora') is for DoRA or Tucker only")
        self.lora_name = name
        self.algorithm = algorithm
        self.rank = int(rank)
        self.weight_decompose = bool(weight_decompose)
        extra: dict[str, Any] = {"factor": int(factor)} if algorithm == "lokr" else {}
        alpha = _fp32(rank if alpha is None or alpha == 0 else alpha)
        self.lyco = _CLASSES[algorithm](name, org_module, float(multiplier), lora_dim=self.rank, alpha=alpha,
                                        dropout=float(dropout or 0), rank_dropout=float(rank_dropout or 0),
                                        module_dropout=float(module_dropout or 0), use_tucker=bool(use_tucker),
                                        weight_decompose=self.weight_decompose, bypass_mode=False, **extra)
        self.lyco.alpha = self.lyco.alpha.float()  # an fp32 buffer, as LyCORIS saves it
        self._org: list[nn.Module] = [org_module]
        self._merged_delta: Optional[torch.Tensor] = None

    @property
    def multiplier(self) -> float:
        """Strength (A1111's `<lora:name:multiplier>`), shared with the lycoris module's forward."""
        return float(self.lyco.multiplier)

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self.lyco.multiplier = float(value)

    @property
    def alpha(self) -> float:
        """alpha as saved (the `.alpha` tensor)."""
        return float(self.lyco.alpha)

    @property
    def scale(self) -> float:
        """The factor ΔW is scaled by: alpha / rank; 1 for a LoKr whose two halves are both full."""
        if self.algorithm == "lokr" and self.lyco.use_w1 and self.lyco.use_w2:
            return 1.0
        return self.alpha / self.rank

    @property
    def merged(self) -> bool:
        return self._merged_delta is not None

    def set_alpha(self, alpha: Optional[float]) -> None:
        """Set alpha (None/0 -> rank) and the scale lycoris' forward uses."""
        value = _fp32(self.rank if alpha is None or alpha == 0 else alpha)
        self.lyco.alpha.fill_(value)
        self.lyco.scale = self.scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """lycoris-lora's forward (ΔW rebuilt per call); the plain layer while merged or at multiplier 0.

        DoRA runs the same math here: lycoris-lora 4.1.3's DoRA forward fails on fp16/bf16 layers (its
        rescaled weight is fp32); so does a float8 base layer (fp8_base), whose weight lycoris cannot add to.
        """
        org_forward = self.wrapped_forward
        if self.merged or self.multiplier == 0:
            return org_forward(x, *args, **kwargs)
        if self.weight_decompose or self.org_module.weight.element_size() == 1:
            y = org_forward(x, *args, **kwargs)
            return y + self.lyco.op(x, self.delta_weight().to(x), None, **self.lyco.kw_dict).to(y.dtype)
        self.lyco.org_forward = org_forward
        return self.lyco(x, *args, **kwargs)

    def raw_delta(self) -> torch.Tensor:
        """The additive update before DoRA and the multiplier, `scale * ΔW`, in fp32 (A1111/ComfyUI math)."""
        m, shape = self.lyco, tuple(self.org_module.weight.shape)
        if self.algorithm == "loha":
            if m.tucker:
                w1 = tucker_rebuild(m.hada_t1, m.hada_w1_a, m.hada_w1_b)
                w2 = tucker_rebuild(m.hada_t2, m.hada_w2_a, m.hada_w2_b)
                return (w1 * w2).reshape(shape) * self.scale
            return loha_delta(m.hada_w1_a, m.hada_w1_b, m.hada_w2_a, m.hada_w2_b, self.scale, shape)
        if self.algorithm == "lokr":
            w1 = m.lokr_w1 if m.use_w1 else m.lokr_w1_a.float() @ m.lokr_w1_b.float()
            if m.use_w2:
                w2 = m.lokr_w2
            elif m.tucker:
                w2 = tucker_rebuild(m.lokr_t2, m.lokr_w2_a, m.lokr_w2_b)
            else:
                w2 = m.lokr_w2_a.float() @ m.lokr_w2_b.float().flatten(1)
                if len(shape) == 4:
                    w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
            return lokr_delta(w1, w2, self.scale, shape)
        up, down = m.lora_up.weight.float(), m.lora_down.weight.float()
        if m.tucker:
            return tucker_rebuild(m.lora_mid.weight, up.flatten(1).T, down.flatten(1)).reshape(shape) * self.scale
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * self.scale

    def norm_factors(self) -> list[nn.Parameter]:
        """One parameter per multiplicative factor of ΔW (max-norm rescales each by ratio ** (1 / count))."""
        m = self.lyco
        if self.algorithm == "loha":
            return [m.hada_w1_a, m.hada_w2_a]
        if self.algorithm == "lokr":
            return [m.lokr_w1 if m.use_w1 else m.lokr_w1_a, m.lokr_w2 if m.use_w2 else m.lokr_w2_a]
        return [m.lora_up.weight, m.lora_down.weight]

    def delta_weight(self) -> torch.Tensor:
        """W' - W for the current weight and multiplier, in fp32 (DoRA's rescale included)."""
        if self.weight_decompose:
            w = self.org_module.weight.detach()
            return dora_merge(w, self.raw_delta(), self.lyco.dora_scale, self.multiplier) - w.float()
        return self.raw_delta() * self.multiplier

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the original weight (forward then skips the update)."""
        if self.merged:
            return
        w = self.org_module.weight
        delta = self.delta_weight().to(w.device)
        w.copy_((w.float() + delta).to(w.dtype))
        self._merged_delta = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the ΔW added by merge() (exact up to float rounding)."""
        if self._merged_delta is None:
            return
        w = self.org_module.weight
        w.copy_((w.float() - self._merged_delta).to(w.dtype))
        self._merged_delta = None

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """Suffix -> tensor exactly as LyCORIS saves this module (`hada_w1_a`, `lokr_w1`, `dora_scale`, `alpha`...)."""
        return {k: v.detach() for k, v in self.lyco.custom_state_dict().items()}

    @torch.no_grad()
    def load_kohya_tensors(self, parts: Mapping[str, torch.Tensor]) -> None:
        """Copy a module's tensors (suffix -> tensor) in; shapes must match, missing alpha means rank."""
        mine = self.kohya_tensors()
        wanted = set(mine) - {"alpha"}
        if set(parts) - {"alpha"} != wanted:
            raise SdtuneError(f"LyCORIS module {self.lora_name!r}: the file has {sorted(parts)}, this "
                              f"{self.algorithm} network needs {sorted(mine)} (different algorithm, factor or rank)")
        for suffix in wanted:
            param = self.lyco.get_parameter(suffix)
            if tuple(parts[suffix].shape) != tuple(param.shape):
                raise SdtuneError(f"{self.lora_name}.{suffix}: shape {list(parts[suffix].shape)} in the file, "
                                  f"{list(param.shape)} in the network (different rank, factor or model)")
            param.copy_(parts[suffix].to(param.dtype))
        alpha = parts.get("alpha")
        self.set_alpha(float(alpha.float().item()) if alpha is not None else None)

    def extra_repr(self) -> str:
        return (f"name={self.lora_name}, algorithm={self.algorithm}{'+dora' if self.weight_decompose else ''}, "
                f"rank={self.rank}, alpha={self.alpha:g}, multiplier={self.multiplier:g}")
