"""Trials on a real SLURM (scripts/slurm/up.sh: one node, two fake GPUs), through submitit."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import FAST, PROCESSES, REPO, ROWS, read_metrics, run_cli


def _slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(not _slurm_up(), reason="no SLURM here: run scripts/slurm/up.sh (CI does)")]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=1",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=15",
         "hydra.launcher.signal_delay_s=30", PROCESSES]  # each trial its own SLURM job (workers: the last test)


def journal_study(cwd: Path) -> optuna.Study:
    from sweeper.storage import build_storage

    storage = build_storage(f"journal:///{cwd}/outputs/optuna-journal.log")
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def start_driver(args, cwd: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlora_exp", *args, f"paths.cache_dir={cache}"], cwd=cwd,
                            env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(predicate, timeout=240, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
        except (FileNotFoundError, ValueError, KeyError, StopIteration):
            value = None
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else ""  # a requeued job has a line per run: the last


def sacct_times(job_id: str) -> tuple[float, float]:
    """When SLURM started and ended the job (its last run), as epoch seconds."""
    import datetime

    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "Start,End", "-j", job_id], capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    start, end = (datetime.datetime.fromisoformat(x).timestamp() for x in out.split("|"))
    return start, end


def test_sweep_of_three_trials_as_slurm_jobs(tmp_path, cache_dir):
    # a grid: no pruner unless asked, so every trial runs to its end (jobs COMPLETED); r=16 raises at step 15 of 20,
    # late enough that it runs beside another trial as long as the others do
    args = ["-m", "lora.r=4,8,16", "hydra.sweeper.n_jobs=2", "hydra.sweeper.max_failure_rate=1.0",
            "+callbacks.fail._target_=tests.conftest.FailAtStep", "+callbacks.fail.value=${lora.r}",
            "+callbacks.fail.when=16", "+callbacks.fail.step=15", *SLURM, *FAST]
    # the driver's own OMP_NUM_THREADS (sbatch exports its environment) is not what a trial gets: its cpus_per_task is
    proc = run_cli(args, tmp_path, cache_dir, env={"OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    study = journal_study(tmp_path)
    by_rank = {t.params["lora.r"]: t for t in study.trials}
    assert sorted(by_rank) == [4, 8, 16] and "sampler grid, pruner none" in proc.stdout + proc.stderr
    assert by_rank[16].state == TrialState.FAIL and "test failure at step 15" in by_rank[16].user_attrs["fail_reason"]
    jobs = {}
    for r in (4, 8, 16):
        t = by_rank[r]
        m = read_metrics(Path(t.user_attrs["folder"]))  # a failed trial writes its metrics too (status failed)
        assert m["slurm_job_id"] == t.user_attrs["job_id"]  # (sacct may say RUNNING a moment after the result)
        job_id = m["slurm_job_id"]
        ended = (lambda s: s == "COMPLETED") if r != 16 else (lambda s: s not in ("", "PENDING", "RUNNING"))
        wait_for(lambda job_id=job_id, ended=ended: ended(sacct_state(job_id)), timeout=60, what=f"job {job_id}'s end")
        assert m["cuda_visible_devices"] in ("0", "1")  # one fake GPU each, given by SLURM
        assert m["cpu_threads"] == 1  # OMP_NUM_THREADS from cpus_per_task=1, not one thread per core of the node
        if r != 16:
            assert t.state == TrialState.COMPLETE and m["eval_loss"] == pytest.approx(t.value)
        jobs[m["slurm_job_id"]] = (*sacct_times(m["slurm_job_id"]), m["cuda_visible_devices"])
    # two trials at once, as SLURM ran them: jobs that ran side by side for 5 s or more (a job can stay RUNNING a
    # second past its result, so back-to-back jobs touch), each on its own GPU of the node
    overlapping = [(a, b) for a in jobs for b in jobs
                   if a < b and min(jobs[a][1], jobs[b][1]) - max(jobs[a][0], jobs[b][0]) >= 5]
    assert overlapping, jobs
    assert all(jobs[a][2] != jobs[b][2] for a, b in overlapping), jobs


def test_cancelled_trial_job_is_fail_with_its_slurm_state(tmp_path, cache_dir):
    driver = start_driver(["-m", "lora.r=8,16", "trainer.max_steps=2000", "trainer.eval_every=1000", *ROWS, *SLURM], tmp_path,
                          cache_dir)
    try:
        job_id = wait_for(lambda: next(t.user_attrs["job_id"] for t in journal_study(tmp_path).trials
                                       if t.state == TrialState.RUNNING), what="a running trial")
        wait_for(lambda: sacct_state(job_id) == "RUNNING", what="the job to run")
        subprocess.run(["scancel", job_id], check=True)
        other = wait_for(lambda: next(t for t in journal_study(tmp_path).trials if t.user_attrs["job_id"] != job_id
                                      and t.state == TrialState.RUNNING), what="the next trial")
        subprocess.run(["scancel", other.user_attrs["job_id"]], check=True)
        driver.wait(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    trials = journal_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("CANCELLED" in t.user_attrs["fail_reason"] for t in trials), [t.user_attrs for t in trials]


def test_preempted_trial_resumes_from_its_checkpoint_as_the_same_trial(tmp_path, cache_dir):
    import submitit

    driver = start_driver(["-m", "lora.r=8,16", "hydra.sweeper.n_trials=1", *ROWS, "trainer.max_steps=60",
                           "trainer.eval_every=10", *SLURM], tmp_path, cache_dir)
    try:
        trial = wait_for(lambda: next(t for t in journal_study(tmp_path).trials  # job_id: set once sbatch answered
                                      if t.state == TrialState.RUNNING and "job_id" in t.user_attrs),
                         what="a running trial with its job")
        folder, job_id = Path(trial.user_attrs["folder"]), trial.user_attrs["job_id"]
        # checkpoint-20 saved whole (trainer_state.json, written last); the interrupt may land mid-save of the next
        wait_for(lambda: (folder / "checkpoints" / "checkpoint-20" / "trainer_state.json").exists(), what="checkpoint-20")
        submitit.SlurmJob(folder=tmp_path / "outputs" / "multirun" / folder.parent.name / ".submitit",
                          job_id=job_id)._interrupt()  # submitit's preemption path: SIGUSR2, checkpoint, requeue
        deadline = time.time() + 300
        while driver.poll() is None and time.time() < deadline:
            queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
            if "PENDING" in queue:  # a requeued job waits for its begin time (about 2 minutes): release it now
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
            time.sleep(2)
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    (t,) = journal_study(tmp_path).trials  # still one trial in the study
    assert t.state == TrialState.COMPLETE, (t.user_attrs, driver.stdout.read()[-3000:])
    m = read_metrics(folder)
    assert m["resumed_from_step"] is not None and m["resumed_from_step"] >= 20, m
    assert m["steps"] == 60 and m["eval_loss"] == pytest.approx(t.value)
    assert "resuming from" in (folder / "__main__.log").read_text()


def test_detached_driver_runs_a_sweep_to_the_end_as_a_job(tmp_path, cache_dir):
    args = ["--folder", str(tmp_path / "drivers"), "--", "-m", "lora.r=4,8", *SLURM, *FAST,
            f"paths.cache_dir={cache_dir}"]
    out = subprocess.run([sys.executable, "-m", "sweeper.detach", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[2].rstrip(":")
    wait_for(lambda: sacct_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), timeout=400, what="the driver job")
    assert sacct_state(job_id) == "COMPLETED", (tmp_path / "drivers" / f"{job_id}_0_log.err").read_text()[-3000:]
    trials = journal_study(tmp_path).trials
    assert sorted(t.params["lora.r"] for t in trials if t.state == TrialState.COMPLETE) == [4, 8]
    folder = str(Path(trials[0].user_attrs["folder"]).parent)

    def status_shows_both_completed():  # a trial job can still be RUNNING in squeue for a moment after its result
        out = subprocess.run([sys.executable, "-m", "sweeper.status", folder], capture_output=True, text=True,
                             timeout=60)
        return out.returncode == 0 and out.stdout.count("COMPLETED") == 2
    wait_for(status_shows_both_completed, timeout=60, what="sweep-status to show two COMPLETED jobs")


def test_cancelling_the_detached_driver_cancels_its_trials(tmp_path, cache_dir):
    args = ["--folder", str(tmp_path / "drivers"), "--", "-m", "lora.r=4,8", "trainer.max_steps=3000",
            "trainer.eval_every=1000", *SLURM, f"paths.cache_dir={cache_dir}"]
    out = subprocess.run([sys.executable, "-m", "sweeper.detach", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr
    driver_id = out.stdout.split()[2].rstrip(":")
    trial_id = None
    try:
        trial = wait_for(lambda: next((t for t in journal_study(tmp_path).trials  # job_id: set once sbatch answered
                                       if t.state == TrialState.RUNNING and "job_id" in t.user_attrs), None),
                         timeout=300, what="a running trial with its job")
        trial_id = trial.user_attrs["job_id"]
        wait_for(lambda: sacct_state(trial_id) == "RUNNING", what="the trial job to run")
        subprocess.run(["scancel", driver_id], check=True)
        wait_for(lambda: sacct_state(trial_id).startswith("CANCELLED"), timeout=120, what="the trial job's cancel")
        wait_for(lambda: sacct_state(driver_id) not in ("RUNNING", "PENDING", ""), timeout=120, what="the driver's end")
    finally:  # whatever happened, leave no job behind to hold the one node for the tests after this one
        subprocess.run(["scancel", driver_id, *([trial_id] if trial_id else [])], capture_output=True)
        subprocess.run(["scancel", "--name", "qlora-sweep-driver"], capture_output=True)
    t = next(t for t in journal_study(tmp_path).trials if t.number == trial.number)
    assert t.state == TrialState.FAIL and "interrupted" in t.user_attrs["fail_reason"]


def test_peer_example_app_on_slurm_through_hydras_basic_sweeper(tmp_path):
    """hydra-submitit-launcher's example app (tests/peer/submitit_example, copied unchanged: its config picks
    `hydra/launcher: submitit_slurm`) swept by Hydra's basic sweeper through our launcher, on SLURM, with the peer's
    keys: `python` (SlurmExecutor's own argument; it used to reach update_parameters and raise a NameError) runs each
    job, a null `tasks_per_node` leaves --ntasks-per-node out, `submitit_folder` with %j gets one folder per job, and
    slurm.yaml's qlora_exp-only trial override (trainer.save_checkpoints) is left out for an app without `trainer`."""
    example = Path(__file__).parent / "peer" / "submitit_example"
    wrapper = tmp_path / "python.sh"  # says which job it ran, then is the python
    wrapper.write_text(f'#!/bin/sh\ntouch "{tmp_path}/python-ran-$SLURM_JOB_ID"\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(example / "my_app.py"), "-m", "task=1,2",
                           f"hydra.sweep.dir={sweep}", f"hydra.launcher.submitit_folder={sweep}/.submitit/%j",
                           f"hydra.launcher.python={wrapper}", "hydra.launcher.tasks_per_node=null",
                           "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                           "hydra.launcher.timeout_min=5"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "trainer.save_checkpoints=true left out" in proc.stdout + proc.stderr
    job_ids = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir())
    assert len(job_ids) == 2 and all(job_id.isdigit() for job_id in job_ids), job_ids
    for num, task in ((0, 1), (1, 2)):
        log = (sweep / str(num) / "my_app.log").read_text()
        job_id = next(j for j in job_ids if f"job_id={j}," in log)
        assert f"executing task {task}, with JobEnvironment(job_id={job_id}" in log, log
        assert (tmp_path / f"python-ran-{job_id}").exists()
        sbatch = (sweep / ".submitit" / job_id / f"{job_id}_submission.sh").read_text()
        assert "--ntasks-per-node" not in sbatch and "--job-name=my_app" in sbatch and str(wrapper) in sbatch, sbatch
        wait_for(lambda job_id=job_id: sacct_state(job_id) == "COMPLETED", timeout=60, what=f"job {job_id} COMPLETED")


TOY = REPO / "tests" / "toy_app" / "app.py"
TOY_SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
             "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]


def toy_sweep(tmp_path: Path, *args: str, path_prefix: Path | None = None, **popen) -> subprocess.Popen:
    """The instant toy app (tests/toy_app) as a sweep of SLURM jobs, its study a journal under tmp_path."""
    env = {**os.environ, "TOY_OUTPUT_ROOT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.Popen([sys.executable, str(TOY), "-m", *TOY_SLURM,
                             f"hydra.sweeper.storage=journal:///{tmp_path}/study.log",
                             f"hydra.sweeper.study_dir={tmp_path}/runs", "hydra.sweeper.study_name=toy",
                             f"runs_log={tmp_path}/runs.jsonl", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def toy_study(tmp_path: Path) -> optuna.Study:
    from sweeper.storage import build_storage

    return optuna.load_study(study_name="toy", storage=build_storage(f"journal:///{tmp_path}/study.log"))


def ended(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the driver did not end in {timeout} s: {proc.communicate()[1][-3000:]}") from None


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[")]


def test_slurmctld_down_at_the_next_submission_is_one_line_and_the_rerun_finishes(tmp_path):
    """The controller stops answering between two submissions (sbatch: "Unable to contact slurm controller"): the
    running trial is still collected, the trial that could not be submitted is queued again (WAITING, not a FAIL
    of its parameters), the driver exits 1 in one line; the same command, once SLURM answers, trains the rest."""
    flag, shim = tmp_path / "controller-down", tmp_path / "bin"
    shim.mkdir()
    (shim / "sbatch").write_text(
        f'#!/bin/sh\nif [ -e {flag} ]; then\n  echo "sbatch: error: Batch job submission failed: Unable to contact '
        f'slurm controller (connect failure)" >&2\n  exit 1\nfi\nexec {shutil.which("sbatch")} "$@"\n')
    (shim / "sbatch").chmod(0o755)
    driver = toy_sweep(tmp_path, "x=0,1", "sleep_s=3", PROCESSES, path_prefix=shim)
    try:
        wait_for(lambda: any(t.user_attrs.get("job_id") for t in toy_study(tmp_path).trials), timeout=120,
                 what="the first trial submitted")
        flag.touch()
        out, err = ended(driver)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 1 and "Traceback" not in out + err, err[-3000:]
    (line,) = error_lines(err)
    assert "could not be submitted" in line and "Unable to contact slurm controller" in line, line
    first, cut, retry = toy_study(tmp_path).trials
    assert first.state == TrialState.COMPLETE
    assert cut.state == TrialState.FAIL and cut.user_attrs["interrupted"] and "not submitted" in cut.user_attrs[
        "fail_reason"]
    assert retry.state == TrialState.WAITING and retry.params == cut.params
    flag.unlink()
    out, err = ended(toy_sweep(tmp_path, "x=0,1", "sleep_s=3", PROCESSES, path_prefix=shim))
    trials = toy_study(tmp_path).trials
    assert sorted(t.params["x"] for t in trials if t.state == TrialState.COMPLETE) == [0, 1], err[-3000:]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2  # each point trained once


def test_a_request_sbatch_refuses_is_one_line_with_the_trial_queued_again(tmp_path):
    """sbatch refuses the request (more memory than any node has): one line naming SLURM's reason, exit 1, the
    trial queued again rather than left RUNNING with no job."""
    out, err = ended(toy_sweep(tmp_path, "x=0,1", "hydra.launcher.mem_gb=100000", PROCESSES))
    assert "Traceback" not in out + err, err[-3000:]
    (line,) = error_lines(err)
    assert line.startswith("error: trial 0 could not be submitted") and "sbatch" in line.lower(), line
    cut, retry = toy_study(tmp_path).trials
    assert cut.state == TrialState.FAIL and cut.user_attrs["interrupted"]
    assert retry.state == TrialState.WAITING


def test_a_job_slurm_keeps_pending_is_said_so_with_its_reason(tmp_path):
    """A trial whose job SLURM holds back (here: a begin time an hour away) is not silence: the driver says it is
    PENDING, with SLURM's reason; Ctrl-C then cancels it and queues it again."""
    driver = toy_sweep(tmp_path, "x=0", PROCESSES, "hydra.sweeper.pending_note_s=2", "hydra.sweeper.heartbeat_s=1",
                       "+hydra.launcher.additional_parameters.begin=now+3600")
    try:
        lines = []

        def noted():
            lines.append(driver.stdout.readline())
            return "PENDING for" in lines[-1]
        wait_for(noted, timeout=120, what="the pending note")
        assert "reason: BeginTime" in lines[-1], lines[-1]
        driver.send_signal(signal.SIGINT)
        out, err = ended(driver)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130 and "Traceback" not in out + err, err[-3000:]
    job_id = toy_study(tmp_path).trials[0].user_attrs["job_id"]
    assert sacct_state(job_id).startswith("CANCELLED") or not subprocess.run(
        ["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()


def test_workers_on_slurm_are_one_job_each_and_pull_every_trial(tmp_path):
    """`hydra.sweeper.mode=workers hydra.sweeper.n_jobs=2` on SLURM: four points of the toy app run in two SLURM jobs
    (one per worker, each queued once, not once per trial), each pulling trials until the grid is done: every point
    COMPLETE once, each trial's `worker_job` one of the two job ids, both jobs COMPLETED in sacct."""
    driver = toy_sweep(tmp_path, "x=0,1,2,3", "sleep_s=1", "hydra.sweeper.mode=workers", "hydra.sweeper.n_jobs=2")
    out, err = ended(driver, timeout=300)
    assert driver.returncode == 0 and "Traceback" not in out + err, err[-3000:]
    trials = toy_study(tmp_path).trials
    assert sorted(t.params["x"] for t in trials if t.state == TrialState.COMPLETE) == [0, 1, 2, 3], err[-3000:]
    jobs = {t.user_attrs["worker_job"] for t in trials}
    assert 1 <= len(jobs) <= 2 and all(j.isdigit() for j in jobs), jobs
    assert all(sacct_state(j) == "COMPLETED" for j in jobs), {j: sacct_state(j) for j in jobs}
    started = [json.loads(line)["x"] for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(started) == [0, 1, 2, 3]  # nothing ran twice


def test_a_worker_sbatch_refuses_is_one_line_and_no_trial_is_started(tmp_path):
    """Workers on SLURM, sbatch refusing the worker's request (more memory than any node has): one line naming
    SLURM's reason, exit 1, and the study holds no trial left RUNNING with no job (none was started)."""
    out, err = ended(toy_sweep(tmp_path, "x=0,1", "hydra.launcher.mem_gb=100000", "hydra.sweeper.mode=workers",
                               "hydra.sweeper.n_jobs=1"))
    assert "Traceback" not in out + err, err[-3000:]
    lines = error_lines(err)
    assert any("could not be submitted" in line and "sbatch" in line.lower() for line in lines), lines
    assert lines[-1].startswith("error: worker 0 could not be submitted") and "no trial was started" in lines[-1], lines
    assert not [t for t in toy_study(tmp_path).trials if t.state == TrialState.RUNNING]
    assert not (tmp_path / "runs.jsonl").exists()  # nothing trained


def test_a_detached_worker_sweep_is_shown_by_sweeper_status_and_finishes(tmp_path):
    """`hydra.sweeper.wait_for_workers=false`: the driver exits 0 right after submitting the workers, naming
    `python -m sweeper.status`; that command shows the sweep while the worker jobs train it to the end."""
    driver = toy_sweep(tmp_path, "x=0,1,2", "sleep_s=2", "hydra.sweeper.mode=workers", "hydra.sweeper.n_jobs=1",
                       "hydra.sweeper.wait_for_workers=false")
    out, err = ended(driver, timeout=120)
    assert driver.returncode == 0 and "Traceback" not in out + err, err[-3000:]
    assert "python -m sweeper.status" in out + err, (out + err)[-3000:]
    assert not [t for t in toy_study(tmp_path).trials if t.state == TrialState.COMPLETE]  # it did not wait
    folder = next((tmp_path / "runs").iterdir())
    wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in toy_study(tmp_path).trials) == 3, timeout=240,
             what="the worker to finish the grid")
    status = subprocess.run([sys.executable, "-m", "sweeper.status", str(folder)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    assert "3 complete" in status.stdout, status.stdout
    (job,) = {t.user_attrs["worker_job"] for t in toy_study(tmp_path).trials}
    rows = [line.split() for line in status.stdout.splitlines()[3:]]
    assert [r[:3] for r in rows] == [[str(n), "COMPLETE", job] for n in range(3)], status.stdout  # the worker's job
    wait_for(lambda: all(r[3] == "COMPLETED" for r in [line.split() for line in subprocess.run(
        [sys.executable, "-m", "sweeper.status", str(folder)], cwd=REPO, capture_output=True, text=True,
        timeout=120).stdout.splitlines()[3:]]), timeout=60, what="the worker job COMPLETED in the status")
    assert sorted(json.loads(line)["x"] for line in (tmp_path / "runs.jsonl").read_text().splitlines()) == [0, 1, 2]


def test_a_preempted_worker_resumes_its_trial_from_its_checkpoint_as_the_same_trial(tmp_path, cache_dir):
    """One worker job on SLURM, preempted (submitit's SIGUSR2 path) while its trial trains: the job is requeued
    and the worker resumes that trial from its checkpoint, as the same trial (one trial in the study, COMPLETE,
    resumed from step >= 20), and then the worker goes on to the grid's next point."""
    import submitit

    slurm = [a for a in SLURM if a != PROCESSES]
    driver = start_driver(["-m", "lora.r=8,16", *ROWS, "trainer.max_steps=60", "trainer.eval_every=10",
                           "hydra.sweeper.mode=workers", "hydra.sweeper.n_jobs=1", *slurm], tmp_path, cache_dir)
    try:
        trial = wait_for(lambda: next(t for t in journal_study(tmp_path).trials
                                      if t.state == TrialState.RUNNING and "worker_job" in t.user_attrs),
                         what="a running trial with its worker job")
        folder, job_id = Path(trial.user_attrs["folder"]), trial.user_attrs["worker_job"]
        wait_for(lambda: (folder / "checkpoints" / "checkpoint-20" / "trainer_state.json").exists(), what="checkpoint-20")
        submitit.SlurmJob(folder=folder.parent / ".submitit", job_id=job_id)._interrupt()
        deadline = time.time() + 420
        while driver.poll() is None and time.time() < deadline:
            queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
            if "PENDING" in queue:  # a requeued job waits for its begin time (about 2 minutes): release it now
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
            time.sleep(2)
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0 and "Traceback" not in out, out[-3000:]
    trials = journal_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE], [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    first = next(t for t in trials if t.number == trial.number)
    assert first.user_attrs["worker_job"] == job_id  # the same job, requeued
    m = read_metrics(folder)
    assert m["resumed_from_step"] is not None and m["resumed_from_step"] >= 20, m
    assert m["steps"] == 60 and m["eval_loss"] == pytest.approx(first.value)


def test_a_worker_job_cancelled_mid_trial_leaves_a_trial_the_next_worker_retries(tmp_path):
    """The worker's SLURM job is cancelled while its trial runs (a node lost, an admin's scancel): its job ends
    CANCELLED, so its trial is not waited for as a requeued worker's would be; the driver starts a worker again,
    which fails the cut trial as its driver's loss and trains its retry: every point COMPLETE in the end."""
    driver = toy_sweep(tmp_path, "x=0,1", "sleep_s=15", "hydra.sweeper.mode=workers", "hydra.sweeper.n_jobs=1")
    try:
        trial = wait_for(lambda: next(t for t in toy_study(tmp_path).trials
                                      if t.state == TrialState.RUNNING and "slurm_job" in t.user_attrs),
                         timeout=120, what="a running trial with its worker's SLURM job")
        subprocess.run(["scancel", trial.user_attrs["slurm_job"]], check=True)
        out, err = ended(driver, timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0 and "Traceback" not in out + err, (out + err)[-3000:]
    by_x: dict = {}
    for t in toy_study(tmp_path).trials:
        by_x.setdefault(t.params["x"], []).append(t)
    cut = by_x[trial.params["x"]]
    assert [t.state for t in cut] == [TrialState.FAIL, TrialState.COMPLETE], [(t.state, t.user_attrs) for t in cut]
    assert "driver stopped" in cut[0].user_attrs["fail_reason"]
    other = 1 - trial.params["x"]
    assert [t.state for t in by_x[other]] == [TrialState.COMPLETE]
    assert sacct_state(trial.user_attrs["slurm_job"]).startswith("CANCELLED")


@pytest.mark.parametrize("mode", ["processes", "workers"])
def test_a_job_that_can_never_start_stops_the_sweep_in_a_minute_with_slurm_s_reason(tmp_path, mode):
    """A request no node can meet (64 CPUs per task on a 2-CPU node): sbatch takes it and SLURM holds it PENDING
    with reason PartitionConfig, for ever. Within a minute the driver cancels it and exits 1 in one line naming
    the reason and what to change; a trial it held is queued again; nothing is left in the queue."""
    start = time.time()
    driver = toy_sweep(tmp_path, "x=0,1", f"hydra.sweeper.mode={mode}", "hydra.sweeper.n_jobs=1",
                       "hydra.launcher.cpus_per_task=64")
    out, err = ended(driver, timeout=120)
    assert time.time() - start < 75, time.time() - start
    assert driver.returncode == 1 and "Traceback" not in out + err, err[-3000:]
    (line,) = error_lines(err)
    assert "can never start (reason PartitionConfig" in line and "hydra.launcher.*" in line, line
    trials = toy_study(tmp_path).trials
    if mode == "processes":
        cut, retry = trials
        assert cut.state == TrialState.FAIL and cut.user_attrs["interrupted"] and "PartitionConfig" in cut.user_attrs[
            "fail_reason"]
        assert retry.state == TrialState.WAITING and retry.params == cut.params
    else:
        assert not trials  # the worker never ran: no trial was asked for
    wait_for(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(), timeout=30,
             what="an empty queue")
