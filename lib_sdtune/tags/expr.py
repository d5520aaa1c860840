"""A tiny tag-expression language for selecting images: `blue hair AND NOT (hat OR "cap (headwear)")`.

Grammar (operators are upper-case words or symbols, so lower-case "and"/"or"/"not" stay tag words)::

    expr   := term (("OR" | "|") term)*
    term   := factor (("AND" | "&")? factor)*      adjacent factors are ANDed
    factor := ("NOT" | "!") factor | "(" expr ")" | TAG
    TAG    := "quoted text" | words...              consecutive bare words form one tag: blue hair

A tag containing `*` is a wildcard (`*hair` matches `blue hair`); quote a tag to use parentheses,
commas or operator words in it; `\\(` and `\\)` in a bare tag are literal parentheses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Collection, Union

from ..errors import SdtuneError

_OPS = {"AND": "&", "&": "&", "OR": "|", "|": "|", "NOT": "!", "!": "!"}


@dataclass(frozen=True)
class Tag:
    """Matches images that have this exact tag (or any tag matching it, when it holds `*`)."""

    name: str
    _rx: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Compile a wildcard once, not per image."""
        if "*" in self.name:
            rx = re.compile(".*".join(re.escape(p) for p in self.name.split("*")) + r"\Z", re.DOTALL)
            object.__setattr__(self, "_rx", rx)

    def matches(self, tags: Collection[str]) -> bool:
        """True when the image's tags satisfy this node."""
        if self._rx is None:
            return self.name in tags
        return any(self._rx.match(t) for t in tags)

    def __str__(self) -> str:
        return f'"{self.name}"'


@dataclass(frozen=True)
class Not:
    """Negation."""

    inner: Expr

    def matches(self, tags: Collection[str]) -> bool:
        """True when the inner expression does not match."""
        return not self.inner.matches(tags)

    def __str__(self) -> str:
        return f"NOT {self.inner}"


@dataclass(frozen=True)
class And:
    """Every part must match."""

    parts: tuple[Expr, ...]

    def matches(self, tags: Collection[str]) -> bool:
        """True when all parts match."""
        return all(p.matches(tags) for p in self.parts)

    def __str__(self) -> str:
        return "(" + " AND ".join(map(str, self.parts)) + ")"


@dataclass(frozen=True)
class Or:
    """Any part may match."""

    parts: tuple[Expr, ...]

    def matches(self, tags: Collection[str]) -> bool:
        """True when any part matches."""
        return any(p.matches(tags) for p in self.parts)

    def __str__(self) -> str:
        return "(" + " OR ".join(map(str, self.parts)) + ")"


Expr = Union[Tag, Not, And, Or]


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, value, column) tokens; kinds: op, lparen, rparen, word, quoted."""
    out: list[tuple[str, str, int]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "()":
            out.append(("lparen" if c == "(" else "rparen", c, i))
            i += 1
        elif c in "&|!":
            out.append(("op", _OPS[c], i))
            i += 1
        elif c == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise SdtuneError(f"tag expression {text!r}: the quote at column {i + 1} is never closed")
            out.append(("quoted", text[i + 1:end], i))
            i = end + 1
        else:
            j, word = i, []
            while j < n and not text[j].isspace() and text[j] not in '()&|!"':
                if text[j] == "\\" and j + 1 < n and text[j + 1] in "()":
                    word.append(text[j + 1])
                    j += 2
                else:
                    word.append(text[j])
                    j += 1
            value = "".join(word)
            out.append(("op", _OPS[value], i) if value in ("AND", "OR", "NOT") else ("word", value, i))
            i = j
    return out


class _Parser:
    """Recursive descent over the token list."""

    def __init__(self, text: str):
        self.text = text
        self.toks = _tokens(text)
        self.pos = 0

    def error(self, what: str) -> SdtuneError:
        col = self.toks[self.pos][2] + 1 if self.pos < len(self.toks) else len(self.text) + 1
        return SdtuneError(f"tag expression {self.text!r}: {what} at column {col}. Example of a valid one: "
                           f'blue hair AND NOT (hat OR "cap (headwear)")')

    def peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def parse(self) -> Expr:
        if not self.toks:
            raise self.error("the expression is empty")
        node = self.expr()
        if self.peek() is not None:
            raise self.error("unexpected " + repr(self.peek()[1]))
        return node

    def expr(self) -> Expr:
        parts = [self.term()]
        while (tok := self.peek()) and tok[:2] == ("op", "|"):
            self.pos += 1
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def term(self) -> Expr:
        parts = [self.factor()]
        while (tok := self.peek()) and tok[0] != "rparen" and tok[:2] != ("op", "|"):
            if tok[:2] == ("op", "&"):
                self.pos += 1
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def factor(self) -> Expr:
        tok = self.peek()
        if tok is None:
            raise self.error("a tag is missing")
        kind, value, _ = tok
        if kind == "op" and value == "!":
            self.pos += 1
            return Not(self.factor())
        if kind == "lparen":
            self.pos += 1
            node = self.expr()
            if (close := self.peek()) is None or close[0] != "rparen":
                raise self.error('a closing ")" is missing')
            self.pos += 1
            return node
        if kind == "quoted":
            self.pos += 1
            return Tag(value.strip())
        if kind == "word":
            words = []
            while (t := self.peek()) and t[0] == "word":
                words.append(t[1])
                self.pos += 1
            return Tag(" ".join(words))
        raise self.error(f"expected a tag, found {value!r}")


def parse_expression(text: str) -> Expr:
    """Parse a selection expression; raises SdtuneError naming the column of the problem."""
    return _Parser(text).parse()
