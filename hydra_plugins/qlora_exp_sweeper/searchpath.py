"""Puts qlora_exp's sweeper and launcher configs on every Hydra app's search path, as an installed Hydra plugin's
ConfigStore entries are: `hydra/sweeper=qlora_optuna` (or the peer's name `optuna`), `hydra/sweeper/sampler=tpe`,
`hydra/sweeper/pruner=median`, `hydra/launcher=local|slurm` (or `submitit_local|submitit_slurm`) work in any app."""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class QLoRAExpSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="qlora_exp", path="pkg://hydra_plugins.qlora_exp_sweeper.conf")
