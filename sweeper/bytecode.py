"""Trial processes that cache Python's bytecode where the environment forbids writing it.

Container images often set PYTHONDONTWRITEBYTECODE=1 (to keep .pyc files out of their layers). Where the installed
packages hold no .pyc files of their own, every new process then recompiles torch, numpy and sympy from source: on
the H100 machine this project is measured on, `import transformers, peft, trl, bitsandbytes` takes 16.3 s, and
7.0 s from a bytecode cache (docs/benchmarks.md). A sweep starts many processes (a worker or SLURM job per slot, a
process per trial), so it points them at a cache of their own (Python's PYTHONPYCACHEPREFIX): nothing is written
next to the installed packages, which is what the variable is usually there to prevent.

    hydra.sweeper.bytecode_cache=auto        # the default: only when PYTHONDONTWRITEBYTECODE is set and no
                                             # PYTHONPYCACHEPREFIX is; ~/.cache/qlora_exp/pycache
    hydra.sweeper.bytecode_cache=/scratch/pyc   # this folder, whatever the environment says
    hydra.sweeper.bytecode_cache=false       # the environment as it is
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("qlora_exp.sweeper")

ACCEPTED = ("auto (a cache under ~/.cache/qlora_exp/pycache when PYTHONDONTWRITEBYTECODE is set), false (the "
            "environment as it is) or a folder for the trial processes' bytecode")


def default_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora_exp" / "pycache"


def cache_folder(setting: str | bool | None) -> Path | None:
    """The folder trial processes write bytecode to, or None where the environment is left as it is."""
    if setting is False or setting is None:
        return None
    if setting == "auto":
        forbidden = os.environ.get("PYTHONDONTWRITEBYTECODE", "") != ""
        return default_folder() if forbidden and not os.environ.get("PYTHONPYCACHEPREFIX") else None
    return Path(str(setting)).expanduser().absolute()


_UNSAID: list[str] = []  # what an early call (the command's checks, before Hydra's logging) leaves the sweeper to say


def cache_bytecode(setting: str | bool | None, *, say: bool = True, single: bool = False) -> Path | None:
    """Point this process's later imports, and every process it starts (local workers and trials; SLURM jobs,
    which sbatch gives this environment), at the bytecode cache. `python -m qlora_exp` calls it before its
    command checks (say=False: Hydra's logging is not set up yet), which import transformers and torch; the
    sweeper's own call, or a single run's trial (`say_early_note`), then says what that first call did. A single
    run (`single`) is one process: its own imports are what the cache saves, from its second run on."""
    folder = cache_folder(setting)
    if folder is None:
        if say:
            say_early_note()
        return Path(sys.pycache_prefix) if setting and sys.pycache_prefix else None  # set by the early call, if any
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a cache is a speed-up: a sweep without one still runs
        log.info("bytecode_cache %s cannot be created (%s): trial processes compile their imports each start",
                 folder, e.strerror)
        return None
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        who = "this run caches its" if single else "trial processes cache their"
        note = (f"PYTHONDONTWRITEBYTECODE is set: {who} bytecode in {folder} instead of "
                "compiling torch and the rest at every start (hydra.sweeper.bytecode_cache=false: off)")
        if say:
            log.info(note)
        else:
            _UNSAID.append(note)
    os.environ["PYTHONPYCACHEPREFIX"] = str(folder)
    sys.pycache_prefix, sys.dont_write_bytecode = str(folder), False  # the driver's own later imports (a worker)
    return folder


def say_early_note() -> None:
    """What the command's early call left unsaid, once Hydra's logging is set up (a single run has no sweeper)."""
    if _UNSAID:
        log.info(_UNSAID.pop())
