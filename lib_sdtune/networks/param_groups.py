"""Optimizer parameter groups of a network, as sd-scripts' `LoRANetwork.prepare_optimizer_params` builds them.

Text-encoder and U-Net modules get their own learning rate (a side whose LR is 0 is left out of the
optimizer: "NO LR skipping!"); with block LR weights each U-Net block is its own group at `unet_lr *
weight`; with a LoRA+ ratio the `lora_up` side of every module (LyCORIS: its output-side factors) gets
`lr * ratio` in a separate group. The descriptions name the groups for LR logging, as sd-scripts does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from torch import nn

from ..errors import SdtuneError
from .blocks import block_index
from .network import LoraNetwork

__all__ = ["ParamGroups", "optimizer_param_groups"]



@dataclass
class ParamGroups:
    """`groups` for torch.optim (each a dict with params and lr) and a description per group."""

    groups: list[dict[str, Any]]
    descriptions: list[str]


def _assemble(modules: Sequence[nn.Module], lr: Optional[float], ratio: Optional[float],
              label: str, out: ParamGroups) -> None:
    """One group for the modules' parameters (two with LoRA+), skipped when its LR is 0 or None."""
    plain: list[nn.Parameter] = []
    plus: list[nn.Parameter] = []
    for m in modules:
        for name, param in m.named_parameters():
            if not param.requires_grad:
                continue
            (plus if ratio is not None and "lora_up" in name else plain).append(param)
    for params, group_lr, suffix in ((plain, lr, ""), (plus, None if lr is None or ratio is None else lr * ratio,
                                                       " plus")):
        if not params or not group_lr:
            continue
        out.groups.append({"params": params, "lr": float(group_lr)})
        out.descriptions.append(label + suffix)


def optimizer_param_groups(network: LoraNetwork, text_encoder_lr: Union[float, Sequence[float], None],
                           unet_lr: Optional[float], default_lr: float) -> ParamGroups:
    """sd-scripts' groups: TE (one LR, or one per text encoder), U-Net (per block with block LR weights), LoRA+.

    `text_encoder_lr`/`unet_lr` None fall back to `default_lr` (`--learning_rate`); 0 removes that side.
    """
    cfg = network.config
    for label, ratio in (("loraplus_lr_ratio", cfg.loraplus_lr_ratio),
                         ("loraplus_unet_lr_ratio", cfg.loraplus_unet_lr_ratio),
                         ("loraplus_text_encoder_lr_ratio", cfg.loraplus_text_encoder_lr_ratio)):
        if ratio is not None and ratio <= 0:
            raise SdtuneError(f"{label} must be positive, got {ratio}")
    out = ParamGroups([], [])
    te_components = [c for c in ("text_encoder", "text_encoder_2") if network.names(c)]
    te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else None
    if te_lrs is not None and len(te_lrs) not in (1, len(te_components)):
        raise SdtuneError(f"text_encoder_lr: {len(te_lrs)} values for {len(te_components)} text encoder(s)")
    te_ratio = cfg.loraplus_text_encoder_lr_ratio or cfg.loraplus_lr_ratio
    for i, comp in enumerate(te_components):
        if te_lrs is not None:
            lr = te_lrs[i] if len(te_lrs) > 1 else te_lrs[0]
        else:
            lr = default_lr if text_encoder_lr is None else float(text_encoder_lr)  # type: ignore[arg-type]
        label = "textencoder" if len(te_components) == 1 else f"textencoder{i + 1}"
        _assemble([network.lora(n) for n in network.names(comp)], lr, te_ratio, label, out)
    unet_names = network.names("unet")
    base_lr = default_lr if unet_lr is None else unet_lr
    unet_ratio = cfg.loraplus_unet_lr_ratio or cfg.loraplus_lr_ratio
    plan = network.block_plan
    if unet_names and plan is not None and plan.lr_weights is not None:
        by_block: dict[int, list[nn.Module]] = {}
        for n in unet_names:
            by_block.setdefault(block_index(n, network.family), []).append(network.lora(n))
        for idx, mods in by_block.items():
            _assemble(mods, base_lr * plan.lr_weights[idx], unet_ratio, f"unet_block{idx}", out)
    elif unet_names:
        _assemble([network.lora(n) for n in unet_names], base_lr, unet_ratio, "unet", out)
    if not out.groups:
        raise SdtuneError("nothing to train: every learning rate is 0 (set unet_lr or text_encoder_lr above 0)")
    return out
