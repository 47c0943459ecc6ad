#!/usr/bin/env bash
# The sweep's scaled-down CPU preset (narrow PreAct-ResNet18, 18 attack epochs, 100-epoch defense
# schedules cut to 60; about 25 minutes per attack with FT and D3 on 2 cores). Usage:
#   bash sh/bench_cpu.sh [DATASET_PATH] [launcher arguments, e.g. --attacks badnet --defenses ft,d3 --preset cpu_small]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/cifar10-jpeg.zip}"
if [ ! -e "$DATA" ]; then echo "bench_cpu: dataset $DATA not found; pass its path as the first argument" >&2; exit 2; fi
export DATASET_PATH="$DATA" PRESET="${PRESET:-cpu}" DEVICE=cpu TABLE="${TABLE:-results/bench_cpu}"
exec bash sh/sweep.sh "${@:2}"
