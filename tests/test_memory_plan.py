"""The memory plan (trainer.memory_budget_gb), fused-kernel resolution and the fast-path config keys."""
import pytest

from qlora_exp.device import DeviceInfo
from qlora_exp.errors import ConfigError
from qlora_exp.kernels import resolve_fused_kernels
from qlora_exp.memory import estimate_gb, plan_memory
from qlora_exp.validate import check_config

CPU = DeviceInfo(cuda=False, bf16=False, n_gpus=0, name="cpu")
H200 = DeviceInfo(cuda=True, bf16=True, n_gpus=1, name="NVIDIA H200", memory_gb=139.8)
ARTICLE_8B = ("model=llama3_8b", "trainer=article")

# peak allocated GiB measured on an H200 (docs/benchmarks.md, 2026-11-28): Llama-3-8B shape, NF4, r16 all linear,
# Liger, micro-batch of 8 of the recipe's rows (about 6,500 tokens at most), by decoder layers checkpointed
MEASURED_8B = {32: 9.22, 16: 31.07, 0: 54.16}


def test_estimate_covers_what_the_h200_measured(make_cfg):
    cfg = make_cfg(*ARTICLE_8B, "trainer.max_length=812")  # 8 x 812 = the ~6,500 tokens of the measured runs
    for layers, measured in MEASURED_8B.items():
        est = estimate_gb(cfg, 8, layers, fused=True)
        assert measured <= est <= measured * 1.25, (layers, est, measured)


# the same on the Llama-3-70B shape (docs/benchmarks.md, 2026-12-03): the recipe's rows up to 1024 tokens, paged
# AdamW, by (micro-batch, decoder layers checkpointed)
MEASURED_70B = {(1, 77): 40.54, (2, 77): 43.16, (2, 79): 41.51}


def test_estimate_is_within_ten_percent_of_the_70b_peaks(make_cfg):
    cfg = make_cfg("model=llama3_70b", "trainer=article", "optimizer=paged_adamw_32bit")
    for (micro, layers), measured in MEASURED_70B.items():
        est = estimate_gb(cfg, micro, layers, fused=True)
        assert measured <= est <= measured * 1.10, (micro, layers, est, measured)
    plan = plan_memory(make_cfg("model=llama3_70b", "model.random_init=true", "trainer=article",
                                "trainer.memory_budget_gb=46"), H200, fused=True)
    assert (plan.micro_batch_size, plan.checkpointed_layers) == (2, 77) and plan.estimate_gb <= 46


@pytest.mark.parametrize("budget", [12, 24, 40, 80])
def test_plan_fits_the_budget_and_keeps_the_examples_per_step(make_cfg, budget):
    cfg = make_cfg(*ARTICLE_8B, f"trainer.memory_budget_gb={budget}")
    plan = plan_memory(cfg, H200, fused=True)
    assert plan.estimate_gb <= budget
    assert plan.micro_batch_size * plan.grad_accum == cfg.trainer.batch_size * cfg.trainer.grad_accum == 8
    assert f"{budget} GiB" in plan.note


def test_more_memory_buys_less_recomputation(make_cfg):
    recomputed = []
    for budget in (12, 24, 40, 80):
        plan = plan_memory(make_cfg(*ARTICLE_8B, f"trainer.memory_budget_gb={budget}"), H200, fused=True)
        recomputed.append(0 if not plan.gradient_checkpointing else plan.checkpointed_layers or 32)
    assert recomputed == sorted(recomputed, reverse=True) and recomputed[0] == 32 and recomputed[-1] == 0
    # the shipped trainer=article: 24 GiB, partial checkpointing of the 8B model
    plan = plan_memory(make_cfg(*ARTICLE_8B), H200, fused=True)
    assert plan.budget_gb == 24 and 0 < plan.checkpointed_layers < 32


def test_a_budget_too_small_is_one_line_naming_the_key(make_cfg):
    with pytest.raises(ConfigError) as e:
        plan_memory(make_cfg(*ARTICLE_8B, "trainer.memory_budget_gb=6"), H200)
    msg = str(e.value)
    assert "trainer.memory_budget_gb=6" in msg and "GiB" in msg and "\n" not in msg


def test_nothing_to_plan_unless_a_key_is_auto(make_cfg):
    assert plan_memory(make_cfg(), H200) is None  # trainer=default: micro_batch_size null, checkpointing false
    plan = plan_memory(make_cfg("trainer.micro_batch_size=auto", "trainer.gradient_checkpointing=auto"), CPU)
    assert (plan.micro_batch_size, plan.grad_accum, plan.gradient_checkpointing) == (16, 1, False)
    assert "no CUDA" in plan.note


def test_null_budget_is_most_of_the_gpu(make_cfg):
    plan = plan_memory(make_cfg(*ARTICLE_8B, "trainer.memory_budget_gb=null"), H200, fused=True)
    assert plan.budget_gb == pytest.approx(0.9 * 139.8, abs=0.1) and not plan.gradient_checkpointing


def test_fused_kernels_fall_back_with_a_note_and_refuse_when_forced():
    on, note = resolve_fused_kernels("auto", "llama", cuda=False)
    assert not on and "no CUDA" in note
    assert resolve_fused_kernels(False, "llama", cuda=True) == (False, "off (trainer.fused_kernels=false)")
    with pytest.raises(ConfigError) as e:
        resolve_fused_kernels(True, "llama", cuda=False)
    assert "trainer.fused_kernels=True" in str(e.value)
    on, note = resolve_fused_kernels("auto", "gpt_neox", cuda=True)
    assert not on and ("gpt_neox" in note or "not installed" in note)


@pytest.mark.parametrize("override, key", [
    ("trainer.micro_batch_size=3", "trainer.micro_batch_size"),        # 16 examples per step: not a divisor
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("trainer.memory_budget_gb=-1", "trainer.memory_budget_gb"),
    ("trainer.gradient_checkpointing=sometimes", "trainer.gradient_checkpointing"),
    ("trainer.packing_layout=diagonal", "trainer.packing_layout"),
    ("trainer.fused_kernels=liger", "trainer.fused_kernels"),
    ("trainer.checkpointed_layers=9", "trainer.checkpointed_layers"),  # the tiny model has 4
    ("quantization.upcast_frozen=maybe", "quantization.upcast_frozen"),
])
def test_bad_fast_path_values_are_refused(make_cfg, override, key):
    with pytest.raises(ConfigError) as e:
        check_config(make_cfg(override), CPU)
    assert str(e.value).startswith(key + "=")
