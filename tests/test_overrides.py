"""What a trial receives through its overrides is what the sweep meant: `sweeper.naming.hydra_value` writes any value
so that Hydra's override parser reads it back unchanged (a backslash in a path stays one backslash), and the search
presets a user keeps on Hydra's search path are found like the shipped ones."""
import random
import subprocess
import sys

import optuna
import pytest
from omegaconf import OmegaConf

from sweeper.naming import hydra_value
from tests.conftest import FAST, REPO, run_cli

STRINGS = [
    "out\\dir", "C:\\Users\\me\\", "\\", "\\\\", "a\\", "a\\\\", "'", "\\'", "\\\\'", "a\\'b", "it's", 'say "hi"',
    "'quoted'", '"quoted"', "a,b", "a=b", "k=v,w", " lead", "trail ", "two  spaces", "tab\there", "new\nline", "",
    "${x}", "\\${x}", "${oc.env:HOME,'a,b'}", "$", "${", "}", "[a,b]", "{a:1}", "choice(1,2)", "null", "true", "1e-3",
    "~", "+x", "#not a comment", "%2C", "é ü 中", "sqlite:///out\\dir/optuna.db",
]


def parsed(text: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={text}").value()


@pytest.mark.parametrize("s", STRINGS, ids=[repr(s) for s in STRINGS])
def test_hydra_value_round_trips_through_hydras_parser(s):
    assert parsed(hydra_value(s)) == s


def test_hydra_value_round_trips_random_strings_of_the_characters_the_grammar_treats_specially():
    rnd = random.Random(0)
    alphabet = "a\\'\",= ${}()[]:\t%@/-+.*?|#~!"
    strings = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12))) for _ in range(3000)]
    assert [s for s in strings if parsed(hydra_value(s)) != s] == []


def test_hydra_value_round_trips_lists_dicts_and_scalars():
    values = [["out\\dir", "a,b", "it's\\"], {"path": "x\\", "name": "a'b"}, 3, -2.5e-05, True, None, [1, [2, "3"]]]
    for v in values:
        assert parsed(hydra_value(v)) == v


def test_a_composed_config_holds_the_string_exactly(tmp_path):
    """Through Hydra's composition, as a trial's config is made: the value of the key, resolved, is the string."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "tests" / "toy_app" / "conf"), version_base="1.3"):
        for s in [x for x in STRINGS if "${" not in x]:
            cfg = compose("config", overrides=[f"paths.output_root={hydra_value(s)}"])
            assert cfg.paths.output_root == s, s


@pytest.mark.slow
def test_a_sweep_under_a_folder_with_a_backslash_keeps_its_trials_and_its_study_there(tmp_path):
    """`paths.output_root='out\\dir'`: the trials' folders, and the study their pruning callback reports to, are the
    driver's own (a doubled backslash sent each trial to `out\\\\dir`, with a study of its own there)."""
    root = tmp_path / "out\\dir"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "toy_app" / "app.py"), "-m", "x=0,1", "hydra/sweeper/pruner=median",
         "hydra.sweeper.study_name=toy", f"paths.output_root='{root}'"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = f"sqlite:///{root}/optuna.db"
    trials = optuna.load_study(study_name="toy", storage=storage).trials
    assert sorted(t.params["x"] for t in trials) == [0, 1] and all(t.value is not None for t in trials)
    for n in (0, 1):
        trial_cfg = OmegaConf.load(root / "multirun" / "toy" / str(n) / ".hydra" / "config.yaml")
        assert trial_cfg.paths.output_root == str(root)
        assert trial_cfg.callbacks.optuna_pruning.storage == storage  # the trial reports to the driver's study
        assert (root / "multirun" / "toy" / str(n) / "metrics.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out\\dir"]  # no out\\dir beside it
    assert [str(p.relative_to(root)) for p in root.rglob("*.db")] == ["optuna.db"]


@pytest.mark.slow
def test_a_search_preset_on_the_users_own_search_path_is_used(tmp_path, cache_dir):
    """`search=my_space hydra.searchpath=[file://...]`: accepted as Hydra finds it, and its space is the study's."""
    conf = tmp_path / "my_conf" / "search"
    conf.mkdir(parents=True)
    (conf / "my_space.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n"
                                        "      lora.alpha: choice(7, 9)\n")
    proc = run_cli(["-m", "search=my_space", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
                    "hydra.sweeper.n_trials=1", *FAST], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    (name,) = optuna.get_all_study_names(storage)
    (trial,) = optuna.load_study(study_name=name, storage=storage).trials
    assert name.startswith("my_space-") and trial.state.name == "COMPLETE"
    assert trial.params.keys() == {"lora.alpha"} and trial.params["lora.alpha"] in (7, 9)
    assert trial.distributions["lora.alpha"] == optuna.distributions.CategoricalDistribution([7, 9])
