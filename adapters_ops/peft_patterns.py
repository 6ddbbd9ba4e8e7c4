r"""PEFT's rank_pattern / alpha_pattern rule, one implementation for the hub's
upload validation and the library's `Adapter.scaling`.

PEFT looks a module up as the regex `re.match(rf"(.*\.)?({key})$", module)`
(get_pattern_key in peft.utils.other) and takes the first key that matches.
A key is thus code every PEFT user runs, and `(.|.){0,25}z` backtracks for
seconds per module (25 s in the security review). The forms people write are
parsed here and matched in linear time, with PEFT's result
(tests/registry/test_upload_hardening.py checks it against PEFT's own
function); the hub accepts only those forms. The library also reads adapters
made elsewhere: for another key it runs PEFT's regex itself (`allow_regex`).

Standard library only: the web process imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

MAX_PATTERN_CHARS = 256


class UnsupportedKey(ValueError):
    """A key outside PATTERN_KEY_FORMS."""


PATTERN_KEY_FORMS = (
    "module names or dotted suffixes of them (q_proj, model.layers.0.self_attn.q_proj), "
    "alternatives joined by | (q_proj|v_proj), each optionally starting with ^ and ending with $, "
    "made of letters, digits, _ and -, escaped dots \\., the classes [0-9] and \\d, the wildcard ., "
    "and at most one * or + per alternative (layers\\.[0-9]+\\.mlp\\.down_proj)"
)
# A literal character, \. (a dot), \d (a Unicode digit, as in re), [0-9], or . (any character but \n).
_ATOM = re.compile(r"[A-Za-z0-9_-]|\\[.d]|\[0-9\]|\.")
_ANY, _DOT, _DIGIT, _ASCII_DIGIT = ".", r"\.", r"\d", "[0-9]"


@dataclass(frozen=True)
class _Alternative:
    """One alternative of a key: head, then any number of `star` atoms (none: a
    fixed-length alternative), then tail; `anchored` (^): no dotted prefix allowed."""
    anchored: bool
    head: tuple[str, ...]
    star: str | None = None
    tail: tuple[str, ...] = ()


@lru_cache(maxsize=1024)
def parse_pattern_key(key: str) -> tuple[_Alternative, ...] | None:
    """The alternatives of an accepted rank_pattern / alpha_pattern key, None for any other form."""
    if len(key) > MAX_PATTERN_CHARS:
        return None
    out = []
    for text in key.split("|"):
        anchored = text.startswith("^")
        body = text[anchored:].removesuffix("$")
        head, tail, star, pos = [], [], None, 0
        while pos < len(body):
            m = _ATOM.match(body, pos)
            if m is None:
                return None
            atom, pos = m[0], m.end()
            quantifier = body[pos] if pos < len(body) and body[pos] in "*+" else ""
            if quantifier and star is not None:
                return None
            pos += len(quantifier)
            if quantifier:
                star = atom
                if quantifier == "+":  # x+ is x x*
                    head.append(atom)
            else:
                (head if star is None else tail).append(atom)
        if not head and star is None:  # an empty alternative (q_proj|) would match any dotted name
            return None
        out.append(_Alternative(anchored, tuple(head), star, tuple(tail)))
    return tuple(out)


def _atom_matches(atom: str, ch: str) -> bool:
    if atom == _ANY:
        return ch != "\n"
    if atom == _DOT:
        return ch == "."
    if atom == _DIGIT:
        return ch.isdecimal()  # what re's \d matches in a str pattern
    if atom == _ASCII_DIGIT:
        return "0" <= ch <= "9"
    return ch == atom


def _all_match(atoms: tuple[str, ...], text: str, start: int) -> bool:
    return all(_atom_matches(a, text[start + i]) for i, a in enumerate(atoms))


class _Name:
    """A module name with the positions PEFT's rule can match at, computed once for all keys."""

    def __init__(self, module: str):
        self.text = module
        # Where the optional prefix `.*\.` can end: at 0, or after a dot with no newline before it.
        cut = module.find("\n")
        self.starts = [0] + [i + 1 for i, c in enumerate(module[:cut] if cut >= 0 else module) if c == "."]
        self.start_set = set(self.starts)
        # $ matches at the end, and before a newline that ends the name.
        self.ends = (len(module), len(module) - 1) if module.endswith("\n") else (len(module),)

    def matches(self, alternatives: tuple[_Alternative, ...]) -> bool:
        r"""Whether re.match(rf"(.*\.)?({key})$", name) matches, in O(len(name) * len(key))."""
        return any(self._matches(alt, n) for alt in alternatives for n in self.ends)

    def _matches(self, alt: _Alternative, n: int) -> bool:
        """Whether alt matches all of text[i:n] for one of the start positions."""
        text, h, t = self.text, len(alt.head), len(alt.tail)
        if alt.star is None:
            i = n - h
            return (i == 0 or (i in self.start_set and not alt.anchored)) and _all_match(alt.head, text, i)
        if n - t < 0 or not _all_match(alt.tail, text, n - t):
            return False
        # The star's atoms must cover text[i + h : n - t]: find where their run ending at n - t begins.
        run = n - t
        while run > 0 and _atom_matches(alt.star, text[run - 1]):
            run -= 1
        candidates = self.starts[:1] if alt.anchored else self.starts
        return any(run <= i + h <= n - t and _all_match(alt.head, text, i) for i in candidates)


def pattern_value(pattern: dict | None, module: str, default, *, allow_regex: bool = False):
    """The value of the first key that matches `module` (its name in the base
    model, without "base_model.model."), else `default`. A key of another form
    raises UnsupportedKey, or with `allow_regex` is run as PEFT runs it."""
    name = _Name(module)
    for key, value in (pattern or {}).items():
        alternatives = parse_pattern_key(key)
        if alternatives is None:
            if not allow_regex:
                raise UnsupportedKey(f"Unsupported rank_pattern / alpha_pattern key {key!r}.")
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        elif name.matches(alternatives):
            return value
    return default
