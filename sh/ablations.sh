#!/usr/bin/env bash
# The D3 paper's ablations on CIFAR-10, each a sweep with one axis (docs/ablations.md), then its table
# in the paper's layout (python sweeps/results_table.py --ablation FLAG):
#   Table 2: poisoning ratio 1%..50% (attack axis --pratio), BadNets / Blended / LF, with D3
#   Table 3: reserved clean data 1%, 5%, 10% (D3 --ratio), BadNets / Blended / WaNet
#   Table 6: D3's threshold eps 0..0.5 (--eps), BadNets / Blended / WaNet
#   Table 7: D3's multiplier lambda 1..40 (--lmd), BadNets / Blended / WaNet
# Tables 3, 6 and 7 share their attack records (RECORD_DIR/d3); Table 2 has its own (RECORD_DIR/pratio).
# PRESET=paper (the default) is the paper's protocol, a GPU job (days on one GPU: spread it with --gpus
# all or --executor slurm); PRESET=cpu_small is the scaled-down protocol for 2 CPU cores. Usage:
#   bash sh/ablations.sh [DATASET_PATH] [launcher arguments...]
#   PRESET=cpu_small DEVICE=cpu TABLES="6 7" bash sh/ablations.sh ../shared/data/cifar10-jpeg.zip
#   DRY_RUN=1 bash sh/ablations.sh          # print every job's command; run nothing, build no table
# The same command continues a stopped run: finished values are skipped, interrupted ones resumed.
# Tables go to $OUT/table<N>.{csv,md,png}, the paper's own printed below each.
set -uo pipefail
cd "$(dirname "$0")/.."

DATASET_PATH="${1:-${DATASET_PATH:-}}"
PRESET="${PRESET:-paper}"           # paper | cpu_small (or cpu, smoke)
SEEDS="${SEEDS:-0}"
DEVICE="${DEVICE:-auto}"
RECORD_DIR="${RECORD_DIR:-record/ablations_$PRESET}"
OUT="${OUT:-results/ablations_$PRESET}"
TABLES="${TABLES:-2 3 6 7}"
DRY_RUN="${DRY_RUN:-}"

common=(--preset "$PRESET" --seeds "$SEEDS" --device "$DEVICE")
[ -n "$DATASET_PATH" ] && common+=(--dataset_path "$DATASET_PATH")
[ -n "$DRY_RUN" ] && common+=(--dry_run)
for arg in "${@:2}"; do [ "$arg" = --dry_run ] && DRY_RUN=1; done

status=0
# ablation TABLE FLAG RECORDS ATTACKS AXIS_OPTION AXIS_VALUE
ablation() {
  local table="$1" flag="$2" records="$3" attacks="$4"
  echo "== Table $table: --$flag ($records)"
  python sweeps/launch.py --attacks "$attacks" --defenses d3 --record_dir "$records" "${common[@]}" "$5" "$6" \
    "${@:7}"
  local code=$?
  case "$code" in
    0|1) [ "$code" = 1 ] && status=1 ;;
    *) exit "$code" ;;  # bad input (2) or an interruption (130): no table, and stop here
  esac
  [ -n "$DRY_RUN" ] && return 0
  python sweeps/results_table.py --record_dir "$records" --ablation "$flag" --defense d3 \
    --out "$OUT/table$table" --paper || status=$?  # the paper's own table of the flag printed below
}

for t in $TABLES; do
  case "$t" in
    2) ablation 2 pratio "$RECORD_DIR/pratio" badnet,blended,lf --attack_args "--pratio 0.01,0.1,0.2,0.3,0.4,0.5" \
         "${@:2}" ;;
    3) ablation 3 ratio "$RECORD_DIR/d3" badnet,blended,wanet --defense_args "--ratio 0.01,0.05,0.1" "${@:2}" ;;
    6) ablation 6 eps "$RECORD_DIR/d3" badnet,blended,wanet --defense_args "--eps 0,0.1,0.2,0.3,0.4,0.5" "${@:2}" ;;
    7) ablation 7 lmd "$RECORD_DIR/d3" badnet,blended,wanet --defense_args "--lmd 1,10,20,30,40" "${@:2}" ;;
    *) echo "error: TABLES=$TABLES: the paper's ablations here are 2, 3, 6 and 7" >&2; exit 2 ;;
  esac
done
exit "$status"
