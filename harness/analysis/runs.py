"""Loading a sweep's runs: every directory below the sweep directory that holds a config.yaml or a result.json is
a run directory; its result.json, if it finished, gives its status, test metric and final training losses. A
directory in Shallue et al.'s batch_science layout (study.json files, batch_science.py) is read instead when it
holds no run directories. Nothing else is read, so tables can be rebuilt from run directories alone (copied from
a cluster, or from another tool).

A run directory the analysis cannot use (checks.py) is skipped with one warning line naming it, what is wrong
and the fix; the analysis goes on with the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml
from harness.analysis.batch_science import load_studies
from harness.analysis.checks import BadRun, read_config, read_result
from harness.analysis.records import UNFINISHED, RunRecord, Warn, discover, record_of
from harness.core.configlib import load_yaml_text
from harness.core.errors import SweepError
from harness.recipe.selection import Selection


@dataclass
class Loaded:
    """What load_runs found: the usable runs, their common metric, and what was skipped."""

    records: list[RunRecord]
    metric: str
    higher: bool
    layout: str  # "run directories" | "batch-science"
    warnings: list[str] = field(default_factory=list)
    select: Optional[tuple[int, int]] = None  # k, n recorded with the runs (sweep.yaml, study.json)
    expected: int = 0  # runs listed in .sweep/runs.json
    skipped: list = field(default_factory=list)  # grid points an adaptive search left out: {point, why}


def load_runs(sweep_dir: Path, echo: Optional[Callable[[str], None]] = None) -> Loaded:
    """Every usable run below `sweep_dir` (run directories, else a batch-science export); one warning per bad one."""
    sweep_dir = Path(sweep_dir)
    warn = Warn(echo)
    run_dirs, study_dirs = discover(sweep_dir)
    if not run_dirs and study_dirs:
        records, select = load_studies(sweep_dir, study_dirs, warn)
        layout, expected, found = "batch-science", 0, "batch-science trials"
    else:
        records = [r for r in (_load_run(d, sweep_dir, warn) for d in run_dirs) if r is not None]
        layout, select, expected, found = "run directories", selection_of(sweep_dir), expected_runs(sweep_dir), "run directories"
        if not run_dirs:
            raise SweepError(f"no run directories (config.yaml) below {sweep_dir}; run `harness sweep SPEC` first")
    if not records:
        raise SweepError(f"no usable {found} below {sweep_dir}: all {len(warn.lines)} were skipped (see the warnings "
                         "above); fix or remove them, or run `harness sweep SPEC` to rerun them")
    metric, higher = common_metric(records, sweep_dir)
    skipped = skipped_points(sweep_dir) if layout == "run directories" else []
    return Loaded(records, metric, higher, layout, warn.lines, select, expected, skipped)


def _load_run(run_dir: Path, sweep_dir: Path, warn: Warn) -> Optional[RunRecord]:
    try:
        config = read_config(run_dir / "config.yaml")
        outcome = read_result(run_dir / "result.json")
    except BadRun as e:
        warn(f"skipped {run_dir}: {e}")
        return None
    return record_of(run_dir, config, outcome, run_dir / "metrics.jsonl")


def common_metric(records: list[RunRecord], sweep_dir: Path) -> tuple[str, bool]:
    """The one test metric (and its direction) the finished runs report; SweepError when they disagree."""
    metrics = {(r.outcome.metric_name, r.outcome.higher_is_better) for r in records if r.status != UNFINISHED}
    if len({m for m, _ in metrics}) > 1:
        shown = ", ".join(sorted({m for m, _ in metrics}))
        raise SweepError(f"runs below {sweep_dir} report different test metrics ({shown}); analyze one experiment per directory")
    if len(metrics) > 1:
        name = next(iter(metrics))[0]
        raise SweepError(f"runs below {sweep_dir} disagree on higher_is_better for {name}; fix their result.json")
    return next(iter(metrics)) if metrics else ("test_metric", True)


def selection_of(sweep_dir: Path) -> tuple[int, int]:
    """k and n from the sweep.yaml `harness sweep` wrote, else the paper's defaults (recipe.selection)."""
    default = Selection()
    path = Path(sweep_dir) / "sweep.yaml"
    try:
        select = (load_yaml_text(path.read_text()) or {}).get("select") or {}
        return int(select.get("k", default.k)), int(select.get("n", default.n))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return default.k, default.n  # none, or not ours: --k/--n say what the paper's defaults do not


def title_of(sweep_dir: Path) -> str:
    """The figures' title: the spec's description from the sweep.yaml `harness sweep` wrote, else the name of the
    sweep directory."""
    try:
        description = (load_yaml_text((Path(sweep_dir) / "sweep.yaml").read_text()) or {}).get("description")
    except (OSError, yaml.YAMLError, AttributeError, RecursionError):
        description = None
    return " ".join(description.split()) if isinstance(description, str) and description.strip() else Path(sweep_dir).name


def skipped_points(sweep_dir: Path) -> list[dict]:
    """The grid points a finished adaptive search left out, with why (.sweep/search.json, harness/sweep/search.py);
    [] for a grid sweep or an unfinished search."""
    path = Path(sweep_dir) / ".sweep" / "search.json"
    try:
        record = json.loads(path.read_text())
        return [s for s in record.get("skipped", []) if isinstance(s.get("point"), dict)]
    except (OSError, AttributeError, TypeError, json.JSONDecodeError, RecursionError):
        return []


def expected_runs(sweep_dir: Path) -> int:
    path = Path(sweep_dir) / ".sweep" / "runs.json"
    try:
        return len(json.loads(path.read_text())["runs"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError, RecursionError):
        return 0
