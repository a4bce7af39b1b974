# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= $(or $(VIRTUAL_ENV),$(CSC_VENV),.venv)
BIN := $(VENV)/bin

.PHONY: demo test env

env:
	@bash scripts/setup.sh

# Synthetic data (kept if already there), with one held-out test crop per dataset (its ground
# truth in data/ground_truth.zarr, its row in data/test_crop_manifest.csv), then a few minutes of
# training of the 2D example on CPU; it prints per-class validation IoU and the TensorBoard
# command. Run again, it resumes. Then the best epoch predicts the validation crops into
# predictions/ (the demo's own output, replaced on each run) and csc evaluate scores them. Last,
# the challenge's workflow on the test crops: predict, process, pack-results with its check, and
# csc evaluate of the zip with the challenge's scoring against the held-out ground truth.
TESTS := --crops test --test-crop-manifest data/test_crop_manifest.csv
demo: env
	@if [ -f data/test_crop_manifest.csv ]; then echo "data/ already holds the synthetic datasets; keeping them"; \
	elif [ -d data/jrc_synth1 ]; then echo "adding test crops to data/ (the training crops stay byte for byte)"; \
	$(BIN)/csc synth data --test-crops 1 --overwrite; \
	else $(BIN)/csc synth data --test-crops 1; fi
	$(BIN)/csc train examples/train_2D.py
	$(BIN)/csc predict examples/train_2D.py --checkpoint best --overwrite
	$(BIN)/csc evaluate --predictions predictions/2d_unet --datasplit datasplit.csv
	$(BIN)/csc predict examples/train_2D.py $(TESTS) --checkpoint best --overwrite
	$(BIN)/csc process examples/train_2D.py $(TESTS) --overwrite
	$(BIN)/csc pack-results --config examples/train_2D.py -o predictions/submission.zarr \
		--test-crop-manifest data/test_crop_manifest.csv --overwrite --check
	$(BIN)/csc evaluate -s predictions/submission.zip -r predictions/result.json \
		-t data/ground_truth.zarr --test-crop-manifest data/test_crop_manifest.csv --overwrite

# Lint, format check, type check (mypy, configured in pyproject.toml) and the test suite,
# exactly as CI runs them.
test: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest
