#!/usr/bin/env bash
# results/negatives.sh: positives only against negatives on the embedded Omniglot (issue #29), every run the
# omniglot recipe of its script (45 epochs; 35 for SimSiam), so that the loss is what differs.
#
# Usage (from anywhere; paths are relative to the repository root):
#     bash results/negatives.sh tune         # contrastive.py's temperature and margin, on the validation episodes
#     bash results/negatives.sh compare      # every method, and the false-negative sweep (--per-group K)
#     SEEDS="0 1 2" bash results/negatives.sh compare
#     bash results/negatives.sh compositional  # pairs that share the character or the colour (results/compositional.py)
#     python results/negatives.py OUT        # the tables, from the runs' logs
#
# tune: contrastive.py --temperature T (ntxent) and --margin M (triplet, batch-hard), seed 0; chosen on
#   val_one_shot (alphabets of small2 that training never sees), never on the 20 official test runs.
# compare: for each seed in SEEDS, the rows in ROWS:
#     ntxent, ntxent-labels (--negatives labels), triplet (batch-hard), triplet-semi-hard: contrastive.py;
#     vicreg, barlow: redundancy.py --loss vicreg|barlow;
#     byol, simsiam, bn_only: their scripts' own recipes (run_all.sh runs them too, into results/runs/omniglot:
#     the same recipe and code path, so they are not in ROWS by default);
#   then for each seed in FN_SEEDS, false negatives: --per-group K for K in KS (K drawings of each character per
#   batch: K - 1 other pairs of its character, 2(K - 1) images that in-batch negatives push away) for the rows
#   in FN_ROWS. On Omniglot K=1, 2 and 4 keep 21 steps an epoch; K=8 trains 16 of each character's 20 drawings an
#   epoch (17 steps).
# compositional, for each seed in SEEDS: results/compositional.py make OUT/compositional/data (once), then the rows
#   in COMP_ROWS with --data pairs on its train.csv and its flags, then its score table
#   (OUT/compositional/scores-s<seed>.md).
# Run directories: OUT/<row>[-k<K>]-s<seed> (tuning: OUT/tune/<row>-s0), each with the eval.json of its last.pt, and
# its console output and wall time in OUT/...-s<seed>.txt. A run that finished is skipped, so the script resumes.
#
# Variables: SEEDS="0"  ROWS="ntxent ntxent-labels triplet triplet-semi-hard"  FN_SEEDS="$SEEDS"  KS="1 2 4 8"
#            FN_ROWS="byol ntxent ntxent-labels triplet"  COMP_ROWS="byol simsiam bn_only ntxent triplet vicreg barlow"
#            OUT=results/runs/negatives
#            THREADS=1  JOBS=2 (runs side by side, each on THREADS threads)  PYTHON=python
set -euo pipefail

STAGE="${1:?usage: bash results/negatives.sh tune|compare|compositional}"
SEEDS="${SEEDS:-0}"
ROWS="${ROWS:-ntxent ntxent-labels triplet triplet-semi-hard}"
FN_SEEDS="${FN_SEEDS:-$SEEDS}"
KS="${KS:-1 2 4 8}"
FN_ROWS="${FN_ROWS:-byol ntxent ntxent-labels triplet}"
COMP_ROWS="${COMP_ROWS:-byol simsiam bn_only ntxent triplet vicreg barlow}"
OUT="${OUT:-results/runs/negatives}"
THREADS="${THREADS:-1}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python}"

cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

# row_cmd ROW: the script and flags of a row
row_cmd() {
    case "$1" in
        byol | simsiam | bn_only) echo "$1.py" ;;
        ntxent) echo "contrastive.py --loss ntxent" ;;
        ntxent-labels) echo "contrastive.py --loss ntxent --negatives labels" ;;
        triplet) echo "contrastive.py --loss triplet --mining batch-hard" ;;
        triplet-semi-hard) echo "contrastive.py --loss triplet --mining semi-hard" ;;
        vicreg | barlow) echo "redundancy.py --loss $1" ;;
        *) echo "negatives.sh: unknown row $1" >&2; return 1 ;;
    esac
}

# run DIR SCRIPT FLAGS...: train into DIR, then `eval.py DIR/last.pt` (the last epoch: DIR/eval.json), unless an
# earlier call finished both; the console output and the training's wall time go to DIR.txt
run() {
    local dir=$1
    shift
    if [[ -f "$dir/eval.json" && -f "$dir.txt" ]] && grep -q "^wall_s" "$dir.txt"; then
        echo "skip $dir: finished"
        return 0
    fi
    mkdir -p "$(dirname "$dir")"
    rm -f "$dir/eval.json"
    echo "[$(date +%H:%M:%S)] $* --out $dir"
    # shellcheck disable=SC2068
    /usr/bin/time -f "wall_s %e" "$PYTHON" $@ --out "$dir" --overwrite --no-progress > "$dir.txt" 2>&1 \
        && "$PYTHON" eval.py "$dir/last.pt" --baselines none >> "$dir.txt" 2>&1 || true
    tail -n 2 "$dir.txt"
}

jobs_file=$(mktemp)
trap 'rm -f "$jobs_file"' EXIT
queue() { echo "$*" >> "$jobs_file"; }

case "$STAGE" in
    tune)
        for t in 0.05 0.1 0.2 0.5; do queue run "$OUT/tune/ntxent-t$t-s0" contrastive.py --loss ntxent --temperature "$t" --seed 0; done
        for m in 0.1 0.2 0.4; do queue run "$OUT/tune/triplet-m$m-s0" contrastive.py --loss triplet --margin "$m" --seed 0; done
        ;;
    compare)
        for seed in $SEEDS; do
            for row in $ROWS; do
                queue run "$OUT/$row-s$seed" "$(row_cmd "$row")" --seed "$seed"
            done
        done
        for seed in $FN_SEEDS; do
            for k in $KS; do
                for row in $FN_ROWS; do
                    queue run "$OUT/$row-k$k-s$seed" "$(row_cmd "$row")" --per-group "$k" --seed "$seed"
                done
            done
        done
        ;;
    compositional)
        data="$OUT/compositional/data"
        [[ -d "$data" ]] || "$PYTHON" results/compositional.py make "$data"  # written whole, or not at all
        read -r -a comp_flags <<< "$("$PYTHON" results/compositional.py flags)"
        for seed in $SEEDS; do
            for row in $COMP_ROWS; do
                queue run "$OUT/compositional/$row-s$seed" "$(row_cmd "$row")" --data pairs --pairs-csv "$data/train.csv" "${comp_flags[*]}" --seed "$seed"
            done
        done
        ;;
    *) echo "negatives.sh: unknown stage $STAGE (tune, compare or compositional)" >&2; exit 2 ;;
esac

export -f run
export PYTHON
# JOBS runs side by side: each line of the queue is one `run` call.
xargs -P "$JOBS" -I{} bash -c '{}' < "$jobs_file"

if [[ "$STAGE" == compositional ]]; then
    for seed in $SEEDS; do
        runs=()
        for row in byol simsiam bn_only ntxent triplet vicreg barlow; do
            [[ -d "$OUT/compositional/$row-s$seed" ]] && runs+=("$OUT/compositional/$row-s$seed")
        done
        for which in best last; do
            "$PYTHON" results/compositional.py score "$OUT/compositional/data" "${runs[@]}" --checkpoint "$which" \
                | tee "$OUT/compositional/scores-$which-s$seed.md"
        done
    done
fi
