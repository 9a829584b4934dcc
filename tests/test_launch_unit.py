"""The launch entry and the DeepSpeed config, without starting anything: layouts from (fake) SLURM
environments, the exact command lines, refusals, the generated DeepSpeed config and its user overrides,
and the sbatch scripts' directives."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from harness.core.errors import ConfigError, LaunchError
from harness.recipe.batch_plan import make_batch_plan
from launch.core import build_commands, gpus_from_slurm, head_node, node_address, resolve_layout, slurm_port
from tests.conftest import ROOT, harness_env


def fake_scontrol(hostnames=("gpu017", "gpu018"), node_addr="10.1.0.17", fail=False):
    calls = []

    def run(args):
        calls.append(list(args))
        if fail:
            raise LaunchError("cannot work out the head node: `scontrol show hostnames` failed (no controller)")
        if args[:2] == ["show", "hostnames"]:
            return "\n".join(hostnames) + "\n"
        if args[:2] == ["show", "node"]:
            return f"NodeName={args[-1]} Arch=x86_64 CoresPerSocket=32 NodeAddr={node_addr} NodeHostName={args[-1]}\n"
        raise AssertionError(args)

    run.calls = calls
    return run


def resolves(host, port):
    return [(socket.AF_INET, None, None, "", (host, 0))]


SLURM = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[017-018]"}


def slurm_layout(env, **kw):
    kw.setdefault("scontrol", fake_scontrol())
    return resolve_layout(env, resolve=resolves, **kw)  # the fake cluster's hosts do not exist here


def test_slurm_layout_head_node_port_and_gpus():
    scontrol = fake_scontrol()
    layout = slurm_layout({**SLURM, "SLURM_GPUS_ON_NODE": "4"}, scontrol=scontrol)
    assert (layout.nnodes, layout.nproc_per_node, layout.world_size) == (2, 4, 8)
    assert layout.rdzv_endpoint == f"10.1.0.17:{slurm_port('123456')}" and layout.rdzv_id == "123456"
    assert ["show", "hostnames", "gpu[017-018]"] in scontrol.calls  # SLURM expands its own node list
    assert ["show", "node", "-o", "gpu017"] in scontrol.calls  # the head is the first host


def test_processes_per_node_explicit_gpus_or_one_on_cpu_nodes():
    assert slurm_layout({**SLURM, "SLURM_GPUS_ON_NODE": "4"}, nproc_per_node=2).nproc_per_node == 2
    assert slurm_layout({**SLURM, "SLURM_GPUS_PER_NODE": "a100:8"}).nproc_per_node == 8
    cpu = slurm_layout(dict(SLURM))
    assert cpu.nproc_per_node == 1 and "CPU-only" in cpu.nproc_source
    assert gpus_from_slurm({"SLURM_GPUS_PER_NODE": "gpu:h100:4(IDX:0-3)"}) == 4
    assert resolve_layout({}, local_gpus=lambda: 0, free_port=lambda: 4242).nproc_per_node == 1
    assert resolve_layout({}, local_gpus=lambda: 3, free_port=lambda: 4242).nproc_per_node == 3


def test_refuses_rather_than_falling_back_to_localhost(tmp_path, monkeypatch):
    with pytest.raises(LaunchError, match="no controller"):
        slurm_layout(dict(SLURM), scontrol=fake_scontrol(fail=True))
    monkeypatch.setenv("PATH", str(tmp_path))  # a node without SLURM's client tools
    with pytest.raises(LaunchError, match="head node: scontrol is not on PATH.*--rdzv-endpoint HOST:PORT"):
        resolve_layout(dict(SLURM))
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is unset"):
        slurm_layout({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2"})
    with pytest.raises(LaunchError, match="outside a SLURM job; pass --rdzv-endpoint"):
        resolve_layout({}, nodes=2, free_port=lambda: 4242)
    with pytest.raises(LaunchError, match="does not resolve"):
        node_address("gpu017", fake_scontrol(node_addr="no-such-host.invalid"))
    with pytest.raises(LaunchError, match="SLURM job 123456 has 2 node"):
        slurm_layout(dict(SLURM), nodes=3)
    with pytest.raises(LaunchError, match="deepspeed launcher.*pdsh.*--launcher torchrun"):
        slurm_layout(dict(SLURM), launcher="deepspeed")
    assert head_node("gpu[017-018]", fake_scontrol()) == "gpu017"


def test_commands_srun_torchrun_c10d_inside_slurm():
    layout = slurm_layout({**SLURM, "SLURM_GPUS_ON_NODE": "4"})
    (cmd,) = build_commands(layout, "/venv/bin/python", ["c.yaml", "--run-dir", "/runs/a"],
                            {**SLURM, "SLURM_CPUS_PER_TASK": "32"}, max_restarts=2)
    text = " ".join(cmd)
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--cpus-per-task=32" in cmd
    assert "/venv/bin/python -m torch.distributed.run --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d" in text
    assert f"--rdzv-endpoint=10.1.0.17:{slurm_port('123456')} --rdzv-id=123456" in text
    assert "--max-restarts=2" in cmd and "--standalone" not in cmd
    assert text.endswith("-m harness train c.yaml --run-dir /runs/a")


def test_commands_outside_slurm():
    one = resolve_layout({}, local_gpus=lambda: 2, free_port=lambda: 4242)
    (cmd,) = build_commands(one, "py", ["c.yaml"], {})
    assert cmd == ["py", "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--standalone",
                   "-m", "harness", "train", "c.yaml"]
    two = resolve_layout({}, nodes=2, rdzv_endpoint="10.0.0.5:29411", rdzv_id="exp1", local_gpus=lambda: 0)
    (cmd,) = build_commands(two, "py", ["c.yaml"], {})
    assert "--rdzv-endpoint=10.0.0.5:29411" in cmd and "--rdzv-id=exp1" in cmd and "--nnodes=2" in cmd
    # Without a port every node must still agree on one (not a free port picked on each node).
    assert resolve_layout({}, nodes=2, rdzv_endpoint="10.0.0.5", free_port=lambda: 4242).rdzv_endpoint == "10.0.0.5:29400"
    ds = resolve_layout({}, launcher="deepspeed", nproc_per_node=2, port=29731)
    (cmd,) = build_commands(ds, "py", ["c.yaml"], {})
    assert cmd == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus=2", "--master_port=29731", "--no_local_rank",
                   "--module", "harness", "train", "c.yaml"]
    # GPUs SLURM assigned stay the ones used (the deepspeed launcher drops CUDA_VISIBLE_DEVICES on --num_gpus).
    (cmd,) = build_commands(ds, "py", ["c.yaml"], {"CUDA_VISIBLE_DEVICES": "4,5,6"})
    assert cmd[3] == "--include=localhost:4,5"
    with pytest.raises(LaunchError, match="only 1 visible GPUs"):
        build_commands(ds, "py", ["c.yaml"], {"CUDA_VISIBLE_DEVICES": "3"})


def launch_main(args, capsys):
    from launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_dry_run_cli_prints_the_exact_command(tmp_path, digits_shards, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: mlp}}\ndata: {{name: digits, path: {digits_shards}}}\nbudget: {{steps: 1}}\n")
    code, out, err = launch_main(["--dry-run", "--nproc-per-node", "2", str(cfg), "--set", "optim.effective_lr=0.5",
                                  "--run-dir", "rel/run"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "--standalone" in lines[0] and "--nproc-per-node=2" in lines[0]
    assert lines[0].endswith(f"train {cfg} --set optim.effective_lr=0.5 --run-dir {tmp_path / 'rel' / 'run'}")
    assert "world size 2" in err and "plan 128 = 64 micro x 1 accum x 2 ranks" in err
    assert not (tmp_path / "rel").exists()  # nothing started


def test_cli_errors_are_one_line(tmp_path, digits_shards, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: mlp}}\ndata: {{name: digits, path: {digits_shards}}}\nbudget: {{steps: 1}}\n"
                   "batch: {global_batch_size: 100}\n")
    cases = [(["--nodes", "2", str(cfg)], 5, "pass --rdzv-endpoint"),
             (["--nproc-per-node", "3", str(cfg)], 3, "does not divide over 3 ranks"),
             ([str(cfg), "--set", "optim.learning_rate=1"], 2, "unknown config key optim.learning_rate")]
    for args, code, text in cases:
        got, _, err = launch_main(["--dry-run", *args], capsys)
        assert got == code, (args, err)
        errors = [line for line in err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("launch: error: ") and text in errors[0], err


# ---- the DeepSpeed config ------------------------------------------------------------------------------------

PLAN = make_batch_plan(256, 2, 64, None, 64)  # A = 2


def test_deepspeed_config_from_the_batch_plan():
    from harness.train.deepspeed_engine import deepspeed_config

    ds = deepspeed_config(PLAN, "fp32", None)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (256, 64, 2)
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's own default would clip at 1.0
    assert ds["torch_autocast"]["enabled"] is False and "optimizer" not in ds and "scheduler" not in ds
    assert deepspeed_config(PLAN, "fp32", 5.0)["gradient_clipping"] == 5.0
    bf16 = deepspeed_config(PLAN, "bf16", None)["torch_autocast"]
    assert bf16 == {"enabled": True, "dtype": "bfloat16"}


def test_deepspeed_user_json_may_add_but_not_contradict(tmp_path):
    from harness.train.deepspeed_engine import deepspeed_config

    def user(obj):
        path = tmp_path / f"ds{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
        return str(path)

    merged = deepspeed_config(PLAN, "fp32", None, user({"wall_clock_breakdown": True, "train_batch_size": 256,
                                                        "zero_optimization": {"stage": 0}}))
    assert merged["wall_clock_breakdown"] is True and merged["train_batch_size"] == 256
    bad = [({"train_batch_size": 512}, "train_batch_size=512 contradicts.*batch.global_batch_size gives 256"),
           ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 contradicts"),
           ({"gradient_clipping": 1.0}, "gradient_clipping=1.0 contradicts.*optim.grad_clip_norm gives 0.0"),
           ({"optimizer": {"type": "Adam"}}, "'optimizer' is not allowed"),
           ({"bf16": {"enabled": True}}, "'bf16' is not allowed"),
           ({"zero_optimization": {"stage": 2}}, "stage=2 is not supported"),
           ("{not json", "malformed JSON at line 1"),
           ("[1, 2]", "expected a JSON object")]
    for obj, pattern in bad:
        with pytest.raises(ConfigError, match=pattern) as e:
            deepspeed_config(PLAN, "fp32", None, user(obj))
        assert "\n" not in str(e.value)


def test_config_refuses_fp64_with_deepspeed_and_a_missing_json(tmp_path):
    from harness.train.config import load_config

    with pytest.raises(ConfigError, match="fp64 does not work with backend: deepspeed"):
        load_config(None, ["backend=deepspeed", "precision=fp64", "data.path=x", "budget.steps=1"])
    with pytest.raises(ConfigError, match="deepspeed.config: .*nope.json is not a file"):
        load_config(None, [f"deepspeed.config={tmp_path / 'nope.json'}", "data.path=x", "budget.steps=1"])


# ---- the sbatch scripts ----------------------------------------------------------------------------------------

SCRIPTS = ["cifar10_wrn16_4.sh", "cifar100_wrn28_10.sh", "imagenet_bs4096.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_sbatch_scripts_have_the_directives_a_center_expects(name):
    path = ROOT / "slurm" / name
    text = path.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["ntasks-per-node"] == "1" and directives["signal"] == "B:USR1@120"
    assert {"nodes", "gpus-per-node", "cpus-per-task", "time", "requeue", "open-mode", "output"} <= directives.keys()
    assert directives["open-mode"] == "append" and "%j" in directives["output"]
    config = re.search(r'exec "\$PY" -m launch "\$HARNESS_ROOT/(yaml/\S+\.yaml)" "\$@"', text)
    assert config and (ROOT / config.group(1)).is_file(), "the script must exec the launcher on a config in yaml/"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert path.stat().st_mode & 0o111


@pytest.mark.slow
def test_sbatch_script_dry_run_outside_slurm(tmp_path, cifar_shards):
    """The script itself, run by bash with HARNESS_DRY_RUN=1: extra arguments reach `harness train` intact."""
    env = harness_env(HARNESS_PYTHON=sys.executable, HARNESS_DRY_RUN=1, HARNESS_ROOT=ROOT)
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "cifar10_wrn16_4.sh"), "--set", "model.depth=10",
                           "model.width=1", f"data.path={cifar_shards}", "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"train {ROOT / 'yaml' / 'cifar10_wrn16_4.yaml'} --set model.depth=10 "
                                        f"model.width=1 data.path={cifar_shards} --run-dir {tmp_path / 'r'}")


def test_python_missing_is_a_clear_error(tmp_path):
    env = harness_env(HARNESS_PYTHON=str(tmp_path / "no-python"), HARNESS_ROOT=ROOT)
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "cifar10_wrn16_4.sh")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 5 and "set HARNESS_PYTHON" in proc.stderr


@pytest.mark.parametrize("argv", [["--local_rank=1", "train", "c.yaml"], ["--local-rank", "1", "train", "c.yaml"],
                                  ["train", "c.yaml", "--local_rank=1"], ["train", "--local-rank=1", "c.yaml"]])
def test_harness_accepts_a_launchers_local_rank(argv, monkeypatch):
    """deepspeed's launcher runs `python -m harness --local_rank=N train ...`; torch.distributed.launch passes
    `--local-rank=N` (older torch `--local_rank`). Accepted before or after `train`; it fills in LOCAL_RANK only
    when the environment lacks it."""
    from harness.cli import build_parser, set_local_rank

    args = build_parser().parse_args(argv)
    assert args.local_rank == 1 and args.config == "c.yaml"
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    set_local_rank(args.local_rank)
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setenv("LOCAL_RANK", "3")  # the launcher's environment wins
    set_local_rank(args.local_rank)
    assert os.environ["LOCAL_RANK"] == "3"
    assert build_parser().parse_args(["train", "c.yaml"]).local_rank is None


def test_launch_accepts_and_drops_a_local_rank(tmp_path):
    from launch.cli import build_parser, with_run_dir

    assert build_parser().parse_args(["--local_rank=0", "c.yaml"]).local_rank == 0
    rest = ["--set", "seed=1", "--local_rank=0", "--local-rank", "2", "--run-dir", "x"]
    assert with_run_dir(rest, tmp_path) == ["--set", "seed=1", "--run-dir", str(tmp_path)]
