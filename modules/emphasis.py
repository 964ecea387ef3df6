"""A1111-style prompt emphasis: `(word)` x1.1, `[word]` /1.1, `(word:1.3)` x1.3, nestable; `\\(` is a literal."""

import re

_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
UP, DOWN = 1.1, 1 / 1.1


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """'a (red:1.5) [cat]' -> [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.909...)]. Unbalanced brackets
    apply to the end of the prompt, as in A1111."""
    out: list[list] = []
    round_open, square_open = [], []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(out))
        elif token == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:
            out.append([token, 1.0])
    for start in round_open:
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)
    merged: list[tuple[str, float]] = []
    for piece, w in out:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + piece, w)
        elif piece:
            merged.append((piece, w))
    return merged or [("", 1.0)]
