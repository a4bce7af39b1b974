# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= $(or $(VIRTUAL_ENV),$(CSC_VENV),.venv)
BIN := $(VENV)/bin

.PHONY: demo test env

env:
	@bash scripts/setup.sh

# Synthetic data (kept if already there), then a few minutes of training of the 2D example on
# CPU; it prints per-class validation IoU and the TensorBoard command. Run again, it resumes.
# Then the best epoch predicts the validation crops into predictions/ (the demo's own output,
# replaced on each run) and csc evaluate scores them against the ground truth.
demo: env
	@if [ -d data/jrc_synth1 ]; then echo "data/ already holds the synthetic datasets; keeping them"; \
	else $(BIN)/csc synth data; fi
	$(BIN)/csc train examples/train_2D.py
	$(BIN)/csc predict examples/train_2D.py --checkpoint best --overwrite
	$(BIN)/csc evaluate --predictions predictions/2d_unet --datasplit datasplit.csv

# Lint, format check, type check (mypy, configured in pyproject.toml) and the test suite,
# exactly as CI runs them.
test: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest
