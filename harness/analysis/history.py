"""A run's metrics during training: the records of its metrics.jsonl (harness/train/metrics_log.py), or of a
batch-science trial's measurements.csv (batch_science.py), as one list of records per step.

metrics.jsonl holds a record per logged training step (`step`, `epoch`, `train_loss`, `lr`, ...) and one per
evaluation (`step`, `test_loss`, `test_accuracy` | `test_perplexity` | `test_mse`); evaluation records carry no
epoch, so it is derived from the training records' steps per epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

from harness.analysis.checks import is_number

# measurements.csv column <-> metrics.jsonl key, for the keys that are not train_* / test_* (batch_science.py).
PLAIN_COLUMNS = {"lr": "learning_rate", "effective_lr": "effective_learning_rate"}
# Their names for our quantities (batch_science/README.md), written beside ours and dropped on reading ours back.
THEIR_NAMES = ("cross_entropy_error", "classification_error")


def read_history(path: Optional[Path]) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl or measurements.csv, merged per step in step order, and how many lines could
    not be read (a line cut by a kill mid-write, or not JSON). ([], 0) when there is no such file."""
    if path is None or not path.is_file():
        return [], 0
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return [], 1
    if path.suffix == ".csv":
        return records_of_measurements(text)
    by_step: dict[int, dict] = {}
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError, RecursionError):  # RecursionError: `[[[[...` deep
            bad += 1
            continue
        if not is_number(step) or not math.isfinite(step) or not isinstance(record, dict):
            bad += 1  # Python's json reads `Infinity` and `NaN`: a record at no step is not one
            continue
        by_step.setdefault(int(step), {"step": int(step)}).update(
            {k: v for k, v in record.items() if k != "step" and (is_number(v) or v is None)})
    return add_epochs([by_step[s] for s in sorted(by_step)]), bad


def add_epochs(records: list[dict]) -> list[dict]:
    """Give every record an `epoch`, from the steps per epoch of the records that have one."""
    per_epoch = [r["step"] / r["epoch"] for r in records
                 if is_number(r.get("epoch")) and math.isfinite(r["epoch"]) and r["epoch"] > 0 and r["step"] > 0]
    if per_epoch:
        steps_per_epoch = sum(per_epoch) / len(per_epoch)
        for r in records:
            if r.get("epoch") is None:
                r["epoch"] = r["step"] / steps_per_epoch
    return records


def curve(records: list[dict], key: str) -> list[tuple[int, Optional[float], float]]:
    """(step, epoch, value) of every record with a finite `key`, in step order."""
    return [(r["step"], r.get("epoch"), float(r[key])) for r in records
            if is_number(r.get(key)) and math.isfinite(r[key])]


def write_csv_rows(rows: list[dict], columns: list[str]) -> str:
    """CSV text of `rows` (dicts) in `columns`; floats as repr (exact round trip), missing values empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow(["" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c]) for c in columns])
    return buf.getvalue()


def records_of_measurements(text: str) -> tuple[list[dict], int]:
    """measurements.csv rows as metrics.jsonl-style records (test_accuracy, train_loss, lr, ...), and the number
    of rows that could not be read."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None) or []
    if "step" not in header:
        return [], 1
    ours = any(c in ("test/accuracy", "test/perplexity", "test/mse", "test/loss") for c in header)
    split = "test/" if ours or any(c.startswith("test/") for c in header) else "val/"
    records, bad = [], 0
    for row in reader:
        try:
            values = {c: float(v) for c, v in zip(header, row) if v != ""}
            step = int(values.pop("step"))
        except (ValueError, KeyError):
            bad += 1
            continue
        record = {"step": step}
        for column, v in values.items():
            record.update(_record_keys(column, v, ours, split))
        records.append(record)
    return add_epochs(records), bad


def _record_keys(column: str, v: float, ours: bool, split: str) -> dict:
    back = {c: k for k, c in PLAIN_COLUMNS.items()}
    if column in back:
        return {back[column]: v}
    prefix, _, name = column.partition("/")
    if prefix == "train" and name:
        return {f"train_{name}": v}
    if column.startswith(split) and name:
        if ours:
            return {} if name in THEIR_NAMES else {f"test_{name}": v}
        if name == "classification_error":
            return {"test_classification_error": v, "test_accuracy": 100.0 * (1.0 - v)}
        if name == "cross_entropy_error":
            return {"test_loss": v, "test_cross_entropy_error": v}
        return {f"test_{name}": v}
    return {} if "/" in column else {column: v}
