"""Sweep specs: a base config plus a grid over any config keys, expanded into runs with deterministic ids.

A spec (YAML, loaded strictly like a config):

    name: table1                       # default: the file's stem
    base: cifar10_wrn16_4.yaml         # a config file (relative to the spec) or an inline mapping
    overrides: {budget.epochs: null, budget.steps: 9765}   # dotted keys applied to the base
    grid:                              # one mapping, or a list of mappings (their union)
      batch.global_batch_size: {log2: [8, 15]}             # 256 ... 32768
      optim.effective_lr: {log2: [-2, 6]}                  # eps_eff on a log2 grid (sec. 4)
      seed: {range: 15}
    budget_rule: constant_steps        # or constant_epochs, epoch_sweep (sec. 2); checked against the runs
    select: {k: 12, n: 15}             # best k of n runs per (optimizer, B, lr) (sec. 4)

Axis forms: a list of values; a scalar; `{range: N}` or `{range: [a, b]}`; `{log2: [lo, hi], step: 1,
scale: 1}` = scale * 2^e for e = lo, lo+step, ..., hi; a log2 axis may `slide` with another axis:
`slide: {axis: batch.global_batch_size, ref: 64, rate: 1, min: 0, max: 5}` shifts the exponents by
clamp(rate * log2(B / ref), min, max), so the window follows the linear scaling rule (sec. 3.2) and stops
where it saturates. `constraints: ["schedule.final_lr < optim.effective_lr"]` drops grid points (sec. 7.1).

A run's id is a hash of its resolved config without the layout keys (harness.config.LAYOUT_KEYS: micro-batch,
device, paths, logging, ...), which may legitimately differ between submissions of the same run.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from harness import configlib
from harness.config import Config, flatten, from_dict, is_layout_key
from harness.configlib import positive
from harness.errors import ConfigError

BUDGET_RULES = ("constant_steps", "constant_epochs", "epoch_sweep")


@dataclass
class SelectSpec:
    # Keep the best k of the n runs (seeds) of each (optimizer, B, lr) cell (sec. 4: 12 of 15; LSTM,
    # autoencoder and sec. 7.1: 5 of 7; ResNet-50: 1 of 1).
    k: int = positive(12)
    n: int = positive(15)

    def validate(self, path: str) -> None:
        if self.k > self.n:
            raise ConfigError(f"spec key {path}: k ({self.k}) must not exceed n ({self.n})")


@dataclass
class CostSpec:
    # Training examples per second of ONE GPU (images/s, sequences/s), for the GPU-hour estimate of --dry-run.
    examples_per_second_per_gpu: Optional[float] = positive(None)


@dataclass
class ExecutorSpec:
    # Train runs that differ only in lr / seed / optimizer as one batched model in one process
    # (harness/packed.py; models without batch norm or dropout: mlp). Results are the same as one by one.
    pack: bool = True
    max_pack_runs: int = positive(128)


@dataclass
class SlurmSpec:
    time: str = "04:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    gpus_per_task: Optional[int] = positive(None)
    cpus_per_task: Optional[int] = positive(None)
    mem: Optional[str] = None
    # Runs that need several GPUs or nodes each (ResNet-50 at large B): every array task gets `nodes` nodes
    # (`gpus_per_node` GPUs each) and trains its runs one after another, each through `python -m launch`
    # (srun + torchrun across the task's nodes, `nproc_per_node` processes per node: default the GPUs SLURM
    # gave, 1 on a CPU-only node). Unset (1 node, at most 1 GPU or process): runs train in the task's process.
    nodes: int = positive(1)
    gpus_per_node: Optional[int] = positive(None)
    nproc_per_node: Optional[int] = positive(None)
    # Unpackable runs per array task, trained one after another in one process (saves start-up).
    runs_per_task: int = positive(1)
    extra_args: list[str] = field(default_factory=list)

    @property
    def launched(self) -> bool:
        """Whether each run of a task is started through the launch entry (several processes per run)."""
        return self.nodes > 1 or (self.gpus_per_node or 1) > 1 or (self.nproc_per_node or 1) > 1

    def validate(self, path: str) -> None:
        if self.gpus_per_task is not None and self.gpus_per_node is not None:
            raise ConfigError(f"spec keys {path}.gpus_per_task and {path}.gpus_per_node: give one (gpus_per_node "
                              "with nodes for runs that use several GPUs, gpus_per_task for one-GPU runs)")
        if self.gpus_per_task is not None and self.launched:
            raise ConfigError(f"spec key {path}.gpus_per_task: with {path}.nodes or {path}.nproc_per_node above 1, "
                              f"give the GPUs as {path}.gpus_per_node")

    def describe(self) -> str:
        """Where one run trains, for --dry-run."""
        if not self.launched:
            return "one process per task" + (f" with {self.gpus_per_task} GPU(s)" if self.gpus_per_task else "")
        gpus = f", {self.gpus_per_node} GPU(s) each" if self.gpus_per_node else ""
        procs = self.nproc_per_node or (f"{self.gpus_per_node} (one per GPU)" if self.gpus_per_node else "1 per GPU SLURM gives")
        return f"each run on {self.nodes} node(s){gpus}, {procs} process(es) per node, through python -m launch"


@dataclass
class SweepSpec:
    base: Union[str, dict]
    grid: Union[dict, list[dict]]
    name: Optional[str] = None
    description: str = ""
    overrides: dict = field(default_factory=dict)
    constraints: list[str] = field(default_factory=list)
    budget_rule: Optional[Literal[BUDGET_RULES]] = None
    select: SelectSpec = field(default_factory=SelectSpec)
    cost: CostSpec = field(default_factory=CostSpec)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def validate(self, path: str) -> None:
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"spec key name: {self.name!r} must be letters, digits, '.', '_' or '-'")


# ---------------------------------------------------------------------------------------------- axes


@dataclass(frozen=True)
class Slide:
    axis: str
    ref: float
    rate: float = 1.0
    min: float = -math.inf
    max: float = math.inf


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple  # for a sliding axis: the window before the shift
    log2: Optional[tuple] = None  # (exponents, scale) when given as {log2: ...}
    step: float = 1.0
    slide: Optional[Slide] = None

    def values_at(self, point: dict) -> list:
        if self.slide is None:
            return list(self.values)
        other = point[self.slide.axis]
        if not isinstance(other, (int, float)) or other <= 0:
            raise ConfigError(f"grid key {self.key}: slide.axis {self.slide.axis} must be a positive number, got {other!r}")
        shift = min(self.slide.max, max(self.slide.min, self.slide.rate * math.log2(other / self.slide.ref)))
        shift = round(shift / self.step) * self.step  # stay on the grid's lattice
        exponents, scale = self.log2
        return [_pow2(e + shift, scale) for e in exponents]

    def describe(self) -> str:
        if self.log2 is not None:
            exps, scale = self.log2
            text = f"{_fmt_scale(scale)}2^{_fmt_num(exps[0])} .. 2^{_fmt_num(exps[-1])} ({len(exps)} values, log2 step {_fmt_num(self.step)})"
            if self.slide:
                s = self.slide
                text += (f", sliding with {s.axis}: +{_fmt_num(s.rate)} per doubling from {_fmt_num(s.ref)}"
                         f" (shift {_fmt_num(s.min)}..{_fmt_num(s.max)})")
            return text
        vals = list(self.values)
        shown = ", ".join(map(_fmt_value, vals if len(vals) <= 8 else vals[:3] + ["..."] + vals[-2:]))
        return f"{shown} ({len(vals)} value{'s' if len(vals) != 1 else ''})"


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _fmt_scale(scale: float) -> str:
    return "" if scale == 1 else f"{scale:g} x "


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _pow2(e: float, scale: float) -> float:
    e = round(e, 9)
    return scale * 2.0 ** e


AXIS_KEYS = ("values", "range", "log2", "step", "scale", "slide")
SLIDE_KEYS = ("axis", "ref", "rate", "min", "max")


def parse_axis(key: str, spec: Any) -> Axis:
    where = f"grid key {key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of values; give at least one")
        return Axis(key, tuple(spec))
    if not isinstance(spec, dict):
        return Axis(key, (spec,))
    unknown = [k for k in spec if k not in AXIS_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown axis form {unknown[0]!r}; valid: {', '.join(AXIS_KEYS)} "
                          "(e.g. {log2: [-2, 6]}, {range: 15}, [64, 128])")
    forms = [k for k in ("values", "range", "log2") if k in spec]
    if len(forms) != 1:
        raise ConfigError(f"{where}: give exactly one of values, range, log2 (got {', '.join(forms) or 'none'})")
    if "values" in spec:
        if set(spec) - {"values"}:
            raise ConfigError(f"{where}: 'values' takes no other keys")
        return parse_axis(key, list(spec["values"]) if isinstance(spec["values"], list) else [spec["values"]])
    if "range" in spec:
        r = spec["range"]
        if set(spec) - {"range"}:
            raise ConfigError(f"{where}: 'range' takes no other keys")
        if isinstance(r, int) and not isinstance(r, bool) and r > 0:
            return Axis(key, tuple(range(r)))
        if isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r) and r[0] < r[1]:
            return Axis(key, tuple(range(r[0], r[1])))
        raise ConfigError(f"{where}: range must be a positive count N (0..N-1) or [start, stop) integers, got {r!r}")
    lo_hi = spec["log2"]
    if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(_is_num(x) for x in lo_hi) and lo_hi[0] <= lo_hi[1]):
        raise ConfigError(f"{where}: log2 must be [lowest, highest] exponents, got {lo_hi!r}")
    step = _number(spec.get("step", 1), f"{where}.step", positive=True)
    scale = _number(spec.get("scale", 1), f"{where}.scale", positive=True)
    n = (lo_hi[1] - lo_hi[0]) / step
    if abs(n - round(n)) > 1e-9:
        raise ConfigError(f"{where}: log2 range {lo_hi} is not a whole number of steps of {step}")
    exponents = tuple(round(lo_hi[0] + i * step, 9) for i in range(int(round(n)) + 1))
    slide = None
    if "slide" in spec:
        s = spec["slide"]
        if not isinstance(s, dict) or "axis" not in s or "ref" not in s:
            raise ConfigError(f"{where}.slide: give {{axis: KEY, ref: VALUE, rate: 1, min: 0, max: M}}")
        bad = [k for k in s if k not in SLIDE_KEYS]
        if bad:
            raise ConfigError(f"{where}.slide: unknown key {bad[0]!r}; valid: {', '.join(SLIDE_KEYS)}")
        slide = Slide(str(s["axis"]), _number(s["ref"], f"{where}.slide.ref", positive=True),
                      _number(s.get("rate", 1.0), f"{where}.slide.rate"),
                      _number(s.get("min", -math.inf), f"{where}.slide.min"),
                      _number(s.get("max", math.inf), f"{where}.slide.max"))
    return Axis(key, tuple(_pow2(e, scale) for e in exponents), (exponents, scale), step, slide)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(x: Any, where: str, positive: bool = False) -> float:
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            pass
    if not _is_num(x) or (positive and x <= 0):
        raise ConfigError(f"{where}: expected a {'positive ' if positive else ''}number, got {x!r}")
    return float(x)


# ---------------------------------------------------------------------------------------------- constraints

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*|-?[\d.]+(?:[eE]-?\d+)?)\s*(<=|>=|==|!=|<|>)\s*([A-Za-z_][\w.]*|-?[\d.]+(?:[eE]-?\d+)?)\s*$")


def parse_constraint(text: str):
    m = CONSTRAINT.match(text)
    if not m:
        raise ConfigError(f"spec constraint {text!r}: expected 'KEY OP KEY_OR_NUMBER' with OP one of {' '.join(OPS)}, "
                          "e.g. 'schedule.final_lr < optim.effective_lr'")
    lhs, op, rhs = m.groups()
    return lhs, OPS[op], rhs


def _operand(cfg_dict: dict, token: str) -> Any:
    try:
        return float(token)
    except ValueError:
        return get_dotted(cfg_dict, token, where=f"constraint operand {token}")


def satisfies(cfg_dict: dict, constraints: list) -> bool:
    """A null operand means the constraint does not apply to this run."""
    for lhs, op, rhs in constraints:
        a, b = _operand(cfg_dict, lhs), _operand(cfg_dict, rhs)
        if a is not None and b is not None and not op(a, b):
            return False
    return True


# ---------------------------------------------------------------------------------------------- dotted keys


def get_dotted(tree: dict, key: str, where: str | None = None) -> Any:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where or key}: no config key {key}")
        node = node[part]
    return node


def science(cfg_dict: dict) -> dict:
    """The flattened resolved config without the layout keys: what makes a run this run."""
    return {k: v for k, v in flatten(cfg_dict).items() if not is_layout_key(k)}


def run_id(cfg_dict: dict) -> str:
    text = json.dumps(science(cfg_dict), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- runs

# Short labels for run directory names (TensorBoard shows them); other keys use their last part.
LABELS = {"optim.name": "", "batch.global_batch_size": "B", "optim.effective_lr": "lr", "schedule.final_lr": "flr",
          "seed": "s", "budget.epochs": "ep", "budget.steps": "st", "model.norm": ""}


def run_name(point: dict, rid: str) -> str:
    parts = []
    for key, value in point.items():
        label = LABELS.get(key, key.rsplit(".", 1)[-1])
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(re.sub(r"[^A-Za-z0-9._+-]", "_", f"{label}{text}"))
    return "-".join([*parts, rid])[:150]


@dataclass
class Run:
    id: str
    name: str
    point: dict  # the grid values of this run, resolved (after strict loading)
    config: dict  # the resolved config as plain dicts (to_dict of Config), or the raw one if unresolved
    model_checked: bool = True  # False: the model family is not in this build (dry-run only)
    model_note: str = ""

    def dir(self, sweep_dir: Path) -> Path:
        return Path(sweep_dir) / self.name

    def resolved(self) -> Config:
        return from_dict(self.config)


@dataclass
class Sweep:
    spec: SweepSpec
    name: str
    spec_path: Optional[Path]
    base: dict  # the base config after overrides, before the grid
    blocks: list[list[Axis]]
    runs: list[Run]
    dropped: int  # grid points removed by constraints
    duplicates: int  # grid points that resolved to an already listed run

    @property
    def axis_keys(self) -> list[str]:
        keys = []
        for block in self.blocks:
            keys += [a.key for a in block if a.key not in keys]
        return keys


def load_spec(path: str | Path, allow_unchecked_models: bool = False) -> Sweep:
    """Read, validate and expand a sweep spec file."""
    path = Path(path)
    data = configlib.read_yaml(path)
    if "grid" not in data and any(k in data for k in ("model", "data", "optim", "budget")):
        raise ConfigError(f"{path} is a run config, not a sweep spec: train it with `harness train {path}`, or write a "
                          f"spec with `base: {path.name}` and a `grid:` (see yaml/table1.yaml)")
    try:
        return expand(_load_spec_dict(data), path, allow_unchecked_models)
    except ConfigError as e:
        raise ConfigError(f"sweep spec {path}: {e}") from None


def _load_spec_dict(data: dict) -> SweepSpec:
    try:
        return configlib.load(SweepSpec, data)
    except ConfigError as e:
        # configlib says "config key"; in a spec the keys are the spec's.
        raise ConfigError(str(e).replace("config key", "sweep spec key").replace("config file:", "sweep spec:")) from None


def _base_dict(spec: SweepSpec, spec_path: Optional[Path]) -> dict:
    if isinstance(spec.base, str):
        where = (spec_path.parent if spec_path else Path.cwd()) / spec.base
        base = configlib.read_yaml(where)
    else:
        base = copy.deepcopy(spec.base)
    for key, value in spec.overrides.items():
        configlib.set_dotted(base, str(key), value, f"spec key {key}")
    return base


def _resolve(raw: dict, allow_unchecked_models: bool) -> tuple[dict, bool, str]:
    """(resolved config dict, model checked?, note). Strict; a model section that this build cannot
    load is tolerated only when allowed (dry-run of configs for model families not merged yet)."""
    try:
        return configlib.to_dict(from_dict(raw)), True, ""
    except ConfigError as e:
        if not allow_unchecked_models or "model" not in raw:
            raise
        try:
            configlib.load(Config, {"model": raw["model"]})
        except ConfigError as model_error:
            rest = {k: v for k, v in raw.items() if k != "model"}
            resolved = configlib.to_dict(from_dict(rest))  # everything but the model, strictly
            resolved["model"] = copy.deepcopy(raw["model"])
            return resolved, False, str(model_error)
        raise e


def expand(spec: SweepSpec, spec_path: Optional[Path] = None, allow_unchecked_models: bool = False) -> Sweep:
    name = spec.name or (spec_path.stem if spec_path else "sweep")
    base = _base_dict(spec, spec_path)
    blocks = [spec.grid] if isinstance(spec.grid, dict) else list(spec.grid)
    if not blocks:
        raise ConfigError("sweep spec key grid: an empty list; give at least one mapping of key: values")
    constraints = [parse_constraint(c) for c in spec.constraints]
    parsed_blocks, runs, seen = [], [], set()
    dropped = duplicates = 0
    for block in blocks:
        axes = [parse_axis(str(k), v) for k, v in block.items()]
        parsed_blocks.append(axes)
        keys = {a.key for a in axes}
        for a in axes:
            if a.slide and (a.slide.axis not in keys or next(b for b in axes if b.key == a.slide.axis).slide):
                raise ConfigError(f"grid key {a.key}: slide.axis {a.slide.axis} must be another (non-sliding) axis of the same grid")
        for point in _points(axes):
            raw = copy.deepcopy(base)
            for key, value in point.items():
                configlib.set_dotted(raw, key, value, f"spec key {key}")
            resolved, checked, note = _resolve(raw, allow_unchecked_models)
            if not satisfies(resolved, constraints):
                dropped += 1
                continue
            rid = run_id(resolved)
            if rid in seen:
                duplicates += 1
                continue
            seen.add(rid)
            shown = {k: get_dotted(resolved, k) for k in point}
            runs.append(Run(rid, run_name(shown, rid), shown, resolved, checked, note))
    if not runs:
        raise ConfigError(f"sweep {name}: the grid expands to no runs (constraints dropped {dropped})")
    sweep = Sweep(spec, name, spec_path, base, parsed_blocks, runs, dropped, duplicates)
    check_budget_rule(spec.budget_rule, runs)
    return sweep


def _points(axes: list[Axis]):
    fixed = [a for a in axes if a.slide is None]
    sliding = [a for a in axes if a.slide is not None]
    for combo in itertools.product(*[a.values for a in fixed]):
        point = dict(zip([a.key for a in fixed], combo))
        for extra in itertools.product(*[a.values_at(point) for a in sliding]):
            full = {**point, **dict(zip([a.key for a in sliding], extra))}
            yield {a.key: full[a.key] for a in axes}  # spec order


def budget_rule_of(runs: list[Run]) -> str:
    steps = {r.config["budget"]["steps"] for r in runs}
    epochs = {r.config["budget"]["epochs"] for r in runs}
    batches = {r.config["batch"]["global_batch_size"] for r in runs}
    if None not in steps and len(steps) == 1:
        return "constant_steps"
    if None not in epochs and len(epochs) == 1:
        return "constant_epochs"
    if None not in epochs and len(batches) == 1:
        return "epoch_sweep"
    return "mixed"


def check_budget_rule(rule: Optional[str], runs: list[Run]) -> None:
    if rule is None:
        return
    found = budget_rule_of(runs)
    if found != rule:
        steps = sorted({r.config["budget"]["steps"] for r in runs}, key=str)
        epochs = sorted({r.config["budget"]["epochs"] for r in runs}, key=str)
        batches = sorted({r.config["batch"]["global_batch_size"] for r in runs})
        need = {"constant_steps": "one budget.steps for every run (and budget.epochs null)",
                "constant_epochs": "one budget.epochs for every run",
                "epoch_sweep": "budget.epochs swept at one batch size"}[rule]
        raise ConfigError(f"sweep spec key budget_rule: {rule} needs {need}; the grid gives budget.steps {steps}, "
                          f"budget.epochs {epochs}, batch sizes {batches}")


# ---------------------------------------------------------------------------------------------- steps and cost


@functools.lru_cache(maxsize=64)
def _describe_data(name: str, path: Optional[str]):
    from data_pipelines import describe

    return describe(name, path)


def run_steps(config: dict) -> tuple[int, float]:
    """(optimizer steps, epochs) of a run, from its budget and the dataset's size (manifest or standard)."""
    from harness.plan import to_steps

    from data_pipelines import examples_per_epoch

    spec, _ = _describe_data(config["data"]["name"], config["data"]["path"])
    b = config["batch"]["global_batch_size"]
    n = examples_per_epoch(spec, b, _sequence_length(config["model"]))
    d = to_steps(config["budget"]["steps"], config["budget"]["epochs"], n, b)
    return d.total_steps, d.epochs


def _sequence_length(model: dict) -> Optional[int]:
    """The model's tokens per stream per step (language models; PTB epochs depend on it), from its config
    class when this build has it, else the raw `unroll` key."""
    import models

    cls = models.config_class(model.get("name"))
    if cls is None:
        return model.get("unroll")
    try:
        return configlib.load(cls, model).sequence_length()
    except ConfigError:
        return model.get("unroll")


def data_source(config: dict) -> str:
    return _describe_data(config["data"]["name"], config["data"]["path"])[1]
