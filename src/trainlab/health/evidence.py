"""The verdicts saved in a run directory (preflight.json, check.json), as claims again."""

from __future__ import annotations

import json
from pathlib import Path

from trainlab.health.claims import Claim

SOURCES = ("preflight.json", "check.json")
FIELDS = ("name", "verdict", "value", "evidence", "source")


def claims_for(run_dir: Path) -> list[Claim] | None:
    """The claims of every verdict file present, None when there is none.  A file that is there but
    cannot be read as {"claims": [{...}, ...]} raises ValueError naming it: a report that silently
    left out a verdict would look like a run nobody judged."""
    claims: list[Claim] = []
    found = False
    for name in SOURCES:
        path = run_dir / name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{name}: cannot be read ({type(exc).__name__})") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{name}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("claims", []), list):
            raise ValueError(f"{name}: must be a JSON object whose 'claims' is a list")
        found = True
        for c in data.get("claims", []):
            if not isinstance(c, dict):
                raise ValueError(f"{name}: each claim must be a JSON object, got {c!r:.40}")
            claims.append(Claim(**{k: str(c.get(k, "")) for k in FIELDS}))
    return claims if found else None
