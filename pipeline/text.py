"""Text cleaning for descriptions (paper 3.3: "we remove HTML residues in order to get clean, contextual
sentences"); titles are never cleaned.

Real tags go first, then entities are unescaped, then tags that were written as entities (`&lt;br /&gt;`)
go too. A tag is `<` directly followed by a tag name (or `/name`, or `!--`), so text such as
`taille <5 cm> et poids` or an unescaped `Prix < 10€ et > 5€` is kept as it is.
"""
from __future__ import annotations

import html
import re

_TAG = re.compile(r"<(?:/?[A-Za-z][\w:.-]*(?:\s[^<>]*)?/?|!--.*?--)>", re.DOTALL)
_SPACE = re.compile(r"\s+")


def strip_tags(text: str) -> str:
    return _TAG.sub(" ", text)


def unescape(text: str, rounds: int = 3) -> str:
    """HTML entities decoded until stable (`&amp;amp;` -> `&`), at most `rounds` times."""
    for _ in range(rounds):
        decoded = html.unescape(text)
        if decoded == text:
            break
        text = decoded
    return text


def clean_description(text: str, max_chars: int = 0) -> str:
    """Tags out, entities decoded, white space folded, cut to `max_chars` characters (0: whole)."""
    text = strip_tags(unescape(strip_tags(text)))
    text = _SPACE.sub(" ", text).strip()
    return text[:max_chars].rstrip() if max_chars else text
