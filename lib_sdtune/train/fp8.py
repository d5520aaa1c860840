"""fp8_base: keep the frozen U-Net's Linear/Conv weights in float8 to halve their memory (sd-scripts' --fp8_base).

The weights are stored as float8_e4m3fn and upcast on the fly by autocast (it casts every floating-point argument
of linear/conv to the compute dtype), so fp8_base needs mixed precision. Norms, embeddings and biases stay in the
base dtype: CPU group/layer norm refuse fp8 parameters, and they are a tiny share of the weights. The text
encoders stay in the base dtype too (their forward runs outside autocast when cached or trained).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SdtuneError

FP8 = getattr(torch, "float8_e4m3fn", None)


def check_fp8_base(mixed_precision: str) -> None:
    """Refuse fp8_base where it cannot work: an old torch, or no mixed precision to upcast with."""
    if FP8 is None:
        raise SdtuneError(f"fp8_base needs torch >= 2.1 with float8 support (this is torch {torch.__version__})")
    if mixed_precision not in ("fp16", "bf16"):
        raise SdtuneError("fp8_base needs mixed_precision = \"bf16\" (or \"fp16\" on a GPU): the fp8 weights are "
                          "upcast by autocast at each layer")


def cast_to_fp8(module: nn.Module) -> int:
    """Store every Linear/Conv weight below `module` as float8_e4m3fn; returns the bytes saved."""
    saved = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.dtype != FP8:
            before = m.weight.numel() * m.weight.element_size()
            m.weight.data = m.weight.data.to(FP8)
            saved += before - m.weight.numel() * m.weight.element_size()
    return saved


def check_fp8_network(net_cfg) -> None:
    """LoHa/LoKr on an fp8 base add their update beside the layer, where rank/module dropout do not apply."""
    if net_cfg.algorithm in ("loha", "lokr") and (net_cfg.rank_dropout or net_cfg.module_dropout):
        raise SdtuneError(f"fp8_base with algo={net_cfg.algorithm}: rank_dropout/module_dropout are not applied on "
                          "an fp8 base; remove them or train without fp8_base")
