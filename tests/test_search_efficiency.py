"""bench/search_efficiency.py's smoke run: every strategy through the real command line, a few short trials."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


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
    assert grid["trials"] == 4 and grid["steps_total"] == result["grid_steps"] == 40  # 2 ranks x 2 lrs x 10 steps
    assert grid["steps_to_target"] is not None and grid["best"] == pytest.approx(result["grid_best"])
    for name in ("random", "tpe_batched", "qlora_exp"):
        (run,) = runs[name]
        assert run["trials"] == 4 and 0 < run["steps_total"] <= 40 and run["curve"], (name, run)
    assert (out / "search_efficiency.png").stat().st_size > 1000
    assert "| qlora_exp |" in (out / "search_efficiency.md").read_text()
