"""bench/search_efficiency.py's smoke run: every strategy through the real command line, a few short trials."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_search_efficiency_smoke_measures_every_strategy(tmp_path, cache_dir):
    out = tmp_path / "se"
    proc = subprocess.run([sys.executable, "bench/search_efficiency.py", "--smoke", "--out", str(out),
                           "--set", f"paths.cache_dir={cache_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "search_efficiency.json").read_text())
    runs = result["runs"]
    assert set(runs) == {"grid", "random", "tpe_batched", "qlora_exp"}
    grid = runs["grid"][0]
    assert grid["trials"] == 2 and grid["steps_total"] == result["grid_steps"] == 20  # 1 rank x 2 lrs x 10 steps
    # the grid's best and its steps to the target, recomputed from the grid's own trial folders
    trials = [json.loads(m.read_text()) | {"end": m.stat().st_mtime} for m in (out / "grid").glob("*/metrics.json")]
    assert len(trials) == 2 and result["grid_best"] == min(t["eval_loss"] for t in trials)
    by_end = sorted(trials, key=lambda t: t["end"])
    hit = next(i for i, t in enumerate(by_end) if t["eval_loss"] <= result["grid_best"] * 1.01)
    assert grid["steps_to_target"] == sum(t["steps"] for t in by_end[:hit + 1]) and grid["best"] == result["grid_best"]
    import optuna

    for name in ("random", "tpe_batched", "qlora_exp"):
        (run,) = runs[name]
        assert run["trials"] == 2 and 0 < run["steps_total"] <= 20 and run["curve"], (name, run)
        study = optuna.load_study(study_name=f"{name}-s0", storage=f"sqlite:///{out}/studies.db")
        values = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert run["best"] == min(values) and len(study.trials) == 2, (name, run, values)
    assert (out / "search_efficiency.png").stat().st_size > 1000
    assert "| qlora_exp |" in (out / "search_efficiency.md").read_text()
