"""Paged optimizer states that a sweep worker gives back between trials.

bitsandbytes' paged optimizers (`paged_adamw_32bit`, the article's) keep each state tensor of more than 1e5 values
in CUDA managed memory: `get_state_buffer` asks `F.get_paged` for it (`cudaMallocManaged`) and appends it to
`GlobalPageManager.paged_tensors`. bitsandbytes has no call that frees one, and the manager's list keeps every buffer
for the life of the process. A process that runs one trial never notices; a sweep worker that runs trial after trial
leaves each trial's Adam moments allocated (8 bytes per LoRA value: ~1.3 GiB a trial for the 8B at r64), outside
what torch's allocator counts, until the GPU's memory and then the host's fill up.

Here a worker keeps those buffers in a pool: a trial's optimizer takes a free buffer of its shape and dtype (zeroed, as
a new one is) before a new one is made, and the trial's release (`give_back`) returns what it took. So a worker holds
at most what its largest trials need for each shape, and a trial after the first allocates nothing for its states.
What a trial computes is unchanged: the same zeroed tensor of the same shape, in the same memory kind.
"""
from __future__ import annotations

import functools
from collections import defaultdict

MIN_PAGED_NUMEL = 1e5  # bitsandbytes' own threshold: smaller states are plain device tensors


class PagedPool:
    def __init__(self) -> None:
        self.free: dict[tuple, list] = defaultdict(list)
        self.in_use: list[tuple[tuple, object]] = []
        self.allocated = 0  # buffers made (each one managed allocation, held for the process's life)

    def take(self, shape, dtype, device, make, fill):
        key = (tuple(shape), dtype, device.index)
        if self.free[key]:
            buff = self.free[key].pop()
        else:
            buff = make(*shape, dtype=dtype, device=device)
            self.allocated += 1
        fill(buff, 0)
        self.in_use.append((key, buff))
        return buff

    def give_back(self) -> int:
        """The buffers a trial took, free for the next; how many."""
        n = len(self.in_use)
        for key, buff in self.in_use:
            self.free[key].append(buff)
        self.in_use = []
        return n

    def held_bytes(self) -> int:
        every = [b for bs in self.free.values() for b in bs] + [b for _, b in self.in_use]
        return sum(b.numel() * b.element_size() for b in every)


POOL = PagedPool()


def install() -> bool:
    """Route bitsandbytes' paged state buffers through POOL (once per process); False when bitsandbytes is absent."""
    try:
        from bitsandbytes import functional as F
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    if getattr(Optimizer8bit.get_state_buffer, "qlora_exp_pooled", False):
        return True
    original = Optimizer8bit.get_state_buffer

    @functools.wraps(original)
    def get_state_buffer(self, p, dtype=None):
        import torch

        dtype = torch.float32 if dtype is None else dtype
        if p.device.type != "cuda" or not self.is_paged or p.numel() < MIN_PAGED_NUMEL:
            return original(self, p, dtype=dtype)
        before = POOL.allocated
        buff = POOL.take(p.shape, dtype, p.device, F.get_paged, F.fill)
        if POOL.allocated > before:  # a new buffer: bitsandbytes' manager knows it, as its own code does
            self.page_mng.paged_tensors.append(buff)
        return buff

    get_state_buffer.qlora_exp_pooled = True
    Optimizer8bit.get_state_buffer = get_state_buffer
    return True
