"""ΔW of one module of a LoRA/LyCORIS file, from its tensors alone (no network object, no model).

The math is A1111/ComfyUI's, the same sdtune's adapters use (`networks.lora`, `networks.lycoris`):
LoRA/LoCon `scale * up @ down`, Tucker LoCon through `lora_mid`, LoHa `(w1a@w1b)*(w2a@w2b)*scale`,
LoKr `kron(w1, w2)*scale` (scale 1 when both halves are full), full diffs `diff` (+ `diff_b`), and
DoRA's per-row rescale on top. `scale = alpha / rank`; a file without `.alpha` means alpha = rank.
Everything is computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ..errors import SdtuneError
from ..networks.lycoris import dora_merge, loha_delta, lokr_delta, tucker_rebuild

__all__ = ["LoraModuleParts", "group_modules", "LowRank"]

# tensor suffix -> algorithm, most specific first; "lora_tucker" is LoCon with a Tucker core (lora_mid)
_ALGORITHMS = (("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"), ("diff", "full"),
               ("lora_mid.weight", "lora_tucker"), ("lora_down.weight", "lora"))
# what other tools write that sdtune does not apply; named in the refusal
_UNSUPPORTED = (("on_input", "IA3"), ("weight", "IA3"), ("a1.weight", "GLoRA"), ("oft_blocks", "OFT/BOFT"),
                ("oft_diag", "OFT"), ("w_norm", "norm layers"), ("lora_A.weight", "peft-named LoRA"),
                ("q_layer.weight", "T-LoRA"))


@dataclass(frozen=True)
class LowRank:
    """ΔW = scale * up @ down as 2-D factors: up [out, r], down [r, in*kh*kw] (fp32)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraModuleParts:
    """The tensors of one module of a LoRA file (suffix -> tensor) and what they are."""

    file: str
    name: str
    parts: Mapping[str, torch.Tensor]
    algorithm: str  # lora | lora_tucker | loha | lokr | full

    @classmethod
    def of(cls, file: str, name: str, parts: Mapping[str, torch.Tensor]) -> LoraModuleParts:
        """Recognise the algorithm from the suffixes; other formats are refused naming file and module."""
        for suffix, algo in _ALGORITHMS:
            if suffix in parts:
                return cls(file, name, parts, algo)
        for suffix, what in _UNSUPPORTED:
            if suffix in parts:
                raise SdtuneError(f"{file}: module {name!r} is {what} ({', '.join(sorted(parts))}), which sdtune's "
                                  f"LoRA tools do not apply; use LoRA, LoCon, LoHa, LoKr, full or DoRA files")
        raise SdtuneError(f"{file}: module {name!r} has tensors {sorted(parts)}, which are no LoRA/LyCORIS format "
                          f"sdtune knows")

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.parts

    @property
    def rank(self) -> Optional[int]:
        """The rank alpha is divided by (None: a full diff or a LoKr with both halves full)."""
        p = self.parts
        if self.algorithm in ("lora", "lora_tucker"):
            return int(p["lora_down.weight"].shape[0])
        if self.algorithm == "loha":
            return int(p["hada_w1_b"].shape[0])
        if self.algorithm == "lokr":
            for key in ("lokr_w2_b", "lokr_w1_b"):
                if key in p:
                    return int(p[key].shape[0])
        return None

    @property
    def alpha(self) -> Optional[float]:
        a = self.parts.get("alpha")
        return None if a is None else float(a.float())

    @property
    def scale(self) -> float:
        """alpha / rank (1 without a rank; a missing or zero alpha means alpha = rank)."""
        rank, alpha = self.rank, self.alpha
        if rank is None or not alpha:
            return 1.0
        return alpha / rank

    def low_rank(self) -> Optional[LowRank]:
        """The 2-D factors of a plain LoRA/LoCon module (None for every other algorithm and for DoRA)."""
        if self.algorithm != "lora" or self.dora:
            return None
        up, down = self.parts["lora_up.weight"].float(), self.parts["lora_down.weight"].float()
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise SdtuneError(f"{self.file}: {self.name}.lora_up.weight is {list(up.shape)}; a LoRA up conv is 1x1")
        up, down = up.flatten(1), down.flatten(1)
        if up.shape[1] != down.shape[0]:
            raise SdtuneError(f"{self.file}: {self.name}: lora_up has rank {up.shape[1]}, lora_down "
                              f"{down.shape[0]}; the file is damaged")
        return LowRank(up, down, self.scale)

    def raw_delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        """scale * ΔW with the layer's weight `shape`, before the strength and DoRA (fp32)."""
        p, scale = self.parts, self.scale
        try:
            if self.algorithm == "lora":
                up, down = p["lora_up.weight"].float().flatten(1), p["lora_down.weight"].float().flatten(1)
                return (up @ down).reshape(shape) * scale
            if self.algorithm == "lora_tucker":
                up, down = p["lora_up.weight"].float().flatten(1), p["lora_down.weight"].float().flatten(1)
                return tucker_rebuild(p["lora_mid.weight"], up.T, down).reshape(shape) * scale
            if self.algorithm == "loha":
                if "hada_t1" in p:
                    w1 = tucker_rebuild(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
                    w2 = tucker_rebuild(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
                    return (w1 * w2).reshape(shape) * scale
                return loha_delta(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], scale, shape)
            if self.algorithm == "lokr":
                return lokr_delta(self._lokr_w1(), self._lokr_w2(shape), scale, shape)
            return p["diff"].float().reshape(shape)
        except (RuntimeError, KeyError) as e:
            raise SdtuneError(f"{self.file}: module {self.name!r} ({self.algorithm}) does not fit the layer's weight "
                              f"{list(shape)}: {e}; is the LoRA for another model?") from e

    def _lokr_w1(self) -> torch.Tensor:
        p = self.parts
        return p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()

    def _lokr_w2(self, shape: tuple[int, ...]) -> torch.Tensor:
        p = self.parts
        if "lokr_w2" in p:
            return p["lokr_w2"]
        if "lokr_t2" in p:
            return tucker_rebuild(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        w2 = p["lokr_w2_a"].float() @ p["lokr_w2_b"].float().flatten(1)
        return w2.reshape(w2.shape[0], -1, *shape[2:]) if len(shape) == 4 else w2

    def delta(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """W' - W at `strength` for this layer's current `weight` (DoRA needs it), fp32."""
        raw = self.raw_delta(tuple(weight.shape))
        if not self.dora:
            return raw * strength
        w = weight.float()
        try:
            return dora_merge(w, raw, self.parts["dora_scale"], strength) - w
        except RuntimeError as e:
            raise SdtuneError(f"{self.file}: {self.name}.dora_scale {list(self.parts['dora_scale'].shape)} does not "
                              f"fit the weight {list(weight.shape)} (only per-output-row DoRA is supported): {e}"
                              ) from e

    def delta_bias(self, strength: float) -> Optional[torch.Tensor]:
        """Δbias of a full diff (`diff_b`) at `strength`, else None."""
        b = self.parts.get("diff_b")
        return None if b is None else b.float() * strength

    def dense_2d(self, shape: tuple[int, ...]) -> torch.Tensor:
        """scale * ΔW as a matrix [out, in*kh*kw] (what the SVD tools factor); DoRA cannot be, and is refused."""
        if self.dora:
            raise SdtuneError(f"{self.file}: module {self.name!r} is DoRA, whose update depends on the base "
                              f"weight; it cannot be turned into a LoRA without the model (bake it instead)")
        return self.raw_delta(shape).reshape(shape[0], -1)


def group_modules(file: str, state: Mapping[str, torch.Tensor]) -> dict[str, LoraModuleParts]:
    """A LoRA state dict `<module>.<suffix>` -> module name -> its parts (kohya module names hold no dots)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        name, dot, suffix = key.partition(".")
        if not dot:
            raise SdtuneError(f"{file}: tensor {key!r} is not `<module>.<part>`; not a kohya-format LoRA")
        grouped.setdefault(name, {})[suffix] = t
    return {name: LoraModuleParts.of(file, name, parts) for name, parts in grouped.items()}
