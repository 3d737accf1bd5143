#!/usr/bin/env bash
# Continued pre-training on 8 GPUs of one node (more nodes: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT;
# another GPU count: GPUS_PER_NODE; the Python of your environment: PYTHON, default python3).
#   launch/cpt_8gpu.sh [config.yaml] [key=value ...]
set -euo pipefail
CONFIG=${1:-launch/configs/neuro_cpt_2b.yaml}
shift || true
if [[ "${NNODES:-1}" == 1 && -z "${MASTER_ADDR:-}${MASTER_PORT:-}" ]]; then
  # one node: torchrun's standalone rendezvous binds a free port itself (a fixed 29500 fails the second job
  # on a node, and a port picked beforehand can be taken before torchrun binds it); the ranks reach it on the
  # loopback address, not at the host's name (which need not resolve to this node)
  RENDEZVOUS=(--standalone --local-addr 127.0.0.1)
else
  RENDEZVOUS=(--nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
              --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
exec "${PYTHON:-python3}" -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  -m megatron_ext.train --config "$CONFIG" "$@"
