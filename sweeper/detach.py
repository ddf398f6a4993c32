"""Run a sweep's driver as its own small SLURM job (CPU only), off the login node.

    python -m sweeper.detach -- -m search=rank_alpha_lr hydra/launcher=slurm hydra.sweeper.n_jobs=8
    python -m sweeper.detach --partition cpu --timeout-min 2880 -- -m search=rank_alpha_lr hydra/launcher=slurm

The driver only asks, launches and tells: it needs one CPU and little memory. `scancel` on it cancels
the trials it started (they are marked FAIL and retried once when the same command runs again).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sweeper.detach", description=__doc__.splitlines()[0])
    ap.add_argument("--module", default="qlora_exp", help="the Hydra app to run (python -m MODULE)")
    ap.add_argument("--partition")
    ap.add_argument("--timeout-min", type=int, default=7 * 24 * 60)
    ap.add_argument("--mem-gb", type=int, default=4)
    ap.add_argument("--folder", default="outputs/drivers", help="where the driver's SLURM logs go")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the sweep's arguments")
    a = ap.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    import submitit

    executor = submitit.AutoExecutor(folder=a.folder, cluster="slurm")
    executor.update_parameters(name="qlora-sweep-driver", timeout_min=a.timeout_min, cpus_per_task=1,
                               mem_gb=a.mem_gb, **({"slurm_partition": a.partition} if a.partition else {}))
    # no env= here: it would pickle the whole environment (tokens included) into the submission file;
    # sbatch hands the job this shell's environment anyway
    command = submitit.helpers.CommandFunction([sys.executable, "-m", a.module, *args], cwd=os.getcwd())
    job = executor.submit(command)
    print(f"driver job {job.job_id}: {a.module} {' '.join(args)}\n  log: {Path(a.folder).resolve()}/{job.job_id}_0_log.out")


if __name__ == "__main__":
    main()
