#!/usr/bin/env bash
# Training as a Slurm job on every node of its allocation (CPT, or SFT with an SFT config), from the project's folder:
#   sbatch [--nodes N] [--time T] launch/slurm.sh [config.yaml] [key=value ...]    (no config: the CPT recipe's)
# Each node runs launch/cpt_8gpu.sh with the allocation's node count, its own rank and the first node as the
# rendezvous, so none of them is set by hand. 10 minutes before the time limit every node's launcher gets a
# SIGTERM: the ranks save and the job ends with status 0, so that the same command queued with
# `sbatch --dependency=afterok:<job>` resumes the run. Site options (partition, account, CPUs) go on sbatch's line.
#SBATCH --job-name=neurocpt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@600
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch runs a copy of this script from its spool folder
export NNODES=${SLURM_JOB_NUM_NODES:-1}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
if [[ "$NNODES" -gt 1 ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR
fi
# one launcher per node (--ntasks-per-node=1), its rank from Slurm; a node whose launcher fails ends the others
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec launch/cpt_8gpu.sh "$@"' slurm.sh "$@"
