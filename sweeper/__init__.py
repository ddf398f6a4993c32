"""qlora_exp's Optuna sweeper for Hydra."""
