"""Trial throughput against the article's recipe, on identical data, in one machine run.

    python bench/throughput.py --recipe ../shared/bench/seed_recipe.py               # GPU: Llama-3-8B shape
    python bench/throughput.py --recipe ../shared/bench/seed_recipe.py --shape tiny --model tiny \
        --steps 8 --variants recipe,runner_as_written,fast                             # CPU smoke run

What it does, in order:
  1. runs the recipe script as written (`seed_recipe.py --shape S --steps N`, batch 2 x 4, max length 1024):
     it builds the random-weight model of that shape in /tmp/model-S (seed 0) and prints one JSON line;
     its loss every 5 steps comes from the trainer's log lines;
  2. writes the recipe's own synthetic rows (its `make_data`, same seed and count: the same token rows the
     recipe trained on) as pre-tokenized JSON lines, plus 16 held-out rows;
  3. runs qlora_exp's trial runner (`python -m qlora_exp`, one process per variant) on that model folder
     and those rows with the recipe's optimizer, LoRA and schedule, and reads each trial's metrics.json;
  4. with --repeat N, runs every variant N times in rounds (recipe, fast, ..., recipe, fast, ...) and reports
     each one's median run, with the tokens/s of every round;
  5. prints and writes (`--out`/throughput.md and .json) a table: real tokens/s (steady state, the first 3
     steps left out, as the recipe does), ratio to the recipe, peak allocated and reserved GPU memory, the
     split and kernels each used, and the largest relative gap between its loss curve and the recipe's at
     the steps both logged (every 5 steps: the mean loss of those 5 steps).
A variant that fails is reported as failed with its last error line; the others still run.

The peer, Unsloth (issue #15): `--unsloth ../shared/bench/unsloth_recipe.py` (not copied here) adds its variants
(`unsloth`: its offloaded checkpointing, `unsloth_ckpt`: plain checkpointing, `unsloth_nockpt`: none), run with
`--unsloth-path` first on PYTHONPATH (Unsloth pins its own trl and datasets); `--budgets 8,24,32,none` adds
qlora_exp's `budget_B` variants (`trainer.memory_budget_gb=B`, the memory plan choosing the split) and prints the
budget table: at each budget, qlora_exp's fastest run whose peak fits against Unsloth's fastest that fits, medians
of the rounds. `--dropout 0` is Unsloth's fast path; the comparison is at the same dropout for both.

    python bench/throughput.py --recipe .gpu/seed_recipe.py --unsloth .gpu/unsloth_recipe.py \
        --unsloth-path /tmp/site_uns --budgets 8,24,32,none --dropout 0 --repeat 3 --steps 20 \
        --variants recipe,unsloth,unsloth_ckpt,unsloth_nockpt
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # qlora_exp.memory, for the plan's estimate at the micro-batches seen

# name -> qlora_exp overrides on top of the common ones (trainer=article: 8 examples per step, max length 1024)
VARIANTS = {
    # the recipe's settings, through qlora_exp: no packing, batch 2 x 4, checkpointing, no fused kernels
    "runner_as_written": ["trainer.packing=false", "trainer.fused_kernels=false", "trainer.micro_batch_size=null",
                          "trainer.gradient_checkpointing=true", "trainer.memory_budget_gb=null",
                          "quantization.upcast_frozen=true"],
    # the shipped defaults of trainer=article: packing, fused kernels, split and checkpointing from 24 GiB
    "fast": [],
    # the shipped defaults but the frozen weights upcast to fp32 as the article does
    "fast_upcast": ["quantization.upcast_frozen=true"],
    # the same, the split fixed by hand (what the memory plan chooses between)
    "fast_m8_ckpt": ["trainer.micro_batch_size=8", "trainer.gradient_checkpointing=true", "trainer.memory_budget_gb=null"],
    "fast_m4_ckpt": ["trainer.micro_batch_size=4", "trainer.gradient_checkpointing=true", "trainer.memory_budget_gb=null"],
    "fast_m1_nockpt": ["trainer.micro_batch_size=1", "trainer.gradient_checkpointing=false",
                       "trainer.memory_budget_gb=null"],
    "fast_m2_nockpt": ["trainer.micro_batch_size=2", "trainer.gradient_checkpointing=false",
                       "trainer.memory_budget_gb=null"],
    "fast_ckpt24": ["trainer.checkpointed_layers=24", "trainer.memory_budget_gb=null", "trainer.micro_batch_size=8",
                    "trainer.gradient_checkpointing=true"],
    "fast_ckpt16": ["trainer.checkpointed_layers=16", "trainer.memory_budget_gb=null", "trainer.micro_batch_size=8",
                    "trainer.gradient_checkpointing=true"],
    "fast_m8_nockpt": ["trainer.micro_batch_size=8", "trainer.gradient_checkpointing=false", "trainer.memory_budget_gb=null"],
    "fast_m8_ckpt_flat": ["trainer.micro_batch_size=8", "trainer.gradient_checkpointing=true",
                          "trainer.memory_budget_gb=null", "trainer.packing_layout=flat"],
    "fast_m8_ckpt_nofused": ["trainer.micro_batch_size=8", "trainer.gradient_checkpointing=true",
                             "trainer.memory_budget_gb=null", "trainer.fused_kernels=false"],
}
RECIPE_VARIANTS = {"recipe": [], "recipe_best_24g": ["--packing", "--bs", "8", "--accum", "1", "--liger"]}
# the peer (../shared/bench/unsloth_recipe.py): 8 examples in one micro-batch, its three checkpointing choices
UNSLOTH_VARIANTS = {"unsloth": ["--ckpt", "unsloth"], "unsloth_ckpt": ["--ckpt", "true"],
                    "unsloth_nockpt": ["--ckpt", "none"]}
# trainer.engine=unsloth: qlora_exp's trial with Unsloth loading the base and attaching the adapters (run with
# --unsloth-path first on PYTHONPATH); a choice for users, not counted as qlora_exp's in the budget table
ENGINE_VARIANTS = {"engine_unsloth": ["trainer.engine=unsloth"],
                   "engine_unsloth_nockpt": ["trainer.engine=unsloth", "trainer.micro_batch_size=8",
                                             "trainer.gradient_checkpointing=false", "trainer.memory_budget_gb=null"]}
VARIANTS.update(ENGINE_VARIANTS)
FULL_LENGTH = ("recipe", "runner_as_written", "fast", *UNSLOTH_VARIANTS, *ENGINE_VARIANTS)  # the others run --explore-steps


# the levers of issue #15, each a variant of every budget: budget_24_offload, budget_24_compile, ...
LEVERS = {"offload": ["trainer.offload_checkpoints=true"], "compile": ["trainer.compile_layers=true"],
          "offload_compile": ["trainer.offload_checkpoints=true", "trainer.compile_layers=true"]}


def budget_variants(budgets: str, levers: str = "") -> dict[str, list[str]]:
    """`8,24,none` -> {"budget_8": ["trainer.memory_budget_gb=8"], ...}: the memory plan picks the split in each;
    with levers `offload`, also budget_8_offload (the same budget with trainer.offload_checkpoints=true), ..."""
    out = {}
    for b in (x.strip() for x in budgets.split(",") if x.strip()):
        if b != "none" and not b.replace(".", "", 1).isdigit():
            sys.exit(f"error: --budgets={budgets}: {b!r} is not accepted: GiB numbers or none")
        out[f"budget_{b}"] = [f"trainer.memory_budget_gb={'null' if b == 'none' else b}"]
        for lever in (x.strip() for x in levers.split(",") if x.strip()):
            if lever not in LEVERS:
                sys.exit(f"error: --levers={levers}: {lever!r} is not accepted: one of {', '.join(LEVERS)}")
            out[f"budget_{b}_{lever}"] = [*out[f"budget_{b}"], *LEVERS[lever]]
    return out


def budget_table(results: dict, runs: dict, budgets: str) -> list[str]:
    """At each budget: qlora_exp's fastest variant whose peak fits it against Unsloth's fastest that fits (medians
    of the rounds), with every round's tokens/s."""
    lines = ["", "| budget GiB | qlora_exp: best run that fits | tokens/s (median) | peak GiB | Unsloth: best that fits | "
             "tokens/s (median) | peak GiB | qlora_exp / Unsloth | rounds: qlora_exp / Unsloth |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for b in (x.strip() for x in budgets.split(",") if x.strip()):
        cap = float("inf") if b == "none" else float(b)

        def best(names, cap=cap):
            ok = [(n, results[n]) for n in names if results.get(n, {}).get("status") == "complete"
                  and results[n]["peak_gb"] <= cap]
            return max(ok, key=lambda nr: nr[1]["tokens_per_s"], default=(None, None))
        ours, o = best([n for n in results if n not in UNSLOTH_VARIANTS and n not in RECIPE_VARIANTS
                        and n not in ENGINE_VARIANTS])
        theirs, t = best([n for n in results if n in UNSLOTH_VARIANTS])
        cell = lambda n, r: (n, f"{r['tokens_per_s']:.0f}", f"{r['peak_gb']:.2f}") if r else ("none fits", "-", "-")  # noqa: E731
        ratio = f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}" if o and t else "-"
        each = lambda n: ", ".join(f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "failed"  # noqa: E731
                                   for r in runs.get(n, [])) if n else "-"
        lines.append(f"| {b} | {' | '.join(cell(ours, o))} | {' | '.join(cell(theirs, t))} | {ratio} | "
                     f"{each(ours)} / {each(theirs)} |")
    return lines


def load_recipe(path: Path):
    spec = importlib.util.spec_from_file_location("seed_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(cmd, log: Path, timeout: int, env=None) -> tuple[int, str]:
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    text = log.read_text(errors="replace")
    print(f"  [{time.time() - t0:5.0f} s] rc {rc}: {' '.join(map(str, cmd))[:160]}", flush=True)
    return rc, text


def last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "Error" in ln or "error:" in ln]
    return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else "no output")[:200]


def recipe_losses(text: str) -> list[list[float]]:
    """The trainer's printed logs: {'loss': '11.93', ...} every logging_steps=5 steps."""
    losses = [float(m) for m in re.findall(r"'loss': '?([0-9.]+(?:e[-+]?\d+)?)'?", text)]
    return [[5 * (i + 1), v] for i, v in enumerate(losses)]


def curve_gap(a: list, b: list) -> float | None:
    """Largest relative gap between two [[step, loss], ...] curves at the steps both have."""
    bd = dict((int(s), v) for s, v in b)
    gaps = [abs(v - bd[int(s)]) / abs(bd[int(s)]) for s, v in a if int(s) in bd and int(s) > 1]
    return max(gaps) if gaps else None


def write_rows(seed, shape: str, steps: int, data: Path) -> None:
    """The recipe's own rows (its make_data, same count and seed) and 16 held-out rows, as input_ids JSON lines."""
    data.mkdir(parents=True, exist_ok=True)
    vocab = seed.SHAPES[shape]["vocab_size"]
    train = seed.make_data(steps * 2 * 4 * 2 + 64, 1024, vocab)  # the recipe's call: steps x bs x accum x 2 + 64
    held = seed.make_data(16, 1024, vocab, seed=1)
    for rows, f in ((train, data / "train.jsonl"), (held, data / "eval.jsonl")):
        with open(f, "w") as fh:
            for r in rows:
                fh.write(json.dumps({"input_ids": r["input_ids"]}) + "\n")


def median_run(rs: list[dict]) -> dict:
    """The run of median tokens/s among a variant's repeats, with every repeat's tokens/s."""
    done = sorted((r for r in rs if r["status"] == "complete"), key=lambda r: r["tokens_per_s"])
    if not done:
        return rs[-1]
    return {**done[(len(done) - 1) // 2], "repeats": [r.get("tokens_per_s") for r in rs]}


def round_ratios(r: dict, base: dict) -> str:
    """Tokens/s over the recipe's of the same round (the same machine state), round by round."""
    ours, theirs = r.get("repeats", [r.get("tokens_per_s")]), base.get("repeats", [base.get("tokens_per_s")])
    return ", ".join(f"{a / b:.2f}" if a and b else "-" for a, b in zip(ours, theirs, strict=False))


def trial_run(name: str, steps: int, common: list, a, suffix: str = "") -> dict:
    run_dir = a.out / (name + suffix)
    extra = []
    if name in a.profile.split(","):
        extra = ["+callbacks.profile._target_=bench.profile_steps.ProfileSteps",
                 f"+callbacks.profile.out={a.out / (name + '.profile.txt')}"]
    rc, text = run([sys.executable, "-m", "qlora_exp", *common, f"trainer.max_steps={steps}", *VARIANTS[name],
                    *extra, f"hydra.run.dir={run_dir}"], a.out / f"{name}{suffix}.log", a.timeout,
                   env={"TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(
                       p for p in (a.unsloth_path if name in ENGINE_VARIANTS else "", str(REPO),
                                   os.environ.get("PYTHONPATH", "")) if p)})
    m = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    if rc or m.get("status") != "complete":
        return {"status": "failed", "error": m.get("error") or last_error(text)}
    return {"status": "complete", "tokens_per_s": m["steady_tokens_per_s"], "peak_gb": m["peak_memory_gb"],
            "reserved_gb": m.get("peak_memory_reserved_gb"), "split": f"{m['micro_batch_size']} x {m['grad_accum']}",
            "ckpt": checkpointing(m), "packing": m["packing"],
            "fused": m["engine"] if m.get("engine", "hf") != "hf" else m["fused_kernels"].split(":")[0],
            "steps": m["steps"], "loss_history": m["loss_history"], "memory_plan": m.get("memory_plan"),
            "eval_loss": m["eval_loss"], "largest_micro_batch": m.get("largest_micro_batch_tokens"),
            "estimate_seen_gb": seen_estimate(run_dir, m)}


def seen_line(r: dict) -> str:
    """The plan's estimate at the longest micro-batch seen, against the measured peak."""
    if not r.get("estimate_seen_gb"):
        return ""
    return (f"; longest micro-batch {r['largest_micro_batch']:,} tokens: estimated {r['estimate_seen_gb']:.2f} GiB, "
            f"measured {r['peak_gb']:.2f} ({r['estimate_seen_gb'] / r['peak_gb'] - 1:+.0%})")


def seen_estimate(run_dir: Path, m: dict) -> float | None:
    """The memory plan's estimate for the longest micro-batch the trial trained, at the depth it recomputed (what
    the measured peak is compared with: the plan itself budgets for the worst, micro-batch x max_length)."""
    from omegaconf import OmegaConf

    from qlora_exp.memory import estimate_gb

    tokens = m.get("largest_micro_batch_tokens")
    if not tokens or not (run_dir / "config.yaml").exists():
        return None
    cfg = OmegaConf.load(run_dir / "config.yaml")
    layers = cfg.model.shape.num_hidden_layers
    depth = (m["recomputed_layers"]["max"] if m.get("recomputed_layers") else 0 if not m["gradient_checkpointing"]
             else m.get("checkpointed_layers") or layers)
    return round(estimate_gb(cfg, m["micro_batch_size"], depth, fused=m["fused_kernels"].startswith("liger"),
                             offload=bool(m.get("offload_checkpoints")), tokens=tokens), 2)


def checkpointing(m: dict) -> str:
    """A trial's checkpointing as the table shows it: off, every layer or N layers."""
    if not m["gradient_checkpointing"]:
        out = "off"
    else:
        out = "every layer" if m.get("checkpointed_layers") is None else f"{m['checkpointed_layers']} layers"
        if m.get("recomputed_layers"):  # the plan's depth is the worst micro-batch's: each recomputed what it needed
            seen = m["recomputed_layers"]
            out = f"{seen['min']}-{seen['max']} layers (mean {seen['mean']:.1f})"
        out += ", offloaded" if m.get("offload_checkpoints") else ""
    return out + (", compiled" if m.get("compile_layers") else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, type=Path, help="../shared/bench/seed_recipe.py (not copied here)")
    ap.add_argument("--shape", default="llama3-8b", help="a shape the recipe knows: llama3-8b, llama-1b, tiny")
    ap.add_argument("--model", default="llama3_8b", help="the qlora_exp model config of that shape")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the loss curves: 30)")
    ap.add_argument("--explore-steps", type=int, default=14, help="steps for the fast_* variants other than fast")
    ap.add_argument("--variants", default="recipe,runner_as_written,fast",
                    help=f"comma list of {', '.join([*RECIPE_VARIANTS, *VARIANTS])}")
    ap.add_argument("--profile", default="", help="comma list of variants to profile (steps 5-6) with torch.profiler")
    ap.add_argument("--set", action="append", default=[], help="extra qlora_exp override for every variant")
    ap.add_argument("--recipe-arg", action="append", default=[], help="extra recipe argument (e.g. --optim=adamw_torch)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "throughput")
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every variant; the table shows each one's median")
    ap.add_argument("--unsloth", type=Path, help="../shared/bench/unsloth_recipe.py: the peer's variants")
    ap.add_argument("--unsloth-path", default="", help="put first on PYTHONPATH for the peer's runs (its site)")
    ap.add_argument("--budgets", default="", help="comma list of GiB (or none): budget_B variants and the budget table")
    ap.add_argument("--levers", default="", help=f"comma list of {', '.join(LEVERS)}: budget_B_<lever> variants too")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of qlora_exp's and Unsloth's runs")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    budgeted = budget_variants(a.budgets, a.levers)
    VARIANTS.update(budgeted)
    names = [v for v in a.variants.split(",") if v]
    if not any(v in budgeted for v in names):  # every budget variant, unless --variants names those to run
        names += list(budgeted)
    known = [*RECIPE_VARIANTS, *VARIANTS, *UNSLOTH_VARIANTS]
    unknown = [v for v in names if v not in known]
    if unknown:
        sys.exit(f"error: --variants={','.join(unknown)} is not accepted: one of {', '.join(known)}")
    if any(v in UNSLOTH_VARIANTS for v in names) and not a.unsloth:
        sys.exit("error: --variants names an Unsloth run but --unsloth (its script) is not given")

    seed = load_recipe(a.recipe.resolve())
    model_dir = Path(f"/tmp/model-{a.shape}")  # where the recipe script builds and keeps its model
    env_info = environment()
    print(json.dumps(env_info), flush=True)
    results: dict[str, dict] = {}

    def recipe_run(name, steps, suffix=""):
        rc, text = run([sys.executable, str(a.recipe.resolve()), "--shape", a.shape, "--steps", str(steps),
                        *RECIPE_VARIANTS[name], *a.recipe_arg], a.out / f"{name}{suffix}.log", a.timeout)
        line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{\"shape\"")), None)
        if rc or not line:
            return {"status": "failed", "error": last_error(text)}
        rec = json.loads(line)
        return {"status": "complete", "tokens_per_s": rec["real_tok_s"], "peak_gb": rec["peak_gib"],
                "reserved_gb": rec["reserved_gib"], "split": f"{rec['bs']} x {rec['accum']}", "ckpt": rec["ckpt"],
                "packing": "trl bfd" if rec["packing"] else "off", "fused": "liger" if rec["liger"] else "off",
                "steps": steps, "loss_history": recipe_losses(text), "raw": rec}

    def unsloth_run(name, steps, suffix=""):
        path = os.pathsep.join(p for p in (a.unsloth_path, os.environ.get("PYTHONPATH", "")) if p)
        rc, text = run([sys.executable, str(a.unsloth.resolve()), "--recipe", str(a.recipe.resolve()), "--shape", a.shape,
                        "--steps", str(steps), "--bs", "8", "--accum", "1", "--dropout", str(a.dropout),
                        *UNSLOTH_VARIANTS[name]], a.out / f"{name}{suffix}.log", a.timeout, env={"PYTHONPATH": path})
        line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{\"peer\"")), None)
        if rc or not line:
            return {"status": "failed", "error": last_error(text)}
        rec = json.loads(line)
        return {"status": "complete", "tokens_per_s": rec["real_tok_s"], "peak_gb": rec["peak_gib"],
                "reserved_gb": rec["reserved_gib"], "split": f"{rec['bs']} x {rec['accum']}",
                "ckpt": {"unsloth": "offloaded", "true": "every layer", "none": "off"}[rec["ckpt"]],
                "packing": "padding-free" if rec.get("padding_free") else "off", "fused": f"unsloth {rec['version']}",
                "steps": steps, "loss_history": recipe_losses(text), "raw": rec}

    # 1. the recipe builds the model folder on first use (its make_model when no recipe run is asked for); 2. its
    # rows, pre-tokenized, for qlora_exp
    if not any(n in RECIPE_VARIANTS for n in names) and not (model_dir / "config.json").exists():
        t0 = time.time()
        seed.make_model(a.shape, str(model_dir))
        print(f"  [{time.time() - t0:5.0f} s] built {model_dir} (the recipe's make_model)", flush=True)
    data = a.out / "data"
    common = [f"model={a.model}", f"model.name_or_path={model_dir}", "model.random_init=false", "data=jsonl",
              f"data.train_path={data / 'train.jsonl'}", f"data.eval_path={data / 'eval.jsonl'}",
              "data.assistant_only_loss=false", "trainer=article", "trainer.max_length=1024", "trainer.epochs=1",
              "trainer.eval_every=100000", "trainer.log_every=5", "trainer.save_adapter=false",
              "optimizer=paged_adamw_32bit", "optimizer.lr=2e-4", "lora.r=16", "lora.alpha=32", f"lora.dropout={a.dropout}",
              "lora.target_modules=all_linear", "quantization=nf4", "hydra/sweeper=basic", *a.set]
    runs: dict[str, list[dict]] = {}
    for round_ in range(a.repeat):  # rounds of every variant in turn: drift of the machine hits them all alike
        for name in names:
            steps = a.steps if name in FULL_LENGTH else a.explore_steps
            if name in RECIPE_VARIANTS:
                r = recipe_run(name, steps, suffix=f"-{round_}" if a.repeat > 1 else "")
            elif name in UNSLOTH_VARIANTS:
                r = unsloth_run(name, steps, suffix=f"-{round_}" if a.repeat > 1 else "")
            else:
                if not (data / "train.jsonl").exists():
                    if not (model_dir / "config.json").exists():
                        sys.exit(f"error: the recipe did not build {model_dir}: see {a.out}")
                    write_rows(seed, a.shape, a.steps, data)
                r = trial_run(name, steps, common, a, suffix=f"-{round_}" if a.repeat > 1 else "")
            runs.setdefault(name, []).append(r)
            results[name] = median_run(runs[name])
            print(f"  {name} (round {round_ + 1}): {json.dumps(r)}"[:300], flush=True)
            (a.out / "throughput.json").write_text(json.dumps({"environment": env_info, "results": results}, indent=1))

    # 4. the table
    base = results.get("recipe", {})
    lines = [f"{env_info['gpu']}, torch {env_info['torch']}, transformers {env_info['transformers']}, peft "
             f"{env_info['peft']}, bitsandbytes {env_info['bitsandbytes']}, trl {env_info['trl']}, "
             f"liger-kernel {env_info['liger_kernel']}, {env_info['date']}; shape {a.shape}, {a.steps} steps "
             f"(fast_* variants other than fast: {a.explore_steps})", "",
             "| run | real tokens/s | vs recipe | peak allocated GiB | peak reserved GiB | micro x accum | "
             "checkpointing | packing | fused kernels | loss curve vs recipe (max rel. gap) | tokens/s of each round | "
             "vs recipe, each round |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: | --- | --- |"]
    for name, r in results.items():
        if r["status"] != "complete":
            lines.append(f"| {name} | failed: {r['error'][:120]} | | | | | | | | | | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None
        gap = curve_gap(r["loss_history"], base.get("loss_history", [])) if name != "recipe" else None
        gib = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {f'{ratio:.2f}' if ratio else '-'} | {gib(r['peak_gb'])} | "
                     f"{gib(r['reserved_gb'])} | {r['split']} | {r['ckpt'] if isinstance(r['ckpt'], str) else 'on' if r['ckpt'] else 'off'} | {r['packing']} | "
                     f"{r['fused']} | {f'{gap:.2%}' if gap is not None else '-'} | "
                     f"{', '.join(f'{v:.0f}' if v else 'failed' for v in r.get('repeats', [r['tokens_per_s']]))} | "
                     f"{round_ratios(r, base)} |")
    curves = {n: r.get("loss_history") for n, r in results.items() if r.get("loss_history")}
    lines += ["", "Loss every 5 steps (mean of those steps): " + json.dumps(
        {n: [[s, round(v, 4)] for s, v in c if s % 5 == 0] for n, c in curves.items()})]
    plans = {n: r["memory_plan"] for n, r in results.items() if r.get("memory_plan")}
    if plans:
        lines += ["", *(f"- {n}: {p}{seen_line(results[n])}" for n, p in plans.items())]
    if a.budgets:
        lines += budget_table(results, runs, a.budgets)
    table = "\n".join(lines)
    (a.out / "throughput.md").write_text(table + "\n")
    (a.out / "throughput.json").write_text(json.dumps({"environment": env_info, "results": results}, indent=1))
    print("\n" + table)


def environment() -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else "no GPU"
    return {"gpu": gpu or "no GPU", "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
            **{p.replace("-", "_"): version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "trl",
                                                          "accelerate", "liger-kernel", "datasets")}}


if __name__ == "__main__":
    main()
