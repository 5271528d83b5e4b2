# `make demo` and `make test` work on a fresh machine: they create .venv and install the pinned CPU stack.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds a shared-memory op on first init_distributed (~60 s); keep the build between runs.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export PYTHONPATH := $(CURDIR)
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 1

.PHONY: venv test demo demo-long compare slurm-deps ds-ops clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# Debian's Slurm for the Slurm-template tests; skipped silently where we are not root or apt is missing
# (the tests then skip with a reason).
slurm-deps:
	@if ! command -v slurmctld >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q slurmctld slurmd slurm-client >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurmctld slurmd slurm-client >/dev/null 2>&1)) \
	     || echo "slurm-deps: could not install Slurm; its tests will be skipped"; \
	  else echo "slurm-deps: not root or no apt-get; Slurm tests will be skipped"; fi; \
	fi

# Build DeepSpeed's shm op once, in one process, before anything launches ranks: when several ranks start at once
# one builds it under a lock file and the others wait on that file, so a rank killed mid-build (a test timeout)
# would leave a lock that hangs every later start.
ds-ops: $(STAMP)
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"

test: $(STAMP) slurm-deps ds-ops
	$(PY) -m pytest -q tests

demo: $(STAMP) ds-ops
	$(PY) -m pipeline demo

# The same with 4,000 pre-training steps (~15 min on 2 idle cores): how far the curves go past 600 steps.
demo-long: $(STAMP) ds-ops
	$(PY) -m pipeline demo --long

# MLM vs 3ML at equal pre-training FLOPs, pre-train -> export -> fine-tune (needs ../shared: corpus and labeled
# data; ~25 min on 2 idle cores). Results in bench/results/compare_cpu.{json,md,png}.
compare: $(STAMP)
	$(PY) bench/compare.py --preset cpu

clean:
	rm -rf $(VENV) .cache demo_out compare_out
