"""A Hugging Face token given by environment is never written: not in saved configs, logs, the study, TensorBoard
events, submitit's pickles, reports. Checked by reading every byte a sweep (and its report) writes."""
import base64
import os
from pathlib import Path

import pytest

from tests.conftest import HUB_TOKEN, TOKEN


def encodings(secret: str) -> list[bytes]:
    """The token as it could land in a file: plain, UTF-16 (Windows-ish tools), base64 (pickles, protobufs
    hold it plain; JSON/YAML escape nothing in it), at each of base64's three alignments."""
    raw = secret.encode()
    b64 = [base64.b64encode(b"\0" * pad + raw)[4 if pad else 0:-4] for pad in range(3)]
    return [raw, secret.encode("utf-16-le"), *b64]


def files_holding(roots: list[Path], secrets: list[str]) -> list[str]:
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path} holds {s!r}" for s in secrets for enc in encodings(s) if enc and enc in data]
    return found


@pytest.mark.slow
def test_hf_token_never_written_by_a_sweep_a_run_or_a_report(tb_sweep, default_trial, cache_dir):
    """The session's sweep (run, resumed, reported: a complete, a pruned and a failed trial) and default trial ran
    with HF_TOKEN and HUGGING_FACE_HUB_TOKEN set; what they printed is kept beside their outputs, so one scan reads
    it all."""
    grid_sweep = tb_sweep
    single_cwd = default_trial.parent.parent.parent
    written = [p for root in (grid_sweep, single_cwd) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in written) and any("tfevents" in p.name for p in written)
    assert any(p.name == "optuna.db" for p in written) and any(p.name.endswith(".log") for p in written)
    assert any(p.name == "report.md" for p in written) and any(p.name == "adapter_model.safetensors" for p in written)
    assert any(p.name == "metrics.json" and '"failed"' in p.read_text() for p in written)  # a failed trial's too
    printed = [p for p in written if p.name.startswith("test-output")]
    assert len(printed) == 4 and all(p.stat().st_size > 0 for p in printed)
    assert files_holding([grid_sweep, single_cwd, cache_dir], [TOKEN, HUB_TOKEN]) == []


def test_the_search_finds_a_token_where_there_is_one(tmp_path):
    """The check above would catch a leak: plain, UTF-16 and base64-encoded copies are all found."""
    (tmp_path / "a.yaml").write_text(f"token: {TOKEN}\n")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01" + TOKEN.encode("utf-16-le"))
    for pad in range(3):
        (tmp_path / f"c{pad}.txt").write_bytes(base64.b64encode(b"x" * pad + TOKEN.encode() + b"tail"))
    assert len(files_holding([tmp_path], [TOKEN])) == 5


# ---- a database password in the study's storage URL -------------------------------------------------------------
DB_URL = "postgresql://optuna:DBs3cret@db.example:5432/studies"


def test_storage_password_is_hidden_from_files_and_passed_to_trials_by_environment(monkeypatch, tmp_path):
    import optuna

    from sweeper.errors import SweeperConfigError
    from sweeper.pruning import OptunaPruningCallback
    from sweeper.storage import STORAGE_ENV, hide_password, storage_for_trials, storage_from_file

    monkeypatch.delenv(STORAGE_ENV, raising=False)
    shown = hide_password(DB_URL)
    assert "DBs3cret" not in shown and shown.startswith("postgresql://optuna:***@db.example")
    # trials get no URL in their overrides (which Hydra writes to each trial folder) but the environment
    assert storage_for_trials(DB_URL) is None and os.environ[STORAGE_ENV] == DB_URL
    assert storage_from_file(shown) == DB_URL  # status and report read the hidden URL back
    monkeypatch.delenv(STORAGE_ENV)
    with pytest.raises(SweeperConfigError) as e:
        storage_from_file(shown)
    assert STORAGE_ENV in str(e.value) and "DBs3cret" not in str(e.value)
    # URLs without a password travel as they are
    journal = f"journal:///{tmp_path}/study.log"
    assert storage_for_trials(journal) == journal and STORAGE_ENV not in os.environ
    # a trial's pruning callback given no URL opens the study named by the environment
    from sweeper.storage import build_storage

    study = optuna.create_study(study_name="s", storage=build_storage(journal))
    study.ask()
    monkeypatch.setenv(STORAGE_ENV, journal)
    cb = OptunaPruningCallback(storage=None, study_name="s", trial_number=0)
    assert cb.trial.number == 0 and cb.study.study_name == "s"
