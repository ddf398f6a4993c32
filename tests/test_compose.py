"""sweeper.compose: a trial config set from a remembered one is the config Hydra composes from the same overrides."""
import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobRuntime, setup_globals
from hydra.types import RunMode
from omegaconf import OmegaConf

from qlora_exp.__main__ import CONF_DIR
from sweeper.compose import SweepComposer

FIXED = ["trainer.max_steps=20", "hydra.sweeper.n_trials=4"]


@pytest.fixture
def loader_and_master():
    setup_globals()
    JobRuntime.instance().set("name", "qlora_exp")
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    master = loader.load_configuration("config", overrides=[*FIXED, "lora.r=8,16"], run_mode=RunMode.MULTIRUN)
    return loader, master


def same(a, b) -> None:
    """Equal as written (interpolations kept) and as resolved (the app's part, with ${hydra:...} from each)."""
    assert OmegaConf.to_yaml(a) == OmegaConf.to_yaml(b)
    resolved = []
    for cfg in (a, b):
        HydraConfig.instance().set_config(cfg)
        resolved.append(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                               resolve=True))
    assert resolved[0] == resolved[1]


@pytest.mark.parametrize("points", [
    [["lora.r=8", "optimizer.lr=1e-4"], ["lora.r=16", "optimizer.lr=2e-4"], ["lora.r=64", "optimizer.lr=0.0008"]],
    [["lora.target_modules=[q_proj,v_proj]"], ["lora.target_modules=[k_proj]"], ["lora.target_modules=all_linear"]],
    [["lora.alpha=null", "lora.dropout=0.1"], ["lora.alpha=32", "lora.dropout=0.0"]],
    [["trainer.seed=1", "run_name=a"], ["trainer.seed=2", "run_name='b c'"]],
])
def test_a_config_set_from_a_remembered_one_is_the_one_hydra_composes(loader_and_master, points):
    loader, master = loader_and_master
    compose = SweepComposer(loader, master)
    for overrides in points:
        same(compose([*FIXED, *overrides]), loader.load_sweep_config(master, [*FIXED, *overrides]))
    assert (compose.composed, compose.fast) == (1, len(points) - 1)


def test_groups_and_additions_compose_through_hydra(loader_and_master):
    loader, master = loader_and_master
    compose = SweepComposer(loader, master)
    for overrides in (["optimizer=adamw_torch", "lora.r=8"], ["optimizer=paged_adamw_8bit", "lora.r=16"],
                      ["+extra_key=1"], ["+extra_key=2"]):
        same(compose(overrides), loader.load_sweep_config(master, overrides))
    assert (compose.composed, compose.fast) == (4, 0)
    compose(["optimizer=adamw_torch", "lora.r=32"])  # the same group choice as a config before: its values set
    assert compose.fast == 1


def test_a_refused_value_is_refused_in_hydras_words(loader_and_master):
    loader, master = loader_and_master
    compose = SweepComposer(loader, master)
    compose(["lora.r=8"])
    for bad in (["lora.no_such_key=1"], ["lora=8"], ["lora.r=8", "lora.no_such_key=2"]):
        with pytest.raises(Exception) as ours:  # noqa: PT011  (whatever Hydra raises, the same)
            compose(bad)
        with pytest.raises(Exception) as hydras:  # noqa: PT011
            loader.load_sweep_config(master, bad)
        assert (type(ours.value), str(ours.value)) == (type(hydras.value), str(hydras.value))


def test_a_dict_replaced_by_a_value_is_hydras_result(loader_and_master):
    loader, master = loader_and_master
    compose = SweepComposer(loader, master)
    compose(["model.shape.hidden_size=64"])
    for overrides in (["model.shape=3"], ["model.shape=4"], ["model.shape.hidden_size=32"]):
        same(compose(overrides), loader.load_sweep_config(master, overrides))
