#!/usr/bin/env bash
# The D3 paper's Table 5 protocol (Sec. 4.4, the adaptive attack): CIFAR-10, PreAct-ResNet18, 10% poisoning;
# BadNets, Blended and WaNet trained with adaptive SAM (--sam_rho) at the budgets 1.0, 2.0 and 3.0, plus
# the plain attacks (no budget: the same records as sh/table1.sh, shared when RECORD_DIR is the same);
# each attacked model, then FT, FT-SAM and D3 on it, with the paper's (BackdoorBench's) settings on 5%
# clean data; then the table in the paper's layout, each figure beside the paper's (results_table.py
# --by_budget; without it, results_table.py gives one full table per budget, RA and DER too). Meant for GPUs (12
# attacks, 9 of them with SAM's two passes per step, and 36 defense runs at the paper preset: not yet
# timed; spread it with --gpus all or --executor slurm). See docs/adaptive-attack.md. Usage:
#   bash sh/table5.sh [DATASET_PATH] [launcher arguments...]
# e.g. bash sh/table5.sh ../shared/data/cifar10 --gpus all;  add --dry_run to print the jobs only.
# PRESET=cpu_small BUDGETS=2.0 bash sh/table5.sh ../shared/data/cifar10-jpeg.zip --device cpu: the scaled-down
# protocol for 2 CPU cores (the preset's narrow model; the records say _w16 in their names).
# Records are named <prefix><attack>_s<seed>, the prefix cifar10_preactresnet18_sam<budget>_ per budget
# (the launcher's default one without a budget), so no two budgets share a record; rerunning the same
# command skips finished runs and resumes interrupted ones.
set -uo pipefail
cd "$(dirname "$0")/.."
DATASET_PATH="${1:-${DATASET_PATH:-}}"
ATTACKS="${ATTACKS:-badnet,blended,wanet}"
DEFENSES="${DEFENSES:-ft,ft-sam,d3}"
BUDGETS="${BUDGETS:-none 1.0 2.0 3.0}"  # SAM radii; none: the plain attacks
SEEDS="${SEEDS:-0}"
RECORD_DIR="${RECORD_DIR:-record}"
PRESET="${PRESET:-paper}"
MODEL=preactresnet18               # the paper's model; the CPU presets bring their narrow one
[ "$PRESET" = paper ] || MODEL=preactresnet18_w16
TABLE="${TABLE:-results/table5}"

args=(--attacks "$ATTACKS" --defenses "$DEFENSES" --preset "$PRESET" --dataset cifar10
      --model "$MODEL" --seeds "$SEEDS" --record_dir "$RECORD_DIR")
[ -n "$DATASET_PATH" ] && args+=(--dataset_path "$DATASET_PATH")
dry_run=0
for arg in "${@:2}"; do [ "$arg" = --dry_run ] && dry_run=1; done

status=0
for budget in $BUDGETS; do
  budget_args=()
  if [ "$budget" != none ]; then
    if ! [[ "$budget" =~ ^[0-9]*\.?[0-9]+$ ]] || [[ "$budget" =~ ^0*\.?0*$ ]]; then
      echo "error: budget '$budget' in BUDGETS is not a positive number (e.g. BUDGETS='none 1.0 2.0 3.0')" >&2
      exit 2
    fi
    name="${budget%.0}"
    budget_args=(--prefix "cifar10_${MODEL}_sam${name//./p}_" --attack_args "--sam_rho $budget")
  fi
  echo "== Table 5, SAM budget $budget ==" >&2
  python sweeps/launch.py "${args[@]}" "${budget_args[@]}" "${@:2}"
  code=$?
  case "$code" in
    0) ;;
    1) status=1 ;;         # some job failed: the other budgets still run, the table shows what finished
    *) exit "$code" ;;     # 2: bad input or a sweep already running on RECORD_DIR; 130: interrupted (rerun resumes)
  esac
done
[ "$dry_run" = 1 ] && exit 0

# the paper's Table 5 layout: attack and defense as rows, each budget's ACC / ASR beside the paper's
python sweeps/results_table.py --record_dir "$RECORD_DIR" --by_budget --out "$TABLE" --preset "$PRESET" || status=$?
exit "$status"
