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
