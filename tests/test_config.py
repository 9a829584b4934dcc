"""Strict config loading: unknown keys and wrong types are one-line errors that name the problem."""

import pytest

from harness.core import configlib
from harness.core.errors import ConfigError
from harness.train.config import Config, config_hash, from_dict, load_config, to_yaml
from tests.conftest import ROOT, run_harness, write_config

BASE = {"data": {"name": "cifar10", "path": "/data/c10"}, "budget": {"steps": 10}}


def load(**sections):
    return from_dict({**BASE, **sections})


@pytest.mark.parametrize(
    "data, key, valid",
    [
        ({"sed": 1}, "sed", "seed"),
        ({"optim": {"efective_lr": 1.0}}, "optim.efective_lr", "effective_lr"),
        ({"batch": {"global_batchsize": 64}}, "batch.global_batchsize", "global_batch_size"),
        ({"model": {"name": "wrn", "dept": 16}}, "model.dept", "depth"),
        ({"schedule": {"decay": 2}}, "schedule.decay", "decay_factor"),
    ],
)
def test_unknown_key_names_it_and_lists_valid_keys(data, key, valid):
    with pytest.raises(ConfigError) as e:
        from_dict({**BASE, **data})
    msg = str(e.value)
    assert f"unknown config key {key}" in msg and valid in msg and "valid keys" in msg
    assert "\n" not in msg


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(ConfigError, match=r"optim.effective_lr: expected float, got 'fast' \(str\)"):
        load(optim={"effective_lr": "fast"})
    with pytest.raises(ConfigError, match=r"batch.global_batch_size: expected int, got 12.5"):
        load(batch={"global_batch_size": 12.5})
    with pytest.raises(ConfigError, match=r"precision: 'fp16' is not one of: fp32, fp64, bf16"):
        load(precision="fp16")
    with pytest.raises(ConfigError, match=r"log.tensorboard: expected bool"):
        load(log={"tensorboard": "yes"})


def test_bounds_and_cross_field_rules():
    with pytest.raises(ConfigError, match=r"batch.global_batch_size: must be > 0, got 0"):
        load(batch={"global_batch_size": 0})
    with pytest.raises(ConfigError, match=r"momentum: must be in \[0, 1\)"):
        load(optim={"momentum": 1.0})
    with pytest.raises(ConfigError, match="exactly one of budget.steps or budget.epochs"):
        from_dict({**BASE, "budget": {"steps": 5, "epochs": 2}})
    with pytest.raises(ConfigError, match="exactly one of budget.steps or budget.epochs"):
        from_dict({**BASE, "budget": {}})
    with pytest.raises(ConfigError, match="data.path is not set; .*harness data convert cifar10"):
        from_dict({"data": {"name": "cifar10"}, "budget": {"steps": 1}})
    with pytest.raises(ConfigError, match="depth 6n\\+4"):
        load(model={"name": "wrn", "depth": 12})


def test_yaml_1_1_exponent_strings_are_floats():
    # PyYAML reads `1e-3` (no dot) as a string; the loader accepts it for float keys.
    assert load(optim={"effective_lr": "1e-3"}).optim.effective_lr == 1e-3


def test_overrides_reach_any_depth_and_are_checked(tmp_path):
    path = write_config(tmp_path / "c.yaml", "data: {name: cifar10, path: /x}\nbudget: {epochs: 200}\n")
    cfg = load_config(path, ["optim.effective_lr=0.25", "model.depth=10", "model.width=1",
                             "budget.epochs=null", "budget.steps=8", "batch.micro_batch_size=32"])
    assert (cfg.optim.effective_lr, cfg.model.depth, cfg.model.width, cfg.budget.steps, cfg.batch.micro_batch_size) == (
        0.25, 10, 1, 8, 32)
    with pytest.raises(ConfigError, match="unknown config key optim.lr"):
        load_config(path, ["optim.lr=0.1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(path, ["optim.effective_lr"])


def test_model_name_selects_the_model_keys():
    cfg = load(model={"name": "mlp", "hidden": [32]})
    assert cfg.model.hidden == [32] and cfg.model.ghost_group_size() is None
    with pytest.raises(ConfigError, match="unknown config key model.depth"):
        load(model={"name": "mlp", "depth": 16})
    with pytest.raises(ConfigError, match="model.name: 'resnet9000' is not one of"):
        load(model={"name": "resnet9000"})


def test_resolved_config_round_trips():
    cfg = load(optim={"name": "sgd", "effective_lr": 0.5}, model={"name": "wrn", "depth": 10, "width": 2})
    again = from_dict(__import__("yaml").safe_load(to_yaml(cfg)))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert isinstance(Config().model.depth, int)  # defaults live in the classes


def test_cli_error_is_one_line_without_traceback(tmp_path):
    path = write_config(tmp_path / "bad.yaml", "data: {name: cifar10, path: /x}\nbudget: {steps: 1}\noptim:\n  efective_lr: 1\n")
    proc = run_harness("train", path, "--run-dir", tmp_path / "run", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "unknown config key optim.efective_lr (did you mean 'effective_lr'?)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_is_a_config_error(tmp_path):
    path = write_config(tmp_path / "bad.yaml", "optim: {effective_lr: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        configlib.read_yaml(path)


def test_run_ids_survive_new_keys_at_their_neutral_default():
    """A resubmitted sweep must find the runs it finished before the harness grew a key: the ids of the paper's
    configs are the ones the harness gave them before `data.train_examples` and `speed.*` existed."""
    from harness.core.configlib import to_dict
    from harness.core.keys import run_id

    expected = {"digits_mlp": "9ed726d83d", "cifar10_wrn16_4": "3e862c6017", "ptb_lstm": "4dc42a8ef7"}
    for name, rid in expected.items():
        assert run_id(to_dict(load_config(ROOT / "yaml" / f"{name}.yaml"))) == rid, name
    cfg = load_config(ROOT / "yaml" / "digits_mlp.yaml", ["data.train_examples=1000"])
    assert run_id(to_dict(cfg)) != expected["digits_mlp"]  # used, the key is science
