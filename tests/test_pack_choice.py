"""The sweep executor packs runs only where packing is faster: by family and device (harness.train.packed.pack_choice),
overridable with --pack / --no-pack, said once at the start of a sweep."""

import json

import pytest

from harness.cli import main
from harness.train.packed import PACKABLE_MODELS, pack_choice
from tests.conftest import write_config


def cfg(model: str, device: str = "auto", **extra) -> dict:
    return {"model": {"name": model}, "data": {"name": "digits"}, "optim": {}, "precision": "fp32",
            "backend": "ddp", "device": device, **extra}


@pytest.mark.parametrize("model", PACKABLE_MODELS)
def test_pack_choice_by_family_and_device(model):
    conv = model in ("wrn", "resnet")
    # Default: on CPU the 2-D conv nets train one by one (their packs are slower there), everything else packs.
    assert pack_choice(cfg(model, "cpu"), None, cuda_available=True)[0] is not conv
    assert pack_choice(cfg(model), None, cuda_available=False)[0] is not conv  # auto without CUDA: the CPU
    assert pack_choice(cfg(model), None, cuda_available=True)[0]  # auto with CUDA: every family packs
    assert pack_choice(cfg(model, "cuda"), None, cuda_available=False)[0]
    # --pack and --no-pack override the device's choice.
    assert pack_choice(cfg(model, "cpu"), True, cuda_available=False) == (True, "--pack")
    assert pack_choice(cfg(model, "cuda"), False, cuda_available=True) == (False, "--no-pack")
    if conv:
        assert "--pack" in pack_choice(cfg(model, "cpu"), None, cuda_available=False)[1]  # the reason names the fix


def test_unpackable_runs_stay_unpacked_even_with_pack():
    assert pack_choice(cfg("lstm", "cuda"), True, cuda_available=True) == (False, "model lstm is not packable (only "
                                                                            + ", ".join(PACKABLE_MODELS) + ")")
    assert not pack_choice(cfg("mlp", "cpu", precision="bf16"), True, cuda_available=False)[0]


def spec(tmp_path, shards, data: str, model: str, name: str):
    return write_config(tmp_path / f"{name}.yaml", f"""
name: {name}
base:
  model: {model}
  data: {{name: {data}, path: {shards}}}
  batch: {{global_batch_size: 32}}
  budget: {{steps: 3}}
  device: cpu
  log: {{every_steps: 3, tensorboard: false}}
grid:
  optim.effective_lr: [0.05, 0.1]
select: {{k: 1, n: 1}}
""")


def sweep(capsys, *args) -> str:
    with pytest.raises(SystemExit) as done:
        main(["sweep", *map(str, args), "--max-parallel", "1"])
    assert done.value.code == 0
    return capsys.readouterr().out


def packed_runs(sweep_dir) -> list:
    return [json.loads(p.read_text()).get("packed_runs") for p in sorted(sweep_dir.glob("*/result.json"))]


@pytest.mark.slow
def test_cpu_sweep_trains_a_2d_conv_net_one_by_one_and_packs_the_convnet_and_an_mlp(tmp_path, capsys, cifar_shards,
                                                                                    mnist1d_shards, digits_shards):
    """Through the real local executor (in this process, one worker): the WRN's two runs train one by one, the 1-D
    convnet's two and the MLP's two each as one pack; each sweep says so once at its start; --pack packs the WRN's
    runs after all."""
    wrn = spec(tmp_path, cifar_shards, "cifar10", "{name: wrn, depth: 10, width: 1, ghost_batch_size: 32}", "wrn")
    out = sweep(capsys, wrn, "--sweep-dir", tmp_path / "wrn")
    assert out.count("packing:") == 1
    assert "packing: wrn on cpu: one by one (packed 2-D conv nets train slower than one by one on cpu" in out
    assert "2 to run (2 tasks, 0 of them packs)" in out
    assert packed_runs(tmp_path / "wrn") == [None, None]
    forced = sweep(capsys, wrn, "--sweep-dir", tmp_path / "forced", "--pack", "--dry-run")
    assert "packing: wrn on cpu: packs (--pack)" in forced and "1 tasks (1 packs" in forced

    conv = spec(tmp_path, mnist1d_shards, "mnist1d", "{name: convnet, channels: [4, 4, 4], ghost_batch_size: 16}", "conv")
    out = sweep(capsys, conv, "--sweep-dir", tmp_path / "conv")
    assert out.count("packing:") == 1
    assert "packing: convnet on cpu: packs (1-D conv net packs train faster than one by one on cpu)" in out
    assert "2 to run (1 tasks, 1 of them packs)" in out
    assert packed_runs(tmp_path / "conv") == [2, 2]

    mlp = spec(tmp_path, digits_shards, "digits", "{name: mlp, hidden: [16]}", "mlp")
    out = sweep(capsys, mlp, "--sweep-dir", tmp_path / "mlp")
    assert "packing: mlp on cpu: packs (fully connected packs train faster than one by one on cpu)" in out
    assert "2 to run (1 tasks, 1 of them packs)" in out
    assert packed_runs(tmp_path / "mlp") == [2, 2]
