"""What the analysis knows of one run (RunRecord), wherever it was read from: a run directory (runs.py) or a
trial of a batch-science export (batch_science.py); where runs are found (discover); and the one-line warnings
of a load (Warn)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from harness.analysis.checks import Outcome

SKIP_DIRS = (".sweep", "analysis")
UNFINISHED = "unfinished"
RUN_FILES = ("config.yaml", "result.json")
STUDY_FILE = "study.json"


@dataclass
class RunRecord:
    path: Path
    config: dict  # flattened science keys
    status: str  # completed | diverged | unfinished
    metric: Optional[float]
    train_loss: Optional[float]  # result.json train_loss: mean minibatch loss over the final floor(S/20) steps
    train_set_loss: Optional[float] = None  # result.json train_set_loss: the full training set at the end
    train_set_accuracy: Optional[float] = None
    history: Optional[Path] = None  # metrics.jsonl (or a batch-science trial's measurements.csv)
    outcome: Optional[Outcome] = None


class Warn:
    """Collects the one-line warnings of a load, and hands each to `echo` at once (the CLI prints to stderr)."""

    def __init__(self, echo: Optional[Callable[[str], None]] = None):
        self.lines: list[str] = []
        self.echo = echo

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.echo is not None:
            self.echo(line)


def discover(root: Path) -> tuple[list[Path], list[Path]]:
    """Run directories (a config.yaml or result.json) and batch-science study directories (study.json) below
    `root`, sorted; hidden directories and the analysis' own output (SKIP_DIRS) are not entered."""
    runs, studies = [], []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        names = set(files) | set(dirs)
        if any(n in names for n in RUN_FILES):
            runs.append(Path(here))
        if STUDY_FILE in files:
            studies.append(Path(here))
    return sorted(runs), sorted(studies)


def record_of(path: Path, config: dict, o: Outcome, history: Path) -> RunRecord:
    if o.status == UNFINISHED:
        return RunRecord(path, config, UNFINISHED, None, None, history=history, outcome=o)
    return RunRecord(path, config, o.status, o.metric, o.train_loss, o.train_set_loss, o.train_set_accuracy, history, o)
