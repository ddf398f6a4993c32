"""Fused kernels (`trainer.fused_kernels: auto | true | false`): Liger's RMSNorm, SwiGLU and RoPE on the GPU.

The loss needs nothing here: trl's SFTTrainer already computes it through a fused, tiled LM head that never
materializes the (tokens x vocab) logits. Liger's kernels are Triton, so they need CUDA and the `liger-kernel`
package (the `gpu` extra); `auto` uses them when both are there and the architecture is one Liger patches, and
otherwise trains with the model's own modules and says why in the log and in metrics.json (`fused_kernels`).
`true` refuses to start without them; `false` never uses them.
"""
import importlib.util

from qlora_exp.errors import ConfigError

LIGER_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral")
LIGER_KERNELS = {"rms_norm": True, "swiglu": True, "rope": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}  # the loss: trl's fused LM head


def resolve_fused_kernels(setting, architecture: str, cuda: bool) -> tuple[bool, str]:
    """(use them, what the log and metrics.json say)."""
    if setting is False:
        return False, "off (trainer.fused_kernels=false)"
    missing = None
    if not cuda:
        missing = "no CUDA device (Liger's kernels are Triton)"
    elif importlib.util.find_spec("liger_kernel") is None:
        missing = "liger-kernel is not installed (pip install 'qlora-exp[gpu]')"
    elif architecture not in LIGER_ARCHITECTURES:
        missing = f"Liger has no kernels for the {architecture} architecture"
    if missing is None:
        return True, "liger: " + ", ".join(k for k, on in LIGER_KERNELS.items() if on)
    if setting is True:
        raise ConfigError("trainer.fused_kernels", True, f"auto or false here: {missing}")
    return False, f"off: {missing}"


def apply_fused_kernels(model) -> None:
    """Swap in Liger's modules on a loaded model, before LoRA wraps its projections."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **LIGER_KERNELS)
