"""bench/throughput.py end to end on the CPU (tiny shape): the recipe and the trial runner on the same rows."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO.parent / "shared" / "bench" / "seed_recipe.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.skipif(not RECIPE.exists(), reason="../shared/bench/seed_recipe.py is not beside the checkout")
def test_throughput_bench_runs_the_recipe_and_the_runner_on_the_same_rows(tmp_path):
    out = tmp_path / "tp"
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--recipe", str(RECIPE), "--shape", "tiny",
                           "--model", "tiny", "--steps", "10", "--variants", "recipe,fast",
                           "--recipe-arg=--optim=adamw_torch", "--repeat", "2", "--set", "trainer.precision=fp32",
                           "--set", f"paths.cache_dir={tmp_path / 'cache'}", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "throughput.json").read_text())["results"]
    recipe, fast = results["recipe"], results["fast"]
    assert recipe["status"] == fast["status"] == "complete"
    assert recipe["tokens_per_s"] > 0 and fast["tokens_per_s"] > 0
    assert len(fast["repeats"]) == len(recipe["repeats"]) == 2 and fast["tokens_per_s"] in fast["repeats"]
    assert (out / "fast-0" / "metrics.json").exists() and (out / "fast-1" / "metrics.json").exists()
    assert fast["packing"] == "rows" and fast["split"] == "8 x 1"
    # the plan's estimate at the longest micro-batch it trained (what the GPU's measured peak is compared with)
    assert 0 < fast["largest_micro_batch"] <= 8 * 1024 and fast["estimate_seen_gb"] > 0
    # same rows, same order, same examples per step: the loss curves agree (the recipe prints 4 digits)
    rec, ours = dict((int(s), v) for s, v in recipe["loss_history"]), dict((int(s), v) for s, v in fast["loss_history"])
    assert set(rec) == {5, 10} and all(abs(ours[s] - rec[s]) / rec[s] < 1e-3 for s in rec)
    table = (out / "throughput.md").read_text()
    assert "| recipe |" in table and "| fast |" in table
    ratios = [f"{a / b:.2f}" for a, b in zip(fast["repeats"], recipe["repeats"], strict=True)]
    assert f"| {', '.join(ratios)} |" in table  # the ratio of each round, fast over the recipe of the same round
