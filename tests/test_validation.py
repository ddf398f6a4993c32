"""Bad input is refused before any model loads: one line naming key, value and what is accepted."""
import json
from pathlib import Path

import pytest

from qlora_exp.data import load_rows
from qlora_exp.device import DeviceInfo
from qlora_exp.errors import ConfigError
from qlora_exp.validate import check_config, optimizer_for_device
from tests.conftest import cli_in_process

CPU = DeviceInfo(cuda=False, bf16=False, n_gpus=0, name="cpu")
OLD_GPU = DeviceInfo(cuda=True, bf16=False, n_gpus=1, name="Tesla V100")


@pytest.mark.parametrize("overrides,key,accepted", [
    (["lora.r=0"], "lora.r", "integer >= 1"),
    (["lora.r=-4"], "lora.r", "integer >= 1"),
    (["lora.r=8.5"], "lora.r", "an integer"),
    (["lora.alpha=0"], "lora.alpha", "> 0"),
    (["lora.alpha=-16"], "lora.alpha", "> 0"),
    (["optimizer.lr=0"], "optimizer.lr", "> 0"),
    (["optimizer.lr=-1e-4"], "optimizer.lr", "> 0"),
    (["lora.dropout=1.5"], "lora.dropout", "< 1"),
    (["lora.bias=some"], "lora.bias", "none, all, lora_only"),
    (["lora.target_modules=[q_proj,c_attn]"], "lora.target_modules", "q_proj, k_proj"),
    (["lora.target_modules=everything"], "lora.target_modules", "all_linear, attention"),
    (["quantization.method=nf3"], "quantization.method", "nf4, fp4, int8, none"),
    (["optimizer.name=adamw_magic"], "optimizer.name", "paged_adamw_32bit"),
    (["optimizer.scheduler=zigzag"], "optimizer.scheduler", "cosine"),
    (["trainer.batch_size=0"], "trainer.batch_size", ">= 1"),
    (["trainer.max_steps=0"], "trainer.max_steps", "-1"),
    (["trainer.precision=bf16"], "trainer.precision", "no GPU with bf16"),
    (["trainer.precision=fp16"], "trainer.precision", "needs a GPU"),
    (["trainer.precision=fp8"], "trainer.precision", "auto, bf16, fp16, fp32"),
    (["data.train_path=/nonexistent/train.jsonl"], "data.train_path", "existing JSON-lines file"),
    (["objective=accuracy"], "objective", "eval_loss"),
])
def test_check_config_refuses(make_cfg, overrides, key, accepted):
    with pytest.raises(ConfigError) as e:
        check_config(make_cfg(*overrides), CPU)
    msg = str(e.value)
    assert e.value.key == key and "\n" not in msg and accepted in msg
    assert msg.startswith(f"{key}=")


def test_bf16_on_a_gpu_without_it(make_cfg):
    with pytest.raises(ConfigError, match="this GPU has no bf16"):
        check_config(make_cfg("trainer.precision=bf16"), OLD_GPU)


def test_paged_optimizer_without_cuda_falls_back_with_a_warning():
    assert optimizer_for_device("paged_adamw_32bit", CPU)[0] == "adamw_torch"
    assert "needs CUDA" in optimizer_for_device("paged_adamw_8bit", CPU)[1]
    assert optimizer_for_device("paged_adamw_32bit", OLD_GPU) == ("paged_adamw_32bit", None)


def test_remote_code_is_off_unless_asked(make_cfg):
    for model in ("tiny", "llama3_8b", "mistral_7b", "qwen2_5_7b"):
        assert make_cfg(f"model={model}").model.trust_remote_code is False


@pytest.mark.parametrize("rows,where", [
    ([{"instruction": "hi"}], "train.jsonl:1"),                                   # no response
    ([{"prompt": "hi", "answer": "yo"}], "train.jsonl:1"),                       # unknown fields
    ([{"instruction": "a", "response": "b"}, {"messages": [{"role": "user", "content": "x"}]}], "train.jsonl:2"),
    ([{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}], "train.jsonl:1"),
    ([], "data.train_path"),                                                      # empty file
])
def test_bad_data_rows(make_cfg, tmp_path, rows, where):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg("data=jsonl", f"data.train_path={path}")
    with pytest.raises(ConfigError) as e:
        load_rows(cfg.data, seed=0)
    assert where in str(e.value) and "\n" not in str(e.value)


def test_jsonl_both_row_forms_and_held_out_split(make_cfg, tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": f"q{i}", "input": "ctx", "output": f"a{i}"} for i in range(10)]
    rows += [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}] * 10
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg("data=jsonl", f"data.train_path={path}", "data.eval_fraction=0.2")
    train, evals = load_rows(cfg.data, seed=0)
    assert (len(train), len(evals)) == (16, 4)
    # every row in chat form: the instruction rows as user (instruction + input) and assistant (output) turns
    converted = sorted((r["messages"] for r in train + evals), key=str)
    expected = [[{"role": "user", "content": f"q{i}\n\nctx"}, {"role": "assistant", "content": f"a{i}"}]
                for i in range(10)] + [[{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]] * 10
    assert converted == sorted(expected, key=str)
    assert len({str(r["messages"]) for r in evals} & {str(r["messages"]) for r in train if r["messages"][0]["content"]
                                                       != "u"}) == 0  # no instruction row in both splits


@pytest.mark.parametrize("args,needle", [
    (["model=gpt5"], "model='gpt5' is not accepted: one of llama3_70b, llama3_8b, mistral_7b, qwen2_5_7b, tiny"),
    (["-m", "quantization=nf4,nf2"], "quantization='nf2' is not accepted"),
    (["lora.r=0"], "lora.r=0 is not accepted: an integer >= 1"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is not accepted"),
    (["data=jsonl", "data.train_path=/no/such.jsonl"], "data.train_path='/no/such.jsonl' is not accepted"),
])
def test_cli_refuses_in_one_line_before_any_model_loads(tmp_path, args, needle):
    proc = cli_in_process([*args, f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {lines[0][7:]}"] and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "cache").exists()  # no model was built or loaded
    assert not list(Path(tmp_path).rglob("metrics.json"))


# ---- schedulers --------------------------------------------------------------------------------------------------
def test_the_schedulers_accepted_are_transformers_own():
    """Every SchedulerType of the installed transformers is accepted, and only those: a newer transformers' new one
    shows here, to be given what it needs (qlora_exp.builders.lr_scheduler_kwargs) or left refused."""
    from transformers import SchedulerType

    from qlora_exp.validate import SCHEDULERS

    assert set(SCHEDULERS) == {s.value for s in SchedulerType}


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                       "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                                       "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                                       "greedy"])
def test_every_accepted_scheduler_is_built_by_transformers_with_what_the_config_gives_it(make_cfg, scheduler):
    """The scheduler a trial's Trainer makes (transformers' get_scheduler, with our lr_scheduler_kwargs), stepped
    through the trial's steps: the *_min_lr ones end at optimizer.min_lr_rate x lr, warmup_stable_decay decays over
    the last optimizer.cooldown of the steps."""
    import torch
    from transformers import get_scheduler

    from qlora_exp.builders import lr_scheduler_kwargs

    cfg = make_cfg(f"optimizer.scheduler={scheduler}", "optimizer.lr=1e-3", "trainer.max_steps=20",
                   "optimizer.warmup=2")
    check_config(cfg, CPU)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_scheduler(scheduler, opt, num_warmup_steps=2, num_training_steps=20,
                          scheduler_specific_kwargs=lr_scheduler_kwargs(cfg.optimizer, cfg.trainer.max_steps))
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step(1.0) if scheduler in ("reduce_lr_on_plateau", "greedy") else sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    if scheduler in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        floor = 1e-3 * cfg.optimizer.min_lr_rate  # never below it, and there (within a step) at the end
        assert min(lrs[2:]) >= floor * (1 - 1e-9) and lrs[-1] == pytest.approx(floor, rel=0.1)
    if scheduler == "warmup_stable_decay":  # 2 warmup steps, 14 stable, then 4 (0.2 x 20) decaying to 0
        assert lrs[1:16] == [pytest.approx(1e-3)] * 15 and 0 < lrs[16] < 1e-3 and lrs[-1] == pytest.approx(0)


def test_nan_and_inf_are_refused_for_every_number_the_checks_read(make_cfg, monkeypatch):
    """The keys come from the checks themselves: every key check_config passes to its number check (on a config
    that reaches the optional ones) is tried with nan, inf and -inf."""
    import qlora_exp.validate as validate

    seen = {}
    real = validate._number
    monkeypatch.setattr(validate, "_number", lambda key, value, **kw: (seen.setdefault(key, kw), real(key, value, **kw)))
    everything = ["trainer.memory_budget_gb=40", "trainer.micro_batch_size=4", "trainer.checkpointed_layers=2",
                  "trainer.num_workers=1", "data.eval_path=null", "data.max_train_rows=100", "data.max_eval_rows=10",
                  "optimizer.scheduler=warmup_stable_decay"]
    check_config(make_cfg(*everything), OLD_GPU)
    assert {"optimizer.lr", "optimizer.min_lr_rate", "optimizer.cooldown", "data.eval_fraction",
            "trainer.memory_budget_gb"} <= seen.keys() and len(seen) >= 20
    for key, kw in seen.items():
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError) as e:
                check_config(make_cfg(*everything, f"{key}={bad}"), OLD_GPU)
            assert e.value.key == key, (key, bad, str(e.value))
            assert ("an integer" if kw.get("integer") else "a finite number") in str(e.value), str(e.value)


# ---- a local model folder ------------------------------------------------------------------------------------------
def test_a_model_folder_with_its_own_code_runs_only_when_trusted_and_complete(make_cfg, tmp_path):
    from tests.test_bad_input import tiny_model_folder

    own = {"auto_map": {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM":
                        "modeling_tiny.TinyForCausalLM"}, "model_type": "tiny_own"}
    folder = tiny_model_folder(tmp_path / "own", own)
    args = ["model.random_init=false", f"model.name_or_path={folder}"]
    with pytest.raises(ConfigError, match=r"set model.trust_remote_code=true to run its code"):
        check_config(make_cfg(*args), CPU)
    for module in ("configuration_tiny.py", "modeling_tiny.py"):
        (folder / module).write_text("# the folder's own code\n")
    check_config(make_cfg(*args, "model.trust_remote_code=true"), CPU)  # asked for, and there: accepted
    hub_code = tiny_model_folder(tmp_path / "hub_code", {"auto_map": {"AutoConfig": "org/repo--configuration.Config"}})
    check_config(make_cfg("model.random_init=false", f"model.name_or_path={hub_code}", "model.trust_remote_code=true"),
                 CPU)  # code in another repository: transformers fetches it, nothing to look for here
    plain = tiny_model_folder(tmp_path / "plain", {})
    check_config(make_cfg("model.random_init=false", f"model.name_or_path={plain}"), CPU)


def test_rows_too_short_to_train_on_at_any_length(make_cfg, tmp_path):
    from qlora_exp.data import check_max_length

    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [i]}) + "\n" for i in range(4)))
    cfg = make_cfg("data=jsonl", f"data.train_path={path}", "data.assistant_only_loss=false")
    train, evals = load_rows(cfg.data, seed=0)
    with pytest.raises(ConfigError, match=r"rows of at least 2 tokens"):
        check_max_length(cfg.data, 128, None, train, evals)
