"""What a sweep is doing: its study's trials with their SLURM job states.

    python -m sweeper.status outputs/multirun/<study>      # or: make sweep-status [SWEEP=...]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from sweeper.errors import SweeperConfigError
from sweeper.storage import build_storage, storage_error, storage_from_file


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state per job id, from squeue (live jobs) then sacct (finished ones); {} without SLURM."""
    states: dict[str, str] = {}
    ids = [j for j in job_ids if j and j.split("_")[0].isdigit()]
    if not ids or not shutil.which("squeue"):
        return states
    run = lambda cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout  # noqa: E731
    for line in run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)]).splitlines():
        job, state = line.split()[:2]
        states[job] = state
    if shutil.which("sacct"):
        for line in run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)]).splitlines():
            job, state = line.split("|")[:2]
            states.setdefault(job, state)
    return states


def slurm_job(t) -> str:
    """The trial's SLURM job: its own (a trial per job) or its worker's; "" for a local one (a process id, which
    SLURM is not asked about: it could be another job's id)."""
    if t.user_attrs.get("slurm_job"):
        return str(t.user_attrs["slurm_job"])
    return str(t.user_attrs.get("job_id", "")) if t.user_attrs.get("job_kind") == "slurm" else ""


def trial_rows(study: optuna.Study) -> list[dict]:
    trials = study.get_trials(deepcopy=False)
    slurm = slurm_states([slurm_job(t) for t in trials])
    rows = []
    for t in trials:
        job = slurm_job(t) or str(t.user_attrs.get("job_id", ""))
        value = ", ".join(f"{v:.4f}" for v in t.values) if t.values else ""
        note = t.user_attrs.get("fail_reason") or (f"pruned at step {t.user_attrs['pruned_at_step']}"
                                                   if "pruned_at_step" in t.user_attrs else "")
        rows.append({"trial": t.number, "state": t.state.name, "job": job, "slurm": slurm.get(job, ""),
                     "value": value, "params": " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in t.params.items()), "note": note[:80]})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials yet)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sweeper.status", description=__doc__.splitlines()[0])
    ap.add_argument("sweep", nargs="?", help="a sweep folder (default: the newest under outputs/multirun)")
    a = ap.parse_args(argv)
    folder = Path(a.sweep) if a.sweep else max(Path("outputs/multirun").glob("*/optimization_results.yaml"),
                                               key=lambda p: p.stat().st_mtime, default=Path("none")).parent
    results_file = folder / "optimization_results.yaml"
    if not results_file.is_file():
        raise SystemExit(f"error: sweep={str(folder)!r} has no optimization_results.yaml: give a sweep folder")
    results = OmegaConf.load(results_file)
    try:
        study = optuna.load_study(study_name=results.study_name,
                                  storage=build_storage(storage_from_file(results.storage)))
    except SweeperConfigError as e:  # a damaged journal, a password only the environment holds
        raise SystemExit(f"error: {e}") from None
    except Exception as e:  # noqa: BLE001  (a database that cannot be reached: sqlalchemy's and OS errors alike)
        raise SystemExit(f"error: {storage_error(results.storage, e)}") from None
    rows = trial_rows(study)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    print(f"study {results.study_name} ({results.storage}), target {results.n_trials} trials: "
          + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n))
    print(format_table(rows))


if __name__ == "__main__":
    main()
