"""The caption of one image at one step, in sd-scripts' order (`BaseDataset.process_caption`).

1. prefix + " " + caption + " " + suffix; 2. whole-caption dropout (by rate, or every n-th epoch);
3. wildcards / first line; 4. if shuffling, warm-up or tag dropout is on: split into tags, keep the
fixed ones (`keep_tokens` tags, or the part before `keep_tokens_separator`), warm-up, shuffle the rest,
drop tags, re-join with ", "; 5. `secondary_separator` -> `caption_separator`; 6. replacements.
All randomness comes from the `random.Random` passed in, so a seeded run repeats exactly.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from .config import SubsetConfig

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionStep:
    """Where training is: `epoch` is 1-based as sd-scripts passes it; `step` counts optimizer steps from 0."""

    epoch: int = 1
    step: int = 0
    max_train_steps: int = 0


def warmup_steps(subset: SubsetConfig, max_train_steps: int) -> int:
    """`token_warmup_step` in steps (a value below 1 is a fraction of `max_train_steps`)."""
    if subset.token_warmup_step < 1:
        return math.floor(subset.token_warmup_step * max_train_steps)
    return int(subset.token_warmup_step)


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """One random line of a multi-line caption, then `{a|b|c}` -> one choice; `{{`/`}}` stay literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "⦅", "⦆"
    while open_mark in caption or close_mark in caption:
        open_mark += "⦅"
        close_mark += "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tags(caption: str, subset: SubsetConfig) -> tuple[list[str], list[str], list[str]]:
    """(fixed, flexible, fixed suffix) tags, as sd-scripts splits them."""
    sep, keep_sep = subset.caption_separator, subset.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        fixed_part, flex_part = caption.split(keep_sep, 1)
        suffix: list[str] = []
        if keep_sep in flex_part:
            flex_part, suffix_part = flex_part.split(keep_sep, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        return fixed, flex, suffix
    tokens = [t.strip() for t in caption.strip().split(sep)]
    if subset.keep_tokens > 0:
        return tokens[: subset.keep_tokens], tokens[subset.keep_tokens:], []
    return [], tokens, []


def process_caption(caption: str, subset: SubsetConfig, rng: random.Random, at: CaptionStep = CaptionStep(),
                    replacements: Optional[Mapping[str, Union[str, Sequence[str]]]] = None) -> str:
    """The caption the text encoder sees for this image at this step (sd-scripts' exact order of operations)."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    drop = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    drop = drop or (subset.caption_dropout_every_n_epochs > 0 and at.epoch % subset.caption_dropout_every_n_epochs == 0)
    if drop:
        return ""
    if subset.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]
    warmup = warmup_steps(subset, at.max_train_steps)
    if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
        fixed, flex, suffix = _split_tags(caption, subset)
        if warmup and at.step < warmup:
            n = math.floor(at.step * ((len(flex) - subset.token_warmup_min) / warmup)) + subset.token_warmup_min
            flex = flex[:n]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    for old, new in (replacements or {}).items():
        if old == "":
            caption = rng.choice(list(new)) if not isinstance(new, str) else new
        else:
            caption = caption.replace(old, new if isinstance(new, str) else rng.choice(list(new)))
    return caption


def captions_are_fixed(subsets: Sequence[SubsetConfig]) -> bool:
    """True when every step sees the same caption per image, so text-encoder outputs can be cached
    (sd-scripts' `is_text_encoder_output_cacheable`)."""
    return all(not (s.caption_dropout_rate > 0 or s.shuffle_caption or s.token_warmup_step > 0
                    or s.caption_tag_dropout_rate > 0 or s.caption_dropout_every_n_epochs > 0 or s.enable_wildcard)
               for s in subsets)
