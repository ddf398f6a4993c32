"""Micro-batch and gradient checkpointing chosen from a GPU memory budget (`trainer.memory_budget_gb`).

    plan = plan_memory(cfg, device)   # None unless something is left to choose
    plan.micro_batch_size, plan.grad_accum, plan.gradient_checkpointing, plan.checkpointed_layers

The examples per optimizer step stay what the config says (`trainer.batch_size` x `trainer.grad_accum`): only
how they are split into micro-batches and how many decoder layers recompute their activations is chosen, so
the plan changes speed and memory, never the optimization. Keys left to choose: `trainer.micro_batch_size: auto`
and/or `trainer.gradient_checkpointing: auto`. Among the splits whose estimate fits the budget the plan takes the
fastest by the cost model below; when none fits it says so in one line, before any model is loaded. On the GPU
the trial also caps its process at the budget (torch.cuda.set_per_process_memory_fraction): past it, an
out-of-memory error, never more memory.

The estimate (peak allocated bytes), from the model's `shape`, for a micro-batch of t tokens (the worst case:
micro-batch x max_length) with n of the L decoder layers checkpointed:
  fixed        linear weights x bytes per param (NF4/FP4 + double quant 0.52, int8 1.0, none 2.0)
               + embeddings, LM head, norms (fp32 with quantization.upcast_frozen, else the compute dtype, 2)
               + LoRA parameters x 16 (fp32 weight, gradient, two Adam moments), x 8 with a paged optimizer
                 (its moments live in CUDA managed memory, outside the allocator)
  activations  t x [ (L - n) x A  +  n x residual x hidden  +  (A if n else 0) ]
               A = ACT_H x hidden + ACT_I x intermediate: what one layer keeps for backward, per token, with
               LoRA dropout; with lora.dropout 0 less by DROPOUT_KEPT per targeted projection (each of them
               keeps its own dropped-out copy of its input and the mask; without dropout, their shared input)
               residual: 2 or 4 bytes (the layer input a checkpointed layer keeps; 0 with
               trainer.offload_checkpoints, which keeps it in CPU memory); the last term: the one layer being
               recomputed
  head         t x HEAD_PER_TOKEN (trl's fused LM head works in tiles: no (t x vocab) logits)
(the activations and head times SAFETY; the weights are counted exactly). Measured on one H200 (Llama-3-8B shape, 8 examples per micro-batch of the recipe's rows, Liger,
no upcast: docs/benchmarks.md): every layer checkpointed 9.22 GiB, none 54.16, 16 of 32 31.07: linear,
1.40 GiB per layer not checkpointed at about 6,500 tokens (226 KB per token and layer). The constants below
are 10 % above that; the upcast ones come from the same runs with fp32 frozen weights.

Per micro-batch (trainer.gradient_checkpointing auto, on a GPU): the depth above is the worst micro-batch's, m x
max_length tokens, which few hold (the recipe's rows: 8 of median ~600 tokens pack into 4-7 rows of 1024). The plan
also gives each depth the most tokens that fit the budget (`Plan.max_tokens`, from the same estimate), and a hook
before the model's forward (recipe.recompute_by_tokens) recomputes only as many layers as each micro-batch's own
tokens need: on one H200 at 24 GiB, 15-21 of 32 (mean 18.2) instead of 23 for every one (docs/benchmarks.md).

The cost model (relative time of one optimizer step): micro-steps x (t + MICRO_OVERHEAD_TOKENS) x
(1 + RECOMPUTE x n / L). Measured there: 6,308 tokens/s with all 32 layers recomputed, 8,084 with 16,
9,372 with none (RECOMPUTE 0.49); 8 examples in one micro-batch 4,430 tokens/s against 2,449 in four.
With the checkpointed layers' inputs offloaded, x (1 + OFFLOAD x n / L): at 24 GiB, 7,339 tokens/s offloaded with 22
layers against 8,179 kept with 23 (OFFLOAD 0.19); `offload="auto"` plans both ways and takes the cheaper.
"""
from dataclasses import dataclass

from omegaconf import DictConfig

from qlora_exp.errors import ConfigError

ACT_H, ACT_I = 40.0, 8.0             # bytes kept per token and layer, per hidden / intermediate unit (bf16 stream)
ACT_H_UPCAST = 62.0                  # with the fp32 residual stream of quantization.upcast_frozen
LIGER_ACT_I = 6.0                    # Liger's SwiGLU keeps gate and up only
HEAD_PER_TOKEN = 64 * 1024
WEIGHT_BYTES = {"nf4": 0.52, "fp4": 0.52, "int8": 1.0, "none": 2.0}
SAFETY = 1.10
# bytes per token and unit of the projection's input width that lora.dropout > 0 keeps and 0 does not: the copy
# (2) and mask (1) of each projection's input, less the input itself where a dropout-free adapter keeps it (shared
# by q, k, v and by gate, up; o's is the attention output, which attention keeps anyway)
DROPOUT_KEPT = {"q_proj": 7 / 3, "k_proj": 7 / 3, "v_proj": 7 / 3, "o_proj": 3.0, "gate_proj": 2.0, "up_proj": 2.0,
                "down_proj": 1.0}
MICRO_OVERHEAD_TOKENS = 4096         # the Python and launch work of a micro-step through 224 LoRA-wrapped 4-bit layers
RECOMPUTE = 0.49                     # all layers recomputed: 1.49 x the time of none
OFFLOAD = 0.19                       # every checkpointed layer's input offloaded: 1.19 x the time of keeping them


@dataclass
class Plan:
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    checkpointed_layers: int | None   # None: every layer (when checkpointing)
    estimate_gb: float
    budget_gb: float
    note: str
    offload: bool = False             # the checkpointed layers' inputs wait in CPU memory (trainer.offload_checkpoints)
    # with trainer.gradient_checkpointing auto on a GPU: for depth n = 0 .. the plan's, the most tokens a micro-batch
    # may hold with n layers recomputing; each micro-batch recomputes only as many as its own tokens need (depth_for)
    max_tokens: tuple[int, ...] | None = None


def _bytes(cfg: DictConfig, checkpointed: int, fused: bool, offload: bool) -> tuple[float, float]:
    """(fixed bytes, bytes per token of a micro-batch) with `checkpointed` decoder layers recomputing (module
    docstring), the margin included in the second."""
    from qlora_exp.validate import resolve_target_modules

    shape = cfg.model.shape
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    kv = h // shape.num_attention_heads * shape.get("num_key_value_heads", shape.num_attention_heads)
    tied = bool(shape.get("tie_word_embeddings", False))
    params = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    method = cfg.quantization.method
    upcast = method != "none" and bool(cfg.quantization.get("upcast_frozen"))
    frozen_bytes = 4 if upcast else 2
    fixed = layers * sum(a * b for a, b in params.values()) * WEIGHT_BYTES.get(method, 2.0)
    fixed += shape.vocab_size * h * (1 if tied else 2) * frozen_bytes + layers * 2 * h * frozen_bytes
    # LoRA: fp32 weight and gradient, and the two Adam moments unless a paged optimizer keeps them in CUDA managed
    # memory (outside the allocator the budget caps and max_memory_allocated counts)
    per_lora = 8 if str(cfg.optimizer.get("name", "")).startswith("paged") else 16
    targets = resolve_target_modules(cfg)
    fixed += layers * cfg.lora.r * sum(sum(params.get(t, (h, h))) for t in targets) * per_lora
    per_layer = h * (ACT_H_UPCAST if upcast else ACT_H) + i * (LIGER_ACT_I if fused else ACT_I)
    if not cfg.lora.dropout:
        per_layer -= sum(DROPOUT_KEPT.get(name, 0.0) * params[name][0] for name in targets if name in params)
    kept_input = 0 if offload else frozen_bytes * h
    act = (layers - checkpointed) * per_layer + checkpointed * kept_input + (per_layer if checkpointed else 0)
    return fixed, (act + HEAD_PER_TOKEN) * SAFETY  # the margin on what varies: the weights are exact


def estimate_gb(cfg: DictConfig, micro_batch_size: int, checkpointed: int, fused: bool = False,
                offload: bool = False, tokens: int | None = None) -> float:
    """Peak allocated GiB with `checkpointed` of the model's decoder layers recomputing, their inputs in CPU memory
    with `offload`, for a micro-batch of `tokens` (default: the worst case, micro-batch x max_length)."""
    fixed, per_token = _bytes(cfg, checkpointed, fused, offload)
    tokens = micro_batch_size * cfg.trainer.max_length if tokens is None else tokens
    return (fixed + tokens * per_token) / 2**30


def max_tokens(cfg: DictConfig, checkpointed: int, budget_gb: float, fused: bool = False,
               offload: bool = False) -> int:
    """The most tokens a micro-batch may hold within `budget_gb` with `checkpointed` layers recomputing (0: none)."""
    fixed, per_token = _bytes(cfg, checkpointed, fused, offload)
    return max(0, int((budget_gb * 2**30 - fixed) // per_token))


def depth_for(tokens: int, table: tuple[int, ...]) -> int:
    """The fewest decoder layers to recompute for a micro-batch of `tokens` (`Plan.max_tokens`): the first depth
    whose token limit holds it, else the plan's (the table's last)."""
    return next((n for n, limit in enumerate(table) if tokens <= limit), len(table) - 1)


def step_cost(tokens_per_step: int, micro_tokens: int, checkpointed: int, layers: int, offload: bool = False) -> float:
    """Relative time of one optimizer step (module docstring)."""
    return (tokens_per_step / micro_tokens * (micro_tokens + MICRO_OVERHEAD_TOKENS) * (1 + RECOMPUTE * checkpointed / layers)
            * (1 + OFFLOAD * checkpointed / layers if offload else 1))


def plan_memory(cfg: DictConfig, device, fused: bool = False, offload: bool | str = False) -> Plan | None:
    """The split of each optimizer step under `trainer.memory_budget_gb` (null: 90 % of the GPU's memory);
    None when nothing is left to choose. `device`: a qlora_exp.device.DeviceInfo; `offload`: checkpointed layers
    keep their inputs in CPU memory (trainer.offload_checkpoints); "auto": when that makes the step cheaper by the
    cost model (a larger micro-batch or less recomputation fits), on a GPU."""
    tr = cfg.trainer
    micro_auto = tr.get("micro_batch_size") == "auto"
    ckpt_auto = tr.gradient_checkpointing == "auto"
    if not (micro_auto or ckpt_auto):
        return None
    layers = cfg.model.shape.num_hidden_layers
    per_step = tr.batch_size * tr.grad_accum
    given = tr.batch_size if tr.get("micro_batch_size") in (None, "auto") else tr.micro_batch_size
    micros = [m for m in range(1, per_step + 1) if per_step % m == 0] if micro_auto else [given]
    if ckpt_auto:
        depths = list(range(layers + 1))
    elif tr.gradient_checkpointing:
        depths = [layers if tr.get("checkpointed_layers") is None else tr.checkpointed_layers]
    else:
        depths = [0]
    if not device.cuda:  # nothing to fit: the largest micro-batch, the least recomputation allowed
        m, n = max(micros), min(depths)
        return _plan(cfg, m, n, per_step, layers, fused, offload is True, 0.0, "no CUDA device")
    budget = tr.get("memory_budget_gb") or round(0.9 * device.memory_gb, 1)
    ways = (False, True) if offload == "auto" else (bool(offload),)  # auto: plan both ways, take the cheaper
    fits = [(m, n, o) for m in micros for n in depths for o in ways
            if (n or not o or len(ways) == 1) and estimate_gb(cfg, m, n, fused, o) <= budget]
    if not fits:
        m, n = min(micros), max(depths)
        raise ConfigError("trainer.memory_budget_gb", budget,
                          f"at least {estimate_gb(cfg, m, n, fused, max(ways)):.1f} (GiB) for {cfg.model.name} at "
                          f"max_length {tr.max_length} (the estimated peak with micro-batch {m} and checkpointing)")
    tokens = per_step * tr.max_length
    m, n, offload = min(fits, key=lambda f: (step_cost(tokens, f[0] * tr.max_length, f[1], layers, f[2]), -f[0]))
    # the depth above is the worst micro-batch's (m x max_length tokens): most hold fewer and need less
    limits = tuple(max_tokens(cfg, k, budget, fused, offload) for k in range(n + 1)) if ckpt_auto and n else None
    return _plan(cfg, m, n, per_step, layers, fused, offload, budget, f"{budget:g} GiB", limits)


def _plan(cfg, m, n, per_step, layers, fused, offload, budget, why, limits=None) -> Plan:
    offload = offload and n > 0
    est = estimate_gb(cfg, m, n, fused, offload)
    ckpt = "off" if n == 0 else "every layer" if n == layers else f"{n} of {layers} layers"
    ckpt += ", their inputs offloaded to CPU memory" if offload else ""
    per_batch = (f"; a micro-batch of at most {limits[0]:,} tokens recomputes none, a longer one only the layers its "
                 f"tokens need") if limits else ""
    return Plan(m, per_step // m, n > 0, None if n in (0, layers) else n, est, budget,
                f"memory plan for {why}: micro-batch {m} x {per_step // m} accumulation, checkpointing {ckpt} "
                f"(estimated peak {est:.1f} GiB{per_batch})", offload, limits)


def trial_peak_gb(cfg: DictConfig) -> float:
    """A trial's estimated peak GiB as its config splits each step (the sweeper's slots_per_gpu=auto): the memory
    plan's choice when something is auto, else the configured micro-batch and checkpointing."""
    tr = cfg.trainer
    micro = tr.get("micro_batch_size")
    micro = tr.batch_size if micro in (None, "auto") else int(micro)
    layers = cfg.model.shape.num_hidden_layers
    ckpt = tr.gradient_checkpointing
    n = 0 if ckpt in (False, "auto") else (layers if tr.get("checkpointed_layers") is None else tr.checkpointed_layers)
    return estimate_gb(cfg, micro, n, fused=False, offload=tr.get("offload_checkpoints") is True)
