"""What happens to trials that did not end by themselves: stale trials of a stopped driver, trials a Ctrl-C really
interrupted, and when too many failures stop a sweep. Retries are Optuna's RetryHeartbeatStaleTrialCallback."""
from __future__ import annotations

import copy
import logging
import time
import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("qlora_exp.sweeper")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# what one run of a trial wrote about itself: not carried into its retry
RUN_ATTRS = ("fail_reason", "interrupted", "job_id", "folder", "slot", "pruned_at_step", "result_path", "overrides")
HEARTBEAT = "heartbeat"


class RetryTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry (the same parameters queued WAITING, `retry_history` in the new trial's system attributes),
    less what the failed run wrote about itself (its job id, folder, failure, a prune mark)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial._user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in RUN_ATTRS}
        trial._system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT}
        before = len(study.get_trials(deepcopy=False))
        super().__call__(study, trial)
        if len(study.get_trials(deepcopy=False)) > before:
            log.info("trial %d will be retried with the same parameters", trial.number)


with warnings.catch_warnings():  # ExperimentalWarning: "the interface can change" (optuna>=4.5,<6 is tested)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    RETRY_ONCE, RETRY_ALWAYS = RetryTrial(max_retry=1), RetryTrial(max_retry=None)


def fail(study, trial_id: int, number: int, reason: str, interrupted: bool = False) -> None:
    """FAIL with a one-line reason; an interrupted trial (Ctrl-C, scancel of the driver) is queued again, always."""
    storage = study._storage
    storage.set_trial_user_attr(trial_id, "fail_reason", reason[:1000])
    if interrupted:
        storage.set_trial_user_attr(trial_id, "interrupted", True)
    try:
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # another driver ended it first
    log.warning("trial %d %s: %s", number, "interrupted" if interrupted else "failed", reason.splitlines()[0][:300])
    if interrupted:
        RETRY_ALWAYS(study, storage.get_trial(trial_id))


def beat(study, trial_ids) -> None:
    """This driver is alive and running these trials: Optuna's own heartbeat where the storage has them (RDB),
    else a system attribute (journal files, memory)."""
    storage = study._storage
    for trial_id in trial_ids:
        if _rdb_heartbeats(storage):
            storage.record_heartbeat(trial_id)
        storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())  # also read where RDB has no row yet


def stale_trials(study, stale_after_s: float, mine: set[int]) -> list[FrozenTrial]:
    """RUNNING trials, not this driver's, whose driver has not beaten for `stale_after_s`."""
    storage, now = study._storage, time.time()
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in mine]
    ids = set(storage._get_stale_trial_ids(study._study_id)) if _rdb_heartbeats(storage) else set()
    # a driver killed between study.ask and its first beat leaves a trial that Optuna's RDB heartbeats never call
    # stale (no heartbeat row): its start, or the driver's own beat attribute, says how long it has been silent
    return [t for t in running if t._trial_id in ids or now - t.system_attrs.get(
        HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else 0) >= stale_after_s]


def _rdb_heartbeats(storage) -> bool:
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def retried_numbers(trials) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def count_finished(study) -> int:
    """Trials that count toward n_trials: ended, less failures that were retried (an interrupted trial never
    counts: its retry does)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(t.state in FINISHED and not (t.state == TrialState.FAIL and (t.number in retried
                                                                             or t.user_attrs.get("interrupted")))
               for t in trials)


def failure_stop(study, max_failure_rate: float) -> str | None:
    """The one-line reason to stop, when more than `max_failure_rate` of the finished trials failed (interrupted
    trials are not failures of the search)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED and not t.user_attrs.get("interrupted")]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if len(trials) >= 2 and len(failed) / len(trials) > max_failure_rate:
        last = failed[-1].user_attrs.get("fail_reason", "?").splitlines()[0][:300]
        return (f"sweep stopped: {len(failed)} of {len(trials)} finished trials failed, over "
                f"hydra.sweeper.max_failure_rate={max_failure_rate}; last failure: {last}")
    return None
