# qlora_exp: make help lists the targets.
PYTHON ?= python
SEARCH ?= rank_alpha_lr
ARGS ?=
# test processes (pytest-xdist) for `make test`: most of the suite waits on trial processes, SLURM and sleeps
TEST_JOBS ?= 2
# the real Unsloth for tests/test_engines.py (trainer.engine=unsloth), in a folder of its own: scripts/unsloth/site.sh
UNSLOTH_SITE ?= .cache/unsloth-site

.DEFAULT_GOAL := help
.PHONY: help install train sweep grid test test-processes test-fast lint tb report slurm-sweep sweep-status slurm-up slurm-down db-up db-down clean

help: ## List the targets
	@if [ -t 1 ]; then c='\033[36m'; r='\033[0m'; else c=''; r=''; fi; \
	grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -v c="$$c" -v r="$$r" 'BEGIN {FS = ":.*?## "}; {printf "  %s%-12s%s %s\n", c, $$1, r, $$2}'

install: ## Install qlora_exp and its pinned dependencies (CPU torch here; see README for GPU)
	$(PYTHON) -m pip install torch==2.13.0 -e ".[dev]"

train: ## One trial on the embedded default (ARGS="model=... lora.r=...")
	$(PYTHON) -m qlora_exp $(ARGS)

grid: ## A grid sweep over ranks: three trials
	$(PYTHON) -m qlora_exp -m lora.r=8,16,64 $(ARGS)

sweep: ## An Optuna sweep with pruning (SEARCH=rank_alpha_lr | lr_only | targets)
	$(PYTHON) -m qlora_exp -m search=$(SEARCH) $(ARGS)

test: $(UNSLOTH_SITE) ## The whole test suite (the README's test command): the fast tier first (a failure shows in a minute), then the rest, with sweep workers (the default); then the sweep-loop tests again with a process per trial
	QLORA_EXP_TEST_UNSLOTH_SITE=$(abspath $(UNSLOTH_SITE)) $(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=20
	$(MAKE) --no-print-directory test-processes

test-processes: ## The sweep-semantics, concurrency, recovery and driver-signal tests again with hydra.sweeper.mode=processes (those pinned to it already ran)
	QLORA_EXP_SWEEP_MODE=processes $(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests/test_sweep_semantics.py tests/test_concurrency.py \
		tests/test_recovery.py tests/test_sweeper.py::test_killed_driver_resumes_without_rerunning_finished_trials \
		tests/test_faults.py::test_sigterm_of_the_driver_cancels_its_trial_marks_it_fail_and_queues_one_retry \
		-m "slow and not pins_mode"

$(UNSLOTH_SITE): scripts/unsloth/site.sh
	bash scripts/unsloth/site.sh $@

test-fast: ## Tests that start no trial and no driver (under a minute)
	$(PYTHON) -m pytest -q -m "not slow"

lint: ## ruff on the code
	$(PYTHON) -m ruff check qlora_exp sweeper hydra_plugins tests scripts bench

tb: ## TensorBoard on every run and sweep under outputs/tensorboard, this machine only (TB_PORT=6006)
	$(PYTHON) -m tensorboard.main --logdir outputs/tensorboard --host 127.0.0.1 --port $(or $(TB_PORT),6006)

report: ## A sweep's report.md, plots and trial table (SWEEP=outputs/multirun/<study>, default: newest)
	$(PYTHON) -m qlora_exp.report $(SWEEP)

slurm-sweep: ## The sweep driver as a CPU-only SLURM job, trials as GPU jobs (SEARCH=..., ARGS="hydra.launcher.partition=gpu")
	$(PYTHON) -m sweeper.detach -- -m search=$(SEARCH) hydra/launcher=slurm $(ARGS)

sweep-status: ## Trials of a sweep with their SLURM states (SWEEP=outputs/multirun/<study>, default: newest)
	$(PYTHON) -m sweeper.status $(SWEEP)

slurm-up: ## Start the local one-node SLURM used by the tests
	bash scripts/slurm/up.sh

slurm-down: ## Stop the local SLURM
	bash scripts/slurm/down.sh

db-up: ## Start PostgreSQL (127.0.0.1:5433) and MariaDB (:3308) for the database tests; URLs in /tmp/qlora-db/urls.env
	bash scripts/db/up.sh

db-down: ## Stop the test databases (scripts/db/down.sh --purge also deletes them)
	bash scripts/db/down.sh

clean: ## Remove outputs (runs, sweeps, studies, caches)
	rm -rf outputs/* .pytest_cache
