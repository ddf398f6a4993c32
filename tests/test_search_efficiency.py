"""bench/search_efficiency.py's smoke run: every strategy through the real command line, a few short trials, each
stochastic run stopped by hydra.sweeper.timeout at the grid's seconds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pretrained_base import SMALL

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_search_efficiency_smoke_measures_every_strategy_in_seconds(tmp_path, cache_dir):
    out = tmp_path / "se"
    small = [x for o in SMALL[1:] for x in ("--set", o)]  # a pretrained base built in seconds, as in that test
    proc = subprocess.run([sys.executable, "bench/search_efficiency.py", "--smoke", "--out", str(out),
                           "--set", f"paths.cache_dir={cache_dir}", *small], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "search_efficiency.json").read_text())
    task = result["tasks"]["A"]
    runs = task["runs"]
    assert set(runs) == {"grid", "random", "tpe", "random_sh", "qlora_exp"}
    (grid,) = runs["grid"]
    assert grid["trials"] == task["grid_trials"] == 2 and task["grid_steps"] == 20  # 1 rank x 1 alpha x 2 lrs x 10
    # the grid's best, seconds and seconds to the target, recomputed from its trial folders and its run record
    record = json.loads((out / "runs" / "A-grid.json").read_text())
    trials = [json.loads(m.read_text()) | {"end": m.stat().st_mtime}
              for m in (out / "sweeps" / "A-grid").glob("*/metrics.json")]
    assert len(trials) == 2 and task["grid_best"] == min(t["eval_loss"] for t in trials)
    assert task["grid_s"] == pytest.approx(record["end"] - record["start"], abs=0.1)
    hit = min(t["end"] for t in trials if t["eval_loss"] <= task["grid_best"] * 1.01)
    assert grid["wall_to_target_s"] == pytest.approx(hit - record["start"], abs=1.0)
    import optuna

    for name in ("random", "tpe", "random_sh", "qlora_exp"):
        (run,) = runs[name]
        rec = json.loads((out / "runs" / f"A-{name}-s0.json").read_text())
        timeout = float(next(x for x in rec["args"] if x.startswith("hydra.sweeper.timeout=")).split("=")[1])
        assert timeout == pytest.approx(task["grid_s"], abs=0.1)  # --smoke: a budget of the grid's seconds
        study = optuna.load_study(study_name=f"A-{name}-s0", storage=f"sqlite:///{out}/studies/A-{name}-s0.db")
        finished = [t for t in study.trials if t.state.is_finished()]
        assert 1 <= run["trials"] == len(finished) <= 2 and run["curve"], (name, run)
        assert all(t.datetime_start.timestamp() < rec["start"] + timeout for t in finished)  # none after the timeout
        values = [t.value for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
        assert run["best"] == min(values), (name, run, values)
    used = {"grid": "sampler grid, pruner none", "random": "sampler random, pruner none",
            "tpe": "sampler tpe, pruner none", "random_sh": "sampler random, pruner successive_halving",
            "qlora_exp": "sampler tpe, pruner percentile"}  # each strategy is what it says (the sweep's own line)
    for name, line in used.items():
        log = (out / "logs" / (f"A-{name}" + ("" if name == "grid" else "-s0") + ".log")).read_text()
        assert line in log, (name, log[-1500:])
    assert (out / "search_efficiency.png").stat().st_size > 1000
    table = (out / "search_efficiency.md").read_text()
    assert "| qlora_exp |" in table and "**Task A**" in table
