#!/usr/bin/env bash
# A sweep: every attack in ATTACKS, then every defense in DEFENSES on each record, for each seed in
# SEEDS; then the table. Edit the defaults below, or set any of them in the environment:
#
#   DATASET_PATH=../shared/data/cifar10-jpeg.zip PRESET=cpu DEVICE=cpu bash sh/sweep.sh
#   ATTACKS=badnet,blended DEFENSES=ft,d3 SEEDS=0,1,2 bash sh/sweep.sh --gpus all
#   bash sh/sweep.sh --executor slurm --slurm_partition gpu
#
# Arguments are passed on to the launcher (python sweeps/launch.py --help) and win over the variables.
# Every run whose output is already finished is skipped and an interrupted one resumes, so the same
# command continues a stopped sweep. The table is written to $TABLE.{csv,md,tex} and $TABLE_cost.png.
set -uo pipefail
cd "$(dirname "$0")/.."

ATTACKS="${ATTACKS:-all}"            # attack scripts (attack/<name>.py), comma-separated, or all
DEFENSES="${DEFENSES:-all}"          # defense scripts (defense/<name>.py), comma-separated, all, or none
PRESET="${PRESET:-paper}"            # paper | cpu | cpu_small | smoke (sweeps/launch.py --help says what each is)
DATASET="${DATASET:-cifar10}"
DATASET_PATH="${DATASET_PATH:-}"     # empty: the scripts' ./data
MODEL="${MODEL:-}"                   # empty: the preset's
EPOCHS="${EPOCHS:-}"                 # attack epochs; empty: the preset's
DEFENSE_EPOCHS="${DEFENSE_EPOCHS:-}" # epochs of every defense that counts epochs; empty: the preset's schedules
SEEDS="${SEEDS:-0}"
DEVICE="${DEVICE:-auto}"
RECORD_DIR="${RECORD_DIR:-record}"
TABLE="${TABLE:-results/sweep}"
TABLE_ARGS="${TABLE_ARGS:-}"         # e.g. --paper: the paper's Table 1 below ours

args=(--attacks "$ATTACKS" --defenses "$DEFENSES" --preset "$PRESET" --dataset "$DATASET" --seeds "$SEEDS"
      --device "$DEVICE" --record_dir "$RECORD_DIR")
[ -n "$DATASET_PATH" ] && args+=(--dataset_path "$DATASET_PATH")
[ -n "$MODEL" ] && args+=(--model "$MODEL")
[ -n "$EPOCHS" ] && args+=(--epochs "$EPOCHS")
[ -n "$DEFENSE_EPOCHS" ] && args+=(--defense_epochs "$DEFENSE_EPOCHS")

python sweeps/launch.py "${args[@]}" "$@"
status=$?
# The table follows a finished sweep (0) or one where some job failed (1: the table of what finished).
# Any other code writes no table over the one there: 2 is bad input or a sweep already running on
# RECORD_DIR (the launcher said what in one line, nothing ran), 130 an interruption (the same command
# resumes; the table comes at the end), anything else a launcher that died.
case "$status" in
  0|1) ;;
  *) exit "$status" ;;
esac
prev=""
for arg in "$@"; do  # the preset the launcher ran (its --preset wins over PRESET), named under the table
  [ "$arg" = --dry_run ] && exit 0
  [ "$prev" = --preset ] && PRESET="$arg"
  case "$arg" in --preset=*) PRESET="${arg#--preset=}" ;; esac
  prev="$arg"
done
# shellcheck disable=SC2086
python sweeps/results_table.py --record_dir "$RECORD_DIR" --out "$TABLE" --preset "$PRESET" $TABLE_ARGS || status=$?
exit "$status"
