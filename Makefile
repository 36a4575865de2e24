# The two commands a fresh machine needs (see README):
#   make demo   install, then run a short real search on the built-in model and texts (CPU, SQLite)
#   make test   install, then run the whole test suite (CI runs this through .ci/run)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pip takes this CPU build from the local disk here; on a CUDA machine, install your CUDA torch first
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[service,botorch,dev,llama-cpp]"
	touch $(STAMP)

install: $(STAMP)

# A short real search: SmolLM2-135M, 20% of its parameters, Jane Austen and Wikipedia as calibration and validation
# text, news as the held-out test, 12 searched trials beside two baselines (LLM-Pruner over its 3 calibration draws,
# and FLAP, the strongest training-free peer) on the CPU; the repair's moments from 32 windows of each source; the
# 3 best re-scored on 16 more validation windows per source. The study is named after the job (a hash), so a
# demo of an older version in runs/demo.db never blocks a newer one. Afterwards the unpruned model, the baselines
# and the best answer 20 items of each built-in task (the report's downstream accuracy), and their speed is measured
# in 3 interleaved rounds.
demo: install
	$(BIN)/adapruner search --model smollm2-135m --target 0.2 --trials 12 --pool-size 24 --repair-windows 32 \
		--val-windows 16 --test-windows 16 --selection-windows 16 --finalists 3 --baselines llm-pruner,flap \
		--cost-rounds 3 --storage sqlite:///runs/demo.db --out runs/demo --tasks books-cloze,books-lastword \
		--task-limit 20

# Two pytest workers share the cores (a whole test file each, so its fixtures are built once); torch's threads wait
# passively, as any job sharing cores should. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
