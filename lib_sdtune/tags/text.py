"""Caption text <-> tag lists: split, join, underscores/spaces, A1111 parenthesis escaping."""

from __future__ import annotations

import re
from typing import Iterable

SEPARATOR = ", "
# Emoticons whose underscore is part of the face; the WD14 Space, taggui and the WebUI tagger keep them as is.
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})
_SPLIT = re.compile(r"[,\n\r]")
_UNESCAPED_PAREN = re.compile(r"(?<!\\)([()])")
_ESCAPED_PAREN = re.compile(r"\\([()])")


def split_tags(text: str) -> list[str]:
    """Tags of a caption: split on commas and newlines, stripped, empty ones dropped."""
    parts = _SPLIT.split(text) if ("\n" in text or "\r" in text) else text.split(",")
    return [t for t in map(str.strip, parts) if t]


def join_tags(tags: Iterable[str]) -> str:
    """The caption text for a tag list, joined as sd-scripts and the taggers write it."""
    return SEPARATOR.join(tags)


def underscores_to_spaces(tag: str) -> str:
    """`long_hair` -> `long hair`, leaving kaomojis such as `^_^` untouched."""
    return tag if tag in KAOMOJIS else tag.replace("_", " ")


def spaces_to_underscores(tag: str) -> str:
    """`long hair` -> `long_hair` (booru spelling)."""
    return tag.replace(" ", "_")


def escape_parens(tag: str) -> str:
    """`name (series)` -> `name \\(series\\)`, so A1111 reads the parentheses literally, not as weights."""
    return _UNESCAPED_PAREN.sub(r"\\\1", tag)


def unescape_parens(tag: str) -> str:
    """Undo `escape_parens`: `\\(` -> `(`."""
    return _ESCAPED_PAREN.sub(r"\1", tag)
