#!/bin/bash
# Per-node launcher of the distributed stages (cluster, train, protect). The stage scripts start it once per node:
#
#   srun --ntasks-per-node=1 bash launch/slurm/node_launch.sh <python module> [stage args ...]
#
# Why a script of its own: everything node-specific is evaluated HERE, on each node, when the srun step starts.
# Written inline in the batch script, e.g.  srun bash -c "accelerate launch --machine_rank $SLURM_NODEID ...",
# the double-quoted variables are expanded once, by the batch shell on the first node, before srun runs anything:
# every node then claims machine rank 0 and the rendezvous hangs or mixes up ranks.
#
# Environment (exported by the batch script `segue site submit` renders; defaults for a hand-made sbatch):
#   SEGUE_ACCELERATE_CONFIG  Accelerate config (configs/accelerate/multi_node.yaml)
#   SEGUE_PROCS_PER_NODE     ranks per node ($SLURM_GPUS_ON_NODE, else 1)
#   SEGUE_MAIN_PORT          rendezvous port; 0 or unset = 20000 + $SLURM_JOB_ID % 20000 (differs between jobs)
#   SEGUE_CONTAINER          command prefix, e.g. "apptainer exec --nv /images/segue.sif" (empty: none)
#   SEGUE_ACCELERATE         the accelerate executable (accelerate)
set -euo pipefail

module="${1:?usage: node_launch.sh <python module> [stage args ...]}"
shift
node_rank="${SLURM_NODEID:?SLURM_NODEID is unset: run this inside an srun step}"
num_nodes="${SLURM_NNODES:?SLURM_NNODES is unset: run this inside a Slurm job}"
procs_per_node="${SEGUE_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
config="${SEGUE_ACCELERATE_CONFIG:-configs/accelerate/multi_node.yaml}"

# Node 0 of the allocation hosts the rendezvous; every node computes the same first host.
mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is unset}")
if [ "${#hosts[@]}" -eq 0 ]; then
    echo "node_launch.sh: scontrol show hostnames returned nothing for $SLURM_JOB_NODELIST" >&2
    exit 1
fi
main_ip="${hosts[0]}"

port="${SEGUE_MAIN_PORT:-0}"
if [ "$port" = 0 ]; then
    port=$((20000 + ${SLURM_JOB_ID:-0} % 20000))
fi

# c10d lets the launchers find each other at main_ip:port. On one node use static: c10d would rendezvous on
# localhost:29400 and collide with any other job on that node.
if [ "$num_nodes" -gt 1 ]; then
    rdzv=c10d
else
    rdzv=static
fi

read -r -a container <<< "${SEGUE_CONTAINER:-}"
cmd=("${container[@]}" "${SEGUE_ACCELERATE:-accelerate}" launch
    --config_file "$config"
    --num_machines "$num_nodes"
    --num_processes "$((num_nodes * procs_per_node))"
    --machine_rank "$node_rank"
    --main_process_ip "$main_ip"
    --main_process_port "$port"
    --rdzv_backend "$rdzv"
    -m "$module" "$@")
echo "[segue node $node_rank/$num_nodes on $(hostname)] ${cmd[*]}" >&2
exec "${cmd[@]}"
