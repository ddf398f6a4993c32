"""A Hydra app whose trial is instant: for testing the sweeper itself (concurrency, storage, interrupts, return
values), not training.

    python tests/toy_app/app.py -m x=range(0,100) hydra.sweeper.storage=...
    python tests/toy_app/app.py -m x=0,1 sleep_s=5 returns=pair hydra.sweeper.direction=[minimize,minimize]
"""
import json
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    value = (cfg.x - 3.3) ** 2 + cfg.y
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.runs_log:  # one line per training started: a point trained twice shows twice
        with open(cfg.runs_log, "a") as f:
            f.write(json.dumps({"x": cfg.x, "y": cfg.y, "pid": os.getpid()}) + "\n")
    if cfg.progress_steps:  # a trial that says how far it got, as qlora_exp's does at each evaluation
        from sweeper.progress import PROGRESS_FILE, write_progress

        for step in range(1, cfg.progress_steps + 1):
            time.sleep(cfg.sleep_s / cfg.progress_steps)
            write_progress(out / PROGRESS_FILE, step, cfg.progress_steps, value + 1 / step, None)
    else:
        time.sleep(cfg.sleep_s + cfg.x * cfg.sleep_per_x)  # a trial that takes a while: interrupts land while it runs
    (out / "metrics.json").write_text(json.dumps({"value": value, "other": -value, "pid": os.getpid(),
                                                  "pycache_prefix": sys.pycache_prefix,
                                                  "dont_write_bytecode": sys.dont_write_bytecode}))
    return {"value": value, "pair": (value, -value), "dict": {"value": value, "other": -value},
            "text": "not a number", "none": None}[cfg.returns]


if __name__ == "__main__":
    main()
