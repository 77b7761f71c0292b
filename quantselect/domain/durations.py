"""Durations as people write them (``90m``, ``6h``, ``1h30m``, ``30d``, ``2w``) and as we print them:
one parser for settings, options and request fields, so they all read the same way."""

from __future__ import annotations

import math
import re

from quantselect.errors import InputError

_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Longer is a typo, and past it dates overflow (``now - timedelta``: a 500 before) or read as inf
MAX_SECONDS = 100 * 365 * 86400


def parse_duration(text: str | float, name: str, *, bare_seconds: bool = True) -> float:
    """``90``, ``45s``, ``90m``, ``6h``, ``1h30m``, ``30d``, ``2w`` -> seconds; a one-line error naming
    ``name`` (the variable, option or field it came from) otherwise. ``bare_seconds=False``: a unit is
    required, where a bare number is more likely a mistake (``--older-than 30`` meaning 30 days).
    A number (a JSON field's) is seconds: ``str(1e20)`` would read ``1e+20``."""
    shown = _shown(text)
    if isinstance(text, (int, float)) and not isinstance(text, bool) and bare_seconds:
        seconds = float(text)
    else:
        compact = "".join(str(text).split()).lower()
        parts = _PART.findall(compact)
        well_formed = compact and "".join(n + u for n, u in parts) == compact
        if not well_formed or (not all(u for _, u in parts) and (len(parts) > 1 or not bare_seconds)):
            example = "90m, 6h, 1h30m or 45s" if bare_seconds else "30d, 12h, 90m or 2w"
            raise InputError(f"{name}={shown}: give a duration such as {example}")
        seconds = sum(float(n) * _SECONDS[u] for n, u in parts)
    if not seconds > 0:  # NaN too
        raise InputError(f"{name}={shown}: give a duration longer than 0")
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise InputError(f"{name}={shown}: give a duration of at most 100 years")
    return seconds


def _shown(text: str | float) -> str:
    """The value as an error quotes it: a few dozen characters at most (a request may send megabytes)."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:40] + "…" + shown[-10:]


def format_duration(seconds: float) -> str:
    """``45s``, ``3m10s``, ``2h05m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
