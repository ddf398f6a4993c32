"""The study's own TensorBoard run, beside its trials' runs: `<tensorboard_root>/<sweep folder>/study`.

Scalars, with the trial number as the step:

    study/value                 the objective of each complete trial
    study/best_value            the best objective of the complete trials up to this number
    study/trials_complete       how many trials up to this number are complete (also _pruned, _failed, _running)

With several objectives, `study/value/<name>` and `study/best_value/<name>` per objective (the best of each
objective on its own; the Pareto front is in the report). A text `study/summary` holds the counts and the
best trial. The sweeper rewrites the run whole after every finished trial (trials finish out of order, so
appending by trial number would go back in steps): a fresh events file replaces the previous one.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

RUN_NAME = "study"
STATES = ("complete", "pruned", "failed", "running")


def study_run_dir(config, sweep_dir: Path) -> Path | None:
    """Where the study's run goes: beside the trials' runs (`__main__` names those by the sweep folder)."""
    from omegaconf import OmegaConf

    root = OmegaConf.select(config, "paths.tensorboard_root", default=None)
    return Path(root) / Path(sweep_dir).name / RUN_NAME if root else None


def write_study_run(study, config, sweep_dir: Path, objective_names=None) -> None:
    """(Re)write the study's run from the study's trials as they are now. Never raises."""
    try:
        run_dir = study_run_dir(config, sweep_dir)
        if run_dir is not None:
            write_study_events(study, run_dir, objective_names)
    except Exception as e:  # noqa: BLE001  (a TensorBoard problem must not stop a sweep)
        log.warning("could not write the study's TensorBoard run: %s", e)


def write_study_events(study, run_dir: Path, objective_names=None) -> Path:
    from optuna.trial import TrialState
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    names = _objective_names(len(study.directions), objective_names)
    maximize = [d.name.lower() == "maximize" for d in study.directions]
    state_name = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                  TrialState.RUNNING: "running"}

    tmp = run_dir.parent / f".{run_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(tmp))
    best: list[float | None] = [None] * len(names)
    counts = dict.fromkeys(STATES, 0)
    best_trial = None
    for t in trials:
        state = state_name.get(t.state)
        if state:
            counts[state] += 1
        if t.state == TrialState.COMPLETE and t.values and all(math.isfinite(v) for v in t.values):
            for i, v in enumerate(t.values):
                if best[i] is None or (v > best[i] if maximize[i] else v < best[i]):
                    best[i] = v
                    if i == 0:
                        best_trial = t
                writer.add_scalar(_tag("study/value", names, i), v, t.number)
        for i, b in enumerate(best):
            if b is not None:
                writer.add_scalar(_tag("study/best_value", names, i), b, t.number)
        for s in STATES:
            writer.add_scalar(f"study/trials_{s}", counts[s], t.number)
    if trials:
        writer.add_text("study/summary", _summary(study.study_name, counts, names, best, best_trial,
                                                   len(names) > 1), trials[-1].number)
    writer.close()

    (new,) = [p for p in tmp.iterdir() if "tfevents" in p.name]
    old = sorted(p for p in run_dir.glob("*tfevents*")) if run_dir.is_dir() else []
    run_dir.mkdir(parents=True, exist_ok=True)
    # a name that sorts after every earlier one (TensorBoard reads a run's files in name order)
    stamp = max([time.time_ns(), *(_stamp(p) + 1 for p in old)])
    target = run_dir / f"events.out.tfevents.{stamp:020d}.study"
    os.replace(new, target)
    for p in old:
        p.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def _objective_names(n: int, names) -> list[str]:
    names = [str(x) for x in (names or [])]
    if len(names) == n:
        return names
    return ["value"] if n == 1 else [f"objective_{i}" for i in range(n)]


def _tag(base: str, names: list[str], i: int) -> str:
    return base if len(names) == 1 else f"{base}/{names[i]}"


def _stamp(path: Path) -> int:
    try:
        return int(path.name.split(".")[3])
    except (IndexError, ValueError):
        return 0


def _summary(study_name, counts, names, best, best_trial, multi) -> str:
    lines = [f"**{study_name}**", "", "| state | trials |", "| --- | --- |",
             *(f"| {s} | {counts[s]} |" for s in STATES), ""]
    if multi:
        lines.append("best of each objective on its own: " + ", ".join(
            f"{n} {b:.4g}" for n, b in zip(names, best, strict=True) if b is not None))
    elif best_trial is not None:
        params = ", ".join(f"{k}={v}" for k, v in best_trial.params.items())
        lines.append(f"best: {best[0]:.4g} (trial {best_trial.number}: {params})")
    return "\n".join(lines)
