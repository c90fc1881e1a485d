# gflowdiff — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
THREADS ?= 2

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install gflowdiff with its pinned stack (CPU torch 2.13.0)

demo: $(STAMP) ## train residual ∇-DB on the embedded digits model; ends with the TV to the exact target (≈ 6 min, 2 cores)
	OMP_NUM_THREADS=$(THREADS) HF_HUB_OFFLINE=1 $(BIN)/gflowdiff fit --config configs/digits/residual_nabla_db.yaml
	$(BIN)/python scripts/summarize_run.py runs/digits_residual_nabla_db

demo-flow: $(STAMP) ## the same on the embedded flow-matching digits model (SD3 layout, flow SDE kernel; ≈ 4 min, 2 cores)
	OMP_NUM_THREADS=$(THREADS) HF_HUB_OFFLINE=1 $(BIN)/gflowdiff fit --config configs/digits_flow/residual_nabla_db.yaml
	$(BIN)/python scripts/summarize_run.py runs/digits_flow_residual_nabla_db

test: $(STAMP) ## run the default test suite (CPU)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP) ## the default suite without tests marked slow
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(STAMP) ## ruff format and autofix
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

digits-model: $(STAMP) ## re-train the embedded digits model and classifier (≈ 20 min on 2 cores)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m gflowdiff.zoo.digits --out src/gflowdiff/zoo/weights

digits-flow-model: $(STAMP) ## re-train the embedded flow-matching (SD3-layout) digits model; prints its evaluation (≈ 15 min, 1 thread)
	OMP_NUM_THREADS=1 $(BIN)/python -m gflowdiff.zoo.digits_flow --out src/gflowdiff/zoo/weights

benchmark: $(STAMP) ## transitions/s at B = 1, 2, 4, 8, 16 (reference vs fused / pairs / stacked pass structures, channels-last), rollout speed, memory; digits + tiny SD
	OMP_NUM_THREADS=$(THREADS) HF_HUB_OFFLINE=1 $(BIN)/python scripts/benchmark.py --channels-last

COMPARE_CONFIGS := $(addprefix configs/digits/,residual_nabla_db.yaml residual_nabla_db_paper.yaml refl.yaml draft.yaml ddpo.yaml nabla_db.yaml \
	draft_lv.yaml db.yaml residual_db.yaml residual_nabla_db.yaml+configs/digits/overrides/beta2.yaml \
	residual_nabla_db_paper.yaml+configs/overrides/adjacent_pairs.yaml)
compare: $(STAMP) ## every objective on the digits model (+ residual ∇-DB at β=2 and in adjacent pairs) × 3 seeds → runs/compare/ (≈ 2 h, 2 cores)
	HF_HUB_OFFLINE=1 $(BIN)/gflowdiff compare --configs $(COMPARE_CONFIGS) --seeds 0 1 2 --steps 100 \
		--out runs/compare --jobs 2 --threads 1

CONVERGENCE_CONFIGS := $(addprefix configs/digits/,residual_nabla_db.yaml residual_nabla_db_paper.yaml ddpo.yaml \
	residual_db.yaml db.yaml refl.yaml)
convergence: $(STAMP) ## TV to the exact target vs training time: 6 digits configs × 3 seeds, 300 CPU-s each → runs/convergence/ (≈ 1 h, 2 cores)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/convergence.py --configs $(CONVERGENCE_CONFIGS) --seeds 0 1 2 --budget 300 \
		--checkpoint-every 10 --points 6 --samples 512 --pool 8192 --out runs/convergence --jobs 2 --threads 1

gpu-check: ## on a CUDA machine: SD-1.5-size benchmark (both pass structures) + bf16-mixed fit steps → gpu_check/
	bash scripts/gpu_check.sh gpu_check

gpu-speed: ## on a CUDA machine, within one 10-min call: eager reference vs pairs vs compiled pairs at B = 4 → gpu_speed/
	bash scripts/gpu_speed_check.sh gpu_speed

clean: ## remove run outputs (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache

.PHONY: help install demo test test-fast lint format digits-model digits-flow-model benchmark compare convergence gpu-check gpu-speed clean
