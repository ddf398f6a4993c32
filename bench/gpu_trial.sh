#!/usr/bin/env bash
# The trial runner on the Llama-3-8B shape (random weights), timed next to the article's recipe,
# in one machine run. Results: docs/benchmarks.md ("GPU: the trial runner on the Llama-3-8B shape").
#
#   bash bench/gpu_trial.sh                                   # on the GPU machine (from the repo root)
#   MODEL=tiny PRECISION=fp32 STEPS=2 N_TRAIN=20 N_EVAL=4 RUN_RECIPE=0 bash bench/gpu_trial.sh   # CPU dry run
#
# What it does:
#   0. installs the wheels in .whl/ (bitsandbytes, trl, datasets, hydra-core, omegaconf, antlr4, dill,
#      multiprocess) into /tmp/site unless SKIP_INSTALL=1; torch and transformers are the machine's;
#   1. the recipe as written: python3 .gpu_bench/seed_recipe.py --shape llama3-8b --steps $STEPS
#      (a copy of ../shared/bench/seed_recipe.py; its one JSON line goes to $OUT/recipe.json);
#   2. synthetic instruction/response rows whose chat-templated length in tokens of the random-init
#      model's tokenizer is lognormal, median 600, sigma 0.6 (the recipe's law), clipped at max length;
#   3. python3 -m qlora_exp model=llama3_8b model.random_init=true trainer=article optimizer=paged_adamw_32bit
#      trainer.precision=bf16 data=jsonl ... with a step clock callback (steady-state tokens/s, reserved memory);
#      (hydra/sweeper=basic: one trial needs no sweeper, so optuna and submitit need not be installed there);
#   4. a table of both in $OUT/summary.md; metrics.json, config.yaml and the trial's log go to $OUT too.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WORK=${WORK:-/tmp/qlora_gpu}                 # data, trial folder and model cache (~16 GB for the 8B shape)
OUT=${OUT:-$WORK/out}
MODEL=${MODEL:-llama3_8b}
STEPS=${STEPS:-14}
PRECISION=${PRECISION:-bf16}
N_TRAIN=${N_TRAIN:-200}
N_EVAL=${N_EVAL:-16}
MAX_LEN=${MAX_LEN:-1024}
RUN_RECIPE=${RUN_RECIPE:-1}
RECIPE_TIMEOUT=${RECIPE_TIMEOUT:-240}
TRIAL_TIMEOUT=${TRIAL_TIMEOUT:-300}
mkdir -p "$WORK" "$OUT" "$WORK/py"
rm -rf "$WORK/trial" "$WORK/data"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=${HF_HOME:-$WORK/hf} PYTHONUNBUFFERED=1 QLORA_EXP_ROOT=$WORK

# ---- 0. wheels --------------------------------------------------------------------------------
if [ "${SKIP_INSTALL:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=$REPO:/tmp/site:$WORK/py${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO:$WORK/py${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== environment"
date -u +%Y-%m-%dT%H:%M:%SZ
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "hydra", "omegaconf",
          "tokenizers", "pyarrow", "huggingface_hub"):
    try:
        print(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{m} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF
df -h /tmp | tail -1

# ---- helpers written on the spot ---------------------------------------------------------------
cat > "$WORK/py/gpu_bench_clock.py" <<'EOF'
"""A Trainer callback: per-optimizer-step wall time and real tokens, plus peak CUDA memory, as JSON."""
import json
import time

from transformers import TrainerCallback


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    def __init__(self, path: str, skip: int = 3):
        self.path, self.skip = path, skip
        self.times, self.tokens, self._t, self._tok = [], [], None, 0

    def on_step_begin(self, args, state, control, **kw):
        _sync()
        self._t, self._tok = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        _sync()
        self.times.append(time.perf_counter() - self._t)
        self.tokens.append(state.num_input_tokens_seen - self._tok)

    def on_train_end(self, args, state, control, **kw):
        import torch
        n = len(self.times)
        k = self.skip if n > 2 * self.skip else 0          # the recipe's rule: drop 3 warm-up steps when > 6
        st, sk = sum(self.times[k:]), sum(self.tokens[k:])
        out = dict(steps=n, step_times_s=[round(t, 3) for t in self.times], step_tokens=self.tokens,
                   skipped_warmup_steps=k, steady_step_s=round(st / max(n - k, 1), 3),
                   steady_tokens_per_s=round(sk / st, 1) if st else None,
                   all_steps_tokens_per_s=round(sum(self.tokens) / sum(self.times), 1) if self.times else None,
                   rows_per_step=args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if torch.cuda.is_available():
            out.update(peak_allocated_gib_at_train_end=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                       peak_reserved_gib_at_train_end=round(torch.cuda.max_memory_reserved() / 2**30, 3))
        with open(self.path, "w") as f:
            json.dump(out, f, indent=2)
EOF

cat > "$WORK/py/gpu_bench_data.py" <<'EOF'
"""Synthetic instruction/response rows with lognormal lengths in tokens of the random-init model's tokenizer.

The tokenizer is built exactly as qlora_exp.models.random_model_dir builds it (same function, corpus and
vocabulary size: min(vocab, 512)), so each row's chat-templated length can be set to its target.
Usage: python gpu_bench_data.py OUT_DIR N_TRAIN N_EVAL MAX_LEN VOCAB
"""
import json
import math
import random
import re
import sys
import tempfile
from pathlib import Path

from qlora_exp import PROJECT_DIR
from qlora_exp.models import build_tokenizer

out, n_train, n_eval, max_len, vocab = Path(sys.argv[1]), *map(int, sys.argv[2:6])
out.mkdir(parents=True, exist_ok=True)
corpus = PROJECT_DIR / "data" / "tiny_instruct" / "train.jsonl"
tok = build_tokenizer(Path(tempfile.mkdtemp()), corpus, min(vocab, 512))
words = sorted(set(re.findall(r"[A-Za-z]+", corpus.read_text())))
rng = random.Random(0)


def n_tokens(instr, resp):
    msgs = [{"role": "user", "content": instr}, {"role": "assistant", "content": resp}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return len(ids)


def row(target):
    """Words drawn at random; the response grows or shrinks until the templated row has `target` tokens."""
    instr = " ".join(rng.choice(words) for _ in range(max(3, target // 40)))
    resp = [rng.choice(words) for _ in range(max(1, target // 3))]
    for _ in range(40):
        n = n_tokens(instr, " ".join(resp))
        if n == target or (n < target and len(resp) and n_tokens(instr, " ".join(resp + ["a"])) > target):
            break
        if n < target:
            resp += [rng.choice(words) for _ in range(max(1, (target - n) // 3))]
        else:
            del resp[-max(1, (n - target) // 3):]
    return {"instruction": instr, "response": " ".join(resp)}, n_tokens(instr, " ".join(resp))


stats = {}
for split, n in (("train", n_train), ("eval", n_eval)):
    lens = []
    with open(out / f"{split}.jsonl", "w") as f:
        for _ in range(n):
            # the recipe's law: lognormal, median 600, sigma 0.6, clipped to [32, max length]
            target = int(min(max(math.exp(rng.gauss(math.log(600), 0.6)), 32), max_len))
            r, got = row(target)
            lens.append(got)
            f.write(json.dumps(r) + "\n")
    s = sorted(lens)
    stats[split] = dict(rows=n, mean_tokens=round(sum(s) / n, 1), median_tokens=s[n // 2], min=s[0], max=s[-1])
stats["tokenizer_vocab"] = len(tok)
stats["words"] = len(words)
print(json.dumps(stats))
(out / "stats.json").write_text(json.dumps(stats, indent=2))
EOF

# ---- 1. the recipe as written -----------------------------------------------------------------
if [ "$RUN_RECIPE" = 1 ]; then
  echo "== 1. recipe: python3 seed_recipe.py --shape llama3-8b --steps $STEPS"
  t0=$(date +%s)
  (cd .gpu_bench && timeout "$RECIPE_TIMEOUT" python3 seed_recipe.py --shape llama3-8b --steps "$STEPS") \
    2>&1 | tee "$WORK/recipe.log"
  grep '^{"shape"' "$WORK/recipe.log" | tail -1 > "$OUT/recipe.json"
  echo "recipe wall $(( $(date +%s) - t0 )) s"
  rm -rf /tmp/model-llama3-8b /tmp/out            # 16 GB of disk back
fi

# ---- 2. data ----------------------------------------------------------------------------------
echo "== 2. synthetic rows"
VOCAB=$(python3 -c "import yaml,sys; print(yaml.safe_load(open('conf/model/$MODEL.yaml'))['shape']['vocab_size'])")
python3 "$WORK/py/gpu_bench_data.py" "$WORK/data" "$N_TRAIN" "$N_EVAL" "$MAX_LEN" "$VOCAB" || exit 4

# ---- 3. the trial -----------------------------------------------------------------------------
echo "== 3. trial"
set -x
t0=$(date +%s)
timeout "$TRIAL_TIMEOUT" python3 -m qlora_exp model="$MODEL" model.random_init=true trainer=article \
  trainer.max_steps="$STEPS" trainer.eval_every=1000 trainer.max_length="$MAX_LEN" optimizer=paged_adamw_32bit \
  trainer.precision="$PRECISION" data=jsonl data.train_path="$WORK/data/train.jsonl" \
  data.eval_path="$WORK/data/eval.jsonl" data.assistant_only_loss=false \
  +callbacks.clock._target_=gpu_bench_clock.StepClock +callbacks.clock.path="$WORK/step_clock.json" \
  hydra.run.dir="$WORK/trial" hydra/sweeper=basic 2>&1 | tee "$WORK/trial_stdout.log"
trial_rc=${PIPESTATUS[0]}
set +x
echo "trial rc $trial_rc, wall $(( $(date +%s) - t0 )) s"
cp "$WORK/trial/metrics.json" "$OUT/metrics.json" 2>/dev/null
cp "$WORK/trial/config.yaml" "$OUT/config.yaml" 2>/dev/null
cp "$WORK/trial/__main__.log" "$OUT/trial.log" 2>/dev/null

# ---- 4. summary -------------------------------------------------------------------------------
echo "== 4. summary"
python3 - "$WORK" "$OUT" <<'EOF' | tee "$OUT/summary.md"
import glob, json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])

def load(p):
    try:
        return json.loads(Path(p).read_text())
    except Exception:  # noqa: BLE001
        return {}

rec, met, clk, dat = load(out / "recipe.json"), load(work / "trial/metrics.json"), load(work / "step_clock.json"), \
    load(work / "data/stats.json")
# the trial's rows re-tokenized with the tokenizer the trial's model folder holds
tok_note = ""
dirs = sorted(glob.glob(str(work / "outputs/.cache/models/*/tokenizer.json")))
if dirs:
    from transformers import AutoTokenizer
    from qlora_exp.data import read_jsonl
    tok = AutoTokenizer.from_pretrained(str(Path(dirs[-1]).parent))
    lens = []
    for msgs in read_jsonl(str(work / "data/train.jsonl"), "train"):
        ids = tok.apply_chat_template(msgs, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        lens.append(min(len(ids), 1024))
    tok_note = f"train rows re-tokenized by the model folder's tokenizer: mean {sum(lens) / len(lens):.1f} tokens"
rows = clk.get("rows_per_step", 8)
steps = met.get("steps") or clk.get("steps")
seen_mean = met["train_tokens"] / (steps * rows) if met.get("train_tokens") and steps else None
f = lambda x, d=1: "-" if x is None else (f"{x:.{d}f}" if isinstance(x, (int, float)) else str(x))
print("| variant | real tokens/s | peak allocated GiB | reserved GiB | steps | mean real tokens/row |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
print(f"| recipe as written (seed_recipe.py, steady state, steps 4+) | {f(rec.get('real_tok_s'))} | "
      f"{f(rec.get('peak_gib'), 2)} | {f(rec.get('reserved_gib'), 2)} | {f(rec.get('steps'), 0)} | "
      f"{f(rec.get('mean_row_tokens'))} |")
print(f"| qlora_exp trial, metrics.json train_tokens_per_s (all steps) | {f(met.get('train_tokens_per_s'))} | "
      f"{f(met.get('peak_memory_gb'), 2)} | {f(clk.get('peak_reserved_gib_at_train_end'), 2)} | {f(steps, 0)} | "
      f"{f(seen_mean)} |")
print(f"| qlora_exp trial, steady state (steps {clk.get('skipped_warmup_steps', 0) + 1}+, step clock) | "
      f"{f(clk.get('steady_tokens_per_s'))} | {f(clk.get('peak_allocated_gib_at_train_end'), 2)} | "
      f"{f(clk.get('peak_reserved_gib_at_train_end'), 2)} | {f(steps, 0)} | {f(seen_mean)} |")
print()
print(f"trial: status {met.get('status')}, optimizer {met.get('optimizer')}, precision {met.get('precision')}, "
      f"device {met.get('device')}, eval_loss {met.get('initial_eval_loss')} -> {met.get('eval_loss')}, "
      f"train_time_s {met.get('train_time_s')}, wall_time_s {met.get('wall_time_s')}, "
      f"trainable {met.get('trainable_params')} / {met.get('total_params')}, error {met.get('error')}")
print(f"trial step times (s): {clk.get('step_times_s')}")
print(f"trial step tokens: {clk.get('step_tokens')}")
print(f"synthetic rows: {json.dumps(dat)}")
print(tok_note)
print(f"recipe: {json.dumps(rec)}")
EOF
cp "$WORK/step_clock.json" "$OUT/step_clock.json" 2>/dev/null
cp "$WORK/data/stats.json" "$OUT/data_stats.json" 2>/dev/null
exit "$trial_rc"
