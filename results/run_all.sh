#!/usr/bin/env bash
# results/run_all.sh: reproduce every number of RESULTS.md (issue #7).
#
# Usage (from anywhere; relative paths are relative to the repository root):
#     bash results/run_all.sh
#     SEEDS="0 1 2 3 4" THREADS=8 bash results/run_all.sh
#     DATASETS=tll TLL_DIR=~/data/tll-dev E_TLL=20 bash results/run_all.sh
#     FORCE=1 bash results/run_all.sh          # redo runs that already have eval.json
#
# What it runs (each training run followed by `python eval.py RUN_DIR/last.pt --out RUN_DIR`,
# which writes RUN_DIR/eval.json, and `python eval.py --plot RUN_DIR`, which draws RUN_DIR/curves.png):
#   omniglot (embedded data, each script's recipe: what `python byol.py` runs with no argument):
#     byol.py, simsiam.py, bn_only.py                       for each seed in SEEDS
#     bn_only.py ablations (ABLATIONS): --no-bn; --bn-placement all; --predictor;
#                           --stop-grad; --bn-stats joint; --predictor --stop-grad (SimSiam-like,
#                           the sanity row)                    for each seed in ABLATION_SEEDS
#     byol.py --epochs E_LONG (the documented longer recipe) for each seed in LONG_SEEDS
#     eval.py --baseline pixels / random / random-bn, on the split of byol's run of each seed
#   tll (TLL_DIR, with left/ and right/ or left.zip and right.zip; skipped when missing):
#     byol.py, simsiam.py, bn_only.py with --data tll --data-dir TLL_DIR --epochs E_TLL
#                                                            for each seed in TLL_SEEDS
#     eval.py --baseline pixels / random / random-bn, as for omniglot
#   generic (the generic recipes on data laid out the way users have it, at a CPU budget):
#     byol.py --data folder on images_background_small2.zip written out as one folder per character
#       (OUT/generic/small2-folders; 156 classes, 20% of them held out) --epochs E_GENERIC, after its
#       validation: --bn-stats per-view and joint, seeds 0 and 1, on seed 0's 125 training classes
#       (OUT/generic/small2-val-folders)
#     byol.py --data pairs on a CSV of TLL_DIR's left/right pairs (OUT/generic/tll-pairs.csv) --epochs E_GENERIC
#     each against its untrained network (epoch 0 of its log) and eval.py --baseline pixels on its split
#   then: python results/summarize.py OUT > results/tables.md  (and results/<data>_curves.png)
#
# Run directories: OUT/<data>/<row>-s<seed>, rows byol, simsiam, bn_only, bn_only-no-bn,
# bn_only-predictor, bn_only-stop-grad, bn_only-bn-all, bn_only-joint-bn, bn_only-simsiam-like, byol-e<E_LONG>,
# baseline-pixels, baseline-random, baseline-random-bn. A run whose eval.json exists is skipped (so the
# script resumes where it stopped), unless FORCE=1; an unfinished training run with a
# last.pt is continued with --resume (bit-identical on CPU), one without is restarted.
#
# Variables (environment):
#   SEEDS="0 1 2"  ABLATION_SEEDS="0 1 2"  ABLATIONS="no-bn bn-all predictor stop-grad joint-bn simsiam-like"  DATASETS="omniglot tll generic"
#   OUT=results/runs  (a variable set to " " runs none of its rows)
#   LONG_SEEDS="0"  E_LONG=120  TLL_SEEDS="0"
#   TLL_DIR=../shared/data/tll-dev  E_TLL=30  E_GENERIC=5  THREADS=$(nproc)  FORCE=0  PYTHON=python
#   TRAIN_ARGS=""  extra flags for every training run (e.g. "--device cuda"; they become
#                  part of the saved args, so keep them to ones that do not change results)
set -euo pipefail

SEEDS="${SEEDS:-0 1 2}"
ABLATION_SEEDS="${ABLATION_SEEDS:-0 1 2}"
ABLATIONS="${ABLATIONS:-no-bn bn-all predictor stop-grad joint-bn simsiam-like}"
DATASETS="${DATASETS:-omniglot tll generic}"
TLL_DIR="${TLL_DIR:-../shared/data/tll-dev}"
OUT="${OUT:-results/runs}"
E_TLL="${E_TLL:-30}"
E_GENERIC="${E_GENERIC:-5}"
TLL_SEEDS="${TLL_SEEDS:-0}"
LONG_SEEDS="${LONG_SEEDS:-0}"
E_LONG="${E_LONG:-120}"
THREADS="${THREADS:-$(nproc)}"
FORCE="${FORCE:-0}"
PYTHON="${PYTHON:-python}"
TRAIN_ARGS="${TRAIN_ARGS:-}"

cd "$(dirname "$0")/.."  # the repository root: the scripts, and the paths above, are relative to it
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
read -r -a TRAIN_EXTRA <<< "$TRAIN_ARGS"

log() { echo "[run_all $(date +%H:%M:%S)] $*"; }

done_already() {  # RUN_DIR: true (and a note) when its eval.json exists and FORCE is not 1
    if [[ -f "$1/eval.json" && "$FORCE" != 1 ]]; then
        log "skip $1: eval.json exists (FORCE=1 redoes it)"
        return 0
    fi
    return 1
}

# train DATA ROW SEED SCRIPT [FLAGS...]: train into OUT/DATA/ROW-sSEED, then evaluate and plot it.
train() {
    local data=$1 row=$2 seed=$3 script=$4
    shift 4
    local dir="$OUT/$data/$row-s$seed"
    done_already "$dir" && return 0
    if [[ "$FORCE" == 1 || ! -f "$dir/last.pt" ]]; then
        rm -rf "$dir"  # log.jsonl is appended to: a restart must not mix with an old run
        mkdir -p "$dir"
        log "train $dir: $PYTHON $script.py $* --seed $seed --out $dir"
        "$PYTHON" "$script.py" "$@" --seed "$seed" --out "$dir" --workers "$THREADS" --no-progress \
            ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} 2>&1 | tee -a "$dir/train.log"
    else
        log "resume $dir from its last.pt"
        "$PYTHON" "$script.py" --resume "$dir/last.pt" --workers "$THREADS" --no-progress 2>&1 | tee -a "$dir/train.log"
    fi
    log "eval $dir"
    "$PYTHON" eval.py "$dir/last.pt" --out "$dir" --workers "$THREADS" 2>&1 | tee "$dir/eval.log"
    "$PYTHON" eval.py --plot "$dir" || log "note: no curves.png for $dir (matplotlib missing?)"
}

# baseline DATA KIND SEED [ROW]: eval.py --baseline KIND on the data and split of the run ROW (byol) of SEED.
baseline() {
    local data=$1 kind=$2 seed=$3 row=${4:-byol}
    local dir="$OUT/$data/baseline-$kind-$row-s$seed" ckpt="$OUT/$data/$row-s$seed/last.pt"
    [[ "$row" == byol ]] && dir="$OUT/$data/baseline-$kind-s$seed"
    done_already "$dir" && return 0
    if [[ ! -f "$ckpt" ]]; then
        log "skip $dir: it takes its data and split from $ckpt, which does not exist"
        return 0
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    log "baseline $dir: $PYTHON eval.py $ckpt --baseline $kind --out $dir"
    if ! "$PYTHON" eval.py "$ckpt" --baseline "$kind" --out "$dir" --workers "$THREADS" 2>&1 | tee "$dir/eval.log"; then
        log "error: $dir failed"
        return 1
    fi
}

wants() { [[ " $DATASETS " == *" $1 "* ]]; }

log "OUT=$OUT SEEDS='$SEEDS' ABLATION_SEEDS='$ABLATION_SEEDS' LONG_SEEDS='$LONG_SEEDS' E_LONG=$E_LONG TLL_SEEDS='$TLL_SEEDS' E_TLL=$E_TLL DATASETS='$DATASETS' THREADS=$THREADS FORCE=$FORCE"

if wants omniglot; then
    for seed in $SEEDS; do
        for script in byol simsiam bn_only; do
            train omniglot "$script" "$seed" "$script"
        done
    done
    for seed in $ABLATION_SEEDS; do
        for ablation in $ABLATIONS; do
            case $ablation in
                no-bn) train omniglot bn_only-no-bn "$seed" bn_only --no-bn ;;
                bn-all) train omniglot bn_only-bn-all "$seed" bn_only --bn-placement all ;;
                predictor) train omniglot bn_only-predictor "$seed" bn_only --predictor ;;
                stop-grad) train omniglot bn_only-stop-grad "$seed" bn_only --stop-grad ;;
                joint-bn) train omniglot bn_only-joint-bn "$seed" bn_only --bn-stats joint ;;
                simsiam-like) train omniglot bn_only-simsiam-like "$seed" bn_only --predictor --stop-grad ;;
                *) log "error: unknown ablation $ablation (no-bn, bn-all, predictor, stop-grad, joint-bn, simsiam-like)"; exit 2 ;;
            esac
        done
    done
    for seed in $LONG_SEEDS; do
        train omniglot "byol-e$E_LONG" "$seed" byol --epochs "$E_LONG"
    done
    for seed in $SEEDS; do
        baseline omniglot pixels "$seed"
        baseline omniglot random "$seed"
        baseline omniglot random-bn "$seed"
    done
fi

if wants tll; then
    if [[ -d "$TLL_DIR/left" || -f "$TLL_DIR/left.zip" ]]; then
        for seed in $TLL_SEEDS; do
            for script in byol simsiam bn_only; do
                train tll "$script" "$seed" "$script" --data tll --data-dir "$TLL_DIR" --epochs "$E_TLL"
            done
        done
        for seed in $TLL_SEEDS; do
            baseline tll pixels "$seed"
            baseline tll random "$seed"
            baseline tll random-bn "$seed"
        done
    else
        log "SKIPPING the TLL rows: TLL_DIR=$TLL_DIR has neither left/ nor left.zip (set TLL_DIR to the TLL-dev data)"
    fi
fi

if wants generic; then
    folders="$OUT/generic/small2-folders"
    if [[ ! -d "$folders" ]]; then
        log "write data/omniglot/images_background_small2.zip as class folders into $folders"
        "$PYTHON" results/generic.py small2-folders "$folders"
    fi
    # Validation for the folder recipe's choices: its 125 training classes (seed 0's split) as folders of
    # their own, of which the same recipe holds out 25; the 31 test classes are never read.
    val_folders="$OUT/generic/small2-val-folders"
    if [[ ! -d "$val_folders" ]]; then
        log "write the training classes of $folders (seed 0) into $val_folders"
        "$PYTHON" - "$folders" "$val_folders" <<'PY'
import shutil, sys
from pathlib import Path
from byol import split_items
folders, out = Path(sys.argv[1]), Path(sys.argv[2])
classes = sorted(d.name for d in folders.iterdir() if d.is_dir())  # the order of byol.py's load_folder
train, _ = split_items(len(classes), 0.2, 0)
for i in train:
    shutil.copytree(folders / classes[i], out / classes[i])
PY
    fi
    for seed in 0 1; do  # two draws of the 25 validation classes
        for bn_stats in per-view joint; do
            train generic "val-folder-byol-$bn_stats" "$seed" byol --data folder --data-dir "$val_folders" \
                --epochs "$E_GENERIC" --eval-every 1 --bn-stats "$bn_stats"
        done
    done
    train generic folder-byol 0 byol --data folder --data-dir "$folders" --epochs "$E_GENERIC" --eval-every 1
    baseline generic pixels 0 folder-byol
    if [[ -d "$TLL_DIR/left" ]]; then
        csv="$OUT/generic/tll-pairs.csv"
        "$PYTHON" - "$TLL_DIR" "$csv" <<'PY'
import csv, sys
from pathlib import Path
root, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
rows = [[root / "left" / p.name, root / "right" / p.name] for p in sorted((root / "left").iterdir()) if (root / "right" / p.name).exists()]
with out.open("w", newline="") as f:
    csv.writer(f).writerows(rows)
PY
        train generic pairs-byol 0 byol --data pairs --pairs-csv "$csv" --epochs "$E_GENERIC" --eval-every 1
        baseline generic pixels 0 pairs-byol
    else
        log "SKIPPING the generic pairs row: TLL_DIR=$TLL_DIR has no left/ folder"
    fi
fi

log "summarize -> results/tables.md, results/<data>_curves.png"
"$PYTHON" results/summarize.py "$OUT" --plots-dir results > results/tables.md
log "done: results/tables.md"
