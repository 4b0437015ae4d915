#!/usr/bin/env bash
# results/run_all.sh: the Omniglot rows of RESULTS.md ("Omniglot at the default budget"), then results/tables.md.
# Its TLL-from-scratch and generic rows (old recipes) ran at commit a716684 (`git show a716684:results/run_all.sh`);
# their successors are results/tll.py and results/generic.py.
#
# Usage (from anywhere; relative paths are relative to the repository root):
#     bash results/run_all.sh
#     SEEDS="0 1 2 3 4" THREADS=8 bash results/run_all.sh
#     FORCE=1 bash results/run_all.sh          # redo runs that already have eval.json
#
# Each row: `python SCRIPT.py FLAGS --seed S --out OUT/omniglot/ROW-sS`, then `python eval.py RUN/last.pt --baselines
# cheap` (the last epoch, as RESULTS.md reports it, beside the raw pixels and the untrained network: RUN/eval.json),
# its commands in RUN/command.txt. Rows: byol, simsiam, bn_only for each seed in SEEDS; bn_only's ablations (ABLATIONS:
# no-bn, bn-all, predictor, stop-grad, joint-bn, simsiam-like = --predictor --stop-grad; and beside them
# redundancy.py's vicreg and barlow) for each seed in ABLATION_SEEDS; byol-e<E_LONG> (the longer recipe) for each seed
# in LONG_SEEDS. Then
# `python results/summarize.py OUT --plots-dir results > results/tables.md` (TABLES). A run with an eval.json is skipped
# (unless FORCE=1); an unfinished one with a last.pt continues with --resume.
#
# Variables: SEEDS="0 1 2"  ABLATION_SEEDS="0 1 2"
#   ABLATIONS="no-bn bn-all predictor stop-grad joint-bn simsiam-like vicreg barlow"
#   LONG_SEEDS="0"  E_LONG=120  OUT=results/runs (a variable set to " " runs none of its rows)  THREADS=$(nproc)
#   FORCE=0  TABLES=results/tables.md  PYTHON=python  TRAIN_ARGS="" (flags for every training run, e.g. "--device cuda")
set -euo pipefail

SEEDS="${SEEDS:-0 1 2}"
ABLATION_SEEDS="${ABLATION_SEEDS:-0 1 2}"
ABLATIONS="${ABLATIONS:-no-bn bn-all predictor stop-grad joint-bn simsiam-like vicreg barlow}"
LONG_SEEDS="${LONG_SEEDS:-0}"
E_LONG="${E_LONG:-120}"
OUT="${OUT:-results/runs}"
THREADS="${THREADS:-$(nproc)}"
FORCE="${FORCE:-0}"
TABLES="${TABLES:-results/tables.md}"
PYTHON="${PYTHON:-python}"
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"

cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
log() { echo "[run_all $(date +%H:%M:%S)] $*"; }

# train ROW SEED SCRIPT [FLAGS...]: train into OUT/omniglot/ROW-sSEED, then evaluate its last.pt.
train() {
    local dir="$OUT/omniglot/$1-s$2" seed=$2 script=$3
    shift 3
    if [[ -f "$dir/eval.json" && "$FORCE" != 1 ]]; then
        log "skip $dir: eval.json exists (FORCE=1 redoes it)"
        return 0
    fi
    if [[ "$FORCE" == 1 || ! -f "$dir/last.pt" ]]; then
        rm -rf "$dir" && mkdir -p "$dir"
        local cmd=("$script.py" "$@" --seed "$seed" --out "$dir" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"})
        printf '%s\n' "python ${cmd[*]}" "python eval.py $dir/last.pt --baselines cheap" > "$dir/command.txt"
        log "train $dir: python ${cmd[*]}"
        "$PYTHON" "${cmd[@]}" --no-progress 2>&1 | tee -a "$dir/train.log"
    else
        log "resume $dir from its last.pt"
        "$PYTHON" "$script.py" --resume "$dir/last.pt" --no-progress 2>&1 | tee -a "$dir/train.log"
    fi
    "$PYTHON" eval.py "$dir/last.pt" --baselines cheap 2>&1 | tee "$dir/eval.log"
}

for seed in $SEEDS; do
    for script in byol simsiam bn_only; do
        train "$script" "$seed" "$script"
    done
done
for seed in $ABLATION_SEEDS; do
    for ablation in $ABLATIONS; do
        case $ablation in
            no-bn) train bn_only-no-bn "$seed" bn_only --no-bn ;;
            bn-all) train bn_only-bn-all "$seed" bn_only --bn-placement all ;;
            predictor) train bn_only-predictor "$seed" bn_only --predictor ;;
            stop-grad) train bn_only-stop-grad "$seed" bn_only --stop-grad ;;
            joint-bn) train bn_only-joint-bn "$seed" bn_only --bn-stats joint ;;
            simsiam-like) train bn_only-simsiam-like "$seed" bn_only --predictor --stop-grad ;;
            vicreg) train redundancy-vicreg "$seed" redundancy --loss vicreg ;;
            barlow) train redundancy-barlow "$seed" redundancy --loss barlow ;;
            *) log "error: unknown ablation $ablation"; exit 2 ;;
        esac
    done
done
for seed in $LONG_SEEDS; do
    train "byol-e$E_LONG" "$seed" byol --epochs "$E_LONG"
done

log "summarize -> $TABLES and <data>_curves.png beside it"
mkdir -p "$(dirname "$TABLES")" && "$PYTHON" results/summarize.py "$OUT" --plots-dir "$(dirname "$TABLES")" > "$TABLES"
log "done: $TABLES"
