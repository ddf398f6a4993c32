"""trainer.engine: hf (the default) or unsloth (qlora_exp/engines.py). The slow tests run the real Unsloth, which
trains on a CPU from its 2026.10 releases, from a folder of its own (scripts/unsloth/site.sh; `make test` builds it
and passes it as QLORA_EXP_TEST_UNSLOTH_SITE): a trial's PYTHONPATH puts it first, as a user's environment with the
unsloth extra would have it (trl 1.15, datasets 4)."""
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qlora_exp import engines
from qlora_exp.device import DeviceInfo
from qlora_exp.errors import ConfigError
from qlora_exp.validate import check_config
from tests.conftest import ROWS, cli_in_process, read_metrics, run_cli

CPU = DeviceInfo(cuda=False, bf16=False, n_gpus=0, name="cpu")
SITE = os.environ.get("QLORA_EXP_TEST_UNSLOTH_SITE")
REQUIRED = os.environ.get("QLORA_EXP_TEST_REQUIRE_UNSLOTH", "") not in ("", "0")


def unsloth_site() -> str:
    if SITE and (Path(SITE) / "unsloth" / "__init__.py").is_file():
        return SITE
    if REQUIRED:
        pytest.fail(f"QLORA_EXP_TEST_UNSLOTH_SITE={SITE!r} has no Unsloth (bash scripts/unsloth/site.sh DIR)")
    pytest.skip("no Unsloth site (make test builds one: scripts/unsloth/site.sh)")


def test_an_unknown_engine_is_one_line_naming_the_key_and_the_engines(make_cfg):
    with pytest.raises(ConfigError, match=r"^trainer.engine='vllm' is not accepted: one of hf, unsloth$"):
        check_config(make_cfg("trainer.engine=vllm"), CPU)


@pytest.mark.parametrize("override, key", [
    ("quantization=int8", "quantization.method"),
    ("trainer.compile_layers=true", "trainer.compile_layers"),
    ("trainer.checkpointed_layers=2", "trainer.checkpointed_layers"),
    ("trainer.gpus=2", "trainer.gpus"),
    ("trainer.fused_kernels=true", "trainer.fused_kernels"),
    ("quantization.cache=true", "quantization.cache"),
])
def test_what_unsloth_does_not_take_is_refused_before_anything_loads(make_cfg, override, key):
    with pytest.raises(ConfigError) as e:
        check_config(make_cfg("trainer.engine=unsloth", override), CPU)
    assert e.value.key == key and "trainer.engine=unsloth" in str(e.value) and "\n" not in str(e.value)


def test_unsloth_not_installed_says_how_to_install_it(make_cfg, monkeypatch):
    real = engines.importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a))
    with pytest.raises(ConfigError, match=r"trainer.engine='unsloth' is not accepted: hf: Unsloth is not installed "
                                          r"here \(pip install 'qlora_exp\[unsloth\]'"):
        check_config(make_cfg("trainer.engine=unsloth"), CPU)


def test_an_unsloth_that_cannot_start_is_one_line(make_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "unsloth", None)  # its import raises, as Unsloth does on a machine it refuses
    with pytest.raises(ConfigError, match=r"^trainer.engine='unsloth' is not accepted: hf here: Unsloth did not start "
                                          r"\(ModuleNotFoundError: .*\)$"):
        engines.start(make_cfg("trainer.engine=unsloth"))
    assert engines.start(make_cfg()) == "hf"


def test_a_worker_sweep_of_both_engines_is_refused_before_any_trial(tmp_path, cache_dir):
    proc = cli_in_process(["-m", "trainer.engine=hf,unsloth", f"paths.cache_dir={cache_dir}", *ROWS], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hydra.sweeper.mode='workers' is not accepted: processes in a sweep of both engines" in proc.stderr
    assert not list(tmp_path.glob("outputs/multirun/*/0"))  # no trial started


@pytest.mark.slow
def test_the_unsloth_engine_trains_what_the_hf_engine_trains_on_one_worker(tmp_path, cache_dir):
    """Real Unsloth (its CPU path) against the hf engine, the same two trials: the same eval loss, Unsloth's base
    loaded again for the worker's second trial, a safetensors adapter."""
    site = unsloth_site()
    args = ["-m", "lora.r=4,8", "lora.dropout=0", "trainer.max_steps=12", "trainer.eval_every=6", *ROWS]  # (dropout
    # draws its masks over the batch as laid out: packed rows here, padded ones in Unsloth)
    (tmp_path / "u").mkdir(), (tmp_path / "h").mkdir()
    env = {"PYTHONPATH": os.pathsep.join([site, str(Path(__file__).resolve().parents[1])])}
    uns = run_cli([*args, "trainer.engine=unsloth"], tmp_path / "u", cache_dir, env=env)
    assert uns.returncode == 0, uns.stderr[-3000:]
    hf = run_cli(args, tmp_path / "h", cache_dir)
    assert hf.returncode == 0, hf.stderr[-3000:]

    def trials(folder: Path) -> dict:  # lora.r -> (trial folder, metrics)
        (sweep,) = (folder / "outputs" / "multirun").iterdir()
        return {OmegaConf.load(t / "config.yaml").lora.r: (t, read_metrics(t))
                for t in sweep.iterdir() if (t / "metrics.json").is_file()}

    u, h = trials(tmp_path / "u"), trials(tmp_path / "h")
    assert sorted(u) == sorted(h) == [4, 8]
    for name in u:
        (folder, mu), (_, mh) = u[name], h[name]
        assert mu["status"] == mh["status"] == "complete"
        assert mu["engine"].startswith("unsloth 2026.") and mh["engine"] == "hf"
        assert mu["eval_loss"] < mu["initial_eval_loss"] - 0.5
        assert mu["eval_loss"] == pytest.approx(mh["eval_loss"], abs=1e-3), name
        assert mu["quantized"]["quant_type"] == "nf4" and mu["quantized"]["double_quant"]
        assert mu["trainable_params"] == mh["trainable_params"]
        assert mu["packing"] == "off" and "Unsloth" in mu["fused_kernels"]
        assert not mu["warm_base"]  # Unsloth's base is loaded per trial, also on a warm worker
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        assert not list((folder / "adapter").glob("*.bin"))
    assert sorted(m["trial_in_process"] for _, m in u.values()) == [1, 2]  # one worker ran both
    assert sorted(m["warm_base"] for _, m in h.values()) == [False, True]  # the hf engine kept its base
