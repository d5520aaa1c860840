"""Text and size conditioning for the U-Net, as sd-scripts computes it while training.

SD1.x/SD2.x: the text encoder's last hidden state (with `clip_skip` N: the N-th from last, then the
final layer norm, as A1111 and sd-scripts do). SDXL: TE1 and TE2 penultimate hidden states
concatenated (768 + 1280 = 2048 wide), TE2's projected pooled output, and the six size/crop numbers
`(original h, w, crop top, left, target h, w)`. `max_token_length` 150/225 encodes 75-token chunks
separately and joins them with one BOS first and one EOS last (sd-scripts `get_hidden_states`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["TextEncoders", "Conditioning", "CachedTextEncoding", "encode_text", "size_conditioning"]

CHUNK = 75  # tokens per chunk between BOS and EOS


@dataclass
class TextEncoders:
    """The text encoders of one model with their tokenizers (one for SD1/SD2, two for SDXL)."""

    family: str
    encoders: list[nn.Module]
    tokenizers: list


@dataclass
class Conditioning:
    """U-Net inputs that come from the captions (and, for SDXL, the image sizes)."""

    hidden_states: torch.Tensor  # B, tokens, width
    pooled: Optional[torch.Tensor] = None  # SDXL: B, 1280
    time_ids: Optional[torch.Tensor] = None  # SDXL: B, 6


def _tokens(tokenizer, captions: Sequence[str], max_length: int) -> torch.Tensor:
    """Ids [B, max_length + 2]: BOS, caption tokens (truncated), EOS, padding."""
    out = tokenizer(list(captions), padding="max_length", max_length=max_length + 2, truncation=True,
                    return_tensors="pt")
    return out["input_ids"].long()


def _chunks(ids: torch.Tensor, tokenizer) -> list[torch.Tensor]:
    """Split [B, 2 + 75n] ids into n [B, 77] chunks with their own BOS and end token (sd-scripts' rules).

    CLIP-L (pad = EOS): every chunk ends with EOS. OpenCLIP (pad 0): a chunk ends with EOS only if its text
    runs to the end of the chunk, else with padding, and a chunk that starts in the padding starts with EOS.
    """
    n = (ids.shape[1] - 2) // CHUNK
    if n == 1:
        return [ids]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunks = []
    for i in range(n):
        inner = ids[:, 1 + i * CHUNK: 1 + (i + 1) * CHUNK].clone()
        last = torch.full_like(ids[:, :1], eos)
        if pad != eos:
            ends_early = (inner[:, -1] == eos) | (inner[:, -1] == pad)
            last[ends_early] = pad
            inner[inner[:, 0] == pad, 0] = eos
        chunks.append(torch.cat([torch.full_like(ids[:, :1], bos), inner, last], dim=1))
    return chunks


def _join(states: list[torch.Tensor]) -> torch.Tensor:
    """Chunk states -> one sequence: the first chunk's BOS, every chunk's 75 inner states, the last EOS."""
    if len(states) == 1:
        return states[0]
    inner = [s[:, 1:-1] for s in states]
    return torch.cat([states[0][:, :1], *inner, states[-1][:, -1:]], dim=1)


def _encoder_states(encoder: nn.Module, ids: torch.Tensor, layer: Optional[int], final_norm: bool
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hidden states of `layer` counted from the end, or the last; pooled projection if the model has one)."""
    out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=layer is not None)
    if layer is None:
        states = out.last_hidden_state
    else:
        states = out.hidden_states[-layer]
        if final_norm:
            text_model = getattr(encoder, "text_model", encoder)
            states = text_model.final_layer_norm(states)
    pooled = getattr(out, "text_embeds", None)
    return states, pooled


def encode_text(te: TextEncoders, captions: Sequence[str], clip_skip: Optional[int] = None,
                max_token_length: Optional[int] = None) -> Conditioning:
    """Encode captions for the U-Net (gradients flow when the encoders are trained)."""
    length = max_token_length or CHUNK
    if te.family.startswith("sdxl"):
        states, pooled = [], None
        for i, (enc, tok) in enumerate(zip(te.encoders, te.tokenizers)):
            chunk_states = []
            for chunk in _chunks(_tokens(tok, captions, length), tok):
                s, p = _encoder_states(enc, chunk, 2, final_norm=False)  # penultimate layer, no final norm
                chunk_states.append(s)
                if i == len(te.encoders) - 1 and pooled is None:
                    pooled = p  # TE2's pooled output of the first chunk, as sd-scripts
            states.append(_join(chunk_states))
        return Conditioning(torch.cat(states, dim=-1), pooled=pooled)
    enc, tok = te.encoders[0], te.tokenizers[0]
    layer = clip_skip if clip_skip and clip_skip > 1 else None
    parts = [_encoder_states(enc, chunk, layer, final_norm=True)[0]
             for chunk in _chunks(_tokens(tok, captions, length), tok)]
    return Conditioning(_join(parts))


def size_conditioning(original_sizes_hw: Sequence[tuple[int, int]], crop_top_lefts: Sequence[tuple[int, int]],
                      target_sizes_hw: Sequence[tuple[int, int]]) -> torch.Tensor:
    """SDXL's `time_ids` [B, 6]: original (h, w), crop (top, left), target (h, w) per sample."""
    rows = [[*o, *c, *t] for o, c, t in zip(original_sizes_hw, crop_top_lefts, target_sizes_hw)]
    return torch.tensor(rows, dtype=torch.float32)


class CachedTextEncoding:
    """Frozen text encoders and fixed captions: each caption is encoded once and kept (CPU) for the run.

    Used only when `data.te_cache.text_encoder_cache_refusal` allows it (sd-scripts' rule for
    `cache_text_encoder_outputs`): nothing trains the encoders and no caption changes between steps.
    """

    def __init__(self) -> None:
        self._rows: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    @torch.no_grad()
    def encode(self, te: TextEncoders, captions: Sequence[str], clip_skip: Optional[int] = None,
               max_token_length: Optional[int] = None) -> Conditioning:
        todo = list(dict.fromkeys(c for c in captions if c not in self._rows))
        if todo:
            fresh = encode_text(te, todo, clip_skip, max_token_length)
            for i, caption in enumerate(todo):
                pooled = None if fresh.pooled is None else fresh.pooled[i].cpu()
                self._rows[caption] = (fresh.hidden_states[i].cpu(), pooled)
        rows = [self._rows[c] for c in captions]
        pooled_rows = [r[1] for r in rows]
        pooled = None if pooled_rows[0] is None else torch.stack(pooled_rows)  # type: ignore[arg-type]
        return Conditioning(torch.stack([r[0] for r in rows]), pooled=pooled)
