"""qlora_exp: declarative QLoRA experiment sweeps (Hydra configs, Optuna search, submitit/SLURM, TensorBoard)."""
import os
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

PROJECT_DIR = Path(__file__).resolve().parent.parent  # the checkout holding conf/ and data/

# conf/paths: `${qlora_exp.project_dir:}` is where the shipped configs and data live, `${qlora_exp.cwd:}`
# the folder the command was started in (Hydra's runtime.cwd is not set yet when a sweep folder is named).
if not OmegaConf.has_resolver("qlora_exp.project_dir"):
    OmegaConf.register_new_resolver("qlora_exp.project_dir", lambda: str(PROJECT_DIR))
    OmegaConf.register_new_resolver("qlora_exp.cwd", lambda: os.getcwd())
