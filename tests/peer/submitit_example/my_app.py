# Copied unchanged from facebookresearch/hydra, plugins/hydra_submitit_launcher/example/my_app.py at commit
# 2c03d1b925fe239e0b67b923699d4027685f198f (hydra-submitit-launcher's example), for tests/peer/test_submitit_launcher.py.
# Copyright (c) Facebook, Inc. and its affiliates. All Rights Reserved
import logging
import os
import time

import hydra
import submitit
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@hydra.main(config_path=".", config_name="config")
def my_app(cfg: DictConfig) -> None:
    env = submitit.JobEnvironment()
    log.info(f"Process ID {os.getpid()} executing task {cfg.task}, with {env}")
    time.sleep(1)


if __name__ == "__main__":
    my_app()
