"""qlora_exp's Optuna sweeper: asynchronous slots, pruning, persistent resumable studies.

The loop: ask the study for a trial, turn its parameters into override strings, submit the trial as
its own job (a local process or a SLURM job, through submitit), and as soon as any job ends tell the
study its result and start the next one: no batch barrier. The study lives in a storage (SQLite by
default), so rerunning the same command resumes it: `n_trials` is the study's total.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from sweeper.components import (
    SweeperConfigError,
    build_pruner,
    build_sampler,
    build_storage,
    hide_password,
    range_edges,
    storage_error,
    storage_for_trials,
)
from sweeper.jobs import TrialJob, job_result, make_executor
from sweeper.search_space import grid_values, is_grid, parse_search_space
from sweeper.tensorboard import write_study_run

log = logging.getLogger("qlora_exp.sweeper")
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]{0,127}")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class Running:
    trial: optuna.trial.Trial
    job: Any
    folder: Path
    started: float
    slot: int


@dataclass
class SweepLog:
    """Start/end times of every trial this driver ran: what the slots did."""
    events: list = field(default_factory=list)


def hydra_value(v: Any) -> str:
    """A Python value as a Hydra override value (strings quoted, dicts and lists in Hydra's syntax)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


class OptunaSweeperImpl:
    def __init__(self, sampler=None, pruner=None, direction="minimize", objectives=None, metrics_file="metrics.json",
                 study_name=None, storage=None, study_dir=None, n_trials=None, n_jobs=1, max_failure_rate=0.5,
                 params=None, gpus=None, heartbeat_s=10.0, stale_after_s=120.0, prune_metric="eval_loss",
                 callbacks_key="callbacks", run_name_key="run_name", command="python -m qlora_exp", poll_s=0.5,
                 **unknown):
        if unknown:
            raise SweeperConfigError(next(iter(unknown)), next(iter(unknown.values())), "a known sweeper setting: "
                                     "sampler, pruner, direction, objectives, study_name, storage, n_trials, n_jobs, ...")
        to_py = lambda x: OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x  # noqa: E731
        self.sampler_spec, self.pruner_spec = to_py(sampler), to_py(pruner)
        self.objectives = list(to_py(objectives) or [])
        directions = to_py(direction)
        self.directions = list(directions) if isinstance(directions, list) else [directions] * max(1, len(self.objectives))
        self.metrics_file, self.study_name, self.storage_url = metrics_file, study_name, storage
        self.study_dir, self.n_trials, self.n_jobs = study_dir, n_trials, _setting("n_jobs", n_jobs, int, "an integer >= 1")
        self.max_failure_rate = _setting("max_failure_rate", max_failure_rate, float, "a number from 0 to 1")
        self.params, self.gpus = to_py(params), to_py(gpus)
        self.heartbeat_s, self.stale_after_s, self.prune_metric = heartbeat_s, stale_after_s, prune_metric
        self.callbacks_key, self.run_name_key, self.command, self.poll_s = callbacks_key, run_name_key, command, poll_s
        self.trace = SweepLog()
        self.trial_overrides: list[str] = []

    # ---- Hydra's Sweeper interface -------------------------------------------------------------
    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.job = TrialJob(hydra_context, task_function, config)

    def sweep(self, arguments: list[str]) -> list:
        launcher = self.config.hydra.get("launcher") or {}
        user_storage = any(o.split("=", 1)[0] == "hydra.sweeper.storage" for o in self.config.hydra.overrides.hydra)
        if launcher.get("study_storage") and not user_storage:
            self.storage_url = launcher.get("study_storage")  # e.g. a journal file on the cluster's shared folder
        self.trial_overrides = list(launcher.get("trial_overrides") or [])
        self._check_settings()
        distributions, fixed = self._search_space(arguments)
        study_name = self._study_name(arguments)
        sweep_dir = self._sweep_dir(study_name)
        grid = grid_values(distributions) if is_grid(distributions) and (self.sampler_spec or {}).get(
            "name", "auto") in ("auto", "grid") else None
        multi = len(self.directions) > 1
        sampler_name, sampler = build_sampler(self.sampler_spec, grid, multi)
        pruner = build_pruner(self.pruner_spec) if not multi else optuna.pruners.NopPruner()
        try:  # a storage that cannot be opened or written: one line, and nothing in it is touched
            storage = build_storage(self.storage_url)
            existed = study_name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
            study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                        directions=self.directions, load_if_exists=True)
        except SweeperConfigError:
            raise
        except Exception as e:  # noqa: BLE001  (sqlalchemy, journal and OS errors alike)
            raise storage_error(self.storage_url, e) from e
        if existed and [d.name.lower() for d in study.directions] != [d.lower() for d in self.directions]:
            raise SweeperConfigError("direction", self.directions, f"the study's own directions "
                                     f"{[d.name.lower() for d in study.directions]} (or a new study_name)")
        self._fail_stale(study)
        target = self.n_trials if self.n_trials is not None else (math.prod(map(len, grid.values())) if grid else 20)
        done = self._count_finished(study)
        log.info("%s study '%s' in %s: %d of %d trials finished; sampler %s, pruner %s, %d slot(s); folder %s",
                 "resumed" if existed else "created", study_name, hide_password(self.storage_url), done, target, sampler_name,
                 type(pruner).__name__, self.n_jobs, sweep_dir)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        ctx = dict(study=study, distributions=distributions, fixed=fixed, sweep_dir=sweep_dir, study_name=study_name,
                   target=target, pruning=not multi and not isinstance(pruner, optuna.pruners.NopPruner))
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # scancel of the driver: cancel its trials
        try:
            self._run(**ctx)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return []

    # ---- the asynchronous loop -----------------------------------------------------------------
    def _run(self, study, distributions, fixed, sweep_dir, study_name, target, pruning):
        executor, kind = make_executor(self.config.hydra.get("launcher"), sweep_dir / ".submitit")
        gpus = self._local_gpus() if kind == "local" else []
        if kind == "local":
            _share_cpu_threads(self.n_jobs)
        running: dict[int, Running] = {}
        stop_reason, last_beat = None, 0.0
        try:
            while True:
                free = [s for s in range(self.n_jobs) if s not in {r.slot for r in running.values()}]
                # other drivers may share the study: count every RUNNING trial, not only ours
                while free and stop_reason is None and self._count_finished(study) + len(
                        study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) < target:
                    r = self._launch(study, distributions, fixed, sweep_dir, study_name, pruning, executor, kind,
                                     gpus, free.pop(0))
                    running[r.trial.number] = r
                if not running:
                    break
                time.sleep(self.poll_s)
                for number in [n for n, r in running.items() if r.job.done()]:
                    self._finish(study, running.pop(number))
                    stop_reason = stop_reason or self._failure_stop(study)
                    self._report(study, sweep_dir, study_name, target, fixed, running)
                if time.time() - last_beat > self.heartbeat_s:
                    for r in running.values():
                        study._storage.set_trial_system_attr(r.trial._trial_id, "heartbeat", time.time())
                    last_beat = time.time()
        except KeyboardInterrupt:
            log.warning("interrupted: cancelling %d running trial(s); rerun the same command to resume", len(running))
            for r in running.values():
                r.job.cancel(check=False)
                self._fail(study, r.trial, "sweep interrupted (Ctrl-C)", retry=True)
            self._report(study, sweep_dir, study_name, target, fixed, {})
            raise
        self._report(study, sweep_dir, study_name, target, fixed, running)
        if stop_reason:
            raise RuntimeError(stop_reason)

    def _launch(self, study, distributions, fixed, sweep_dir, study_name, pruning, executor, kind, gpus, slot):
        trial = study.ask(fixed_distributions=distributions)
        overrides = [*fixed, *(f"{k}={hydra_value(v)}" for k, v in trial.params.items()), *self.trial_overrides,
                     f"hydra.sweep.dir={hydra_value(str(sweep_dir))}"]
        if self.run_name_key:
            swept = ",".join(f"{k}={_short(v)}" for k, v in trial.params.items())
            overrides.append(f"{self.run_name_key}={hydra_value(f'{trial.number:03d}-{swept}' if swept else f'{trial.number:03d}')}")
        if pruning and self.callbacks_key:
            cb = f"+{self.callbacks_key}.optuna_pruning"
            overrides += [f"{cb}._target_=sweeper.pruning.OptunaPruningCallback",
                          f"{cb}.storage={hydra_value(storage_for_trials(self.storage_url))}",
                          f"{cb}.study_name={hydra_value(study_name)}",
                          f"{cb}.trial_number={trial.number}", f"{cb}.metric={hydra_value(self.prune_metric)}",
                          f"{cb}.pruner={hydra_value(self.pruner_spec or {})}"]
        if kind == "local" and gpus:
            executor.update_parameters(visible_gpus=(gpus[slot % len(gpus)],), gpus_per_node=1)
        if kind == "slurm":
            executor.update_parameters(name=f"{study_name}-{trial.number}")
        job = executor.submit(self.job, overrides, trial.number, Singleton.get_state())
        folder = sweep_dir / str(trial.number)
        for key, value in (("job_id", str(job.job_id)), ("folder", str(folder)), ("slot", slot),
                           ("overrides", [o for o in overrides if not o.startswith(("+", "hydra.", "run_name"))])):
            trial.set_user_attr(key, value)
        study._storage.set_trial_system_attr(trial._trial_id, "heartbeat", time.time())
        self.trace.events.append(("start", trial.number, slot, time.time()))
        log.info("trial %d started (slot %d, job %s): %s", trial.number, slot, job.job_id,
                 " ".join(f"{k}={_short(v)}" for k, v in trial.params.items()))
        return Running(trial, job, folder, time.time(), slot)

    def _finish(self, study, r: Running) -> None:
        self.trace.events.append(("end", r.trial.number, r.slot, time.time()))
        try:
            ret = job_result(r.job)
            value = ret.return_value  # re-raises the trial's exception
        except BaseException as e:  # noqa: BLE001  (a trial's failure is data, not the sweep's)
            if isinstance(e, KeyboardInterrupt):
                raise
            self._fail(study, r.trial, _reason(e, r.job))
            return
        frozen = study._storage.get_trial(r.trial._trial_id)
        if "pruned_at_step" in frozen.user_attrs:
            _tell(study, r.trial, state=TrialState.PRUNED)
            log.info("trial %d pruned at step %s", r.trial.number, frozen.user_attrs["pruned_at_step"])
            return
        try:
            values = self._values(value, r.folder)
        except (ValueError, OSError, KeyError) as e:
            self._fail(study, r.trial, f"no objective: {e}")
            return
        _tell(study, r.trial, values=values if len(values) > 1 else values[0])
        log.info("trial %d complete: %s", r.trial.number, ", ".join(f"{v:.4g}" for v in values))

    def _values(self, value, folder: Path) -> list[float]:
        if self.objectives:
            metrics = json.loads((folder / self.metrics_file).read_text())
            values = [float(metrics[k]) for k in self.objectives]
        else:
            values = [float(value)]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"non-finite objective {values}")
        return values

    def _fail(self, study, trial, reason: str, retry: bool = False) -> None:
        trial.set_user_attr("fail_reason", reason[:1000])
        _tell(study, trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, reason.splitlines()[0][:300])
        if retry:
            self._retry(study, study._storage.get_trial(trial._trial_id))

    # ---- resume: stale trials, counts ------------------------------------------------------------
    def _fail_stale(self, study) -> None:
        """RUNNING trials whose driver stopped beating (a killed or crashed sweep): FAIL, then retry once."""
        now = time.time()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else 0)
            if now - beat < self.stale_after_s:
                continue  # another driver is alive and running it
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                               f"driver stopped: no heartbeat for {now - beat:.0f} s")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            log.warning("trial %d was left RUNNING by a stopped sweep: marked FAIL", t.number)
            self._retry(study, t)

    def _retry(self, study, t) -> None:
        """Queue the same parameters once more (as Optuna's RetryFailedTrialCallback does, keeping the
        sampler's own attributes such as GridSampler's grid_id)."""
        if t.user_attrs.get("retry_of") is not None:
            return  # retried once already
        system_attrs = {k: v for k, v in t.system_attrs.items() if k != "heartbeat"}
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=t.params,
                                                  distributions=t.distributions, user_attrs={"retry_of": t.number},
                                                  system_attrs=system_attrs))
        log.info("trial %d will be retried once", t.number)

    @staticmethod
    def _count_finished(study) -> int:
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        return sum(t.state in FINISHED and not (t.state == TrialState.FAIL and t.number in retried) for t in trials)

    def _failure_stop(self, study) -> str | None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
        failed = [t for t in trials if t.state == TrialState.FAIL]
        if len(trials) >= 2 and len(failed) / len(trials) > self.max_failure_rate:
            last = failed[-1].user_attrs.get("fail_reason", "?").splitlines()[0][:300]
            return (f"sweep stopped: {len(failed)} of {len(trials)} finished trials failed, over "
                    f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; last failure: {last}")
        return None

    # ---- results -----------------------------------------------------------------------------------
    def _report(self, study, sweep_dir: Path, study_name: str, target: int, fixed: list[str], running) -> None:
        trials = study.get_trials(deepcopy=False)
        count = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                                TrialState.FAIL)}
        results: dict[str, Any] = {"study_name": study_name, "storage": hide_password(self.storage_url),
                                   "sweep_dir": str(sweep_dir),
                                   "n_trials": target, "trials": {**count, "running": len(running)}}
        best_line = "none yet"
        if count["complete"]:
            def describe(t):
                args = " ".join([*fixed, *(f"{k}={hydra_value(v)}" for k, v in t.params.items())])
                return {"number": t.number, "values": list(t.values), "params": dict(t.params),
                        "folder": t.user_attrs.get("folder"), "command": f"{self.command} {args}".strip()}
            if len(self.directions) == 1:
                b = study.best_trial
                results["best"] = {**describe(b), "value": b.value}
                best_line = f"{b.value:.4f} (trial {b.number})"
                edges = range_edges(b)
                if edges:  # e.g. the best lr at the top of its range: the optimum may be outside what was searched
                    results["best"]["at_range_edge"] = edges
                    best_line += f"; at the edge of its range: {', '.join(f'{k}={b.params[k]:g}' for k in edges)}"
            else:
                results["pareto_front"] = [describe(t) for t in study.best_trials]
                best_line = f"{len(study.best_trials)} on the Pareto front"
        tmp = sweep_dir / f".optimization_results.yaml.{os.getpid()}.tmp"  # drivers sharing a study each write their own
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(_plain(results))))
        tmp.replace(sweep_dir / "optimization_results.yaml")
        write_study_run(study, self.config, sweep_dir, self.objectives)  # TensorBoard: <root>/<sweep>/study
        log.info("[%s] %d/%d finished: %d complete, %d pruned, %d failed, %d running; best %s", study_name,
                 self._count_finished(study), target, count["complete"], count["pruned"], count["fail"],
                 len(running), best_line)

    # ---- naming and checks ----------------------------------------------------------------------
    def _check_settings(self) -> None:
        if self.n_jobs < 1:
            raise SweeperConfigError("n_jobs", self.n_jobs, "an integer >= 1")
        if self.n_trials is not None and (not isinstance(self.n_trials, int) or self.n_trials < 1):
            raise SweeperConfigError("n_trials", self.n_trials, "an integer >= 1, or null (the grid's size or 20)")
        if not 0 <= self.max_failure_rate <= 1:
            raise SweeperConfigError("max_failure_rate", self.max_failure_rate, "a number from 0 to 1")
        for d in self.directions:
            if str(d).lower() not in ("minimize", "maximize"):
                raise SweeperConfigError("direction", d, "minimize or maximize (or a list, one per objective)")
        if self.objectives and len(self.directions) != len(self.objectives):
            raise SweeperConfigError("direction", self.directions, f"one direction per objective {self.objectives}")
        if not self.storage_url:
            raise SweeperConfigError("storage", self.storage_url, "sqlite:///path.db, journal:///path.log or a database URL")
        for key in ("heartbeat_s", "stale_after_s", "poll_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise SweeperConfigError(key, value, "a number of seconds > 0")

    def _search_space(self, arguments: list[str]):
        parser = OverridesParser.create()
        parsed = parser.parse_overrides(arguments)
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        distributions, fixed_params = parse_search_space(self.params, sweeps)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        fixed += [f"{k}={v}" for k, v in fixed_params.items()]
        if not distributions:
            raise SweeperConfigError("params", self.params, "at least one parameter to search: a search preset "
                                     "(search=rank_alpha_lr) or a sweep override such as lora.r=8,16,64")
        return distributions, fixed

    def _study_name(self, arguments: list[str]) -> str:
        if self.study_name:
            name = str(self.study_name)
        else:
            search = self.config.hydra.runtime.choices.get("search") or "sweep"
            key = json.dumps([sorted(arguments), self.params, self.objectives], sort_keys=True, default=str)
            name = f"{search}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        if not STUDY_NAME.fullmatch(name) or ".." in name:
            raise SweeperConfigError("study_name", name, "letters, digits and _ . = , + - (no path separators), "
                                     "at most 128 characters")
        return name

    def _sweep_dir(self, study_name: str) -> Path:
        user_set = any(o.split("=", 1)[0] == "hydra.sweep.dir" for o in self.config.hydra.overrides.hydra)
        folder = Path(self.config.hydra.sweep.dir) if user_set else Path(self.study_dir) / study_name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SweeperConfigError("hydra.sweep.dir" if user_set else "study_dir", str(folder),
                                     f"a folder this process can write ({e.strerror or e})") from None
        with open_dict(self.config):
            self.config.hydra.sweep.dir = str(folder)
        return folder

    def _local_gpus(self) -> list[int]:
        """GPU ids to spread local slots over: `gpus`, else CUDA_VISIBLE_DEVICES, else every GPU torch sees. On a
        machine without an NVIDIA driver, none, without importing torch (seconds of the driver's start-up)."""
        if self.gpus is not None:
            return list(self.gpus)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [int(x) for x in visible.split(",") if x.strip().isdigit()]
        if not has_nvidia_driver():
            return []
        try:
            import torch

            return list(range(torch.cuda.device_count()))
        except ImportError:
            return []


def has_nvidia_driver() -> bool:
    """An NVIDIA kernel driver is loaded (what CUDA needs before torch can see a GPU)."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or any(Path("/dev").glob("nvidia[0-9]*"))


def _tell(study, trial, **kwargs) -> None:
    """study.tell; GridSampler calls study.stop() once the grid is done, which only works inside
    study.optimize: the trial is stored all the same (Optuna writes the state in a `finally`)."""
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _share_cpu_threads(n_jobs: int) -> None:
    """Local trial processes inherit this environment: split the cores between the slots, or OpenMP
    threads of concurrent trials spin against each other (seen here: 10x slower trials on 2 cores)."""
    import os

    per_job = str(max(1, (os.cpu_count() or 1) // n_jobs))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, per_job)


def _setting(key: str, value: Any, kind: type, accepted: str) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SweeperConfigError(key, value, accepted) from None


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _plain(x: Any) -> Any:
    """Plain containers for the results file; a `${...}` in a string (an override such as `+x=${optimizer.lr}`)
    escaped, so the file reads back as written instead of failing as an interpolation."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, str):
        return x.replace("${", "\\${")
    return x


def _reason(e: BaseException, job) -> str:
    """One line: the exception's first line (submitit puts the SLURM state there) and, when the job's
    error stream is quoted in it, the trial's own last error line (e.g. `error: lora.r=0 is not accepted`)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    cause = next((line for line in reversed(lines[1:]) if line.startswith("error:")
                  or re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)), None)
    state = getattr(job, "state", None)
    if state and state not in ("FINISHED", "COMPLETED", "DONE") and "state" not in text.lower():
        text = f"{text} (job state: {state})"
    text = " ".join(text.split())[:600]
    return f"{text} | {cause[:390]}" if cause and cause not in text else text
