"""One TensorBoard for a sweep: a real `tensorboard` server over a small sweep, read through its HTTP API.

The sweep has one trial of each end: complete, pruned (a threshold pruner at step 10) and failed (a
test callback raises at step 12, mid-training). Every trial must have its run with per-step scalars and
a row in the HPARAMS table whose eval loss is the one in its metrics.json; the study has its own run.
"""
import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import read_metrics

PER_STEP = ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "train/tokens_per_s",
            "train/peak_memory_gb")


def sweep_trials(cwd: Path) -> tuple[Path, dict[str, dict]]:
    """The sweep folder and, by TensorBoard run name (<sweep>/<NNN-...>), each trial's metrics and config."""
    (folder,) = (cwd / "outputs" / "multirun").iterdir()
    tb_root = cwd / "outputs" / "tensorboard"
    trials = {}
    for trial_dir in sorted(p for p in folder.iterdir() if p.name.isdigit()):
        cfg = OmegaConf.load(trial_dir / "config.yaml")
        run = Path(cfg.paths.tensorboard_dir).relative_to(tb_root).as_posix()
        trials[run] = {"metrics": read_metrics(trial_dir), "lr": cfg.optimizer.lr, "number": int(trial_dir.name)}
    return folder, trials


class TensorBoard:
    def __init__(self, logdir: Path, log_file: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(log_file, "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                                      "127.0.0.1", "--port", str(self.port), "--load_fast=false"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.log_file = log_file

    def request(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def wait_for(self, check, what: str, timeout: float = 180):
        """Poll until `check()` returns a truthy value (TensorBoard loads event files in the background)."""
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tensorboard exited {self.proc.returncode}: {self.log_file.read_text()[-3000:]}")
            try:
                last = check()
                if last:
                    return last
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}; last answer: {last!r}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.slow
def test_every_trial_is_in_one_tensorboard_with_its_hparams(tb_sweep, tmp_path):
    sweep = tb_sweep
    folder, trials = sweep_trials(sweep)
    statuses = {t["metrics"]["status"] for t in trials.values()}
    assert len(trials) == 3 and statuses == {"complete", "pruned", "failed"}, {r: t["metrics"]["status"] for r, t in
                                                                               trials.items()}
    study_run = f"{folder.name}/study"
    tb = TensorBoard(sweep / "outputs" / "tensorboard", tmp_path / "tensorboard.log")
    try:
        # runs: every trial, named <study>/<NNN-swept values>, and the study's own run
        runs = tb.wait_for(lambda: (r := tb.request("/data/runs")) and set(trials) | {study_run} <= set(r) and r,
                           "every run")
        for run, t in trials.items():
            assert run.startswith(f"{folder.name}/{t['number']:03d}-optimizer.lr="), runs

        # scalars per step: loss, eval loss, learning rate, grad norm, tokens/s, memory
        tags = tb.wait_for(lambda: (x := tb.request("/data/plugin/scalars/tags")) and all(
            set(PER_STEP) <= set(x.get(r, {})) for r in trials) and x, "the per-step scalars")
        for run, t in trials.items():
            assert set(PER_STEP) <= set(tags[run]), (run, sorted(tags[run]))
            evals = scalars(tb, run, "eval/loss")
            history = t["metrics"]["eval_history"]
            if t["metrics"]["status"] == "failed":  # stopped at step 12: evaluated at 0 and 10
                assert [s for s, _ in evals] == [0, 10] and t["metrics"]["eval_loss"] is None
            else:
                assert [s for s, _ in evals] == [s for s, _ in history]
                assert [v for _, v in evals] == pytest.approx([v for _, v in history], rel=1e-5)
            # a training log at the first step and every trainer.log_every (5) steps, up to the last step reached
            # (12 for the failed one)
            last = t["metrics"]["steps"] or 12
            assert [s for s, _ in scalars(tb, run, "train/loss")] == [1, *range(5, last + 1, 5)], run

        # the study's run: best value so far per trial number, trials per state
        complete = [t for t in trials.values() if t["metrics"]["status"] == "complete"]
        best = scalars(tb, study_run, "tuning/best_value")
        assert best[-1][0] == 2 and best[-1][1] == pytest.approx(complete[0]["metrics"]["eval_loss"], rel=1e-5)
        for state in ("complete", "pruned", "failed"):
            counts = scalars(tb, study_run, f"tuning/trials_{state}")
            assert [s for s, _ in counts] == [0, 1, 2] and counts[-1][1] == 1, (state, counts)

        # the Time Series view opens its first two tag groups: eval and train (the rows' trial/* sort after them)
        groups = sorted({tag.split("/", 1)[0] for run in tags for tag in tags[run]})
        assert groups[:2] == ["eval", "train"], groups

        # HPARAMS, as TensorBoard computes it from the rows: the swept key, the state and the trial differ, so they
        # are listed first and shown (the table shows five); the metric columns are the rows' own trial/* metrics
        experiment = tb.wait_for(lambda: (e := tb.request("/data/plugin/hparams/experiment", {"experimentName": ""}))
                                 and len(e.get("hparamInfos", [])) > 3 and e, "the hparams experiment")
        hparam_names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"optimizer.lr", "lora.r", "lora.alpha", "state", "trial"} <= hparam_names, hparam_names
        differing = {h["name"] for h in experiment["hparamInfos"] if h.get("differs")}
        assert differing == {"state", "optimizer.lr", "trial"}, differing
        assert {h["name"] for h in experiment["hparamInfos"][:3]} == differing
        metric_tags = [m["name"]["tag"] for m in experiment["metricInfos"]]
        assert metric_tags[0] == "trial/eval_loss" and all(t.startswith("trial/") for t in metric_tags), metric_tags
        assert {"trial/perplexity", "trial/train_tokens_per_s", "trial/peak_memory_gb"} <= set(metric_tags)
        # ... and the table: a row per trial of the study, with the study's state, as the HPARAMS dashboard asks
        body = {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                "colParams": [*({"hparam": h, "includeInResult": True} for h in sorted(hparam_names)),
                              *({"metric": m["name"], "includeInResult": True} for m in experiment["metricInfos"])]}
        groups = tb.wait_for(lambda: (g := tb.request("/data/plugin/hparams/session_groups", body)["sessionGroups"])
                             and len(g) == len(trials) and g, "a session group per trial")
        by_run = {g["name"]: g for g in groups}
        assert set(by_run) == {f"{run}/hparams" for run in trials}, sorted(by_run)
        study = sweep_study(sweep)
        for run, t in trials.items():
            g, m = by_run[f"{run}/hparams"], t["metrics"]
            assert g["hparams"]["state"] == m["status"]
            assert g["hparams"]["trial"] == f"{t['number']:03d} {study.study_name}"  # number first, then the sweep
            assert g["hparams"]["optimizer.lr"] == pytest.approx(t["lr"])
            values = {v["name"]["tag"]: v["value"] for v in g["metricValues"]}
            (session,) = g["sessions"]
            if m["status"] == "failed":
                assert "trial/eval_loss" not in values and session["status"] == "STATUS_FAILURE"
            else:
                assert values["trial/eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-5)
                assert values["trial/perplexity"] == pytest.approx(m["perplexity"], rel=1e-5)
                assert values["trial/train_tokens_per_s"] == pytest.approx(m["train_tokens_per_s"])
                assert values["trial/peak_memory_gb"] == pytest.approx(m["peak_memory_gb"])
                assert session["status"] == "STATUS_SUCCESS"
    finally:
        tb.stop()


def sweep_study(cwd: Path):
    import optuna

    from sweeper.storage import build_storage  # (retries a new database's schema race with a starting driver)

    storage = build_storage(f"sqlite:///{cwd}/outputs/optuna.db")
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def scalars(tb: TensorBoard, run: str, tag: str) -> list[tuple[int, float]]:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return [(int(step), float(value)) for _, step, value in tb.request(f"/data/plugin/scalars/scalars?{query}")]


def test_study_run_is_rewritten_whole_and_superseded_files_go(tmp_path, monkeypatch, caplog):
    """No server: the study's run after each report holds exactly the study as it is (no duplicate steps)."""
    import optuna
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import sweeper.tensorboard as stb

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s")
    d = {"x": optuna.distributions.FloatDistribution(0, 1)}
    run = tmp_path / "tb" / "sweep" / "study"
    cfg = OmegaConf.create({"paths": {"tensorboard_root": str(tmp_path / "tb")}})
    for value in (3.0, 2.0):
        study.tell(study.ask(d), value)
    stb.write_study_run(study, cfg, tmp_path / "multirun" / "sweep")
    study.tell(study.ask(d), state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(d), 1.0)
    study.ask(d)  # running
    monkeypatch.setattr(stb, "KEEP_SUPERSEDED_S", 0)
    stb.write_study_run(study, cfg, tmp_path / "multirun" / "sweep")
    files = list(run.glob("*tfevents*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(run))
    acc.Reload()
    best = [(e.step, e.value) for e in acc.Scalars("tuning/best_value")]
    assert best == [(0, 3.0), (1, 2.0), (2, 2.0), (3, 1.0), (4, 1.0)]
    assert [e.value for e in acc.Scalars("tuning/trials_running")] == [0, 0, 0, 0, 1]
    assert [e.value for e in acc.Scalars("tuning/trials_pruned")][-1] == 1
    # a config without paths: no run, nothing written; an unwritable root: one warning, and the sweep goes on
    before = sorted(tmp_path.rglob("*"))
    stb.write_study_run(study, OmegaConf.create({}), tmp_path / "elsewhere")
    assert sorted(tmp_path.rglob("*")) == before
    with caplog.at_level("WARNING", logger="sweeper.tensorboard"):
        stb.write_study_run(study, OmegaConf.create({"paths": {"tensorboard_root": "/proc/nope"}}), tmp_path)
    assert "could not write the study's TensorBoard run" in caplog.text and "/proc/nope" in caplog.text


def test_hparams_row_has_the_same_keys_for_every_trial():
    from qlora_exp.callbacks import HPARAM_KEYS, swept_keys, trial_hparams
    from tests.conftest import compose_cfg

    cfg = compose_cfg(Path("/tmp/unused"), ["lora.target_modules=[q_proj,v_proj]", "run_name='007-lora.r=8'"])
    row = trial_hparams(cfg, "/tb/s/007-lora.r=8")
    assert set(row) == {*HPARAM_KEYS, "trial"} and list(row)[:2] == ["trial", "lora.r"]
    assert row["lora.target_modules"] == "q_proj,v_proj" and row["trial"] == "007-lora.r=8"
    assert row["lora.r"] == 16.0 and row["quantization.double_quant"] == "true"
    assert all(isinstance(v, (str, float)) for v in row.values())
    # swept keys outside HPARAM_KEYS join the row; `__main__`'s naming (for other sweepers) works too
    assert swept_keys(cfg, "001-trainer.gradient_checkpointing=true-optimizer.lr=1e-05-nope.key=1") == [
        "trainer.gradient_checkpointing", "optimizer.lr"]
    other = compose_cfg(Path("/tmp/unused"), ["run_name='001-trainer.gradient_checkpointing=true'"])
    assert list(trial_hparams(other, "/tb/x"))[:2] == ["trial", "trainer.gradient_checkpointing"]


def _row(run: Path) -> tuple[dict, str, dict]:
    """A row as TensorBoard reads it: (hparams, session status, metric scalars)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    plugins = PluginAccumulator(str(run))
    plugins.Reload()
    content = plugins.PluginTagToContent("hparams")
    assert set(content) == {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}, set(content)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    hparams = {k: (v.string_value if v.HasField("string_value") else v.number_value) for k, v in start.hparams.items()}
    acc = EventAccumulator(str(run))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return hparams, api_pb2.Status.Name(end.status), scalars


def test_trial_board_writes_its_row_as_a_run_of_its_own_or_leaves_it_to_the_sweeps_driver(tmp_path):
    """A single run writes its row into `<run>/hparams`; a trial of a sweep leaves it in hparams.json."""
    import json

    from qlora_exp.callbacks import TrialBoard
    from qlora_exp.trial import TrialResult
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, ["run_name='003-lora.r=8'"])
    for status, eval_loss in (("complete", 5.25), ("failed", None)):
        run = tmp_path / status
        board = TrialBoard(str(run))
        board.writer.add_scalar("train/loss", 6.0, 1)
        result = TrialResult(status=status, objective=eval_loss, eval_loss=eval_loss, steps=20 if eval_loss else None,
                             perplexity=math.exp(eval_loss) if eval_loss else None)
        board.write_hparams(cfg, result)  # (finish() would swallow an error: call it directly)
        board.close()
        assert sorted({p.parent for p in run.rglob("*tfevents*")}) == [run, run / "hparams"]
        hparams, session, metrics = _row(run / "hparams")
        assert hparams["state"] == status and hparams["trial"] == "003-lora.r=8" and hparams["lora.r"] == 16.0
        assert session == ("STATUS_SUCCESS" if eval_loss else "STATUS_FAILURE")
        assert metrics.get("trial/eval_loss") == ([(20, 5.25)] if eval_loss else None)
        assert "train/loss" not in metrics  # the training scalars stay in the trial's run
    board = TrialBoard(str(tmp_path / "in_sweep"), row_file=tmp_path / "hparams.json")
    board.interrupted = True  # cut short: in a sweep the driver still writes its row (state interrupted)
    board.finish(cfg, TrialResult(status="failed", objective=None, eval_loss=None, perplexity=None))
    saved = json.loads((tmp_path / "hparams.json").read_text())
    assert saved["hparams"]["trial"] == "003-lora.r=8" and saved["metrics"] == {} and not (tmp_path / "in_sweep").exists()


def test_the_driver_writes_a_row_for_every_ended_trial_with_the_studys_state(tmp_path):
    """Rows come from the study: a trial the driver failed reads failed though it wrote complete metrics, one
    interrupted before it wrote anything still has its row, a running one none yet; each is written once."""
    import json

    import optuna

    import sweeper.tensorboard as stb

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="grid-lora.r-1a2b3c4d")
    d = {"lora.r": optuna.distributions.CategoricalDistribution([8, 16, 32, 64, 128])}
    root = tmp_path / "tb" / "sweep"
    for r, end in ((8, "complete"), (16, "pruned"), (32, "driver failed"), (64, "interrupted"), (128, "running")):
        study.enqueue_trial({"lora.r": r})
        t = study.ask(d)
        folder = tmp_path / "multirun" / str(t.number)
        t.set_user_attr("folder", str(folder))
        if end != "interrupted":  # the trial's own words: its hparams and final metrics
            folder.mkdir(parents=True)
            (folder / stb.ROW_FILE).write_text(json.dumps({
                "hparams": {"trial": f"{t.number:03d}-lora.r={r}", "lora.r": r, "data.name": "tiny"},
                "metrics": {"trial/eval_loss": 3.0 + t.number}, "step": 20,
                "tensorboard_dir": str(root / f"{t.number:03d}-lora.r={r}")}))
        if end == "complete":
            study.tell(t, 3.0)
        elif end == "pruned":
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
        elif end == "driver failed":  # e.g. its objective was refused
            t.set_user_attr("fail_reason", "no objective")
            study.tell(t, state=optuna.trial.TrialState.FAIL)
        elif end == "interrupted":
            t.set_user_attr("interrupted", True)
            study.tell(t, state=optuna.trial.TrialState.FAIL)
    assert stb.write_trial_rows(study, root) == 4
    rows = {p.parent.name: _row(p) for p in sorted(root.glob("*/hparams"))}
    assert sorted(rows) == ["000-lora.r=8", "001-lora.r=16", "002-lora.r=32", "003-lora.r=64"]
    states = {name: (h["state"], h["trial"], status) for name, (h, status, _) in rows.items()}
    assert states == {"000-lora.r=8": ("complete", "000 grid-lora.r-1a2b3c4d", "STATUS_SUCCESS"),
                      "001-lora.r=16": ("pruned", "001 grid-lora.r-1a2b3c4d", "STATUS_SUCCESS"),
                      "002-lora.r=32": ("failed", "002 grid-lora.r-1a2b3c4d", "STATUS_FAILURE"),
                      "003-lora.r=64": ("interrupted", "003 grid-lora.r-1a2b3c4d", "STATUS_FAILURE")}
    assert rows["000-lora.r=8"][2] == {"trial/eval_loss": [(20, 3.0)]} and rows["003-lora.r=64"][2] == {}
    assert rows["003-lora.r=64"][0]["lora.r"] == 64.0  # from the study's parameters alone
    assert stb.write_trial_rows(study, root) == 0  # once: a row TensorBoard read cannot be changed
