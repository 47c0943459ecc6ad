#!/usr/bin/env bash
# The D3 paper's Table 1 protocol (Sec. 4.1): CIFAR-10, PreAct-ResNet18, 10% poisoning, every attack
# and every defense with the paper's (BackdoorBench's) settings, on 5% clean data; then our table
# beside the paper's. Meant for GPUs (a day or more on one; spread it with --gpus all or
# --executor slurm). Usage:
#   bash sh/table1.sh [DATASET_PATH] [launcher arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
export DATASET_PATH="${1:-${DATASET_PATH:-}}"
export PRESET=paper DATASET=cifar10 MODEL=preactresnet18
export ATTACKS="${ATTACKS:-all}" DEFENSES="${DEFENSES:-all}" TABLE="${TABLE:-results/table1}" TABLE_ARGS="--paper"
exec bash sh/sweep.sh "${@:2}"
