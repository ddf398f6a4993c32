"""The asynchronous loop: ask the study for a trial, submit it as its own job (a local process or a SLURM job,
through submitit), and as soon as any job ends tell the study its result and start the next: no batch barrier.

Its guarantees: a submitted job is recorded before anything can interrupt the driver (SIGINT and SIGTERM only set
a flag that the loop reads between steps); on an interrupt, trials that already finished are collected first and
only the trials really cut short are FAIL, each queued again and never counted toward n_trials.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.singleton import Singleton
from optuna.trial import TrialState

from sweeper.jobs import job_result
from sweeper.naming import hydra_value, short
from sweeper.objective import ObjectiveError, objective_values
from sweeper.policy import RETRY_ONCE, beat, count_finished, fail, failure_stop, stale_trials
from sweeper.results import write_results

log = logging.getLogger("qlora_exp.sweeper")


class SweepStopped(Exception):
    """The sweep cannot go on (too many failures, a scheduler refusing jobs): its one-line reason."""


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the loop after it collected what finished and queued what it cut short."""


@dataclass
class Running:
    trial: optuna.trial.Trial
    job: Any
    folder: Path
    slot: int


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM (scancel of the driver) while the loop runs: counted, one line each."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> Interrupts:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
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


def finished_value(path: Path | str | None) -> tuple[bool, Any]:
    """(True, the task's return) when a job's result file (`job.paths.result_pickle`) holds a successful result,
    without waiting for one."""
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

    def run(self) -> int:
        """Run trials until the study holds `target` finished ones; returns how many interrupts arrived."""
        s, study = self.s, self.s.study
        stop, last_beat, last_stale, written = None, 0.0, time.time(), False
        with Interrupts() as irq:
            while not irq.count:
                free = [n for n in range(s.settings.n_jobs) if n not in {r.slot for r in self.running.values()}]
                while free and stop is None and not irq.count and count_finished(study) + len(
                        study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) < s.target:
                    r = self.launch(free.pop(0))  # a signal now only sets irq.count: the job is recorded first
                    self.running[r.trial.number] = r
                if not self.running:
                    break
                time.sleep(s.settings.poll_s)
                for number in [n for n, r in self.running.items() if r.job.done()]:
                    self.finish(self.running.pop(number))
                    stop = stop or failure_stop(study, s.settings.max_failure_rate)
                    write_results(study, s, len(self.running))
                    written = not self.running
                if time.time() - last_beat > s.settings.heartbeat_s:
                    beat(study, [r.trial._trial_id for r in self.running.values()])
                    last_beat = time.time()
                if time.time() - last_stale > s.settings.stale_after_s / 2:  # another driver may have died since
                    self.take_over_stale()
                    last_stale = time.time()
            if irq.count:
                self.stop_interrupted()
        if irq.count or not written:
            write_results(study, s, 0)
        if stop and not irq.count:
            raise SweepStopped(stop)
        return irq.count

    # ---- one trial ------------------------------------------------------------------------------------------
    def launch(self, slot: int) -> Running:
        s, study = self.s, self.s.study
        with warnings.catch_warnings():  # "Heartbeat of storage is supposed to be used with Study.optimize": the
            warnings.filterwarnings("ignore", message="Heartbeat")  # loop records the heartbeats itself
            trial = study.ask(fixed_distributions=s.distributions)
        if s.extender is not None:  # hydra-optuna-sweeper's custom_search_space: suggests more parameters
            try:
                s.extender(s.config, trial)
            except Exception as e:  # noqa: BLE001  (the user's function: its error is one line, not a traceback)
                reason = f"hydra.sweeper.custom_search_space={s.settings.custom_search_space} raised {type(e).__name__}: " \
                         f"{' '.join(str(e).split())[:300]}"
                fail(study, trial._trial_id, trial.number, reason)
                raise SweepStopped(f"{reason} (trial {trial.number} is FAIL)") from None
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
        if s.kind == "local" and s.gpus:
            s.executor.update_parameters(visible_gpus=(s.gpus[slot % len(s.gpus)],), gpus_per_node=1)
        if s.kind == "slurm":
            s.executor.update_parameters(name=f"{s.study_name}-{trial.number}")
        try:
            job = s.executor.submit(s.job, overrides, trial.number, Singleton.get_state())
        except Exception as e:  # noqa: BLE001  (sbatch refusing the request, slurmctld down, fork failing)
            reason = " ".join(str(e).split())[:400]
            fail(study, trial._trial_id, trial.number, f"not submitted: {type(e).__name__}: {reason}", interrupted=True)
            raise SweepStopped(f"trial {trial.number} could not be submitted ({type(e).__name__}: {reason}); it is "
                               "queued again: rerun the same command to resume") from None
        folder = s.folder / str(trial.number)
        for key, value in (("job_id", str(job.job_id)), ("folder", str(folder)), ("slot", slot),
                           ("result_path", str(job.paths.result_pickle)),
                           ("overrides", [o for o in overrides if not o.startswith(("+", "hydra.", f"{s.run_name_key}="))])):
            trial.set_user_attr(key, value)
        beat(study, [trial._trial_id])
        log.info("trial %d started (slot %d, job %s): %s", trial.number, slot, job.job_id,
                 " ".join(f"{k}={short(v)}" for k, v in trial.params.items()))
        return Running(trial, job, folder, slot)

    def finish(self, r: Running) -> None:
        study = self.s.study
        try:
            value = job_result(r.job).return_value  # re-raises the trial's exception
        except Exception as e:  # noqa: BLE001  (a trial's failure is data, not the sweep's)
            fail(study, r.trial._trial_id, r.trial.number, _reason(e, r.job))
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
        """RUNNING trials of a stopped driver: completed from their result when their job finished, else FAIL and
        queued once more."""
        s, study = self.s, self.s.study
        for t in stale_trials(study, s.settings.stale_after_s, mine=set(self.running)):
            done, value = finished_value(t.user_attrs.get("result_path"))
            if done:
                log.warning("trial %d: its driver stopped, but its job finished: completed from its result", t.number)
                self.complete(t._trial_id, t.number, value, Path(t.user_attrs.get("folder", s.folder / str(t.number))))
                continue
            fail(study, t._trial_id, t.number, f"driver stopped: no heartbeat for {s.settings.stale_after_s:g} s or "
                 "more, and no result from its job")
            RETRY_ONCE(study, study._storage.get_trial(t._trial_id))

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
        deadline = time.time() + (10 if self.s.kind == "local" else 0)
        while any(not r.job.done() for r in self.running.values()) and time.time() < deadline:
            time.sleep(0.2)
        for r in self.running.values():
            done, value = finished_value(r.job.paths.result_pickle)
            if done:
                self.complete(r.trial._trial_id, r.trial.number, value, r.folder)
            else:
                fail(study, r.trial._trial_id, r.trial.number, "sweep interrupted (Ctrl-C or SIGTERM) while it ran",
                     interrupted=True)
        self.running.clear()


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
