"""A gate's result and the exit codes of `flynn gates check` / `compare`."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

EXIT_PASS = 0  # every gate passed (skipped ones aside)
EXIT_FAIL = 1  # at least one gate failed (or the figures could not be read at all)
EXIT_USAGE = 2  # bad arguments or an unreadable snapshot file
EXIT_INCONCLUSIVE = 3  # nothing failed, but at least one gate had less than its minimum sample


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"  # below the gate's minimum sample: neither promote nor roll back
    SKIP = "skip"  # not applicable (the canvas is off) or left out with --skip


@dataclass
class GateResult:
    """One gate over one window: what was measured against which threshold, and on how much data."""

    gate: str
    result: str  # a Verdict value
    measured: str
    threshold: str
    note: str = ""
    sample: float | None = None  # observations the verdict rests on (None: the gate has no sample)
    min_sample: int = 0  # below this the verdict is inconclusive

    @property
    def failed(self) -> bool:
        return self.result == Verdict.FAIL

    @property
    def inconclusive(self) -> bool:
        return self.result == Verdict.INCONCLUSIVE


def exit_code(results: Iterable[GateResult]) -> int:
    """EXIT_FAIL when any gate failed, else EXIT_INCONCLUSIVE when any was inconclusive, else EXIT_PASS."""
    items = list(results)
    if any(r.failed for r in items):
        return EXIT_FAIL
    if any(r.inconclusive for r in items):
        return EXIT_INCONCLUSIVE
    return EXIT_PASS
