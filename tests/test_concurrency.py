"""Several sweep drivers on one study, and a trial process killed mid-training."""
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

from sweeper.components import build_storage

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "tests" / "toy_app" / "app.py"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_four_drivers_share_one_study_of_100_trials(tmp_path, storage):
    url = (f"journal:///{tmp_path}/study.log" if storage == "journal" else f"sqlite:///{tmp_path}/study.db")
    args = [sys.executable, str(TOY), "-m", "x=range(0,10)", "y=choice(0.0,0.5,1.0,1.5,2.0,2.5,3.0,3.5,4.0,4.5)",
            f"hydra.searchpath=[file://{REPO}/conf]", "hydra.sweeper.study_name=shared", f"hydra.sweeper.storage={url}",
            "hydra.sweeper.n_trials=100", "hydra.sweeper.sampler.name=random", f"hydra.sweeper.study_dir={tmp_path}/runs"]
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
    assert 100 <= len(complete) <= 103 and len(complete) == len(trials)  # the total, nothing lost or failed
    for t in complete:  # every result stored, and it is this trial's own
        assert t.value == pytest.approx((t.params["x"] - 3.3) ** 2 + t.params["y"])
    folders = {t.user_attrs["folder"] for t in complete}
    assert len(folders) == len(complete) and all((Path(f) / "metrics.json").is_file() for f in folders)


def test_killed_trial_process_is_fail_and_the_sweep_goes_on(tmp_path, cache_dir):
    args = ["-m", "lora.r=4,8,16", "trainer.max_steps=60", "trainer.eval_every=30", "trainer.save_adapter=false",
            f"paths.cache_dir={cache_dir}"]
    driver = subprocess.Popen([sys.executable, "-m", "qlora_exp", *args], cwd=tmp_path, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    victim = None
    try:
        deadline = time.time() + 300
        while victim is None and time.time() < deadline:
            time.sleep(1)
            if not (tmp_path / "outputs" / "optuna.db").exists():  # the driver has not created the study yet
                continue
            try:
                (name,) = optuna.get_all_study_names(storage)
                trials = optuna.load_study(study_name=name, storage=storage).trials
            except (ValueError, sqlalchemy.exc.SQLAlchemyError):  # being created by the driver (schema, version row)
                continue
            running = [t for t in trials if t.state == TrialState.RUNNING and t.number == 0]
            tb = tmp_path / "outputs" / "tensorboard" / name
            if running and list(tb.glob("000-*/events.out.tfevents.*")):  # the trainer is set up
                victim = running[0]
        assert victim is not None, "trial 0 never started training"
        time.sleep(2)  # mid-training
        pids = subprocess.run(["pgrep", "-f", f"submitit.core._submit .*{Path(victim.user_attrs['folder']).parent}"],
                              capture_output=True, text=True).stdout.split()
        ps = [p for p in pids if Path(f"/proc/{p}/environ").exists()
              and f"SUBMITIT_LOCAL_JOB_ID={victim.user_attrs['job_id']}".encode() in Path(f"/proc/{p}/environ").read_bytes()]
        assert ps, pids
        for p in ps:
            os.kill(int(p), signal.SIGKILL)
        out = driver.communicate(timeout=900)[0]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, out[-3000:]
    trials = optuna.load_study(study_name=name, storage=storage).trials
    states = {t.number: t.state for t in trials}
    assert states == {0: TrialState.FAIL, 1: TrialState.COMPLETE, 2: TrialState.COMPLETE}, states
    assert trials[0].user_attrs["fail_reason"]
