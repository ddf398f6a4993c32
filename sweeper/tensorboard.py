"""The study's own TensorBoard run, beside its trials' runs: `<tensorboard_root>/<sweep folder>/study`.

Scalars, with the trial number as the step:

    study/value                 the objective of each complete trial
    study/best_value            the best objective of the complete trials up to this number
    study/trials_complete       how many trials up to this number are complete (also _pruned, _failed, _running)

With several objectives, `study/value/<name>` and `study/best_value/<name>` per objective (the best of each
objective on its own; the Pareto front is in the report). A text `study/summary` holds the counts and the
best trial. The sweeper rewrites the run whole after every finished trial (trials finish out of order, so
appending by trial number would go back in steps): each rewrite is a new events file that starts with a
SessionLog START, which tells a running TensorBoard to drop what the earlier files said. Earlier files are
deleted once a newer one has existed for `KEEP_SUPERSEDED_S` (a TensorBoard reading a deleted file stalls).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

RUN_NAME = "study"
KEEP_SUPERSEDED_S = 300
STATES = ("complete", "pruned", "failed", "running")


def study_run_dir(config, sweep_dir: Path) -> Path | None:
    """Where the study's run goes: beside the trials' runs. A trial's own config.yaml says where its run
    is (a SLURM trial may resolve paths differently from the driver); before any has one, the driver's
    `paths.tensorboard_root` / <sweep folder name>, as `__main__` names the trials' runs."""
    from omegaconf import OmegaConf

    for trial_config in sorted(Path(sweep_dir).glob("*/config.yaml")):
        try:
            trial_run = OmegaConf.select(OmegaConf.load(trial_config), "paths.tensorboard_dir", default=None)
        except Exception:  # noqa: BLE001  (a config being written: try the next one)
            continue
        if trial_run:
            return Path(trial_run).parent / RUN_NAME
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
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from tensorboard.summary.writer.record_writer import RecordWriter

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    names = _objective_names(len(study.directions), objective_names)
    maximize = [d.name.lower() == "maximize" for d in study.directions]
    state_name = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                  TrialState.RUNNING: "running"}

    now = time.time()
    events = [Event(wall_time=now, file_version="brain.Event:2"),
              Event(wall_time=now, step=0, session_log=SessionLog(status=SessionLog.START))]
    add = lambda summary, step: events.append(Event(wall_time=now, step=step, summary=summary))  # noqa: E731
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
                add(scalar(_tag("study/value", names, i), v), t.number)
        for i, b in enumerate(best):
            if b is not None:
                add(scalar(_tag("study/best_value", names, i), b), t.number)
        for s in STATES:
            add(scalar(f"study/trials_{s}", counts[s]), t.number)
    if trials:
        add(text("study/summary", _summary(study.study_name, counts, names, best, best_trial, len(names) > 1)),
            trials[-1].number)

    old = sorted(run_dir.glob("*tfevents*"))
    # a name that sorts after every earlier one: TensorBoard reads a run's files in name order
    stamp = max([time.time_ns(), *(_stamp(p) + 1 for p in old)])
    target = run_dir / f"events.out.tfevents.{stamp:020d}.study"
    partial = run_dir / f".partial-{os.getpid()}"  # no "tfevents" in the name: TensorBoard ignores it
    with open(partial, "wb") as f:
        writer = RecordWriter(f)
        for e in events:
            writer.write(e.SerializeToString())
    os.replace(partial, target)
    for p, successor in zip(old, [*old[1:], target], strict=False):  # (no old files: nothing to do)
        if _stamp(successor) < (time.time() - KEEP_SUPERSEDED_S) * 1e9:
            p.unlink(missing_ok=True)
    return target


def scalar(tag: str, value: float):
    """A scalar summary, from TensorBoard's protos alone (the driver need not import torch)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])


def text(tag: str, markdown: str):
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="text", content=TextPluginData(version=0).SerializeToString()))
    tensor = TensorProto(dtype="DT_STRING", string_val=[markdown.encode()],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)])


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
