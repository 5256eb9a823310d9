"""'did you mean' for unknown names."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """'; did you mean X?' or a list of the choices when nothing is close."""
    options = sorted(set(choices))
    close = difflib.get_close_matches(name.lower(), options, n=3, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(close)}?"
    return f" (choose from: {', '.join(options)})"
