"""A Hydra app whose trial is instant: for testing the sweeper itself (concurrency, storage), not training.

    python tests/toy_app/app.py -m x=range(0,100) hydra.sweeper.storage=...
"""
import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float:
    value = (cfg.x - 3.3) ** 2 + cfg.y
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "metrics.json").write_text(json.dumps({"value": value, "pid": os.getpid()}))
    return value


if __name__ == "__main__":
    main()
