# Two entry points (see README): `make demo` and `make test`. Each builds .venv on first use.
# torch is installed first and pinned (TORCH_SPEC) so pip never picks a multi-GB CUDA build on its own.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdtune-deps
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint compat clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# the CLIP vocabulary file only: open-clip-torch's dependencies pull a CUDA torchvision that breaks imports
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
	touch $@

demo: $(STAMP)
	$(BIN)/python -m lib_sdtune demo

# tests run in TEST_WORKERS processes, one test file each at a time (files share module fixtures)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The compatibility subset in A1111-like and Forge-like environments (CI runs it too).
compat:
	bash .ci/compat.sh

clean-venv:
	rm -rf $(VENV)
