# lokr-edu: `make course` runs every lecture, `make test` checks everything.
# Each target creates .venv and installs the package with [dev] when needed.
# torch is pinned to the CPU build via constraints.txt, so no install pulls a CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install course test test-fast test-full-arch test-browser slides gpu-check rehearse lint exercises notebooks clean

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

course: $(INSTALLED)
	$(BIN)/python -m lokr_edu.course run

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m lokr_edu.exercises check
	$(BIN)/python -m pytest

# The edit-test loop: lint and the unit tests in tests/, without executing the notebooks.
test-fast: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -o addopts="" -p no:cacheprovider -p no:nbval -m "not full_arch" -q

# Opt-in: one LoKr training step of the full-size SD1.5 U-Net (random weights) on the CPU.
test-full-arch: $(INSTALLED)
	$(BIN)/python -m pytest -m full_arch -s tests/test_full_arch.py

# Lecture slides: one reveal.js HTML per lecture in build/slides/, opening from disk with no network
# (reveal.js and MathJax from their npm packages, fetched once into build/vendor/).
slides: $(INSTALLED)
	$(BIN)/python tools/slides.py build

# Opt-in: the course in JupyterLab driven by headless Chromium (Debian's chromium package);
# screenshots in build/screenshots/.
test-browser: $(INSTALLED)
	$(BIN)/python tools/browser_test.py

# On a CUDA GPU: SD1.5 training steps/s and peak memory, lokr_edu vs peft (benchmarks/README.md).
# No install step (make install pins the CPU torch): install the CUDA build of torch, then
# pip install -e ".[dev]" (README, GPUs). Runs .venv's python if there is one, else $(PYTHON).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu_check.py

# Opt-in: chapter 07's GPU path rehearsed on the CPU at full SD1.5 size (random weights, offline):
# train / kill / resume, reload of the exported adapters, chapter 07 in full mode, 2-process
# accelerate launch. About a quarter of an hour on 2 cores, 5 GB of memory, 3 GB of disk.
rehearse: $(INSTALLED)
	$(BIN)/python tools/rehearse.py

lint: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

exercises: $(INSTALLED)
	$(BIN)/python -m lokr_edu.exercises build

# For authors: re-execute lectures and solutions in place (commit the outputs), then rebuild exercises.
notebooks: $(INSTALLED)
	$(BIN)/python -m lokr_edu.course execute --inplace notebooks/*.ipynb solutions/*.ipynb
	$(BIN)/python -m lokr_edu.exercises build

clean:
	rm -rf build
