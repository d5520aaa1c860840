"""A LoRA/LoCon/LyCORIS network over a model's U-Net and text encoders, with sd-scripts' names and rank rules.

Targets come from `naming.lora_targets` (kohya names whatever the live module tree is); 3x3 convs are
wrapped only with `conv_rank` set and get `conv_rank`/`conv_alpha`, every other layer `rank`/`alpha`
(`networks/lora.py` `create_modules` in sd-scripts); with block dims or block LR weights each U-Net block
gets its own rank/alpha and a block of rank 0 gets no module. One walk serves every algorithm:
`make_module` builds sdtune's `LoraModule` for LoRA/LoCon, `FullModule` for full diffs and a
`LycorisModule` (LoHa, LoKr, DoRA, Tucker) otherwise.
The kohya state dict is built here, not through diffusers' `convert_state_dict_to_kohya` (which writes
alpha = rank); LyCORIS modules write LyCORIS's own keys.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import SdtuneError
from .blocks import BlockPlan, block_lr_weights, plan_blocks
from .config import LoraConfig
from .full import FullModule
from .lora import LoraModule
from .lycoris import LycorisModule
from .naming import LoraTarget, lora_targets

__all__ = ["LoraConfig", "LoraNetwork", "AdapterModule", "make_module"]

AdapterModule = Union[LoraModule, LycorisModule, FullModule]

_LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def make_module(name: str, org: nn.Module, rank: int, alpha: float, config: LoraConfig) -> AdapterModule:
    """The adapter `config` asks for on one layer (the per-module math lives in lora.py / lycoris.py / full.py)."""
    drops = {"dropout": config.dropout, "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout}
    if config.algorithm == "full":
        return FullModule(name, org, config.multiplier, module_dropout=config.module_dropout)
    if not config.is_lycoris:
        return LoraModule(name, org, rank, alpha, config.multiplier, **drops)
    return LycorisModule(name, org, config.algorithm, rank, alpha, config.multiplier, factor=config.factor,
                         weight_decompose=config.weight_decompose, use_tucker=config.use_tucker, **drops)


class LoraNetwork(nn.Module):
    """Every LoRA module of one model, keyed by kohya name; apply/remove/merge and kohya (de)serialisation."""

    def __init__(self, modules: Mapping[str, nn.Module], family: str, config: LoraConfig):
        super().__init__()
        self.family = family
        self.config = config
        components = [c for c in ("unet",) if config.train_unet]
        components += [c for c in ("text_encoder", "text_encoder_2") if config.train_text_encoder]
        chosen = {c: modules[c] for c in components if c in modules}
        if not chosen:
            raise SdtuneError("the LoRA network has nothing to train: no U-Net or text encoder was selected")
        lr_weights = block_lr_weights(family, config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight,
                                      config.block_lr_zero_threshold)
        self.block_plan: Optional[BlockPlan] = plan_blocks(
            family, config.rank, config.alpha, config.conv_rank, config.effective_conv_alpha, config.block_dims,
            config.block_alphas, config.conv_block_dims, config.conv_block_alphas, lr_weights)
        conv = bool(config.conv_rank) or (self.block_plan is not None and self.block_plan.conv_dims is not None)
        self.targets: dict[str, LoraTarget] = {}
        self.loras = nn.ModuleDict()
        self.skipped: list[str] = []  # modules of blocks with rank 0 (or LR weight 0)
        for t in lora_targets(chosen, family, conv=conv):
            if t.component == "unet" and self.block_plan is not None:
                rank, alpha = self.block_plan.rank_alpha(t.name, family, t.uses_conv_dim)
            elif t.uses_conv_dim:
                rank, alpha = int(config.conv_rank or 0), config.effective_conv_alpha
            else:
                rank, alpha = config.rank, config.alpha
            if rank <= 0 and config.algorithm != "full":
                self.skipped.append(t.name)
                continue
            org = chosen[t.component].get_submodule(t.module_path)
            self.targets[t.name] = t
            self.loras[t.name] = make_module(t.name, org, rank, alpha, config)

    def __iter__(self) -> Iterator[AdapterModule]:  # type: ignore[override]
        return iter(self.loras.values())  # type: ignore[arg-type]

    def lora(self, name: str) -> AdapterModule:
        """The module for one kohya name."""
        return self.loras[name]  # type: ignore[return-value]

    def names(self, component: Optional[str] = None) -> list[str]:
        """kohya names, optionally of one component (unet / text_encoder / text_encoder_2)."""
        return [n for n, t in self.targets.items() if component is None or t.component == component]

    def set_multiplier(self, multiplier: float) -> None:
        """Strength of every module (A1111's `<lora:name:multiplier>`)."""
        self.config.multiplier = multiplier
        for m in self:
            m.multiplier = float(multiplier)

    def apply_to(self) -> None:
        """Hook every module into its layer's forward."""
        for m in self:
            m.apply()

    def remove(self) -> None:
        """Restore every wrapped layer's original forward (weights untouched unless merged)."""
        for m in self:
            m.remove()

    def merge_into_weights(self) -> None:
        """Add every ΔW into the model weights (the hooks, if applied, then pass through)."""
        for m in self:
            m.merge()

    def unmerge_from_weights(self) -> None:
        """Take every ΔW back out of the model weights."""
        for m in self:
            m.unmerge()

    def state_dict_kohya(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """`<name>.<suffix>` tensors as sd-scripts/LyCORIS save them (`lora_down.weight`, `hada_w1_a`, ...,
        `alpha` 0-dim), cast to `dtype`.

        sd-scripts casts every tensor, alpha included, to the save dtype; alpha is kept fp32 only where
        `dtype` cannot hold its exact value (fp16/bf16 hold every integer alpha a user picks up to 2048/256).
        """
        out: dict[str, torch.Tensor] = {}
        for name, m in self.loras.items():
            for suffix, t in _module_tensors(m).items():
                if suffix == "alpha":
                    t = torch.tensor(m.alpha, dtype=torch.float32)
                    if dtype is not None and float(t.to(dtype)) == m.alpha:
                        t = t.to(dtype)
                elif dtype is not None:
                    t = t.to(dtype)
                out[f"{name}.{suffix}"] = t.cpu().contiguous()
        return out

    @torch.no_grad()
    def load_kohya_state_dict(self, sd: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Copy a kohya LoRA/LyCORIS state dict in (alpha from the file; missing alpha = rank); returns unused keys."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        unused: list[str] = []
        for key, t in sd.items():
            name, _, suffix = key.partition(".")
            m = self.loras[name] if name in self.loras else None
            if m is None or (isinstance(m, LoraModule) and suffix not in _LORA_SUFFIXES):
                unused.append(key)
                continue
            grouped.setdefault(name, {})[suffix] = t
        missing = [n for n in self.loras if n not in grouped]
        if strict and (unused or missing):
            raise SdtuneError(f"LoRA state dict does not fit this network: {len(unused)} unknown keys "
                              f"(first: {unused[:3]}), {len(missing)} modules missing (first: {missing[:3]})")
        for name, parts in grouped.items():
            m = self.lora(name)
            if isinstance(m, (LycorisModule, FullModule)):
                m.load_kohya_tensors(parts)
            else:
                _load_lora_parts(m, name, parts)
        return unused


def _module_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """suffix -> tensor of one module as its file stores it (alpha included, except for full diffs)."""
    if isinstance(m, (LycorisModule, FullModule)):
        return m.kohya_tensors()
    assert isinstance(m, LoraModule)
    return {"lora_down.weight": m.lora_down.weight.detach(), "lora_up.weight": m.lora_up.weight.detach(),
            "alpha": torch.tensor(m.alpha, dtype=torch.float32)}


def _load_lora_parts(m: LoraModule, name: str, parts: Mapping[str, torch.Tensor]) -> None:
    """Copy one LoRA module's `lora_down.weight`/`lora_up.weight`/`alpha` in, checking shapes."""
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        raise SdtuneError(f"LoRA module {name!r} lacks lora_down or lora_up in the state dict")
    for suffix, layer in (("lora_down.weight", m.lora_down), ("lora_up.weight", m.lora_up)):
        w = parts[suffix]
        if tuple(w.shape) != tuple(layer.weight.shape):
            raise SdtuneError(f"{name}.{suffix}: shape {list(w.shape)} in the file, "
                              f"{list(layer.weight.shape)} in the network (different rank or model)")
        layer.weight.copy_(w.to(layer.weight.dtype))
    alpha = parts.get("alpha")
    m.set_alpha(float(alpha.float().item()) if alpha is not None else None)
