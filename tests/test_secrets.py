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


# ---- a database password in what the command prints ---------------------------------------------------------------
PASSWORDS = ["pa'ss", "pa,ss", "p@ss'w,rd", "pa\"ss"]


def _printed(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("sweep", [True, False], ids=["sweep", "single"])
def test_a_storage_password_is_in_no_line_the_command_prints(tmp_path, password, sweep):
    """A quote in the password is a grammar error and a comma makes Hydra read a sweep (of Hydra's own settings,
    which it refuses in a message of its own, the URL in it): each is one line here, the URL in it with *** for the
    password, and what to do."""
    from tests.conftest import cli_in_process

    url = f"postgresql://u:{password}@127.0.0.1:1/db"
    for env in ({}, {"HYDRA_FULL_ERROR": "1"}):
        proc = cli_in_process([*(["-m", "lora.r=8"] if sweep else []), f"hydra.sweeper.storage={url}"], tmp_path,
                              env=env)
        lines = _printed(proc)
        assert proc.returncode in (1, 2) and lines, proc
        assert [line for line in lines if password in line or password.replace("'", "\\'") in line] == [], lines
        if not env:
            assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(
                "error: hydra.sweeper.storage=") and "postgresql://u:***@127.0.0.1:1/db" in lines[0], lines
    assert not (tmp_path / "outputs").exists()


def test_a_comma_in_a_storage_password_says_how_to_write_it(tmp_path):
    from tests.conftest import cli_in_process

    proc = cli_in_process(["-m", "lora.r=8", "hydra.sweeper.storage=postgresql://u:pa,ss@127.0.0.1:1/db"], tmp_path)
    assert _printed(proc) == ["error: hydra.sweeper.storage='postgresql://u:***@127.0.0.1:1/db' is not accepted: one "
                              "value: Hydra's own settings are not swept, and a comma makes a sweep: write a comma in "
                              "a URL as %2C, or quote the value ('a,b')"]


def test_mask_passwords_hides_every_form_of_a_url_password():
    from qlora_exp.__main__ import mask_passwords

    argv = ["hydra.sweeper.storage=postgresql://u:my secret@h/db"]
    assert mask_passwords("x 'postgresql://u:my secret@h/db' and my secret again", argv) == \
        "x 'postgresql://u:***@h/db' and *** again"
    assert mask_passwords('"mysql://root:pa\'ss@db:3306/s"', []) == '"mysql://root:***@db:3306/s"'
    for plain in ("sqlite:////tmp/optuna.db", "journal:///tmp/a.log", "see https://hydra.cc/docs for details"):
        assert mask_passwords(plain, []) == plain


@pytest.mark.slow
def test_status_and_report_print_no_storage_password(tmp_path):
    """A sweep folder of a study on a database with a password (not reachable here): sweeper.status and the report
    say what is wrong without the password, with the URL in the environment and without it."""
    import subprocess
    import sys

    from sweeper.storage import STORAGE_ENV, hide_password

    url = "postgresql://optuna:DBs3cret,x'y@127.0.0.1:1/studies"
    sweep = tmp_path / "outputs" / "multirun" / "s"
    sweep.mkdir(parents=True)
    (sweep / "optimization_results.yaml").write_text(f"name: s\nstudy_name: s\nstorage: '{hide_password(url)}'\n"
                                                     "n_trials: 1\n")
    assert "DBs3cret" not in hide_password(url)
    for module in ("sweeper.status", "qlora_exp.report"):
        for env in ({STORAGE_ENV: url}, {}):
            proc = subprocess.run([sys.executable, "-m", module, str(sweep)], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=120, env={**{k: v for k, v in os.environ.items()
                                                                  if k != STORAGE_ENV}, **env})
            assert proc.returncode != 0 and (proc.stdout + proc.stderr).strip()
            assert "DBs3cret" not in proc.stdout + proc.stderr, (module, env, proc.stderr[-2000:])
