"""Where local trials run: one GPU per slot (or a group of them for a trial that spans several), and the CPU cores
split between concurrent slots."""
from __future__ import annotations

import os
from pathlib import Path


def local_gpus(setting: list[int] | None) -> list[int]:
    """GPU ids to spread local slots over: the `gpus` setting, else CUDA_VISIBLE_DEVICES, else every GPU torch
    sees. On a machine without an NVIDIA driver, none, without importing torch (seconds of the driver's start-up)."""
    if setting is not None:
        return list(setting)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    if not has_nvidia_driver():
        return []
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except ImportError:
        return []


def slot_gpus(gpus: list[int], slot: int, per_trial: int = 1, slots_per_gpu: int = 1) -> tuple[int, ...]:
    """The GPUs local slot `slot` runs its trials on: the GPUs in groups of `per_trial` (a trial that spans several,
    the app's `trainer.gpus`), `slots_per_gpu` slots on each group, round the groups."""
    groups = [tuple(gpus[i:i + per_trial]) for i in range(0, len(gpus) - per_trial + 1, per_trial)] or [tuple(gpus)]
    return groups[(slot // max(1, slots_per_gpu)) % len(groups)]


def has_nvidia_driver() -> bool:
    """An NVIDIA kernel driver is loaded (what CUDA needs before torch can see a GPU)."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or any(Path("/dev").glob("nvidia[0-9]*"))


def share_cpu_threads(n_jobs: int) -> None:
    """Local trial processes inherit this environment: split the cores between the slots, or OpenMP
    threads of concurrent trials spin against each other (seen here: 10x slower trials on 2 cores)."""
    per_job = str(max(1, (os.cpu_count() or 1) // n_jobs))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, per_job)
