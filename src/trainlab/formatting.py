"""Numbers and durations as trainlab prints them: the CLI's lines, the progress line, the reports.

Plain standard library (the engine imports it for its progress line).

    format_number(0.123456)   -> "0.1235"      format_duration(65)      -> "1m05s"
    format_number(40)         -> "40"          format_duration(7385.2)  -> "2h03m05s"
    format_number(None)       -> "-"           format_duration(nan)     -> "?"
                                               format_duration(4e5)     -> "4.6 days"
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def format_number(value: Any, digits: int = 4, missing: str = "-") -> str:
    """A real number (float, numpy scalar, 0-d value) to `digits` significant digits; an int, a
    bool, NaN and inf as Python writes them; None as `missing`; anything else as str()."""
    if value is None:
        return missing
    if isinstance(value, (bool, int)) or not isinstance(value, numbers.Real):
        return str(value)
    value = float(value)
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def format_duration(seconds: float) -> str:
    """Seconds as 1m05s or 2h03m05s (rounded to the second); from 100 hours on as days, from 1000
    days on as years (an ETA that long is read for its size, not its seconds); '?' when not finite
    (an ETA that no timing supports yet)."""
    if not math.isfinite(seconds):
        return "?"
    days = seconds / 86400
    if days >= 1000:
        years = days / 365.25
        if years >= 1e6:
            return "over a million years"
        return f"{years:.1f} years" if years < 10 else f"{years:,.0f} years"
    if seconds >= 100 * 3600:
        return f"{days:.1f} days"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
