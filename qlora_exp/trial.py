"""One QLoRA trial: a composed config in, a trained adapter and its metrics out.

    result = run_trial(cfg)          # cfg: the composed Hydra config (conf/config.yaml)
    result.objective                 # the value a sweeper minimizes (cfg.objective)

The phases are qlora_exp.recipe's: plan (the config checked, every decision resolved; no model yet), build base
(the tokenizer, the base quantized through BitsAndBytesConfig and prepared for k-bit training), attach adapter
(LoRA), train (trl's SFTTrainer, with evaluations), collect (the adapter as safetensors, `metrics.json`).
Raises `ConfigError` for bad input before any model is loaded; any other failure is recorded in `metrics.json` as
status "failed" with its reason, then re-raised. `TrialResult` is output only: what metrics.json holds.
"""
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class TrialResult:
    status: str                           # complete | pruned | failed
    objective: float | None               # the value of cfg.objective
    eval_loss: float | None = None        # final held-out loss (assistant tokens)
    initial_eval_loss: float | None = None  # held-out loss before training
    perplexity: float | None = None
    train_tokens_per_s: float | None = None  # real (non-padding) tokens per second of training steps
    train_tokens: int | None = None
    steady_tokens_per_s: float | None = None  # the same, leaving out the first steps (warm-up, allocator growth)
    peak_memory_gb: float | None = None
    peak_memory_kind: str | None = None   # cuda_allocated | cpu_rss
    peak_memory_reserved_gb: float | None = None  # CUDA caching allocator's peak (what nvidia-smi sees, less context)
    trainable_params: int | None = None
    total_params: int | None = None
    wall_time_s: float | None = None
    train_time_s: float | None = None
    step_s: list = field(default_factory=list)  # each optimizer step's seconds (a cold trial's first kernels show here)
    steps: int | None = None
    optimizer: str | None = None          # the optimizer actually used (after any CPU fallback)
    precision: str | None = None
    device: str | None = None
    micro_batch_size: int | None = None   # examples per micro-step (after any memory plan)
    grad_accum: int | None = None
    gradient_checkpointing: bool | None = None
    checkpointed_layers: int | None = None  # with checkpointing: how many decoder layers recompute (None: all)
    offload_checkpoints: bool | None = None  # the checkpointed layers' inputs waited in CPU memory
    compile_layers: bool | None = None    # each layer's attention and MLP ran torch.compile'd
    recomputed_layers: dict | None = None  # layers recomputed per micro-batch (min, mean, max) when the plan chose by tokens
    largest_micro_batch_tokens: int | None = None  # token positions of the longest training micro-batch
    packing: str | None = None            # off | rows | flat (qlora_exp.packing)
    train_rows: int | None = None         # sequences the model was fed in training (packed rows hold several examples)
    train_positions: int | None = None    # token positions it computed in training, padding included
    quantized: dict | None = None         # what the loaded base really holds: bitsandbytes layers, quant type, nesting
    fused_kernels: str | None = None      # which, or off and why (qlora_exp.kernels)
    memory_plan: str | None = None        # the plan's one line, when trainer.memory_budget_gb chose the split
    eval_history: list = field(default_factory=list)   # [[step, eval_loss], ...]
    loss_history: list = field(default_factory=list)   # [[step, train loss], ...] every trainer.log_every steps
    resumed_from_step: int | None = None  # set when the trial resumed from a checkpoint (after preemption)
    initial_eval_reused: bool = False     # its step-0 evaluation was the base's, measured by an earlier trial here
    cuda_visible_devices: str | None = None  # the GPUs this trial's process was given
    world_size: int | None = None         # processes that trained it (trainer.gpus: data parallel, qlora_exp.distributed)
    cpu_threads: int | None = None        # torch's intra-op threads (OMP_NUM_THREADS; a SLURM trial: its cpus_per_task)
    slurm_job_id: str | None = None
    train_loop_s: float | None = None     # the training loop's wall time, its evaluations included
    started_at: float | None = None       # epoch seconds: the trial's start in its process (after Hydra composed it)
    process_started_at: float | None = None  # its process's start: a cold trial's imports lie between the two
    ready_at: float | None = None         # training began (model, adapter, data and trainer ready)
    first_step_at: float | None = None    # its first optimizer step began (after the evaluation at step 0)
    trial_in_process: int | None = None   # 1: the first trial of its process (cold); 2, 3, ...: on a warm worker
    warm_base: bool | None = None         # the base was already loaded in this process (a sweep worker's)
    base_load_s: float | None = None      # building and loading the base (0 when warm)
    base_from: str | None = None          # where the base came from: its source, or the quantized cache
    phase_s: dict = field(default_factory=dict)  # seconds in each phase: plan, base, adapter, trainer (its setup)
    memory_at_start_gb: float | None = None  # CUDA memory allocated as the trial began: on a warm worker its base and
                                          # whatever earlier trials left (flat from trial to trial: nothing leaks)
    device_used_at_start_gb: float | None = None  # the GPU's memory in use as it began (cudaMemGetInfo): also what
                                          # the allocator does not count (managed memory, other processes)
    paged_states: dict | None = None      # a paged optimizer's state buffers: how many, how many newly allocated (a
                                          # warm worker's trial reuses the last one's: qlora_exp.paged), the pool's GiB
    engine: str | None = None             # trainer.engine as it ran: hf, or unsloth and its version
    error: str | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def run_trial(cfg: DictConfig) -> TrialResult:
    """The recipe's phases (qlora_exp.recipe): plan, build base, attach adapter, train, collect. In a sweep worker
    the base (and the tokenized rows) of the previous trial are reused when this trial's are the same."""
    from qlora_exp import distributed, recipe
    from sweeper import stop

    stop.at_safe_points()  # in a sweep worker, Ctrl-C cuts this trial short at stop.check(), not mid-import or mid-load
    from qlora_exp.quiet import import_bitsandbytes, quiet_console

    quiet_console()  # the terminal gets the trial's own lines; the log file, everything
    import_bitsandbytes()  # before anything else imports it: no hub call for its CPU kernel
    start = time.time()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = recipe.plan_trial(cfg)  # ConfigError here: nothing heavy is loaded before the checks pass
    if not distributed.inside():
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if plan.world_size > 1:  # the ranks run the phases below; rank 0's metrics.json is the result
            if recipe.WARM.base is not None:  # a sweep worker's kept base: its GPU memory goes to the ranks' copies
                recipe.forget_warm()
            return distributed.launch(out / "config.yaml", plan.world_size, _in_our_sweep())
    first = distributed.is_rank(0)  # a multi-process trial's other ranks write nothing of their own
    if first:
        recipe.note_plan(plan)
    result = TrialResult(status="failed", objective=None, optimizer=plan.optimizer, precision=plan.precision,
                         device=plan.device.name, cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                         slurm_job_id=os.environ.get("SLURM_JOB_ID"), micro_batch_size=plan.micro_batch_size,
                         grad_accum=plan.grad_accum, gradient_checkpointing=plan.gradient_checkpointing,
                         checkpointed_layers=plan.checkpointed_layers, offload_checkpoints=plan.offload_checkpoints,
                         compile_layers=plan.compile_layers, packing=plan.packing,
                         fused_kernels=plan.fused_note, memory_plan=plan.memory_note, started_at=round(start, 3),
                         process_started_at=_process_start(), trial_in_process=recipe.WARM.trials + 1,
                         world_size=plan.world_size, engine=plan.engine)
    from qlora_exp.callbacks import TrialBoard  # after the checks: it imports transformers
    from sweeper.tensorboard import ROW_FILE

    # in a sweep of this project's sweeper, the driver writes the trial's HPARAMS row, with the study's own state
    board = TrialBoard((cfg.paths.get("tensorboard_dir") or str(out / "tensorboard")) if first else None,
                       row_file=out / ROW_FILE if _in_our_sweep() else None)
    base = model = None
    try:
        import torch

        result.cpu_threads = torch.get_num_threads()
        if torch.cuda.is_available():
            result.memory_at_start_gb = round(torch.cuda.memory_allocated() / 2**30, 3)
            free, total = torch.cuda.mem_get_info()
            result.device_used_at_start_gb = round((total - free) / 2**30, 3)
        # the rows (a hub dataset that cannot be reached fails here: recorded in metrics.json like any failure)
        train_rows, eval_rows = recipe.rows_for(cfg, plan)
        log.info("trial folder %s: %d train / %d eval rows, %s on %s, optimizer %s", out, len(train_rows),
                 len(eval_rows), plan.precision, plan.device.name, plan.optimizer)
        mark = _phase(result, "plan", start)
        stop.check()
        base = recipe.build_base(cfg, plan, train_rows, eval_rows)
        result.quantized, result.warm_base, result.base_load_s = base.quantized, base.warm, base.load_s
        result.base_from = getattr(base.model, "qlora_exp_came_from", None)
        mark = _phase(result, "base", mark)
        stop.check()
        model = recipe.attach_adapter(base, cfg, plan)
        _phase(result, "adapter", mark)
        stop.check()
        run = recipe.train(cfg, plan, base, model, out, board, train_rows, eval_rows)
        recipe.collect(cfg, plan, base, model, run, out, result)
    except BaseException as e:
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
        board.interrupted = not isinstance(e, Exception)  # Ctrl-C, a kill, a requeue: not a finished trial
        recipe.forget_warm()  # out of memory, a half-built base: the next trial in this process starts clean
        base = model = None
        raise
    finally:
        if base is not None:
            recipe.release(base, model)
        result.wall_time_s = round(time.time() - start, 2)
        if first:
            result.write(out / "metrics.json")
        board.finish(cfg, result)  # the TensorBoard hparams row: complete, pruned or failed
    if not first:
        return result
    log.info("trial %s: eval_loss %.4f (from %.4f), %.0f tokens/s, peak %.2f GiB, %.1f s", result.status,
             result.eval_loss, result.initial_eval_loss or float("nan"), result.train_tokens_per_s,
             result.peak_memory_gb, result.wall_time_s)
    return result


def _in_our_sweep() -> bool:
    """A trial of a `-m` run through this project's sweeper (hydra/sweeper=qlora_exp), not Hydra's basic one."""
    from qlora_exp.distributed import IN_SWEEP_ENV

    if os.environ.get(IN_SWEEP_ENV) == "1":  # a rank of such a trial: it has no Hydra of its own
        return True
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN and "QLoRAOptunaSweeper" in str(hc.sweeper.get("_target_", ""))
    except (ImportError, ValueError):
        return False


def _phase(result: TrialResult, name: str, since: float) -> float:
    now = time.time()
    result.phase_s[name] = round(now - since, 3)
    return now


def _process_start() -> float | None:
    """When this process started (epoch seconds, from /proc): a cold trial's start-up includes its imports."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return round(boot + ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, StopIteration, IndexError):
        return None


