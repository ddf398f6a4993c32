"""`python -m qlora_exp.report [SWEEP_FOLDER]`: a sweep's report, from its Optuna study.

    python -m qlora_exp.report outputs/multirun/<study>     # reads <folder>/optimization_results.yaml
    python -m qlora_exp.report                              # the newest sweep under outputs/multirun/
    python -m qlora_exp.report --storage sqlite:///outputs/optuna.db --study NAME [--out DIR]

Writes into the sweep folder (or --out) `report.md` and its PNG plots: optimization history, parameter
importances, parallel coordinates, intermediate values (a red x where pruning stopped a trial) and, for
several objectives, the Pareto front. It prints the table of trials (number, state, parameters, value,
step where pruned, failure reason) to the terminal. It only reads the study, so it works on a finished
sweep and on one still running (running trials are listed; plots use the trials finished so far). A
plot that cannot be drawn yet (importances need two complete trials with different parameters) is
skipped with a note in report.md; the command does not fail for it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}
PLOT_FILES = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values",
              "pareto_front")


class ReportError(Exception):
    """A study that cannot be found or read: one line for the terminal."""


@dataclass
class Report:
    folder: Path
    markdown: Path
    plots: dict[str, Path] = field(default_factory=dict)   # name -> PNG written
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why not
    table: str = ""


# ---- where the study is -------------------------------------------------------------------------------
def newest_sweep(root: Path | None = None) -> Path:
    """The sweep folder under <root>/outputs/multirun whose optimization_results.yaml changed last."""
    root = Path(root or os.environ.get("QLORA_EXP_ROOT") or Path.cwd())
    results = sorted((root / "outputs" / "multirun").glob("*/optimization_results.yaml"),
                     key=lambda p: p.stat().st_mtime)
    if not results:
        raise ReportError(f"no sweep found under {root / 'outputs' / 'multirun'} (a folder with "
                          "optimization_results.yaml); pass one, or --storage URL --study NAME")
    return results[-1].parent


def study_location(folder: Path) -> tuple[str, str, list[str] | None]:
    """(storage URL, study name, objective names or None) from a sweep folder of the qlora_exp sweeper."""
    from omegaconf import OmegaConf

    results = folder / "optimization_results.yaml"
    if not results.is_file():
        raise ReportError(f"{folder} has no optimization_results.yaml: not a sweep folder of the qlora_exp "
                          "sweeper (pass --storage URL --study NAME instead)")
    info = OmegaConf.load(results)
    names = None
    if (folder / "multirun.yaml").is_file():
        try:
            cfg = OmegaConf.load(folder / "multirun.yaml")
            names = OmegaConf.select(cfg, "hydra.sweeper.objectives", default=None, throw_on_resolution_failure=False)
            single = OmegaConf.select(cfg, "objective", default=None, throw_on_resolution_failure=False)
            names = [str(n) for n in names] if names else ([str(single)] if single else None)
        except Exception:  # noqa: BLE001  (names are cosmetic)
            names = None
    from sweeper.storage import storage_from_file

    return storage_from_file(str(info.storage)), str(info.study_name), names


def open_study(storage_url: str, study_name: str):
    import optuna

    from sweeper.storage import build_storage, hide_password

    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///"):]).is_file():
        raise ReportError(f"no study database at {storage_url[len('sqlite:///'):]}")
    if storage_url.startswith("journal://") and not Path(storage_url[len("journal://"):]).is_file():
        raise ReportError(f"no study journal at {storage_url[len('journal://'):]}")
    from sweeper.errors import SweeperConfigError
    from sweeper.storage import storage_error

    try:
        storage = build_storage(storage_url)
        return optuna.load_study(study_name=study_name, storage=storage)
    except SweeperConfigError as e:  # a damaged journal, a password only the environment holds
        raise ReportError(str(e)) from None
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
        raise ReportError(f"no study {study_name!r} in {hide_password(storage_url)}; it has: {', '.join(names) or 'none'}") from None
    except Exception as e:  # noqa: BLE001  (a database that cannot be reached: sqlalchemy's and OS errors alike)
        raise ReportError(str(storage_error(storage_url, e))) from None


# ---- the table ------------------------------------------------------------------------------------------
def trial_rows(study) -> tuple[list[str], list[list[str]]]:
    """Header and rows: number, state, one column per parameter, value(s), pruned_at_step, duration, reason."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    params = sorted({k for t in trials for k in t.params})
    header = ["number", "state", *params, "value" if len(study.directions) == 1 else "values",
              "pruned_at_step", "duration_s", "fail_reason"]
    now = dt.datetime.now()
    rows = []
    for t in trials:
        if t.values is not None:
            value = ", ".join(_fmt(v) for v in t.values)
        else:
            value = "-"
        start, end = t.datetime_start, t.datetime_complete or (now if t.state.name == "RUNNING" else None)
        duration = f"{(end - start).total_seconds():.0f}" if start and end else "-"
        reason = " ".join(str(t.user_attrs.get("fail_reason", "")).split())
        rows.append([str(t.number), STATE_NAMES.get(t.state.name, t.state.name.lower()),
                     *(_fmt(t.params[k]) if k in t.params else "-" for k in params), value,
                     str(t.user_attrs.get("pruned_at_step", "-")), duration, reason or "-"])
    return header, rows


def text_table(header: list[str], rows: list[list[str]], reason_width: int = 60) -> str:
    rows = [[*r[:-1], _short(r[-1], reason_width)] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: list[str], rows: list[list[str]], reason_width: int = 200) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    rows = [[*r[:-1], _short(r[-1], reason_width)] for r in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
                      *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)])


# ---- the plots ------------------------------------------------------------------------------------------
def draw_plots(study, folder: Path, objective_names: list[str] | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Each plot as a PNG; a plot that cannot be drawn is skipped with the reason, never raised."""
    import matplotlib.pyplot as plt

    written, skipped = {}, {}
    for name, ax in plot_axes(study, objective_names).items():
        path = folder / f"{name}.png"
        path.unlink(missing_ok=True)  # never leave a stale plot from an earlier report
        if isinstance(ax, str):
            skipped[name] = ax
            continue
        try:
            fig = _figure(ax)
            fig.set_size_inches(11, 6)
            fig.savefig(path, dpi=100, bbox_inches="tight")
            written[name] = path
        except Exception as e:  # noqa: BLE001  (a plot that cannot be saved is a note, not a crash)
            skipped[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    plt.close("all")
    for name in PLOT_FILES:
        if name not in written and name not in skipped:
            (folder / f"{name}.png").unlink(missing_ok=True)
    return written, skipped


FEW_FOR_IMPORTANCES = 10  # fANOVA's importances from fewer complete trials than this: shown with a warning


def plot_axes(study, objective_names: list[str] | None) -> dict:
    """name -> the matplotlib Axes of each plot (Optuna's, made readable: a colour scale whose worst end still
    shows, legends that name each trial's parameters, axes labelled with the objective's name, a note of what a
    plot leaves out), or the reason it was not drawn (a str)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    from sweeper.naming import short

    n_obj = len(study.directions)
    names = objective_names if objective_names and len(objective_names) == n_obj else (
        ["objective"] if n_obj == 1 else [f"objective {i}" for i in range(n_obj)])
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned_n, failed_n = (sum(t.state == s for t in trials) for s in (TrialState.PRUNED, TrialState.FAIL))
    with_steps = [t for t in trials if t.intermediate_values and t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                               TrialState.RUNNING)]
    target = (lambda t: t.values[0]) if n_obj > 1 else None
    params = lambda t: " ".join(f"{k}={short(v)}" for k, v in t.params.items())  # noqa: E731

    def history():
        ax = ovm.plot_optimization_history(study, target=target, target_name=names[0])
        left_out = [f"{n} {what}" for n, what in ((pruned_n, "pruned"), (failed_n, "failed")) if n]
        _title(ax, f"Optimization history: {len(complete)} complete trial(s)" + (
            f" ({' and '.join(left_out)} have no {names[0]}: not shown)" if left_out else ""))
        _relabel(ax, {"Best Value": "best so far"})
        return ax

    def importances():
        distinct = [k for k in {k for t in complete for k in t.params}
                    if len({repr(t.params.get(k)) for t in complete}) > 1]
        if len(complete) < 2 or not distinct:
            raise _Skip(f"needs 2 or more complete trials with different parameters ({len(complete)} complete)")
        ax = ovm.plot_param_importances(study, target=target, target_name=names[0])
        if len(complete) < FEW_FOR_IMPORTANCES:
            _title(ax, f"Parameter importances for {names[0]}: from only {len(complete)} complete trials, a "
                         "hint, not a measurement", color="darkred")
        else:
            _title(ax, f"Parameter importances for {names[0]} ({len(complete)} complete trials)")
        return ax

    def parallel():
        ax = ovm.plot_parallel_coordinate(study, target=target, target_name=names[0])
        _readable_scale(ax)
        _title(ax, f"Parallel coordinates: {len(complete)} complete trial(s), darker is better")
        return ax

    def intermediate():
        if not with_steps:
            raise _Skip("no trial has reported an intermediate value yet")
        ax = ovm.plot_intermediate_values(study)
        by_label = {f"Trial{t.number}": f"trial {t.number}: {params(t)}" for t in with_steps}
        _relabel(ax, by_label)
        pruned = [t for t in with_steps if t.state == TrialState.PRUNED]
        for i, t in enumerate(pruned):
            step = max(t.intermediate_values)
            ax.scatter([step], [t.intermediate_values[step]], marker="x", s=90, color="red", zorder=5,
                       label="pruned here" if i == 0 else None)
        ax.set_ylabel(f"{names[0]} at the step (reported to the pruner)")
        ax.set_xlabel("step")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        _title(ax, f"Intermediate values: {len(with_steps)} trial(s), {len(pruned)} pruned (red x)")
        return ax

    def pareto():
        return ovm.plot_pareto_front(study, target_names=names)

    plans = [("optimization_history", history), ("param_importances", importances),
             ("parallel_coordinate", parallel), ("intermediate_values", intermediate)]
    if n_obj > 1:
        plans.append(("pareto_front", pareto))
    out: dict = {}
    for name, draw in plans:
        if name != "intermediate_values" and not complete:
            out[name] = "no complete trial yet"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = draw()
        except _Skip as e:
            out[name] = str(e)
        except Exception as e:  # noqa: BLE001  (a plot Optuna cannot draw for this study is a note, not a crash)
            out[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return out


def _title(ax, text: str, **kw) -> None:
    """The plot's one title (Optuna puts some of its own on the left)."""
    for loc in ("left", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(text, **kw)


def _relabel(ax, labels: dict[str, str]) -> None:
    for artist in [*ax.lines, *ax.collections]:
        if artist.get_label() in labels:
            artist.set_label(labels[artist.get_label()])
    if ax.get_legend() is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _readable_scale(ax) -> None:
    """Optuna colours the lines with Blues, whose worst end is near white on the light grey style: the same scale
    from a third of the way in, so every line shows; tick labels on a white backing, clear of the lines."""
    from matplotlib.colors import LinearSegmentedColormap

    lines = [c for c in ax.collections if c.get_array() is not None]
    if lines:
        base = matplotlib_cmap(lines[0].get_cmap())
        light = lambda x: sum(base(x)[:3])  # noqa: E731
        keep = [i / 20 for i in range(14)] if light(1.0) > light(0.0) else [i / 20 for i in range(6, 21)]
        cmap = LinearSegmentedColormap.from_list("readable", base(keep))  # the near-white end cut off
        for c in lines:
            c.set_cmap(cmap)
            if getattr(c, "colorbar", None) is not None:
                c.colorbar.update_normal(c)
    import math

    bars = {c.colorbar.ax for c in lines if getattr(c, "colorbar", None) is not None}
    for axis in ax.figure.axes:
        if axis in bars:
            continue
        lo, hi = axis.get_ylim()  # 4 % more room above and below (the same share on every axis: the lines still
        if axis.get_yscale() == "log" and lo > 0 and hi > 0:  # meet each axis at its value), so the end labels
            pad = (math.log10(hi) - math.log10(lo)) * 0.04  # clear the frame
            axis.set_ylim(10 ** (math.log10(lo) - pad), 10 ** (math.log10(hi) + pad))
        else:
            pad = (hi - lo) * 0.04
            axis.set_ylim(lo - pad, hi + pad)
        for label in axis.get_yticklabels():
            label.set_bbox({"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1})


def matplotlib_cmap(cmap):
    import matplotlib

    return matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap


class _Skip(Exception):
    pass


def _figure(ax):
    import numpy as np

    if isinstance(ax, np.ndarray):
        ax = ax.flat[0]
    return ax.figure


# ---- the report -------------------------------------------------------------------------------------------
def reproduce_command(study, trial, results_file: Path | None) -> str:
    """The command that runs `trial` again as a single run: the sweep's own (optimization_results.yaml's best
    command, with the sweep's fixed overrides) when it names this trial, else the study's command and its params."""
    from omegaconf import OmegaConf

    from sweeper.naming import hydra_value

    if results_file is not None and results_file.is_file():
        best = OmegaConf.select(OmegaConf.load(results_file), "best", default=None)
        if best is not None and best.get("number") == trial.number and best.get("command"):
            return str(best.command)
    base = str(study.user_attrs.get("command") or "python -m qlora_exp")
    return " ".join([base, *(shlex.quote(f"{k}={hydra_value(v)}") for k, v in trial.params.items())])


def build_report(study, folder: Path, storage_url: str, objective_names: list[str] | None = None,
                 results_file: Path | None = None) -> Report:
    from optuna.trial import TrialState

    from sweeper.storage import hide_password

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = trial_rows(study)
    plots, skipped = draw_plots(study, folder, objective_names)
    trials = study.get_trials(deepcopy=False)
    counts = {STATE_NAMES.get(s.name, s.name.lower()): sum(t.state == s for t in trials) for s in TrialState}
    n_obj = len(study.directions)
    directions = ", ".join(d.name.lower() for d in study.directions)

    md = [f"# Sweep report: {study.study_name}", "",
          f"- storage: `{hide_password(storage_url)}`", f"- direction: {directions}"
          + (f" ({', '.join(objective_names)})" if objective_names else ""),
          "- trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
          f"- written: {dt.datetime.now().isoformat(timespec='seconds')}"
          + (" (the study is still running: this is a snapshot)" if counts.get("running") else ""), ""]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and n_obj == 1:
        from sweeper.results import range_edges

        best = study.best_trial
        md += ["## Best trial", "", f"Trial {best.number}: {_fmt(best.value)} with "
               + ", ".join(f"`{k}={_fmt(v)}`" for k, v in best.params.items()), ""]
        if edges := range_edges(best):  # the optimum may lie past what was searched
            md += ["> **At the edge of its range:** " + "; ".join(
                f"`{k}={_fmt(best.params[k])}` ({edges[k]})" for k in edges)
                + ". The optimum may lie outside the searched range: widen it and sweep again.", ""]
        md += ["Run it again on its own:", "", "```bash", reproduce_command(study, best, results_file), "```", ""]
    elif complete:
        md += ["## Pareto front", "", "| number | values | params |", "| --- | --- | --- |",
               *(f"| {t.number} | {', '.join(_fmt(v) for v in t.values)} | "
                 + ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()) + " |" for t in study.best_trials), ""]
    md += ["## Plots", ""]
    titles = {"optimization_history": "Optimization history", "param_importances": "Parameter importances",
              "parallel_coordinate": "Parallel coordinates", "intermediate_values":
              "Intermediate values (red x: where pruning stopped a trial)", "pareto_front": "Pareto front"}
    for name, title in titles.items():
        if name in plots:
            md += [f"### {title}", "", f"![{title}]({plots[name].name})", ""]
            if name == "param_importances" and len(complete) < FEW_FOR_IMPORTANCES:
                md += [f"_Drawn from only {len(complete)} complete trials: importances from so few are a hint, not "
                       "a measurement._", ""]
        elif name in skipped:
            md += [f"### {title}", "", f"_Not drawn: {skipped[name]}._", ""]
    md += ["## Trials", "", markdown_table(header, rows), "",
           "## More", "", "- `make tb`: every trial's TensorBoard run (scalars per step, the HPARAMS view) and the "
           "study's own run (`<sweep>/study`: best value so far, trials per state).",
           f"- `optuna-dashboard {hide_password(storage_url)}`: Optuna's live dashboard on the same storage "
           "(`pip install optuna-dashboard`)."]
    markdown = folder / "report.md"
    tmp = folder / ".report.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(markdown)
    return Report(folder=folder, markdown=markdown, plots=plots, skipped=skipped, table=text_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_exp.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a sweep folder (default: the newest under outputs/multirun)")
    parser.add_argument("--storage", help="Optuna storage URL (with --study), instead of a sweep folder")
    parser.add_argument("--study", help="study name (with --storage)")
    parser.add_argument("--out", help="where report.md and the plots go (default: the sweep folder)")
    args = parser.parse_args(argv)
    try:
        if bool(args.storage) != bool(args.study):
            raise ReportError("--storage and --study go together")
        if args.storage:
            storage_url, study_name, names = args.storage, args.study, None
            folder = Path(args.out or args.folder or f"report-{study_name}")
        else:
            sweep = Path(args.folder) if args.folder else newest_sweep()
            storage_url, study_name, names = study_location(sweep)
            folder = Path(args.out or sweep)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = open_study(storage_url, study_name)
        results = None if args.storage else sweep / "optimization_results.yaml"
        report = build_report(study, folder, storage_url, names, results)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (storage_from_file: a password only the environment holds)
        from sweeper.errors import SweeperConfigError

        if not isinstance(e, SweeperConfigError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sweeper.storage import hide_password

    print(f"study {study_name} ({hide_password(storage_url)})\n")
    print(report.table)
    print(f"\nreport: {report.markdown}" + "".join(f"\n  plot: {p}" for p in report.plots.values())
          + "".join(f"\n  skipped {n}: {why}" for n, why in report.skipped.items()))
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def _short(s: str, width: int) -> str:
    return s if len(s) <= width else s[: width - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
