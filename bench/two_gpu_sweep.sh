#!/usr/bin/env bash
# Two trials at once, one per GPU, through the local launcher (issue: SLURM/launchers, item 7).
# On a machine with 2 GPUs and no network; wheels carried in .whl/ (see README Notes):
#   bash bench/two_gpu_sweep.sh            # prints a table; copies logs to $OUT when set
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 QLORA_EXP_ROOT=/tmp/two_gpu
nvidia-smi --query-gpu=index,name,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
python3 -m qlora_exp -m lora.r=8,16,32,64 hydra.sweeper.n_jobs=2 trainer.max_steps=300 trainer.eval_every=100 \
  trainer.save_adapter=false 2>&1 | grep -E "HYDRA|Error|error" || true
sweep=$(ls -d /tmp/two_gpu/outputs/multirun/*/)
python3 bench/slot_report.py "$sweep" | tee /tmp/two_gpu/slots.md
if [ -n "${OUT:-}" ]; then
  cp /tmp/two_gpu/slots.md "$OUT/"; cp "$sweep/optimization_results.yaml" "$OUT/"
  tar czf "$OUT/trial_logs.tgz" -C "$sweep" --exclude='*.safetensors' --exclude=checkpoints . 2>/dev/null || true
fi
