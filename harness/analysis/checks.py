"""What a run directory must hold for the analysis to use it, checked field by field.

Run directories come from clusters, copies and other tools: a result.json may be truncated by a copy that
stopped, a config.yaml may belong to another program, a key may be missing or of the wrong type. Each check
raises `BadRun` with ONE line saying what is wrong and how to fix it; the loader warns with that line, naming the
directory, and the analysis goes on without the run (the house rule: bad input is one line, never a traceback).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from harness.core.configlib import load_yaml_text
from harness.core.keys import flatten, is_layout_key
from harness.core.status import DIVERGED, FINISHED, INTERRUPTED

# The test metrics the trainer's objectives report (harness/train/objectives.py) and their direction.
METRIC_DIRECTIONS = {"test_accuracy": True, "test_perplexity": False, "test_mse": False}
# What the analysis groups runs by (select.py): a config without them is not a harness run config.
REQUIRED_CONFIG = {"optim.name": (str,), "optim.effective_lr": (int, float), "batch.global_batch_size": (int,)}
MOVE_OUT = "move the directory out of the sweep directory"
# A run's result.json and config.yaml are a few kilobytes; one larger than this is not a harness file, and is
# refused from its size instead of read whole (a 1 GB file cost 2 GB of memory to parse).
MAX_RUN_FILE_BYTES = 16 * 2**20


def _check_size(path: Path, fix: str) -> None:
    size = path.stat().st_size
    if size > MAX_RUN_FILE_BYTES:
        raise BadRun(f"{path.name} is {size:,} bytes, more than the {MAX_RUN_FILE_BYTES:,} a harness run file has "
                     f"(not one the harness wrote); {fix}")


class BadRun(Exception):
    """A run directory the analysis cannot use; str() is the one-line reason and fix."""


@dataclass
class Outcome:
    """The fields of a result.json the analysis reads, checked."""

    status: str  # completed | diverged | unfinished (no result yet, or interrupted)
    metric_name: Optional[str] = None
    higher_is_better: bool = True
    metric: Optional[float] = None
    train_loss: Optional[float] = None  # mean train-mode minibatch loss over the final floor(S/20) steps
    train_set_loss: Optional[float] = None  # full training set, eval mode, at the end (eval.train_loss: true)
    train_set_accuracy: Optional[float] = None
    steps: Optional[int] = None
    total_steps: Optional[int] = None
    epochs: Optional[float] = None


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def freeze(v):
    """Lists (YAML sequences) as tuples, so that config values can be grouped on."""
    return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_config(path: Path) -> dict:
    """The science keys of a run's config.yaml, flattened (`optim.effective_lr`); BadRun if it is not one."""
    if not path.exists():
        raise BadRun(f"result.json without config.yaml (not a run directory the harness wrote): copy config.yaml "
                     f"from the run's original directory, or {MOVE_OUT}")
    try:
        _check_size(path, f"restore it from the run's original directory, or {MOVE_OUT}")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadRun(f"config.yaml cannot be read ({_one_line(e.strerror if isinstance(e, OSError) else e)}): "
                     f"restore it, or {MOVE_OUT}") from None
    try:
        tree = load_yaml_text(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadRun(f"config.yaml is not valid YAML{where} ({_one_line(getattr(e, 'problem', None) or e)}): restore "
                     f"it from the run's original directory, or {MOVE_OUT}") from None
    if not isinstance(tree, dict):
        raise BadRun(f"config.yaml holds a {_kind(tree)}, not a mapping: not a harness run config; {MOVE_OUT}")
    config = {str(k): freeze(v) for k, v in flatten(tree).items() if not is_layout_key(str(k))}
    return check_config(config, "config.yaml", "not a harness run config, or a truncated one; restore it from the "
                        f"run's original directory, or {MOVE_OUT}")


def check_config(config: dict, name: str, fix: str) -> dict:
    """`config` if it has the keys runs are grouped by, with the right types; else BadRun."""
    for key, types in REQUIRED_CONFIG.items():
        value = config.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            what = "has no" if key not in config else f"has {key} = {value!r} ({_kind(value)}), not a valid"
            raise BadRun(f"{name} {what} {key}: {fix}")
    return config


def read_result(path: Path) -> Outcome:
    """The checked fields of result.json (status unfinished when there is none yet); BadRun if it is unusable."""
    if not path.exists():
        return Outcome("unfinished")
    try:
        _check_size(path, "copy it again from the run, or delete it to rerun the run")
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadRun(f"result.json cannot be read ({_one_line(e.strerror if isinstance(e, OSError) else e)}): "
                     f"copy it again, or delete it to rerun the run (`harness sweep SPEC` reruns what is missing)") from None
    except json.JSONDecodeError as e:
        raise BadRun(f"result.json is not valid JSON (truncated? {e.msg}: line {e.lineno} column {e.colno}): copy it "
                     f"again from the run, or delete it to rerun the run (`harness sweep SPEC` reruns what is missing)") from None
    except RecursionError:  # json nests one Python frame per level: `[[[[...` a hundred thousand deep
        raise BadRun("result.json is nested too deeply to be a run's result: copy it again from the run, or delete "
                     "it to rerun the run (`harness sweep SPEC` reruns what is missing)") from None
    return outcome_of(result, "result.json")


def outcome_of(result, name: str) -> Outcome:
    """Check a result record (result.json, or the same fields exported as batch-science metadata) field by field."""
    fix = f"fix {name} or delete it to rerun the run"
    if not isinstance(result, dict):
        raise BadRun(f"{name} holds a {_kind(result)}, not a JSON object; {fix}")
    if "status" not in result:
        raise BadRun(f"{name} has no key status; {fix}")
    status = result["status"]
    if not isinstance(status, str) or status not in (*FINISHED, INTERRUPTED):
        raise BadRun(f"{name} key status is {status!r} ({_kind(status)}), expected \"completed\" or \"diverged\"; {fix}")
    if status == INTERRUPTED:
        return Outcome("unfinished")
    name_, higher = _metric_name(result, name, fix)
    out = Outcome(status, name_, higher)
    out.metric = _number(result, name_, name, fix, required=status != DIVERGED)
    out.train_loss = _number(result, "train_loss", name, fix, required=status != DIVERGED, nullable=True)
    out.train_set_loss = _number(result, "train_set_loss", name, fix, required=False, nullable=True)
    out.train_set_accuracy = _number(result, "train_set_accuracy", name, fix, required=False, nullable=True)
    for key in ("steps", "total_steps", "epochs"):
        value = result.get(key)
        setattr(out, key, value if is_number(value) else None)
    return out


def _metric_name(result: dict, name: str, fix: str) -> tuple[str, bool]:
    """The test metric's name and direction: result.json's test_metric, else inferred from the keys present."""
    metric = result.get("test_metric")
    if metric is None:
        present = [m for m in METRIC_DIRECTIONS if m in result]
        if len(present) != 1:
            found = f"several ({', '.join(present)})" if present else "none"
            raise BadRun(f"{name} has no test_metric and {found} of {', '.join(METRIC_DIRECTIONS)}: cannot tell "
                         f"which is the test metric (ambiguous); add \"test_metric\": \"<its key>\" to it")
        return present[0], METRIC_DIRECTIONS[present[0]]  # inferred: its objective's direction
    if not isinstance(metric, str):
        raise BadRun(f"{name} key test_metric is {metric!r} ({_kind(metric)}), expected the name of a key such as "
                     f"\"test_accuracy\"; {fix}")
    if metric not in result:
        raise BadRun(f"{name} names test_metric {metric!r} but has no key {metric}; {fix}")
    higher = result.get("higher_is_better", METRIC_DIRECTIONS.get(metric))
    if not isinstance(higher, bool):
        raise BadRun(f"{name} key higher_is_better is {higher!r} ({_kind(higher)}), expected true or false; {fix}")
    return metric, higher


def _number(result: dict, key: str, name: str, fix: str, required: bool, nullable: bool = False) -> Optional[float]:
    if key not in result:
        if required:
            raise BadRun(f"{name} has no key {key}; {fix}")
        return None
    value = result[key]
    if value is None and (nullable or not required):
        return None
    if not is_number(value):
        expected = "a number" + (" or null" if nullable or not required else "")
        raise BadRun(f"{name} key {key} is {value!r} ({_kind(value)}), expected {expected}; {fix}")
    return float(value)  # inf / NaN stay: the selection counts a non-finite value as the worst
