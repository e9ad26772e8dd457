"""Finding a request's stop strings in its growing output text.

Each new token can only complete a stop string that ends in the text it added, and such a
string begins at most `longest - 1` characters before that text. So the search looks at the
new characters alone: at each position where a stop string could end, it looks up the slices
ending there, one per distinct stop length, in a set. Its cost per new character is the number
of distinct lengths (bounded by MAX_STOP_CHARS and MAX_STOP_STRINGS), not the number of stop
strings or the length of the text.
"""
from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    def __init__(self, stops: Iterable[str]) -> None:
        self.strings = frozenset(stops)
        self.lengths = sorted({len(s) for s in self.strings}, reverse=True)  # longest first
        self.longest = self.lengths[0] if self.lengths else 0

    def __bool__(self) -> bool:
        return bool(self.strings)

    def find(self, text: str, searched: int = 0) -> int:
        """Where the earliest stop string in `text` begins, of those that end after its first
        `searched` characters; -1 if none does. When text[:searched] holds none (it was searched
        already), that is the earliest in the whole text, as min(text.find(s) for s in stops)."""
        best = -1
        for end in range(max(searched, 0) + 1, len(text) + 1):
            if best >= 0 and end - self.longest >= best:
                break  # nothing ending here or later can begin before `best`
            for length in self.lengths:  # longest first: the earliest beginning for this end
                begin = end - length
                if begin < 0 or (best >= 0 and begin >= best):
                    continue
                if text[begin:end] in self.strings:
                    best = begin
                    break
        return best

    def end_of(self, text: str, begin: int) -> int:
        """Where the stop string that `find` found at `begin` ends (the longest one there)."""
        for length in self.lengths:
            if text[begin:begin + length] in self.strings:
                return begin + length
        raise ValueError(f"no stop string begins at {begin}")
