"""Bad input, through the real command line: each refused with exit 2 and one line on stderr naming the key,
the value and what is accepted; no traceback (unless HYDRA_FULL_ERROR=1), no model built, no study written.

Single runs (`python -m qlora_exp ...`) and sweeps (`python -m qlora_exp -m ...`) alike: in a sweep the fixed
overrides are checked before Hydra starts, and every value of the sweep (each choice and grid point, both ends of
an interval) by the driver before it opens the study.
"""
import json
import os
from pathlib import Path

import optuna
import pytest

from tests.conftest import cli_in_process, run_cli

SWEEP = ["-m", "lora.r=8,16"]
MISSING_FIELDS = {"prompt": "hi", "answer": "yo"}

# id, command-line arguments ({name} is a data file of the `data_files` fixture), the key the line names,
# and a piece of the line that says what is accepted
CASES = [
    # unknown group option or key
    ("group_option", ["model=gpt5"], "model", "is not accepted: one of llama3_70b, llama3_8b, mistral_7b, qwen2_5_7b, tiny"),
    ("group_option_swept", ["-m", "quantization=nf4,nf2"], "quantization", "'nf2' is not accepted: one of fp4"),
    ("unknown_key", ["lora.rank=8"], "lora.rank",
     "is not accepted: a key of lora: alpha, bias, dropout, r, target_modules, use_rslora"),
    ("unknown_key_in_sweep", [*SWEEP, "lora.rank=8"], "lora.rank", "is not accepted: a key of lora: alpha,"),
    ("unknown_key_swept", ["-m", "lora.rank=8,16"], "lora.rank", "is not accepted: a key of lora: alpha,"),
    ("unknown_nested_key", ["lora.extra.alpha=1"], "lora.extra.alpha", "is not accepted: a key of lora: alpha,"),
    ("unknown_top_key", ["learning_rate=1e-4"], "learning_rate",
     "is not accepted: a key of the config: callbacks, data, lora, model"),
    ("unknown_sweeper_key", [*SWEEP, "hydra.sweeper.n_trial=3"], "hydra.sweeper.n_trial",
     "is not accepted: a key of hydra.sweeper: _recursive_, _target_, bytecode_cache, callbacks_key, check"),
    ("unknown_search_param", ["-m", "hydra.sweeper.params={lora.rnk:'8,16'}"], "lora.rnk",
     "is not accepted: a key of lora: alpha,"),
    # wrong type
    ("type_int", ["lora.r=abc"], "lora.r", "'abc' is not accepted: an integer"),
    ("type_int_in_sweep", [*SWEEP, "trainer.max_steps=ten"], "trainer.max_steps", "'ten' is not accepted: an integer"),
    ("type_number", ["lora.dropout=[0.1]"], "lora.dropout", "[0.1] is not accepted: a number"),
    ("type_hydra_bool", ["hydra.job.chdir=maybe"], "hydra.job.chdir", "is not accepted: Value 'maybe' is not a valid bool"),
    ("type_sweeper_int", [*SWEEP, "hydra.sweeper.n_jobs=two"], "hydra.sweeper.n_jobs", "is not accepted: an integer >= 1"),
    ("type_sweeper_rate", [*SWEEP, "hydra.sweeper.max_failure_rate=lots"], "hydra.sweeper.max_failure_rate",
     "is not accepted: a number from 0 to 1"),
    ("type_sweeper_seconds", [*SWEEP, "hydra.sweeper.stale_after_s=soon"], "hydra.sweeper.stale_after_s",
     "is not accepted: a number of seconds > 0"),
    ("type_sampler_seed", [*SWEEP, "hydra.sweeper.sampler.seed=abc"], "hydra.sweeper.sampler",
     "is not accepted: arguments of optuna.samplers.GridSampler"),
    ("sweep_without_m", ["lora.r=8,16"], "lora.r", "is not accepted: one value ([a,b] for a list"),
    ("bad_interpolation", ["optimizer.lr=${nope}"], "optimizer.lr",
     "'${nope}' is not accepted: an interpolation that resolves"),
    # out of range
    ("rank_zero", ["lora.r=0"], "lora.r", "=0 is not accepted: an integer >= 1"),
    ("lr_negative_in_sweep", [*SWEEP, "optimizer.lr=-1e-4"], "optimizer.lr", "is not accepted: a number > 0"),
    ("dropout_above_one", ["lora.dropout=1.5"], "lora.dropout", "is not accepted: a number >= 0 and < 1"),
    ("max_steps_zero", ["trainer.max_steps=0"], "trainer.max_steps", "is not accepted: an integer >= 1, or -1"),
    ("precision_unknown", ["trainer.precision=fp8"], "trainer.precision", "is not accepted: one of auto, bf16, fp16"),
    ("objective_unknown", ["objective=accuracy"], "objective", "is not accepted: one of eval_loss, perplexity"),
    ("n_jobs_zero", [*SWEEP, "hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs", "=0 is not accepted: an integer >= 1"),
    ("n_trials_zero", [*SWEEP, "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials", "is not accepted: an integer >= 1"),
    ("timeout_zero", [*SWEEP, "hydra.sweeper.timeout=0"], "hydra.sweeper.timeout",
     "=0 is not accepted: a number of seconds > 0, or null"),
    ("failure_rate_above_one", [*SWEEP, "hydra.sweeper.max_failure_rate=2"], "hydra.sweeper.max_failure_rate",
     "is not accepted: a number from 0 to 1"),
    ("bytecode_cache_number", [*SWEEP, "hydra.sweeper.bytecode_cache=3"], "hydra.sweeper.bytecode_cache",
     "=3 is not accepted: auto (a cache under ~/.cache/qlora_exp/pycache"),
    ("pruner_argument", ["-m", "optimizer.lr=interval(1e-5,1e-3)", "hydra.sweeper.pruner.n_warmup_steps=-5"],
     "hydra.sweeper.pruner",
     "is not accepted: arguments of optuna.pruners.MedianPruner"),
    # NaN and inf pass a plain range check (NaN compares false with everything): refused as not finite
    ("lr_inf", ["optimizer.lr=inf"], "optimizer.lr", "=inf is not accepted: a finite number"),
    ("lr_nan", ["optimizer.lr=nan"], "optimizer.lr", "=nan is not accepted: a finite number"),
    ("alpha_nan", ["lora.alpha=nan"], "lora.alpha", "=nan is not accepted: a finite number"),
    ("dropout_nan", ["lora.dropout=nan"], "lora.dropout", "=nan is not accepted: a finite number"),
    ("weight_decay_inf", ["optimizer.weight_decay=inf"], "optimizer.weight_decay", "is not accepted: a finite number"),
    ("warmup_nan", ["optimizer.warmup=nan"], "optimizer.warmup", "is not accepted: a finite number"),
    ("lr_inf_in_sweep", ["-m", "optimizer.lr=1e-4,inf"], "optimizer.lr", "=inf is not accepted: a finite number"),
    ("seed_negative", ["trainer.seed=-1"], "trainer.seed", "=-1 is not accepted: an integer >= 0"),
    ("num_workers_negative", ["trainer.num_workers=-1"], "trainer.num_workers", "=-1 is not accepted: an integer >= 0"),
    ("quant_storage_unknown", ["quantization.quant_storage=float33"], "quantization.quant_storage",
     "'float33' is not accepted: one of uint8, float16, bfloat16, float32"),
    ("gpus_zero", ["trainer.gpus=0"], "trainer.gpus", "=0 is not accepted: an integer >= 1"),
    ("gpus_not_a_divisor", ["trainer.gpus=3"], "trainer.gpus",
     "=3 is not accepted: 1 or a divisor of trainer.batch_size x trainer.grad_accum = 16"),
    ("gpus_swept_not_a_divisor", ["-m", "trainer.gpus=2,3"], "trainer.gpus", "=3 is not accepted: 1 or a divisor"),
    ("max_eval_rows_zero", ["data.max_eval_rows=0"], "data.max_eval_rows", "=0 is not accepted: an integer >= 1"),
    ("eval_path_is_train_path", ["data=jsonl", "data.train_path={good}", "data.eval_path={good}"], "data.eval_path",
     "is not accepted: a file other than data.train_path (held-out rows)"),
    ("max_grad_norm_nan", ["optimizer.max_grad_norm=nan"], "optimizer.max_grad_norm", "is not accepted: a finite number"),
    ("epochs_inf", ["trainer.max_steps=-1", "trainer.epochs=inf"], "trainer.epochs", "=inf is not accepted: a finite"),
    ("memory_budget_nan", ["trainer.memory_budget_gb=nan"], "trainer.memory_budget_gb", "is not accepted: a finite"),
    ("eval_fraction_nan", ["data.eval_path=null", "data.eval_fraction=nan"], "data.eval_fraction",
     "=nan is not accepted: a finite number"),
    ("min_lr_rate_nan", ["optimizer.scheduler=cosine_with_min_lr", "optimizer.min_lr_rate=nan"], "optimizer.min_lr_rate",
     "=nan is not accepted: a finite number"),
    ("cooldown_inf", ["optimizer.scheduler=warmup_stable_decay", "optimizer.cooldown=inf"], "optimizer.cooldown",
     "=inf is not accepted: a finite number"),
    # trainer.max_length: below it trl cuts every row before its first assistant token and drops it (the chat
    # template alone is 10 tokens of the tiny tokenizer, the shortest shipped prompt 3 more)
    ("max_length_below_the_prompts", ["trainer.max_length=8"], "trainer.max_length",
     "=8 is not accepted: an integer >= 14 for these rows and this tokenizer: shorter, every row of data.train_path "
     "is cut before its first assistant token (chat template included), leaving nothing to train on"),
    ("max_length_below_the_prompts_in_sweep", [*SWEEP, "trainer.max_length=13"], "trainer.max_length",
     "=13 is not accepted: an integer >= 14"),
    ("max_length_swept_below_the_prompts", ["-m", "trainer.max_length=8,128"], "trainer.max_length",
     "=8 is not accepted: an integer >= 14 for these rows and this tokenizer: shorter, every row of data.train_path "
     "is cut before its first assistant token (chat template included), leaving nothing to train on (a value of "
     "this sweep, checked before any trial starts)"),
    ("max_length_below_the_held_out_prompts", ["data=jsonl", "data.train_path={good}", "data.eval_path={long_prompt}",
                                               "trainer.max_length=24"], "trainer.max_length",
     "every row of data.eval_path is cut before its first assistant token (chat template included), leaving nothing "
     "to evaluate"),
    # schedulers: each gets what it needs, or is refused before the trial
    ("scheduler_unknown", ["optimizer.scheduler=zigzag"], "optimizer.scheduler",
     "'zigzag' is not accepted: one of linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, "
     "inverse_sqrt, reduce_lr_on_plateau, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay, greedy"),
    ("min_lr_rate_missing", ["optimizer.scheduler=cosine_with_min_lr", "optimizer.min_lr_rate=null"],
     "optimizer.min_lr_rate", "=None is not accepted: a number"),
    ("min_lr_rate_above_one", ["optimizer.scheduler=cosine_warmup_with_min_lr", "optimizer.min_lr_rate=2"],
     "optimizer.min_lr_rate", "=2 is not accepted: a number >= 0 and <= 1"),
    ("cooldown_fraction_with_epochs", ["optimizer.scheduler=warmup_stable_decay", "trainer.max_steps=-1"],
     "optimizer.cooldown", "=0.2 is not accepted: a number of steps (>= 1) when trainer.max_steps is -1"),
    ("cooldown_longer_than_training", ["optimizer.scheduler=warmup_stable_decay", "optimizer.cooldown=200"],
     "optimizer.cooldown", "=200 is not accepted: at most 145 steps, or that fraction of trainer.max_steps=150"),
    ("polynomial_lr_at_its_end", ["optimizer.scheduler=polynomial", "optimizer.lr=1e-7"], "optimizer.lr",
     "is not accepted: a number > 1e-07 with optimizer.scheduler=polynomial"),
    # a local model folder: transformers must read it without running its code, unless asked to
    ("model_folder_with_its_own_code", ["model.random_init=false", "model.name_or_path={auto_map}"],
     "model.name_or_path", "is not accepted: a model folder without custom code, or set model.trust_remote_code=true "
     "to run its code (its auto_map names code of its own: config.json: AutoConfig, AutoModelForCausalLM)"),
    ("model_folder_with_its_own_code_and_type", ["model.random_init=false", "model.name_or_path={auto_map_own_type}"],
     "model.name_or_path", "set model.trust_remote_code=true to run its code"),
    ("model_folder_with_its_own_tokenizer_code", ["model.random_init=false", "model.name_or_path={own_tokenizer}"],
     "model.name_or_path", "set model.trust_remote_code=true to run its code (its auto_map names code of its own: "
     "tokenizer_config.json: AutoTokenizer)"),
    ("model_folder_of_unknown_type", ["model.random_init=false", "model.name_or_path={unknown_type}"],
     "model.name_or_path", "is not accepted: a model folder whose config.json model_type is one of the"),
    ("model_folder_code_missing", ["model.random_init=false", "model.name_or_path={auto_map}",
                                   "model.trust_remote_code=true"], "model.name_or_path",
     "is not accepted: a model folder holding the code its auto_map names (missing: configuration_tiny.py, "
     "modeling_tiny.py)"),
    ("model_folder_without_config", ["model.random_init=false", "model.name_or_path={no_config}"],
     "model.name_or_path", "is not accepted: a model folder holding a config.json"),
    ("model_folder_missing", ["model.random_init=false", "model.name_or_path=/no/such/model"], "model.name_or_path",
     "'/no/such/model' is not accepted: an existing model folder (holding config.json) or a hub id"),
    ("model_folder_with_its_own_code_in_sweep", [*SWEEP, "model.random_init=false", "model.name_or_path={auto_map}"],
     "model.name_or_path", "set model.trust_remote_code=true to run its code"),
    # Hydra's own settings are never swept: a comma in their value is one line, not Hydra's message
    ("hydra_setting_swept", [*SWEEP, "hydra.sweeper.n_jobs=1,2"], "hydra.sweeper.n_jobs",
     "is not accepted: one value: Hydra's own settings are not swept, and a comma makes a sweep"),
    ("hydra_setting_with_a_comma", ["hydra.run.dir=out,b"], "hydra.run.dir",
     "is not accepted: one value: Hydra's own settings are not swept"),
    # search grammar
    ("interval_reversed", ["-m", "optimizer.lr=interval(5,1)"], "optimizer.lr", "interval(5,1) has low > high; accepted:"),
    ("choice_empty", ["-m", "lora.r=choice()"], "lora.r", "'choice()' is not accepted: Hydra's override grammar"),
    ("range_empty", ["-m", "lora.r=range(8,4)"], "lora.r", "range(8,4) is empty"),
    ("log_zero_low", ["-m", "optimizer.lr=tag(log,interval(0,1e-3))"], "optimizer.lr", "is log scale with low <= 0; accepted:"),
    ("log_int_negative_low", ["-m", "lora.r=tag(log,int(interval(-8,64)))"], "lora.r", "is log scale with low <= 0"),
    ("unknown_tag", ["-m", "optimizer.lr=tag(linear,interval(1e-5,1e-3))"], "optimizer.lr", "unknown tag combination"),
    ("unclosed_list", [*SWEEP[:1], "lora.r=[8,16"], "lora.r", "is not accepted: Hydra's override grammar"),
    ("bad_params_block", ["-m", "hydra.sweeper.params={optimizer.lr:'interval(5,1)'}"], "optimizer.lr", "has low > high"),
    # sampler, pruner, directions
    ("unknown_sampler", [*SWEEP, "hydra.sweeper.sampler.name=annealing"], "hydra.sweeper.sampler.name",
     "'annealing' is not accepted: one of auto, cmaes, gp, grid, nsgaii, qmc, random, tpe (or hydra/sweeper/sampler=<name>)"),
    ("unknown_sampler_group", [*SWEEP, "hydra/sweeper/sampler=annealing"], "hydra/sweeper/sampler",
     "'annealing' is not accepted: one of auto, cmaes, gp, grid, motpe, nsgaii, qmc, random, tpe"),
    ("removed_sampler", [*SWEEP, "hydra/sweeper/sampler=motpe"], "hydra.sweeper.sampler",
     "'motpe' is not accepted: The 'motpe' sampler was removed in Optuna 4.0. Use 'hydra/sweeper/sampler=tpe'"),
    ("removed_sampler_short_form", [*SWEEP, "hydra.sweeper.sampler.name=motpe"], "hydra.sweeper.sampler",
     "'motpe' is not accepted: The 'motpe' sampler was removed in Optuna 4.0."),
    ("sampler_target_unknown", [*SWEEP, "+hydra.sweeper.sampler._target_=optuna.samplers.Nope", "~hydra.sweeper.sampler.name"],
     "hydra.sweeper.sampler._target_", "is not accepted: an importable class"),
    ("sweep_value_refused", ["-m", "lora.r=0,8"], "lora.r",
     "=0 is not accepted: an integer >= 1 (a value of this sweep, checked before any trial starts)"),
    ("sweep_interval_end_refused", ["-m", "lora.dropout=interval(0.0,1.0)"], "lora.dropout",
     "=1.0 is not accepted: a number >= 0 and < 1 (a value of this sweep"),
    ("sweep_params_value_refused", ["-m", "hydra.sweeper.params={optimizer.lr:'choice(1e-4,-1)'}"], "optimizer.lr",
     "=-1 is not accepted: a number > 0 (a value of this sweep"),
    ("migrated_search_space_key", [*SWEEP, "+hydra.sweeper.search_space={x:{type:float,low:0,high:1}}"],
     "hydra.sweeper.search_space", "is not accepted: not a setting here; use params"),
    ("unknown_pruner", [*SWEEP, "hydra.sweeper.pruner.name=bogus"], "hydra.sweeper.pruner.name",
     "'bogus' is not accepted: one of auto, hyperband, median, none"),
    ("grid_of_a_continuous_space", ["-m", "optimizer.lr=interval(1e-5,1e-3)", "hydra.sweeper.sampler.name=grid"],
     "hydra.sweeper.sampler", "a grid needs every parameter discrete"),
    ("unknown_direction", [*SWEEP, "hydra.sweeper.direction=sideways"], "hydra.sweeper.direction",
     "is not accepted: minimize or maximize"),
    ("directions_per_objective", [*SWEEP, "hydra.sweeper.objectives=[eval_loss,peak_memory_gb]",
                                  "hydra.sweeper.direction=[minimize]"], "hydra.sweeper.direction",
     "is not accepted: one direction per objective"),
    # target modules
    ("target_modules_unknown", ["lora.target_modules=[q_proj,c_attn]"], "lora.target_modules",
     "is not accepted: a non-empty list of the tiny projections: q_proj, k_proj"),
    ("target_modules_unknown_in_sweep", [*SWEEP, "lora.target_modules=[foo_proj]"], "lora.target_modules",
     "is not accepted: a non-empty list of the tiny projections"),
    ("target_preset_unknown", ["lora.target_modules=everything"], "lora.target_modules",
     "is not accepted: a preset (all_linear, attention, mlp)"),
    # data
    ("data_file_missing", ["data=jsonl", "data.train_path=/no/such.jsonl"], "data.train_path",
     "'/no/such.jsonl' is not accepted: an existing JSON-lines file"),
    ("data_file_missing_in_sweep", [*SWEEP, "data=jsonl", "data.train_path=/no/such.jsonl"], "data.train_path",
     "is not accepted: an existing JSON-lines file"),
    ("eval_file_missing", ["data=jsonl", "data.train_path={good}", "data.eval_path=/no/eval.jsonl"], "data.eval_path",
     "is not accepted: an existing JSON-lines file"),
    ("data_not_json", ["data=jsonl", "data.train_path={not_json}"], "not_json.jsonl:2",
     "is not accepted: one JSON object per line"),
    ("data_not_json_in_sweep", [*SWEEP, "data=jsonl", "data.train_path={not_json}"], "not_json.jsonl:2",
     "is not accepted: one JSON object per line"),
    ("data_row_without_fields", ["data=jsonl", "data.train_path={missing_fields}"], "missing_fields.jsonl:1",
     'is not accepted: {"messages": [{"role": ..., "content": ...}, ...]} with an assistant turn, or {"instruction"'),
    ("data_row_without_fields_in_sweep", [*SWEEP, "data=jsonl", "data.train_path={missing_fields}"],
     "missing_fields.jsonl:1", 'or {"instruction": ..., "response": ...}'),
    ("data_empty", ["data=jsonl", "data.train_path={empty}"], "data.train_path",
     "is not accepted: a JSON-lines file with at least one row"),
    ("data_empty_in_sweep", [*SWEEP, "data=jsonl", "data.train_path={empty}"], "data.train_path",
     "is not accepted: a JSON-lines file with at least one row"),
    ("data_one_row", ["data=jsonl", "data.train_path={one_row}"], "data.train_path", "at least 2 rows to hold out"),
    ("data_source_unknown", ["data.source=csv"], "data.source", "'csv' is not accepted: one of jsonl, hub"),
    # dead ends a new user met (issue #16)
    ("search_without_m", ["search=rank_alpha_lr"], "search", "with -m only: a search space is what a sweep searches"),
    ("group_set_to_null", ["search=null"], "search", "a group takes one of its options, or ~search leaves it out"),
    ("interval_empty", ["-m", "optimizer.lr=interval(1e-3,1e-3)"], "optimizer.lr",
     "has low == high, a single value; accepted: interval(low, high)"),
    # study name and storage
    ("study_name_parent_dir", [*SWEEP, "hydra.sweeper.study_name=../escape"], "hydra.sweeper.study_name",
     "is not accepted: letters, digits and _ . = , + - (no path separators)"),
    ("study_name_slash", [*SWEEP, "hydra.sweeper.study_name=a/b"], "hydra.sweeper.study_name", "no path separators"),
    ("storage_not_a_url", [*SWEEP, "hydra.sweeper.storage=outputs/x.db"], "hydra.sweeper.storage",
     "is not accepted: sqlite:///path.db, journal:///path.log or a database URL"),
]


@pytest.fixture
def data_files(tmp_path) -> dict[str, str]:
    good = {"instruction": "say hi", "response": "hi"}
    rows = {"good": [good] * 4, "missing_fields": [MISSING_FIELDS, good], "empty": [], "one_row": [good]}
    paths = {}
    for name, content in rows.items():
        paths[name] = tmp_path / "data" / f"{name}.jsonl"
        paths[name].parent.mkdir(exist_ok=True)
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in content))
    paths["not_json"] = tmp_path / "data" / "not_json.jsonl"
    paths["not_json"].write_text(json.dumps(good) + "\n{'instruction': 'single quotes are not JSON'}\n")
    paths["long_prompt"] = tmp_path / "data" / "long_prompt.jsonl"
    paths["long_prompt"].write_text(json.dumps({"instruction": "please " * 30 + "say hi", "response": "hi"}) + "\n")
    own_code = {"auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                             "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}}
    for name, changes in {"auto_map": own_code, "auto_map_own_type": {**own_code, "model_type": "tiny_own"},
                          "unknown_type": {"model_type": "lama"}, "own_tokenizer": {}, "no_config": None}.items():
        paths[name] = tiny_model_folder(tmp_path / "models" / name, changes)
    (paths["own_tokenizer"] / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}}))
    return {k: str(v) for k, v in paths.items()}


def tiny_model_folder(folder: Path, changes: dict | None) -> Path:
    """A model folder as save_pretrained writes it, of the tiny model's config (conf/model/tiny.yaml), with
    `changes` in its config.json (None: no config.json). No weights: the checks refuse it before loading any."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    folder.mkdir(parents=True)
    if changes is not None:
        tiny = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "tiny.yaml")
        config = AutoConfig.for_model(tiny.architecture, **OmegaConf.to_container(tiny.shape)).to_dict()
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def assert_nothing_written(cwd: Path) -> None:
    db = cwd / "outputs" / "optuna.db"
    assert not db.exists() or not optuna.get_all_study_names(f"sqlite:///{db}"), "a study was written"
    assert not (cwd / "cache").exists(), "a model was built"
    assert not list(cwd.rglob("metrics.json")), "a trial ran"


def assert_refused_in_one_line(proc, args, cwd: Path, key: str, accepted: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: ") and f"{key}" in line and accepted in line, line
    assert "accepted" in line and "Traceback" not in proc.stderr + proc.stdout
    assert_nothing_written(cwd)
    if "-m" not in args:  # refused before Hydra made the run folder
        assert not (cwd / "outputs").exists()


def with_files(args: list[str], data_files: dict[str, str]) -> list[str]:
    return [a.format(**data_files) if a.startswith(("data.train_path=", "data.eval_path=", "model.name_or_path="))
            else a for a in args]


@pytest.mark.parametrize("args,key,accepted", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_in_one_line(tmp_path, data_files, args, key, accepted):
    """The whole table through `qlora_exp.__main__.cli` in this process (the entry point `python -m qlora_exp`
    runs); a few of the cases again as real processes below."""
    args = with_files(args, data_files)
    assert_refused_in_one_line(cli_in_process(args, tmp_path), args, tmp_path, key, accepted)


# one of each place a refusal comes from: before Hydra, Hydra's composition, the sweeper, the search grammar,
# the data files, the storage
THROUGH_THE_SHELL = ["group_option", "unknown_key_in_sweep", "type_sweeper_int", "interval_reversed",
                     "data_not_json_in_sweep", "storage_not_a_url", "max_length_below_the_prompts"]


@pytest.mark.slow
@pytest.mark.parametrize("args,key,accepted", [c[1:] for c in CASES if c[0] in THROUGH_THE_SHELL],
                         ids=[c[0] for c in CASES if c[0] in THROUGH_THE_SHELL])
def test_refused_in_one_line_by_the_real_command(tmp_path, data_files, args, key, accepted):
    args = with_files(args, data_files)
    proc = run_cli(args, tmp_path, cache=tmp_path / "cache", timeout=120)
    assert_refused_in_one_line(proc, args, tmp_path, key, accepted)


@pytest.mark.parametrize("args", [["lora.rank=8"], [*SWEEP, "optimizer.lr=interval(5,1)"], [*SWEEP, "lora.r=0"]],
                         ids=["single", "sweep_grammar", "sweep_fixed_value"])
def test_hydra_full_error_shows_the_traceback(tmp_path, args):
    proc = cli_in_process(args, tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert "accepted" in proc.stderr.strip().splitlines()[-1]
    assert_nothing_written(tmp_path)


def test_swept_value_refused_by_the_trial_is_that_trials_fail_not_the_commands(tmp_path):
    """The driver checks fixed overrides only: `lora.r=8,0` is a sweep where one trial is FAIL (the values a
    sampler picks are each trial's own), so this is not refused up front."""
    from qlora_exp.__main__ import check_command

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        check_command(["-m", "lora.r=0,8", f"paths.cache_dir={tmp_path}/cache"])  # no ConfigError
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "outputs").exists()  # the check writes nothing


@pytest.mark.parametrize("args,key", [(["data=ultrachat"], "data.hub_name"), (["model=llama3_8b"], "model.name_or_path"),
                                      (["-m", "lora.r=8,16", "data=ultrachat"], "data.hub_name")])
def test_a_hub_source_without_the_hub_is_one_line_at_once(tmp_path, monkeypatch, args, key):
    """The hub cannot be reached (here: its endpoint is a closed local port): one line naming the hub source and
    what to do, before any work, instead of half a minute of retries and a traceback."""
    from qlora_exp import hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.unreachable.cache_clear()
    try:
        assert_refused_in_one_line(cli_in_process(args, tmp_path), args, tmp_path, key,
                                   "HF_HUB_OFFLINE=1 if it is in the Hugging Face cache: this machine cannot reach "
                                   "the hub (127.0.0.1: Connection refused)")
    finally:
        hub.unreachable.cache_clear()


def test_a_recipe_that_needs_a_gpu_and_the_hub_says_so_first(tmp_path, monkeypatch):
    from qlora_exp import hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub.unreachable.cache_clear()
    try:
        proc = cli_in_process(["experiment=article_recipe"], tmp_path)
    finally:
        hub.unreachable.cache_clear()
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith("error: experiment=article_recipe needs a GPU with bf16 and the Hugging Face hub"), line
