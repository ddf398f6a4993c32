"""Trainer callbacks of a trial (throughput and memory accounting, TensorBoard scalars) and the trial's
TensorBoard run, which ends with a row TensorBoard's HPARAMS table can compare.

One trial, one run folder (`cfg.paths.tensorboard_dir`, named by `__main__`: `<study>/<NNN-swept values>`):

    train/loss, train/learning_rate, train/grad_norm, ...   every training log (trainer.log_every steps)
    train/tokens_per_s, train/peak_memory_gb                 with every training log
    eval/loss, ...                                           every evaluation (trainer.eval_every steps)
    hparams/ (a run of its own): the row                     once, when the trial ends

TensorBoard's Time Series opens the first two groups by name: eval and train. The row (sweeper.tensorboard's
write_row) holds `state` (complete | pruned | failed, and interrupted in a sweep), `trial`, the swept keys (read
from the run name, `NNN-key=value,...`) and the config keys of `HPARAM_KEYS`: the same keys in every trial, so
the trials of every study land in one HPARAMS table; its metrics are `trial/<field>` scalars of the
`HPARAM_METRICS` fields of metrics.json, written only when known (a failed trial has no eval loss). In a sweep
of this project's sweeper the trial leaves its row in `<trial folder>/hparams.json` and the driver writes it
with the state the study holds. A running trial is not in the table yet; a trial refused by the config checks
has no run at all.
"""
import logging
import math
import resource
import time

from transformers import TrainerCallback

from sweeper import stop

log = logging.getLogger(__name__)

# Config keys logged as hparams by every trial: the knobs people sweep. Lists are joined with ",",
# None is "null", booleans are "true"/"false"; numbers stay numbers.
HPARAM_KEYS = (
    "model.name", "quantization.method", "quantization.double_quant",
    "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_rslora",
    "optimizer.name", "optimizer.lr", "optimizer.weight_decay", "optimizer.scheduler", "optimizer.warmup",
    "trainer.batch_size", "trainer.grad_accum", "trainer.max_length", "trainer.max_steps", "trainer.packing",
    "trainer.seed", "data.name",
)
# metrics.json field -> hparams metric tag (also written as a scalar, which is where TensorBoard reads it).
# In this order: TensorBoard shows the first five by default.
HPARAM_METRICS = {
    "eval_loss": "trial/eval_loss",
    "perplexity": "trial/perplexity",
    "train_tokens_per_s": "trial/train_tokens_per_s",
    "peak_memory_gb": "trial/peak_memory_gb",
    "initial_eval_loss": "trial/initial_eval_loss",
    "steps": "trial/steps",
    "wall_time_s": "trial/wall_time_s",
}


def peak_memory_gb() -> tuple[float, str]:
    """Peak allocated CUDA memory, or the process's peak resident memory on a CPU machine."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_rss"


class TrialMetrics(TrainerCallback):
    """Times optimizer steps (evaluation excluded) and the training loop (its evaluations included), counts real
    tokens, keeps the eval and loss histories; `ready_at`, `first_step_at`: when training began and its first step
    did (epoch seconds), for the start-up a trial spends before them."""

    WARMUP_STEPS = 3  # left out of the steady rate: first kernels, allocator growth, paged-optimizer set-up

    def __init__(self):
        self.ready_at: float | None = None
        self.first_step_at: float | None = None
        self.loop_time = 0.0
        self._loop_t = None
        self.train_time = 0.0
        self.eval_history: list[tuple[int, float]] = []
        self.loss_history: list[tuple[int, float]] = []
        self.steps: list[tuple[float, int]] = []   # (seconds, real tokens) of each optimizer step
        self._t = None
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        self.ready_at, self._loop_t = time.time(), time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        if self._loop_t is not None:
            self.loop_time = time.perf_counter() - self._loop_t

    def on_step_begin(self, args, state, control, **kw):
        stop.check()  # a sweep worker asked to stop: cut short here, between steps (sweeper.stop)
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self._t = time.perf_counter()
        self._tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        _sync()
        seconds = time.perf_counter() - self._t
        self.train_time += seconds
        self.steps.append((seconds, state.num_input_tokens_seen - self._tokens))

    def on_prediction_step(self, args, state, control, **kw):
        stop.check()  # and between evaluation batches

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if metrics and "eval_loss" in metrics:
            self.eval_history.append((state.global_step, float(metrics["eval_loss"])))

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss_history.append((state.global_step, float(logs["loss"])))

    def tokens_per_s(self, state) -> float:
        return state.num_input_tokens_seen / self.train_time if self.train_time else 0.0

    def steady_tokens_per_s(self) -> float | None:
        """Real tokens per second of the steps after the first WARMUP_STEPS (None with under 3 such steps)."""
        rest = self.steps[self.WARMUP_STEPS:]
        seconds = sum(s for s, _ in rest)
        return sum(n for _, n in rest) / seconds if len(rest) >= 3 and seconds else None


class TrialProgress(TrainerCallback):
    """The trial's progress on the terminal, in place of the Trainer's printed metric dicts: a tqdm bar of its steps
    (an interactive terminal, a single run: qlora_exp.quiet.bar_wanted) or one line per evaluation; every dict the
    Trainer logs goes to the trial's log file (the qlora_exp.detail logger)."""

    def __init__(self, bar: bool, progress_file=None, label: str = "", lines: bool = True):
        self.bar_wanted, self.bar, self.train_loss, self.quiet = bar, None, None, not lines
        self.detail, self.lines = logging.getLogger("qlora_exp.detail"), logging.getLogger("qlora_exp.trial")
        self.progress_file, self.label = progress_file, label  # a sweep's driver reads the file (sweeper.progress)

    def on_train_begin(self, args, state, control, **kw):
        if self.bar_wanted and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        logs.pop("total_flos", None)
        self.detail.info("step %d: %s", state.global_step, logs)
        if "loss" in logs:
            self.train_loss = float(logs["loss"])
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{self.train_loss:.3f}", refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if not metrics or "eval_loss" not in metrics or self.quiet:
            return
        line = f"{self.label}step {state.global_step}/{state.max_steps}: eval loss {metrics['eval_loss']:.4f}" + (
            f", train loss {self.train_loss:.4f}" if self.train_loss is not None else "")
        if self.progress_file is not None:
            from sweeper.progress import write_progress

            write_progress(self.progress_file, state.global_step, state.max_steps, float(metrics["eval_loss"]),
                           self.train_loss)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.train_loss or float('nan'):.3f}", eval=f"{metrics['eval_loss']:.3f}")
            self.detail.info(line)
        else:
            self.lines.info(line)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrialBoard:
    """The trial's TensorBoard run folder: one writer for its scalars, and its HPARAMS row at the end.

    The writer is created on first use, so a trial that fails before training still gets its row. With
    `row_file` (a sweep of this project's sweeper) the row goes to that file for the driver to write.
    """

    def __init__(self, log_dir: str | None, row_file=None):
        # log_dir None: a multi-process trial's rank other than 0, which writes nothing (its writer drops everything)
        self.log_dir, self.row_file = (str(log_dir) if log_dir is not None else None), row_file
        self.interrupted = False  # set on Ctrl-C or a kill: no row of its own (a resumed attempt writes it)
        self._writer = None

    @property
    def writer(self):
        if self.log_dir is None:
            return _NullWriter()
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def finish(self, cfg, result) -> None:
        """Write the row of a finished trial (any status), then close. Never raises."""
        if self.log_dir is None:
            return
        try:
            if self.row_file is not None or not self.interrupted:
                self.write_hparams(cfg, result)
        except Exception as e:  # noqa: BLE001  (TensorBoard must never fail or mask a trial)
            log.warning("could not write the TensorBoard hparams of %s: %s", self.log_dir, e)
        finally:
            self.close()

    def write_hparams(self, cfg, result) -> None:
        import json
        from pathlib import Path

        from sweeper.tensorboard import write_row

        hparams = trial_hparams(cfg, self.log_dir)
        metrics = {tag: getattr(result, key, None) for key, tag in HPARAM_METRICS.items()}
        metrics = {t: v for t, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        step = int(result.steps or 0)
        if self.row_file is not None:
            tmp = Path(self.row_file).with_suffix(".tmp")
            tmp.write_text(json.dumps({"hparams": hparams, "metrics": metrics, "step": step,
                                       "tensorboard_dir": self.log_dir}))
            tmp.replace(self.row_file)
            return
        self.writer.flush()  # the run folder exists, with the scalars in it
        write_row(self.log_dir, hparams, metrics, step, str(result.status))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _NullWriter:
    """What a SummaryWriter is to a rank that writes nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def trial_hparams(cfg, log_dir: str) -> dict:
    """The row's hparams, in display order: `trial` (the run name; a sweep's driver puts the trial number and the
    sweep there), the swept keys, HPARAM_KEYS. The driver adds `state`."""
    from pathlib import Path

    from omegaconf import OmegaConf

    run_name = str(cfg.get("run_name") or Path(log_dir).name)
    row = {"trial": run_name}
    for key in [*swept_keys(cfg, run_name), *HPARAM_KEYS]:
        if key not in row:
            row[key] = _hparam_value(OmegaConf.select(cfg, key, default=None))
    return row


def swept_keys(cfg, run_name: str) -> list[str]:
    """Config keys named in a run name: `003-lora.r=8,optimizer.lr=0.001` (the sweeper's) or
    `003-lora.r=8-optimizer.lr=0.001` (`__main__`'s, for other sweepers) -> ["lora.r", "optimizer.lr"]."""
    import re

    from omegaconf import OmegaConf

    keys = []
    for key in re.findall(r"(?:^|[-,])([A-Za-z_][\w.]*)=", run_name):
        if key not in keys and OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            keys.append(key)
    return keys


_ABSENT = object()


def _hparam_value(v):
    from omegaconf import OmegaConf

    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=True)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return float(v)
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


class TensorBoardScalars(TrainerCallback):
    """Every logged value as a TensorBoard scalar (train/*, eval/*), plus tokens/s and memory per training log."""

    SKIP_IN_EVAL = ("epoch", "num_input_tokens_seen")  # repeated in every eval log: already in the train logs

    def __init__(self, writer, metrics: TrialMetrics):
        self.writer = writer
        self.metrics = metrics

    def on_log(self, args, state, control, logs=None, **kw):
        step = state.global_step
        logs = logs or {}
        is_eval = any(k.startswith("eval_") for k in logs)
        is_summary = "train_loss" in logs  # the Trainer's end-of-training summary
        for key, value in logs.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if is_eval and not key.startswith("eval_") and key in self.SKIP_IN_EVAL:
                continue
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        if not is_eval and not is_summary:
            if step and self.metrics.train_time:
                self.writer.add_scalar("train/tokens_per_s", self.metrics.tokens_per_s(state), step)
            gb, _ = peak_memory_gb()
            self.writer.add_scalar("train/peak_memory_gb", gb, step)
        self.writer.flush()

    def on_train_end(self, args, state, control, **kw):
        self.writer.flush()

    def close(self):
        """Flush; the writer belongs to the trial's TrialBoard, which closes it after the hparams row."""
        self.writer.flush()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
