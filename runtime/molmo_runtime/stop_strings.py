"""Stop strings for streamed text: where the answer ends, and how much of it is safe to show.

A stream must never show text that the final answer then cuts. Text is safe up to the start of
its longest suffix that is a proper prefix of some stop string (that suffix may still grow into
the stop string with the next token). Proof that this is enough: a later match that started
before that point would either lie wholly inside the text already decoded (and have been found)
or straddle its end, making a longer suffix a prefix of the stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How many leading characters of `text` (in which no stop string occurs) can be shown now:
    not a possible start of a stop string, nor trailing U+FFFD that the next token may complete
    into a character."""
    complete = text.rstrip(REPLACEMENT)  # the characters that later tokens cannot change
    return len(complete) - held_back(complete, stops)
