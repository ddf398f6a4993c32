"""Search efficiency on the embedded task: how much training finds a configuration within 1 % of the grid's best.

    python bench/search_efficiency.py                                   # the full benchmark (hours on 2 cores)
    python bench/search_efficiency.py --smoke                           # a few short trials per strategy

One search space, the embedded default (tiny model, tiny_instruct), equal trainer settings for every trial:
  r in {8, 16, 32, 64}, alpha in {8, 16, 32, 64}, lr log-uniform 1e-5..3e-3 (the grid: 5 log-spaced values).
Strategies, each through the real command line:
  grid         Hydra's basic sweeper over the 80 points, one trial after another (what users have today)
  random       qlora_exp's sweeper, random sampler, no pruning, 2 asynchronous slots
  tpe_batched  TPE, no pruning, batches of 2 that wait for each other (hydra-optuna-sweeper's way): the study
               is resumed with n_trials raised by 2 each time, so every batch waits for the previous one
  qlora_exp    TPE with the shipped pruner (search=rank_alpha_lr's defaults), 2 asynchronous slots
The stochastic ones run with --seeds sampler seeds. For every run: training steps spent (complete trials their
steps, pruned ones up to where they stopped, running ones pro rata) and wall time until the first complete trial
within 1 % of the grid's best eval loss; the best eval loss after 25 % and 50 % of the grid's steps; idle
slot-time (slots x span - trial time). Writes <out>/search_efficiency.{json,md,png}.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPACE = {"lora.r": [8, 16, 32, 64], "lora.alpha": [8, 16, 32, 64]}
LR_RANGE = (1e-5, 3e-3)


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)] if n > 1 else [lo]


def cli(args: list[str], out: Path, log: Path, timeout: int) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1", "QLORA_EXP_ROOT": str(out)}
    with open(log, "a") as f:
        rc = subprocess.run([sys.executable, "-m", "qlora_exp", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env=env, timeout=timeout).returncode
    if rc:
        sys.exit(f"error: {' '.join(args)[:200]} exited {rc}: see {log}")


def trial_record(folder: Path) -> dict | None:
    m = folder / "metrics.json"
    if not m.exists():
        return None
    d = json.loads(m.read_text())
    end = m.stat().st_mtime
    return {"status": d["status"], "value": d.get("eval_loss"), "steps": d.get("steps") or 0,
            "start": end - (d.get("wall_time_s") or 0), "end": end, "folder": str(folder)}


def run_grid(a, out: Path, common: list[str]) -> list[dict]:
    folder = out / "grid"
    lrs = ",".join(map(str, log_grid(*LR_RANGE, a.grid_lrs)))
    params = [f"{k}={','.join(map(str, v))}" for k, v in space(a).items()] + [f"optimizer.lr={lrs}"]
    if not (folder / "multirun.yaml").exists():
        cli(["-m", "hydra/sweeper=basic", *params, *common, f"hydra.sweep.dir={folder}"], out, out / "grid.log",
            a.timeout * 100)
    trials = [trial_record(d) for d in sorted(folder.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
              if d.is_dir() and d.name.isdigit()]
    return [t for t in trials if t]


def run_sweep(a, out: Path, common: list[str], strategy: str, seed: int) -> list[dict]:
    import optuna

    name = f"{strategy}-s{seed}"
    storage = f"sqlite:///{out}/studies.db"
    params = ",".join([*(f"{k}:'choice({','.join(map(str, v))})'" for k, v in space(a).items()),
                       f"optimizer.lr:'tag(log, interval({LR_RANGE[0]}, {LR_RANGE[1]}))'"])
    base = ["-m", "search=rank_alpha_lr", f"hydra.sweeper.params={{{params}}}",
            f"hydra.sweeper.study_name={name}", f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_dir={out / 'sweeps'}", f"hydra.sweeper.sampler.seed={seed}", *common]
    if strategy == "random":
        base += ["hydra.sweeper.sampler.name=random", "hydra.sweeper.pruner.name=none", "hydra.sweeper.n_jobs=2"]
    elif strategy == "tpe_batched":  # optuna's TPE as hydra-optuna-sweeper makes it: none of the preset's settings
        base += ["hydra.sweeper.sampler.name=tpe", "hydra.sweeper.pruner.name=none", "hydra.sweeper.n_jobs=2",
                 *(f"~hydra.sweeper.sampler.{k}" for k in ("n_startup_trials", "multivariate", "constant_liar"))]
    else:
        base += ["hydra.sweeper.n_jobs=2"]
    targets = range(2, a.trials + 1, 2) if strategy == "tpe_batched" else [a.trials]
    for n in targets:  # tpe_batched: each call runs 2 trials and waits for both; the next resumes the study
        if finished(name, storage) < n and not a.report_only:  # a rerun reuses what is already measured
            cli([*base, f"hydra.sweeper.n_trials={n}"], out, out / f"{name}.log", a.timeout * a.trials)
    study = optuna.load_study(study_name=name, storage=storage)
    records = []
    for t in study.trials:
        rec = trial_record(Path(t.user_attrs["folder"])) if t.user_attrs.get("folder") else None
        if rec is None:
            continue
        rec["status"] = t.state.name.lower()
        if t.datetime_start and t.datetime_complete:
            rec["start"], rec["end"] = t.datetime_start.timestamp(), t.datetime_complete.timestamp()
        rec["value"] = t.value if t.state.name == "COMPLETE" else None
        records.append(rec)
    return records


def finished(name: str, storage: str) -> int:
    """Trials of study `name` that ended (0 when there is no such study yet)."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    return sum(t.state.is_finished() for t in study.trials)


def space(a) -> dict:
    return {"lora.r": a.ranks, "lora.alpha": a.alphas}


def measure(trials: list[dict], target: float, grid_steps: int, slots: int) -> dict:
    """Steps and wall time to the first complete trial within 1 % of `target`, best at budget fractions."""
    trials = sorted(trials, key=lambda t: t["end"])
    t0 = min(t["start"] for t in trials)

    def steps_by(when: float) -> float:  # finished trials' steps, running ones pro rata
        return sum(t["steps"] * min(1.0, max(0.0, (when - t["start"]) / max(t["end"] - t["start"], 1e-9)))
                   for t in trials)

    hit = next((t for t in trials if t["value"] is not None and t["value"] <= target * 1.01), None)
    best_at = {}
    for frac in (0.25, 0.5, 1.0):
        done = [t for t in trials if t["value"] is not None and steps_by(t["end"]) <= frac * grid_steps + 1e-6]
        best_at[f"{int(frac * 100)}%"] = min((t["value"] for t in done), default=None)
    span = max(t["end"] for t in trials) - t0
    busy = sum(t["end"] - t["start"] for t in trials)
    return {"trials": len(trials), "steps_total": sum(t["steps"] for t in trials),
            "steps_to_target": round(steps_by(hit["end"])) if hit else None,
            "wall_to_target_s": round(hit["end"] - t0, 1) if hit else None,
            "best": min((t["value"] for t in trials if t["value"] is not None), default=None),
            "best_at_grid_fraction": best_at, "idle_slot_s": round(max(0.0, slots * span - busy), 1),
            "curve": [[round(steps_by(t["end"])), t["value"]] for t in trials if t["value"] is not None]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "search_efficiency")
    ap.add_argument("--strategies", default="grid,random,tpe_batched,qlora_exp")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=40, help="trials per stochastic run (the grid has 80)")
    ap.add_argument("--grid-lrs", type=int, default=5)
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--alphas", default="8,16,32,64")
    ap.add_argument("--set", action="append", default=[], help="a trainer override for every trial")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per trial")
    ap.add_argument("--only-seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="comma list: run (or resume with a larger --trials) only these seeds")
    ap.add_argument("--report-only", action="store_true", help="run nothing: the table of the studies already in --out")
    ap.add_argument("--smoke", action="store_true", help="1 rank, 1 alpha, 2 lrs (a grid of 2), 2 trials, 1 seed, 10 steps")
    a = ap.parse_args()
    if a.smoke:
        a.ranks, a.alphas, a.grid_lrs, a.trials, a.seeds = "8", "16", 2, 2, 1
        a.set = ["trainer.max_steps=10", "trainer.eval_every=5", *a.set]
    a.ranks, a.alphas = [int(x) for x in a.ranks.split(",")], [int(x) for x in a.alphas.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    common = ["trainer.save_adapter=false", *a.set]
    started = time.time()

    grid = run_grid(a, a.out, common)
    grid_best = min(t["value"] for t in grid if t["value"] is not None)
    grid_steps = sum(t["steps"] for t in grid)
    runs = {"grid": [measure(grid, grid_best, grid_steps, 1)]}
    for strategy in [s for s in a.strategies.split(",") if s != "grid"]:
        runs[strategy] = [measure(run_sweep(a, a.out, common, strategy, seed), grid_best, grid_steps, 2)
                          for seed in range(a.seeds) if seed in (a.only_seeds or range(a.seeds))
                          if not a.report_only or finished(f"{strategy}-s{seed}", f"sqlite:///{a.out}/studies.db")]
        print(f"{strategy}: {[r['steps_to_target'] for r in runs[strategy]]}", flush=True)

    rows = ["| strategy | runs that got there | steps to within 1 % of the grid's best (median) | fraction of the "
            "grid's steps | wall to target s (median) | best at 25 % / 50 % of grid steps (median) | idle slot-time s "
            "(median) | steps to target, each run |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    summary = {}
    for strategy, rs in runs.items():
        reached = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
        # median over runs, a run that never got there counting as the worst (infinite)
        med = statistics.median([r["steps_to_target"] if r["steps_to_target"] is not None else math.inf for r in rs])
        med = None if med == math.inf else med
        b25 = [r["best_at_grid_fraction"]["25%"] for r in rs if r["best_at_grid_fraction"]["25%"] is not None]
        b50 = [r["best_at_grid_fraction"]["50%"] for r in rs if r["best_at_grid_fraction"]["50%"] is not None]
        walls = [r["wall_to_target_s"] if r["wall_to_target_s"] is not None else math.inf for r in rs]
        wall = statistics.median(walls) if rs else math.inf
        summary[strategy] = {"median_steps_to_target": med, "fraction_of_grid": med / grid_steps if med else None,
                             "reached": f"{len(reached)}/{len(rs)}"}
        fmt = lambda v: f"{statistics.median(v):.4f}" if v else "-"  # noqa: E731
        each = ", ".join(str(r["steps_to_target"]) if r["steps_to_target"] is not None else
                         f"not in {r['trials']} trials ({r['steps_total']} steps)" for r in rs)
        rows.append(f"| {strategy} | {len(reached)}/{len(rs)} | {med if med is not None else 'not reached'} | "
                    f"{f'{med / grid_steps:.2f}' if med else '-'} | {round(wall) if wall != math.inf else '-'} | "
                    f"{fmt(b25)} / {fmt(b50)} | {statistics.median(r['idle_slot_s'] for r in rs):.0f} | {each} |")
    head = (f"grid: {len(grid)} trials, {grid_steps} steps, best eval loss {grid_best:.4f}; trainer overrides: "
            f"{' '.join(common)}; {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {time.time() - started:.0f} s")
    table = head + "\n\n" + "\n".join(rows)
    (a.out / "search_efficiency.md").write_text(table + "\n")
    (a.out / "search_efficiency.json").write_text(json.dumps({"grid_best": grid_best, "grid_steps": grid_steps,
                                                              "summary": summary, "runs": runs}, indent=1))
    plot(runs, grid_best, grid_steps, a.out / "search_efficiency.png")
    print("\n" + table)


def plot(runs: dict, grid_best: float, grid_steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (strategy, rs) in enumerate(runs.items()):
        for j, r in enumerate(rs):
            xs, best, ys = [], math.inf, []
            for steps, value in r["curve"]:
                best = min(best, value)
                xs.append(steps)
                ys.append(best)
            ax.step(xs, ys, where="post", color=f"C{i}", alpha=0.8, label=strategy if j == 0 else None)
    ax.axhline(grid_best * 1.01, color="grey", ls="--", lw=1, label="grid best + 1 %")
    ax.axvline(grid_steps / 3, color="grey", ls=":", lw=1, label="1/3 of the grid's steps")
    ax.set_xlabel("training steps spent")
    ax.set_ylabel("best eval loss so far")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
