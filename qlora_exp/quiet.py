"""What a trial shows on the terminal: its own few lines (the plan's notes, its folder, a line per evaluation, its
result). The rest goes to the trial's log file (`<trial folder>/__main__.log`) only: the Trainer's metric dicts,
library warnings known to be harmless (each listed below with why), and progress bars off an interactive terminal.
`python -m qlora_exp -v ...` (or `hydra.verbose=true`) shows everything.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys

DETAIL = "qlora_exp.detail"  # a logger whose records reach the log file, never the terminal
VERBOSE_ENV = "QLORA_EXP_VERBOSE"

# (logger name, message pattern, why it is harmless): on the terminal these are left out; the log file keeps them
HARMLESS = [
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes' optional prebuilt CPU kernel from the Hugging Face hub, not fetched (import_bitsandbytes: no hub "
     "call at run time): bitsandbytes uses its own CPU kernel (bitsandbytes issue #2064)"),
    ("py.warnings", r"`(is_)?gradient_checkpointing` is deprecated and will be removed in v6",
     "transformers renaming its own flag, read by peft and trl: nothing of this trial's config"),
    ("py.warnings", r"torch_dtype.{0,40}deprecated",
     "transformers renaming an argument a library passes: nothing of this trial's config"),
]


def import_bitsandbytes() -> None:
    """Imports bitsandbytes without its hub lookup: on a CPU with AVX512-BF16, its CPU backend calls
    `kernels.get_kernel("kernels-community/quantization-bitsandbytes")` as it is imported (the `kernels` package comes
    with transformers), a download from the Hugging Face hub at run time, which a trial must not make (and which the
    package's trust check refuses anyway, after asking the hub). With `kernels` hidden for that one import the lookup
    fails at once and bitsandbytes uses its own CPU kernel; `kernels` is back for everything after."""
    if "bitsandbytes" in sys.modules:
        return
    import torch

    hidden = "kernels" not in sys.modules
    saved = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
    torch.compile, compile_now = _compile_on_first_call(torch.compile), torch.compile
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:  # not installed (the CPU test of a config that never quantizes): the caller's import says so
        pass
    finally:
        torch.compile = compile_now
        if hidden:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved


def _compile_on_first_call(compile_now):
    """`torch.compile` as bitsandbytes' import sees it: its default backend wraps four dequantize and matmul helpers
    in `torch.compile` as the module is imported, which imports TorchDynamo and Inductor then (2.5 s of a 4 s import on
    this machine's CPU; 0.8 s of a trial's imports once transformers has brought in Dynamo). Those helpers run only on
    devices without a native kernel, and odd shapes on the CPU. Here each is compiled, with the same arguments, the
    first time it is called; an error then reaches bitsandbytes' own fallback to the plain function, as before."""
    def lazy(model=None, **kwargs):
        if model is None:
            return lambda fn: lazy(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **kwargs)
            return compiled(*args, **kw)

        return first_call_compiles
    return lazy


def verbose() -> bool:
    if os.environ.get(VERBOSE_ENV) == "1":
        return True
    try:
        from hydra.core.hydra_config import HydraConfig

        return bool(HydraConfig.get().verbose)
    except (ImportError, ValueError):  # not under Hydra (a test calling run_trial)
        return False


class ConsoleFilter(logging.Filter):
    """On the terminal's handler: drops the detail logger's records and the known-harmless warnings."""

    patterns = [(name, re.compile(pattern)) for name, pattern, _ in HARMLESS]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == DETAIL:
            return False
        return not any(record.name == name and pattern.search(record.getMessage()) for name, pattern in self.patterns)


def quiet_console() -> None:
    """Called as a trial starts (Hydra has set up this job's logging): the terminal's handlers get the filter, Python
    warnings go through logging (so the file keeps them), the libraries' progress bars stay off."""
    if verbose():
        return
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and not any(
                isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()              # "Tokenizing train dataset ..." and the like
        transformers.utils.logging.disable_progress_bar()  # "Loading weights ..."
    except ImportError:
        pass
    logging.getLogger(DETAIL).info("left off the terminal (harmless; shown with -v): %s", "; ".join(
        f"{name}: /{pattern}/ ({why})" for name, pattern, why in HARMLESS))


def bar_wanted() -> bool:
    """A tqdm bar for the training steps: on an interactive terminal, in a single run (a sweep shows its own lines)."""
    if os.environ.get("TQDM_DISABLE") == "1" or not sys.stderr.isatty():
        return False
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode != RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def trial_label() -> str:
    """`trial 3: ` in a sweep (its lines on a worker's terminal say whose they are), else nothing."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return f"trial {hc.job.num}: " if hc.mode == RunMode.MULTIRUN else ""
    except (ImportError, ValueError):
        return ""
