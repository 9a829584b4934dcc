"""The batch plan (W, m, A) and the conversion of durations to steps."""

import json

import pytest

from harness.core.errors import PlanError
from harness.recipe.batch_plan import make_batch_plan, valid_layouts
from harness.recipe.budget import to_steps
from tests.conftest import run_harness, write_config


def test_plan_arithmetic_is_printed():
    plan = make_batch_plan(1024, 4, 64, ghost_batch_size=64)
    assert (plan.accumulation_steps, plan.ranks_per_ghost_group) == (4, 1)
    assert plan.describe() == "1024 = 64 micro x 4 accum x 4 ranks; 16 ghost groups of 64"


def test_micro_batch_derived_from_the_per_device_maximum():
    plan = make_batch_plan(32768, 64, None, max_micro_batch_size=256, ghost_batch_size=64)
    assert (plan.micro_batch_size, plan.accumulation_steps) == (256, 2)
    plan = make_batch_plan(96, 1, None, max_micro_batch_size=64, ghost_batch_size=None)
    assert (plan.micro_batch_size, plan.accumulation_steps) == (48, 2)


def test_slices_tile_the_global_batch_micro_step_major():
    plan = make_batch_plan(256, 2, 64, ghost_batch_size=64)
    slices = [plan.micro_slice(a, r) for a in range(plan.accumulation_steps) for r in range(plan.world_size)]
    assert slices == [(0, 64), (64, 128), (128, 192), (192, 256)]


def test_cross_rank_ghost_groups_span_consecutive_ranks():
    plan = make_batch_plan(256, 4, 16, ghost_batch_size=64)
    assert (plan.accumulation_steps, plan.ranks_per_ghost_group) == (4, 4)
    assert plan.describe().endswith("4 ghost groups of 64, each across 4 ranks")
    with pytest.raises(PlanError, match="ranks per group dividing the world size 2"):
        make_batch_plan(256, 2, 16, ghost_batch_size=64)


@pytest.mark.parametrize("b, w, m, g, fragment", [
    (1000, 4, None, 64, "not a multiple of the ghost batch size 64"),
    (1024, 3, None, 64, "does not divide over 3 ranks"),
    (1024, 4, 96, 64, "impossible layout"),
    (1024, 4, 48, 64, "impossible layout"),
])
def test_impossible_layouts_list_valid_choices(b, w, m, g, fragment):
    with pytest.raises(PlanError) as e:
        make_batch_plan(b, w, m, ghost_batch_size=g)
    msg = str(e.value)
    assert fragment in msg and ("valid (W, m, A)" in msg or "world sizes that work" in msg or "use a multiple" in msg)
    assert "\n" not in msg


def test_valid_layouts_respect_ghost_groups():
    assert valid_layouts(256, 2, 64) == [(2, 32, 4), (2, 64, 2), (2, 128, 1)]


def test_durations_convert_in_one_place():
    d = to_steps(None, 200, 50000, 1024)  # Table 1: 200 epochs at B = 1024 on CIFAR-10
    assert d.total_steps == 9765
    d = to_steps(100, None, 1000, 10, eval_every_epochs=2, checkpoint_every_steps=7)
    assert (d.total_steps, d.eval_every, d.checkpoint_every, d.epochs) == (100, 200, 7, 1.0)


def test_plan_command_json(tmp_path, cifar_shards):
    cfg = write_config(tmp_path / "c.yaml", f"model: {{name: wrn, depth: 16, width: 4}}\n"
                                            f"data: {{name: cifar10, path: {cifar_shards}}}\nbudget: {{epochs: 2}}\n")
    out = json.loads(run_harness("plan", cfg, "--world-size", 4, "--json", "--set", "batch.global_batch_size=1024").stdout)
    assert out["parameters"] == 2_748_890  # WRN-16-4, 10 classes
    assert (out["world_size"], out["micro_batch_size"], out["accumulation_steps"], out["global_batch_size"]) == (4, 256, 1, 1024)
    bad = run_harness("plan", cfg, "--world-size", 3, "--set", "batch.global_batch_size=1024", check=False)
    assert bad.returncode == 3 and len(bad.stderr.strip().splitlines()) == 1
