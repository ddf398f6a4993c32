"""model=tiny_pretrained: the tiny shape pretrained here on the stdlib's docstrings and comments (qlora_exp.pretrain).

One small build (300,000 characters of the stdlib's text with the shipped rows', 30 steps: a few seconds) is shared by
the module; a second build of the same settings, from nothing, must give the same weights. The full build (~2.5 min)
is measured in docs/benchmarks.md.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_exp import models, pretrain
from qlora_exp.device import DeviceInfo
from qlora_exp.errors import ConfigError
from qlora_exp.validate import check_config
from tests.conftest import ROWS, compose_cfg, read_metrics, run_cli

CPU = DeviceInfo(cuda=False, bf16=False, n_gpus=0, name="cpu")

# a build of seconds: the first 300,000 characters of the stdlib's text (and the shipped rows'), 30 steps of 16 blocks
# at a larger lr than the full build's
SMALL = ["model=tiny_pretrained", "model.pretrain.max_chars=300000", "model.pretrain.steps=30",
         "model.pretrain.warmup=5", "model.pretrain.batch_size=16", "model.pretrain.lr=3e-3"]


def build(cfg):
    return models.random_model_dir(cfg.model, cfg.paths.cache_dir, models.tokenizer_corpus(cfg.paths),
                                   cfg.quantization)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(config, folder) of the small build, in a cache of this module's own."""
    tmp = tmp_path_factory.mktemp("pretrained")
    cfg = compose_cfg(tmp, SMALL, tmp / "cache")
    return cfg, build(cfg)


def test_the_build_is_deterministic_and_keyed_by_its_settings(small, tmp_path):
    cfg, path = small
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list(path.parent.glob("*.tmp*"))  # built in a temporary folder, then moved into place
    record = json.loads((path / "pretrain.json").read_text())
    assert record["settings"]["steps"] == 30 and record["heldout_documents"] > 0
    assert record["corpus_chars"] < 1_500_000  # capped: 300,000 of the stdlib's and the rows' 10 x 92,000 (4.6 M in all)
    # a second build from nothing (its own cache, the corpus extracted again): the same folder name, the same weights
    again = compose_cfg(tmp_path, SMALL, tmp_path / "cache")
    other = build(again)
    assert other.name == path.name and other != path
    first, second = load_file(path / "model.safetensors"), load_file(other / "model.safetensors")
    assert first.keys() == second.keys() and len(first) > 10
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((other / "pretrain.json").read_text())["corpus_sha1"] == record["corpus_sha1"]
    # built once: asked again, the folder is returned as it is
    before = (other / "model.safetensors").stat().st_mtime_ns
    assert build(again) == other and (other / "model.safetensors").stat().st_mtime_ns == before
    # another setting or another corpus is another model
    for change in ("model.pretrain.steps=31", "model.pretrain.lr=1e-3", "model.pretrain.max_chars=200000",
                   "model.seed=1"):
        changed = compose_cfg(tmp_path, [*SMALL, change], tmp_path / "cache")
        assert models.random_model_path(changed.model, changed.paths.cache_dir,
                                        models.tokenizer_corpus(changed.paths)).name != path.name, change


def nats_per_char(model, tokenizer, text: str) -> float:
    """The model's loss on `text` per character (comparable across tokenizers): blocks of 128 tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    return pretrain.mean_loss(model, blocks) * blocks.shape[0] * 127 / len(tokenizer.decode(blocks.flatten().tolist()))


def test_pretrained_weights_have_a_much_lower_held_out_loss_than_random_ones(small, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, path = small
    tok = models.load_tokenizer(str(path), cfg.model)
    heldout = pretrain.heldout_blocks(cfg.model, cfg.paths.cache_dir, models.tokenizer_corpus(cfg.paths), tok)
    assert 10 <= len(heldout) <= pretrain.HELDOUT_BLOCKS and heldout.shape[1] == cfg.model.pretrain.seq_len
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(cfg.model.seed)  # the same shape at the weights its pretraining started from
    at_init = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    loss, init = pretrain.mean_loss(trained, heldout), pretrain.mean_loss(at_init, heldout)
    assert init == pytest.approx(6.24, abs=0.3)  # ~ln(512): uniform over the vocabulary
    assert loss < init - 1.0, (loss, init)  # 30 steps on 300,000 characters; the full build: 1.9 against 6.3
    record = json.loads((path / "pretrain.json").read_text())
    assert record["heldout_loss"] == pytest.approx(loss, abs=1e-3)
    assert record["heldout_loss_at_init"] == pytest.approx(init, abs=1e-3)
    # and against model=tiny's random weights (its own tokenizer: per character), on the same held-out stdlib text
    tiny_cfg = compose_cfg(tmp_path, [], cfg.paths.cache_dir)
    tiny = build(tiny_cfg)
    corpus, _ = pretrain.load_corpus(cfg.model, cfg.paths.cache_dir, models.tokenizer_corpus(cfg.paths))
    text = "\n\n".join(corpus["heldout"])[:20_000]
    random_weights = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ours, theirs = nats_per_char(trained, tok, text), nats_per_char(random_weights, models.load_tokenizer(
        str(tiny), tiny_cfg.model), text)
    assert ours < theirs - 1.5, (ours, theirs)  # the full build: 1.34 against 5.16


def test_the_pretrain_command_builds_or_finds_the_same_model(small, capsys):
    cfg, path = small
    assert pretrain.main([*SMALL[1:], f"paths.cache_dir={cfg.paths.cache_dir}"]) == path
    assert str(path) in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"model.pretrain=None is not accepted"):
        pretrain.main(["model=tiny", f"paths.cache_dir={cfg.paths.cache_dir}"])


@pytest.mark.parametrize("override,key", [
    ("model.pretrain.steps=0", "model.pretrain.steps"),
    ("model.pretrain.corpus=wikipedia", "model.pretrain.corpus"),
    ("model.pretrain.seq_len=4096", "model.pretrain.seq_len"),
    ("model.random_build=quantized", "model.random_build"),
    ("+model.pretrain.epochs=2", "model.pretrain.epochs"),
])
def test_bad_pretrain_settings_are_refused_by_name(tmp_path, override, key):
    check_config(compose_cfg(tmp_path, ["model=tiny_pretrained"]), CPU)
    with pytest.raises(ConfigError) as e:
        check_config(compose_cfg(tmp_path, ["model=tiny_pretrained", override]), CPU)
    assert e.value.key == key


@pytest.mark.slow
def test_a_trial_on_the_pretrained_base_learns(small, tmp_path):
    cfg, path = small
    proc = run_cli([*SMALL, "trainer.max_steps=20", "trainer.eval_every=10", "trainer.save_adapter=false", *ROWS],
                   tmp_path, cfg.paths.cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    m = read_metrics(run)
    assert m["status"] == "complete" and m["steps"] == 20
    assert str(path) in m["base_from"]  # the module's build, found in the cache, not built again
    assert [step for step, _ in m["eval_history"]] == [0, 10, 20]
    (_, first), (_, mid), (_, last) = m["eval_history"]  # at the model's default_lr
    assert first > mid > last and last == m["eval_loss"] < m["initial_eval_loss"] - 0.1, m["eval_history"]
