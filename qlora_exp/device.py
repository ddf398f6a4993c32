"""What the machine can do, asked once: CUDA, bf16, device count. Imports torch but loads no model."""
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class DeviceInfo:
    cuda: bool
    bf16: bool          # bf16 matmuls on the GPU (Ampere or newer)
    n_gpus: int | None   # None: a check made for the trial's machine before it is known
    name: str
    memory_gb: float = 0.0  # total memory of the first GPU (GiB)


@lru_cache(maxsize=1)
def probe_device() -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        return DeviceInfo(True, torch.cuda.is_bf16_supported(), torch.cuda.device_count(),
                          torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30)
    return DeviceInfo(False, False, 0, "cpu")
