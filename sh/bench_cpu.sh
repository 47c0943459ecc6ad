#!/usr/bin/env bash
# Scaled-down attacks -> FT / D3 benchmark on the CPU (about 25 minutes per attack on 2 cores).
# Usage: bash sh/bench_cpu.sh [DATASET_PATH] [--attacks a,b] [--defenses x,y] [--preset cpu_small] [--clean]
#        (default dataset: ../shared/data/cifar10-jpeg.zip; default: every attack and defense)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/cifar10-jpeg.zip}"
if [ ! -e "$DATA" ]; then echo "bench_cpu: dataset $DATA not found; pass its path as the first argument" >&2; exit 2; fi
exec python sh/bench.py --dataset_path "$DATA" --preset cpu --device cpu "${@:2}"
