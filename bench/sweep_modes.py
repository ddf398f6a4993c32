"""A sweep's time, process-per-trial against workers: the same grid run both ways, in interleaved rounds.

    python bench/sweep_modes.py                                   # CPU: -m lora.r=8,16,32,64 on the embedded default
    python bench/sweep_modes.py --rounds 2 --out docs/bench/sweep_modes_cpu.json
    python bench/sweep_modes.py --recipe .gpu/seed_recipe.py --modes workers \
        --grid lora.r=8,16,32 optimizer.lr=1e-4,2e-4,4e-4,8e-4 -- trainer.max_steps=30   # GPU: the 8B shape, 12 trials
    python bench/sweep_modes.py --keep-cache --rounds 2            # CPU, the tiny model already built (a second sweep)
    python bench/sweep_modes.py --breakdown                       # where a cold trial's start-up goes

Per mode and round: the sweep's wall time (the command's, start to exit), the time its trials spent in their
training loops (evaluations included: `train_loop_s`) and in optimizer steps alone (`train_time_s`), each as a
share of the wall time, the GPU's useful share (real tokens trained over wall time x the median trial's steady
tokens/s, the issue's measure), trials per hour, and each trial's start-up: from the moment the study gave it out
(its `datetime_start`) to its training loop's start (`ready_at`) and first step (`first_step_at`), cold (first in its
process) and warm, and the CUDA memory allocated as each trial began (flat on a worker: nothing left behind).

`--recipe` (the article's recipe script, `../shared/bench/seed_recipe.py`): the recipe's random-weight model folder
(`/tmp/model-<shape>`, built on first use) and its rows, pre-tokenized, as bench/throughput.py uses them, with
`trainer=article` and the recipe's optimizer; the grid's keys override those.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parent.parent


def recipe_overrides(recipe: Path, shape: str, steps: int, data: Path) -> list[str]:
    """The recipe's model folder (built by its own make_model) and rows, and throughput.py's common overrides."""
    sys.path.insert(0, str(REPO / "bench"))
    from throughput import load_recipe, write_rows

    seed = load_recipe(recipe)
    model_dir = Path(f"/tmp/model-{shape}")
    t0 = time.time()
    seed.make_model(shape, str(model_dir))
    write_rows(seed, shape, steps, data)
    print(f"model folder {model_dir} and rows ready in {time.time() - t0:.1f} s", flush=True)
    return ["model=llama3_8b", f"model.name_or_path={model_dir}", "model.random_init=false", "data=jsonl",
            f"data.train_path={data / 'train.jsonl'}", f"data.eval_path={data / 'eval.jsonl'}",
            "data.assistant_only_loss=false", "trainer=article", "trainer.max_length=1024", "trainer.epochs=1",
            f"trainer.max_steps={steps}", "trainer.eval_every=100000", "trainer.log_every=5",
            "trainer.save_adapter=false", "optimizer=paged_adamw_32bit", "lora.dropout=0.05",
            "lora.target_modules=all_linear", "quantization=nf4"]


def sweep(mode: str, grid: list[str], extra: list[str], root: Path, profile: Path | None = None) -> dict:
    env = {**os.environ, "QLORA_EXP_SWEEP_MODE": mode, "TQDM_DISABLE": "1"}
    profiler = ["-m", "cProfile", "-o", str(profile.resolve())] if profile else []  # the driver's process
    cmd = [sys.executable, *profiler, "-m", "qlora_exp", "-m", *grid, f"paths.output_root={root}", *extra]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    (study_dir,) = (root / "multirun").iterdir()
    st = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{root}/optuna.db")
    trials = []
    for t in st.trials:
        m = json.loads((study_dir / str(t.number) / "metrics.json").read_text())
        asked = t.datetime_start.timestamp()
        trials.append({"number": t.number, "cold": m["trial_in_process"] == 1, "startup_s": m["ready_at"] - asked,
                       "first_step_s": m["first_step_at"] - asked, "train_loop_s": m["train_loop_s"],
                       "train_time_s": m["train_time_s"], "tokens": m["train_tokens"],
                       "steady_tokens_per_s": m["steady_tokens_per_s"], "ready_from_process_s":
                       m["ready_at"] - m["process_started_at"], "memory_at_start_gb": m.get("memory_at_start_gb"),
                       "device_used_at_start_gb": m.get("device_used_at_start_gb"), "paged_states": m.get("paged_states"),
                       "peak_memory_gb": m.get("peak_memory_gb"), "eval_loss": m.get("eval_loss"),
                       "worker": t.user_attrs.get("worker_job"),
                       "launch_s": m["started_at"] - asked, "phase_s": m.get("phase_s"),
                       "told_after_s": t.datetime_complete.timestamp() - (m["started_at"] + m["wall_time_s"]),
                       "initial_eval_reused": m.get("initial_eval_reused"), "asked_at_s": asked - start,
                       "told_at_s": t.datetime_complete.timestamp() - start,
                       "process_started_at_s": m["process_started_at"] - start, "step_s": m.get("step_s")})
    loop = sum(t["train_loop_s"] for t in trials)
    steps = sum(t["train_time_s"] for t in trials)
    cold = [t["startup_s"] for t in trials if t["cold"]]
    warm = [t["startup_s"] for t in trials if not t["cold"]]
    steadies = [t["steady_tokens_per_s"] for t in trials if t["steady_tokens_per_s"]]
    steady = statistics.median(steadies) if steadies else None  # none in trials too short for a steady figure
    useful = sum(t["tokens"] for t in trials) / (wall * steady) if steady else None
    return {"mode": mode, "wall_s": round(wall, 1), "trials": len(trials), "train_loop_share": round(loop / wall, 3),
            "steps_share": round(steps / wall, 3), "useful_share": useful and round(useful, 3),
            "steady_tokens_per_s": steady and round(steady), "trials_per_hour": round(3600 * len(trials) / wall, 1),
            "startup_cold_s": round(statistics.median(cold), 2) if cold else None,
            "startup_warm_s": round(statistics.median(warm), 2) if warm else None,
            "first_step_warm_s": round(statistics.median([t["first_step_s"] for t in trials if not t["cold"]]), 2)
            if warm else None,
            # the driver's own time: from the command's start to the first trial given out, and after the last tell
            "first_ask_s": round(min(t["asked_at_s"] for t in trials), 2),
            "after_last_tell_s": round(wall - max(t["told_at_s"] for t in trials), 2), "per_trial": trials}


BREAKDOWN = r'''
import time, json, sys
t0 = time.time(); marks = {}
def mark(name):
    global t0
    now = time.time(); marks[name] = round(now - t0, 2); t0 = now
import torch; mark("import torch")
from qlora_exp.quiet import import_bitsandbytes
import_bitsandbytes(); mark("import bitsandbytes (as a trial does: qlora_exp.quiet.import_bitsandbytes)")
import transformers, peft, trl, datasets  # noqa
from trl import SFTTrainer  # noqa
mark("import transformers, peft, trl, datasets")
from hydra import compose, initialize_config_dir
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[3:] + [f"paths.output_dir={sys.argv[2]}/trial",
                  f"paths.root_dir={sys.argv[2]}"])
mark("compose the config (Hydra)")
from qlora_exp import recipe
from qlora_exp.callbacks import TrialBoard
plan = recipe.plan_trial(cfg); rows = recipe.rows_for(cfg, plan); mark("plan and read rows")
from qlora_exp.models import load_tokenizer, random_model_dir, tokenizer_corpus
src = str(random_model_dir(cfg.model, cfg.paths.cache_dir, tokenizer_corpus(cfg.paths))) if cfg.model.random_init else cfg.model.name_or_path
tok = load_tokenizer(src, cfg.model); mark("tokenizer")
model = recipe._load_model(cfg, plan, src); mark("load and quantize the base (from_pretrained, prepare)")
base = recipe.Base(plan.base_key, model, tok, src, None, 0.0); recipe.WARM.base = base
peft_model = recipe.attach_adapter(base, cfg, plan); mark("attach LoRA (peft)")
from pathlib import Path
import qlora_exp.recipe as R
orig = R.TrialMetrics if hasattr(R, "TrialMetrics") else None
from transformers import TrainerCallback
class Stop(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        mark("trainer: data tokenized, optimizer and dataloader set up")
    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = True
from omegaconf import open_dict
with open_dict(cfg):
    cfg.trainer.eval_every = 10**6
    cfg.callbacks = {"stop": {"_target_": "__main__.Stop"}}
import __main__; __main__.Stop = Stop
board = TrialBoard(str(Path(sys.argv[2]) / "tb"))
R.train(cfg, plan, base, peft_model, Path(sys.argv[2]) / "trial", board, *rows)
print(json.dumps(marks))
'''


def breakdown(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", BREAKDOWN, str(REPO / "conf"), tmp, *extra], cwd=REPO,
                             capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", nargs="+", default=["lora.r=8,16,32,64"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["processes", "workers"])
    ap.add_argument("--breakdown", action="store_true", help="time a cold trial's start-up, phase by phase")
    ap.add_argument("--out", type=Path, help="JSON report, rewritten after every sweep")
    ap.add_argument("--recipe", type=Path, help="the article's recipe script: its 8B model folder and rows (GPU)")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--steps", type=int, default=30, help="with --recipe: steps per trial")
    ap.add_argument("--keep-cache", action="store_true", help="one paths.cache_dir for every sweep, its tiny model "
                    "built before the first (as the README's first command leaves it), not built in each sweep")
    ap.add_argument("--profile-driver", type=Path, help="run each sweep's command under cProfile, writing this file "
                    "(with one worker the driver is the worker: its trials are in it too)")
    ap.add_argument("extra", nargs="*", help="-- then overrides for every trial")
    a = ap.parse_args()
    if a.keep_cache:
        cache = Path(tempfile.mkdtemp(prefix="sweep-modes-cache-"))
        a.extra = [*a.extra, f"paths.cache_dir={cache}"]
        with tempfile.TemporaryDirectory() as tmp:  # one 1-step trial builds the model and tokenizer into it
            subprocess.run([sys.executable, "-m", "qlora_exp", "trainer.max_steps=1", "trainer.save_adapter=false",
                            f"paths.output_root={tmp}", *a.extra], cwd=REPO, check=True, capture_output=True,
                           env={**os.environ, "TQDM_DISABLE": "1"})
    if a.recipe:
        data = Path(tempfile.mkdtemp(prefix="sweep-modes-rows-"))
        a.extra = recipe_overrides(a.recipe.resolve(), a.shape, a.steps, data) + a.extra
    if a.breakdown:
        report = {"breakdown": breakdown(a.extra)}
        print(json.dumps(report, indent=1))
    else:
        runs = []
        for r in range(a.rounds):
            for mode in a.modes if r % 2 == 0 else list(reversed(a.modes)):
                with tempfile.TemporaryDirectory() as tmp:
                    res = sweep(mode, a.grid, a.extra, Path(tmp), a.profile_driver)
                res["round"] = r
                runs.append(res)
                print(f"round {r} {mode:9s} wall {res['wall_s']:6.1f} s  train loop {res['train_loop_share']:.0%}  "
                      f"steps {res['steps_share']:.0%}  useful {res['useful_share'] or 0:.0%}  "
                      f"{res['trials_per_hour']:.0f} trials/h  start-up cold {res['startup_cold_s']} s, warm "
                      f"{res['startup_warm_s']} s, warm first step {res['first_step_warm_s']} s", flush=True)
                report = {"grid": a.grid, "extra": a.extra, "keep_cache": a.keep_cache, "runs": runs}
                if a.out:
                    a.out.parent.mkdir(parents=True, exist_ok=True)
                    a.out.write_text(json.dumps(report, indent=1) + "\n")
        return
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
