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

The grid's axis forms and constraints: harness/sweep/grid.py. A run's id is a hash of its resolved config
without the layout keys (harness.core.keys.run_id: micro-batch, device, paths, logging, ... may legitimately
differ between submissions of the same run).
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from harness.core import configlib
from harness.core.configlib import positive
from harness.core.errors import ConfigError
from harness.core.keys import get_dotted, run_id, set_dotted
from harness.recipe.budget import BUDGET_RULES, check_budget_rule
from harness.recipe.selection import Selection
from harness.sweep.grid import Axis, check_grid_size, parse_axis, parse_constraint, satisfies
from harness.train.config import Config, from_dict


@dataclass
class CostSpec:
    # Training examples per second of ONE GPU (images/s, sequences/s), for the GPU-hour estimate of --dry-run.
    examples_per_second_per_gpu: Optional[float] = positive(None)


@dataclass
class ExecutorSpec:
    # Train runs that differ only in lr / seed / weight decay / optimizer as one batched model on one device
    # (harness/train/packed.py: the MLP, Wide-ResNets, ResNets, the autoencoder, the demo convnet). Results equal those
    # run one by one. Unset: where packing is faster, by family and device (packed.pack_choice: on CPU the 2-D conv nets
    # train one by one); true: every packable family (as --pack); false: never (as --no-pack).
    pack: Optional[bool] = None
    # Runs per pack (unset: 128 for the MLP, 8 for the other families: a pack of 8 WRN-16-4 runs at B = 128
    # is one B = 1024 forward in memory). Lower it when a pack does not fit the device.
    max_pack_runs: Optional[int] = positive(None)

    def pack_size(self, model_name: str) -> int:
        return self.max_pack_runs or (128 if model_name == "mlp" else 8)


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
    def requests_gpus(self) -> bool:
        """Whether the array tasks ask SLURM for GPUs: a run with device auto then trains on CUDA (packing, pack_choice)."""
        return bool(self.gpus_per_task or self.gpus_per_node) or any(
            a.startswith(("--gres=gpu", "--gpus")) for a in self.extra_args)

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
class AdaptiveSpec:
    """`adaptive:` of a spec with `search: adaptive`: the rounds' sizes (the rules: harness/sweep/adaptive.py)."""

    window: int = positive(3)  # rates of the first window per (optimizer, B, other swept keys)
    seeds: int = positive(2)  # seeds per rate while locating and widening (the first values of the seed axis)
    margin: int = positive(1)  # grid steps the searched window must reach beyond the error bar on each side


SEARCHES = ("grid", "adaptive")


@dataclass
class SweepSpec:
    base: Union[str, dict]
    grid: Union[dict, list[dict]]
    name: Optional[str] = None
    description: str = ""
    overrides: dict = field(default_factory=dict)
    constraints: list[str] = field(default_factory=list)
    budget_rule: Optional[Literal[BUDGET_RULES]] = None
    select: Selection = field(default_factory=Selection)
    # grid: every grid point; adaptive: rounds that run only the rates that can be optimal (harness/sweep/adaptive.py)
    search: Literal[SEARCHES] = "grid"
    adaptive: AdaptiveSpec = field(default_factory=AdaptiveSpec)
    cost: CostSpec = field(default_factory=CostSpec)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def validate(self, path: str) -> None:
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"spec key name: {self.name!r} must be letters, digits, '.', '_' or '-'")


# ---------------------------------------------------------------------------------------------- runs

LR_KEY = "optim.effective_lr"  # the learning-rate axis an adaptive search searches (harness/sweep/adaptive.py)

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
        set_dotted(base, str(key), value, f"spec key {key}")
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
    if any(not block for block in blocks):  # `grid: {}` would be one run of the base config: say so instead
        raise ConfigError("sweep spec key grid: an empty mapping; give at least one key: values "
                          "(to train the base config once, use `harness train`)")
    constraints = [parse_constraint(c) for c in spec.constraints]
    parsed_blocks = [[parse_axis(str(k), v) for k, v in block.items()] for block in blocks]
    check_grid_size(parsed_blocks)
    runs, seen = [], set()
    dropped = duplicates = 0
    for axes in parsed_blocks:
        keys = {a.key for a in axes}
        for a in axes:
            if a.slide and (a.slide.axis not in keys or next(b for b in axes if b.key == a.slide.axis).slide):
                raise ConfigError(f"grid key {a.key}: slide.axis {a.slide.axis} must be another (non-sliding) axis of the same grid")
        for point in _points(axes):
            raw = copy.deepcopy(base)
            for key, value in point.items():
                set_dotted(raw, key, value, f"spec key {key}")
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
    if spec.search == "adaptive":
        check_adaptive(spec, parsed_blocks)
    return sweep


def check_adaptive(spec: SweepSpec, blocks: list[list[Axis]]) -> None:
    """`search: adaptive` needs one grid mapping with one log2 learning-rate axis and a seed axis with enough seeds."""
    fix = "or use search: grid"
    if len(blocks) != 1:
        raise ConfigError(f"search: adaptive needs one grid mapping, not a list of {len(blocks)}; merge them {fix}")
    axes = {a.key: a for a in blocks[0]}
    lr = axes.get(LR_KEY)
    if lr is None or lr.log2 is None:
        raise ConfigError(f"search: adaptive needs a log2 axis {LR_KEY}: {{log2: [lo, hi]}} in the grid {fix}")
    if "schedule.final_lr" in axes and len(axes["schedule.final_lr"].values) > 1:
        raise ConfigError(f"search: adaptive searches one learning-rate axis; schedule.final_lr is swept too {fix}")
    seeds = axes.get("seed")
    if seeds is None or len(seeds.values) < spec.adaptive.seeds:
        have = len(seeds.values) if seeds else 0
        raise ConfigError(f"search: adaptive needs a seed axis with at least adaptive.seeds = {spec.adaptive.seeds} "
                          f"values (it has {have}); add `seed: {{range: N}}` to the grid or lower adaptive.seeds")


def check_data_paths(configs) -> None:
    """Every distinct (data.name, data.path) of these resolved configs is a shard directory of that kind, or one
    DataError (exit 4) before anything runs: a missing path fails every run alike, so say it once, not per run."""
    from data_pipelines.shards import read_manifest

    for name, path in dict.fromkeys((c["data"]["name"], c["data"]["path"]) for c in configs):
        read_manifest(path, name)


def _points(axes: list[Axis]):
    fixed = [a for a in axes if a.slide is None]
    sliding = [a for a in axes if a.slide is not None]
    for combo in itertools.product(*[a.values for a in fixed]):
        point = dict(zip([a.key for a in fixed], combo))
        for extra in itertools.product(*[a.values_at(point) for a in sliding]):
            full = {**point, **dict(zip([a.key for a in sliding], extra))}
            yield {a.key: full[a.key] for a in axes}  # spec order
