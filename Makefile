# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= $(or $(VIRTUAL_ENV),$(CSC_VENV),.venv)
BIN := $(VENV)/bin

.PHONY: demo test env

env:
	@bash scripts/setup.sh

# Synthetic data (kept if already there), then a few minutes of training of the 2D example on
# CPU; it prints per-class validation IoU and the TensorBoard command. Run again, it resumes.
demo: env
	@if [ -d data/jrc_synth1 ]; then echo "data/ already holds the synthetic datasets; keeping them"; \
	else $(BIN)/csc synth data; fi
	$(BIN)/csc train examples/train_2D.py

# Lint, format check and the test suite, exactly as CI runs them.
test: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest
