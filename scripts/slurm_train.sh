#!/bin/bash
# Multi-node training under SLURM: one task per node (srun); on each node `accelerate launch` starts one process per
# GPU with that node's rank (SLURM_NODEID), and the processes meet at the first node of the allocation.
#
#   sbatch scripts/slurm_train.sh CONFIG RECIPE [KEY=VALUE ...]
#   sbatch --nodes 4 scripts/slurm_train.sh fsdp2 ctgpt_sft_full data.manifest=ctrate.jsonl run_dir=runs/sft_full
#   sbatch --export=ALL,RESUME=1 scripts/slurm_train.sh fsdp2 ctgpt_sft_full ...   # continue the run
#
# CONFIG: a shipped accelerate config (ddp, fsdp2, deepspeed_zero2, deepspeed_zero3) or the path of one. run_dir
# must be on a file system every node sees (each process writes its own shard of the training state). SLURM sends
# SIGTERM 3 minutes before the time limit; the training processes save a checkpoint after their current step and
# exit (resubmit with RESUME=1). DRY_RUN=1 prints the per-node command instead of running it.
# See docs/distributed.md.
#SBATCH --job-name=rrg3d-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@180
set -euo pipefail

CONFIG=${1:?usage: slurm_train.sh CONFIG RECIPE [KEY=VALUE ...]}
RECIPE=${2:?usage: slurm_train.sh CONFIG RECIPE [KEY=VALUE ...]}
shift 2
PYTHON=${PYTHON:-python}

if [[ -f "$CONFIG" ]]; then
    CONFIG_FILE=$CONFIG
else  # a shipped config, found inside the installed package
    CONFIG_FILE=$("$PYTHON" -c "import sys; from importlib import resources; \
print(resources.files('rrg3d') / 'configs' / 'accelerate' / (sys.argv[1] + '.yaml'))" "$CONFIG")
fi
[[ -f "$CONFIG_FILE" ]] || { echo "slurm_train.sh: no accelerate config $CONFIG_FILE" >&2; exit 2; }

NODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_HOST=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1 || true)
export MAIN_HOST=${MAIN_HOST:-localhost}
export MAIN_PORT=${MAIN_PORT:-29500}

LAUNCH=(accelerate launch --config_file "$CONFIG_FILE" --num_machines "$NODES"
        --num_processes "$((NODES * GPUS_PER_NODE))" --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT")
if grep -q "^distributed_type: DEEPSPEED" "$CONFIG_FILE"; then
    LAUNCH+=(--deepspeed_multinode_launcher standard)  # srun starts every node: no pdsh/ssh from the first one
fi
TRAIN=(-m rrg3d.cli train "$RECIPE" "$@")
if [[ "${RESUME:-0}" == 1 ]]; then
    TRAIN+=(--resume)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "on each of $NODES node(s): ${LAUNCH[*]} --machine_rank \$SLURM_NODEID ${TRAIN[*]}"
    exit 0
fi
# bash -c gets the launcher + training command as "$@" and adds the node's rank, which only that node knows
srun --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'exec "${@:1:'"${#LAUNCH[@]}"'}" --machine_rank "$SLURM_NODEID" "${@:'"$((${#LAUNCH[@]} + 1))"'}"' \
    rrg3d-node "${LAUNCH[@]}" "${TRAIN[@]}"
