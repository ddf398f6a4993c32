"""Replay Optuna samplers and pruners on eval curves already measured by bench/search_efficiency.py: seconds, not hours.

    python bench/search_replay.py --out outputs/bench/search_efficiency --seeds 12
    python bench/search_replay.py --configs tpe5_pct25,gp_median

The objective is the measured one: for each (r, alpha), the eval loss at steps 20, 40 and 60 of every grid trial
and every complete sweep trial in <out>/studies.db, interpolated linearly in log lr between measured points. Each
config runs ask/tell with 2 trials outstanding (like 2 asynchronous slots), reports at steps 20 and 40 to its
pruner, and counts training steps (pruned trials: up to where they stopped) until a complete trial is within 1 %
of the grid's best. It is a screen for settings worth a real run (the interpolation between measured points is
smoother than training is), not a substitute for one.
"""
import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import optuna
import yaml

STEPS = (20, 40, 60)


def load_curves(out: Path) -> tuple[dict, float]:
    curves, grid = {}, []
    for d in (out / "grid").iterdir():
        if not (d / "metrics.json").exists():
            continue
        m, c = json.loads((d / "metrics.json").read_text()), yaml.safe_load((d / "config.yaml").read_text())
        h = {int(s): v for s, v in m["eval_history"]}
        curves.setdefault((c["lora"]["r"], c["lora"]["alpha"]), {})[c["optimizer"]["lr"]] = h
        grid.append(h[STEPS[-1]])
    storage = f"sqlite:///{out / 'studies.db'}"
    for summary in optuna.get_all_study_summaries(storage):
        for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials:
            iv = t.intermediate_values
            if t.state.name == "COMPLETE" and all(s in iv for s in STEPS[:-1]):
                curves.setdefault((t.params["lora.r"], t.params["lora.alpha"]), {})[t.params["optimizer.lr"]] = {
                    **{s: iv[s] for s in STEPS[:-1]}, STEPS[-1]: t.value}
    return curves, min(grid)


def replay(curves, target, sampler, pruner, budget: int, slots: int = 2) -> int | None:
    study = optuna.create_study(sampler=sampler, pruner=pruner)

    def ask():
        t = study.ask()
        r, a = t.suggest_categorical("r", [8, 16, 32, 64]), t.suggest_categorical("alpha", [8, 16, 32, 64])
        lr = t.suggest_float("lr", 1e-5, 3e-3, log=True)
        pts = sorted(curves[(r, a)].items())
        xs = [math.log(p) for p, _ in pts]
        return t, {s: float(np.interp(math.log(lr), xs, [h[s] for _, h in pts])) for s in STEPS}

    steps, running = 0, [ask() for _ in range(slots)]
    while steps < budget:
        t, c = running.pop(0)
        for s in STEPS[:-1]:
            t.report(c[s], s)
            if t.should_prune():
                steps += s
                study.tell(t, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            steps += STEPS[-1]
            study.tell(t, c[STEPS[-1]])
            if c[STEPS[-1]] <= target:
                return steps
        running.append(ask())
    return None


def tpe(**kw):
    return lambda seed: optuna.samplers.TPESampler(seed=seed, **kw)


SHIPPED_TPE = {"n_startup_trials": 5, "multivariate": True, "constant_liar": True}
CONFIGS = {  # name -> (sampler for a seed, pruner)
    "tpe_optuna_default_median": (tpe(), lambda: optuna.pruners.MedianPruner(3, 20)),
    "tpe5_median": (tpe(**SHIPPED_TPE), lambda: optuna.pruners.MedianPruner(3, 20)),
    "tpe5_pct25": (tpe(**SHIPPED_TPE), lambda: optuna.pruners.PercentilePruner(25, 3, 20)),
    "tpe5_ei64_pct25": (tpe(**SHIPPED_TPE, n_ei_candidates=64), lambda: optuna.pruners.PercentilePruner(25, 3, 20)),
    "gp_median": (lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=5),
                  lambda: optuna.pruners.MedianPruner(3, 20)),
    "random_none": (lambda seed: optuna.samplers.RandomSampler(seed=seed), lambda: optuna.pruners.NopPruner()),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "outputs" / "bench" /
                    "search_efficiency", help="bench/search_efficiency.py's --out")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seeds", type=int, default=12)
    a = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    curves, best = load_curves(a.out)
    budget = STEPS[-1] * sum(len(v) for v in curves.values())
    grid_steps = STEPS[-1] * 80
    print(f"grid best {best:.4f}, target {best * 1.01:.4f}; a third of the grid: {grid_steps // 3} steps")
    print("| config | reached | median steps to target | within a third of the grid |\n| --- | ---: | ---: | ---: |")
    for name in a.configs.split(","):
        sampler, pruner = CONFIGS[name]
        res = [replay(curves, best * 1.01, sampler(seed), pruner(), budget) for seed in range(a.seeds)]
        med = statistics.median(r if r is not None else math.inf for r in res)
        print(f"| {name} | {sum(r is not None for r in res)}/{a.seeds} | {med} | "
              f"{sum(r is not None and r <= grid_steps / 3 for r in res)}/{a.seeds} |", flush=True)


if __name__ == "__main__":
    main()
