"""A running trial's progress file and the driver's lines read from it (sweeper.progress)."""
from sweeper.progress import PROGRESS_FILE, ProgressLines, write_progress


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
