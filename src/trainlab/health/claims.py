"""The verdict type: what `trainlab check` and `trainlab preflight` conclude about a run, and what
the report (trainlab.report) shows in its verdict table."""

from __future__ import annotations

from dataclasses import dataclass

VERDICTS = ("pass", "warn", "fail", "info", "not measured")


@dataclass
class Claim:
    """One verdict about a run, with the number behind it and where the number came from."""

    name: str
    verdict: str  # pass | warn | fail | info | not measured
    value: str  # the number with its unit, e.g. "0.41 s/step"
    evidence: str  # how it was measured
    source: str  # e.g. "metrics.csv steps 100-500" or "preflight"

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"Claim {self.name!r}: verdict must be one of {', '.join(VERDICTS)}; "
                             f"got {self.verdict!r}")
