"""Quoting a caller's value in an error message: bounded in length and depth, whatever was sent."""
from __future__ import annotations

import reprlib
from typing import Any

QUOTE_CHARS = 200  # an error message shows at most about this much of a bad value

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = QUOTE_CHARS
_repr.maxother = QUOTE_CHARS
_repr.maxlong = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value), shortened: a 15 MiB string or a list nested 1,000 deep costs a few hundred
    characters (and no recursion) in the reply and in the log."""
    try:
        text = _repr.repr(value)
    except Exception:  # a repr that fails (an int of more digits than Python prints, say)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
