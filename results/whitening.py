"""Learned whitening's dimensions and shrinkage, chosen on validation data only (RESULTS.md, "what was tuned on what").

Frozen Lite0 features at 224 px of seed 0's training images, whitened by eval.py's fit_whitening (PCA) and
fit_pair_whitening (learned from the training pairs or classes), scored on the run's validation data as the scripts
score it: Omniglot's one-shot episodes, TLL-dev's validation pairs (R@1), small2's validation classes (R-Precision).

    python results/whitening.py tll        # ../shared/data/tll-dev (TLL=...)
    python results/whitening.py omniglot   # the embedded Omniglot
    python results/whitening.py small2     # small2 as class folders (SMALL2=..., written by results/generic.py)
    python results/whitening.py DIR        # any class folder, half of its classes held out as generic.py does
"""

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import byol
import eval as ev

FLAGS = {
    "tll": ["--data", "tll", "--data-dir", os.environ.get("TLL", str(ROOT.parent / "shared/data/tll-dev"))],
    "omniglot": [],
    "small2": [
        "--data",
        "folder",
        "--holdout",
        "0.5",
        "--data-dir",
        os.environ.get("SMALL2", str(ROOT / "results/runs/generic-dev/data/small2")),
    ],
}


def main(name):
    flags = FLAGS.get(name, ["--data", "folder", "--holdout", "0.5", "--data-dir", name])
    args = byol.parse_args([*flags, "--image-size", "224"])  # seed 0's split, the images at Lite0's size
    args.eval_shift = 0
    data, model = byol.load_data(args), ev.Embedding(ev.pretrained_encoder(ev.LITE0)[0])
    rows = data.groups[data.train].clone()
    images, rows[rows >= 0] = torch.unique(rows[rows >= 0], return_inverse=True)
    feats, pairs = ev.features(model, data.images, images, "cpu"), ev.positive_pairs(rows)

    def val(whiten):
        embedding = ev.Embedding(torch.nn.Sequential(model.encoder, whiten)) if whiten else model
        return byol.score(embedding, data, "val", args, "cpu")[1]

    metric = byol.score(model, data, "val", args, "cpu")[0]
    print(f"{name}: {len(images)} training images, {len(pairs)} pairs; {metric}")
    print(f"{name} plain {val(None):.4f}")
    for dims in (128, 256, 512):
        print(f"{name} pca {dims} {val(ev.Whiten(*ev.fit_whitening(feats, dims))):.4f}")
        for shrinkage in (0.0, 0.1, 0.3, 0.5, 0.8):
            learned = ev.Whiten(*ev.fit_pair_whitening(feats, pairs, dims, shrinkage))
            print(f"{name} learned {dims} {shrinkage} {val(learned):.4f}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    main(sys.argv[1] if len(sys.argv) > 1 else "tll")
