#!/usr/bin/env bash
# Continued pre-training on 8 GPUs of one node (more nodes: set NNODES, and on every node NODE_RANK and
# MASTER_ADDR, the first node's address, and MASTER_PORT if not 29500; another GPU count: GPUS_PER_NODE; the
# Python of your environment: PYTHON, default python3).
#   launch/cpt_8gpu.sh [config.yaml] [key=value ...]     (no config: launch/configs/neuro_cpt_2b.yaml)
set -euo pipefail
CONFIG=$(dirname "$0")/configs/neuro_cpt_2b.yaml
if [[ $# -gt 0 && ( "$1" != *=* || -f "$1" ) ]]; then CONFIG=$1; shift; fi
NNODES=${NNODES:-1}
if [[ "$NNODES" == 1 && -z "${MASTER_PORT:-}" ]]; then
  # one node: torchrun's standalone rendezvous binds a free port itself (a fixed 29500 fails the second job
  # on a node, and a port picked beforehand can be taken before torchrun binds it); the ranks reach it on the
  # loopback address, not at the host's name (which need not resolve to this node). A MASTER_ADDR that a
  # scheduler exports is not needed for it.
  RENDEZVOUS=(--standalone --local-addr 127.0.0.1)
elif [[ "$NNODES" == 1 ]]; then
  RENDEZVOUS=(--nnodes 1 --node_rank 0 --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
else
  # several nodes meet at the first node's address: without it each would wait for the others on its own
  # loopback, silently, until killed
  if [[ -z "${MASTER_ADDR:-}" || -z "${NODE_RANK:-}" ]]; then
    echo "NNODES=$NNODES: set MASTER_ADDR (the address of the node with NODE_RANK=0) and NODE_RANK (0 to" \
         "$((NNODES - 1)), one per node) on every node" >&2
    exit 2
  fi
  RENDEZVOUS=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
              --master_port "${MASTER_PORT:-29500}")
fi
# a SIGTERM (preemption, Ctrl-C) reaches every rank, which saves a checkpoint and exits: torchrun kills them 30 s
# later by default, before a 2B model's save can end (the run then falls back to the previous checkpoint)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
# torchrun, ending with status 0 after such a save (torchrun's own: 1, a failed job to the scheduler)
exec "${PYTHON:-python3}" -m megatron_ext.launch "${RENDEZVOUS[@]}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  -m megatron_ext.train --config "$CONFIG" "$@"
