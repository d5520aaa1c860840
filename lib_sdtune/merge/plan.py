"""The merge plan: what happens to every output key, decided from the headers alone before any tensor is read.

Keys follow A1111's merger: the output has A's keys; a key is merged when every input has it and
its name contains "model" (the weights); a key some input lacks is kept from A (A1111 keeps A's
value when B lacks it, and zeroes B-C when C lacks it, which also leaves A); keys only B or C have
are dropped. Every such case is listed in the report. `position_ids` is never merged (kept from A
bit for bit, or reset to arange as int64), non-float tensors are copied, schedule buffers are kept
in their own dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from ..errors import SdtuneError
from ..io.detect import COMPONENT_PREFIXES, UNET_PREFIX, VAE_PREFIX
from .blocks import layout_for, unet_slot

SCHEDULE_KEY = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_\w+|logvar)$")
EMA_PREFIX = "model_ema."


@dataclass(frozen=True)
class InputLayout:
    """One input's header: key -> (torch dtype or None, shape)."""

    label: str  # "A (path)" for messages
    tensors: Mapping[str, tuple[Optional[torch.dtype], tuple[int, ...]]]


@dataclass(frozen=True)
class Ratios:
    """The ratio settings one merge parameter (alpha or beta) is resolved from."""

    value: float
    unet: Optional[float] = None
    te: Optional[float] = None
    vae: Optional[float] = None
    blocks: Optional[Mapping[str, float]] = None

    def for_key(self, component: str, slot: Optional[str]) -> float:
        """The ratio of one key: component ratio, then its block weight, then the global value."""
        b = self.blocks
        if component == "unet":
            if b is not None and slot is not None:
                return b[slot]
            return self.value if self.unet is None else self.unet
        if component == "te":
            return self.te if self.te is not None else (b["BASE"] if b else self.value)
        if component == "vae":
            if self.vae is not None:
                return self.vae
            return b.get("VAE", b["BASE"]) if b else self.value
        if component == "ema":
            return self.value if self.unet is None else self.unet
        return self.value


@dataclass(frozen=True)
class KeyPlan:
    """What to do for one output key."""

    name: str
    action: str  # merge | copy | vae | reset_ids
    out_dtype: Optional[torch.dtype]  # None: keep the source dtype
    shape: tuple[int, ...]
    alpha: float = 0.0
    beta: Optional[float] = None
    channels: Optional[int] = None  # inpainting A: merge only the first `channels` input channels


@dataclass
class PlanReport:
    """Keys handled in a special way, for the result and the log."""

    kept_from_a: list[str] = field(default_factory=list)  # some input lacks them
    dropped: list[str] = field(default_factory=list)  # only in B or C
    pruned: list[str] = field(default_factory=list)
    position_ids: list[str] = field(default_factory=list)
    partial_channels: list[str] = field(default_factory=list)  # inpainting A: first channels merged
    vae_baked: int = 0


def component_of(key: str, family: str) -> str:
    """unet | te | vae | ema | other."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith(EMA_PREFIX):
        return "ema"
    for name, prefix in COMPONENT_PREFIXES[family].items():
        if name.startswith("text_encoder") and key.startswith(prefix):
            return "te"
    if family == "sd1" and key.startswith("cond_stage_model."):  # very old SD1 saves without text_model.
        return "te"
    return "other"


def _partial_channels(key: str, a_shape: tuple[int, ...], others: Sequence[tuple[int, ...]], labels: Sequence[str]
                      ) -> int:
    """Channels to merge when A is an inpainting / instruct-pix2pix model and the others are not (as A1111)."""
    for shape, label in zip(others, labels):
        same_rest = len(shape) == len(a_shape) >= 2 and shape[0] == a_shape[0] and shape[2:] == a_shape[2:]
        if not same_rest:
            break
        if shape[1] > a_shape[1]:
            raise SdtuneError(f"{key}: {label} has {shape[1]} input channels and A has {a_shape[1]}; when merging an "
                              f"inpainting or instruct-pix2pix model with a normal one, the special model must be A")
    else:
        if all(s[1] == others[0][1] for s in others):
            return others[0][1]
    shapes = ", ".join(f"{lab} {list(s)}" for lab, s in zip(labels, others))
    raise SdtuneError(f"{key}: shapes differ (A {list(a_shape)}, {shapes}); these files are not the same model "
                      f"layout and cannot be merged")


def build_plan(inputs: Sequence[InputLayout], family: str, alpha: Ratios, beta: Optional[Ratios],
               out_dtype: torch.dtype, *, prune_ema: bool = False, prune_schedule: bool = False,
               position_ids: str = "keep",
               vae_keys: Optional[Mapping[str, tuple[Optional[torch.dtype], tuple[int, ...]]]] = None,
               vae_label: str = "VAE") -> tuple[list[KeyPlan], PlanReport]:
    """Plan every output key (in A's order); `vae_keys` maps A's first_stage_model.* keys to the VAE file's."""
    a, others = inputs[0], inputs[1:]
    layout = layout_for(family)
    report = PlanReport()
    plans: list[KeyPlan] = []
    for name, (dtype, shape) in a.tensors.items():
        if (prune_ema and name.startswith(EMA_PREFIX)) or (prune_schedule and SCHEDULE_KEY.match(name)):
            report.pruned.append(name)
            continue
        floating = dtype is not None and dtype.is_floating_point
        if name.endswith(".position_ids"):
            report.position_ids.append(name)
            action = "reset_ids" if position_ids == "reset" else "copy"
            plans.append(KeyPlan(name, action, torch.int64 if action == "reset_ids" else None, shape))
            continue
        if not floating:
            plans.append(KeyPlan(name, "copy", None, shape))
            continue
        if SCHEDULE_KEY.match(name) or "model" not in name:  # not a weight (A1111 merges only "model" keys)
            plans.append(KeyPlan(name, "copy", None, shape))
            continue
        if vae_keys is not None and name in vae_keys:
            v_dtype, v_shape = vae_keys[name]
            if v_shape != shape:
                raise SdtuneError(f"{vae_label}: {name} is {list(v_shape)} there but {list(shape)} in A; "
                                  f"this VAE does not fit the model")
            plans.append(KeyPlan(name, "vae", out_dtype, shape))
            report.vae_baked += 1
            continue
        if any(name not in o.tensors for o in others):
            report.kept_from_a.append(name)
            plans.append(KeyPlan(name, "copy", out_dtype, shape))
            continue
        other_shapes = [o.tensors[name][1] for o in others]
        channels = None
        if any(s != shape for s in other_shapes):
            channels = _partial_channels(name, shape, other_shapes, [o.label for o in others])
            report.partial_channels.append(name)
        component = component_of(name, family)
        slot = unet_slot(name, layout) if component == "unet" else None
        plans.append(KeyPlan(name, "merge", out_dtype, shape, alpha=alpha.for_key(component, slot),
                             beta=beta.for_key(component, slot) if beta is not None else None, channels=channels))
    seen = set(a.tensors)
    for o in others:
        for name in o.tensors:
            if name not in seen:
                seen.add(name)
                report.dropped.append(name)
    return plans, report
