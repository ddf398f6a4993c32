"""Pure mappers from config groups to library objects: one place each (trl's scripts do the same).

    build_quantization_config(cfg.quantization, compute_dtype) -> BitsAndBytesConfig | None
    build_lora_config(cfg.lora, target_modules)                -> peft.LoraConfig
    build_sft_config(cfg, output_dir, optim, precision)        -> trl.SFTConfig
"""
from omegaconf import DictConfig

from qlora_exp.device import DeviceInfo


def resolve_precision(precision: str, device: DeviceInfo) -> str:
    """`trainer.precision` -> the precision used here: bf16 | fp16 | fp32."""
    if precision == "auto":
        return "bf16" if device.bf16 else "fp32"
    return precision


def build_quantization_config(q: DictConfig, compute_dtype):
    """nf4 / fp4 -> 4-bit BitsAndBytesConfig; int8 -> 8-bit; none -> None (plain LoRA)."""
    import torch
    from transformers import BitsAndBytesConfig

    if q.method == "none":
        return None
    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.method,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def build_lora_config(lora: DictConfig, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      target_modules=list(target_modules), use_rslora=lora.use_rslora, task_type="CAUSAL_LM")


def build_sft_config(cfg: DictConfig, output_dir: str, optim: str, precision: str, use_cpu: bool,
                     micro_batch_size: int, grad_accum: int, checkpointing: bool, prepared: bool = False,
                     eval_batch_size: int | None = None, world_size: int = 1):
    """The trainer arguments. transformers 5: a float `warmup_steps` below 1 is a ratio. The split of a step
    into micro-batches and the checkpointing come resolved (qlora_exp.memory). Packing is not trl's (which
    re-cuts the dataset into full rows): the trial gives the trainer a PackedBatchCollator (qlora_exp.packing).
    `prepared`: the datasets come tokenized and truncated by an earlier trial's trainer of this process (the same
    data, tokenizer and max_length), so trl's preparation is skipped. `world_size` > 1: one rank of a multi-process
    trial (qlora_exp.distributed); its evaluation batches are one process's (`eval_batch_size`)."""
    from trl import SFTConfig

    tr, opt = cfg.trainer, cfg.optimizer
    save = tr.save_checkpoints
    return SFTConfig(
        output_dir=output_dir,
        max_steps=tr.max_steps,
        num_train_epochs=tr.epochs,
        per_device_train_batch_size=micro_batch_size,
        per_device_eval_batch_size=eval_batch_size or micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=opt.lr,
        weight_decay=opt.weight_decay,
        lr_scheduler_type=opt.scheduler,
        lr_scheduler_kwargs=lr_scheduler_kwargs(opt, tr.max_steps),
        warmup_steps=opt.warmup,
        max_grad_norm=opt.max_grad_norm if opt.max_grad_norm is not None else 0.0,
        optim=optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=use_cpu,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        eval_strategy="steps",
        eval_steps=tr.eval_every,
        eval_on_start=True,
        logging_steps=tr.log_every,
        logging_first_step=True,
        save_strategy="steps" if save else "no",
        save_steps=tr.eval_every,
        save_total_limit=2 if save else None,
        save_only_model=False,
        report_to="none",
        seed=tr.seed,
        data_seed=tr.seed,
        max_length=tr.max_length,
        assistant_only_loss=cfg.data.assistant_only_loss,
        dataloader_num_workers=tr.num_workers,
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
        dataset_kwargs={"skip_prepare_dataset": True} if prepared else None,
        # DDP over the LoRA parameters alone: every one of them has a gradient each step
        ddp_backend=("gloo" if use_cpu else None) if world_size > 1 else None,
        ddp_find_unused_parameters=False if world_size > 1 else None,
    )


def lr_scheduler_kwargs(opt: DictConfig, max_steps: int) -> dict:
    """What the scheduler takes beyond warmup and the step count (transformers' `lr_scheduler_kwargs`): the final
    lr of the *_min_lr schedulers, the decay steps of warmup_stable_decay; nothing for the others."""
    from qlora_exp.validate import decay_steps

    if opt.scheduler in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        return {"min_lr_rate": float(opt.min_lr_rate)}
    if opt.scheduler == "warmup_stable_decay":
        return {"num_decay_steps": decay_steps(opt.cooldown, max_steps)}
    return {}
