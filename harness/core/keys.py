"""Dotted config keys (`optim.effective_lr`), the layout keys, and the run id.

A config is a tree of mappings; a dotted key names one leaf. The *layout keys* change how a run is laid out,
logged or where its files are, never its trajectory (promise 1: the same config gives the same run at any
nodes x GPUs x accumulation layout); they may differ between the segments of one run, and they are left out
of the run id. The *run id* is a hash of everything else, the run's science: the same science always maps to
the same id, whichever layout trains it (default run directories and sweep run ids alike).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from harness.core.errors import ConfigError

# Keys that may differ when a run directory is resumed: they change the layout, the logging or where
# files are, never the trajectory. A key ending in "." names a whole section.
LAYOUT_KEYS = ("batch.micro_batch_size", "batch.max_micro_batch_size", "device", "backend", "deepspeed.", "data.path",
               "data.eval_batch_size", "data.workers", "data.gpu_decode", "log.", "checkpoint.", "eval.", "speed.", "distributed.")


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config mapping as {dotted.key: value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def get_dotted(tree: dict, key: str, where: str | None = None) -> Any:
    """tree[a][b][c] for key "a.b.c"; ConfigError naming `where` (or the key) if there is no such key."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where or key}: no config key {key}")
        node = node[part]
    return node


def set_dotted(tree: dict, key: str, value: Any, what: str | None = None) -> None:
    """tree[a][b][c] = value for key "a.b.c", creating sections; `what` names the source in errors."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{what or key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def is_layout_key(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in LAYOUT_KEYS)


# Science keys added after sweeps had been run, with the value that means "as before": at that value they stay
# out of the run id, so a resubmitted sweep still finds the runs it finished before the key existed.
NEUTRAL_DEFAULTS = {"data.train_examples": None}


def science(config: dict) -> dict:
    """The flattened resolved config without the layout keys: what makes a run this run."""
    return {k: v for k, v in flatten(config).items()
            if not is_layout_key(k) and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}


def run_id(config: dict) -> str:
    """A 10-character id of a resolved config's science (sweep run ids and default run directory names)."""
    text = json.dumps(science(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
