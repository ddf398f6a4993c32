"""Ports of the peers' own test suites (hydra-optuna-sweeper, hydra-submitit-launcher), run against qlora_exp."""
