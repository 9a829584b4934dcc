"""The status values a run's result.json can hold, in one place.

A run is *finished* when it completed or diverged: a diverged run is a result (the paper counts it as the worst
value of its cell), so it is never retried. An interrupted run (a stop request at a step boundary) has a
checkpoint and no result.json; a resubmission resumes it.
"""

from __future__ import annotations

COMPLETED = "completed"
DIVERGED = "diverged"
INTERRUPTED = "interrupted"
FINISHED = (COMPLETED, DIVERGED)


def is_finished(result: dict | None) -> bool:
    """Whether a result record (result.json, or None when there is none) ends its run for good."""
    return isinstance(result, dict) and result.get("status") in FINISHED
