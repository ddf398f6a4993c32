"""A running trial's progress, as its sweep's driver shows it: the trial writes `<trial folder>/progress.json` at each
evaluation (qlora_exp's TrialProgress; any app may), and the driver shows a line per running trial, wherever it runs
(its own process, a worker, a SLURM node on a shared file system), with where it runs:

    [rank_alpha_lr-1a2b] trial 3 (lora.r=16 optimizer.lr=0.0002): step 50/150, eval loss 3.5968, train loss 3.5697 [slot 1]

On a terminal the lines are one block, redrawn in place below the sweep's log (LiveView); elsewhere (a pipe, a
file, CI) each change is one appended line. Either way each change is appended to `<sweep folder>/progress.log`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

PROGRESS_FILE = "progress.json"
PROGRESS_LOG = "progress.log"  # in the sweep folder: every change of every trial's line


def write_progress(path: Path, step: int, max_steps: int, eval_loss: float | None, train_loss: float | None) -> None:
    tmp = Path(path).with_name(f".{PROGRESS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"step": step, "max_steps": max_steps, "eval_loss": eval_loss, "train_loss": train_loss,
                               "time": time.time()}))
    tmp.replace(path)


class ProgressLines:
    """The driver's reader: a line per running trial; `lines` gives those whose progress file changed since the last
    look (to append to a log), `block` every running trial's (to draw on a terminal)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.last: dict[int, str] = {}

    def lines(self, trials, name: str) -> list[str]:
        """`trials`: (number, params, folder) or (number, params, folder, where) of the running ones."""
        out = []
        for number, params, folder, *where in trials:
            p = _read(folder)
            self.last[number] = _line(name, number, params, p, where[0] if where else "")
            if not p or self.seen.get(number) == p.get("step"):
                continue
            self.seen[number] = p.get("step")
            out.append(self.last[number])
        self.last = {n: self.last[n] for n, *_ in trials}  # the trials that ended leave the block
        return out

    def block(self) -> list[str]:
        """The running trials' lines as of the last `lines` call, by trial number."""
        return [self.last[n] for n in sorted(self.last)]


def _read(folder) -> dict | None:
    try:
        return json.loads((Path(folder) / PROGRESS_FILE).read_text()) if folder else None
    except (OSError, ValueError):  # not written yet, or written by a writer that is not atomic
        return None


def _line(name: str, number: int, params: dict, p: dict | None, where: str) -> str:
    from sweeper.naming import short

    line = f"[{name}] trial {number} ({' '.join(f'{k}={short(v)}' for k, v in params.items())}): "
    if not p:
        line += "starting"
    else:
        line += f"step {p.get('step')}/{p.get('max_steps')}"
        if p.get("eval_loss") is not None:
            line += f", eval loss {p['eval_loss']:.4f}"
        if p.get("train_loss") is not None:
            line += f", train loss {p['train_loss']:.4f}"
    return line + (f" [{where}]" if where else "")


class LiveView:
    """Where the progress lines go. On a terminal (the console handler's stream is a TTY): one block of a line per
    running trial, redrawn in place when it changes, erased before anything else is written to the terminal (so the
    sweep's own lines flow above it). Elsewhere: each changed line logged as any other. Every change is appended to
    `file` (PROGRESS_LOG in the sweep folder). QLORA_EXP_LIVE=0 turns the block off on a terminal."""

    def __init__(self, log: logging.Logger, file: Path | None = None) -> None:
        self.log, self.file, self.drawn, self.stream, self.shown = log, file, 0, None, None
        handler = next((h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler), None)
        if handler is not None and _is_tty(handler.stream) and os.environ.get("QLORA_EXP_LIVE", "1") != "0":
            self.stream = handler.stream
            handler.setStream(_ErasesFirst(handler.stream, self))

    def show(self, changed: list[str], block: list[str]) -> None:
        if changed and self.file is not None:  # <sweep folder>/progress.log: every change, terminal or not
            with contextlib.suppress(OSError), open(self.file, "a") as f:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                f.write("".join(f"{stamp} {line}\n" for line in changed))
        if self.stream is None:
            for line in changed:
                self.log.info("%s", line)
            return
        if self.drawn and block == self.shown:  # nothing new, nothing written over it: left as it is
            return
        self.shown = block
        width = shutil.get_terminal_size((120, 24)).columns
        self.erase()
        self.stream.write("".join(f"{line[:width - 1]}\n" for line in block))
        self.stream.flush()
        self.drawn = len(block)

    def erase(self) -> None:
        if self.drawn and self.stream is not None:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the block's first line; clear to the end
            self.drawn, self.shown = 0, None

    def close(self) -> None:
        self.erase()
        if self.stream is not None:
            self.stream.flush()


class _ErasesFirst:
    """The console handler's stream while a block is drawn: erases the block before any other line."""

    def __init__(self, stream, view: LiveView) -> None:
        self._stream, self._view = stream, view

    def write(self, text: str) -> int:
        self._view.erase()
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
