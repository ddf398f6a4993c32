"""`python -m qlora_exp.report`: report.md, readable PNG plots and the trial table, for finished and running studies."""
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from qlora_exp.report import main, newest_sweep

SPACE = {"optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True), "lora.r": CategoricalDistribution([8, 16, 64])}


def assert_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4), image.shape
    assert image.std() > 0  # not a blank canvas


def pngs_of(report_md: Path) -> list[Path]:
    text = report_md.read_text()
    names = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    return [report_md.parent / n for n in names]


@pytest.mark.slow
def test_report_on_a_finished_sweep(tb_sweep):
    sweep = tb_sweep
    (folder,) = (sweep / "outputs" / "multirun").iterdir()
    proc = subprocess.run([sys.executable, "-m", "qlora_exp.report", str(folder)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MPLBACKEND": "module://nonexistent"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("number"))
    assert "state" in header and "optimizer.lr" in header and "pruned_at_step" in header and "fail_reason" in header
    rows = {line.split()[0]: line for line in lines[lines.index(header) + 2:] if line[:1].isdigit()}
    assert sorted(rows) == ["0", "1", "2"]
    states = {n: row.split()[1] for n, row in rows.items()}
    assert sorted(states.values()) == ["complete", "failed", "pruned"]
    pruned = next(n for n, s in states.items() if s == "pruned")
    failed = next(n for n, s in states.items() if s == "failed")
    assert rows[pruned].split()[4] == "10"  # number, state, lr, value, pruned_at_step
    assert "RuntimeError: test failure at step 12" in rows[failed]

    report = folder / "report.md"
    text = report.read_text()
    assert "# Sweep report:" in text and "## Trials" in text and "| number | state |" in text
    drawn = pngs_of(report)
    assert {p.stem for p in drawn} == {"optimization_history", "parallel_coordinate", "intermediate_values"}
    for png in drawn:
        assert_png(png)
    assert "Parameter importances" in text and "_Not drawn:" in text  # one complete trial: no importances
    assert newest_sweep(sweep) == folder
    # the best trial's command, as optimization_results.yaml has it (the sweep's fixed overrides with its params)
    from omegaconf import OmegaConf

    best = OmegaConf.load(folder / "optimization_results.yaml").best
    assert f"Run it again on its own:\n\n```bash\n{best.command}\n```" in text and "optimizer.lr=" in best.command


def test_each_plot_says_what_it_shows(tmp_path):
    """What the pictures hold, read from the figures: the trials drawn, their colours, legends and labels."""
    import matplotlib.pyplot as plt

    from qlora_exp.report import plot_axes

    study = optuna.load_study(study_name="live", storage=make_study(tmp_path / "s.db", "live"))
    axes = plot_axes(study, ["eval_loss"])
    try:
        history = axes["optimization_history"]  # 3 complete; the pruned, failed and running ones said to be left out
        assert history.get_title() == ("Optimization history: 3 complete trial(s) (1 pruned and 1 failed have no "
                                       "eval_loss: not shown)")
        assert history.get_ylabel() == "eval_loss" and "best so far" in [t.get_text() for t in
                                                                          history.get_legend().get_texts()]
        assert len(history.collections[0].get_offsets()) == 3
        importances = axes["param_importances"]  # from 3 trials: a warning in the title, in red
        assert "from only 3 complete trials" in importances.get_title() and importances.title.get_color() == "darkred"
        parallel = axes["parallel_coordinate"]  # a line per complete trial, none of them near-white
        (lines,) = [c for c in parallel.collections if c.get_array() is not None]
        colours = lines.get_colors() if len(lines.get_colors()) > 1 else lines.to_rgba(lines.get_array())
        assert len(lines.get_array()) == 3 and max(sum(c[:3]) for c in colours) < 2.5, colours
        parallel.figure.canvas.draw()  # the tick labels as drawn: on a white backing, clear of the lines
        labelled = [ax for ax in parallel.figure.axes if ax is not lines.colorbar.ax]
        assert len(labelled) == 3 and all(label.get_bbox_patch() is not None for ax in labelled
                                          for label in ax.get_yticklabels() if label.get_text())
        intermediate = axes["intermediate_values"]  # every trial that reported, named with its parameters
        legend = [t.get_text() for t in intermediate.get_legend().get_texts()]
        reported = sorted(t.number for t in study.trials if t.intermediate_values and t.state != TrialState.FAIL)
        params = {t.number: t.params for t in study.trials}
        assert legend == [*(f"trial {n}: optimizer.lr={params[n]['optimizer.lr']:.3g} lora.r={params[n]['lora.r']}"
                            for n in reported), "pruned here"], legend
        assert intermediate.get_ylabel().startswith("eval_loss") and intermediate.get_xlabel() == "step"
    finally:
        plt.close("all")


def test_report_warns_when_the_best_value_is_at_the_edge_of_its_range(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="edge", storage=url)
    study.set_user_attr("command", "python -m qlora_exp")
    for lr, value in ((1e-5, 3.0), (1e-4, 2.5), (1e-2, 2.0)):  # the best at the top of 1e-5..1e-2
        study.enqueue_trial({"optimizer.lr": lr, "lora.r": 16})
        study.tell(study.ask(SPACE), value)
    assert main(["--storage", url, "--study", "edge", "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "> **At the edge of its range:** `optimizer.lr=0.01` (0.01 is at the top of 1e-05..0.01" in text, text
    assert "```bash\npython -m qlora_exp optimizer.lr=0.01 lora.r=16\n```" in text
    assert "_Drawn from only 3 complete trials" in text


def make_study(path: Path, name: str, directions=("minimize",), running: bool = True) -> str:
    url = f"sqlite:///{path}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, directions=list(directions),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(5):
        t = study.ask(SPACE)
        for step in (10, 20):
            if len(directions) == 1:
                t.report(6.0 - step * t.params["optimizer.lr"] * 10 - i / 10, step)
        if i == 3 and len(directions) == 1:
            t.set_user_attr("pruned_at_step", 20)
            study.tell(t, state=TrialState.PRUNED)
        elif i == 4:
            t.set_user_attr("fail_reason", "RuntimeError: CUDA out of memory | " * 20)
            study.tell(t, state=TrialState.FAIL)
        else:
            values = [5.0 - i / 10 + t.params["lora.r"] / 100, t.params["lora.r"] * 1000.0][:len(directions)]
            study.tell(t, values if len(values) > 1 else values[0])
    if running:
        t = study.ask(SPACE)  # asked, never told: RUNNING, as while a sweep is going
        t.report(5.9, 10)
    return url


def test_report_on_a_running_study(tmp_path, capsys):
    url = make_study(tmp_path / "optuna.db", "live")
    out = tmp_path / "report"
    assert main(["--storage", url, "--study", "live", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "running" in printed and "CUDA out of memory" in printed and "pruned" in printed
    text = (out / "report.md").read_text()
    assert "still running" in text and "| 5 | running |" in text
    drawn = pngs_of(out / "report.md")
    assert {p.stem for p in drawn} == {"optimization_history", "param_importances", "parallel_coordinate",
                                       "intermediate_values"}
    for png in drawn:
        assert_png(png)
    # a second report of the same study, once more trials finished, replaces the first
    study = optuna.load_study(study_name="live", storage=url)
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    study.tell(running.number, 4.0)
    assert main(["--storage", url, "--study", "live", "--out", str(out)]) == 0
    assert "still running" not in (out / "report.md").read_text()


def test_report_of_several_objectives_draws_the_pareto_front(tmp_path):
    url = make_study(tmp_path / "optuna.db", "two", directions=("minimize", "minimize"), running=False)
    assert main(["--storage", url, "--study", "two", "--out", str(tmp_path)]) == 0
    drawn = {p.stem: p for p in pngs_of(tmp_path / "report.md")}
    assert "pareto_front" in drawn and "## Pareto front" in (tmp_path / "report.md").read_text()
    for png in drawn.values():
        assert_png(png)


def test_report_of_an_empty_study_skips_every_plot(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="empty", storage=url).ask(SPACE)
    assert main(["--storage", url, "--study", "empty", "--out", str(tmp_path)]) == 0
    assert pngs_of(tmp_path / "report.md") == [] and "_Not drawn: no complete trial yet._" in (
        tmp_path / "report.md").read_text()


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no optimization_results.yaml" in capsys.readouterr().err
    url = make_study(tmp_path / "optuna.db", "known", running=False)
    assert main(["--storage", url, "--study", "unknown"]) == 2
    assert "it has: known" in capsys.readouterr().err
    assert main(["--storage", f"sqlite:///{tmp_path}/missing.db", "--study", "x"]) == 2
    assert not (tmp_path / "missing.db").exists()
    assert main(["--study", "x"]) == 2


def test_report_masks_the_database_password(tmp_path, capsys, monkeypatch):
    """A study on a team's database (postgresql://user:password@host/db): the report prints and writes the URL with
    the password as ***, in its header line, in report.md's storage line and its optuna-dashboard hint. (The study
    itself is a local one: this machine runs no database server here.)"""
    import qlora_exp.report as report

    local = make_study(tmp_path / "s.db", "live")
    monkeypatch.setattr(report, "open_study", lambda url, name: optuna.load_study(study_name=name, storage=local))
    url = "postgresql://qlora:s3cret-pw@db.lab.example/optuna"
    assert main(["--storage", url, "--study", "live", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    written = (tmp_path / "out" / "report.md").read_text()
    assert "s3cret-pw" not in printed.out + printed.err + written
    assert "postgresql://qlora:***@db.lab.example/optuna" in printed.out and written.count("qlora:***@") == 2
