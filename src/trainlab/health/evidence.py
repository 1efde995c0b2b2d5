"""The verdicts saved in a run directory (preflight.json, check.json), as report claims."""

from __future__ import annotations

import json
from pathlib import Path

from trainlab.report.render import Claim

SOURCES = ("preflight.json", "check.json")


def claims_for(run_dir: Path) -> list[Claim] | None:
    claims: list[Claim] = []
    found = False
    for name in SOURCES:
        path = run_dir / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found = True
        for c in data.get("claims", []):
            if isinstance(c, dict):
                claims.append(Claim(**{k: str(c.get(k, "")) for k in ("name", "verdict", "value", "evidence", "source")}))
    return claims if found else None
