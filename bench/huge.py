"""Huge models on one GPU: the Llama-3-70B shape built straight into 4 bits and trained, and the 8B's load from
the quantized-base cache against its load from bf16 safetensors, in one machine run.

    python bench/huge.py --recipe ../shared/bench/seed_recipe.py --out /tmp/huge       # GPU (one H200)
    python bench/huge.py --recipe ../shared/bench/seed_recipe.py --only 8b --steps 3   # the 8B part alone

Every run is `python -m qlora_exp` in its own process, on the recipe's own rows (its `make_data`, as
bench/throughput.py writes them: lognormal lengths up to 1024 tokens), with the recipe's LoRA (r16, the seven
projections), optimizer and 8 examples per step (trainer=article); each reports from its metrics.json:
  70b: model=llama3_70b model.random_init=true (model.random_build=quantized): the build (each weight drawn
       on the GPU and quantized before the next), then the trial under trainer.memory_budget_gb; peak
       allocated memory, steady tokens/s, the memory plan's estimate, the disk the 4-bit checkpoint takes;
  8b:  model=llama3_8b model.random_init=true, three trials: with quantization.cache=true the first time (it
       builds the bf16 model, quantizes it and saves the NF4 checkpoint), from bf16 safetensors (quantized at
       load, as every trial does by default) and with the cache again (it loads the NF4 checkpoint);
       load-to-first-step of each (process start to the first optimizer step, and the base load alone), and
       the disk each takes.
Results go to --out/huge.json as they come (a run cut short leaves what it measured) and a table at the end.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from throughput import load_recipe, write_rows  # noqa: E402  (the same rows as the throughput benchmark)


def du_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**30


def trial(name: str, overrides: list, a, common: list) -> dict:
    run_dir = a.out / name
    start = time.time()
    profiler = ["-m", "cProfile", "-o", str((a.profile / f"{name}.prof").resolve())] if a.profile else []
    proc = subprocess.run([sys.executable, *profiler, "-m", "qlora_exp", *common, *overrides, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=a.timeout,
                          env={**os.environ, "TQDM_DISABLE": "1",
                               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    (a.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    m = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    r = {"status": m.get("status", "failed"), "wall_s": round(time.time() - start, 1), "error": m.get("error")
         or (proc.stderr.strip().splitlines() or [""])[-1][:300]}
    for key in ("peak_memory_gb", "peak_memory_reserved_gb", "steady_tokens_per_s", "base_load_s", "base_from",
                "micro_batch_size", "grad_accum", "checkpointed_layers", "memory_plan", "steps", "loss_history",
                "phase_s", "trainable_params", "total_params"):
        r[key] = m.get(key)
    if m.get("first_step_at") and m.get("process_started_at"):
        r["start_to_first_step_s"] = round(m["first_step_at"] - m["process_started_at"], 1)
    print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'loss_history'})[:600]}", flush=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, type=Path, help="../shared/bench/seed_recipe.py (its make_data)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "huge")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--budget", type=float, default=48.0, help="trainer.memory_budget_gb of the 70B trial")
    ap.add_argument("--only", default="70b,8b")
    ap.add_argument("--timeout", type=int, default=480)
    ap.add_argument("--big", default="llama3_70b", help="the model config of the huge trial (tiny: a CPU smoke run)")
    ap.add_argument("--small", default="llama3_8b", help="the model config of the cache comparison")
    ap.add_argument("--shape", default="llama3-8b", help="the recipe's shape whose vocabulary the rows use")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before each 8B load after the first (root): loads from a cold disk")
    ap.add_argument("--set", action="append", default=[], help="an extra override for every run (trainer.precision=auto)")
    ap.add_argument("--profile", type=Path, help="run each trial under cProfile, writing <this folder>/<run>.prof")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.profile:
        a.profile.mkdir(parents=True, exist_ok=True)
    cache = a.out / "cache"
    data = a.out / "data"
    write_rows(load_recipe(a.recipe.resolve()), a.shape, max(a.steps, 8), data)  # the 70B has the 8B's vocab
    common = ["data=jsonl", f"data.train_path={data / 'train.jsonl'}", f"data.eval_path={data / 'eval.jsonl'}",
              "data.max_eval_rows=8", "data.assistant_only_loss=false", "trainer=article", "trainer.max_length=1024",
              "trainer.eval_every=100000", "trainer.log_every=1", "trainer.save_adapter=false",
              "optimizer=paged_adamw_32bit", "optimizer.lr=2e-4", "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
              "lora.target_modules=all_linear", "quantization=nf4", f"paths.cache_dir={cache}", "hydra/sweeper=basic",
              f"trainer.max_steps={a.steps}", *a.set]
    results: dict = {}

    def save():
        (a.out / "huge.json").write_text(json.dumps(results, indent=1))

    if "70b" in a.only:
        results["70b"] = trial(f"70b_{a.budget:g}gib", [f"model={a.big}", "model.random_init=true", "model.random_build=quantized",
                                       f"trainer.memory_budget_gb={a.budget}"], a, common)
        built = next((cache / "models").glob(f"{a.big}-nf4-*"), None)
        results["70b"]["disk_gib"] = round(du_gib(built), 2) if built else None
        save()
        if built and "8b" in a.only:
            shutil.rmtree(built)  # the 8B part needs the disk
    if "8b" in a.only:
        eight = [f"model={a.small}", "model.random_init=true", "model.random_build=full"]
        # the first builds the bf16 model too (its time is not a load's); the next two load what is on disk
        for name, extra in (("8b_cache_first", ["quantization.cache=true"]), ("8b_from_bf16", []),
                            ("8b_from_cache", ["quantization.cache=true"])):
            if a.drop_caches and name != "8b_cache_first":
                subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
                name += "_cold"
            results[name] = trial(name, [*eight, *extra], a, common)
            save()
        full = next((p for p in (cache / "models").glob(f"{a.small}-*") if "-nf4-" not in p.name), None)
        quant = next((cache / "quantized").glob("*"), None)
        results["disk"] = {"8b_bf16_gib": round(du_gib(full), 2) if full else None,
                           "8b_nf4_cache_gib": round(du_gib(quant), 2) if quant else None}
        save()
    print(json.dumps(results, indent=1)[:4000])


if __name__ == "__main__":
    main()
