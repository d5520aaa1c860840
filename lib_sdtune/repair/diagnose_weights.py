"""Weight-space drift: how far each U-Net block (merge/LBW block names) and text encoder moved from the base.

Checkpoint pairs are streamed key by key (read in a thread, one pair of tensors in memory): per group the
relative change sqrt(Σ‖W_tuned - W_base‖² / Σ‖W_base‖²). For a LoRA/LyCORIS file every module's ΔW (at the
strength) is measured against the base layer it lands on: ‖ΔW‖, ‖ΔW‖/‖W‖, its effective rank (Roy & Vetterli's
exp of the singular-value entropy: how many directions the update really uses), and the TE / U-Net share of
Σ‖ΔW‖². Plain LoRA factors are never multiplied out: their singular values come from r x r Gram matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from ..errors import SdtuneError
from ..io.checkpoint import StateDictSource
from ..io.detect import ArchInfo, ignored_key_pattern
from ..merge.blocks import layout_for, slots_for, unet_slot
from ..merge.lora_delta import LoraModuleParts
from ..merge.pipeline import run_pipeline
from ..networks.naming import LoraTarget

Progress = Callable[[int, int, str], None]


@dataclass
class Drift:
    """Σ‖ΔW‖² and Σ‖W‖² of a group of tensors; `relative` is their root ratio."""

    delta2: float = 0.0
    base2: float = 0.0
    tensors: int = 0

    def add(self, delta2: float, base2: float) -> None:
        self.delta2 += delta2
        self.base2 += base2
        self.tensors += 1

    @property
    def relative(self) -> float:
        return math.sqrt(self.delta2 / self.base2) if self.base2 > 0 else (0.0 if self.delta2 == 0 else math.inf)


def group_of(key: str, arch: ArchInfo) -> Optional[str]:
    """A checkpoint key's group: its U-Net block slot (IN00..OUT11), its text-encoder component, or None."""
    slot = unet_slot(key, layout_for(arch.family))
    if slot is not None:
        return slot
    for component in ("text_encoder", "text_encoder_2"):
        prefix = arch.components.get(component)
        if prefix and key.startswith(prefix):
            return component
    return None


def drift_keys(base: StateDictSource, model: StateDictSource, arch: ArchInfo, labels: tuple[str, str]) -> list[str]:
    """The U-Net and text-encoder float tensors both files hold (the VAE left out), shapes checked."""
    ignored = ignored_key_pattern(arch.family)
    keys = [k for k in base if k in model and not ignored.match(k) and group_of(k, arch) is not None
            and base.dtype(k) is not None and base.dtype(k).is_floating_point]
    for k in keys:
        if tuple(base.shape(k)) != tuple(model.shape(k)):
            raise SdtuneError(f"{k} is {list(model.shape(k))} in model {labels[1]} but {list(base.shape(k))} in base "
                              f"{labels[0]}; they are not the same architecture, so they cannot be compared")
    return keys


def checkpoint_drift(base: StateDictSource, model: StateDictSource, arch: ArchInfo, keys: list[str],
                     progress: Optional[Callable[[str], None]] = None,
                     cancelled: Optional[Callable[[], bool]] = None) -> dict[str, Drift]:
    """Group -> drift of `model` from `base` over `keys` (see drift_keys), streamed."""
    groups: dict[str, Drift] = {g: Drift() for g in (*slots_for(layout_for(arch.family))[1:], *arch.components)
                                if g not in ("unet", "vae")}

    def compute(key: str, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        b, m = pair  # the difference in the files' dtype (exact for nearby values), the norms summed in fp32
        delta = torch.linalg.vector_norm(m - b, dtype=torch.float32)
        return float(delta) ** 2, float(torch.linalg.vector_norm(b, dtype=torch.float32)) ** 2

    def record(key: str, value: tuple[float, float]) -> None:
        groups[group_of(key, arch)].add(*value)  # type: ignore[index]

    run_pipeline(keys, lambda k: (base[k], model[k]), compute, record, cancelled=cancelled,
                 on_done=(lambda n, k: progress(k)) if progress is not None else None)
    return {g: d for g, d in groups.items() if d.tensors}


@dataclass
class ModuleStat:
    """One LoRA module measured against its base layer."""

    name: str
    key: str  # the base checkpoint key it lands on
    group: str  # U-Net block slot, or text_encoder / text_encoder_2
    algorithm: str
    rank: Optional[int]
    delta_norm: float  # ‖ΔW‖_F at the strength
    base_norm: float  # ‖W‖_F of the base layer (its rows, for OpenCLIP's fused q/k/v)
    effective_rank: float

    @property
    def relative(self) -> float:
        return self.delta_norm / self.base_norm if self.base_norm > 0 else math.inf

    def to_dict(self) -> dict:
        return {"name": self.name, "key": self.key, "group": self.group, "algorithm": self.algorithm, "rank": self.rank,
                "delta_norm": round(self.delta_norm, 6), "relative": round(self.relative, 6),
                "effective_rank": round(self.effective_rank, 3)}


@dataclass
class LoraStats:
    """Every matched module's numbers, per-group drift, and the share of the update in the text encoder(s)."""

    algorithm: str
    modules: list[ModuleStat]
    groups: dict[str, Drift]
    unmatched: list[str] = field(default_factory=list)

    @property
    def te_share(self) -> float:
        """Share of Σ‖ΔW‖² in the text encoder(s), 0..1."""
        total = sum(m.delta_norm ** 2 for m in self.modules)
        te = sum(m.delta_norm ** 2 for m in self.modules if m.group.startswith("text_encoder"))
        return te / total if total > 0 else 0.0

    def to_dict(self, top: int = 20) -> dict:
        ranked = sorted(self.modules, key=lambda m: -m.relative)
        return {"algorithm": self.algorithm, "modules": len(self.modules), "unmatched": self.unmatched,
                "te_share": round(self.te_share, 6), "unet_share": round(1 - self.te_share, 6) if self.modules else 0,
                "median_effective_rank": round(_median([m.effective_rank for m in self.modules]), 3),
                "largest_relative": [m.to_dict() for m in ranked[:top]],
                "all_modules": [m.to_dict() for m in self.modules]}


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(entropy of σ/Σσ) (Roy & Vetterli 2007): 1 for a rank-1 update, r for r equal directions."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def _singular_values(module: LoraModuleParts, weight: torch.Tensor, strength: float
                     ) -> tuple[torch.Tensor, float]:
    """(singular values of ΔW at `strength`, ‖ΔW‖_F); plain LoRA from its factors, else from the dense ΔW."""
    lr = module.low_rank()
    if lr is not None:  # σ² of up@down = the eigenvalues of (upᵀ·up)(down·downᵀ), an r x r product of PSD matrices
        gram = (lr.up.T @ lr.up).double() @ (lr.down @ lr.down.T).double()
        sv = torch.linalg.eigvals(gram).real.clamp_min(0).sqrt() * abs(lr.scale * strength)
        return sv, float(sv.square().sum().sqrt())
    delta = module.delta(weight, strength).reshape(weight.shape[0], -1).double()
    gram = delta @ delta.T if delta.shape[0] <= delta.shape[1] else delta.T @ delta
    sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
    return sv, float(delta.square().sum().sqrt())


def lora_stats(parts: Mapping[str, tuple[LoraTarget, LoraModuleParts]], group: Callable[[LoraTarget], str],
               base: StateDictSource, strength: float, algorithm: str, unmatched: list[str],
               progress: Optional[Callable[[str], None]] = None,
               cancelled: Optional[Callable[[], bool]] = None) -> LoraStats:
    """Measure every matched module of a LoRA against the base layer it lands on."""
    from .diagnose_te import _rows

    stats: list[ModuleStat] = []
    groups: dict[str, Drift] = {}
    for name, (t, module) in parts.items():
        if cancelled is not None and cancelled():
            raise SdtuneError("diagnose cancelled; nothing was written")
        w = _rows(t, base[t.original_key]).float()
        shape = (t.out_features, t.in_features, *(t.kernel_size or ()))
        if math.prod(shape) == w.numel():
            w = w.reshape(shape)
        sv, norm = _singular_values(module, w, strength)
        base_norm = float(w.square().sum().sqrt())
        g = group(t)
        kind = module.algorithm + ("+dora" if module.dora else "")
        stats.append(ModuleStat(name, t.original_key, g, kind, module.rank, norm, base_norm, effective_rank(sv)))
        groups.setdefault(g, Drift()).add(norm ** 2, base_norm ** 2)
        if progress is not None:
            progress(name)
    return LoraStats(algorithm, stats, groups, unmatched)
