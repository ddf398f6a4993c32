"""Trainer callbacks of a trial: throughput and memory accounting, and TensorBoard scalars."""
import math
import resource
import time

from transformers import TrainerCallback


def peak_memory_gb() -> tuple[float, str]:
    """Peak allocated CUDA memory, or the process's peak resident memory on a CPU machine."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_rss"


class TrialMetrics(TrainerCallback):
    """Times optimizer steps (evaluation excluded), counts real tokens, keeps the eval history."""

    def __init__(self):
        self.train_time = 0.0
        self.eval_history: list[tuple[int, float]] = []
        self._t = None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        _sync()
        self.train_time += time.perf_counter() - self._t

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if metrics and "eval_loss" in metrics:
            self.eval_history.append((state.global_step, float(metrics["eval_loss"])))

    def tokens_per_s(self, state) -> float:
        return state.num_input_tokens_seen / self.train_time if self.train_time else 0.0


class TensorBoardScalars(TrainerCallback):
    """Every logged value as a TensorBoard scalar (train/*, eval/*), plus tokens/s and memory."""

    def __init__(self, log_dir: str, metrics: TrialMetrics):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        self.metrics = metrics

    def on_log(self, args, state, control, logs=None, **kw):
        step = state.global_step
        for key, value in (logs or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        if step and self.metrics.train_time:
            self.writer.add_scalar("perf/tokens_per_s", self.metrics.tokens_per_s(state), step)
        gb, _ = peak_memory_gb()
        self.writer.add_scalar("perf/peak_memory_gb", gb, step)
        self.writer.flush()

    def on_train_end(self, args, state, control, **kw):
        self.writer.flush()

    def close(self):
        self.writer.close()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
