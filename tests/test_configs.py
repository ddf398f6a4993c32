"""Every config group composes and maps to the library objects it names."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qlora_exp.builders import build_lora_config, build_quantization_config, build_sft_config
from qlora_exp.device import DeviceInfo
from qlora_exp.models import meta_model
from qlora_exp.validate import check_config, resolve_target_modules

CONF = Path(__file__).resolve().parent.parent / "conf"
CPU = DeviceInfo(cuda=False, bf16=False, n_gpus=0, name="cpu")
H200 = DeviceInfo(cuda=True, bf16=True, n_gpus=1, name="NVIDIA H200")


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_have_the_options_the_docs_name():
    assert {"tiny", "llama3_8b", "mistral_7b", "qwen2_5_7b"} <= set(options("model"))
    assert {"nf4", "fp4", "int8", "none"} <= set(options("quantization"))
    assert {"paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"} <= set(options("optimizer"))
    assert {"tiny_instruct", "jsonl", "ultrachat"} <= set(options("data"))


@pytest.mark.parametrize("group", ["model", "quantization", "lora", "optimizer", "data", "trainer", "paths"])
def test_every_option_composes_and_resolves(make_cfg, group, tmp_path):
    for option in options(group):
        extra = [f"data.train_path={tmp_path}/x.jsonl"] if (group, option) == ("data", "jsonl") else []
        cfg = make_cfg(f"{group}={option}", *extra)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved[group] is not None


def test_default_is_the_embedded_qlora_setup(make_cfg):
    cfg = make_cfg()
    check_config(cfg, CPU)
    assert (cfg.model.name, cfg.quantization.method, cfg.quantization.double_quant) == ("tiny", "nf4", True)
    assert cfg.optimizer.name == "paged_adamw_32bit" and cfg.data.name == "tiny_instruct"
    assert Path(cfg.data.train_path).is_file() and Path(cfg.data.eval_path).is_file()


@pytest.mark.parametrize("method,bits", [("nf4", 4), ("fp4", 4), ("int8", 8), ("none", None)])
def test_quantization_maps_to_bitsandbytes(make_cfg, method, bits):
    q = build_quantization_config(make_cfg(f"quantization={method}").quantization, torch.bfloat16)
    if bits is None:
        assert q is None
        return
    assert (q.load_in_4bit, q.load_in_8bit) == (bits == 4, bits == 8)
    if bits == 4:
        assert q.bnb_4bit_quant_type == method and q.bnb_4bit_use_double_quant is True
        assert q.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("targets,expected", [
    ("all_linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("[q_proj,v_proj]", {"q_proj", "v_proj"}),
])
def test_lora_maps_to_peft(make_cfg, targets, expected):
    cfg = make_cfg("lora.r=8", "lora.alpha=16", f"lora.target_modules={targets}")
    lc = build_lora_config(cfg.lora, resolve_target_modules(cfg))
    assert (lc.r, lc.lora_alpha, lc.task_type) == (8, 16, "CAUSAL_LM") and set(lc.target_modules) == expected


def test_lora_attention_preset_group(make_cfg):
    assert resolve_target_modules(make_cfg("lora=attention")) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_trainer_and_optimizer_map_to_sft_config(make_cfg, tmp_path):
    cfg = make_cfg("trainer=article", "model=llama3_8b")
    # bf16 needs a GPU to build TrainingArguments; on this CPU machine map the same config in fp32.
    # trainer=article leaves the split to the memory plan: here, the article's own 2 x 4 with checkpointing
    args = build_sft_config(cfg, str(tmp_path), "paged_adamw_32bit", "fp32", use_cpu=True,
                            micro_batch_size=2, grad_accum=4, checkpointing=True)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_length) == (2, 4, 1024)
    assert not args.packing and not args.padding_free  # packing is qlora_exp's collator, not trl's re-cut rows
    assert args.gradient_checkpointing and not args.bf16 and args.optim == "paged_adamw_32bit"
    assert args.learning_rate == 2e-4 and args.lr_scheduler_type == "cosine" and args.max_grad_norm == 0.3
    assert args.warmup_steps == 0.03 and args.assistant_only_loss and args.eval_on_start


@pytest.mark.parametrize("model", ["tiny", "llama3_8b", "mistral_7b", "qwen2_5_7b"])
def test_model_shape_builds_on_meta_and_has_declared_projections(make_cfg, model):
    cfg = make_cfg(f"model={model}")
    m = meta_model(cfg.model)
    assert m.config.hidden_size == cfg.model.shape.hidden_size
    linear = {name.rsplit(".", 1)[-1] for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    declared = set(cfg.model.attention_modules) | set(cfg.model.mlp_modules)
    assert declared == linear - {"lm_head"}
    if model == "llama3_8b":  # the article's 8B: parameter count of the real model
        assert 7.9e9 < sum(p.numel() for p in m.parameters()) < 8.1e9


def test_article_recipe_experiment(make_cfg):
    cfg = make_cfg("experiment=article_recipe")
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B" and cfg.data.hub_name.endswith("ultrachat_200k")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.trainer.grad_accum) == (16, 32, 4)
    check_config(cfg, H200)
