"""qlora_exp: declarative QLoRA experiment sweeps (Hydra configs, Optuna search, submitit/SLURM, TensorBoard)."""
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

PROJECT_DIR = Path(__file__).resolve().parent.parent  # the checkout holding conf/ and data/

# `${qlora_exp.project_dir:}` in conf/paths: where the shipped configs and data live.
if not OmegaConf.has_resolver("qlora_exp.project_dir"):
    OmegaConf.register_new_resolver("qlora_exp.project_dir", lambda: str(PROJECT_DIR))
