"""A sweep worker asked to stop (Ctrl-C, SIGTERM) while it runs a trial in its own process: how the trial is cut
short. The worker's signal handler (sweeper.loop.Interrupts) sets `interrupted`; a trial that said
`at_safe_points()` is then cut short at its next `check()` (between its phases, at each training step), never in
the middle of an import, a model load or a file being written; any other app's trial is cut short at once (a
KeyboardInterrupt raised wherever it is). A second signal cuts short at once in either case.

No heavy import here: a trial calls it on every step.
"""
from __future__ import annotations

STATE = {"running": False, "interrupted": False, "safe_points": False}


def at_safe_points() -> None:
    """The running trial checks for a stop itself (by calling `check()`): the first signal only asks it to."""
    STATE["safe_points"] = True


def check() -> None:
    """Cut the running in-process trial short here (KeyboardInterrupt) if its worker was asked to stop."""
    if STATE["running"] and STATE["interrupted"]:
        raise KeyboardInterrupt("the sweep worker was asked to stop")
