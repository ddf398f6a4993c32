"""Sweep workers (`hydra.sweeper.mode=workers`): `n_jobs` long-lived processes (local, or one SLURM job each) that
pull trial after trial from the study and run each in their own process, so the app keeps what trials share (for
qlora_exp, the loaded, quantized base model: qlora_exp.recipe) instead of paying its start-up per trial.

Each worker is a driver of the study in its own right, the way Optuna distributes a search (ask and tell on the
shared storage): it runs the same loop as a driver (sweeper.loop) with one slot whose "job" is the trial run in
the worker's own process (InProcessJob). So everything a driver guarantees holds per worker: n_trials is the study's
total, a finished trial is never run again, a grid point two workers are given at once runs once, a stale trial (its
worker killed) is retried once by another, the failure rate stops them all, a resumed study goes on where it was.
A trial's pruning callback reports in-process; its heartbeat is beaten by a thread while it trains.

The driver (`python -m qlora_exp -m ...`) checks the sweep, opens the study, submits the workers, shows what they
log (trial started, complete, pruned, failed: one line each, through `<sweep folder>/.workers/sweep.log`) and
exits when they have all ended; `hydra.sweeper.wait_for_workers=false` exits right after submitting them
(`python -m sweeper.status <sweep folder>` shows the sweep). Ctrl-C or SIGTERM of the driver asks each worker to
stop: its running trial is cut short, FAIL and queued again, as in the process-per-trial mode.

On SLURM a worker waits in the queue once, not once per trial. Preemption: SLURM's SIGUSR2 checkpoints the worker
(submitit) with its current trial; the requeued worker resumes that trial, as the same trial, from its checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger("qlora_exp.sweeper")

RELAY_FILE = "sweep.log"


# ---- a trial run in the worker's own process ------------------------------------------------------------------
class InProcessJob:
    """submitit's job interface, as the loop reads it, for a trial run in this process. The trial runs at the loop's
    first `done()` (after the loop recorded its job id), a thread beating its heartbeat meanwhile. Its result is
    pickled like submitit's (`<folder>/<job id>_result.pkl`): a worker killed between the trial's end and its tell
    leaves a trial another worker completes from it. What the trial writes to stderr goes to `<folder>/<job id>_log.err`."""

    def __init__(self, fn, args: tuple, folder: Path, job_id: str, beat) -> None:
        self.job_id, self._fn, self._args, self._beat = job_id, fn, args, beat
        self.paths = SimpleNamespace(folder=folder, result_pickle=folder / f"{job_id}_result.pkl")
        self.state = "PENDING"
        self._outcome: tuple[str, Any] | None = None
        self.cancelled = False

    def done(self) -> bool:
        from sweeper import loop

        if self._outcome is None and not self.cancelled and self.state == "PENDING":
            if loop.IN_PROCESS_TRIAL["interrupted"]:  # asked to stop before it started: it never runs here
                self.cancelled = True
                return True
            self._run()
        return self._outcome is not None or self.cancelled

    def _run(self) -> None:
        from sweeper import loop

        self.state = "RUNNING"
        stop = threading.Event()
        beater = threading.Thread(target=self._beat_until, args=(stop,), daemon=True)
        beater.start()
        loop.IN_PROCESS_TRIAL.update(running=True, safe_points=False)  # the trial may say at_safe_points()
        self.paths.folder.mkdir(parents=True, exist_ok=True)
        # what the trial writes to stderr (warnings, progress bars, a thread's traceback) goes to its own file, as a
        # trial process's goes to submitit's log: the terminal keeps the sweep's lines
        err = _TrialStderr(self.paths.folder / f"{self.job_id}_log.err")  # (closed below)
        threading.excepthook = _thread_errors_to(err.path)  # a trial's thread that dies, whenever: into this log
        try:
            with contextlib.redirect_stderr(err):
                value = self._fn(*self._args)
            self._outcome = ("success", value)
            try:
                tmp = self.paths.result_pickle.with_suffix(".tmp")
                tmp.write_bytes(_dumps(("success", value)))
                tmp.replace(self.paths.result_pickle)
            except Exception as e:  # noqa: BLE001  (a value that does not pickle, a full disk: the live outcome counts)
                log.debug("trial %s: its result was not written to %s: %s", self.job_id, self.paths.result_pickle, e)
        except KeyboardInterrupt:  # the worker was asked to stop (Interrupts raised it in the trial): cut short
            self.state = "INTERRUPTED"
            return
        except Exception as e:  # noqa: BLE001  (the trial's failure is data, as a job's)
            self._outcome = ("error", e)
        finally:
            loop.IN_PROCESS_TRIAL["running"] = False
            stop.set()
            err.close()
        self.state = "DONE"

    def _beat_until(self, stop: threading.Event) -> None:
        while not stop.wait(self._beat[1]):
            with contextlib.suppress(Exception):  # the storage's faults reach the loop, not this thread
                self._beat[0]()

    def result(self) -> Any:
        if self._outcome is None:
            from submitit.core.utils import UncompletedJobError

            raise UncompletedJobError("the trial was cut short (its worker was asked to stop)")
        kind, value = self._outcome
        if kind == "error":
            raise value
        return value

    def cancel(self, check: bool = True) -> None:  # noqa: ARG002  (submitit's signature)
        self.cancelled = True


class _TrialStderr:
    """A trial's stderr file. A thread of the trial that took `sys.stderr` while the trial ran and writes after it
    ended (TensorBoard's writer failing on a full disk, a thread's traceback) still writes to this file, appended,
    instead of raising on the closed file (which printed "Exception in threading.excepthook" and a traceback). It
    used to go to the worker's own stderr: a traceback cut by the trial's end then put its last frames on the
    sweep's terminal. Only a file that cannot be written any more sends it there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a")  # noqa: SIM115  (closed by close())

    def write(self, text: str) -> int:
        try:
            return self._file.write(text)
        except ValueError:  # closed: the trial has ended
            pass
        try:
            with open(self.path, "a") as late:
                return late.write(text)
        except OSError:
            late = sys.__stderr__
            return late.write(text) if late is not None else len(text)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __getattr__(self, name: str):  # fileno, isatty, encoding...: the file's own
        return getattr(self._file, name)


def _thread_errors_to(path: Path):
    """`threading.excepthook` for a worker: a thread's traceback goes whole, in one write, to the log of the trial
    that ran last. A trial's thread can die as the trial ends (TensorBoard's writer on a full disk): the default
    hook writes to `sys.stderr` as it is then, which after the trial is the worker's own, and with one worker that is
    the sweep's terminal (CI saw a traceback's last frames there). Where the log cannot be written, the default hook."""

    def hook(args) -> None:
        import traceback

        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        try:
            with open(path, "a") as f:
                f.write(f"Exception in thread {name}:\n{text}")
        except OSError:
            threading.__excepthook__(args)

    return hook


def _dumps(obj) -> bytes:
    """A result as submitit pickles it, read back by the same loader: plain pickle first (a trial's value is data; in a
    worker holding the whole training stack cloudpickle took 0.1 s a trial, and ~1 s the first time, on the GPU
    machine), and cloudpickle for what pickle cannot take (a function or class defined in `__main__`). Hydra's
    JobReturn carries the job's Hydra config, whose structured launcher config pickle refuses ("not the same object"):
    it is kept as the plain config it holds (nothing reads it back but a person)."""
    for candidate in (obj, _plain_hydra_cfg(obj)):
        if candidate is None:
            continue
        try:
            buffer = io.BytesIO()
            _DataPickler(buffer).dump(candidate)
            return buffer.getvalue()
        except Exception:  # noqa: BLE001  (PicklingError, AttributeError, TypeError: cloudpickle may still manage)
            pass
    import cloudpickle

    return cloudpickle.dumps(obj)


class _DataPickler(pickle.Pickler):
    """Plain pickle that refuses a function or class defined in `__main__` (another process could not load it by
    reference): those go to cloudpickle, which pickles them by value."""

    def reducer_override(self, obj):
        if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == "__main__":
            raise pickle.PicklingError(f"{obj!r} is defined in __main__")
        return NotImplemented


def _plain_hydra_cfg(obj):
    """(outcome, JobReturn) with the JobReturn's hydra_cfg as a plain config; None for anything else."""
    from hydra.core.utils import JobReturn

    if not (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], JobReturn) and obj[1].hydra_cfg):
        return None
    value = copy.copy(obj[1])
    value.hydra_cfg = OmegaConf.create(OmegaConf.to_container(obj[1].hydra_cfg))
    return obj[0], value


class InProcessExecutor:
    """What the loop submits to in a worker: each trial an InProcessJob of this process."""

    def __init__(self, folder: Path, worker: str, study, beat_s: float) -> None:
        self.folder, self.worker, self.study, self.beat_s = folder, worker, study, beat_s
        self.count = 0

    def update_parameters(self, **kwargs: Any) -> None:
        pass

    def submit(self, fn, overrides: list[str], number: int, singleton_state: dict) -> InProcessJob:
        from sweeper.policy import beat

        self.count += 1
        trial_id = next(t._trial_id for t in self.study.get_trials(deepcopy=False) if t.number == number)
        return InProcessJob(fn, (overrides, number, singleton_state), self.folder, f"{self.worker}:{number}",
                            (lambda: beat(self.study, [trial_id], self.worker), self.beat_s))


# ---- the worker ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WorkerSpec:
    """What a worker rebuilds its sweep from (picklable: it travels in submitit's job pickle)."""

    settings: Any
    config: Any
    job: Any                        # sweeper.jobs.TrialJob: Hydra's context, the task and the config
    study_name: str
    folder: Path
    distributions: dict
    fixed: list[str]
    target: int
    grid: dict | None
    multi: bool
    pruning: bool
    pruner_spec: dict
    trial_storage: str | None
    trial_overrides: list[str]
    run_name_key: str | None
    command: str
    kind: str                       # local | slurm: where the worker itself runs
    first_seed: str | None          # the driver's sampler seed key: worker 0 keeps it, the others get their own
    deadline: float | None = None   # hydra.sweeper.timeout, as the driver's clock time: no trial starts after it


class WorkerJob:
    """One worker: the submitit callable. Returns {"stopped": reason or None, "interrupted": bool, "trials": n}."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.current: int | None = None  # the trial number this worker runs now (a requeue resumes it)

    def __call__(self, index: int, singleton_state: dict, resume: int | None = None, in_driver: bool = False) -> dict:
        import submitit

        from sweeper.loop import Loop, SweepStopped

        if not in_driver and submitit.JobEnvironment().cluster == "local":  # a killed controller takes its worker
            from sweeper.local_jobs import die_with_parent

            die_with_parent()
        from hydra.core.singleton import Singleton

        Singleton.set_state(singleton_state)  # Hydra's, as each trial of this worker gets it
        sp = self.spec
        if not in_driver:
            add_relay(sp.folder)
        s = self._sweep(index, singleton_state)
        loop = Loop(s)
        loop.worker_job = self
        signals = (signal.SIGINT, signal.SIGTERM) if sp.kind == "local" else (signal.SIGINT,)  # SLURM: SIGTERM
        try:                                                          # precedes a preemption's SIGUSR2 (submitit's)
            if resume is not None:
                loop.resume(resume)
            loop.take_over_stale()
            interrupted = loop.run(signals=signals)
        except SweepStopped as e:
            if in_driver:
                raise
            return {"stopped": str(e), "interrupted": False, "trials": s.executor.count}
        return {"stopped": None, "interrupted": bool(interrupted), "trials": s.executor.count}

    def checkpoint(self, index: int, singleton_state: dict, resume: int | None = None):
        """SLURM preemption or time limit (submitit's SIGUSR2): requeue this worker with the trial it was running."""
        import submitit

        return submitit.helpers.DelayedSubmission(WorkerJob(self.spec), index, singleton_state,
                                                  self.current if self.current is not None else resume)

    def _sweep(self, index: int, singleton_state: dict):
        import optuna

        from sweeper.optuna_sweeper import Sweep
        from sweeper.policy import register_driver
        from sweeper.samplers import build_pruner, build_sampler
        from sweeper.storage import build_storage

        sp, st = self.spec, dataclasses.replace(self.spec.settings, n_jobs=1)
        s = Sweep()
        s.settings, s.config, s.job = st, sp.config, sp.job
        for key in ("study_name", "folder", "distributions", "fixed", "target", "pruning", "pruner_spec",
                    "trial_storage", "trial_overrides", "run_name_key", "command"):
            setattr(s, key, getattr(sp, key))
        from sweeper.optuna_sweeper import _method

        s.extender = _method("custom_search_space", st.custom_search_space)
        pruner = build_pruner(st.pruner, grid=sp.grid is not None)[1] if sp.pruning else optuna.pruners.NopPruner()
        from sweeper.storage import STORAGE_ENV

        url = sp.trial_storage or os.environ[STORAGE_ENV]  # a URL with a password travels in the environment only
        st.storage = url
        storage = build_storage(url, st.heartbeat_s, st.stale_after_s)
        s.study = optuna.load_study(study_name=sp.study_name, storage=storage, pruner=pruner,
                                    sampler=optuna.samplers.RandomSampler())
        s.driver, _ = register_driver(s.study)
        seed_key = sp.first_seed if index == 0 else s.driver
        s.study.sampler = build_sampler(st.sampler, sp.grid, sp.multi, sp.study_name, driver=seed_key)[1]
        s.executor = InProcessExecutor(sp.folder / ".workers", s.driver, s.study, st.heartbeat_s)
        s.kind, s.gpus, s.deadline = "worker", [], sp.deadline
        return s


# ---- sweep-level lines of every worker, at the driver ---------------------------------------------------------
class RelayHandler(logging.Handler):
    """Appends each sweep-level record (trial started, complete, failed...) to `<sweep>/.workers/sweep.log` as a JSON
    line: the driver prints them. Opens the file per record, so Hydra's per-trial logging set-up cannot close it."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = json.dumps({"level": record.levelno, "msg": record.getMessage()}) + "\n"
            with open(self.path, "a") as f:
                f.write(line)
        except Exception:  # noqa: BLE001  (a full disk: the worker's own log still has it)
            self.handleError(record)


def add_relay(folder: Path) -> None:
    path = folder / ".workers" / RELAY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not any(isinstance(h, RelayHandler) for h in log.handlers):
        log.addHandler(RelayHandler(path))
    log.setLevel(logging.INFO)  # before Hydra configures this process's logging (at its first trial)


class Tail:
    """The driver's reader of the relay file: each new whole line, once."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, path.stat().st_size if path.exists() else 0

    def lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for raw in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out


# ---- the driver -----------------------------------------------------------------------------------------------
def run_workers(s, first_seed: str | None, grid: dict | None, multi: bool) -> int:
    """Submit the workers, relay their lines, wait for them (unless wait_for_workers is false); returns how many
    interrupts arrived. A worker's stop reason (the failure rate, a scheduler refusing jobs) is the sweep's."""
    from hydra.core.singleton import Singleton
    from optuna.trial import TrialState

    from sweeper.loop import Interrupts, Loop, SweepStopped, timed_out
    from sweeper.policy import count_finished
    from sweeper.results import write_results

    st, study = s.settings, s.study
    from sweeper.storage import hide_password

    spec = WorkerSpec(dataclasses.replace(st, storage=hide_password(st.storage)), s.config, s.job, s.study_name, s.folder, s.distributions, s.fixed, s.target, grid, multi,
                      s.pruning, s.pruner_spec, s.trial_storage, s.trial_overrides, s.run_name_key, s.command, s.kind,
                      first_seed, s.deadline)
    if s.kind == "local" and min(st.n_jobs, s.target) == 1 and st.wait_for_workers:
        # one local worker: the driver is it (its imports and checks are the trial's too; no second process)
        if s.target - count_finished(study) <= 0 and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            write_results(study, s, 0)
            return 0
        log.info("this process is the sweep's worker: it runs trial after trial, keeping what they share loaded")
        return int(WorkerJob(spec)(0, Singleton.get_state(), in_driver=True)["interrupted"])
    relay = s.folder / ".workers" / RELAY_FILE
    relay.parent.mkdir(parents=True, exist_ok=True)
    tail = Tail(relay)
    loop = Loop(s)  # the driver's own part: trials of workers that are gone (stale), and the results
    jobs: list = []
    stopped: list[str] = []
    rounds = 0
    with Interrupts() as irq:
        write_results(study, s, 0)
        while not irq.count:
            loop.take_over_stale()
            if not jobs:
                left = s.target - count_finished(study)
                if left <= 0 or stopped or rounds >= MAX_ROUNDS or timed_out(s):
                    break
                n = min(st.n_jobs, left)
                refused: list[str] = []
                jobs = [_submit(s, WorkerJob(spec), i, Singleton.get_state(), refused) for i in range(n)]
                jobs = [j for j in jobs if j is not None]
                submitted, noted = time.time(), {}
                if not jobs:
                    stopped.append(f"worker 0 could not be submitted ({refused[0]}); no trial was started: rerun the "
                                   "same command once it can" if refused else "no worker could be started")
                    break
                rounds += 1
                log.info("%d worker(s) started (%s), each running trial after trial: %s", len(jobs), s.kind,
                         ", ".join(str(j.job_id) for j in jobs))
                if not st.wait_for_workers:
                    log.info("not waiting for them (hydra.sweeper.wait_for_workers=false): python -m sweeper.status %s "
                             "shows the sweep", s.folder)
                    return 0
            _relay(tail)
            running = [(t.number, t.params, t.user_attrs.get("folder"), _worker_of(t))
                       for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            loop.view.show(loop.progress.lines(running, s.study_name), loop.progress.block())
            if s.kind == "slurm" and (never := _never_starts(jobs, submitted)):
                stopped.append(never)
                for job in jobs:
                    with contextlib.suppress(Exception):
                        job.cancel(check=False)
                jobs = []
                break
            if s.kind == "slurm" and time.time() - submitted > st.pending_note_s:
                _note_pending(jobs, submitted, noted)
            for job in [j for j in jobs if j.done()]:
                jobs.remove(job)
                stopped += _worker_outcome(job)
            time.sleep(max(st.poll_s, 0.5))
        loop.view.close()  # the block of progress lines (on a terminal) leaves with the loop
        _relay(tail)
        if irq.count:
            _stop_workers(s, jobs)
            deadline = time.time() + STOP_WAIT_S
            while any(not j.done() for j in jobs) and time.time() < deadline:
                _relay(tail)
                time.sleep(0.3)
            _relay(tail)
            for job in jobs:
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
            loop.interrupt_orphans()
        write_results(study, s, 0)
    if stopped and not irq.count:
        raise SweepStopped(stopped[0])
    if rounds >= MAX_ROUNDS and count_finished(study) < s.target and not irq.count and not timed_out(s):
        raise SweepStopped(f"the workers ended {MAX_ROUNDS} times with {count_finished(study)} of {s.target} trials "
                           f"finished; their logs are in {s.folder / '.submitit'}")
    return irq.count


MAX_ROUNDS = 3      # workers started again when all ended with trials left (one died, a trial was queued again)
STOP_WAIT_S = 60.0  # how long Ctrl-C waits for the workers to cut their trials short and queue them again


def _worker_of(t) -> str:
    """Where a running trial of a worker is, for its progress line."""
    if t.user_attrs.get("slurm_job"):
        return f"worker: SLURM job {t.user_attrs['slurm_job']}"
    return f"worker {t.user_attrs['worker_job']}" if t.user_attrs.get("worker_job") else "worker"


def _note_pending(jobs: list, since: float, noted: dict) -> None:
    """A worker's SLURM job still PENDING: said so with SLURM's reason, every five minutes."""
    from sweeper.loop import _pending_reason

    now = time.time()
    for job in jobs:
        if now - noted.get(job.job_id, 0) > 300 and str(job.state).startswith("PENDING"):
            noted[job.job_id] = now
            log.warning("worker SLURM job %s has been PENDING for %.0f s (reason: %s): it waits for the cluster; "
                        "scancel it or Ctrl-C the sweep to stop", job.job_id, now - since, _pending_reason(job.job_id))


def _never_starts(jobs: list, since: float) -> str | None:
    """A worker's SLURM job held PENDING for a reason waiting does not resolve (sweeper.loop.NEVER_STARTS): the
    sweep's stop reason (its workers are then cancelled: no trial had started)."""
    from sweeper.loop import NEVER_CHECK_S, NEVER_STARTS, _pending_reason

    now = time.time()
    if now - since < NEVER_CHECK_S or now - _never_starts.asked < NEVER_CHECK_S:
        return None
    _never_starts.asked = now
    for job in jobs:
        if str(job.state).startswith("PENDING") and (reason := _pending_reason(job.job_id)) in NEVER_STARTS:
            return (f"worker SLURM job {job.job_id} can never start (reason {reason}: {NEVER_STARTS[reason]}); the "
                    "workers were cancelled, no trial had started: change hydra.launcher.* (partition, cpus_per_task, "
                    "mem_gb, gpus_per_node, timeout_min, constraint) and rerun the same command")
    return None


_never_starts.asked = 0.0


def _submit(s, worker: WorkerJob, index: int, singleton_state: dict, refused: list):
    import io

    from sweeper.gpus import slot_gpus

    if s.kind == "local" and s.gpus:
        group = slot_gpus(s.gpus, index, s.gpus_per_trial, s.slots_per_gpu)
        s.executor.update_parameters(visible_gpus=group, gpus_per_node=len(group))
    if s.kind == "slurm":
        s.executor.update_parameters(name=f"{s.study_name}-worker{index}")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return s.executor.submit(worker, index, singleton_state)
    except Exception as e:  # noqa: BLE001  (sbatch refusing, slurmctld down)
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        refused.append(reason)
        log.warning("worker %d could not be submitted (%s)", index, reason)
        return None


def _relay(tail: Tail) -> None:
    for rec in tail.lines():
        log.log(rec.get("level", logging.INFO), "%s", rec.get("msg", ""))


def _worker_outcome(job) -> list[str]:
    """A worker that ended: its stop reason, if any; a worker that crashed is said so (its trial goes stale)."""
    try:
        out = job.result()
    except Exception as e:  # noqa: BLE001
        log.warning("worker %s ended without finishing (%s); its trial, if any, is retried", job.job_id,
                    " ".join(str(e).split())[:300])
        return []
    return [out["stopped"]] if isinstance(out, dict) and out.get("stopped") else []


def _stop_workers(s, jobs: list) -> None:
    """Ask each worker to stop: locally SIGTERM to its controller (which hands it on to the worker, no SIGKILL after
    it), on SLURM SIGINT to its job's steps."""
    import subprocess

    for job in jobs:
        with contextlib.suppress(Exception):
            if s.kind == "local":
                os.kill(int(job.job_id), signal.SIGTERM)
            elif str(job.state).startswith("PENDING"):  # nothing of it runs yet
                job.cancel(check=False)
            else:
                subprocess.run(["scancel", "--signal=INT", str(job.job_id)], capture_output=True, timeout=20)
