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
HEARTBEAT = "heartbeat"
DRIVER = "driver"  # a trial's system attribute: the id of the driver that runs it (host-pid-token)
UNSUBMITTED_S = 30.0  # a RUNNING trial with no job this long after its driver's last word: that driver stopped
UNCLAIMED_S = 5.0  # a RUNNING trial no driver ever put its id on, this long after study.ask
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# what one run of a trial wrote about itself: not carried into its retry
RUN_ATTRS = ("fail_reason", "interrupted", "orphaned", "duplicate", "job_id", "job_kind", "job_folder", "folder", "slot",
             "pruned_at_step", "result_path", "overrides")


class RetryTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry (the same parameters queued WAITING, `retry_history` in the new trial's system attributes),
    less what the failed run wrote about itself (its job id, folder, failure, a prune mark)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial._user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in RUN_ATTRS}
        trial._system_attrs = {k: v for k, v in trial.system_attrs.items() if k not in (HEARTBEAT, DRIVER)}
        trials = study.get_trials(deepcopy=False)
        if trial.number in retried_numbers(trials):  # another driver queued it first
            return
        before = len(trials)
        super().__call__(study, trial)
        if len(study.get_trials(deepcopy=False)) > before:
            log.info("trial %d will be retried with the same parameters", trial.number)


with warnings.catch_warnings():  # ExperimentalWarning: "the interface can change" (optuna>=4.5,<6 is tested)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    RETRY_ONCE, RETRY_ALWAYS = RetryTrial(max_retry=1), RetryTrial(max_retry=None)


def fail(study, trial_id: int, number: int, reason: str, interrupted: bool = False, orphaned: bool = False) -> bool:
    """FAIL with a one-line reason; an interrupted trial (Ctrl-C, scancel of the driver) is queued again, always;
    an orphaned one (its driver stopped) is no failure of its parameters either. False when another driver ended the
    trial first (then nothing is queued: that driver did it)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, "fail_reason", reason[:1000])
        for key, flag in (("interrupted", interrupted), ("orphaned", orphaned)):
            if flag:
                storage.set_trial_user_attr(trial_id, key, True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    log.warning("trial %d %s: %s", number, "interrupted" if interrupted else "failed", reason.splitlines()[0][:300])
    if interrupted:
        RETRY_ALWAYS(study, storage.get_trial(trial_id))
    return True


def beat(study, trial_ids, driver: str | None = None) -> list[int]:
    """This driver is alive and running these trials: Optuna's own heartbeat where the storage has them (RDB),
    else a system attribute (journal files, memory); `driver` marks them as this driver's. Returns the trials
    that another driver has ended meanwhile (it took them over while this one was paused)."""
    storage, ended = study._storage, []
    for trial_id in trial_ids:
        try:
            if driver is not None:
                storage.set_trial_system_attr(trial_id, DRIVER, driver)
            storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())  # also read where RDB has no row yet
            if _rdb_heartbeats(storage):
                storage.record_heartbeat(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            ended.append(trial_id)
    return ended


def register_driver(study) -> tuple[str, str | None]:
    """Record this driver in the study: (its id, None when it is the only driver the study has ever had, else the
    id again). Each driver writes its entry before it reads the others, so of two drivers starting together at
    least one sees the other: never two that both think they are the first."""
    import os
    import socket
    import uuid

    driver = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    study._storage.set_study_system_attr(study._study_id, f"{DRIVER}:{driver}", time.time())
    others = [k for k in study._storage.get_study_system_attrs(study._study_id)
              if k.startswith(f"{DRIVER}:") and k != f"{DRIVER}:{driver}"]
    return driver, (driver if others else None)


def driver_host(driver: str | None) -> str:
    return (driver or "").rpartition("-")[0].rpartition("-")[0]


def _dead_here(driver: str | None) -> bool:
    """The driver ran on this host and its process is gone (a kill -9, a crash): its trials need no wait."""
    import os
    import socket

    host, _, rest = (driver or "").rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stale_trials(study, stale_after_s: float, mine: set[int]) -> list[FrozenTrial]:
    """RUNNING trials, not this driver's, whose driver has not beaten for `stale_after_s`, or whose driver ran on
    this host and is gone."""
    storage, now = study._storage, time.time()
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in mine]
    ids = set(storage._get_stale_trial_ids(study._study_id)) if _rdb_heartbeats(storage) else set()
    # a driver killed between study.ask and its first beat leaves a trial that Optuna's RDB heartbeats never call
    # stale (no heartbeat row): its start, or the driver's own beat attribute, says how long it has been silent
    # a trial asked for but never submitted (its driver stopped between study.ask and the job, e.g. on a full disk)
    # has nothing running anywhere: it needs no long wait
    def silent_for(t: FrozenTrial) -> float:
        if "job_id" in t.user_attrs:
            return stale_after_s
        # no word from its driver at all (it writes its id right after study.ask): that driver stopped at the ask
        return min(stale_after_s, UNSUBMITTED_S if DRIVER in t.system_attrs else UNCLAIMED_S)

    return [t for t in running if t._trial_id in ids or _dead_here(t.system_attrs.get(DRIVER)) or now - t.system_attrs.get(
        HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else 0) >= silent_for(t)]


def _rdb_heartbeats(storage) -> bool:
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def retried_numbers(trials) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def count_finished(study, trials: list[FrozenTrial] | None = None) -> int:
    """Trials that count toward n_trials: ended, less failures that were retried (an interrupted trial never
    counts: its retry does). `trials`: the study's trials as already read."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    retried = retried_numbers(trials)
    return sum(t.state in FINISHED and not (t.state == TrialState.FAIL and (t.number in retried or _not_run(t)))
               for t in trials)


def _not_run(t: FrozenTrial) -> bool:
    """A FAIL that says nothing of its parameters: cut short by an interrupt or its driver's end, or a grid point
    given twice at once."""
    return any(t.user_attrs.get(k) for k in ("interrupted", "orphaned", "duplicate"))


def failure_stop(study, max_failure_rate: float) -> str | None:
    """The one-line reason to stop, when more than `max_failure_rate` of the finished trials failed (interrupted
    trials are not failures of the search)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED and not _not_run(t)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if len(trials) >= 2 and len(failed) / len(trials) > max_failure_rate:
        last = failed[-1].user_attrs.get("fail_reason", "?").splitlines()[0][:300]
        return (f"sweep stopped: {len(failed)} of {len(trials)} finished trials failed, over "
                f"hydra.sweeper.max_failure_rate={max_failure_rate}; last failure: {last}")
    return None


# a trial's failure that says the machine is at fault, not the parameters: the trial is queued again, the sweep stops
MACHINE_FAULTS = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def machine_fault(reason: str) -> str | None:
    return next((f for f in MACHINE_FAULTS if f.lower() in reason.lower()), None)


def storage_fault(e: BaseException) -> str | None:
    """One line, when `e` says the study's storage cannot be written any more (a full disk under the journal or
    SQLite file, a database gone); None for anything else (a bug is a traceback)."""
    import errno

    import sqlalchemy.exc

    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for x in chain:
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            return f"{type(x).__name__}: {x.strerror or x}"
        if isinstance(x, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return f"{type(x).__name__}: {' '.join(str(getattr(x, 'orig', x)).split())[:200]}"
        if isinstance(x, optuna.exceptions.StorageInternalError) and x.__cause__ is None:
            return f"{type(x).__name__}: {' '.join(str(x).split())[:200]}"
    return None
