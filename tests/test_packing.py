"""Packed micro-batches: no example attends to another, the loss per example is the one it has alone."""
import json

import pytest
import torch

from qlora_exp.packing import PackedBatchCollator, best_fit_decreasing, layout_for
from tests.conftest import ROWS, run_cli

LENGTHS = [7, 31, 5, 64, 18, 40, 3, 25]


def _examples(seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        labels = [(-100 if i < n // 3 else t) for i, t in enumerate(ids)]  # a prompt part left out of the loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_best_fit_decreasing_fills_rows_within_capacity():
    bins = best_fit_decreasing(LENGTHS, 64)
    assert sorted(i for b in bins for i in b) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in b) <= 64 for b in bins)
    assert len(bins) == 4  # 193 tokens: 4 rows of 64 is the fewest possible


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_collator_keeps_every_token_once_restarts_positions_and_masks_boundaries(layout):
    ex = _examples()
    batch = PackedBatchCollator(pad_token_id=0, max_length=64, layout=layout)(ex)
    assert "attention_mask" not in batch  # boundaries come from position_ids
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert ids.shape[0] == (4 if layout == "rows" else 1) and ids.shape[1] <= (64 if layout == "rows" else 193)
    starts = (pos == 0)
    # every example appears once, whole, starting at a position-0 token
    found = []
    for r in range(ids.shape[0]):
        cuts = starts[r].nonzero().flatten().tolist() + [ids.shape[1]]
        for a, b in zip(cuts, cuts[1:], strict=False):
            seq = ids[r, a:b].tolist()
            match = [i for i, e in enumerate(ex) if e["input_ids"] == seq]
            if match:
                found += match
                assert labels[r, a] == -100  # never predicted from the previous example
                assert labels[r, a + 1:b].tolist() == ex[match[0]]["labels"][1:]
            else:  # the row's padding: its own run, no loss
                assert set(seq) == {0} and (labels[r, a:b] == -100).all()
    assert sorted(found) == list(range(len(ex)))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def _per_example_loss(logits, labels):
    """Mean next-token loss of each run of labels, keyed by the tokens predicted."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), labels[1:], reduction="sum", ignore_index=-100)


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_packed_batch_gives_each_example_its_own_loss_within_1e4(layout):
    model, ex = _tiny_llama(), _examples()
    with torch.no_grad():
        alone = [_per_example_loss(model(input_ids=torch.tensor([e["input_ids"]])).logits[0], torch.tensor(e["labels"]))
                 for e in ex]
        batch = PackedBatchCollator(pad_token_id=0, max_length=64, layout=layout)(ex)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        packed = {}
        for r in range(logits.shape[0]):
            cuts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist() + [logits.shape[1]]
            for a, b in zip(cuts, cuts[1:], strict=False):
                seq = batch["input_ids"][r, a:b].tolist()
                for i, e in enumerate(ex):
                    if e["input_ids"] == seq:
                        packed[i] = _per_example_loss(logits[r, a:b], torch.tensor(e["labels"]))
        # the whole batch's loss, as the trainer computes it (sum over every label / label count)
        batch_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).double(), batch["labels"][:, 1:].reshape(-1),
            reduction="sum", ignore_index=-100)
    assert sorted(packed) == list(range(len(ex)))
    for i, e in enumerate(ex):
        n = sum(1 for t in e["labels"][1:] if t != -100)
        assert abs(packed[i] / n - alone[i] / n) < 1e-4, (i, packed[i] / n, alone[i] / n)
    assert abs(batch_loss - sum(alone)) / sum(alone) < 1e-4
    # the check has teeth: without position ids the examples see each other and the losses move
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(leaky, logits, atol=1e-3)


def test_layout_auto_is_flat_only_under_a_varlen_kernel():
    assert layout_for("auto", None) == "rows" and layout_for("auto", "sdpa") == "rows"
    assert layout_for("auto", "flash_attention_2") == "flat" and layout_for("rows", "flash_attention_2") == "rows"


@pytest.mark.slow
def test_packed_trial_trains_like_the_unpacked_one(tmp_path, cache_dir):
    """The whole trial path (trl's preparation, the collator, eval): packing changes speed, not results."""
    runs = {}
    for packing in ("true", "false"):
        out = tmp_path / f"packing-{packing}"
        proc = run_cli(["trainer.max_steps=12", "trainer.eval_every=6", "lora.dropout=0", "trainer.save_adapter=false", *ROWS,
                        f"trainer.packing={packing}", f"hydra.run.dir={out}"], tmp_path, cache_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[packing] = json.loads((out / "metrics.json").read_text())
    packed, plain = runs["true"], runs["false"]
    assert packed["packing"] == "rows" and plain["packing"] == "off"
    assert packed["train_tokens"] == plain["train_tokens"]  # the same examples, every real token counted
    # ... fed as fewer, fuller rows: the collator really packed them
    assert plain["train_rows"] == 12 * 16 and packed["train_rows"] < plain["train_rows"] / 2, (packed, plain)
    assert packed["train_tokens"] <= packed["train_positions"] < plain["train_positions"]
    for (s1, a), (s2, b) in zip(packed["eval_history"], plain["eval_history"], strict=True):
        assert s1 == s2 and abs(a - b) / b < 2e-3, (packed["eval_history"], plain["eval_history"])
    assert packed["eval_history"][-1][1] < packed["eval_history"][0][1] - 0.3  # and it did train
