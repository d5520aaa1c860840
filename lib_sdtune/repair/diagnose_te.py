"""Text-encoder drift: the same prompts through the base and the tuned text encoder(s), compared token by token.

Prompts are tokenized as SD does (BOS, tokens, EOS, padding to the longest prompt) and encoded to the hidden
states the U-Net reads (SD1: last layer; SD2: the penultimate, as the loader builds it; SDXL: each encoder's
penultimate layer), each token state L2-normalised. A prompt's drift is the mean cosine, base vs tuned, over its
positions after BOS up to its EOS (BOS reads the same for every prompt). Its "bag" is the mean of those states;
tag similarity is the mean cosine between different tags' bags. A LoRA's text-encoder part is added into the
base encoders in memory and taken out again by re-reading the base weights (exact, no copy held). All in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import SdtuneError
from ..io.checkpoint import StateDictSource
from ..merge.lora_delta import LoraModuleParts
from ..networks.naming import LoraTarget

ENCODER_IDS = {"text_encoder": "1", "text_encoder_2": "2"}
_BATCH = 16


def encoder_label(family: str, component: str) -> str:
    """How reports name an encoder: "TE (CLIP-L)", "TE1 (CLIP-L)", "TE2 (OpenCLIP bigG)", ..."""
    if family == "sdxl":
        return "TE1 (CLIP-L)" if component == "text_encoder" else "TE2 (OpenCLIP bigG)"
    if family == "sdxl-refiner":
        return "TE (OpenCLIP bigG)"
    return "TE (OpenCLIP-H)" if family == "sd2" else "TE (CLIP-L)"


def tokenizer_for(family: str, component: str):
    """The offline CLIP tokenizer of an encoder (OpenCLIP pads with "!", CLIP-L with EOS)."""
    from ..models.tokenizer import TokenizerUnavailable, load_clip_tokenizer

    flavour = "open_clip" if family == "sd2" or component == "text_encoder_2" else "clip_l"
    try:
        return load_clip_tokenizer(flavour)
    except TokenizerUnavailable as e:
        raise SdtuneError(f"the text-encoder drift needs the CLIP tokenizer: {e}") from e


@dataclass
class Encoded:
    """Normalised token states [prompts, positions, width] and which positions count (after BOS, up to EOS)."""

    states: torch.Tensor
    mask: torch.Tensor  # [prompts, positions] bool

    def bags(self) -> torch.Tensor:
        """Each prompt's mean normalised state over its counted positions, normalised again [prompts, width]."""
        m = self.mask.unsqueeze(-1).float()
        return nn.functional.normalize((self.states * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


@torch.no_grad()
def encode(encoder: nn.Module, tokenizer, prompts: Sequence[str], family: str, device: str) -> Encoded:
    """Encode prompts (padded to the longest) to normalised hidden states, as the U-Net would read them."""
    from ..train.conditioning import _encoder_states

    ids = tokenizer(list(prompts), padding="longest", max_length=77, truncation=True,
                    return_tensors="pt")["input_ids"].long()
    eos = (ids == tokenizer.eos_token_id).int().argmax(dim=1)  # first EOS (CLIP-L also pads with EOS)
    positions = torch.arange(ids.shape[1])[None]
    mask = (positions >= 1) & (positions <= eos[:, None])
    layer = 2 if family.startswith("sdxl") else None  # SDXL: penultimate layer without the final norm
    chunks = []
    for i in range(0, len(prompts), _BATCH):
        states, _ = _encoder_states(encoder, ids[i:i + _BATCH].to(device), layer, final_norm=False)
        chunks.append(nn.functional.normalize(states.float().cpu(), dim=-1))
    return Encoded(torch.cat(chunks), mask)


def prompt_cosines(base: Encoded, tuned: Encoded) -> torch.Tensor:
    """Per prompt: mean cosine of its token states, base vs tuned [prompts]."""
    cos = (base.states * tuned.states).sum(-1)
    m = base.mask.float()
    return (cos * m).sum(1) / m.sum(1).clamp_min(1)


def bag_similarity(e: Encoded) -> float:
    """Mean cosine between the bags of different prompts (NaN with fewer than two prompts)."""
    bags = e.bags()
    n = bags.shape[0]
    if n < 2:
        return float("nan")
    sim = bags @ bags.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@dataclass
class EncoderDrift:
    """One text encoder, base vs tuned: per-prompt cosines, tag similarity before and after, weight change."""

    component: str  # text_encoder | text_encoder_2
    label: str
    controls: dict[str, float]  # control prompt -> cosine base vs tuned
    tags: dict[str, float]  # tag -> cosine base vs tuned
    similarity_base: float  # mean cosine between different tags (or control prompts) with the base encoder
    similarity_tuned: float
    collapse_over: str  # "tags" | "control prompts"
    weight_delta: Optional[float] = None  # ‖ΔW‖/‖W‖ over the encoder's weights
    scale_trials: dict[float, tuple[float, float]] = field(default_factory=dict)  # LoRA: scale -> (cosine, collapse)
    suggested_scale: Optional[float] = None  # LoRA: largest tried TE scale passing both thresholds (0.0: strip)

    @property
    def encoder(self) -> str:
        """"1" or "2", as `--te` names it."""
        return ENCODER_IDS[self.component]

    @property
    def control_cosine(self) -> float:
        return sum(self.controls.values()) / len(self.controls)

    @property
    def collapse(self) -> float:
        return collapse_share(self.similarity_base, self.similarity_tuned)

    def most_drifted(self, n: int = 10) -> list[tuple[str, float]]:
        """The tags whose reading changed most (lowest cosine first)."""
        return sorted(self.tags.items(), key=lambda kv: kv[1])[:n]

    def to_dict(self) -> dict:
        return {"component": self.component, "encoder": self.encoder, "label": self.label,
                "control_cosine": _r(self.control_cosine), "collapse": _r(self.collapse),
                "collapse_over": self.collapse_over, "similarity_base": _r(self.similarity_base),
                "similarity_tuned": _r(self.similarity_tuned), "weight_delta": _r(self.weight_delta),
                "most_drifted_tags": [{"tag": t, "cosine": _r(c)} for t, c in self.most_drifted()],
                "controls": {p: _r(c) for p, c in self.controls.items()},
                "tags": {t: _r(c) for t, c in self.tags.items()},
                "scale_trials": [{"scale": s, "control_cosine": _r(c), "collapse": _r(k)}
                                 for s, (c, k) in self.scale_trials.items()],
                "suggested_scale": self.suggested_scale}


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None or x != x else round(float(x), 6)


def collapse_share(base: float, tuned: float) -> float:
    """(tuned - base) / (1 - base): the share of the base's distinctness lost (0 unchanged, 1 all alike)."""
    if base != base or tuned != tuned or base >= 1.0:
        return 0.0
    return (tuned - base) / (1.0 - base)


@dataclass
class PromptSet:
    """The prompts of one diagnosis: controls, then tags; similarity is measured over the tags when there are two."""

    controls: Sequence[str]
    tags: Sequence[str]

    @property
    def all(self) -> list[str]:
        return [*self.controls, *self.tags]

    @property
    def collapse_over(self) -> str:
        return "tags" if len(self.tags) >= 2 else "control prompts"

    def split(self, e: Encoded) -> tuple[Encoded, Encoded]:
        """(controls, tags) parts of an encoding of `all`."""
        n = len(self.controls)
        return Encoded(e.states[:n], e.mask[:n]), Encoded(e.states[n:], e.mask[n:])

    def similarity(self, e: Encoded) -> float:
        controls, tags = self.split(e)
        return bag_similarity(tags if len(self.tags) >= 2 else controls)


def compare(component: str, label: str, prompts: PromptSet, base: Encoded, tuned: Encoded) -> EncoderDrift:
    """The drift of one encoder from its two encodings of `prompts.all`."""
    cos = prompt_cosines(base, tuned).tolist()
    n = len(prompts.controls)
    return EncoderDrift(component, label, dict(zip(prompts.controls, cos[:n])), dict(zip(prompts.tags, cos[n:])),
                        prompts.similarity(base), prompts.similarity(tuned), prompts.collapse_over)


class LoraTePatch:
    """A LoRA's text-encoder modules added into loaded base encoders; `restore()` re-reads the base weights."""

    def __init__(self, encoders: Mapping[str, nn.Module], parts: Sequence[tuple[LoraTarget, LoraModuleParts]],
                 base: StateDictSource, base_path: str):
        self.encoders = encoders
        self.parts = [(t, m) for t, m in parts if t.component in encoders]
        self.base, self.base_path = base, base_path
        self.applied = False

    def _layer(self, t: LoraTarget) -> nn.Module:
        return self.encoders[t.component].get_submodule(t.module_path)

    @torch.no_grad()
    def apply(self, strengths: Mapping[str, float]) -> None:
        """W += ΔW at the strength of each module's encoder (the base weights first, if applied before)."""
        self.restore()
        self.applied = True
        for t, m in self.parts:
            s = strengths.get(t.component, 0.0)
            if s == 0.0:
                continue
            layer = self._layer(t)
            w = layer.weight
            try:  # ΔW is built on the CPU from the file's tensors (DoRA also reads the base weight)
                delta = m.delta(w.detach().cpu() if m.dora else w, s)
            except SdtuneError as e:
                raise SdtuneError(f"{e} (base: {self.base_path})") from e
            w.add_(delta.reshape(w.shape).to(device=w.device, dtype=w.dtype))
            db = m.delta_bias(s)
            if db is not None and layer.bias is not None:
                layer.bias.add_(db.reshape(layer.bias.shape).to(layer.bias))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights of every touched layer back, bit for bit, from the base file."""
        if not self.applied:
            return
        for t, m in self.parts:
            layer = self._layer(t)
            layer.weight.copy_(_rows(t, self.base[t.original_key]).reshape(layer.weight.shape))
            if "diff_b" in m.parts and layer.bias is not None:
                bias_key = t.original_key.rsplit("weight", 1)[0] + "bias"
                layer.bias.copy_(_rows(t, self.base[bias_key]).reshape(layer.bias.shape))
        self.applied = False


def _rows(t: LoraTarget, tensor: torch.Tensor) -> torch.Tensor:
    """The rows of an original tensor a target reads (q, k or v of a fused OpenCLIP in_proj), else all."""
    if t.original_rows is None:
        return tensor
    return tensor[t.original_rows[0]:t.original_rows[1]]


def load_text_encoders(path: str, role: str, device: str, components: Sequence[str] = tuple(ENCODER_IDS)
                       ) -> dict[str, nn.Module]:
    """The text encoder(s) of a checkpoint (those of `components` it has) in fp32 on `device`."""
    from ..models.hints import ModelHints
    from ..models.loader import load_checkpoint

    loaded = load_checkpoint(path, components=list(components), hints=ModelHints(prediction_type="epsilon"),
                             dtype=torch.float32)
    missing = [k for k in loaded.report.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise SdtuneError(f"{role} {path}: its text encoder lacks {len(missing)} weights (e.g. {missing[0]})")
    return {name: m.to(device).eval() for name, m in loaded.modules.items()}


def encode_all(encoders: Mapping[str, nn.Module], family: str, prompts: PromptSet, device: str,
               step: Optional[Callable[[str], None]] = None) -> dict[str, Encoded]:
    """Every encoder's encoding of `prompts.all`."""
    out = {}
    for component, module in encoders.items():
        out[component] = encode(module, tokenizer_for(family, component), prompts.all, family, device)
        if step is not None:
            step(f"encoded {len(prompts.all)} prompts with {encoder_label(family, component)}")
    return out
