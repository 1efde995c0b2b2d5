"""The verdicts saved in a run directory (preflight.json, check.json), as claims again, and
preflight's own verdict for the first lines of its report."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass
class PreflightVerdict:
    """What preflight.json begins with: the verdict, one sentence saying why, the reasons in order."""

    verdict: str  # READY | NOT READY | UNCERTAIN
    summary: str  # "" when the file has none
    reasons: list[str]


def preflight_verdict(run_dir: Path) -> PreflightVerdict | None:
    """The verdict of the preflight.json in `run_dir`; None without one.  ValueError naming the
    file when it is there but holds no readable verdict."""
    try:
        data = json.loads((run_dir / "preflight.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"preflight.json: cannot be read ({type(exc).__name__})") from None
    verdict = data.get("verdict") if isinstance(data, dict) else None
    if not isinstance(verdict, str) or not verdict.strip():
        raise ValueError("preflight.json: has no 'verdict' string")
    reasons = data.get("reasons", [])
    summary = data.get("summary", "")
    return PreflightVerdict(verdict.strip(), summary if isinstance(summary, str) else "",
                            [str(r) for r in reasons] if isinstance(reasons, list) else [])
