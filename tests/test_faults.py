"""Disk and storage faults, and a signalled driver: each is a clear one-line error (or a FAIL with its reason),
and what was recorded before stays readable.

Read-only and full folders are tmpfs mounts (`mount -t tmpfs`, `mount -o remount,ro`): tests run as root, where
chmod does not stop writes. Where mounting is not allowed the tests that need it skip, saying so.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from tests.conftest import FAST, ROWS, cli_in_process, run_cli, wait_for

SWEEP = ["-m", "lora.r=8,16"]
RANKS = CategoricalDistribution([8, 16])


@pytest.fixture
def tmpfs(tmp_path):
    """mount(path, size) -> a fresh tmpfs at path; remount_ro(path) makes it read-only. All unmounted after."""
    mounted = []

    def mount(path: Path, size: str = "1m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(path)
        return path

    def remount_ro(path: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)

    mount.remount_ro = remount_ro
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> None:
    """Write until the file system says no space is left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def record_study(storage, name="recorded", values=(0.5, 0.25)) -> None:
    """A study with finished trials, as an earlier sweep leaves it (and no file of it left open)."""
    if isinstance(storage, str):
        storage = optuna.storages.RDBStorage(storage)
    study = optuna.create_study(study_name=name, storage=storage)
    for v in values:
        study.tell(study.ask({"lora.r": RANKS}), v)
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.engine.dispose()


def recorded_values(storage, name="recorded") -> list:
    return [t.value for t in optuna.load_study(study_name=name, storage=storage).trials]


def one_line_error(proc, *needles) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_new_study(cwd: Path) -> None:
    db = cwd / "outputs" / "optuna.db"
    assert not db.exists() or not optuna.get_all_study_names(f"sqlite:///{db}")


# ---- storages that cannot be opened ------------------------------------------------------------------

def test_storage_in_a_read_only_folder(tmp_path, tmpfs):
    ro = tmpfs(tmp_path / "ro")
    tmpfs.remount_ro(ro)
    url = f"sqlite:///{ro}/studies/optuna.db"
    proc = cli_in_process([*SWEEP, f"hydra.sweeper.storage={url}"], tmp_path)
    one_line_error(proc, f"hydra.sweeper.storage='{url}' is not accepted: a storage this process can open and write",
                   "Read-only file system")
    no_new_study(tmp_path)


def test_recorded_study_on_a_read_only_folder_stays_readable(tmp_path, tmpfs):
    ro = tmpfs(tmp_path / "ro")
    url = f"sqlite:///{ro}/optuna.db"
    record_study(url)
    tmpfs.remount_ro(ro)
    proc = cli_in_process([*SWEEP, f"hydra.sweeper.storage={url}"], tmp_path)
    one_line_error(proc, "hydra.sweeper.storage=", "a storage this process can open and write", "readonly database")
    assert recorded_values(url) == [0.5, 0.25] and optuna.get_all_study_names(url) == ["recorded"]


def test_database_that_refuses_the_connection(tmp_path):
    url = "postgresql://nouser:s3cret@127.0.0.1:1/x"  # port 1: nothing listens
    proc = cli_in_process([*SWEEP, f"hydra.sweeper.storage={url}"], tmp_path)
    line = one_line_error(proc, "hydra.sweeper.storage='postgresql://nouser:***@127.0.0.1:1/x' is not accepted: "
                                "a storage this process can open and write (OperationalError: ",
                          "Connection refused")
    assert "s3cret" not in proc.stderr + proc.stdout, line  # the password is not echoed
    no_new_study(tmp_path)


def test_corrupt_sqlite_file_is_refused_and_left_as_it_was(tmp_path):
    db = tmp_path / "corrupt.db"
    garbage = bytes(range(256)) * 64
    db.write_bytes(garbage)
    proc = cli_in_process([*SWEEP, f"hydra.sweeper.storage=sqlite:///{db}"], tmp_path)
    one_line_error(proc, "a storage this process can open and write (DatabaseError: file is not a database)")
    assert db.read_bytes() == garbage


@pytest.mark.parametrize("garbage", [b"this line is not a record\n", b'{"op_code": 5, "worker_id": "ab',
                                     b"\x00\xff\xfe\x00 binary garbage\n"], ids=["text_line", "torn_write", "binary"])
def test_journal_with_a_bad_line_is_refused_and_its_records_are_kept(tmp_path, garbage):
    path = tmp_path / "study.log"
    record_study(JournalStorage(JournalFileBackend(str(path))))
    good = path.read_bytes()
    path.write_bytes(good + garbage)
    proc = cli_in_process([*SWEEP, f"hydra.sweeper.storage=journal:///{path}", "hydra.sweeper.study_name=recorded"],
                          tmp_path)
    line = one_line_error(proc, f"hydra.sweeper.storage='journal:///{path}' is not accepted: an Optuna journal whose "
                                "every line is a whole record that follows the ones before it: line", "records before it are intact")
    assert path.read_bytes() == good + garbage  # nothing appended after the garbage (that would lose the study)
    if not garbage.startswith(b"\x00"):  # Optuna itself reads past a bad last line
        assert recorded_values(JournalStorage(JournalFileBackend(str(path)))) == [0.5, 0.25]
    cut = int(re.search(r"truncate -s (\d+) ", line).group(1))  # the way back the message gives
    assert cut == len(good)
    os.truncate(path, cut)
    assert recorded_values(JournalStorage(JournalFileBackend(str(path)))) == [0.5, 0.25]


def test_journal_with_a_record_missing_in_the_middle_is_refused_and_left_as_it_was(tmp_path):
    """Every line a whole JSON record, but one trial's creation is gone (a file cut and pasted, a bad sync): Optuna
    would replay the later records onto the wrong trials (34 of 40 COMPLETE trials showed RUNNING without params,
    and the next resume queued 34 retries). Checked record by record: one line naming the record, nothing written."""
    path = tmp_path / "study.log"
    record_study(JournalStorage(JournalFileBackend(str(path))), values=[i / 10 for i in range(10)])
    lines = path.read_bytes().splitlines(keepends=True)
    creations = [i for i, line in enumerate(lines) if json.loads(line)["op_code"] == 4]
    gone = creations[4]
    damaged = b"".join(lines[:gone] + lines[gone + 1:])
    path.write_bytes(damaged)
    proc = cli_in_process([*SWEEP, f"hydra.sweeper.storage=journal:///{path}", "hydra.sweeper.study_name=recorded"],
                          tmp_path)
    line = one_line_error(proc, f"line {gone + 1} ", "names trial id 4, which no earlier record created",
                          f"the {gone} records before it are intact")
    assert path.read_bytes() == damaged
    cut = int(re.search(r"truncate -s (\d+) ", line).group(1))
    assert cut == sum(map(len, lines[:gone]))


# ---- output and TensorBoard folders ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["single", "sweep"])
def test_read_only_output_folder_is_refused_and_what_it_holds_stays(tmp_path, tmpfs, mode):
    out = tmpfs(tmp_path / "out")
    record_study(f"sqlite:///{out}/optuna.db")
    (out / "runs" / "earlier").mkdir(parents=True)
    (out / "runs" / "earlier" / "metrics.json").write_text('{"status": "complete"}')
    tmpfs.remount_ro(out)
    args = [*(SWEEP if mode == "sweep" else []), f"paths.output_root={out}", f"paths.cache_dir={tmp_path}/cache", *FAST]
    proc = cli_in_process(args, tmp_path)
    one_line_error(proc, f"paths.output_root='{out}' is not accepted: a folder this process can write "
                         "(Read-only file system)")
    assert recorded_values(f"sqlite:///{out}/optuna.db") == [0.5, 0.25]
    assert json.loads((out / "runs" / "earlier" / "metrics.json").read_text()) == {"status": "complete"}
    assert not (tmp_path / "cache").exists()


def test_read_only_sweep_folder_is_refused_before_the_study_is_opened(tmp_path, tmpfs):
    ro = tmpfs(tmp_path / "ro")
    tmpfs.remount_ro(ro)
    proc = cli_in_process([*SWEEP, f"hydra.sweeper.study_dir={ro}/multirun"], tmp_path)
    one_line_error(proc, f"hydra.sweeper.study_dir='{ro}/multirun/", "a folder this process can write "
                   "(Read-only file system)")
    no_new_study(tmp_path)


@pytest.mark.parametrize("mode", ["single", "sweep"])
def test_full_tensorboard_folder_is_refused_and_earlier_runs_stay_readable(tmp_path, tmpfs, mode):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    tb = tmpfs(tmp_path / "tb", size="64k")
    with SummaryWriter(log_dir=str(tb / "runs" / "earlier")) as w:  # a run recorded before the disk filled
        for step in range(5):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
    fill(tb)
    args = [*(SWEEP if mode == "sweep" else []), f"paths.tensorboard_root={tb}", *FAST]
    proc = cli_in_process(args, tmp_path)
    one_line_error(proc, f"paths.tensorboard_root='{tb}' is not accepted: a folder this process can write "
                         "(No space left on device)")
    no_new_study(tmp_path)
    acc = EventAccumulator(str(tb / "runs" / "earlier"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_trial_folder_on_a_full_disk_is_one_line_in_a_single_run(tmp_path, tmpfs, cache_dir):
    full = tmpfs(tmp_path / "full", size="64k")
    fill(full)
    proc = run_cli([f"paths.output_dir={full}/trial", *FAST], tmp_path, cache_dir, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(" ")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: trial failed: OSError: [Errno 28] No space left on device"), lines[-1]
    assert f"trial folder {full}/trial" in lines[-1]


@pytest.mark.slow
def test_a_disk_filling_during_a_sweep_queues_the_trial_again_and_the_rerun_trains_it(tmp_path, tmpfs, cache_dir):
    """The TensorBoard folder's disk fills while a trial trains: no failure of its parameters. The trial is FAIL
    with its reason and queued again (WAITING, never counted), the sweep stops in one line, what was recorded
    stays; once space is freed, the same command trains that point (it used to report the grid finished without it)."""
    db = f"sqlite:///{tmp_path}/outputs/optuna.db"
    (tmp_path / "outputs").mkdir()
    record_study(db)
    tb = tmpfs(tmp_path / "tb", size="4k")  # room for the first few events only
    args = ["-m", "lora.r=choice(8)", f"paths.tensorboard_root={tb}", *FAST]
    proc = run_cli(args, tmp_path, cache_dir, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert "stopped on a machine fault (No space left on device); it is queued again" in lines[0], lines
    (name,) = [n for n in optuna.get_all_study_names(db) if n != "recorded"]
    first, retry = optuna.load_study(study_name=name, storage=db).trials
    assert first.state == TrialState.FAIL and "No space left on device" in first.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.params == first.params
    metrics = json.loads((Path(first.user_attrs["folder"]) / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left on device" in metrics["error"]
    assert recorded_values(db) == [0.5, 0.25]
    subprocess.run(["mount", "-o", "remount,size=64m", str(tb)], check=True, capture_output=True)  # space freed
    proc = run_cli(args, tmp_path, cache_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name=name, storage=db).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert recorded_values(db) == [0.5, 0.25]


# ---- a signalled driver ------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_of_the_driver_cancels_its_trial_marks_it_fail_and_queues_one_retry(tmp_path, cache_dir):
    args = ["-m", "lora.r=choice(8)", "hydra.sweeper.study_name=stopped", *ROWS, "trainer.max_steps=2000", "trainer.eval_every=1000",
            "trainer.save_adapter=false", f"paths.cache_dir={cache_dir}"]
    driver = subprocess.Popen([sys.executable, "-m", "qlora_exp", *args], cwd=tmp_path, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    try:
        deadline, running = time.time() + 300, None
        while running is None and time.time() < deadline:
            time.sleep(1)
            try:
                trials = optuna.load_study(study_name="stopped", storage=storage).trials
            except Exception:  # noqa: BLE001  (no database or no study yet)
                continue
            # the trial trains: its TensorBoard run has its first events (a signal in the start-up: the next test)
            training = any(p.parent.name != "study" for p in (tmp_path / "outputs" / "tensorboard").rglob("events.*"))
            running = next((t for t in trials if t.state == TrialState.RUNNING and training
                            and (Path(t.user_attrs.get("folder", "/nonexistent")) / "config.yaml").exists()), None)
        assert running is not None, "no trial started"
        driver.send_signal(signal.SIGTERM)  # scancel of the driver's job, or a plain kill
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err[-3000:]
    # one line for the signal, no traceback: the trials' submitit controllers run outside the terminal's reach and
    # write to their own log, so nothing of theirs is printed
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[I ")]
    assert lines == ["SIGTERM: stopping the sweep: finished trials are collected, running ones cancelled and "
                     "queued again"], err[-3000:]
    trials = optuna.load_study(study_name="stopped", storage=storage).trials
    assert trials[0].state == TrialState.FAIL and "interrupted" in trials[0].user_attrs["fail_reason"]
    (retry,) = trials[1:]
    assert retry.state == TrialState.WAITING and retry.params == {"lora.r": 8}
    assert retry.system_attrs["retry_history"] == [0]  # Optuna's RetryHeartbeatStaleTrialCallback's record
    left = subprocess.run(["pgrep", "-f", f"submitit.* {tmp_path}/outputs/multirun/stopped/"], capture_output=True,
                          text=True).stdout.split()
    assert not left, f"trial processes left running: {left}"


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 1.5])
def test_sigterm_in_a_workers_trial_start_up_stops_it_at_a_safe_point(tmp_path, cache_dir, delay_s):
    """The sweep's one worker is the driver itself; SIGTERM arrives while its trial starts (the base being built and
    loaded, the adapter attached): the trial is cut short at its next safe point (between phases, at a step or an
    evaluation batch; never mid-import or mid-load, where a raised KeyboardInterrupt once hung the driver), so the
    driver exits 130 within seconds with one line; the trial is FAIL as interrupted, queued again, and its
    metrics.json says where it stopped."""
    args = ["-m", "lora.r=choice(8)", "hydra.sweeper.study_name=startup", *ROWS, "trainer.max_steps=200",
            "trainer.save_adapter=false", f"paths.cache_dir={cache_dir}", "hydra.sweeper.mode=workers"]
    driver = subprocess.Popen([sys.executable, "-m", "qlora_exp", *args], cwd=tmp_path, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    folder = tmp_path / "outputs" / "multirun" / "startup" / "0"
    try:
        deadline = time.time() + 120
        while not (folder / "config.yaml").exists() and time.time() < deadline:  # written as the start-up begins
            time.sleep(0.05)
        assert (folder / "config.yaml").exists(), "no trial started"
        time.sleep(delay_s)
        signalled = time.time()
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=90)
        took = time.time() - signalled
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err[-3000:]
    assert took < 30, took
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[I ")]
    assert lines == ["SIGTERM: stopping the sweep: finished trials are collected, running ones cancelled and "
                     "queued again"], err[-3000:]
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    cut, retry = optuna.load_study(study_name="startup", storage=storage).trials
    assert cut.state == TrialState.FAIL and "interrupted" in cut.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.params == {"lora.r": 8}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == "KeyboardInterrupt: the sweep worker was asked to stop"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_the_study_disk_filling_mid_sweep_is_one_line_and_the_rerun_finishes_the_grid(tmp_path, tmpfs, kind):
    """The disk under the study's journal or SQLite file fills while a sweep runs: the driver cancels its running
    trial and stops in one line (no traceback), the study stays readable (a failed journal append is cut back, not
    left torn), and once space is freed the same command finishes the grid without training a finished point again."""
    from sweeper.storage import build_storage
    from tests.test_sweep_semantics import TOY, toy_env

    disk = tmpfs(tmp_path / "studydisk", size="2m")
    url = f"journal:///{disk}/study.log" if kind == "journal" else f"sqlite:///{disk}/study.db"
    runs_log = tmp_path / "runs.jsonl"
    args = [sys.executable, str(TOY), "-m", "x=0,1,2,3", "sleep_s=1.5", f"hydra.sweeper.storage={url}",
            f"hydra.sweeper.study_dir={tmp_path}/runs", "hydra.sweeper.study_name=toy", f"runs_log={runs_log}"]

    def complete() -> list:
        trials = optuna.load_study(study_name="toy", storage=build_storage(url)).trials
        return [t.params["x"] for t in trials if t.state == TrialState.COMPLETE]

    driver = subprocess.Popen(args, cwd=tmp_path, env=toy_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: len(complete()) >= 1, timeout=60, what="a finished trial",
                 errors=(KeyError, ValueError, OSError, *_db_errors()))
        fill(disk)
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    own = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert driver.returncode == 1 and "Traceback" not in err + out, err[-3000:]
    assert len(own) == 1 and own[0].startswith("error: the study's storage can no longer be written ("), own
    (disk / "filler").unlink()
    done = complete()  # readable as it was left
    assert done
    proc = subprocess.run(args, cwd=tmp_path, env=toy_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(complete()) == [0, 1, 2, 3]
    trained = [json.loads(line)["x"] for line in runs_log.read_text().splitlines()]
    assert all(trained.count(x) == 1 for x in done), trained  # finished before the fault: trained once


def _db_errors() -> tuple:
    import sqlalchemy.exc

    return (sqlalchemy.exc.OperationalError,)


def test_a_checkpoint_cut_short_mid_save_is_not_resumed_from(tmp_path):
    """SLURM's SIGUSR2 (or a kill) can land while the Trainer writes a checkpoint: the folder exists, its
    trainer_state.json (written last) does not, or is torn. The requeued trial resumes from the newest complete one
    (resuming from the cut one failed the trial: CI's preempted-trial test, stop 37)."""
    from qlora_exp.recipe import _last_checkpoint

    folder = tmp_path / "checkpoints"
    for step, state in [(10, '{"global_step": 10}'), (20, '{"global_step": 20}'), (30, None), (40, '{"global_st')]:
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (folder / "checkpoint-9x").mkdir()  # not a checkpoint's name
    assert _last_checkpoint(folder) == str(folder / "checkpoint-20")
    for step in (10, 20):
        (folder / f"checkpoint-{step}" / "trainer_state.json").unlink()
    assert _last_checkpoint(folder) is None  # nothing complete: the trial starts over
    assert _last_checkpoint(tmp_path / "absent") is None
