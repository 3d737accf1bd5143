#!/usr/bin/env bash
# SFT on 8 GPUs: the CPT launcher and trainer with an SFT config (one that sets sft_data).
#   launch/sft_8gpu.sh [config.yaml] [key=value ...]     (no config: launch/configs/neuro_sft_2b.yaml)
#   e.g. launch/sft_8gpu.sh launch/configs/neuro_sft_2b.yaml init_from=runs/neuro_cpt_2b/checkpoints run_dir=runs/cpt_sft
# Both arms of the comparison (Base+SFT, CPT+SFT) with identical settings: `make sft-arms` (see the Makefile).
set -euo pipefail
CONFIG=$(dirname "$0")/configs/neuro_sft_2b.yaml
if [[ $# -gt 0 && ( "$1" != *=* || -f "$1" ) ]]; then CONFIG=$1; shift; fi
exec "$(dirname "$0")/cpt_8gpu.sh" "$CONFIG" "$@"
