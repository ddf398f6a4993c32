"""A random-weight base of any size built straight into its 4-bit form (`model.random_build: quantized`).

The architecture is made on the meta device (no memory); each weight is then drawn on the GPU (or CPU) as
transformers would initialise it and, for the decoder's linear layers, quantized by bitsandbytes before the
next is drawn, so the model never exists whole in bf16: the 8B shape peaks at its NF4 size (~5.4 GiB) plus one
layer, the 70B at ~37 GiB. The result is the checkpoint `save_pretrained` writes for a bitsandbytes 4-bit model
(packed weights, their quantization constants, `quantization_config` in config.json), in safetensors shards,
so `from_pretrained` loads it as it is.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
SHARD_BYTES = 2 * 2**30  # safetensors shards of about this size: the build holds at most one in memory


def build_quantized(config, quantization, seed: int, out: Path, device: str) -> Path:
    """Write the quantized random-weight checkpoint of `config` (a transformers config with its token ids) into
    `out`: weights ~ N(0, initializer_range) for linear layers and embeddings, ones for norms, zeros for biases."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = quantization
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the non-quantized weights, as a trial keeps them
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.method,
                                    bnb_4bit_use_double_quant=bool(q.double_quant),
                                    bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_quant_storage=getattr(torch, q.quant_storage))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator(device=device).manual_seed(int(seed))
    linear = {f"{n}.weight" for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    shard: dict = {}
    shards: list[list[str]] = []  # the names in each shard written (the tensors themselves are let go)
    size = total = 0

    def flush():
        nonlocal shard, size
        if shard:
            shards.append(list(shard))
            save_file(shard, str(out / f".shard-{len(shards):05d}"), metadata={"format": "pt"})
            shard, size = {}, 0

    for name, param in model.named_parameters():
        if name in linear:
            w = torch.empty(param.shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)
            packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=bool(q.double_quant),
                                            quant_type=q.method, quant_storage=getattr(torch, q.quant_storage))
            del w
            tensors = {name: packed, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}}
        elif name.endswith("norm.weight") or ".norm" in name or "layernorm" in name:
            tensors = {name: torch.ones(param.shape, dtype=dtype)}
        elif name.endswith(".bias"):
            tensors = {name: torch.zeros(param.shape, dtype=dtype)}
        else:  # embeddings, the LM head
            tensors = {name: torch.empty(param.shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)}
        for key, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            shard[key] = t
            size += t.numel() * t.element_size()
            total += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    weight_map = {}
    for i, (keys, name) in enumerate(zip(shards, names, strict=True)):
        (out / f".shard-{i + 1:05d}").rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.quantization_config = bnb_config.to_dict()
    config.save_pretrained(out)
    log.info("built %.2f GiB of %s weights in %d shard(s)", total / 2**30, q.method, len(shards))
    return out
