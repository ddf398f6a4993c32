"""The asynchronous loop: ask the study for a trial, submit it as its own job (a local process or a SLURM job,
through submitit), and as soon as any job ends tell the study its result and start the next: no batch barrier.

Its guarantees: a submitted job is recorded before anything can interrupt the driver (SIGINT and SIGTERM only set
a flag that the loop reads between steps); on an interrupt, trials that already finished are collected first and
only the trials really cut short are FAIL, each queued again and never counted toward n_trials.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.singleton import Singleton
from optuna.trial import TrialState

from sweeper.gpus import slot_gpus
from sweeper.jobs import job_result
from sweeper.naming import hydra_value, short
from sweeper.objective import ObjectiveError, objective_values
from sweeper.policy import (
    DRIVER,
    RETRY_ONCE,
    beat,
    count_finished,
    driver_host,
    fail,
    failure_stop,
    machine_fault,
    stale_trials,
    storage_fault,
)
from sweeper.progress import PROGRESS_LOG, LiveView, ProgressLines
from sweeper.results import write_results
from sweeper.stop import STATE as IN_PROCESS_TRIAL  # a sweep worker's own trial: how it is cut short
from sweeper.storage import ask_lock

log = logging.getLogger("qlora_exp.sweeper")


class SweepStopped(Exception):
    """The sweep cannot go on (too many failures, a scheduler refusing jobs): its one-line reason."""


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the loop after it collected what finished and queued what it cut short."""


@dataclass
class Running:
    trial: optuna.trial.Trial | optuna.trial.FrozenTrial  # what the loop reads of it: _trial_id and number
    job: Any
    folder: Path
    slot: int
    since: float = 0.0  # when it was submitted (or taken over): a SLURM job pending long is said so
    noted: float = 0.0


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM (scancel of the driver) while the loop runs: counted, one line each. In a sweep
    worker the first also cuts short the trial it runs (sweeper.stop: the trial is queued again)."""

    def __init__(self, signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.count = 0
        self.signals = signals

    def __enter__(self) -> Interrupts:
        IN_PROCESS_TRIAL["interrupted"] = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        line = (f"{name}: stopping the sweep: finished trials are collected, running ones cancelled and queued again\n"
                if self.count == 1 else f"{name} again: still stopping; no trial is lost by waiting\n")
        os.write(2, line.encode())  # not print(): a handler may run in the middle of another print
        IN_PROCESS_TRIAL["interrupted"] = True
        # a trial that checks for a stop at its safe points (qlora_exp's: between phases, at each step) is left to
        # do so; any other, or a second signal, is cut short here, wherever it is (sweeper.stop)
        if IN_PROCESS_TRIAL["running"] and (self.count > 1 or not IN_PROCESS_TRIAL["safe_points"]):
            raise KeyboardInterrupt


def finished_value(path: Path | str | None) -> tuple[bool, Any]:
    """(True, what the job returned: Hydra's JobReturn for a trial) when a job's result file
    (`job.paths.result_pickle`) holds a successful result, without waiting for one."""
    from submitit.core.utils import pickle_load

    if not path or not Path(path).exists():
        return False, None
    try:
        outcome, value = pickle_load(path)
    except Exception:  # noqa: BLE001  (a result being written)
        return False, None
    return outcome == "success", value


class Loop:
    def __init__(self, sweep) -> None:
        self.s = sweep  # sweeper.optuna_sweeper.Sweep: settings, study, search space, executor
        self.running: dict[int, Running] = {}
        self.stop: str | None = None  # why no more trials start: the running ones are still collected
        self.worker_job = None  # a sweep worker's own job (sweeper.workers): told which trial it runs, for a requeue
        self.left_to_worker: set[int] = set()  # stale trials whose worker's SLURM job is still queued (said once)
        self.progress = ProgressLines()  # a line per running trial at each of its evaluations (sweeper.progress)
        self._view: LiveView | None = None
        self.reasons: dict[str, tuple[float, str]] = {}  # a pending SLURM job's reason, asked for every 30 s
        self.timeout_said = False  # hydra.sweeper.timeout's line, said once

    @property
    def view(self) -> LiveView:
        if self._view is None:  # made once Hydra's logging is set up: it finds the terminal's handler
            self._view = LiveView(log, self.s.folder / PROGRESS_LOG)
        return self._view

    def where(self, r: Running) -> str:
        """Where a running trial is, for its progress line: its slot, or its SLURM job's state and pending reason."""
        if self.s.kind != "slurm":
            return f"slot {r.slot}"
        state = str(r.job.state)
        if state.startswith("PENDING"):
            at, reason = self.reasons.get(str(r.job.job_id), (0.0, ""))
            if time.time() - at > 30:
                reason = _pending_reason(r.job.job_id)
                self.reasons[str(r.job.job_id)] = (time.time(), reason)
            return f"SLURM job {r.job.job_id} PENDING ({reason or '?'})"
        return f"SLURM job {r.job.job_id} {state}"

    def stopping(self, reason: str) -> None:
        """No more trials start; those running are collected before the driver exits with `reason`."""
        if self.stop is None:
            self.stop = reason
            if self.running:
                log.warning("%s; waiting for the %d running trial(s) to end (Ctrl-C cancels them: they are queued "
                            "again)", reason.removeprefix("sweep stopped: "), len(self.running))

    def run(self, signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> int:
        """Run trials until the study holds `target` finished ones and none of its trials is left running anywhere
        (another driver's are waited for until they end or go stale); returns how many interrupts arrived. A storage
        that can no longer be written (disk full, the database gone) stops it in one line."""
        with Interrupts(signals) as irq:
            try:
                write_results(self.s.study, self.s, len(self.running))  # `sweeper.status` works from the start
                try:
                    self._run(irq)
                finally:
                    if self._view is not None:  # the block of progress lines leaves the terminal with the loop
                        self._view.close()
                if irq.count:
                    self.stop_interrupted()
                write_results(self.s.study, self.s, 0)
            except Exception as e:  # noqa: BLE001  (only the storage's faults are caught: see storage_fault)
                why = storage_fault(e)
                if why is None:
                    raise
                cancelled = self.cancel_all()
                raise SweepStopped(f"the study's storage can no longer be written ({why}): {cancelled} running "
                                   "trial(s) cancelled; rerun the same command once it can: finished trials are "
                                   "kept, and the cut ones are taken over then") from None
        if self.stop and not irq.count:
            raise SweepStopped(self.stop)
        return irq.count

    def _run(self, irq: Interrupts) -> None:
        s, study = self.s, self.s.study
        last_beat, last_stale, last_note, waiting, waiting_since = 0.0, time.time(), time.time(), None, 0.0
        while not irq.count:
            free = [n for n in range(s.settings.n_jobs) if n not in {r.slot for r in self.running.values()}]
            while free and self.stop is None and not irq.count:  # ask_next stops at the study's n_trials
                r = self.launch(free.pop(0))  # a signal now only sets irq.count: the job is recorded first
                if r is None:  # not started: the grid's last points taken by other drivers, or a stop
                    break
                self.running[r.trial.number] = r
            if not self.running:
                others = [] if self.stop else [t.number for t in study.get_trials(deepcopy=False,
                                                                                  states=(TrialState.RUNNING,))]
                if not others:
                    break
                if others != waiting:  # never exit while a trial of the study is unaccounted for
                    waiting_since = time.time()
                    log.info("waiting for trial(s) %s of another %s to end (or go stale after %g s)",
                             ", ".join(map(str, others)), "worker or driver" if s.kind == "worker" else "driver",
                             s.settings.stale_after_s)
                    waiting = others
                # a sweep's last trials often end within a second of each other: poll at poll_s for a few seconds
                # (the sweep's end is not held back a whole second), then once a second
                time.sleep(s.settings.poll_s if time.time() - waiting_since < QUICK_WAIT_S else max(s.settings.poll_s, 1.0))
                self.take_over_stale()
                continue
            if not any(getattr(r.job, "state", None) == "PENDING" for r in self.running.values()
                       if s.kind == "worker"):  # a worker's own trial, given out, runs at once (at its done())
                time.sleep(s.settings.poll_s)
            if s.kind != "worker":  # a worker's own trial says its progress itself, in this process
                running = [(n, r.trial.params, r.folder, self.where(r)) for n, r in self.running.items()]
                self.view.show(self.progress.lines(running, s.study_name), self.progress.block())
            for number in [n for n, r in self.running.items() if r.job.done()]:
                self.finish(self.running.pop(number))
                if stop := failure_stop(study, s.settings.max_failure_rate):
                    self.stopping(stop)
                write_results(study, s, len(self.running))
            if time.time() - last_beat > s.settings.heartbeat_s:
                ended = beat(study, [r.trial._trial_id for r in self.running.values()], s.driver)
                for number in [n for n, r in self.running.items() if r.trial._trial_id in ended]:
                    log.warning("trial %d was taken over by another driver of this study (this one was paused "
                                "past stale_after_s): left to it", number)
                    self.running.pop(number)
                last_beat = time.time()
            if s.kind == "slurm" and time.time() - last_note > min(s.settings.heartbeat_s, s.settings.pending_note_s,
                                                                  NEVER_CHECK_S):
                self.note_pending()
                last_note = time.time()
            if time.time() - last_stale > s.settings.stale_after_s / 2:  # another driver may have died since
                self.take_over_stale()
                last_stale = time.time()

    # ---- one trial ------------------------------------------------------------------------------------------
    def launch(self, slot: int) -> Running | None:
        s, study = self.s, self.s.study
        if timed_out(s):
            if not self.timeout_said:
                self.timeout_said = True
                log.info("hydra.sweeper.timeout=%gs has passed: no more trials start (%d of %d finished)%s",
                         s.settings.timeout, count_finished(study), s.target,
                         f"; waiting for the {len(self.running)} running" if self.running else "")
            return None
        with warnings.catch_warnings():  # "Heartbeat of storage is supposed to be used with Study.optimize": the
            warnings.filterwarnings("ignore", message="Heartbeat")  # loop records the heartbeats itself
            warnings.filterwarnings("ignore", message="`GridSampler` is re-evaluating")  # taken care of below
            trial = ask_next(study, s.target, s.distributions)
            if trial is None:  # the study's n_trials are all finished or running: nothing more to ask
                return None
        beat(study, [trial._trial_id], s.driver)  # whose trial it is, before anything else can stop this driver
        if _claimed_by_another(study, trial, s.driver):
            log.info("trial %d was taken from the queue by another driver at the same moment: left to it", trial.number)
            return None
        if isinstance(study.sampler, optuna.samplers.GridSampler) and _taken(study, trial):
            study._storage.set_trial_user_attr(trial._trial_id, "duplicate", True)
            fail(study, trial._trial_id, trial.number, "a grid point that another driver of this study took at the "
                 "same moment: not run")
            return None
        if s.extender is not None:  # hydra-optuna-sweeper's custom_search_space: suggests more parameters
            try:
                s.extender(s.config, trial)
            except Exception as e:  # noqa: BLE001  (the user's function: its error is one line, not a traceback)
                reason = f"hydra.sweeper.custom_search_space={s.settings.custom_search_space} raised {type(e).__name__}: " \
                         f"{' '.join(str(e).split())[:300]}"
                fail(study, trial._trial_id, trial.number, reason)
                self.stopping(f"{reason} (trial {trial.number} is FAIL)")
                return None
        overrides = self.overrides_for(trial)
        if s.kind == "local" and s.gpus:
            group = slot_gpus(s.gpus, slot, s.gpus_per_trial, s.slots_per_gpu)  # several trials of one GPU side by side
            s.executor.update_parameters(visible_gpus=group, gpus_per_node=len(group))
        if s.kind == "slurm":
            s.executor.update_parameters(name=f"{s.study_name}-{trial.number}")
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal: it is in `e` below
                job = s.executor.submit(s.job, overrides, trial.number, Singleton.get_state())
        except Exception as e:  # noqa: BLE001  (sbatch refusing the request, slurmctld down, fork failing)
            reason = " ".join(str(e).split())[:400]
            fail(study, trial._trial_id, trial.number, f"not submitted: {type(e).__name__}: {reason}", interrupted=True)
            self.stopping(f"trial {trial.number} could not be submitted ({type(e).__name__}: {reason}); it is "
                          "queued again: rerun the same command to resume")
            return None
        folder = s.folder / str(trial.number)
        try:  # a pause between any two of these (SIGSTOP, a swapped-out machine) lets another driver take it over
            trial.set_user_attr("job_id", str(job.job_id))
            for key, value in (("folder", str(folder)), ("slot", slot),
                               ("result_path", str(job.paths.result_pickle)), ("job_kind", s.kind),
                               ("job_folder", str(job.paths.folder)),
                               ("overrides", [o for o in overrides
                                              if not o.startswith(("+", "hydra.", f"{s.run_name_key}="))])):
                trial.set_user_attr(key, value)
            beat(study, [trial._trial_id], s.driver)
            if self.worker_job is not None:
                self.worker_job.current = trial.number
                # the worker's own job: its SLURM job id, its local controller's pid, or this process (the driver's)
                trial.set_user_attr("worker_job", os.environ.get("SLURM_JOB_ID") or os.environ.get(
                    "SUBMITIT_LOCAL_JOB_ID") or str(os.getpid()))
                if os.environ.get("SLURM_JOB_ID"):  # what `python -m sweeper.status` asks SLURM about
                    trial.set_user_attr("slurm_job", os.environ["SLURM_JOB_ID"])
        except optuna.exceptions.UpdateFinishedTrialError:  # another driver took it over and ended it meanwhile
            if self.worker_job is not None and self.worker_job.current == trial.number:
                self.worker_job.current = None
            job.cancel(check=False)
            log.warning("trial %d was taken over by another driver while this one was paused: its job is cancelled",
                        trial.number)
            return self.launch(slot)  # the slot is still free: the next point, as a driver of several asks for it
        # a worker's loop has one slot of its own: its trials are told apart by the worker that runs them
        at = f"worker {trial.user_attrs['worker_job']}" if self.worker_job is not None else f"slot {slot}"
        log.info("trial %d started (%s, job %s): %s; its log: %s", trial.number, at, job.job_id,
                 " ".join(f"{k}={short(v)}" for k, v in trial.params.items()),
                 folder / f"{s.config.hydra.job.name}.log")
        return Running(trial, job, folder, slot, since=time.time())

    def overrides_for(self, trial) -> list[str]:
        """The trial's overrides: the fixed ones, its parameters, the launcher's, its name and pruning callback."""
        s = self.s
        overrides = [*s.fixed, *(f"{k}={hydra_value(v)}" for k, v in trial.params.items()), *s.trial_overrides,
                     f"hydra.sweep.dir={hydra_value(str(s.folder))}"]
        if s.run_name_key:
            swept = ",".join(f"{k}={short(v)}" for k, v in trial.params.items())
            overrides.append(f"{s.run_name_key}={hydra_value(f'{trial.number:03d}-{swept}' if swept else f'{trial.number:03d}')}")
        if s.pruning:
            cb = f"+{s.settings.callbacks_key}.optuna_pruning"
            overrides += [f"{cb}._target_=sweeper.pruning.OptunaPruningCallback",
                          f"{cb}.storage={hydra_value(s.trial_storage)}", f"{cb}.study_name={hydra_value(s.study_name)}",
                          f"{cb}.trial_number={trial.number}", f"{cb}.metric={hydra_value(s.settings.prune_metric)}",
                          f"{cb}.pruner={hydra_value(s.pruner_spec)}"]
        return overrides

    def resume(self, number: int) -> None:
        """A requeued worker (SLURM preemption) takes back the trial it was running, as the same trial: run again in
        the same folder, it resumes from its last checkpoint. Left alone when it has ended meanwhile."""
        s, study = self.s, self.s.study
        t = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if t is None or t.state != TrialState.RUNNING:
            return
        beat(study, [t._trial_id], s.driver)
        job = s.executor.submit(s.job, self.overrides_for(t), t.number, Singleton.get_state())
        study._storage.set_trial_user_attr(t._trial_id, "job_id", str(job.job_id))
        study._storage.set_trial_user_attr(t._trial_id, "result_path", str(job.paths.result_pickle))
        log.info("trial %d resumed by its requeued worker (job %s)", number, job.job_id)
        self.running[number] = Running(t, job, s.folder / str(number), 0, since=time.time())
        if self.worker_job is not None:
            self.worker_job.current = number

    def interrupt_orphans(self) -> None:
        """After the workers were asked to stop: a RUNNING trial whose worker ran here and is gone is FAIL as
        interrupted and queued again (one whose worker is elsewhere goes stale and is taken over then)."""
        from sweeper.policy import _dead_here

        study = self.s.study
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("job_kind") == "worker" and _dead_here(t.system_attrs.get(DRIVER)):
                done, ret = finished_value(t.user_attrs.get("result_path"))
                if done:
                    self.collect(t._trial_id, t.number, ret, Path(t.user_attrs.get("folder", self.s.folder / str(t.number))))
                else:
                    fail(study, t._trial_id, t.number, "sweep interrupted (Ctrl-C or SIGTERM) while it ran",
                         interrupted=True)

    def finish(self, r: Running) -> None:
        study = self.s.study
        try:
            value = task_value(job_result(r.job))  # re-raises the trial's exception
        except Exception as e:  # noqa: BLE001  (a trial's failure is data, not the sweep's)
            reason = _reason(e, r.job)
            if fault := machine_fault(reason):  # the machine's, not the trial's: queued again, and the sweep stops
                fail(study, r.trial._trial_id, r.trial.number, reason, interrupted=True)
                self.stopping(f"trial {r.trial.number} stopped on a machine fault ({fault}); it is queued again: "
                              "rerun the same command once it is mended")
                return
            fail(study, r.trial._trial_id, r.trial.number, reason)
            return
        self.complete(r.trial._trial_id, r.trial.number, value, r.folder)

    def complete(self, trial_id: int, number: int, value: Any, folder: Path) -> None:
        """Tell the study what a trial's task returned: PRUNED if its pruning callback stopped it, else its
        objective value(s); a return value that is no objective is that trial's one-line FAIL."""
        s, study = self.s, self.s.study
        frozen = study._storage.get_trial(trial_id)
        if frozen.state.is_finished():
            log.warning("trial %d was already ended (%s) by another driver of this study: kept as it is", number,
                        frozen.state.name)
            return
        try:
            if "pruned_at_step" in frozen.user_attrs:
                _tell(study, trial_id, state=TrialState.PRUNED)
                log.info("trial %d pruned at step %s", number, frozen.user_attrs["pruned_at_step"])
                return
            try:
                values = objective_values(value, len(s.settings.directions), s.settings.objectives, folder,
                                          s.settings.metrics_file)
            except ObjectiveError as e:
                fail(study, trial_id, number, f"no objective: {e}")
                return
            _tell(study, trial_id, values=values)
            log.info("trial %d complete: %s", number, ", ".join(f"{v:.4g}" for v in values))
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %d was already ended by another driver of this study; its result is kept there", number)

    # ---- trials that did not end by themselves ----------------------------------------------------------------
    def take_over_stale(self) -> None:
        """RUNNING trials of a stopped driver (no heartbeat for `stale_after_s`, or gone from this host): completed
        from their result when their job finished; watched to their end when their job still runs (a driver killed
        alone leaves its trials training); else FAIL and queued once more."""
        from sweeper.local_jobs import adopt_job

        s, study = self.s, self.s.study
        stale = stale_trials(study, s.settings.stale_after_s, mine=set(self.running))
        queued = queued_slurm_jobs([t.user_attrs["slurm_job"] for t in stale if t.user_attrs.get("slurm_job")])
        for t in stale:
            if t.user_attrs.get("slurm_job") in queued:  # its worker's SLURM job is still queued or running: a
                if t.number not in self.left_to_worker:  # preempted worker waits for its requeue, then resumes it
                    self.left_to_worker.add(t.number)
                    log.info("trial %d: its worker's SLURM job %s is still in the queue (requeued after a "
                             "preemption?): left for it to resume", t.number, t.user_attrs["slurm_job"])
                continue
            folder = Path(t.user_attrs.get("folder", s.folder / str(t.number)))
            job = None
            here = s.kind == "slurm" or driver_host(t.system_attrs.get(DRIVER)) == socket.gethostname()
            worker = t.user_attrs.get("job_kind") == "worker"  # ran in its worker's process: nothing to watch
            if here and not worker and t.user_attrs.get("job_kind", s.kind) == s.kind and t.user_attrs.get("job_id"):
                # the job id is the first thing written after a submission: the rest may be missing
                job = adopt_job(s.kind, t.user_attrs.get("job_folder") or str(s.folder / ".submitit"),
                                t.user_attrs["job_id"])
            result = t.user_attrs.get("result_path") or (job.paths.result_pickle if job is not None else None)
            done, ret = finished_value(result)
            if not done and job is not None and job.done():  # ended meanwhile: its result, if it wrote one
                (done, ret), job = finished_value(result), None
            job = None if done else job
            if done:
                log.warning("trial %d: its driver stopped, but its job finished: completed from its result", t.number)
                self.collect(t._trial_id, t.number, ret, folder)
                continue
            taken = {r.slot for r in self.running.values()}
            if job is not None and len(self.running) < s.settings.n_jobs:
                slot = t.user_attrs.get("slot")
                slot = slot if slot in range(s.settings.n_jobs) and slot not in taken else min(
                    set(range(s.settings.n_jobs)) - taken)
                beat(study, [t._trial_id], s.driver)
                self.running[t.number] = Running(t, job, folder, slot)
                log.warning("trial %d: its driver stopped while its job %s still runs: watched here to its end, "
                            "not run again", t.number, t.user_attrs["job_id"])
            elif job is None and fail(study, t._trial_id, t.number, "driver stopped (no heartbeat for "
                                      f"{s.settings.stale_after_s:g} s, or its process gone from this host), and no "
                                      "result from its job",
                                      orphaned=True):
                RETRY_ONCE(study, study._storage.get_trial(t._trial_id))
            # else: every slot busy: watched once one is free (it stays stale, nothing is lost)

    def collect(self, trial_id: int, number: int, ret: Any, folder: Path) -> None:
        """Tell the study what a finished job returned (read from its result file, not from the job's handle)."""
        try:
            value = task_value(ret)  # re-raises the trial's exception
        except Exception as e:  # noqa: BLE001
            fail(self.s.study, trial_id, number, _reason(e, None))
            return
        self.complete(trial_id, number, value, folder)

    def cancel_all(self) -> int:
        """Cancel every running job (the storage can no longer be written: nothing is told)."""
        n = len(self.running)
        for r in self.running.values():
            try:
                r.job.cancel(check=False)
            except Exception:  # noqa: BLE001  (a scheduler that cannot be reached either)
                pass
        self.running.clear()
        return n

    def note_pending(self) -> None:
        """A SLURM job pending for over `pending_note_s`: say so, with SLURM's reason, every five minutes. One that
        SLURM holds for a reason waiting cannot resolve (NEVER_STARTS: more CPUs than any node has...) is cancelled,
        its trial queued again, and the sweep stops in one line saying why: no silent wait."""
        now = time.time()
        for number, r in list(self.running.items()):
            if now - r.since > NEVER_CHECK_S and str(r.job.state).startswith("PENDING"):
                reason = _pending_reason(r.job.job_id)
                if reason in NEVER_STARTS:
                    r.job.cancel(check=False)
                    self.running.pop(number)
                    why = f"SLURM job {r.job.job_id} can never start (reason {reason}: {NEVER_STARTS[reason]})"
                    fail(self.s.study, r.trial._trial_id, number, f"not started: {why}", interrupted=True)
                    self.stopping(f"trial {number}'s {why}; it was cancelled and the trial queued again: change "
                                  "hydra.launcher.* (partition, cpus_per_task, mem_gb, gpus_per_node, timeout_min, "
                                  "constraint) and rerun the same command")
                    continue
            if now - r.since > self.s.settings.pending_note_s and now - r.noted > 300 and str(
                    r.job.state).startswith("PENDING"):
                r.noted = now
                log.warning("trial %d: SLURM job %s has been PENDING for %.0f s (reason: %s): it waits for the "
                            "cluster; scancel it or Ctrl-C the sweep to stop", r.trial.number, r.job.job_id,
                            now - r.since, _pending_reason(r.job.job_id))

    def stop_interrupted(self) -> None:
        """Collect the trials that finished; cancel the others, collect any that finished meanwhile, and FAIL the
        rest as interrupted: each is queued again and none counts toward n_trials."""
        study = self.s.study
        for number in [n for n, r in self.running.items() if r.job.done() or finished_value(r.job.paths.result_pickle)[0]]:
            self.finish(self.running.pop(number))
        for r in self.running.values():
            r.job.cancel(check=False)
        # local processes end within a second or two of the cancel; a SLURM job's state is not worth waiting for
        # (scancel of the driver leaves it KillWait seconds): its result file says all there is to know
        deadline = time.time() + (10 if self.s.kind == "local" else 0)  # a worker's own trial: ended already
        while any(not r.job.done() for r in self.running.values()) and time.time() < deadline:
            time.sleep(0.2)
        for r in self.running.values():
            done, ret = finished_value(r.job.paths.result_pickle)
            if done:
                self.collect(r.trial._trial_id, r.trial.number, ret, r.folder)
            else:
                fail(study, r.trial._trial_id, r.trial.number, "sweep interrupted (Ctrl-C or SIGTERM) while it ran",
                     interrupted=True)
        self.running.clear()


def timed_out(s) -> bool:
    """The sweep's `timeout` (Optuna's study.optimize(timeout=...)) has passed: no trial starts now."""
    deadline = getattr(s, "deadline", None)
    return deadline is not None and time.time() >= deadline


def ask_next(study, target: int, distributions: dict):
    """The study's next trial, when fewer than `target` count toward n_trials or run; else None. The count and the
    ask are one step for every driver and worker of the study (sweeper.storage.ask_lock): two checking at the same
    moment would both see room for one more trial and both ask."""
    with ask_lock(study):
        trials = study.get_trials(deepcopy=False)  # one read: a trial told between two reads would be in neither
        if count_finished(study, trials) + sum(t.state == TrialState.RUNNING for t in trials) >= target:
            return None
        return study.ask(fixed_distributions=distributions)


def task_value(ret: Any) -> Any:
    """What the task returned, from Hydra's JobReturn (or a plain value); a failed task's exception is raised, without
    the "Error executing job with overrides: [...]" line JobReturn.return_value prints for it (the loop gives the
    failure its one line, and the overrides may hold what the terminal should not show)."""
    from hydra.core.utils import JobReturn, JobStatus

    if not isinstance(ret, JobReturn):
        return ret
    if ret.status != JobStatus.COMPLETED:
        raise ret._return_value
    return ret._return_value


def queued_slurm_jobs(job_ids: list[str]) -> set[str]:
    """The SLURM jobs of `job_ids` that squeue still lists (pending, requeued, running, completing); all of them
    when SLURM cannot be asked (a trial is never taken from a worker that may still resume it)."""
    import subprocess

    if not job_ids:
        return set()
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(sorted(set(job_ids)))],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return set(job_ids)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:  # slurmctld not answering
        return set(job_ids)
    rows = [line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2]
    return {job for job, state in rows if state not in ENDED_SLURM_STATES} & set(job_ids)


ENDED_SLURM_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                      "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"}  # squeue -j lists these a while too


NEVER_CHECK_S = 10.0  # a pending job's reason is asked for this often: one it can never start with is said in a minute
QUICK_WAIT_S = 5.0  # how long a loop waiting on trials of other workers or drivers polls at poll_s before once a second
NEVER_STARTS = {  # squeue's reasons that waiting does not resolve: the request itself does not fit the cluster
    "PartitionConfig": "it asks for more than the partition's nodes have or it allows: CPUs, memory, GPUs",
    "BadConstraints": "no node has the features or the combination it asks for",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows",
    "PartitionTimeLimit": "its time limit is above the partition's",
    "InvalidAccount": "the account is not valid", "InvalidQOS": "the QOS is not valid",
    "AccountNotAllowed": "the partition does not allow this account", "QOSNotAllowed": "the partition does not allow this QOS",
}


def _pending_reason(job_id: str) -> str:
    import subprocess

    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%r"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def _claimed_by_another(study, trial, driver: str) -> bool:
    """A queued trial (a retry) that two drivers took from the queue at once: SQLite lets both see it WAITING and
    both set it RUNNING. Each writes its id, waits a moment, and reads it back: the last writer runs it."""
    attrs = study._storage.get_trial(trial._trial_id).system_attrs
    if "retry_history" not in attrs and "fixed_params" not in attrs:
        return False  # a new trial: its number is its own
    time.sleep(CLAIM_SETTLE_S)
    return study._storage.get_trial(trial._trial_id).system_attrs.get(DRIVER) != driver


CLAIM_SETTLE_S = 0.3


def _taken(study, trial) -> bool:
    """Another trial of the study, numbered before this one and not failed, has this trial's grid point: drivers
    asking at the same moment can be given the same point (Optuna's GridSampler says so); the later one gives way.
    An earlier trial whose point is not written yet (GridSampler writes it right after creating the trial) is
    waited for, briefly."""
    mine = study._storage.get_trial(trial._trial_id).system_attrs.get("grid_id")
    sampler = study.sampler
    point = dict(zip(sampler._param_names, sampler._all_grids[mine], strict=True)) if mine is not None else None
    deadline = time.time() + 2.0
    while True:
        trials = study.get_trials(deepcopy=False)
        earlier = [t for t in trials if t.number < trial.number and t.state != TrialState.FAIL]
        if any(t.system_attrs.get("grid_id") == mine for t in earlier):
            return True
        # a retry queued (WAITING) for this point, not yet taken from the queue: it runs the point, this one gives way
        if point is not None and "fixed_params" not in study._storage.get_trial(trial._trial_id).system_attrs and any(
                t.state == TrialState.WAITING and t.system_attrs.get("fixed_params") == point for t in trials):
            return True
        if time.time() > deadline or not any("grid_id" not in t.system_attrs for t in earlier
                                             if t.state == TrialState.RUNNING):
            return False
        time.sleep(0.05)


def _tell(study, trial_id: int, **kwargs) -> None:
    """study.tell; GridSampler calls study.stop() once the grid is done, which only works inside
    study.optimize: the trial is stored all the same (Optuna writes the state in a `finally`)."""
    number = study._storage.get_trial(trial_id).number
    try:
        study.tell(number, skip_if_finished=True, **kwargs)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def _reason(e: BaseException, job) -> str:
    """One line: the exception's first line (submitit puts the SLURM state there) and, when the job's
    error stream is quoted in it, the trial's own last error line (e.g. `error: lora.r=0 is not accepted`)."""
    import re

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    cause = next((line for line in reversed(lines[1:]) if line.startswith("error:")
                  or re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)), None)
    state = getattr(job, "state", None)
    if state and state not in ("FINISHED", "COMPLETED", "DONE") and "state" not in text.lower():
        text = f"{text} (job state: {state})"
    text = " ".join(text.split())[:600]
    return f"{text} | {cause[:390]}" if cause and cause not in text else text
