#!/usr/bin/env bash
# The D3 paper's Table 5 protocol (Sec. 4.4, the adaptive attack): CIFAR-10, PreAct-ResNet18, 10% poisoning;
# BadNets, Blended and WaNet trained with adaptive SAM (--sam_rho) at the budgets 1.0, 2.0 and 3.0, plus
# the plain attacks (no budget: the same records as sh/table1.sh, shared when RECORD_DIR is the same);
# each attacked model, then FT, FT-SAM and D3 on it, with the paper's (BackdoorBench's) settings on 5%
# clean data; then our tables (one per budget) and the paper's Table 5 below them. Meant for GPUs (12
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

python sweeps/results_table.py --record_dir "$RECORD_DIR" --out "$TABLE" --preset "$PRESET" || status=$?
cat <<'EOF'

The paper's Table 5 (D3, Sec. 4.4): defense results (%) against adaptive attacks, CIFAR-10, PreAct-ResNet18.
Budget                     1.0            2.0            3.0
Attack   Defense       ACC    ASR     ACC    ASR     ACC    ASR
BadNets  No Defense   90.42  96.43   90.71  96.28   91.56  95.60
         FT           92.02  26.30   92.64  33.01   92.55  71.24
         FT-SAM       91.28  17.74   92.01  36.34   92.19  54.79
         D3           90.90   0.76   91.81   0.72   91.53   1.24
Blended  No Defense   89.77  99.73   91.30  99.37   91.76  99.78
         FT           92.02  71.80   92.68  83.42   92.46  82.17
         FT-SAM       92.17  72.71   92.14  82.80   92.39  91.93
         D3           91.13   0.14   91.56   1.22   91.49   2.74
WaNet    No Defense   89.74  91.52   90.49  90.70   90.36  96.13
         FT           91.71  15.88   92.00  18.47   91.90  21.38
         FT-SAM       91.67   5.57   92.19  10.97   92.10  18.87
         D3           90.98   0.84   91.00   0.99   90.89   1.48
EOF
exit "$status"
