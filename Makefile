# The two set-up commands of the README: `make tiny` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install tiny test crds clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU build of torch; a GPU machine installs its CUDA build before this.
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[operator,trainer,dev]"
	touch $(STAMP)

install: $(STAMP)

tiny: $(STAMP)
	$(BIN)/tokenmill run examples/tiny

test: $(STAMP)
	$(BIN)/python -m pytest

crds: $(STAMP)
	$(BIN)/tokenmill crds --out crds
	$(BIN)/tokenmill crds --out charts/tokenmill/crds

clean:
	rm -rf $(VENV) tokenmill-runs
