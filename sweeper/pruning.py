"""The Trainer callback a sweeper adds to each trial: report eval loss to its Optuna trial, stop when pruned.

A trial process gets it through Hydra (`callbacks.optuna_pruning._target_`), so the training code
never imports Optuna. After training, `stop_reason == "pruned"` tells the trial runner why it stopped.
"""
from __future__ import annotations

import logging

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class OptunaPruningCallback(TrainerCallback):
    def __init__(self, storage: str | None, study_name: str, trial_number: int, pruner: dict | None = None,
                 metric: str = "eval_loss"):
        import os

        import optuna

        from sweeper.samplers import build_pruner
        from sweeper.storage import STORAGE_ENV, build_storage

        self.metric = metric
        self.stop_reason: str | None = None
        self.reports = int(os.environ.get("RANK", "0")) == 0  # a multi-process trial: rank 0 alone talks to the study
        if not self.reports:
            return
        storage = storage or os.environ[STORAGE_ENV]  # None: a URL with a password, kept out of the overrides

        self.study = optuna.load_study(study_name=study_name, storage=build_storage(storage),
                                       pruner=build_pruner(pruner)[1])
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, trial_number)
        self.trial = optuna.trial.Trial(self.study, trial_id)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None:  # (every rank sees the same gathered metrics: they all return here, or none does)
            return
        prune = False
        if self.reports:
            self.trial.report(float(value), state.global_step)
            prune = state.global_step > 0 and self.trial.should_prune()
            if prune:
                log.info("trial %d pruned at step %d (%s %.4f)", self.trial.number, state.global_step, self.metric,
                         value)
                self.trial.set_user_attr("pruned_at_step", state.global_step)
        if _every_rank(prune):
            self.stop_reason = "pruned"
            control.should_training_stop = True


def _every_rank(decision: bool) -> bool:
    """Rank 0's decision, on every rank of a multi-process trial (a stop on one rank alone would leave the others
    waiting in the next all-reduce); the decision itself in a trial of one process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decision
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if decision else 0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
