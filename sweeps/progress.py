"""A sweep's report as it runs: a line per finished job (its wall time, and its ACC / ASR / DER from
the run's ``summary.json``) and the final count. (Not the per-epoch progress bars of one run:
``utils/progress.py``.)"""
from __future__ import annotations

import json
import time
from collections import Counter

from sweeps.jobs import Job


def _summary(job: Job) -> dict:
    try:
        return json.loads((job.output / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def figures(job: Job) -> str:
    """ACC / ASR (/ DER) of a finished job, in %, for the progress line."""
    s = _summary(job)
    parts = [f"{name} {100 * s[key]:.2f}" for name, key in (("ACC", "clean_acc"), ("ASR", "asr"), ("DER", "der"))
             if isinstance(s.get(key), (int, float))]
    return "  ".join(parts)


class Progress:
    """A line per finished job (its wall time and figures) and the final count."""

    def __init__(self, total: int, out=print):
        self.total, self.out, self.counts, self.start = total, out, Counter(), time.perf_counter()

    def _line(self, status: str, job: Job, text: str) -> None:
        self.counts[status] += 1
        n = sum(self.counts.values())
        self.out(f"[{n:>{len(str(self.total))}}/{self.total}] {status:<7} {job.label}  {text}".rstrip())

    def done(self, job: Job, seconds: float | None = None) -> None:
        """``seconds``: the wall time seen here; the run's own (its summary's, resumed parts included) wins."""
        seconds = _summary(job).get("wall_seconds", seconds)
        self._line("done", job, (f"{seconds:.0f} s  " if seconds is not None else "") + figures(job))

    def skipped(self, job: Job) -> None:
        self._line("skipped", job, "(finished before)")

    def failed(self, job: Job, why: str) -> None:
        self._line("FAILED", job, why)

    def summary(self) -> str:
        wall = time.perf_counter() - self.start
        return (f"sweep: {self.counts['done']} done, {self.counts['skipped']} skipped, {self.counts['FAILED']} failed "
                f"in {wall / 60:.1f} min")

    @property
    def failures(self) -> int:
        return self.counts["FAILED"]
