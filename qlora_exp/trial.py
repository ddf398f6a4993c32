"""One QLoRA trial: a composed config in, a trained adapter and its metrics out.

    result = run_trial(cfg)          # cfg: the composed Hydra config (conf/config.yaml)
    result.objective                 # the value a sweeper minimizes (cfg.objective)

Steps, top to bottom: check the config and read the data (no model yet), build or locate the base
model, load it quantized through BitsAndBytesConfig, prepare it for k-bit training, attach LoRA,
train with trl's SFTTrainer, evaluate, save the adapter (safetensors) and `metrics.json`.
Raises `ConfigError` for bad input before any model is loaded; any other failure is recorded in
`metrics.json` as status "failed" with its reason, then re-raised.
"""
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qlora_exp.builders import build_lora_config, build_quantization_config, build_sft_config, resolve_precision
from qlora_exp.data import load_rows
from qlora_exp.device import probe_device
from qlora_exp.kernels import apply_fused_kernels, resolve_fused_kernels
from qlora_exp.memory import plan_memory
from qlora_exp.packing import PackedBatchCollator, layout_for
from qlora_exp.validate import check_config, optimizer_for_device, resolve_target_modules

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
    steps: int | None = None
    optimizer: str | None = None          # the optimizer actually used (after any CPU fallback)
    precision: str | None = None
    device: str | None = None
    micro_batch_size: int | None = None   # examples per micro-step (after any memory plan)
    grad_accum: int | None = None
    gradient_checkpointing: bool | None = None
    checkpointed_layers: int | None = None  # with checkpointing: how many decoder layers recompute (None: all)
    packing: str | None = None            # off | rows | flat (qlora_exp.packing)
    train_rows: int | None = None         # sequences the model was fed in training (packed rows hold several examples)
    train_positions: int | None = None    # token positions it computed in training, padding included
    quantized: dict | None = None         # what the loaded base really holds: bitsandbytes layers, quant type, nesting
    fused_kernels: str | None = None      # which, or off and why (qlora_exp.kernels)
    memory_plan: str | None = None        # the plan's one line, when trainer.memory_budget_gb chose the split
    eval_history: list = field(default_factory=list)   # [[step, eval_loss], ...]
    loss_history: list = field(default_factory=list)   # [[step, train loss], ...] every trainer.log_every steps
    resumed_from_step: int | None = None  # set when the trial resumed from a checkpoint (after preemption)
    cuda_visible_devices: str | None = None  # the GPUs this trial's process was given
    cpu_threads: int | None = None        # torch's intra-op threads (OMP_NUM_THREADS; a SLURM trial: its cpus_per_task)
    slurm_job_id: str | None = None
    error: str | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def run_trial(cfg: DictConfig) -> TrialResult:
    start = time.time()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- checks and data: nothing heavy is loaded before these pass ---------------------------
    # before CUDA's allocator starts: segments that grow in place keep reserved memory close to allocated,
    # which the memory budget's cap (set_per_process_memory_fraction) counts
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = probe_device()
    check_config(cfg, device)
    target_modules = resolve_target_modules(cfg)
    optim, fallback_note = optimizer_for_device(cfg.optimizer.name, device)
    if fallback_note:
        warnings.warn(fallback_note, stacklevel=1)
        log.warning(fallback_note)
    precision = resolve_precision(cfg.trainer.precision, device)
    fused, fused_note = resolve_fused_kernels(cfg.trainer.fused_kernels, cfg.model.architecture, device.cuda)
    plan = plan_memory(cfg, device, fused)
    train_rows, eval_rows = load_rows(cfg.data, cfg.trainer.seed)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("trial folder %s: %d train / %d eval rows, %s on %s, optimizer %s", out, len(train_rows),
             len(eval_rows), precision, device.name, optim)

    tr = cfg.trainer
    micro = plan.micro_batch_size if plan else (tr.get("micro_batch_size") or tr.batch_size)
    result = TrialResult(status="failed", objective=None, optimizer=optim, precision=precision, device=device.name,
                         cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                         slurm_job_id=os.environ.get("SLURM_JOB_ID"), micro_batch_size=micro,
                         grad_accum=plan.grad_accum if plan else tr.batch_size * tr.grad_accum // micro,
                         gradient_checkpointing=plan.gradient_checkpointing if plan else bool(tr.gradient_checkpointing),
                         checkpointed_layers=plan.checkpointed_layers if plan else tr.get("checkpointed_layers"),
                         packing=layout_for(tr.packing_layout, cfg.model.attn_implementation) if tr.packing else "off",
                         fused_kernels=fused_note, memory_plan=plan.note if plan else None)
    for note in (f"fused kernels: {fused_note}", plan and plan.note):
        if note:
            log.info(note)
    from qlora_exp.callbacks import TrialBoard  # after the checks: it imports transformers

    board = TrialBoard(cfg.paths.get("tensorboard_dir") or str(out / "tensorboard"))
    try:
        _train(cfg, out, device, target_modules, optim, precision, fused, train_rows, eval_rows, result, board)
    except BaseException as e:
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
        board.interrupted = not isinstance(e, Exception)  # Ctrl-C, a kill, a requeue: not a finished trial
        raise
    finally:
        result.wall_time_s = round(time.time() - start, 2)
        result.write(out / "metrics.json")
        board.finish(cfg, result)  # the TensorBoard hparams row: complete, pruned or failed
    log.info("trial %s: eval_loss %.4f (from %.4f), %.0f tokens/s, peak %.2f GiB, %.1f s", result.status,
             result.eval_loss, result.initial_eval_loss or float("nan"), result.train_tokens_per_s,
             result.peak_memory_gb, result.wall_time_s)
    return result


def _train(cfg, out, device, target_modules, optim, precision, fused, train_rows, eval_rows, result, board):
    import torch
    from datasets import Dataset
    from hydra.utils import instantiate
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed
    from trl import SFTTrainer

    from qlora_exp.callbacks import TensorBoardScalars, TrialMetrics, peak_memory_gb
    from qlora_exp.models import load_base_model, load_tokenizer, random_model_dir, tokenizer_corpus, torch_dtype
    from qlora_exp.validate import check_lengths

    # ---- base model, quantized --------------------------------------------------------------
    result.cpu_threads = torch.get_num_threads()
    m = cfg.model
    source = str(random_model_dir(m, cfg.paths.cache_dir, tokenizer_corpus(cfg.paths))) if m.random_init else m.name_or_path
    if device.cuda:  # after any random-weight build: peak memory is the trial's (load, train, eval), not the build's
        torch.cuda.reset_peak_memory_stats()
        budget = cfg.trainer.get("memory_budget_gb")
        if budget:  # a hard cap: past it the allocator raises out-of-memory instead of taking more
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / total))
    tokenizer = load_tokenizer(source, m)
    check_lengths(cfg, train_rows, eval_rows, tokenizer)  # done before the trial when its tokenizer was at hand
    compute_dtype = torch_dtype(cfg.quantization.compute_dtype, device.bf16)
    quant = build_quantization_config(cfg.quantization, compute_dtype)
    dtype = torch_dtype(m.dtype, device.bf16) if quant is None else compute_dtype
    device_map = {"": torch.cuda.current_device()} if device.cuda else None
    model = load_base_model(source, m, quant, dtype, device_map)
    result.quantized = quantized_layers(model)
    model.config.use_cache = False  # also what lets packed batches keep examples apart (qlora_exp.packing)
    if fused:
        apply_fused_kernels(model)
    ckpt = result.gradient_checkpointing
    if quant is not None and cfg.quantization.upcast_frozen:  # the article's: frozen non-quantized weights in fp32
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:  # what prepare_model_for_kbit_training does, less the fp32 upcast
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    partial = ckpt and result.checkpointed_layers is not None
    if partial:  # recompute only the first N decoder layers; the rest keep their activations
        from transformers.modeling_layers import GradientCheckpointingLayer

        if quant is None or cfg.quantization.upcast_frozen:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = [mod for mod in model.modules() if isinstance(mod, GradientCheckpointingLayer)]
        for layer in layers[result.checkpointed_layers:]:
            layer.gradient_checkpointing = False

    # ---- LoRA -------------------------------------------------------------------------------
    set_seed(cfg.trainer.seed)  # here, not earlier: building a random-weight base model draws from the same RNG
    model = get_peft_model(model, build_lora_config(cfg.lora, target_modules))
    result.trainable_params, result.total_params = (int(n) for n in model.get_nb_trainable_parameters())

    # ---- train ------------------------------------------------------------------------------
    metrics = TrialMetrics()
    tb = TensorBoardScalars(board.writer, metrics)
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    args = build_sft_config(cfg, str(out / "checkpoints"), optim, precision, use_cpu=not device.cuda,
                            micro_batch_size=result.micro_batch_size, grad_accum=result.grad_accum,
                            checkpointing=ckpt and not partial)  # partial: enabled above, per layer
    collator = None
    if result.packing != "off":
        collator = PackedBatchCollator(pad_token_id=tokenizer.pad_token_id, max_length=cfg.trainer.max_length,
                                       layout=result.packing)
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer,
        callbacks=[metrics, tb, *extra],
    )
    fed = _count_training_inputs(trainer.model, result)
    last = _last_checkpoint(out / "checkpoints")
    result.resumed_from_step = int(last.rsplit("-", 1)[-1]) if last else None
    try:
        trainer.train(resume_from_checkpoint=last)
        stop_reason = next((c.stop_reason for c in extra if getattr(c, "stop_reason", None)), None)
        if stop_reason is None and (not metrics.eval_history or metrics.eval_history[-1][0] != trainer.state.global_step):
            trainer.evaluate()
    finally:
        tb.close()
        fed.remove()

    # ---- results ----------------------------------------------------------------------------
    if cfg.trainer.save_adapter:
        trainer.model.save_pretrained(out / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(out / "adapter")
    state = trainer.state
    result.status = stop_reason or "complete"
    result.eval_history = [list(x) for x in metrics.eval_history]
    result.initial_eval_loss = metrics.eval_history[0][1] if metrics.eval_history else None
    result.eval_loss = metrics.eval_history[-1][1] if metrics.eval_history else None
    result.perplexity = math.exp(min(result.eval_loss, 50)) if result.eval_loss is not None else None
    result.train_tokens = int(state.num_input_tokens_seen)
    result.train_tokens_per_s = round(metrics.tokens_per_s(state), 1)
    steady = metrics.steady_tokens_per_s()
    result.steady_tokens_per_s = round(steady, 1) if steady else None
    result.loss_history = [list(x) for x in metrics.loss_history]
    result.train_time_s = round(metrics.train_time, 2)
    result.steps = state.global_step
    gb, kind = peak_memory_gb()
    result.peak_memory_gb, result.peak_memory_kind = round(gb, 3), kind
    if device.cuda:
        result.peak_memory_reserved_gb = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    result.objective = getattr(result, cfg.objective)


def quantized_layers(model) -> dict | None:
    """What bitsandbytes put in the loaded model, read from its modules: {"Linear4bit": 28, "quant_type": "nf4",
    "double_quant": true} (4-bit), {"Linear8bitLt": 28} (int8), or None for an unquantized base."""
    import bitsandbytes as bnb

    layers = [mod for mod in model.modules() if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    if not layers:
        return None
    kinds = sorted({type(mod).__name__ for mod in layers})
    out: dict = {k: sum(type(mod).__name__ == k for mod in layers) for k in kinds}
    states = [mod.weight.quant_state for mod in layers if getattr(mod.weight, "quant_state", None) is not None]
    if states:
        out["quant_type"] = ",".join(sorted({s.quant_type for s in states}))
        out["double_quant"] = all(s.nested for s in states)
        out["quant_state_layers"] = len(states)
    return out


def _count_training_inputs(model, result: TrialResult):
    """A forward pre-hook counting the rows and token positions fed to the model while it trains (not in eval)."""
    result.train_rows, result.train_positions = 0, 0

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and ids is not None:
            result.train_rows += int(ids.shape[0])
            result.train_positions += int(ids.numel())

    return model.register_forward_pre_hook(count, with_kwargs=True)


def _last_checkpoint(folder: Path) -> str | None:
    """Resume from the newest Trainer checkpoint of this trial folder (after preemption)."""
    if not folder.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(folder))
    if last:
        log.info("resuming from %s", last)
    return last
