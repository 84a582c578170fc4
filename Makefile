# Two commands do all set-up on a fresh machine:
#   make quickstart   -> installs into .venv, then runs the small pretraining job on the bundled samples
#   make test         -> installs into .venv (with test extras), then runs the test-suite
#   make test-fast    -> the edit-loop tier: the suite without the tests marked slow in tests/conftest.py
# Both run the tests in two processes (pytest-xdist, XDIST below; `make test XDIST=` runs one): the suite's tests
# use one torch thread each, so a second worker uses the second core. Each test file runs whole on one worker
# (--dist loadfile: a module fixture is built once), the most expensive files first (tests/conftest.py).
# `python -m pytest tests/x.py` stays one process.
#
# CPU-only machines get the CPU build of torch: when no NVIDIA driver is present we install `torch==2.13.0`
# first (a local CPU wheel where PIP_FIND_LINKS provides one), so the project's own `torch>=2.5,<2.15`
# requirement is already satisfied and pip never pulls a multi-GB CUDA build. On a GPU machine the ordinary
# resolver picks the CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CPU_TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -q
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
export WANDB_MODE ?= disabled

.PHONY: setup quickstart test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA driver found: installing the CPU build of torch ($(CPU_TORCH))"; \
		$(BIN)/pip install --quiet "$(CPU_TORCH)"; \
	fi
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

setup: $(VENV)/.installed

QS := outputs/quickstart
quickstart: setup
	$(BIN)/python -m data_prep tokenizer --input data_prep/samples/en --vocab-size 4000 --out $(QS)/tokenizer
	$(BIN)/python -m data_prep shards --input data_prep/samples/en --tokenizer $(QS)/tokenizer --out $(QS)/shards --seq-len 128
	$(BIN)/python -m pretrain +experiment=quickstart

test: setup
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS) -m "not slow" --durations=10

clean:
	rm -rf $(VENV) outputs .pytest_cache
