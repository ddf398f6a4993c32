"""qlora_exp's Optuna sweeper: asynchronous slots, pruning, persistent resumable studies, for any Hydra app.

`sweep()` wires the parts: the settings (sweeper.settings), the search space (sweeper.search_space) and the check of
its every value (sweeper.checks), the study's name and folder (sweeper.naming), its sampler, pruner and storage
(sweeper.samplers, sweeper.storage), then runs the loop (sweeper.loop) and writes the results (sweeper.results).
The study lives in a storage (SQLite by default), so rerunning the same command resumes it: `n_trials` is the
study's total.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from sweeper.bytecode import cache_bytecode
from sweeper.checks import check_sweep, sweep_points
from sweeper.errors import SweeperConfigError
from sweeper.gpus import local_gpus, share_cpu_threads
from sweeper.jobs import TrialJob, app_trial_overrides, launcher_params, make_executor
from sweeper.loop import Loop, SweepInterrupted
from sweeper.naming import has_key, legacy_study_name, study_name, sweep_dir, this_command
from sweeper.policy import count_finished, register_driver
from sweeper.results import forget_last_line
from sweeper.samplers import build_pruner, build_sampler
from sweeper.search_space import grid_values, is_grid, parse_search_space
from sweeper.settings import Settings
from sweeper.storage import build_storage, hide_in_config, hide_password, storage_error, storage_for_trials
from sweeper.workers import run_workers

log = logging.getLogger("qlora_exp.sweeper")


class Sweep:
    """What one `sweep()` call works on; the loop reads it."""

    settings: Settings
    config: DictConfig
    study: optuna.Study
    study_name: str
    folder: Path
    distributions: dict
    fixed: list[str]
    target: int
    pruning: bool
    pruner_spec: dict
    trial_storage: str | None
    trial_overrides: list[str]
    run_name_key: str | None
    extender: Any
    command: str
    executor: Any
    kind: str
    gpus: list[int]
    job: TrialJob
    driver: str
    slots_per_gpu: int
    gpus_per_trial: int = 1         # the app's trainer.gpus: each local slot gets a group of this many GPUs
    deadline: float | None = None   # hydra.sweeper.timeout: no trial starts after this time.time()


def command_started() -> float:
    """When this process started, as time.time(): hydra.sweeper.timeout counts from the moment the user pressed
    enter, the driver's imports and checks included (what a user with a stopwatch, or a sweep's budget, counts).
    Read from /proc/self/stat (Linux); elsewhere, now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


class OptunaSweeperImpl:
    def __init__(self, **settings: Any) -> None:
        self.settings = Settings.from_config(**settings)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.job = TrialJob(hydra_context, task_function, config)

    def sweep(self, arguments: list[str]) -> None:
        st, config, s = self.settings, self.config, Sweep()
        s.deadline = command_started() + st.timeout if st.timeout is not None else None
        s.settings, s.config, s.job = st, config, self.job
        cache_bytecode(st.bytecode_cache)  # before the checks' imports and any worker, trial process or SLURM job
        launcher = config.hydra.get("launcher") or {}
        user_storage = any(o.split("=", 1)[0] == "hydra.sweeper.storage" for o in config.hydra.overrides.hydra)
        if launcher.get("study_storage") and not user_storage:
            st.storage = launcher.get("study_storage")  # e.g. a journal file on the cluster's shared folder
        launcher_params(config.hydra.get("launcher"))  # a bad launcher setting: one line, before anything is written
        s.trial_overrides = app_trial_overrides(config) if config.hydra.get("launcher") else []
        s.distributions, s.fixed = self._search_space(arguments)
        s.study_name = study_name(config, st.study_name, arguments, st.params, st.objectives)
        legacy = legacy_study_name(config, st.study_name, arguments, st.params, st.objectives)
        if legacy and self._holds(legacy) and not self._holds(s.study_name):  # a study this command began earlier
            s.study_name = legacy
        multi = len(st.directions) > 1
        s.extender = _method("custom_search_space", st.custom_search_space)
        # a custom_search_space adds parameters of its own to each trial: no grid can enumerate those
        grid = grid_values(s.distributions) if is_grid(s.distributions) and s.extender is None else None
        sampler_name, sampler = build_sampler(st.sampler, grid, multi, s.study_name)
        grid = grid if isinstance(sampler, optuna.samplers.GridSampler) else None
        pruner_name, pruner, s.pruner_spec = build_pruner(st.pruner, grid=grid is not None)
        if multi or st.storage is None:  # trials report to the study themselves: not to an in-memory one
            pruner_name, pruner = "none", optuna.pruners.NopPruner()
        s.run_name_key = st.run_name_key if has_key(config, st.run_name_key) else None
        s.pruning = not isinstance(pruner, optuna.pruners.NopPruner) and has_key(config, st.callbacks_key)
        if not s.pruning:  # nothing reports intermediate values: say so rather than name an idle pruner
            pruner_name, pruner = "none", optuna.pruners.NopPruner()
        s.command = st.command or this_command()
        size = math.prod(map(len, grid.values())) if grid is not None else None
        s.target = st.n_trials if st.n_trials is not None else (size or 20)
        if size is not None and s.target > size:
            log.info("n_trials=%d is more than the grid's %d point(s): capped at %d", s.target, size, size)
            s.target = size
        # every value of the sweep, composed as a trial's config and checked, before the study is even opened
        check_sweep(self.hydra_context, config, s.fixed, s.trial_overrides, sweep_points(s.distributions, grid),
                    st.check)
        s.folder = sweep_dir(config, st.study_dir, s.study_name)  # a folder that cannot be written: before the study
        forget_last_line(s.folder)  # this sweep's first progress line is said, even in a process that ran it before
        s.study, existed = self._study(s.study_name, sampler, pruner)
        if not existed:  # what optuna-dashboard shows of it: the metric's name, and the command that made it
            self._describe(s.study, config, s.command, arguments)
        s.driver, later = register_driver(s.study)
        if later is not None:  # not the study's first driver: a seed of its own, so parallel drivers explore
            s.study.sampler = build_sampler(st.sampler, grid, multi, s.study_name, driver=later)[1]
        s.trial_storage = storage_for_trials(st.storage) if st.storage is not None else None
        hide_in_config(config, st.storage)  # before multirun.yaml and any trial's config are written
        self._note_folder(s.study, existed, s.folder)
        log.info("%s study '%s' in %s: %d of %d trials finished; sampler %s, pruner %s, %d slot(s); folder %s",
                 "resumed" if existed else "created", s.study_name, hide_password(st.storage) or "memory",
                 count_finished(s.study), s.target, sampler_name, pruner_name, st.n_jobs, s.folder)
        OmegaConf.save(config, s.folder / "multirun.yaml")
        s.executor, s.kind = make_executor(config.hydra.get("launcher"), s.folder / ".submitit")
        s.gpus = local_gpus(st.gpus) if s.kind == "local" else []
        s.gpus_per_trial = self._gpus_per_trial(s, config)
        s.slots_per_gpu = self._slots_per_gpu(s, arguments)
        if s.kind == "local":
            share_cpu_threads(st.n_jobs)
        if st.mode == "workers" and st.storage is None:
            log.info("hydra.sweeper.storage is null (an in-memory study workers cannot share): one process per trial")
            st.mode = "processes"
        if st.mode == "workers":
            if run_workers(s, later, grid, multi):
                raise SweepInterrupted
            return None
        loop = Loop(s)
        loop.take_over_stale()
        if loop.run():
            raise SweepInterrupted
        return None

    def _gpus_per_trial(self, s: Sweep, config: DictConfig) -> int:
        """GPUs one trial spans (the app's `trainer.gpus`, fixed for the sweep): the size of each local slot's GPU
        group; on SLURM, what each trial's job must be given (hydra.launcher.gpus_per_node)."""
        if not has_key(self.config, "trainer.gpus"):
            return 1
        fixed = [o.split("=", 1)[1] for o in [*s.fixed, *s.trial_overrides] if o.startswith("trainer.gpus=")]
        try:
            per = int(fixed[-1] if fixed else OmegaConf.select(self.config, "trainer.gpus"))
        except (TypeError, ValueError):
            return 1  # not a number: the trials' own check refuses it, in one line, before any trial starts
        per = max(1, per)
        if s.kind == "local" and s.gpus and per > len(s.gpus):
            raise SweeperConfigError("trainer.gpus", per, f"at most {len(s.gpus)}: the GPUs this sweep's local slots "
                                     "share (hydra.sweeper.gpus, else CUDA_VISIBLE_DEVICES, else every GPU)")
        node = OmegaConf.select(config, "hydra.launcher.gpus_per_node", default=None)
        if s.kind == "slurm" and per > 1 and (not isinstance(node, int) or node < per):
            raise SweeperConfigError("hydra.launcher.gpus_per_node", node, f"at least trainer.gpus = {per} (each "
                                     "trial's job holds the GPUs its processes train on)")
        return per

    def _slots_per_gpu(self, s: Sweep, arguments: list[str]) -> int:
        """Trials sharing one local GPU (`slots_per_gpu`): a number, or auto from the trial's memory estimate
        (`memory_estimate`, e.g. qlora_exp.memory.trial_peak_gb) and the GPU's memory; each is then capped at its
        share (`trainer.memory_budget_gb`, when the app has the key and it is not set)."""
        st = self.settings
        if st.slots_per_gpu is None or s.kind != "local" or not s.gpus:
            return 1
        k = st.slots_per_gpu
        total_gb = _gpu_memory_gb() if k == "auto" or k > 1 else None
        if k == "auto":
            estimate = _method("memory_estimate", st.memory_estimate)
            if estimate is None:
                raise SweeperConfigError("slots_per_gpu", "auto", "a number, or auto with hydra.sweeper.memory_estimate "
                                         "set (module.function(trial_cfg) -> GiB)")
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(s.fixed))
            k = max(1, int(0.9 * total_gb // max(float(estimate(cfg)), 0.1)))
            log.info("slots_per_gpu=auto: %d trial(s) per GPU (%.1f GiB estimated per trial, %.0f GiB GPU)", k,
                     float(estimate(cfg)), total_gb)
        groups = max(1, len(s.gpus) // s.gpus_per_trial)  # GPUs, or groups of trainer.gpus of them
        if st.n_jobs > k * groups:
            raise SweeperConfigError("n_jobs", st.n_jobs, f"at most slots_per_gpu x GPUs = {k} x {groups}"
                                     + (f" (groups of trainer.gpus={s.gpus_per_trial})" if s.gpus_per_trial > 1 else ""))
        if k > 1 and has_key(self.config, "trainer.memory_budget_gb") and not any(
                o.startswith("trainer.memory_budget_gb=") for o in [*s.fixed, *s.trial_overrides]):
            if OmegaConf.select(self.config, "trainer.memory_budget_gb") is None:
                s.trial_overrides = [*s.trial_overrides, f"trainer.memory_budget_gb={round(0.95 * total_gb / k, 1)}"]
        return int(k)

    def _search_space(self, arguments: list[str]):
        parsed = OverridesParser.create().parse_overrides(arguments)
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        plain = [o for o in parsed if not o.is_sweep_override()]
        # a fixed command-line value of a key the search space holds takes it out of the search
        params = {k: v for k, v in (self.settings.params or {}).items()
                  if k not in {o.get_key_element() for o in plain}}
        distributions, fixed_params = parse_search_space(params, sweeps)
        fixed = [o.input_line for o in plain] + [f"{k}={v}" for k, v in fixed_params.items()]
        return distributions, fixed

    def _study(self, name: str, sampler, pruner) -> tuple[optuna.Study, bool]:
        st = self.settings
        try:  # a storage that cannot be opened or written: one line, and nothing in it is touched
            storage = build_storage(st.storage, st.heartbeat_s, st.stale_after_s)
            existed = name in {x.study_name for x in optuna.get_all_study_summaries(storage)}
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                        directions=st.directions, load_if_exists=True)
        except SweeperConfigError:
            raise
        except Exception as e:  # noqa: BLE001  (sqlalchemy, journal and OS errors alike)
            raise storage_error(st.storage, e) from e
        if existed and [d.name.lower() for d in study.directions] != [d.lower() for d in st.directions]:
            raise SweeperConfigError("direction", st.directions, f"the study's own directions "
                                     f"{[d.name.lower() for d in study.directions]} (or a new study_name)")
        return study, existed

    def _holds(self, name: str) -> bool:
        """The storage already holds a study of this name (False when it cannot be read: _study says why)."""
        try:
            storage = build_storage(self.settings.storage, self.settings.heartbeat_s, self.settings.stale_after_s)
            return name in {x.study_name for x in optuna.get_all_study_summaries(storage)}
        except Exception:  # noqa: BLE001
            return False

    def _describe(self, study, config, command: str, arguments: list[str]) -> None:
        import re
        import shlex
        import warnings

        names = self.settings.objectives or [str(OmegaConf.select(config, "objective", default=None) or "objective")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names[:len(study.directions)] if len(names) >= len(study.directions)
                                   else [f"objective {i}" for i in range(len(study.directions))])
        settings = [o for o in config.hydra.overrides.hydra if not str(o).startswith("hydra.mode=")]
        line = " ".join(shlex.quote(str(a)) for a in [*arguments, *settings])
        study.set_user_attr("command", re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", f"{command} -m {line}"))

    @staticmethod
    def _note_folder(study, existed: bool, folder: Path) -> None:
        first = study.user_attrs.get("sweep_dir")
        if not existed or first is None:
            study.set_user_attr("sweep_dir", str(folder))
        elif first != str(folder):
            log.warning("study '%s' was started in %s: its earlier trials' folders are there; new ones go to %s",
                        study.study_name, first, folder)


def _method(key: str, dotted: str | None):
    if not dotted:
        return None
    from hydra.utils import get_method

    try:
        return get_method(dotted)
    except Exception as e:  # noqa: BLE001
        raise SweeperConfigError(key, dotted, f"a module.function Hydra can import ({' '.join(str(e).split())[:200]})"
                                 ) from None


def _gpu_memory_gb() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30
