#!/bin/bash
# Multi-node launch of any recipe under slurm: one task per node, each starting `accelerate launch` for its 8 GPUs.
#
#   sbatch --nodes 2 recipes/accelerate/slurm_multinode.sh recipes/asft_math.yaml recipes/accelerate/zero3.yaml \
#       [--any_recipe_field value ...]
#
# The recipes' global batch assumes 8 GPUs; on NODES x 8 GPUs divide gradient_accumulation_steps by NODES to keep it
# (e.g. asft_math.yaml on 2 nodes: --gradient_accumulation_steps 8), and use a fresh --output_dir.
#SBATCH --job-name=asft
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err

set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: sbatch --nodes N $0 RECIPE.yaml ACCELERATE_CONFIG.yaml [--field value ...]" >&2
    exit 2
fi
RECIPE=$1
ACCELERATE_CONFIG=$2
shift 2

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_NODES=${SLURM_NNODES:-1}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
mkdir -p logs

# srun starts one copy per node; SLURM_NODEID (set per task) is that node's machine rank. The single quotes keep
# $SLURM_NODEID unexpanded until it runs on each node.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch \
    --config_file "$0" \
    --num_machines "$1" \
    --num_processes "$(( $1 * $2 ))" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$3" \
    --main_process_port "$4" \
    --rdzv_backend c10d \
    -m asft_trl.scripts.train --config "$5" "${@:6}"' \
    "$ACCELERATE_CONFIG" "$NUM_NODES" "$GPUS_PER_NODE" "$MAIN_HOST" "$MAIN_PORT" "$RECIPE" "$@"
