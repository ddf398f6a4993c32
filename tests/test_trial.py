"""The real entry point on the embedded default: a QLoRA trial and a merge of its adapter."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics

pytestmark = pytest.mark.slow


def test_default_trial_learns_and_writes_its_outputs(default_trial):
    m = read_metrics(default_trial)
    assert m["status"] == "complete" and m["steps"] == 150
    assert m["eval_loss"] < m["initial_eval_loss"] - 1.0, m["eval_history"]   # it learned, visibly
    assert m["objective"] == m["eval_loss"] and m["perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"])
    assert m["train_tokens"] > 0 and m["train_tokens_per_s"] > 0 and m["peak_memory_gb"] > 0
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["optimizer"] == "adamw_torch"  # paged_adamw_32bit fell back: this machine has no CUDA
    # the adapter, as safetensors, with LoRA weights on every projection of every layer
    weights = load_file(default_trial / "adapter" / "adapter_model.safetensors")
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert sum(proj in k and "lora_A" in k for k in weights) == 4
    # the composed config (Hydra's own snapshot and the resolved one)
    assert (default_trial / ".hydra" / "config.yaml").is_file() and (default_trial / "config.yaml").is_file()
    # TensorBoard: the eval losses of metrics.json, step for step, read back from the run's events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(default_trial.parent.parent / "tensorboard" / "runs" / default_trial.name))
    acc.Reload()
    evals = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert [s for s, _ in evals] == [s for s, _ in m["eval_history"]] == [0, 25, 50, 75, 100, 125, 150]
    assert [v for _, v in evals] == pytest.approx([v for _, v in m["eval_history"]], rel=1e-5)


def test_the_base_was_nf4_quantized(default_trial, tmp_path):
    import bitsandbytes as bnb

    from qlora_exp.builders import build_quantization_config
    from qlora_exp.models import load_base_model
    from tests.conftest import compose_cfg

    config = json.loads((default_trial / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    # what the trial's loaded model held, read from its modules: every projection of the 4 layers NF4, nested
    assert read_metrics(default_trial)["quantized"] == {"Linear4bit": 28, "quant_type": "nf4", "double_quant": True,
                                                        "quant_state_layers": 28}
    # and the same base loaded here as the trial loads it: Linear4bit layers with an NF4 quant_state whose
    # absmax constants are themselves quantized (double quantization)
    cfg = compose_cfg(tmp_path)
    model = load_base_model(config["base_model_name_or_path"], cfg.model,
                            build_quantization_config(cfg.quantization, torch.float32), torch.float32, None)
    layers = [mod for mod in model.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(layers) == 28
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested and state.state2 is not None
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == state.shape.numel()


def test_merge_round_trip(default_trial, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_exp.merge import main as merge_main

    out = tmp_path / "merged"
    merge_main([str(default_trial), "--out", str(out), "--dtype", "float32"])
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base_dir = json.loads((default_trial / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, default_trial / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.allclose(merged, with_adapter, atol=1e-4, rtol=1e-4)
    assert (merged - plain).abs().max() > 1e-2  # the adapter really changed the model
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit, match=r"already holds .* entries: another --out, or --overwrite"):
        merge_main([str(default_trial), "--out", str(out)])  # a second merge into the same folder: refused
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    merge_main([str(default_trial), "--out", str(out), "--dtype", "float32", "--overwrite"])
    assert (out / "model.safetensors").stat().st_mtime_ns != before


def test_merge_refuses_a_folder_without_adapter(tmp_path):
    from qlora_exp.merge import main as merge_main

    with pytest.raises(SystemExit, match="has no adapter_config.json"):
        merge_main([str(tmp_path)])


def test_an_evaluation_leaves_the_gradients_through_the_4bit_base_unchanged(tmp_path, cache_dir):
    """The evaluation at step 0 used to switch bitsandbytes' 4-bit layers (on an AVX512-BF16 CPU, this machine's)
    to their inference layout for good: every later step ran through gemv_4bit, which has no backward, and layer 0's
    lora_B gradient came out 0 (torch's "gemv_4bit: an autograd kernel was not registered" warning). Now a step after
    an evaluation has exactly the gradients of a step before it, and no layer is repacked."""
    import warnings

    from qlora_exp import recipe
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, ["lora.dropout=0"], cache_dir)
    plan = recipe.plan_trial(cfg)
    train_rows, eval_rows = recipe.rows_for(cfg, plan)
    try:
        base = recipe.build_base(cfg, plan, train_rows, eval_rows)
        model = recipe.attach_adapter(base, cfg, plan)
        ids = torch.randint(0, base.tokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))

        def step_grads() -> dict:
            model.train()
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        before = step_grads()
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            after = step_grads()
        assert not [w for w in caught if "gemv_4bit" in str(w.message)]
        assert not [m for m in model.modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                                                          "packing_format_for_cpu", False)]
        first = next(n for n in before if "layers.0." in n and "lora_B" in n)
        assert before[first].abs().max() > 0
        for name, grad in before.items():
            assert torch.equal(grad, after[name]), name
    finally:
        recipe.forget_warm()


def test_a_default_trial_prints_a_few_lines_and_its_log_keeps_the_rest(default_trial):
    """`python -m qlora_exp`: at most 15 lines on the terminal (the plan's notes, the folder, a line per evaluation,
    the result), no metric dicts, progress bars or library warnings; the trial's log file keeps the Trainer's dicts
    and says what was left off the terminal and why."""
    lines = [line for line in (default_trial / "test-output.txt").read_text().splitlines() if line.strip()]
    assert len(lines) <= 15, "\n".join(lines)
    noise = [line for line in lines if "{'" in line or "Warning" in line or "it/s" in line or "warn(" in line]
    assert not noise, noise
    evals = [line for line in lines if "eval loss" in line]
    assert len(evals) >= 3 and "step 0/" in evals[0], lines
    assert "trial complete" in lines[-1], lines
    assert not (default_trial / "checkpoints").exists()  # no checkpoint saved: no empty folder left either
    log = (default_trial / "__main__.log").read_text()
    assert "'loss'" in log and "'eval_loss'" in log and "left off the terminal (harmless; shown with -v)" in log


def test_verbose_shows_the_trainer_s_own_lines(tmp_path, cache_dir):
    from tests.conftest import FAST, run_cli

    proc = run_cli(["-v", *FAST], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "{'loss'" in proc.stdout + proc.stderr and "'eval_loss'" in proc.stdout + proc.stderr


def test_a_random_build_the_machine_cannot_hold_is_refused_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The 8B shape with random weights on a machine of 24 GiB (fp32 on the CPU: ~31 GiB) used to be killed for
    memory after a minute, its `.tmp<pid>` folder left in the cache. Now: a ConfigError naming the parameters, the
    memory it needs and what there is, before anything is built; and a build that fails leaves no folder."""
    from qlora_exp import models
    from qlora_exp.errors import ConfigError
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, ["model=llama3_8b", "model.random_init=true"], tmp_path / "cache")
    monkeypatch.setattr(models, "available_gib", lambda cuda: 20.0)
    with pytest.raises(ConfigError, match=r"llama3_8b has 8\.0B parameters, 30\.9 GiB to build in fp32, and there is "
                                          r"20\.0 GiB memory available"):
        models.random_model_dir(cfg.model, cfg.paths.cache_dir, models.tokenizer_corpus(cfg.paths))
    assert not (tmp_path / "cache" / "models").exists()

    def dies_mid_build(model_cfg, shape, path, tmp, corpus_file):
        (tmp / "model.safetensors").parent.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"half")
        raise MemoryError("killed mid-build")

    tiny = compose_cfg(tmp_path, [], tmp_path / "cache")
    monkeypatch.setattr(models, "available_gib", lambda cuda: 64.0)
    monkeypatch.setattr(models, "_build", dies_mid_build)
    with pytest.raises(MemoryError):
        models.random_model_dir(tiny.model, tiny.paths.cache_dir, models.tokenizer_corpus(tiny.paths))
    assert not list((tmp_path / "cache" / "models").iterdir())  # no .tmp<pid> left


def test_a_trial_from_the_quantized_cache_trains_as_one_from_the_bf16_base(tmp_path, cache_dir):
    """quantization.cache=true: the first trial quantizes the base and saves it (a bitsandbytes-serialized
    safetensors checkpoint), the next loads that 4-bit checkpoint; both give the eval loss of a trial that
    quantizes from the base's own weights (within 1e-4 on the tiny model)."""
    import shutil

    from safetensors import safe_open

    from qlora_exp import recipe
    from qlora_exp.trial import run_trial
    from tests.conftest import FAST, compose_cfg

    results = {}
    cache = cache_dir  # the session's built tiny model, and its quantized cache (this test's alone)
    shutil.rmtree(cache / "quantized", ignore_errors=True)
    for name, extra in (("plain", []), ("saves", ["quantization.cache=true"]), ("loads", ["quantization.cache=true"])):
        recipe.forget_warm()  # each a cold trial, as the first on a new worker
        cfg = compose_cfg(tmp_path, [*FAST, f"paths.output_dir={tmp_path}/{name}", *extra], cache_dir)
        results[name] = run_trial(cfg)
    recipe.forget_warm()
    plain, saves, loads = results["plain"], results["saves"], results["loads"]
    assert plain.base_from.startswith("loaded from ") and "quantized cache" not in plain.base_from
    assert saves.base_from.startswith("quantized from ") and loads.base_from.startswith("loaded from the quantized cache")
    assert abs(saves.eval_loss - plain.eval_loss) < 1e-4 and abs(loads.eval_loss - plain.eval_loss) < 1e-4, results
    assert loads.eval_loss < loads.initial_eval_loss and loads.quantized == plain.quantized
    (folder,) = (cache / "quantized").iterdir()  # one entry: the 4-bit weights and their quantization constants
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        q_proj = next(k for k in keys if k.endswith("q_proj.weight"))
        assert str(f.get_tensor(q_proj).dtype) == "torch.uint8"
    assert any(k.endswith("q_proj.weight.absmax") for k in keys) and any("nf4" in k for k in keys), keys[:20]
    assert not list((cache / "quantized").glob("*.tmp*"))


def test_a_quantized_cache_without_the_disk_for_it_is_refused_before_anything_loads(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from qlora_exp import models
    from qlora_exp.errors import ConfigError
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, ["model=llama3_8b", "model.random_init=true", "quantization.cache=true"])
    assert 5.0 < models.quantized_size_gib(cfg.model, "") < 6.0  # the 8B in NF4, its embeddings and head in bf16
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 2**30, 98 * 2**30, 2 * 2**30))
    loaded = []
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(ConfigError) as e:
        models.load_quantized_base(cfg, str(tmp_path / "llama3_8b"), _nf4(), None, None, lambda m: None)
    assert "quantization.cache" in str(e.value) and "5.9 GiB free" in str(e.value) and "has 2.0 GiB" in str(e.value)
    assert loaded == []


def _nf4():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def test_a_random_base_built_straight_into_4_bits_trains(tmp_path, monkeypatch):
    """model.random_build=quantized: each weight drawn and quantized before the next (the model never whole in
    bf16 or fp32), saved as the checkpoint save_pretrained writes for a bitsandbytes 4-bit model; a trial loads it
    as it is and trains (loss falls). A shape the machine cannot build so is refused with what it needs."""
    import json

    from safetensors import safe_open

    from qlora_exp import models, recipe
    from qlora_exp.errors import ConfigError
    from qlora_exp.trial import run_trial
    from tests.conftest import FAST, compose_cfg

    recipe.forget_warm()
    cfg = compose_cfg(tmp_path, [*FAST, "model.random_build=quantized"])
    result = run_trial(cfg)
    recipe.forget_warm()
    assert result.status == "complete" and result.eval_loss < result.initial_eval_loss - 0.1, result
    assert result.base_from.endswith("(built in 4 bits)") and result.quantized["quant_type"] == "nf4", result.quantized
    (built,) = (tmp_path / "cache" / "models").iterdir()  # only the 4-bit build: no full-precision one beside it
    assert built.name.startswith("tiny-nf4-")
    assert json.loads((built / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    with safe_open(built / "model.safetensors", "pt") as f:
        assert str(f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype) == "torch.uint8"
        assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in set(f.keys())
    # the 8B shape on this machine: a 4-bit build needs a shard and its largest weight in memory, not the model
    big = compose_cfg(tmp_path, ["model=llama3_8b", "model.random_init=true", "model.random_build=quantized"])
    billions, need = models.build_needs_gib(big.model, cuda=False, quantized=True)
    assert billions > 8.0 and need < 8.0 < models.build_needs_gib(big.model, cuda=False)[1] / 3
    monkeypatch.setattr(models, "available_gib", lambda cuda: 4.0)
    with pytest.raises(ConfigError) as e:
        models.check_build_fits(big.model, tmp_path / "big", quantized=True)
    assert "straight into 4 bits" in str(e.value) and "there is 4.0 GiB" in str(e.value)
    # another quantization than the build's is refused before anything is built
    from qlora_exp.validate import check_config

    with pytest.raises(ConfigError, match="quantization.method"):
        check_config(compose_cfg(tmp_path, ["model.random_build=quantized", "quantization=int8"]), None)
