"""Parse captions of the world grammar back into a PromptSpec, and list the grammar's words.

A hand-written recursive-descent parser: the grammar is a dozen fixed phrases (docs/world.md).
"""

from __future__ import annotations

from collections.abc import Mapping

from relaydiff.world.scene import ObjSpec, PromptSpec, Relation
from relaydiff.world.vocab import (
    BACKGROUNDS,
    PALETTE,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
)

_POSITION_BY_WORDS = {tuple(p.split()): name for name, p in POSITION_PHRASES.items()}
_RELATION_WORDS = [tuple(r.split()) for r in RELATIONS]


class _Tokens:
    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.split()
        self.i = 0

    def fail(self, why: str) -> ValueError:
        return ValueError(f"prompt {self.text!r} is outside the world grammar: {why}")

    def peek(self, n: int = 1) -> tuple[str, ...]:
        return tuple(self.words[self.i : self.i + n])

    def take(self, choices: Mapping[str, object] | tuple[str, ...], what: str) -> str:
        if self.i >= len(self.words):
            raise self.fail(f"expected {what} at the end")
        w = self.words[self.i]
        if w not in choices:
            raise self.fail(f"expected {what}, got {w!r} (word {self.i + 1})")
        self.i += 1
        return w

    def expect(self, *words: str) -> None:
        for w in words:
            self.take((w,), repr(w))

    def take_phrase(self, options: list[tuple[str, ...]], what: str) -> tuple[str, ...]:
        for opt in sorted(options, key=len, reverse=True):
            if self.peek(len(opt)) == opt:
                self.i += len(opt)
                return opt
        got = " ".join(self.peek(2)) or "the end"
        raise self.fail(f"expected {what}, got {got!r} (word {self.i + 1})")


def _noun_phrase(t: _Tokens) -> ObjSpec:
    t.expect("a")
    size = t.take(SIZES, "a size")
    colour = t.take(PALETTE, "a colour")
    shape = t.take(SHAPES, "a shape")
    return ObjSpec(shape=shape, colour=colour, size=size)


def _relation(t: _Tokens) -> str:
    return " ".join(t.take_phrase(_RELATION_WORDS, f"a relation {RELATIONS}"))


def parse_prompt(text: str) -> PromptSpec:
    """Parse a caption of the world grammar into what it asks for.

    Args:
        text: a caption; words are separated by whitespace, case and surrounding space ignored.
    Raises:
        ValueError: quoting ``text``, when it is not a sentence of the grammar or names two
            objects with the same (colour, shape).
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    t = _Tokens(text.strip().lower())
    t.text = text  # quote the caller's text verbatim
    objects = [_noun_phrase(t)]
    position = None
    relations: list[Relation] = []
    if any(t.peek(len(p)) == p for p in _POSITION_BY_WORDS):
        position = _POSITION_BY_WORDS[t.take_phrase(list(_POSITION_BY_WORDS), "a position")]
    else:
        if t.i >= len(t.words):
            raise t.fail("a single object needs a position")
        rel = _relation(t)
        objects.append(_noun_phrase(t))
        relations.append(Relation(0, rel, 1))
        if t.peek() == ("and",):
            t.expect("and")
            objects.append(_noun_phrase(t))
            relations.append(Relation(2, _relation(t), 1))
            t.expect("it")
    background = None
    if t.peek() == ("on",):
        t.expect("on", "a")
        background = t.take(BACKGROUNDS, "a background colour")
        t.expect("background")
    if t.i != len(t.words):
        raise t.fail(f"unexpected {t.words[t.i]!r} (word {t.i + 1})")
    try:
        return PromptSpec(tuple(objects), background, position, tuple(relations))
    except ValueError as e:
        raise t.fail(str(e)) from None


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted (for building a tokenizer)."""
    words = {"a", "and", "it", "on", "background"}
    words.update(SIZES, PALETTE, SHAPES, BACKGROUNDS)
    for phrase in (*POSITION_PHRASES.values(), *RELATIONS):
        words.update(phrase.split())
    return sorted(words)
