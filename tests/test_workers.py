"""Sweep workers (sweeper/workers.py) and the trial runner's phases (qlora_exp/recipe.py): a worker keeps the
loaded base between trials without one trial changing another's result, pulls trials from the study, and rides out
a worker killed mid-trial, a trial that fails, and Ctrl-C."""
import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import FAST, REPO, compose_cfg, read_metrics, wait_for
from tests.test_recovery import alive, finish, runs, start_toy
from tests.test_sweep_semantics import study

WORKERS = "hydra.sweeper.mode=workers"


def test_a_trial_run_third_on_a_warm_worker_matches_it_run_cold(tmp_path, cache_dir):
    """The same trial (adapter saved, as by default) cold, then after another trial on the same base, then again
    third: the same eval loss (within 1e-4, here exactly), the base reused (not loaded again) for the 2nd and 3rd,
    and each trial's adapter is its own (a different rank has a different number of trainable parameters)."""
    from qlora_exp import recipe
    from qlora_exp.trial import run_trial

    recipe.forget_warm()
    results = []
    for i, extra in enumerate([[], ["lora.r=32", "optimizer.lr=3e-3"], []]):
        cfg = compose_cfg(tmp_path, [*FAST, "trainer.save_adapter=true", f"paths.output_dir={tmp_path}/t{i}", *extra],
                          cache_dir)
        if i == 1:  # this one evaluates at step 0 itself, on the warm base with its own (r=32) fresh adapters
            recipe.WARM.initial_eval = {}
        results.append(run_trial(cfg))
    cold, other, warm = results
    assert [r.warm_base for r in results] == [False, True, True]
    assert warm.base_load_s == 0 and cold.base_load_s > 0
    assert abs(cold.eval_loss - warm.eval_loss) < 1e-4, (cold.eval_loss, warm.eval_loss)
    # the base untouched by the trial before, and fresh adapters of another rank add exactly nothing at step 0:
    # what lets a warm trial reuse the base's step-0 evaluation (the third trial did, with the same metrics)
    assert [r.initial_eval_reused for r in results] == [False, False, True]
    assert cold.initial_eval_loss == other.initial_eval_loss == warm.initial_eval_loss
    assert warm.eval_history[0] == [0, cold.initial_eval_loss] and len(warm.eval_history) == len(cold.eval_history)
    assert other.trainable_params == 2 * cold.trainable_params  # r=32 against the default 16: fresh adapters
    assert cold.eval_loss < cold.initial_eval_loss
    assert (tmp_path / "t2" / "adapter" / "adapter_model.safetensors").exists()
    recipe.forget_warm()


def test_checkpointing_is_set_per_trial_on_a_kept_base(tmp_path, cache_dir):
    """Activation recomputation differs from trial to trial of a sweep (the memory plan picks it from the rank): the
    base is kept all the same, each trial gets its own setting on it (all layers, the first one, none), and a trial
    after one that recomputed matches it run cold (within 1e-4), with no recomputation left on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_exp import recipe
    from qlora_exp.trial import run_trial

    def flags():
        return [m.gradient_checkpointing for m in recipe.WARM.base.model.modules()
                if isinstance(m, GradientCheckpointingLayer)]

    recipe.forget_warm()
    plain = [*FAST, "trainer.gradient_checkpointing=false"]
    cold = run_trial(compose_cfg(tmp_path, [*plain, f"paths.output_dir={tmp_path}/a"], cache_dir))
    assert not any(flags())
    first = run_trial(compose_cfg(tmp_path, [*FAST, "trainer.gradient_checkpointing=true",
                                             "trainer.checkpointed_layers=1", f"paths.output_dir={tmp_path}/b"], cache_dir))
    assert first.warm_base and first.checkpointed_layers == 1 and flags()[0] and not any(flags()[1:])
    every = run_trial(compose_cfg(tmp_path, [*FAST, "trainer.gradient_checkpointing=true",
                                             f"paths.output_dir={tmp_path}/c"], cache_dir))
    assert every.warm_base and all(flags()) and len(flags()) > 1
    again = run_trial(compose_cfg(tmp_path, [*plain, f"paths.output_dir={tmp_path}/d"], cache_dir))
    assert again.warm_base and not any(flags()) and not recipe._grads_hooked(recipe.WARM.base.model)
    assert abs(again.eval_loss - cold.eval_loss) < 1e-4, (cold.eval_loss, again.eval_loss)
    assert abs(every.eval_loss - cold.eval_loss) < 1e-4  # recomputation changes memory, not the result
    recipe.forget_warm()


def test_a_trial_of_another_base_loads_it_and_a_failed_trial_leaves_the_next_one_clean(tmp_path, cache_dir):
    """A trial with another quantization loads its own base (not the kept one); after a trial that fails (here:
    out of memory, raised at step 3) the next trial of the process loads its base again."""
    from qlora_exp import recipe
    from qlora_exp.trial import run_trial

    recipe.forget_warm()
    first = run_trial(compose_cfg(tmp_path, [*FAST, f"paths.output_dir={tmp_path}/a"], cache_dir))
    other = run_trial(compose_cfg(tmp_path, [*FAST, "quantization=none", f"paths.output_dir={tmp_path}/b"], cache_dir))
    assert first.quantized and not other.quantized and other.warm_base is False
    oom = ["+callbacks.oom._target_=tests.test_workers.OutOfMemoryAt", "+callbacks.oom.step=3"]
    with pytest.raises(Exception, match="out of memory"):
        run_trial(compose_cfg(tmp_path, [*FAST, *oom, "quantization=none", f"paths.output_dir={tmp_path}/c"], cache_dir))
    assert read_metrics(tmp_path / "c")["status"] == "failed"
    after = run_trial(compose_cfg(tmp_path, [*FAST, "quantization=none", f"paths.output_dir={tmp_path}/d"], cache_dir))
    assert after.warm_base is False and after.status == "complete"
    recipe.forget_warm()


class OutOfMemoryAt:
    """Test only: raise torch's OutOfMemoryError at optimizer step `step`."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if state.global_step >= step:
                    raise torch.OutOfMemoryError("CUDA out of memory (test)")

        return _Cb()


@pytest.mark.slow
def test_one_worker_runs_the_whole_grid_on_one_loaded_base(tmp_path, cache_dir):
    """`python -m qlora_exp -m lora.r=8,16,32`: one process runs the three trials, loading the base once (trials 2
    and 3 warm, ready in a fraction of the cold one's start-up), every trial COMPLETE in the study; the rerun runs
    nothing."""
    from tests.conftest import run_cli

    args = ["-m", "lora.r=8,16,32", WORKERS, *FAST]
    proc = run_cli(args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "this process is the sweep's worker" in proc.stdout
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    ms = [read_metrics(sweep / str(n)) for n in range(3)]
    assert sorted(m["trial_in_process"] for m in ms) == [1, 2, 3]
    assert sorted(m["warm_base"] for m in ms) == [False, True, True]
    cold = next(m for m in ms if not m["warm_base"])
    for m in ms:
        if m["warm_base"]:
            assert m["ready_at"] - m["started_at"] < (cold["ready_at"] - cold["started_at"]) / 2
    # each trial's result file (what a worker killed before its tell leaves) is plain pickle, not cloudpickle's
    # (0.1 s a trial, ~1 s the first, on the GPU machine), and reads back as the value the study holds
    from submitit.core.utils import pickle_load

    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    for t in study.trials:
        path = Path(t.user_attrs["result_path"])
        assert b"cloudpickle" not in path.read_bytes(), path
        outcome, ret = pickle_load(path)
        assert outcome == "success" and ret.return_value == pytest.approx(t.value)
        assert ret.hydra_cfg.hydra.job.num == t.number
    again = run_cli(args, tmp_path, cache_dir)
    assert again.returncode == 0 and "trial 0 started" not in again.stdout, again.stderr[-2000:]


@pytest.mark.slow
def test_two_workers_pull_a_study_and_a_worker_killed_mid_trial_is_retried_by_the_other(tmp_path):
    """Two local workers on the toy app, 6 points of 2 s: kill -9 of one worker while its trial sleeps. The other
    worker (or the driver) finds the trial stale (its worker gone from this host), FAIL `orphaned` and retried once;
    the sweep ends 0 with all 6 points COMPLETE, each finished point run once, and both workers having run trials."""
    driver = start_toy(tmp_path, "x=range(0,5)", "sleep_s=2", "hydra.sweeper.n_jobs=2", WORKERS)
    try:
        victim = wait_for(lambda: next((t for t in study(tmp_path).trials if t.state == TrialState.RUNNING
                                        and "worker_job" in t.user_attrs), None), timeout=120, what="a running trial")
        controller = int(victim.user_attrs["worker_job"])
        worker = int(victim.system_attrs["driver"].rsplit("-", 2)[1])
        assert alive(worker) and worker != driver.pid
        wait_for(lambda: any(r["x"] == victim.params["x"] and r["pid"] == worker for r in runs(tmp_path)), timeout=60,
                 what="the running trial's point to start training")  # killed in training, not while it is set up
        os.kill(worker, signal.SIGKILL)
        out, err = finish(driver, timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, err[-3000:]
    trials = study(tmp_path).trials
    complete = sorted(t.params["x"] for t in trials if t.state == TrialState.COMPLETE)
    assert complete == list(range(6)), [(t.number, t.params, t.state) for t in trials]
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and killed.user_attrs.get("orphaned") is True
    assert sum(t.params["x"] == victim.params["x"] for t in trials) == 2  # the killed one and its one retry
    started = [r["x"] for r in runs(tmp_path)]
    assert sorted(started) == sorted([*range(6), victim.params["x"]])  # nothing else ran twice
    assert len({r["pid"] for r in runs(tmp_path)}) <= 3  # workers, not a process per trial
    assert controller > 0


@pytest.mark.slow
def test_ctrl_c_of_the_driver_stops_its_workers_and_queues_the_trials_they_cut_short(tmp_path):
    """Two workers, the trial of x=1 sleeping 60 s: Ctrl-C of the driver. Exit 130 within seconds, the finished
    x=0 COMPLETE, x=1 FAIL 'interrupted' with a WAITING retry, no worker left running; the rerun trains x=1 only."""
    driver = start_toy(tmp_path, "x=0,1", "sleep_per_x=60", "hydra.sweeper.n_jobs=2", WORKERS)
    try:
        wait_for(lambda: any(t.state == TrialState.COMPLETE for t in study(tmp_path).trials)
                 and any(t.state == TrialState.RUNNING for t in study(tmp_path).trials), timeout=120,
                 what="x=0 done, x=1 running")
        workers = [int(t.system_attrs["driver"].rsplit("-", 2)[1]) for t in study(tmp_path).trials]
        start = time.time()
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=90) == 130
        assert time.time() - start < 60
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in workers), timeout=15, what="the workers to end")
    by_x: dict = {}
    for t in study(tmp_path).trials:
        by_x.setdefault(t.params["x"], []).append(t)
    assert [t.state for t in by_x[0]] == [TrialState.COMPLETE]
    assert [t.state for t in by_x[1]] == [TrialState.FAIL, TrialState.WAITING]
    assert by_x[1][0].user_attrs["interrupted"] is True
    out, err = finish(start_toy(tmp_path, "x=0,1", "sleep_per_x=0", "hydra.sweeper.n_jobs=2", WORKERS))
    states = sorted((t.params["x"], t.state.name) for t in study(tmp_path).trials)
    assert states == [(0, "COMPLETE"), (1, "COMPLETE"), (1, "FAIL")], states
    assert [r["x"] for r in runs(tmp_path)].count(0) == 1


def test_a_trial_at_safe_points_is_only_asked_to_stop_by_the_first_signal_and_cut_by_a_second(capfd):
    """sweeper.stop: a worker's trial that said at_safe_points() is not interrupted where the signal lands; it stops
    at its next check(); a second signal cuts it at once. A trial that did not say so is cut at the first."""
    from sweeper import stop
    from sweeper.loop import Interrupts

    try:
        with Interrupts(()) as irq:  # no handler installed: the signals are delivered by hand
            stop.STATE.update(running=True, safe_points=False)
            with pytest.raises(KeyboardInterrupt):
                irq._handle(signal.SIGTERM, None)
        with Interrupts(()) as irq:
            stop.STATE.update(running=True)
            stop.check()  # nothing asked yet
            stop.at_safe_points()
            irq._handle(signal.SIGTERM, None)  # only asks
            with pytest.raises(KeyboardInterrupt, match="asked to stop"):
                stop.check()
            with pytest.raises(KeyboardInterrupt):
                irq._handle(signal.SIGINT, None)
        assert irq.count == 2
        assert "Ctrl-C again: still stopping" in capfd.readouterr().err
    finally:
        stop.STATE.update(running=False, interrupted=False, safe_points=False)


def test_nothing_of_a_trial_outlives_it_without_the_garbage_collector(tmp_path, cache_dir):
    """A warm worker's next trial starts with only the base allocated (flat GPU memory over a sweep) only if the
    trial's trainer, optimizer and adapters are freed when the trial returns, by reference counting: a reference
    cycle through the trainer (one once came from wrapping its `evaluate`) keeps them until a later collection,
    so the next trial begins with the last one's tensors still allocated."""
    import gc

    from transformers import Trainer

    from qlora_exp import recipe
    from qlora_exp.trial import run_trial

    recipe.forget_warm()
    gc.collect()
    gc.disable()
    try:
        for i in range(2):  # cold, then warm (the step-0 evaluation reused)
            run_trial(compose_cfg(tmp_path, [*FAST, f"paths.output_dir={tmp_path}/t{i}"], cache_dir))
            alive = [o for o in gc.get_objects() if isinstance(o, Trainer)]
            assert not alive, f"trial {i}: {len(alive)} trainer(s) left for the garbage collector"
    finally:
        gc.enable()
        recipe.forget_warm()


def test_a_base_let_go_is_freed_though_the_collector_skipped_it(tmp_path, cache_dir):
    """A worker stops the garbage collector scanning what lives as long as it (recipe.keep_out_of_collections, after a
    base is loaded): the base it lets go (another base, a failed trial) must still be freed, not kept frozen."""
    import gc
    import weakref

    from qlora_exp import recipe
    from qlora_exp.trial import run_trial

    recipe.forget_warm()
    run_trial(compose_cfg(tmp_path, [*FAST, f"paths.output_dir={tmp_path}/a"], cache_dir))
    assert gc.get_freeze_count() > 0
    first = weakref.ref(recipe.WARM.base.model)
    run_trial(compose_cfg(tmp_path, [*FAST, "quantization=none", f"paths.output_dir={tmp_path}/b"], cache_dir))
    assert first() is None, "the first base outlived the switch to another"
    second = weakref.ref(recipe.WARM.base.model)
    recipe.forget_warm()
    assert second() is None and gc.get_freeze_count() == 0


def test_a_result_defined_in_main_is_pickled_by_value():
    """What plain pickle would write by reference to `__main__` goes to cloudpickle: another process loads it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        from sweeper.workers import _dumps

        def scale(x):
            return 3 * x

        sys.stdout.buffer.write(_dumps(("success", {"value": 1.5, "fn": scale})))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    data = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, check=True).stdout
    assert b"cloudpickle" in data
    import pickle

    outcome, value = pickle.loads(data)
    assert outcome == "success" and value["value"] == 1.5 and value["fn"](2) == 6


def test_a_warm_workers_paged_optimizer_reuses_the_last_trials_state_buffers(monkeypatch):
    """bitsandbytes' paged optimizers put each large state in CUDA managed memory and never free it: on a worker
    each trial's Adam moments stayed allocated. Through qlora_exp.paged a trial's optimizer (bitsandbytes' own
    init_state) takes the buffers the last trial gave back, zeroed, and allocates only shapes it has not had."""
    import torch

    from qlora_exp import paged
    from qlora_exp.quiet import import_bitsandbytes

    import_bitsandbytes()
    import bitsandbytes as bnb
    from bitsandbytes import functional as F
    from bitsandbytes.functional import GlobalPageManager
    from bitsandbytes.optim.optimizer import Optimizer8bit

    made = []

    def get_paged(*shape, dtype, device):  # cudaMallocManaged, as a CPU tensor that records each allocation
        made.append(torch.full(shape, 7.0, dtype=dtype))
        return made[-1]

    monkeypatch.setattr(F, "get_paged", get_paged)
    monkeypatch.setattr(F, "fill", lambda t, v: t.fill_(v))
    monkeypatch.setattr(Optimizer8bit, "get_state_buffer", Optimizer8bit.get_state_buffer)  # undone afterwards
    monkeypatch.setattr(paged, "POOL", paged.PagedPool())
    manager = GlobalPageManager.get_instance()
    monkeypatch.setattr(manager, "paged_tensors", [])
    assert paged.install()

    class CudaParam:  # what init_state reads of a parameter on a GPU
        def __init__(self, *shape):
            self.shape, self.device = torch.Size(shape), torch.device("cuda", 0)

        def numel(self):
            return self.shape.numel()

    def trial(*shapes):
        opt = bnb.optim.PagedAdamW([torch.nn.Parameter(torch.zeros(4))], lr=1e-3)
        params = [CudaParam(*s) for s in shapes]
        for p in params:
            opt.init_state(opt.param_groups[0], p, 0, 0)
        return [(opt.state[p]["state1"], opt.state[p]["state2"]) for p in params]

    trial((16, 14336), (16, 14336), (14336, 8))
    assert len(made) == 6 and len(manager.paged_tensors) == 6
    for t in made:
        t.fill_(3.0)  # what the first trial's steps left in its moments
    assert paged.POOL.give_back() == 6
    second = trial((16, 14336), (14336, 8), (14336, 32))
    assert len(made) == 8 and len(manager.paged_tensors) == 8  # only the new shape was allocated
    reused = {id(t) for pair in second[:2] for t in pair}
    assert reused <= {id(t) for t in made[:6]} and len(reused) == 4
    assert all(float(t.abs().max()) == 0.0 for pair in second for t in pair)  # zeroed, as a new state is
    assert paged.POOL.held_bytes() == sum(t.numel() * 4 for t in made)


def test_a_trials_thread_writing_to_stderr_after_the_trial_ended_does_not_raise(tmp_path, capfd):
    """A thread that took the trial's stderr (its own log file) while the trial ran and writes after the trial ended
    (TensorBoard's writer on a full disk did, in tests/test_faults.py) gets no "I/O operation on closed file": the
    late line is appended to the trial's file, and none of it reaches the worker's stderr (the sweep's terminal: a
    traceback cut by the trial's end put its last frames there, and CI's one-line check failed on them)."""
    import sys
    import threading

    from sweeper.workers import InProcessJob

    grabbed, release, written, errors = threading.Event(), threading.Event(), threading.Event(), []
    dying = []

    def late_writer():
        stream = sys.stderr  # the trial's, while it runs
        grabbed.set()
        release.wait(10)
        try:
            stream.write("a late line\n")
            stream.flush()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        written.set()

    def late_death():  # a thread of the trial that dies after the trial ended: its traceback, whole, in the log
        release.wait(10)
        raise RuntimeError("a late death")

    def trial():
        threading.Thread(target=late_writer, daemon=True).start()
        dying.append(threading.Thread(target=late_death, daemon=True))
        dying[0].start()
        grabbed.wait(10)
        print("the trial's line", file=sys.stderr)
        return 7

    job = InProcessJob(trial, (), tmp_path, "5", (lambda: None, 60))
    assert job.done() and job.result() == 7
    release.set()
    assert written.wait(10)
    dying[0].join(10)
    assert errors == []
    text = (tmp_path / "5_log.err").read_text()
    assert text.startswith("the trial's line\n") and "a late line\n" in text, text
    assert "Traceback (most recent call last)" in text and "RuntimeError: a late death\n" in text, text
    late = capfd.readouterr().err
    assert "a late line" not in late and "late death" not in late, late
