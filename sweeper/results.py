"""The sweep's results: optimization_results.yaml (hydra-optuna-sweeper's keys `name`, `best_params`, `best_value`
or `solutions`, and qlora_exp's richer ones), the study's TensorBoard run and the one-line progress log."""
from __future__ import annotations

import logging
import os
import shlex
from typing import Any

from omegaconf import OmegaConf
from optuna.trial import TrialState

from sweeper.naming import hydra_value
from sweeper.policy import count_finished
from sweeper.storage import hide_password

log = logging.getLogger("qlora_exp.sweeper")


def write_results(study, sweep, running: int) -> None:
    """Rewritten after every trial (a temporary file per driver, then a rename: drivers sharing a study never leave
    a half-written file); `sweep` is the Sweep being run (sweeper.loop)."""
    from sweeper.tensorboard import write_study_run

    trials = study.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                            TrialState.FAIL)}
    results: dict[str, Any] = {"name": "optuna", "study_name": sweep.study_name,
                               "storage": hide_password(sweep.settings.storage), "sweep_dir": str(sweep.folder),
                               "n_trials": sweep.target, "trials": {**count, "running": running}}
    best_line = "none yet"
    if count["complete"]:
        def describe(t):
            args = " ".join(shlex.quote(a) for a in [*sweep.fixed, *(f"{k}={hydra_value(v)}" for k, v in t.params.items())])
            return {"number": t.number, "values": list(t.values), "params": dict(t.params),
                    "folder": t.user_attrs.get("folder"), "command": f"{sweep.command} {args}".strip()}
        if len(sweep.settings.directions) == 1:
            b = study.best_trial
            results.update(best_params=dict(b.params), best_value=b.value, best={**describe(b), "value": b.value})
            best_line = f"{b.value:.4f} (trial {b.number})"
            edges = range_edges(b)
            if edges:  # e.g. the best lr at the top of its range: the optimum may be outside what was searched
                results["best"]["at_range_edge"] = edges
                best_line += f"; at the edge of its range: {', '.join(f'{k}={b.params[k]:g}' for k in edges)}"
        else:
            front = [describe(t) for t in study.best_trials]
            results["solutions"] = [{"params": d["params"], "values": d["values"]} for d in front]
            results["pareto_front"] = front
            best_line = f"{len(front)} on the Pareto front"
    tmp = sweep.folder / f".optimization_results.yaml.{os.getpid()}.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(_plain(results))))
    tmp.replace(sweep.folder / "optimization_results.yaml")
    write_study_run(study, sweep.config, sweep.folder, sweep.settings.objectives)  # TensorBoard: <root>/<sweep>/study
    line = (f"[{sweep.study_name}] {count_finished(study)}/{sweep.target} finished: {count['complete']} complete, "
            f"{count['pruned']} pruned, {count['fail']} failed, {running} running; best {best_line}")
    if _LAST_LINE.get(sweep.folder) != line:  # the same state twice (the loop's end, then the sweep's): said once
        _LAST_LINE[sweep.folder] = line
        log.info("%s", line)


_LAST_LINE: dict = {}  # sweep folder -> the progress line last said


def forget_last_line(folder) -> None:
    _LAST_LINE.pop(folder, None)


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


def range_edges(trial, within: float = 0.02) -> dict[str, str]:
    """The parameters of `trial` (the best one) that sit at an end of their range: within `within` of the range
    (on the log scale for log ranges), or the smallest/largest of three or more numeric choices. The optimum may lie
    past that end; a wider range is worth a try."""
    import math

    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    edges = {}
    for name, dist in trial.distributions.items():
        value = trial.params[name]
        if isinstance(dist, (FloatDistribution, IntDistribution)):
            f = math.log if dist.log else float
            span = f(dist.high) - f(dist.low)
            where = (f(value) - f(dist.low)) / span if span else 0.5
            lo_hi = (f"{dist.low:g}", f"{dist.high:g}")
        elif isinstance(dist, CategoricalDistribution) and len(dist.choices) >= 3 and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in dist.choices):
            ordered = sorted(dist.choices)
            where = 0.0 if value == ordered[0] else 1.0 if value == ordered[-1] else 0.5
            lo_hi = (f"{ordered[0]:g}", f"{ordered[-1]:g}")
        else:
            continue
        if where <= within or where >= 1 - within:
            end = "bottom" if where <= within else "top"
            edges[name] = f"{value:g} is at the {end} of {lo_hi[0]}..{lo_hi[1]}: the best value may lie past it"
    return edges
