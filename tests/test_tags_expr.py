"""The tag-expression parser: precedence, multi-word tags, quoting, wildcards and error messages."""

import pytest

from lib_sdtune.errors import SdtuneError
from lib_sdtune.tags.expr import And, Not, Or, Tag, parse_expression


def m(expr: str, *tags: str) -> bool:
    return parse_expression(expr).matches(set(tags))


def test_multi_word_tags_and_precedence():
    e = parse_expression("blue hair AND NOT red eyes OR solo")
    assert e == Or((And((Tag("blue hair"), Not(Tag("red eyes")))), Tag("solo")))
    assert m("blue hair AND NOT red eyes OR solo", "blue hair")
    assert not m("blue hair AND NOT red eyes OR solo", "blue hair", "red eyes")
    assert m("blue hair AND NOT red eyes OR solo", "red eyes", "solo")


def test_parentheses_symbols_and_implicit_and():
    assert m("a & (b | c)", "a", "c") and not m("a & (b | c)", "a")
    assert m("!a", "b") and not m("!a", "a")
    assert m('"x" (y OR z)', "x", "z") and not m('"x" (y OR z)', "x")
    assert m("NOT (a OR b) AND c", "c") and not m("NOT (a OR b) AND c", "a", "c")


def test_lower_case_operator_words_are_tag_words():
    assert m("black and white", "black and white")
    assert not m("black and white", "black", "white")


def test_quotes_and_escaped_parens_name_tags_with_parentheses():
    assert m('"hatsune miku (vocaloid)"', "hatsune miku (vocaloid)")
    assert m(r"hatsune miku \(vocaloid\)", "hatsune miku (vocaloid)")
    assert m('"AND"', "AND")


def test_wildcards():
    assert m("*hair", "long hair") and not m("*hair", "hairband")
    assert m("blue*", "blue eyes") and m("a*b", "a-x-b") and not m("a*b", "a-x-bc")


@pytest.mark.parametrize("bad, where", [("", "empty"), ("a AND", "missing"), ("(a OR b", '")"'),
                                        ("a OR OR b", "expected a tag"), ('"open', "never closed"),
                                        ("a )", "unexpected")])
def test_errors_name_the_problem(bad, where):
    with pytest.raises(SdtuneError) as e:
        parse_expression(bad)
    assert where in str(e.value) and "column" in str(e.value) or "never closed" in str(e.value)
