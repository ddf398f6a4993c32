"""Packed batches in which no example sees another: the same examples per step as without packing, less padding.

    collator = PackedBatchCollator(pad_token_id=tok.pad_token_id, max_length=1024)
    batch = collator([{"input_ids": [...], "labels": [...]}, ...])   # tokenized rows, as trl prepares them

The examples of one micro-batch are placed, longest first, into rows of at most `max_length` tokens
(best-fit decreasing); `position_ids` restart at 0 for every example. There is no `attention_mask`: transformers
then reads the example boundaries from the position ids and gives sdpa and eager attention a block-diagonal
causal mask (`masking_utils.find_packed_sequence_indices`), and flash-attention its varlen boundaries. The model
must run with `use_cache=False` (a cache turns that detection off; the trial sets it). The label of each
example's first token is -100: it would otherwise be predicted from the previous example's last token.
The padding that fills the last columns of a row is a run of its own (positions 0, 1, ...) with label -100.

Unlike trl's `packing=True`, which re-cuts the dataset into full rows (more examples per optimizer step than
the configured batch), this keeps `trainer.batch_size` examples per micro-step: the optimizer sees exactly the
batches it would see unpacked, and the loss per token is the same within floating-point noise
(tests/test_packing.py). Layout `flat` puts the whole micro-batch into one row (what varlen kernels such as
flash-attention want); `rows` (default) keeps each row within `max_length`, which bounds the quadratic cost of a
masked sdpa attention.
"""
from dataclasses import dataclass

LAYOUTS = ("rows", "flat")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                    "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


def layout_for(layout: str, attn_implementation: str | None) -> str:
    """`trainer.packing_layout`: auto -> flat under a varlen attention kernel, rows otherwise."""
    if layout != "auto":
        return layout
    return "flat" if attn_implementation in VARLEN_ATTENTION else "rows"


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` (an item longer than capacity gets its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: room[b])
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class PackedBatchCollator:
    pad_token_id: int
    max_length: int | None = None     # row capacity for layout "rows" (None: the longest example)
    layout: str = "rows"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        ids = [list(e["input_ids"]) for e in examples]
        labels = [list(e["labels"]) if e.get("labels") is not None else list(e["input_ids"]) for e in examples]
        lengths = [len(x) for x in ids]
        if self.layout == "flat":
            rows = [list(range(len(ids)))]
        else:
            rows = best_fit_decreasing(lengths, max(self.max_length or 0, max(lengths)))
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(rows), width), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                batch_ids[r, at:at + n] = torch.tensor(ids[i])
                batch_labels[r, at + 1:at + n] = torch.tensor(labels[i][1:])
                positions[r, at:at + n] = torch.arange(n)
                at += n
            positions[r, at:] = torch.arange(width - at)  # the padding: a run of its own, never attended to
        out = {"input_ids": batch_ids, "labels": batch_labels, "position_ids": positions}
        if self.layout == "flat":  # varlen kernels take the boundaries directly (no device sync per layer)
            starts = torch.tensor([0, *torch.tensor([lengths[i] for i in rows[0]]).cumsum(0).tolist()])
            if starts[-1] < width:
                starts = torch.cat([starts, torch.tensor([width])])
            cu = starts.to(torch.int32)
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
            out["max_length_q"] = out["max_length_k"] = int(cu.diff().max())
        return out
