# Two commands on a fresh machine: `make train` (the embedded default experiment) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned to the CPU build that pip takes from this machine's disk; see README for GPUs.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install train test lint quality clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# Stage 1 (VAE) then stage 2 (text-conditional latent diffusion) on the bundled digits, on CPU.
train: $(STAMP)
	$(BIN)/sdl-train experiment=digits_autoencoder
	$(BIN)/sdl-train experiment=digits
	$(BIN)/python experiments/digits_quality/measure.py --out outputs/digits/latest/quality.json

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check sd_lightning tests experiments

# Measure the default model's sample quality (conditional accuracy and diversity).
quality: $(STAMP)
	$(BIN)/python experiments/digits_quality/measure.py --guidance 1.0 1.25 1.5 2.0 3.0

clean:
	rm -rf outputs multirun .pytest_cache
