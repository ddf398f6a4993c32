# Copied unchanged from facebookresearch/hydra: plugins/hydra_optuna_sweeper/example/sphere.py
# at commit 2c03d1b925fe239e0b67b923699d4027685f198f (only these three header lines added).
# ruff: noqa  (the peer's code as it is)
# Copyright (c) Facebook, Inc. and its affiliates. All Rights Reserved
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config")
def sphere(cfg: DictConfig) -> float:
    x: float = cfg.x
    y: float = cfg.y

    if cfg.get("error", False):
        raise RuntimeError("cfg.error is True")

    return x**2 + y**2


if __name__ == "__main__":
    sphere()
