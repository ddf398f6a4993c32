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

PER_STEP = ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "perf/tokens_per_s",
            "perf/peak_memory_gb")


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
        best = scalars(tb, study_run, "study/best_value")
        assert best[-1][0] == 2 and best[-1][1] == pytest.approx(complete[0]["metrics"]["eval_loss"], rel=1e-5)
        for state in ("complete", "pruned", "failed"):
            counts = scalars(tb, study_run, f"study/trials_{state}")
            assert [s for s, _ in counts] == [0, 1, 2] and counts[-1][1] == 1, (state, counts)

        # HPARAMS: the experiment lists the swept and fixed keys, the state and the final metrics
        experiment = tb.wait_for(lambda: tb.request("/data/plugin/hparams/experiment", {"experimentName": ""}),
                                 "the hparams experiment")
        hparam_names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"optimizer.lr", "lora.r", "lora.alpha", "state", "run_name"} <= hparam_names, hparam_names
        differing = {h["name"] for h in experiment["hparamInfos"] if h.get("differs")}
        assert differing == {"state", "optimizer.lr"}  # the swept key: TensorBoard lists (and shows) these first
        assert {h["name"] for h in experiment["hparamInfos"][:2]} == differing
        metric_tags = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"hparams/eval_loss", "hparams/perplexity", "hparams/train_tokens_per_s",
                "hparams/peak_memory_gb"} <= metric_tags, metric_tags
        # ... and the table: one session group per trial, as the HPARAMS dashboard asks for it
        body = {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                "colParams": [*({"hparam": h, "includeInResult": True} for h in sorted(hparam_names)),
                              *({"metric": m["name"], "includeInResult": True} for m in experiment["metricInfos"])]}
        groups = tb.wait_for(lambda: (g := tb.request("/data/plugin/hparams/session_groups", body)["sessionGroups"])
                             and len(g) == len(trials) and g, "a session group per trial")
        by_run = {g["name"]: g for g in groups}
        assert set(by_run) == set(trials), sorted(by_run)
        for run, t in trials.items():
            g, m = by_run[run], t["metrics"]
            assert g["hparams"]["state"] == m["status"] and g["hparams"]["run_name"] == run.split("/", 1)[1]
            assert g["hparams"]["optimizer.lr"] == pytest.approx(t["lr"])
            values = {v["name"]["tag"]: v["value"] for v in g["metricValues"]}
            (session,) = g["sessions"]
            if m["status"] == "failed":
                assert "hparams/eval_loss" not in values and session["status"] == "STATUS_FAILURE"
            else:
                assert values["hparams/eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-5)
                assert values["hparams/perplexity"] == pytest.approx(m["perplexity"], rel=1e-5)
                assert values["hparams/train_tokens_per_s"] == pytest.approx(m["train_tokens_per_s"])
                assert values["hparams/peak_memory_gb"] == pytest.approx(m["peak_memory_gb"])
                assert session["status"] == "STATUS_SUCCESS"
    finally:
        tb.stop()


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
    best = [(e.step, e.value) for e in acc.Scalars("study/best_value")]
    assert best == [(0, 3.0), (1, 2.0), (2, 2.0), (3, 1.0), (4, 1.0)]
    assert [e.value for e in acc.Scalars("study/trials_running")] == [0, 0, 0, 0, 1]
    assert [e.value for e in acc.Scalars("study/trials_pruned")][-1] == 1
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
    row = trial_hparams(cfg, "/tb/s/007-lora.r=8", "pruned")
    assert set(row) == {*HPARAM_KEYS, "run_name", "state"} and list(row)[:3] == ["state", "lora.r", "run_name"]
    assert row["lora.target_modules"] == "q_proj,v_proj" and row["run_name"] == "007-lora.r=8"
    assert row["lora.r"] == 16.0 and row["state"] == "pruned" and row["quantization.double_quant"] == "true"
    assert all(isinstance(v, (str, float)) for v in row.values())
    # swept keys outside HPARAM_KEYS join the row; `__main__`'s naming (for other sweepers) works too
    assert swept_keys(cfg, "001-trainer.gradient_checkpointing=true-optimizer.lr=1e-05-nope.key=1") == [
        "trainer.gradient_checkpointing", "optimizer.lr"]
    other = compose_cfg(Path("/tmp/unused"), ["run_name='001-trainer.gradient_checkpointing=true'"])
    assert list(trial_hparams(other, "/tb/x", "failed"))[:3] == ["state", "trainer.gradient_checkpointing", "run_name"]


def test_trial_board_writes_hparams_into_the_run_folder(tmp_path):
    """The three hparams summaries and the metric scalars land in the trial's own folder (no subfolder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator

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
        assert [p.parent for p in run.rglob("*tfevents*")] == [run]
        plugins = PluginAccumulator(str(run))
        plugins.Reload()
        hparams = set(plugins.PluginTagToContent("hparams"))
        assert hparams == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
        acc = EventAccumulator(str(run))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        if eval_loss:
            assert [(e.step, e.value) for e in acc.Scalars("hparams/eval_loss")] == [(20, 5.25)]
        else:
            assert "hparams/eval_loss" not in tags
