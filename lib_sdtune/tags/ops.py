"""Batch tag operations: small typed dataclasses, each a pure function of one image's tag list.

`apply_ops` runs a list of them over the selected images of a store and returns only the tag lists
that changed; it writes nothing (the editing session does that, with backup and undo).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence, Union

from ..errors import SdtuneError
from .expr import parse_expression
from .store import CaptionStore
from .text import (
    escape_parens,
    spaces_to_underscores,
    split_tags,
    underscores_to_spaces,
    unescape_parens,
)


@dataclass(frozen=True)
class OpContext:
    """Dataset-wide facts an op may need: tag frequency (images per tag) before the edit."""

    frequency: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class AddTag:
    """Add `tag` at the front (a trigger word: moved there if present) or at the end (kept where it is if present)."""

    tag: str
    position: str = "front"  # "front" | "end"

    def __post_init__(self) -> None:
        """Validate the position and the tag."""
        if self.position not in ("front", "end"):
            raise SdtuneError(f"add tag: position {self.position!r} must be 'front' or 'end'")
        _check_tag(self.tag, "add tag")

    def apply(self, tags: list[str], ctx: OpContext) -> list[str]:
        """The tags with this one added."""
        if self.position == "front":
            return [self.tag] + [t for t in tags if t != self.tag]
        return tags if self.tag in tags else tags + [self.tag]


@dataclass(frozen=True)
class RemoveTag:
    """Remove a tag (every occurrence); with `regex`, every tag the pattern fully matches."""

    tag: str
    regex: bool = False

    def apply(self, tags: list[str], ctx: OpContext) -> list[str]:
        """The tags without this one."""
        if self.regex:
            rx = _compile(self.tag)
            return [t for t in tags if not rx.fullmatch(t)]
        return [t for t in tags if t != self.tag]


@dataclass(frozen=True)
class ReplaceTag:
    """Replace a tag by another (exact), or rewrite each tag with `re.sub` (regex); commas in `new` split tags.

    An empty result removes the tag; replacing across the whole dataset is a rename.
    """

    old: str
    new: str
    regex: bool = False

    def apply(self, tags: list[str], ctx: OpContext) -> list[str]:
        """The tags with replacements made."""
        out: list[str] = []
        if self.regex:
            rx = _compile(self.old)
            for t in tags:
                out += split_tags(rx.sub(self.new, t)) if rx.search(t) else [t]
            return out
        repl = split_tags(self.new)
        for t in tags:
            out += repl if t == self.old else [t]
        return out


@dataclass(frozen=True)
class Dedupe:
    """Drop repeated tags, keeping the first occurrence."""

    def apply(self, tags: list[str], ctx: OpContext) -> list[str]:
        """The tags without repeats."""
        return list(dict.fromkeys(tags))


@dataclass(frozen=True)
class SortTags:
    """Sort tags alphabetically or by dataset frequency (most common first), keeping the first `keep_first` fixed."""

    by: str = "alpha"  # "alpha" | "frequency"
    keep_first: int = 0

    def __post_init__(self) -> None:
        """Validate the sort key."""
        if self.by not in ("alpha", "frequency") or self.keep_first < 0:
            raise SdtuneError(f"sort tags: by={self.by!r} must be 'alpha' or 'frequency', keep_first >= 0")

    def apply(self, tags: list[str], ctx: OpContext) -> list[str]:
        """The tags sorted after the fixed head."""
        head, rest = tags[:self.keep_first], tags[self.keep_first:]
        if self.by == "alpha":
            return head + sorted(rest, key=lambda t: (t.casefold(), t))
        return head + sorted(rest, key=lambda t: (-ctx.frequency[t], t.casefold(), t))


@dataclass(frozen=True)
class Underscores:
    """Convert `long_hair` -> `long hair` (to="spaces", kaomojis kept) or back (to="underscores")."""

    to: str = "spaces"

    def __post_init__(self) -> None:
        """Validate the direction."""
        if self.to not in ("spaces", "underscores"):
            raise SdtuneError(f"underscores: to={self.to!r} must be 'spaces' or 'underscores'")

    def apply(self, tags: list[str], ctx: OpContext) -> list[str]:
        """The converted tags."""
        fn = underscores_to_spaces if self.to == "spaces" else spaces_to_underscores
        return [fn(t) for t in tags]


@dataclass(frozen=True)
class EscapeParens:
    """Escape `(` `)` as `\\(` `\\)` for A1111 prompts, or undo that (`unescape=True`)."""

    unescape: bool = False

    def apply(self, tags: list[str], ctx: OpContext) -> list[str]:
        """The escaped (or unescaped) tags."""
        fn = unescape_parens if self.unescape else escape_parens
        return [fn(t) for t in tags]


TagOp = Union[AddTag, RemoveTag, ReplaceTag, Dedupe, SortTags, Underscores, EscapeParens]


def _check_tag(tag: str, what: str) -> None:
    """A tag to add must be one non-empty tag (no commas or newlines)."""
    if split_tags(tag) != [tag]:
        raise SdtuneError(f"{what}: {tag!r} is not a single tag (empty, edge spaces, commas or newlines)")


def _compile(pattern: str) -> re.Pattern:
    """Compile a user regex, reporting a bad one by its text."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise SdtuneError(f"regular expression {pattern!r}: {e}") from e


def tag_frequency(store: CaptionStore) -> Counter:
    """Number of images carrying each tag."""
    freq: Counter = Counter()
    for it in store.items:
        freq.update(set(it.tags))
    return freq


def select(store: CaptionStore, where: str | None = None, indices: Sequence[int] | None = None) -> list[int]:
    """Indices of items matching an expression (all when None), within `indices` if given; unreadable ones skipped."""
    expr = parse_expression(where) if where and where.strip() else None
    pool = range(len(store.items)) if indices is None else indices
    items = store.items
    return [i for i in pool if not items[i].error and (expr is None or expr.matches(set(items[i].tags)))]


def apply_ops(store: CaptionStore, ops: Sequence[TagOp], selection: Sequence[int]) -> dict[int, list[str]]:
    """New tag lists of the selected items that the ops change (nothing is written)."""
    if not ops:
        raise SdtuneError("no tag operation given: add, remove, replace, dedupe, sort, underscores or escape")
    needs_freq = any(isinstance(op, SortTags) and op.by == "frequency" for op in ops)
    ctx = OpContext(tag_frequency(store) if needs_freq else Counter())
    changed: dict[int, list[str]] = {}
    for i in selection:
        old = store.items[i].tags
        new = list(old)
        for op in ops:
            new = op.apply(new, ctx)
        if new != old:
            changed[i] = new
    return changed
