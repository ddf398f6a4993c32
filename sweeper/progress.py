"""A running trial's progress, as its sweep's driver shows it: the trial writes `<trial folder>/progress.json` at each
evaluation (qlora_exp's TrialProgress; any app may), and the driver prints a line when it changes, for every running
trial wherever it runs (a worker, its own process, a SLURM node on a shared file system):

    [sweep] trial 3 (lora.r=16): step 50/150, eval loss 3.5968, train loss 3.5697
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

PROGRESS_FILE = "progress.json"


def write_progress(path: Path, step: int, max_steps: int, eval_loss: float | None, train_loss: float | None) -> None:
    tmp = Path(path).with_name(f".{PROGRESS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"step": step, "max_steps": max_steps, "eval_loss": eval_loss, "train_loss": train_loss,
                               "time": time.time()}))
    tmp.replace(path)


class ProgressLines:
    """The driver's reader: a line per running trial whose progress file changed since the last look."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def lines(self, trials, name: str) -> list[str]:
        """`trials`: (number, params, folder) of the running ones."""
        from sweeper.naming import short

        out = []
        for number, params, folder in trials:
            try:
                p = json.loads((Path(folder) / PROGRESS_FILE).read_text()) if folder else None
            except (OSError, ValueError):
                continue
            if not p or self.seen.get(number) == p.get("step"):
                continue
            self.seen[number] = p.get("step")
            line = f"[{name}] trial {number} ({' '.join(f'{k}={short(v)}' for k, v in params.items())}): step " \
                   f"{p.get('step')}/{p.get('max_steps')}"
            if p.get("eval_loss") is not None:
                line += f", eval loss {p['eval_loss']:.4f}"
            if p.get("train_loss") is not None:
                line += f", train loss {p['train_loss']:.4f}"
            out.append(line)
        return out
