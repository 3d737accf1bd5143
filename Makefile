# Two entry points on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY ?= $(VENV)/bin/python

.PHONY: setup demo test clean sft-arms

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # CPU build from local disk; GPU machines: install your CUDA torch first
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m tools.demo --out out/demo

# Two pytest workers, a test file each at a time (module fixtures, such as the trainer's mix, are built once):
# one pytest process keeps about one of CI's 2 cores busy (much of the suite waits on trainer processes, servers
# and files), so two take about 15 minutes where one took about 25. TEST_WORKERS=0: one process. No -q: the
# header names the random order's seed (--randomly-seed=N repeats it).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The SFT comparison: Base+SFT and CPT+SFT from one SFT dataset with one SFT config (only init_from and
# run_dir differ), each exported to HF for evaluation.eval_qwen and evaluation.eval_reasoning_judge.
# Defaults are the 2B recipe's paths; override any of them, e.g. make sft-arms CPT_CKPT=runs/x/checkpoints.
# Runs in the Python of PY (default: the .venv of `make setup`; on GPU nodes your CUDA environment's python).
SFT_DATA_RECIPE ?= launch/configs/neuro_sft_data.yaml
SFT_DATA_DIR ?= out/sft
SFT_CONFIG ?= launch/configs/neuro_sft_2b.yaml
BASE_CKPT ?= ckpt/qwen35_2b_base
CPT_CKPT ?= runs/neuro_cpt_2b/checkpoints
HF_TEMPLATE ?= Qwen3.5-2B-Base
ARMS_DIR ?= runs/sft_arms
STOP_TOKENS ?= <|im_end|>
SFT_ARGS ?=

sft-arms:
	"$(PY)" -m preprocessing.build_sft --config "$(SFT_DATA_RECIPE)" --output-dir "$(SFT_DATA_DIR)"
	PYTHON="$(PY)" launch/sft_8gpu.sh "$(SFT_CONFIG)" "sft_data=$(SFT_DATA_DIR)/sft.json" \
		"init_from=$(BASE_CKPT)" "run_dir=$(ARMS_DIR)/base_sft" $(SFT_ARGS)
	PYTHON="$(PY)" launch/sft_8gpu.sh "$(SFT_CONFIG)" "sft_data=$(SFT_DATA_DIR)/sft.json" \
		"init_from=$(CPT_CKPT)" "run_dir=$(ARMS_DIR)/cpt_sft" $(SFT_ARGS)
	for arm in base_sft cpt_sft; do \
		"$(PY)" -m tools.convert_to_hf --ckpt "$(ARMS_DIR)/$$arm/checkpoints" --out "$(ARMS_DIR)/$$arm/hf" \
			--hf-template "$(HF_TEMPLATE)" --overwrite --stop-tokens '$(STOP_TOKENS)' || exit 1; \
	done
	@echo "arms ready: $(ARMS_DIR)/base_sft/hf $(ARMS_DIR)/cpt_sft/hf"

clean:
	rm -rf $(VENV) out
