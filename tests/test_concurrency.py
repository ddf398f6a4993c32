"""Several sweep drivers on one study, and a trial process killed mid-training."""
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from sweeper.storage import build_storage
from tests.conftest import PROCESSES, ROWS

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "tests" / "toy_app" / "app.py"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_four_drivers_share_one_study_of_24_trials(tmp_path, storage):
    url = (f"journal:///{tmp_path}/study.log" if storage == "journal" else f"sqlite:///{tmp_path}/study.db")
    args = [sys.executable, str(TOY), "-m", "x=range(0,10)", "y=choice(0.0,0.5,1.0,1.5,2.0,2.5,3.0,3.5,4.0,4.5)",
            "hydra.sweeper.study_name=shared", f"hydra.sweeper.storage={url}",
            "hydra.sweeper.n_trials=24", "hydra.sweeper.sampler.name=random", f"hydra.sweeper.study_dir={tmp_path}/runs"]
    env = {**os.environ, "TOY_OUTPUT_ROOT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}
    drivers = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True) for _ in range(4)]
    try:
        outputs = [d.communicate(timeout=600)[0] for d in drivers]
    finally:
        for d in drivers:
            if d.poll() is None:
                os.killpg(d.pid, signal.SIGKILL)
    assert all(d.returncode == 0 for d in drivers), "\n".join(o[-2000:] for o in outputs)
    study = optuna.load_study(study_name="shared", storage=build_storage(url))
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1  # unique and gap-free
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == len(trials) == 24  # the total, exactly: nothing lost, failed or asked for twice
    for t in complete:  # every result stored, and it is this trial's own
        assert t.value == pytest.approx((t.params["x"] - 3.3) ** 2 + t.params["y"])
    folders = {t.user_attrs["folder"] for t in complete}
    assert len(folders) == len(complete) and all((Path(f) / "metrics.json").is_file() for f in folders)


def _asker(url: str, target: int, slow_count: bool) -> None:
    """A driver's or worker's loop, cut to its asks: a trial whenever the count leaves room, told right away."""
    import sweeper.loop

    if slow_count:  # the count and the ask 50 ms apart: every asker sees the same room at once without the lock
        count = sweeper.loop.count_finished
        sweeper.loop.count_finished = lambda *a: (count(*a), time.sleep(0.05))[0]
    study = optuna.load_study(study_name="shared", storage=build_storage(url))
    while (trial := sweeper.loop.ask_next(study, target, {})) is not None:
        study.tell(trial, 1.0)


def run_askers(url: str, n: int = 4, target: int = 10) -> list[int]:
    """`n` askers (_asker, the count slowed) on a new study "shared" at `url`, each in its own process: their exit
    codes, once all have ended."""
    import multiprocessing

    optuna.create_study(study_name="shared", storage=build_storage(url))
    procs = [multiprocessing.get_context("fork").Process(target=_asker, args=(url, target, True)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_askers_checking_the_count_at_the_same_moment_never_ask_past_n_trials(tmp_path, storage):
    url = (f"journal:///{tmp_path}/study.log" if storage == "journal" else f"sqlite:///{tmp_path}/study.db")
    assert run_askers(url) == [0] * 4
    trials = optuna.load_study(study_name="shared", storage=build_storage(url)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 10


@pytest.mark.pins_mode
def test_killed_trial_process_is_fail_and_the_sweep_goes_on(tmp_path, cache_dir):
    # a trial's own process killed (workers: tests/test_workers.py kills a worker mid-trial)
    args = ["-m", "lora.r=4,8", "trainer.max_steps=40", "trainer.eval_every=20", "trainer.save_adapter=false", *ROWS,
            f"paths.cache_dir={cache_dir}", PROCESSES]
    driver = subprocess.Popen([sys.executable, "-m", "qlora_exp", *args], cwd=tmp_path, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    victim = None
    try:
        deadline = time.time() + 300
        while victim is None and time.time() < deadline:
            time.sleep(0.25)
            if not (tmp_path / "outputs" / "optuna.db").exists():  # the driver has not created the study yet
                continue
            try:
                (name,) = optuna.get_all_study_names(storage)
                trials = optuna.load_study(study_name=name, storage=storage).trials
            except (ValueError, sqlalchemy.exc.SQLAlchemyError):  # being created by the driver (schema, version row)
                continue
            running = [t for t in trials if t.state == TrialState.RUNNING and t.number == 0]
            if running and trained_steps(tmp_path / "outputs" / "tensorboard" / name, "000-*") >= 5:
                victim = running[0]  # mid-training: its first training log (step 5 of 40) is written
        assert victim is not None, "trial 0 never started training"
        pids = subprocess.run(["pgrep", "-f", f"submitit.core._submit .*{Path(victim.user_attrs['folder']).parent}"],
                              capture_output=True, text=True).stdout.split()
        ps = [p for p in pids if Path(f"/proc/{p}/environ").exists()
              and f"SUBMITIT_LOCAL_JOB_ID={victim.user_attrs['job_id']}".encode() in Path(f"/proc/{p}/environ").read_bytes()]
        assert ps, pids
        for p in ps:
            os.kill(int(p), signal.SIGKILL)
        killed_at = datetime.datetime.now()
        out = driver.communicate(timeout=900)[0]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, out[-3000:]
    trials = optuna.load_study(study_name=name, storage=storage).trials
    states = {t.number: t.state for t in trials}
    assert states == {0: TrialState.FAIL, 1: TrialState.COMPLETE}, states
    reason = trials[0].user_attrs["fail_reason"]
    assert reason.startswith("UncompletedJobError: the trial's process ended without a result ("), reason
    assert "| error:" not in reason  # killed: no error line of its own
    assert trained_steps(tmp_path / "outputs" / "tensorboard" / name, "000-*") < 40  # it was stopped, not finished
    # collected at once: no 15 s wait for a result file a dead process never writes
    assert (trials[0].datetime_complete - killed_at).total_seconds() < 5, trials[0].datetime_complete


def trained_steps(tb_sweep: Path, pattern: str) -> int:
    """The last training step a trial's TensorBoard run has logged (0 before its first log)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list(tb_sweep.glob(pattern))
    if not runs:
        return 0
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    return max((e.step for e in acc.Scalars("train/loss")), default=0) if "train/loss" in acc.Tags()["scalars"] else 0


def test_a_driver_on_a_machine_without_gpus_never_imports_torch(tmp_path):
    """`-X importtime` lists every module the driver process imports (its trials are other processes)."""
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("this machine has an NVIDIA driver: the driver counts its GPUs with torch")
    args = [sys.executable, "-X", "importtime", str(TOY), "-m", "x=0,1",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db", f"hydra.sweeper.study_dir={tmp_path}/runs"]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**env, "TOY_OUTPUT_ROOT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "optuna" in imported and "submitit" in imported  # the listing is the driver's
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "the driver imported torch"
    (study,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/study.db")
    assert study.n_trials == 2
