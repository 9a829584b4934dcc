"""`harness probe` (harness/probe): the regime boundary and B_crit by branching. Unit tests of the rules on
made-up numbers, then the whole chain on the noisy quadratic against its closed forms (slow): the probe's eps_crit
within a factor 2 of 2 / lambda_max, the boundary and the branched B_crit each within a factor 4 of the B_simple
measured online beside them (McCandlish et al. 2018, sec. 2.2: B_crit ~ B_noise ~ B_simple). The online B_simple
against its closed form sigma^2 tr(H) / |H w|^2 is tests/test_noise_scale.py's."""

import filecmp
import json
import math
from pathlib import Path

import pytest

from harness.probe import branch, regime
from tests.conftest import run_harness, write_config

LAMBDA_MAX, SIGMA = 1.5, 4.0


def cell(b, lr, loss, stable=True):
    return regime.Cell(b, lr, stable, loss, loss, 10.0, None, ["completed"])


def test_rules_on_made_up_grids():
    # Optimum doubles with B up to 64, then saturates; the edge is one rate above the optimum at large B.
    cells = []
    for b, opt in ((4, 2.0 ** -3), (16, 2.0 ** -1), (64, 1.0), (256, 1.0)):
        for e in range(-5, 3):
            lr = 2.0 ** e
            cells.append(cell(b, lr, 1 + abs(e - math.log2(opt)), stable=lr <= 2 * opt if b >= 64 else lr <= 4 * opt))
    rows = regime.summarize(cells, higher_is_better=False)
    assert [r.eps_opt for r in rows] == [2.0 ** -3, 2.0 ** -1, 1.0, 1.0]
    assert [r.eps_stable for r in rows] == [0.5, 2.0, 2.0, 2.0] and all(r.edge_found for r in rows)
    found = regime.boundary(rows)
    assert found.temperature == 2.0 ** -5 and found.eps_max == 1.0 and found.b_boundary == 32.0
    assert found.eps_crit == 2.0 and found.b_paper == 64.0 and not found.notes
    assert regime.extension(rows, (-5, 2)) is None
    # No unstable rate above the optimum at some B, or the optimum at the bottom: the grid grows that way.
    top = [cell(c.batch, c.lr, c.final_loss) for c in cells]
    assert regime.extension(regime.summarize(top, False), (-5, 2)) == (-5, 4)
    low = [cell(c.batch, c.lr, c.lr) for c in cells]
    assert regime.extension(regime.summarize(low, False), (-5, 2))[0] == -7


def test_first_passage_and_critical_batch():
    assert branch.first_passage([(1, 5.0), (2, 3.0), (3, 1.0)], 2.0) == pytest.approx(2.5)
    assert branch.first_passage([(1, 5.0), (2, math.nan)], 2.0) is None
    rows = [{"k": k, "batch_size": 8 * k, "steps_to_target": s} for k, s in ((1, 100.0), (2, 55.0), (4, 29.0),
                                                                              (8, 20.0), (16, 9.0))]
    assert branch.critical_batch(rows, 0.2) == (32, True)  # 8: 20 > 1.2 * 100 / 8 = 15; 16 does not count after it
    assert branch.critical_batch(rows[:3], 0.2) == (32, False)
    assert branch.default_target([(i, 10.0 - i) for i in range(10)]) == pytest.approx(5.5)
    assert branch.parse_target("runs/a:120") == (Path("runs/a"), 120)
    assert branch.parse_target("runs/a") == (Path("runs/a"), None)


def test_bad_input_is_one_line(tmp_path):
    proc = run_harness("probe", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("harness: error: probe: give a CONFIG")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    proc = run_harness("probe", "--branch", f"{tmp_path / 'run'}:5", check=False)
    assert proc.returncode == 6 and "has no step-XXXXXXXX.pt" in proc.stderr and "Traceback" not in proc.stderr
    missing = write_config(tmp_path / "missing.yaml", f"model: {{name: mlp}}\nbudget: {{steps: 10}}\n"
                                                          f"data: {{name: digits, path: {tmp_path / 'nowhere'}}}\n")
    proc = run_harness("probe", missing, "--out", tmp_path / "out", check=False)  # one line before any run
    assert proc.returncode == 4 and "does not exist; create it with `harness data convert digits" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def nqm(tmp_path_factory):
    from data_pipelines.nqm import synth_nqm

    root = tmp_path_factory.mktemp("probe")
    synth_nqm(root / "data", train=16384, dim=32, lambda_max=LAMBDA_MAX, power=1.0, sigma=SIGMA)
    config = write_config(root / "nqm.yaml", f"""
seed: 0
device: cpu
model: {{name: quadratic, init: 1.0}}
data: {{name: nqm, path: {root / 'data'}}}
batch: {{global_batch_size: 16}}
optim: {{name: sgd, effective_lr: 0.25, weight_decay: 0.0}}
budget: {{steps: 100}}
speed: {{fused_optimizer: false}}
log: {{every_steps: 10, progress: false}}
""")
    return root, config


@pytest.mark.slow
def test_probe_and_branches_on_the_noisy_quadratic(nqm, capsys):
    from data_pipelines.nqm import critical_lr
    from harness.probe.probe import run_probe
    from harness.train.config import load_config
    from harness.train.trainer import train

    root, config = nqm
    report = run_probe(str(config), [], [4, 16, 256], 100, (-5, 2), 1, str(root / "out"), 1)
    out = capsys.readouterr().out
    assert "boundary: B* = eps_max / T" in out and (root / "out" / "probe.png").stat().st_size > 10_000
    assert json.loads((root / "out" / "probe.json").read_text())["eps_crit"] == report["eps_crit"]
    exact = critical_lr(LAMBDA_MAX)  # 4/3 for SGD
    assert 0.5 < report["eps_crit"] / exact < 2.0, report["eps_crit"]
    # B_simple at the end of the constant phase of the run nearest the boundary, against the boundary itself.
    noise = report["noise_scale"]
    assert noise["step"] == 50 and report["b_boundary"] and 0.25 < report["b_boundary"] / report["b_simple"] < 4.0

    # Branch from a trunk at the smallest B and its optimal rate (the probe's temperature).
    small = report["rows"][0]
    trunk = root / "trunk"
    train(load_config(config, [f"batch.global_batch_size={small['batch_size']}", f"optim.effective_lr={small['eps_opt']}",
                               "checkpoint.every_steps=10", "checkpoint.keep=20"]), trunk)
    got = branch.run_branches(f"{trunk}:10", [1, 2, 4, 8, 16], 100, "test_loss", None, 0.2, None,
                              str(root / "branch"), 1, 3)
    assert got["b_crit"] and 0.25 < got["b_crit"] / got["b_simple"] < 4.0, (got["b_crit"], got["b_simple"])
    first, second = (Path(r["run_dirs"][0]) for r in got["rows"][:2])
    checkpoint = "checkpoints/step-00000010.pt"
    assert filecmp.cmp(trunk / checkpoint, first / checkpoint, shallow=False)  # copied whole; the trunk keeps its own
    result = json.loads((second / "result.json").read_text())
    assert result["segments"][-1]["from_step"] == 10
    assert result["layout"]["global_batch_size"] == 2 * small["batch_size"]
    rates = {json.loads(line)["effective_lr"] for line in (second / "metrics.jsonl").read_text().splitlines()
             if "effective_lr" in line}
    assert len(rates) == 1 and rates.pop() == pytest.approx(2 * small["eps_opt"])  # constant, k x the trunk's rate
    print(f"probe: eps_crit {report['eps_crit']} (closed form {exact:.3f}); boundary {report['b_boundary']}, "
          f"B_simple {noise['b_simple']:.1f} at B = {noise['batch_size']}; branched B_crit {got['b_crit']}, "
          f"B_simple {got['b_simple']:.1f}")
