#!/usr/bin/env bash
# The paper's protocol (Table 1 rows) on one GPU, after the data-pipeline comparison.
# Usage: bash sh/bench_gpu.sh [DATASET_PATH] [--attacks a,b] [--defenses x,y] [--clean]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/cifar10-jpeg.zip}"
if [ ! -e "$DATA" ]; then echo "bench_gpu: dataset $DATA not found; pass its path as the first argument" >&2; exit 2; fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu: no CUDA device; use sh/bench_cpu.sh')"
python sh/bench_throughput.py --dataset_path "$DATA"
exec python sh/bench.py --dataset_path "$DATA" --preset gpu --device cuda "${@:2}"
