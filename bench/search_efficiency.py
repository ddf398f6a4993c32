"""Search efficiency, counted in wall-clock seconds: how soon each strategy finds a configuration within 1 % of the
grid's best eval loss, on two tasks, start-up included, every strategy with the same slots.

    python bench/search_efficiency.py                           # both tasks, 5 seeds (~75 min on 2 cores)
    python bench/search_efficiency.py --parallel 7              # 7 runs at a time (each 2 slots of 1 thread): 16 cores
    python bench/search_efficiency.py --smoke                   # a few short trials per strategy (CI)
    python bench/search_efficiency.py --report-only             # the tables and the plot of what is in --out

Tasks (TASKS below). Task A is the one qlora_exp's default search settings could have been tuned on; task B was
fixed here before it was first run and is never used to choose settings:
  A  model=tiny_pretrained on the shipped instruction rows (assistant-only loss); search=rank_alpha_lr's space:
     r in {8,16,32,64}, alpha in {8,16,32,64}, lr log-uniform 1e-5..3e-3 (grid: 4 log-spaced lrs, 64 points)
  B  the same base, another data mix (loss on every token, half the train rows) and another space: target modules
     {attention, all_linear}, dropout {0, 0.1, 0.2}, lr log-uniform 1e-5..3e-3 (grid: 6 lrs, 36 points)
Every trial: 40 steps of 8 examples, an evaluation every 10 steps on 100 held-out rows.

Strategies, each through the real command line with 2 slots (sweep workers, hydra.sweeper.n_jobs=2):
  grid       every point of the task's grid (Optuna's GridSampler, no pruning): its best is the target and its
             wall-clock seconds the unit of cost
  random     random sampling, no pruning
  tpe        Optuna's TPE as it comes (10 random trials first, independent), no pruning
  random_sh  random sampling + successive halving (Optuna's SuccessiveHalvingPruner, reduction 4: Ray Tune's ASHA)
  qlora_exp  search=rank_alpha_lr's sampler and pruner (the shipped default) over the task's space
The stochastic ones run once per sampler seed, each with hydra.sweeper.timeout at half the grid's seconds (and up to
the grid's number of trials). Per run: seconds from the command's start to the end of the first complete trial
within 1 % of the grid's best, training steps by then, the best eval loss at 25 % and 50 % of the grid's seconds,
idle slot-time (2 x wall - the trials' time). Writes <out>/search_efficiency.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLOTS = 2
LR_RANGE = (1e-5, 3e-3)
TRIAL = ["trainer.max_steps=40", "trainer.eval_every=10", "trainer.batch_size=8", "data.max_eval_rows=100",
         "trainer.save_adapter=false"]
TASKS = {
    "A": {"about": "model=tiny_pretrained, the shipped rows, search=rank_alpha_lr's space (r, alpha, lr)",
          "set": ["model=tiny_pretrained"],
          "choices": {"lora.r": [8, 16, 32, 64], "lora.alpha": [8, 16, 32, 64]}, "grid_lrs": 4},
    "B": {"about": "model=tiny_pretrained, loss on every token of half the rows; targets, dropout and lr",
          "set": ["model=tiny_pretrained", "data.assistant_only_loss=false", "data.max_train_rows=1000"],
          "choices": {"lora.target_modules": ["attention", "all_linear"], "lora.dropout": [0.0, 0.1, 0.2]},
          "grid_lrs": 6},
}
STRATEGIES = {  # each from search=rank_alpha_lr with its space replaced; the short form `name` drops the settings
    "random": ["hydra.sweeper.sampler.name=random", "hydra.sweeper.pruner.name=none"],  # of other classes
    "tpe": ["hydra.sweeper.sampler.name=tpe", "hydra.sweeper.pruner.name=none",  # TPE as Optuna makes it
            *(f"~hydra.sweeper.sampler.{k}" for k in ("n_startup_trials", "multivariate", "constant_liar"))],
    "random_sh": ["hydra.sweeper.sampler.name=random", "hydra.sweeper.pruner.name=successive_halving"],
    "qlora_exp": [],  # search=rank_alpha_lr as shipped
}


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)] if n > 1 else [lo]


def grid_size(task: dict) -> int:
    return math.prod(len(v) for v in task["choices"].values()) * task["grid_lrs"]


def sweep_args(task: dict, strategy: str, seed: int, out: Path, name: str, extra: list[str]) -> list[str]:
    storage = f"sqlite:///{out / 'studies' / name}.db"  # one file per run: runs side by side never wait for a lock
    common = ["-m", *task["set"], *TRIAL, *extra, f"hydra.sweeper.n_jobs={SLOTS}", f"hydra.sweeper.study_name={name}",
              f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_dir={out / 'sweeps'}",
              "hydra.sweeper.mode=workers"]
    if strategy == "grid":
        lrs = ",".join(map(str, log_grid(*LR_RANGE, task["grid_lrs"])))
        return [*common, *(f"{k}={','.join(map(str, v))}" for k, v in task["choices"].items()), f"optimizer.lr={lrs}"]
    params = ",".join([*(f"{k}:'choice({','.join(map(str, v))})'" for k, v in task["choices"].items()),
                       f"optimizer.lr:'tag(log, interval({LR_RANGE[0]}, {LR_RANGE[1]}))'"])
    # the task's space replaces the preset's (a plain params={...} would merge into it)
    return ["-m", "search=rank_alpha_lr", *common[1:], *STRATEGIES[strategy], "~hydra.sweeper.params", f"+hydra.sweeper.params={{{params}}}",
            f"hydra.sweeper.sampler.seed={seed}"]


def run_once(args: list[str], out: Path, name: str, timeout: float) -> dict:
    """One sweep command; its record (start, end, exit status) is kept in <out>/runs/<name>.json, and a rerun of the
    benchmark reuses it: a finished run is never run again."""
    record = out / "runs" / f"{name}.json"
    if record.exists():
        return json.loads(record.read_text())
    env = {**os.environ, "TQDM_DISABLE": "1", "QLORA_EXP_LIVE": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    with open(out / "logs" / f"{name}.log", "w") as f:
        rc = subprocess.run([sys.executable, "-m", "qlora_exp", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env=env, timeout=timeout).returncode
    rec = {"name": name, "start": start, "end": time.time(), "rc": rc, "args": args}
    if rc:
        raise SystemExit(f"error: run {name} exited {rc}: see {out / 'logs' / (name + '.log')}")
    rec["trials"] = trials_of(out, name)  # the record alone makes the report: the sweep folders can go
    record.write_text(json.dumps(rec, indent=1))
    return rec


def trials_of(out: Path, name: str) -> list[dict]:
    """The run's trials from its study, with the steps each trained (its metrics.json)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'studies' / name}.db")
    trials = []
    for t in study.trials:
        if not (t.state.is_finished() and t.datetime_start and t.datetime_complete):
            continue
        folder = Path(t.user_attrs.get("folder", ""))
        metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else {}
        trials.append({"number": t.number, "state": t.state.name.lower(), "params": t.params,
                       "value": t.value if t.state.name == "COMPLETE" else None, "steps": metrics.get("steps") or 0,
                       "start": t.datetime_start.timestamp(), "end": t.datetime_complete.timestamp()})
    return trials


def measure(run: dict, target: float, grid_s: float) -> dict:
    """Seconds (from the command's start) and steps to the first complete trial within 1 % of `target`; the best
    complete value by 25 % and 50 % of the grid's seconds; idle slot-time."""
    t0, trials = run["start"], sorted(run["trials"], key=lambda t: t["end"])
    full = [t["end"] - t["start"] for t in trials if t["state"] == "complete"]
    hit = next((t for t in trials if t["value"] is not None and t["value"] <= target * 1.01), None)
    best_at = {f"{int(f * 100)}%": min((t["value"] for t in trials if t["value"] is not None
                                        and t["end"] - t0 <= f * grid_s), default=None) for f in (0.25, 0.5, 1.0)}
    wall = run["end"] - t0
    return {"trials": len(trials), "pruned": sum(t["state"] == "pruned" for t in trials),
            "wall_s": round(wall, 1), "steps_total": sum(t["steps"] for t in trials),
            "wall_to_target_s": round(hit["end"] - t0, 1) if hit else None,
            "steps_to_target": sum(t["steps"] for t in trials if t["end"] <= hit["end"]) if hit else None,
            "best": min((t["value"] for t in trials if t["value"] is not None), default=None),
            "best_at_grid_seconds": best_at,
            "median_complete_trial_s": round(statistics.median(full), 2) if full else None,
            "idle_slot_s": round(max(0.0, SLOTS * wall - sum(t["end"] - t["start"] for t in trials)), 1),
            "curve": [[round(t["end"] - t0, 1), t["value"]] for t in trials if t["value"] is not None]}


def median_or_none(values: list) -> float | None:
    """The median, a run that never got there (None) counting as the worst."""
    if not values:
        return None
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if m == math.inf else m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "search_efficiency")
    ap.add_argument("--tasks", default=None, help="comma list of TASKS (default: A,B; with --smoke: A)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.5, help="each stochastic run's timeout, a fraction of the "
                    "grid's seconds")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (each has 2 slots of one thread)")
    ap.add_argument("--stop-after", type=float, default=None, help="start no run after this many seconds (a rerun "
                    "continues with what is left)")
    ap.add_argument("--set", action="append", default=[], help="an override for every trial of every run")
    ap.add_argument("--report-only", action="store_true", help="run nothing: the tables and plot of what is in --out")
    ap.add_argument("--smoke", action="store_true", help="task A's choices cut to 1 x 1, 2 lrs, 10 steps, 1 seed")
    a = ap.parse_args()
    tasks = {k: dict(TASKS[k]) for k in (a.tasks or ("A" if a.smoke else "A,B")).split(",")}
    extra = list(a.set)
    if a.smoke:
        for t in tasks.values():
            t["choices"] = {k: v[:1] for k, v in t["choices"].items()}
            t["grid_lrs"] = 2
        a.seeds, a.budget = 1, max(a.budget, 1.0)  # a 2-trial grid's half is mostly start-up
        extra = ["trainer.max_steps=10", "trainer.eval_every=5", *extra]
    for sub in ("runs", "logs", "studies", "sweeps"):
        (a.out / sub).mkdir(parents=True, exist_ok=True)
    began = time.time()
    strategies = [s for s in a.strategies.split(",") if s != "grid"]

    def go(job: tuple) -> dict | None:
        key, strategy, seed, timeout_s = job
        name = f"{key}-{strategy}" + ("" if strategy == "grid" else f"-s{seed}")
        if a.report_only or (not (a.out / "runs" / f"{name}.json").exists() and a.stop_after is not None
                             and time.time() - began > a.stop_after):
            path = a.out / "runs" / f"{name}.json"
            return json.loads(path.read_text()) if path.exists() else None
        args = sweep_args(tasks[key], strategy, seed, a.out, name, extra)
        if timeout_s is not None:
            args += [f"hydra.sweeper.timeout={timeout_s:.1f}", f"hydra.sweeper.n_trials={grid_size(tasks[key])}"]
        print(f"[{time.time() - began:6.0f} s] {name} starts", flush=True)
        rec = run_once(args, a.out, name, timeout=3600 * 3)
        print(f"[{time.time() - began:6.0f} s] {name} ended after {rec['end'] - rec['start']:.0f} s", flush=True)
        return rec

    recs: dict = {}
    with ThreadPoolExecutor(max(1, a.parallel)) as pool:  # a task's grid first: its seconds set the others' timeouts
        grids = {pool.submit(go, (k, "grid", 0, None)): k for k in tasks}
        later = {}
        for done in as_completed(grids):
            key, rec = grids[done], done.result()
            recs[(key, "grid", 0)] = rec
            if rec is None:
                continue
            for seed in range(a.seeds):  # seeds outermost: every strategy runs beside the same others
                for s in strategies:
                    later[pool.submit(go, (key, s, seed, a.budget * (rec["end"] - rec["start"])))] = (key, s, seed)
        for done in as_completed(later):
            recs[later[done]] = done.result()
    results = {}
    for key, task in tasks.items():
        grid = recs.get((key, "grid", 0))
        if grid is None:
            continue
        target = min(t["value"] for t in grid["trials"] if t["value"] is not None)
        grid_s = grid["end"] - grid["start"]
        best = min(grid["trials"], key=lambda t: t["value"] if t["value"] is not None else math.inf)
        runs = {"grid": [measure(grid, target, grid_s)]}
        for s in strategies:
            runs[s] = [measure(recs[(key, s, seed)], target, grid_s)
                       for seed in range(a.seeds) if recs.get((key, s, seed)) is not None]
        results[key] = {"about": task["about"], "grid_best": target, "grid_best_params": best["params"],
                        "grid_s": round(grid_s, 1), "grid_trials": len(grid["trials"]),
                        "grid_steps": sum(t["steps"] for t in grid["trials"]), "runs": runs}
    if not results:
        sys.exit("no grid has run yet: nothing to report")
    table = report(results, extra)
    (a.out / "search_efficiency.md").write_text(table + "\n")
    (a.out / "search_efficiency.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "parallel": a.parallel, "trial": TRIAL + extra,
         "tasks": results}, indent=1))
    plot(results, a.out / "search_efficiency.png")
    print("\n" + table)


def report(results: dict, extra: list[str]) -> str:
    lines = []
    for key, r in results.items():
        lines += [f"**Task {key}**: {r['about']}. Grid: {r['grid_trials']} trials, {r['grid_s']:.0f} s, "
                  f"{r['grid_steps']} steps, best eval loss {r['grid_best']:.4f} at "
                  f"{', '.join(f'{k}={v}' for k, v in r['grid_best_params'].items())}.", "",
                  "| strategy | runs within 1 % | seconds to within 1 % (median) | fraction of the grid's seconds | "
                  "steps to within 1 % (median) | best at 25 % / 50 % of the grid's seconds (median) | trials (pruned) "
                  "per run, median | idle slot-time s (median) | seconds to within 1 %, each run |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
        for s, rs in [(s, rs) for s, rs in r["runs"].items() if rs]:
            secs = median_or_none([x["wall_to_target_s"] for x in rs])
            steps = median_or_none([x["steps_to_target"] for x in rs])
            at = {f: median_or_none([x["best_at_grid_seconds"][f] for x in rs]) for f in ("25%", "50%")}
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            each = ", ".join("-" if x["wall_to_target_s"] is None else f"{x['wall_to_target_s']:.0f}" for x in rs)
            lines.append(f"| {s} | {sum(x['wall_to_target_s'] is not None for x in rs)}/{len(rs)} | "
                         f"{'not reached' if secs is None else round(secs)} | "
                         f"{'-' if secs is None else round(secs / r['grid_s'], 2)} | {'-' if steps is None else round(steps)} | "
                         f"{fmt(at['25%'])} / {fmt(at['50%'])} | "
                         f"{statistics.median(x['trials'] for x in rs):.0f} ({statistics.median(x['pruned'] for x in rs):.0f}) | "
                         f"{statistics.median(x['idle_slot_s'] for x in rs):.0f} | {each} |")
        lines.append("")
    lines.append(f"Every trial: {' '.join(TRIAL + extra)}; {SLOTS} slots (sweep workers); "
                 f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Best eval loss so far against seconds (a fraction of the grid's), one line per run, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (key, r) in zip(axes[0], results.items(), strict=True):
        for i, (s, rs) in enumerate(r["runs"].items()):
            for j, run in enumerate(rs):
                xs, ys, best = [0.0], [None], math.inf
                for secs, value in run["curve"]:
                    best = min(best, value)
                    xs.append(secs / r["grid_s"])
                    ys.append(100 * (best / r["grid_best"] - 1))
                xs, ys = xs[1:], ys[1:]
                if xs:
                    ax.step(xs, ys, where="post", color=f"C{i}", alpha=0.75, lw=2 if s == "qlora_exp" else 1.2,
                            label=s if j == 0 else None)
        firsts = [run["curve"][0][0] / r["grid_s"] for rs in r["runs"].values() for run in rs if run["curve"]]
        if firsts:  # the sweep's fixed cost: imports, workers, the first (cold) trial
            ax.axvspan(0, statistics.median(firsts), color="grey", alpha=0.12,
                       label="before a run's first result (median)")
        ax.axhline(1.0, color="grey", ls="--", lw=1, label="within 1 % of the grid's best")
        ax.axvline(0.25, color="black", ls=":", lw=1, label="1/4 of the grid's seconds (the goal)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(-1.5, 200)
        ax.set_yticks([-1, 0, 1, 10, 100], ["-1", "0", "1", "10", "100"])
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("seconds since the command started, as a fraction of the grid's")
        ax.set_ylabel("best eval loss so far, % above the grid's best")
        ax.set_title(f"Task {key}: {r['grid_trials']}-point grid in {r['grid_s']:.0f} s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
