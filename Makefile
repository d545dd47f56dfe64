# Two entry points for a fresh clone: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out/demo

.PHONY: setup demo test image-test clean

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ./client -e '.[all]'
	touch $(STAMP)

demo: setup
	$(BIN)/sdxl-lora demo --out $(OUT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The production image, built and run as on RunPod (Docker; several GB; not part of `make test`).
image-test: setup
	bash scripts/image-test.sh

clean:
	rm -rf $(VENV) out .pytest_cache
