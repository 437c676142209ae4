"""One shape for everything safetrain notices: audit findings, preflight checks, monitors, unlocked bounds.

The log, metrics.jsonl, metrics.json, TensorBoard and report.md all take the same list of findings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

PASS, WARN, FAIL = "pass", "warn", "fail"  # FAIL: training would be wrong; WARN: worth a look, training is valid


@dataclass
class Finding:
    row: str  # catalogue ID ("M06"), or "config"/"data" where no row fits
    kind: str  # what was seen, short ("near-duplicates", "collapse", a preflight check's name); one report per
    message: str  # (row, kind) in a run. The message says what was seen, with numbers and likely causes.
    fix: str = ""  # what to change
    source: str = ""  # audit | data | preflight | monitor | unlock
    epoch: Optional[int] = None  # monitors: the epoch it was seen in
    verdict: str = WARN  # checks that held are findings too (PASS: the doctor's table shows them)
    evidence: dict = field(default_factory=dict)  # the numbers behind the message, for metrics.json

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def __str__(self) -> str:
        return f"[{self.row}] {self.message}" + (f" {self.fix}" if self.fix else "")

    def to_dict(self) -> dict:
        return asdict(self)


def problems(findings: list[Finding]) -> list[Finding]:
    """The findings a user must read: every one but the checks that passed."""
    return [f for f in findings if f.verdict != PASS]


def verdict(findings: list[Finding]) -> str:
    """The worst verdict among the findings."""
    return next((v for v in (FAIL, WARN) if any(f.verdict == v for f in findings)), PASS)


def by_row(findings: list[Finding]) -> dict[str, list[Finding]]:
    """Findings grouped by catalogue row, rows in order (report.md)."""
    out: dict[str, list[Finding]] = {}
    for f in sorted(findings, key=lambda f: f.row):
        out.setdefault(f.row, []).append(f)
    return out
