"""Text-encoder outputs cached per caption, for runs whose text encoders are frozen and captions fixed.

SDXL's two text encoders cost memory and time at every step; when they are not trained and each
image's caption never changes (no shuffle, dropout, warm-up or wildcards), their outputs can be
computed once. The trainer fills this store; it is keyed by the text encoders' identity and the
caption, in memory or as safetensors files in a folder (written atomically).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..errors import SdtuneError
from ..io.atomic import atomic_write
from .captions import captions_are_fixed
from .config import SubsetConfig

FORMAT = "sdtune-te-outputs-1"


def text_encoder_cache_refusal(subsets: Sequence[SubsetConfig], train_text_encoder: bool) -> Optional[str]:
    """Why text-encoder outputs cannot be cached for this run, or None when they can (sd-scripts' rule)."""
    if train_text_encoder:
        return "the text encoders are being trained, so their outputs change every step"
    if not captions_are_fixed(subsets):
        return ("captions change from step to step (shuffle_caption, caption or tag dropout, token warm-up or "
                "wildcards are on)")
    return None


class TextEncoderOutputCache:
    """caption -> named tensors (e.g. hidden_state1, hidden_state2, pool2) for one set of text encoders."""

    def __init__(self, encoder_id: str, folder: Optional[Path] = None):
        if not encoder_id:
            raise SdtuneError("a text-encoder output cache needs the encoders' identity (a hash of their weights)")
        self.encoder_id = encoder_id
        self.folder = Path(folder) if folder is not None else None
        self._mem: dict[str, dict[str, torch.Tensor]] = {}

    def key(self, caption: str) -> str:
        """The entry name of a caption (hash of the encoders' identity and the caption)."""
        return hashlib.sha256(f"{self.encoder_id}\0{caption}".encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def get(self, caption: str) -> Optional[dict[str, torch.Tensor]]:
        """The cached outputs for a caption, or None (also None for an entry made by other encoders)."""
        k = self.key(caption)
        if k in self._mem:
            return self._mem[k]
        if self.folder is None or not self._path(k).is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self._path(k)), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("encoder") != self.encoder_id or meta.get("caption") != caption:
                    return None
                return {name: f.get_tensor(name) for name in f.keys()}
        except Exception:  # a torn file is a miss, to be recomputed
            return None

    def put(self, caption: str, outputs: Mapping[str, torch.Tensor]) -> None:
        """Store one caption's outputs (on CPU)."""
        k = self.key(caption)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in outputs.items()}
        if self.folder is None:
            self._mem[k] = tensors
            return
        from safetensors.torch import save

        data = save(tensors, metadata={"format": FORMAT, "encoder": self.encoder_id, "caption": caption})
        with atomic_write(self._path(k)) as fh:
            fh.write(data)

    def missing(self, captions: Sequence[str]) -> list[str]:
        """The distinct captions that still need encoding, in first-seen order."""
        out, seen = [], set()
        for c in captions:
            if c not in seen:
                seen.add(c)
                if self.get(c) is None:
                    out.append(c)
        return out
