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


@pytest.mark.parametrize("overrides, sampler, pruner", [
    ([], "TPESampler", "MedianPruner"),  # auto/auto on a search: TPE and the median pruner
    (["search=rank_alpha_lr"], "TPESampler", "PercentilePruner"),
    (["search=rank_alpha_lr", "hydra/sweeper/sampler=random", "hydra/sweeper/pruner=hyperband"], "RandomSampler",
     "HyperbandPruner"),  # the preset's TPE and percentile settings dropped, not passed to the other classes
    (["search=rank_alpha_lr", "hydra.sweeper.sampler.name=random", "hydra.sweeper.pruner.name=none"], "RandomSampler",
     "NopPruner"),  # the short form over a selected group: it wins over the group's _target_
    (["hydra/sweeper/sampler=qmc", "hydra/sweeper/pruner=wilcoxon"], "QMCSampler", "WilcoxonPruner"),
    (["hydra/sweeper/sampler=cmaes", "hydra/sweeper/pruner=successive_halving"], "CmaEsSampler",
     "SuccessiveHalvingPruner"),
    (["hydra/sweeper/sampler=gp", "hydra/sweeper/pruner=none"], "GPSampler", "NopPruner"),
    (["hydra/sweeper/sampler=nsgaii", "hydra/sweeper/pruner=percentile"], "NSGAIISampler", "PercentilePruner"),
    (["hydra/sweeper=optuna"], "TPESampler", "MedianPruner"),  # hydra-optuna-sweeper's name for the sweeper
])
def test_sampler_and_pruner_groups_compose_and_build(tmp_path, overrides, sampler, pruner):
    """hydra/sweeper/sampler=<name> and hydra/sweeper/pruner=<name> (config groups with _target_), the short
    `name:` form, and their mix, as the sweeper builds them; a derived seed when the block's seed is null."""
    from hydra import compose, initialize_config_dir

    from sweeper.samplers import build_pruner, build_sampler

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=True)
    block = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)
    _, s = build_sampler(block["sampler"], None, False, "study-a")
    _, p, spec = build_pruner(block["pruner"], grid=False)
    assert type(s).__name__ == sampler and type(p).__name__ == pruner
    assert isinstance(build_pruner(spec)[1], type(p))  # what the trials get builds the same pruner


def test_a_null_seed_is_derived_from_the_study_name():
    """The same command (the same study) suggests the same trials; another study, others."""
    import optuna

    from sweeper.samplers import build_sampler

    def first_suggestions(study_name):
        _, sampler = build_sampler({"name": "random", "seed": None}, None, False, study_name)
        study = optuna.create_study(sampler=sampler)
        return [study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}).params["x"] for _ in range(3)]

    assert first_suggestions("study-a") == first_suggestions("study-a") != first_suggestions("study-b")


def test_help_begins_with_qlora_exp_s_own_usage():
    """`python -m qlora_exp --help`: qlora_exp's usage (a trial, a sweep, SLURM, -v, the status) before Hydra's groups."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run([sys.executable, "-m", "qlora_exp", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120).stdout
    assert out.startswith("qlora_exp: QLoRA fine-tuning"), out[:300]
    usage, groups = out.index("== Usage =="), out.index("== Configuration groups ==")
    assert usage < groups and "powered by Hydra" not in out
    for shown in ("python -m qlora_exp -m lora.r=8,16,64", "search=rank_alpha_lr", "hydra/launcher=slurm", " -v ",
                  "python -m sweeper.status"):
        assert shown in out[usage:groups], shown
    assert "search: lr_only, rank_alpha_lr, targets" in out[groups:]


def test_make_help_is_plain_text_when_piped():
    import subprocess

    from tests.conftest import REPO

    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60).stdout
    assert "\033" not in out and out.splitlines()[0].split()[:2] == ["help", "List"], out[:300]
