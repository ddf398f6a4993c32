"""A running trial's progress file and the driver's lines read from it (sweeper.progress)."""
import re
from pathlib import Path

import pytest

from sweeper.progress import PROGRESS_FILE, PROGRESS_LOG, ProgressLines, write_progress


def test_the_driver_says_a_line_when_a_trials_progress_changes_and_only_then(tmp_path):
    a, b = tmp_path / "0", tmp_path / "1"
    a.mkdir(), b.mkdir()
    lines = ProgressLines()
    trials = [(0, {"lora.r": 8, "optimizer.lr": 2e-4}, a), (1, {"lora.r": 16}, b), (2, {"lora.r": 32}, None)]
    assert lines.lines(trials, "grid-lora.r") == []  # nothing written yet: nothing said
    write_progress(a / PROGRESS_FILE, 10, 30, 3.51234, 3.7)
    assert lines.lines(trials, "grid-lora.r") == [
        "[grid-lora.r] trial 0 (lora.r=8 optimizer.lr=0.0002): step 10/30, eval loss 3.5123, train loss 3.7000"]
    assert lines.lines(trials, "grid-lora.r") == []  # the same step again: said once
    write_progress(a / PROGRESS_FILE, 20, 30, 3.2, None)
    (b / PROGRESS_FILE).write_text('{"step": 1')  # half-written by a writer that is not atomic: skipped, not fatal
    assert lines.lines(trials, "grid-lora.r") == ["[grid-lora.r] trial 0 (lora.r=8 optimizer.lr=0.0002): step 20/30, "
                                                  "eval loss 3.2000"]
    assert [p.name for p in a.iterdir()] == [PROGRESS_FILE]  # the temporary file was renamed into place


def _toy_sweep(tmp_path: Path, tty: bool) -> tuple[int, str]:
    """Two trials side by side that write progress four times each, the driver's output as a terminal shows it."""
    import os
    import pty
    import select
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    args = [sys.executable, str(repo / "tests" / "toy_app" / "app.py"), "-m", "x=0,1", "sleep_s=4", "progress_steps=4",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.mode=processes", f"hydra.sweeper.study_dir={tmp_path}/runs",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/s.db"]
    env = {**os.environ, "PYTHONPATH": str(repo), "TOY_OUTPUT_ROOT": str(tmp_path / "out")}
    if not tty:
        proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    out = b""
    while True:
        if select.select([master], [], [], 0.5)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), out.decode()


def _screen(text: str) -> list[str]:
    """The lines a terminal shows after `text`: the cursor moves LiveView uses (ESC[nF, ESC[J), colours dropped."""
    import re

    lines, row = [""], 0
    for token in re.split(r"(\x1b\[\d*[A-Za-z]|\n)", text.replace("\r", "")):
        if token == "\n":
            row += 1
            lines = lines[:row] + [""] if row >= len(lines) else lines
        elif m := re.fullmatch(r"\x1b\[(\d*)F", token):
            row = max(0, row - int(m.group(1) or 1))
        elif token == "\x1b[J":
            lines = lines[:row] + [""]
        elif token and not token.startswith("\x1b"):
            lines[row] += token
    return [line for line in lines if line]


@pytest.mark.slow
def test_on_a_terminal_the_running_trials_are_one_block_redrawn_in_place(tmp_path):
    rc, text = _toy_sweep(tmp_path, tty=True)
    assert rc == 0, text[-3000:]
    # while both ran, the screen ended with one line per trial, its latest step, and its slot
    last_step = text.rindex("trial 0 (x=0): step 4/4")
    screen = _screen(text[:text.index("\n", text.index("[slot 1]", last_step)) + 1])
    assert re.fullmatch(r"\[grid-x-\w+\] trial 0 \(x=0\): step 4/4, eval loss 11\.1400 \[slot 0\]", screen[-2]), screen
    assert re.fullmatch(r"\[grid-x-\w+\] trial 1 \(x=1\): step [34]/4, eval loss [\d.]+ \[slot 1\]", screen[-1]), screen
    assert sum("trial 0 (x=0): step" in line for line in screen) == 1  # redrawn in place, never appended
    # at the end the block is gone: the sweep's own lines remain, each once
    screen = _screen(text)
    assert not any(": step " in line for line in screen), screen
    assert screen[-1].endswith("2/2 finished: 2 complete, 0 pruned, 0 failed, 0 running; best 5.2900 (trial 1)")
    assert sum("trial 0 complete: 10.89" in line for line in screen) == 1
    # the sweep folder's progress.log has every change, appended
    (log,) = (tmp_path / "runs").glob(f"*/{PROGRESS_LOG}")
    steps = re.findall(r"trial (\d) \(x=\d\): step (\d)/4", log.read_text())
    assert sorted(steps) == sorted((n, s) for n in "01" for s in "1234"), steps


@pytest.mark.slow
def test_through_a_pipe_each_change_is_one_line(tmp_path):
    rc, text = _toy_sweep(tmp_path, tty=False)
    assert rc == 0, text[-3000:]
    assert "\x1b[" not in text.replace("\x1b[0m", "").replace("\x1b[32m", "")  # no cursor moves (Optuna's colours aside)
    steps = re.findall(r"\] trial (\d) \(x=\d\): step (\d)/4, eval loss [\d.]+ \[slot \d\]", text)
    assert sorted(steps) == sorted((n, s) for n in "01" for s in "1234"), text[-3000:]
