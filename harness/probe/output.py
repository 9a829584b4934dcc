"""What both probes leave behind: the figure, the JSON report (atomically) and the printed summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from harness.core.io import atomic_write_json


def publish(out: Path, stem: str, report: dict, figure: Callable[[dict, Path], Path],
            text: Callable[[dict, str], str], started: float, label: str) -> dict:
    """OUT/STEM.png and OUT/STEM.json; the text report and where both are."""
    from harness.sweep.local import duration

    report["wall_seconds"] = round(time.time() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    report["figure"] = str(figure(report, out / f"{stem}.png"))
    atomic_write_json(out / f"{stem}.json", report)
    print(text(report, duration(time.time() - started)))
    print(f"{label}: report {out / f'{stem}.json'}, figure {report['figure']}")
    return report
