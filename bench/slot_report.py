"""Print how a sweep's trials used its slots and GPUs: start, end, GPU, overlap. Reads the study.

    python bench/slot_report.py outputs/multirun/<study>
"""
import json
import sys
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from sweeper.storage import build_storage

folder = Path(sys.argv[1])
results = OmegaConf.load(folder / "optimization_results.yaml")
study = optuna.load_study(study_name=results.study_name, storage=build_storage(results.storage))
trials = sorted(study.trials, key=lambda t: t.datetime_start)
t0 = trials[0].datetime_start.timestamp()
print("| trial | lora.r | GPU (CUDA_VISIBLE_DEVICES) | start s | end s | running with | eval loss | tokens/s |")
print("| ---: | ---: | :---: | ---: | ---: | --- | ---: | ---: |")
for t in trials:
    m = json.loads((Path(t.user_attrs["folder"]) / "metrics.json").read_text())
    s, e = t.datetime_start.timestamp(), t.datetime_complete.timestamp()
    others = [u.number for u in trials if u is not t and u.datetime_start.timestamp() < e and s < u.datetime_complete.timestamp()]
    print(f"| {t.number} | {t.params.get('lora.r')} | {m.get('cuda_visible_devices')} | {s - t0:.1f} | {e - t0:.1f} | "
          f"{others} | {m['eval_loss']:.4f} | {m['train_tokens_per_s']:.0f} |")
span = max(t.datetime_complete.timestamp() for t in trials) - t0
busy = sum(t.datetime_complete.timestamp() - t.datetime_start.timestamp() for t in trials)
print(f"\nwall {span:.1f} s for {busy:.1f} s of trial time: {busy / span:.2f} trials running on average")
