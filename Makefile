# lokr-edu: `make course` runs every lecture, `make test` checks everything.
# Each target creates .venv and installs the package with [dev] when needed.
# torch is pinned to the CPU build via constraints.txt, so no install pulls a CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install course test test-fast test-full-arch test-browser slides book test-book gpu-check rehearse install-latest test-latest lint exercises notebooks clean

# $(call pip,VENV,ARGUMENTS): pip install into VENV, quiet, without what is known to be harmless;
# real warnings and errors still print (after pip ends; all of it is in VENV/pip.log), and the
# exit status is pip's. Known harmless:
# - pip's "a new release of pip is available" (--disable-pip-version-check);
# - setuptools' "Editable installation. ... folders in your working directory with the same name
#   as your package may take precedence": lokr_edu/ is that package (PYTHONWARNINGS reaches the
#   build backend's process);
# - "Location '...' is ignored: it is neither a file nor a directory": a machine-wide pip config
#   that lists local package folders (the course machines have one) gets one line for each
#   package a folder lacks, and pip goes on to the next index.
PIP_NOISE := ^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$$
pip = PYTHONWARNINGS='ignore:Editable installation:UserWarning' $(1)/bin/python -m pip install \
	--quiet --disable-pip-version-check $(2) >$(1)/pip.log 2>&1; status=$$?; \
	grep -v -e "$(PIP_NOISE)" $(1)/pip.log; exit $$status

$(INSTALLED): pyproject.toml constraints.txt
	@echo "Installing lokr-edu and its dependencies into $(VENV) (once, a minute or two)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(call pip,$(VENV),--upgrade pip)
	@$(call pip,$(VENV),-c constraints.txt -e '.[dev]')
	@touch $(INSTALLED)

install: $(INSTALLED)

course: $(INSTALLED)
	@$(BIN)/python -m lokr_edu.course run

# pytest runs one worker per core (pytest-xdist); each test file, and so each notebook, stays
# whole on one worker, its cells in order.
test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m lokr_edu.exercises check
	$(BIN)/python -m pytest -n auto --dist loadfile

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

# The course as a static website in build/book/ (tools/book.py; Sphinx with myst-nb, the [book]
# extra): the committed notebooks as they are, nothing re-executed; it opens from disk and loads
# nothing from the network (MathJax from npm as for make slides, once, into build/vendor/).
# `make book SOLUTIONS=no` leaves the solution notebooks out.
BOOK_INSTALLED := $(VENV)/.installed-book
$(BOOK_INSTALLED): $(INSTALLED)
	@echo "Installing the [book] extra into $(VENV) (once)"
	@$(call pip,$(VENV),-c constraints.txt -e '.[book]')
	@touch $(BOOK_INSTALLED)

book: $(BOOK_INSTALLED)
	$(BIN)/python tools/book.py build $(if $(filter no,$(SOLUTIONS)),--no-solutions)

# Opt-in: the built book in headless Chromium (Debian's chromium, as test-browser), from disk and
# over http.server: every page of its table of contents, figures, formulas, search, no request to
# the network; screenshots in build/screenshots/.
test-book: book
	$(BIN)/python tools/book.py test

# On a CUDA GPU: SD1.5 training steps/s and peak memory, lokr_edu vs peft (benchmarks/README.md).
# No install step (make install pins the CPU torch): install the CUDA build of torch, then
# pip install -e ".[dev]" (README, GPUs). Runs .venv's python if there is one, else $(PYTHON).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu_check.py

# Opt-in: the course's GPU path rehearsed on the CPU at full SD1.5 size (random weights, offline):
# DreamBooth train / kill / resume, reload of the exported adapters, chapter 08 on SD1.5, 2-process
# accelerate launch. About a quarter of an hour on 2 cores, 10 GB of memory, 3 GB of disk.
rehearse: $(INSTALLED)
	$(BIN)/python tools/rehearse.py

# Opt-in (the weekly CI run, .github/workflows/latest.yml): the newest release of every
# dependency, without constraints.txt, in a fresh .venv-latest; then every lecture and solution
# notebook in course order, naming the first that breaks. torch stays the CPU build pinned in
# constraints.txt unless TORCH says otherwise (CI: TORCH=torch, from PyTorch's CPU index).
LATEST := .venv-latest
TORCH ?= torch==2.13.0
install-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	@$(call pip,$(LATEST),--upgrade pip)
	@$(call pip,$(LATEST),--upgrade -e '.[dev]' '$(TORCH)')
	$(LATEST)/bin/python -m pip list --disable-pip-version-check --format=freeze --exclude-editable

test-latest: install-latest
	$(LATEST)/bin/python -m lokr_edu.course run --out build/latest --times build/latest/chapter_times.json notebooks/*.ipynb solutions/*.ipynb

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
