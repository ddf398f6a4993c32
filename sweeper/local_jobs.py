"""Local trial processes that a terminal's Ctrl-C does not reach: the sweep driver alone decides what an interrupt
means (collect the trials that finished, cancel the rest), and submitit's job controllers print nothing to the
terminal (their tracebacks on a cancel used to appear after the shell prompt was back)."""
from __future__ import annotations

import subprocess
import types
from functools import partial
from pathlib import Path

import submitit
import submitit.local.local as submitit_local


class SessionLocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor, each job's controller in its own session (no terminal signals) with its own
    output in `<folder>/controller-<pid>.log` instead of the driver's terminal."""

    def _submit_command(self, command: str):
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "controller.log", "ab")  # noqa: SIM115  (the controller holds it; closed below)
        shim = types.SimpleNamespace(Popen=partial(subprocess.Popen, start_new_session=True, stdout=log, stderr=log))
        real, submitit_local.subprocess = submitit_local.subprocess, shim
        try:
            return super()._submit_command(command)
        finally:
            submitit_local.subprocess = real
            log.close()  # the child has its own copy of the descriptor


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reparented controller that nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class AdoptedLocalJob(submitit_local.LocalJob):
    """A local trial another driver of the study started and left running (it was killed, or paused past
    `stale_after_s`): watched by its controller's pid (its submitit job id) and its result file, never run again."""

    def get_info(self, mode: str = "force") -> dict[str, str]:
        if self.paths.result_pickle.exists():
            return {"jobState": "FINISHED"}
        return {"jobState": "RUNNING" if self.job_id.isdigit() and _alive(int(self.job_id)) else "INTERRUPTED"}

    def cancel(self, check: bool = True) -> None:
        import os
        import signal

        if self.job_id.isdigit() and _alive(int(self.job_id)):
            os.kill(int(self.job_id), signal.SIGINT)  # what submitit's own cancel sends its controller


def adopt_job(kind: str, folder: str, job_id: str):
    """The submitit job of a trial that another (stopped) driver submitted, from what that driver recorded."""
    import submitit

    if kind == "slurm":
        return submitit.SlurmJob(folder=folder, job_id=job_id)
    return AdoptedLocalJob(folder=folder, job_id=job_id)


def die_with_parent() -> None:
    """A local trial's process ends when its submitit controller dies (kill -9 of the controller left the training
    running for minutes beside the next trial). Linux's PR_SET_PDEATHSIG; elsewhere nothing."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call took effect
        os.kill(os.getpid(), signal.SIGKILL)
