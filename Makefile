# Every target installs what it needs, so each works on a fresh machine.
# On CPU machines torch must be the local 2.13.0 wheel: any other spec downloads GBs of CUDA wheels.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make-installed

.PHONY: tune install demo test test-fast lint format bench bench-tp bench-host bench-e2e bench-train clean

$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m inductor_fusion.demo

# The whole suite, slow model compiles included (CI runs exactly this). Without CUDA the
# kernel tests run under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET).
# Two pytest-xdist workers, one per core of CI's machine: compiles are single-threaded Python and
# g++, so a lone process leaves a core idle. Whole files go to one worker (--dist loadfile) so
# that a file's module-scoped models are built once, costliest first (tests/conftest.py orders
# them; --no-loadscope-reorder keeps that order). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PYTHON) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

lint:
	$(PYTHON) -c "import ruff" 2>/dev/null || $(PIP) install -q ruff
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# GPU region benchmark, Llama shapes and one real size per other family kind (needs CUDA; `--cpu-smoke`
# checks the script on a CPU): writes perf/results/{results.json,csv,md,png}.
bench: $(STAMP)
	$(PYTHON) perf/bench.py --out perf/results

# One rank's region under tensor parallelism (Llama-3-8B over 2, 4, 8 GPUs), on one GPU.
bench-tp: $(STAMP)
	$(PYTHON) perf/bench.py --tp --out perf/results/tp_shard

# Host cost without CUDA graphs (enqueue, wall) beside CUDA-graph GPU time, ours vs Inductor, and
# the demo model's default-mode forward (needs CUDA): writes perf/results/host/host.{json,md}.
bench-host: $(STAMP)
	$(PYTHON) perf/bench_host.py --out perf/results/host

# End-to-end generate() benchmark (needs CUDA; `--cpu-smoke` checks the script on a CPU).
bench-e2e: $(STAMP)
	$(PYTHON) perf/bench_e2e.py --out perf/results/e2e

# Region forward + backward, time and activation memory, eager / compile / Liger / ours in both
# memory modes (needs CUDA; `--cpu-smoke` checks the script on a CPU): perf/results/train.
bench-train: $(STAMP)
	$(PYTHON) perf/bench_train.py --out perf/results/train

# Re-measures the op's launch configurations (GPU); copy the written module over
# triton_kernels/_rmsnorm_mlp_tuned.py to adopt it.
tune: $(STAMP)
	$(PYTHON) perf/tune.py --out perf/results/tune

clean:
	rm -rf $(STAMP) build dist *.egg-info .pytest_cache .hypothesis
