"""One trial on several processes (`trainer.gpus: N`): data parallel over the LoRA parameters, the frozen base
replicated on each GPU of the trial's node (on a machine without a GPU, N CPU processes over gloo).

    python -m qlora_exp trainer.gpus=2              # one trial, two GPUs; the same in a sweep's trials

The trial's own process (a single run, a sweep's trial process or worker) checks and plans the config as for one
process, writes its resolved `config.yaml`, and starts the ranks with torchrun (`torch.distributed.run
--standalone`), each of them `python -m qlora_exp.distributed <trial folder>/config.yaml`: the same phases, with
transformers' Trainer doing what DDP needs (the process group, the gradient all-reduce, the shards of each step).
Each rank trains 1/N of every optimizer step's examples (`rank_split`), so a step sees the same examples as one
process would. Only rank 0 writes: `metrics.json`, TensorBoard, the progress file, the adapter; only rank 0
reports to the study, and its pruning decision reaches every rank (sweeper.pruning). The launching process reads
rank 0's `metrics.json` back as the trial's result.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
IN_SWEEP_ENV = "QLORA_EXP_IN_SWEEP"  # the ranks of a trial of this project's sweeper (qlora_exp.trial._in_our_sweep)


def rank() -> int:
    """This process's rank in its trial (0 outside a multi-process trial)."""
    return int(os.environ.get("RANK", "0"))


def is_rank(rank_: int = 0) -> bool:
    return rank() == rank_


def inside() -> bool:
    """Started by torchrun as one rank of a multi-process trial."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_split(micro: int, accum: int, world: int) -> tuple[int, int]:
    """A step of `micro x accum` examples over `world` processes: each rank's (micro-batch, accumulation), the
    micro-batch never larger than one process's (the memory plan holds per rank), `world` dividing the examples."""
    per_rank = micro * accum // world
    m = math.gcd(micro, per_rank)
    return m, per_rank // m


def launch(config_file: Path, world: int, in_sweep: bool):
    """Run the trial whose resolved config is `config_file` on `world` processes; return rank 0's TrialResult."""
    import json

    from qlora_exp.trial import TrialResult
    from sweeper import stop

    out = config_file.parent
    env = dict(os.environ)
    threads = max(1, int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // world)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if in_sweep:
        env[IN_SWEEP_ENV] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "qlora_exp.distributed", str(config_file)]
    log.info("trial on %d processes (torchrun): %s", world, out)
    (out / "metrics.json").unlink(missing_ok=True)  # what comes back is this attempt's
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd())
    try:
        rc = proc.wait()
    except BaseException:  # Ctrl-C, a requeue: the ranks stop with their launcher
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    stop.check()  # a sweep worker asked to stop while the ranks ran: an interrupted trial, not a failed one
    path = out / "metrics.json"
    data = json.loads(path.read_text()) if path.is_file() else None
    if rc != 0 or data is None:
        why = (data or {}).get("error") or f"exit status {rc}, no metrics.json: see the ranks' output above"
        raise RuntimeError(f"trainer.gpus={world}: the trial's processes failed: {why}")
    return TrialResult(**data)


def main(argv: list[str]) -> None:
    """One rank: the trial's config from its folder, this rank's device, then the trial's phases."""
    from omegaconf import OmegaConf

    import qlora_exp  # noqa: F401  (the config resolvers)

    logging.basicConfig(level=logging.INFO if is_rank(0) else logging.WARNING,
                        format=f"[rank {rank()}] %(asctime)s %(name)s %(levelname)s - %(message)s")
    cfg = OmegaConf.load(argv[0])
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    from qlora_exp.trial import run_trial

    run_trial(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
