"""Loading a sweep's run directories: every directory below the sweep directory that holds a config.yaml is a
run; its result.json, if it finished, gives its status, test metric and final training loss. Nothing else is
read, so tables can be rebuilt from run directories alone (copied from a cluster, or from another tool)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from harness.core.errors import SweepError
from harness.core.keys import flatten, is_layout_key
from harness.core.status import FINISHED
from harness.recipe.selection import Selection

SKIP_DIRS = (".sweep", "analysis")
UNFINISHED = "unfinished"


@dataclass
class RunRecord:
    path: Path
    config: dict  # flattened science keys
    status: str  # completed | diverged | unfinished
    metric: Optional[float]
    train_loss: Optional[float]


def load_runs(sweep_dir: Path) -> tuple[list[RunRecord], str, bool]:
    """Every run directory below `sweep_dir` (a config.yaml; result.json if it finished)."""
    sweep_dir = Path(sweep_dir)
    records, metrics = [], set()
    for cfg_path in sorted(sweep_dir.rglob("config.yaml")):
        rel = cfg_path.relative_to(sweep_dir).parts
        if any(part in SKIP_DIRS for part in rel[:-1]):
            continue
        config = {k: v for k, v in flatten(yaml.safe_load(cfg_path.read_text()) or {}).items() if not is_layout_key(k)}
        result = None
        res_path = cfg_path.with_name("result.json")
        if res_path.is_file():
            try:
                result = json.loads(res_path.read_text())
            except json.JSONDecodeError:
                result = None
        if result is None or result.get("status") not in FINISHED:
            records.append(RunRecord(cfg_path.parent, config, UNFINISHED, None, None))
            continue
        name = result.get("test_metric")
        metrics.add((name, bool(result.get("higher_is_better", True))))
        value = result.get(name) if name else None
        records.append(RunRecord(cfg_path.parent, config, result["status"], _num(value), _num(result.get("train_loss"))))
    if not records:
        raise SweepError(f"no run directories (config.yaml) below {sweep_dir}; run `harness sweep SPEC` first")
    if len(metrics) > 1:
        shown = ", ".join(sorted(m for m, _ in metrics))
        raise SweepError(f"runs below {sweep_dir} report different test metrics ({shown}); analyze one experiment per directory")
    metric, higher = next(iter(metrics)) if metrics else ("test_metric", True)
    return records, metric, higher


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def selection_of(sweep_dir: Path) -> tuple[int, int]:
    """k and n from the sweep.yaml `harness sweep` wrote, else the paper's defaults (recipe.selection)."""
    default = Selection()
    path = Path(sweep_dir) / "sweep.yaml"
    if path.is_file():
        select = (yaml.safe_load(path.read_text()) or {}).get("select") or {}
        return int(select.get("k", default.k)), int(select.get("n", default.n))
    return default.k, default.n


def expected_runs(sweep_dir: Path) -> int:
    path = Path(sweep_dir) / ".sweep" / "runs.json"
    try:
        return len(json.loads(path.read_text())["runs"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return 0
