"""The study's own TensorBoard run, beside its trials' runs: `<tensorboard_root>/<sweep folder>/study`.

Scalars, with the trial number as the step (under `tuning/`, a group TensorBoard's Time Series lists after the
trials' `eval` and `train`, the two it opens):

    tuning/value                 the objective of each complete trial
    tuning/best_value            the best objective of the complete trials up to this number
    tuning/trials_complete       how many trials up to this number are complete (also _pruned, _failed, _running)

With several objectives, `tuning/value/<name>` and `tuning/best_value/<name>` per objective (the best of each
objective on its own; the Pareto front is in the report). A text `tuning/summary` holds the counts and the
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
    """(Re)write the study's run from the study's trials as they are now, and give each trial that ended since a
    row in the HPARAMS table (write_trial_rows). Never raises."""
    try:
        run_dir = study_run_dir(config, sweep_dir)
        if run_dir is not None:
            write_study_events(study, run_dir, objective_names)
            write_trial_rows(study, run_dir.parent)
    except Exception as e:  # noqa: BLE001  (a TensorBoard problem must not stop a sweep)
        log.warning("could not write the study's TensorBoard run: %s", e)


# ---- the HPARAMS table: a row per trial, in the study's own words ----------------------------------------------
# A trial's row is a run of its own under the trial's run, `<trial's run>/hparams`: its session (the hparams and
# the state) and its final metrics as scalars, nothing else, so the table's metric columns are those metrics
# (TensorBoard shows the first five, by name: hparams/eval_loss first) and not every training scalar. The
# experiment is computed by TensorBoard from the sessions: a key whose value differs between rows is listed first
# and shown by default (five columns): in a sweep, the swept keys, `state` and `trial`, which reads
# "003 rank_alpha_lr-1a2b3c4d" (number first, then the sweep). In a sweep of this sweeper the trial writes only
# ROW_FILE (its hparams and metrics) and the driver writes the row when the study has ended the trial, with the
# state the study holds (complete, pruned, failed, interrupted): a trial the driver failed, or one cut short,
# reads as such. A row cannot be changed once TensorBoard has read it, so a running trial has none yet.
ROW_RUN = "hparams"
ROW_FILE = "hparams.json"
ROW_STATUS = {"complete": "STATUS_SUCCESS", "pruned": "STATUS_SUCCESS", "failed": "STATUS_FAILURE",
              "interrupted": "STATUS_FAILURE"}  # (TensorBoard's table hides STATUS_ABORTED rows by default)


def write_row(run_dir: Path, hparams: dict, metrics: dict, step: int, state: str) -> Path:
    """A trial's row: `<run_dir>/hparams` with the session (hparams + state) and the metrics (tag -> value)."""
    from google.protobuf.struct_pb2 import Value
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    now = time.time()
    values = {}
    for key, value in {**hparams, "state": state}.items():
        if isinstance(value, bool):
            values[key] = Value(string_value=str(value).lower())
        elif isinstance(value, (int, float)):
            values[key] = Value(number_value=float(value))
        else:
            values[key] = Value(string_value=str(value))

    def session(tag: str, **info):
        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **info)
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                      content=content.SerializeToString()))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    start = session(metadata.SESSION_START_INFO_TAG, session_start_info=plugin_data_pb2.SessionStartInfo(
        hparams=values, start_time_secs=now))
    end = session(metadata.SESSION_END_INFO_TAG, session_end_info=plugin_data_pb2.SessionEndInfo(
        status=api_pb2.Status.Value(ROW_STATUS.get(state, "STATUS_UNKNOWN")), end_time_secs=now))
    summaries = [start, *(scalar(tag, v) for tag, v in metrics.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)), end]
    row = Path(run_dir) / ROW_RUN
    row.mkdir(parents=True, exist_ok=True)
    target = row / f"events.out.tfevents.{time.time_ns():020d}.row"
    partial = row / f".partial-{os.getpid()}"
    with open(partial, "wb") as f:
        writer = RecordWriter(f)
        writer.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        for summary in summaries:
            writer.write(Event(wall_time=now, step=int(step), summary=summary).SerializeToString())
    os.replace(partial, target)
    return target


def study_state(t) -> str | None:
    """The row's `state` of a trial as the study holds it (None while it runs or waits)."""
    from optuna.trial import TrialState

    if t.state == TrialState.FAIL:
        return "interrupted" if any(t.user_attrs.get(k) for k in ("interrupted", "orphaned")) else "failed"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(t.state)


def write_trial_rows(study, sweep_run_root: Path) -> int:
    """Each ended trial of the study without a row gets one (write_row), from its ROW_FILE when it wrote one, else
    from its parameters alone (a trial cut short before its start, or an app that writes none), in its own run
    (`tensorboard_dir` of its ROW_FILE, else `<sweep_run_root>/<NNN-params>`). Returns how many were written."""
    import json

    from sweeper.naming import short

    written = 0
    for t in study.get_trials(deepcopy=False):
        state = study_state(t)
        if state is None or t.user_attrs.get("duplicate"):  # running, waiting; a grid point given twice: not run
            continue
        folder = t.user_attrs.get("folder")
        try:
            saved = json.loads((Path(folder) / ROW_FILE).read_text()) if folder else {}
        except (OSError, ValueError):
            saved = {}
        swept = ",".join(f"{k}={short(v)}" for k, v in t.params.items())
        run = Path(saved.get("tensorboard_dir") or sweep_run_root / (f"{t.number:03d}-{swept}" if swept else
                                                                      f"{t.number:03d}").replace("/", "_"))
        if (run / ROW_RUN).is_dir() and any((run / ROW_RUN).glob("*tfevents*")):
            continue
        hparams = {**t.params, **saved.get("hparams", {}), "trial": f"{t.number:03d} {study.study_name}"}
        write_row(run, hparams, saved.get("metrics", {}), saved.get("step", 0), state)
        written += 1
    return written


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
                add(scalar(_tag("tuning/value", names, i), v), t.number)
        for i, b in enumerate(best):
            if b is not None:
                add(scalar(_tag("tuning/best_value", names, i), b), t.number)
        for s in STATES:
            add(scalar(f"tuning/trials_{s}", counts[s]), t.number)
    if trials:
        add(text("tuning/summary", _summary(study.study_name, counts, names, best, best_trial, len(names) > 1)),
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
