"""The encoder's effective rank (RESULTS.md's collapse diagnostics): of a run's features of its test images.

    python results/encoder_rank.py RUN [RUN ...]   # a run directory (best.pt) or a checkpoint

The features are the encoder's, embedded as eval.py embeds them (the run's --eval-shift), of the 20 official one-shot
runs' 800 images on Omniglot, else of the held-out groups' images; the effective rank is exp of the entropy of the
normalised singular values of the centred features (Roy & Vetterli 2007), as the scripts' collapse() computes it for
the projector.
"""

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ev


def encoder_rank(run):
    mod, ckpt, args, _ = ev.load_run(run)
    model, data = ev.trained_model(mod, ckpt, args), mod.load_data(args)
    rows = data.test_runs if data.test_runs is not None else data.groups[data.test]
    feats = ev.features(
        ev.as_embedding(model, "encoder"), data.images, rows[rows >= 0].unique(), "cpu", args.eval_shift
    )
    p = F.normalize(torch.linalg.svdvals(feats - feats.mean(0)), p=1, dim=0)
    return math.exp(-(p * (p + 1e-12).log()).sum().item()), len(feats)


if __name__ == "__main__":
    for run in sys.argv[1:]:
        rank, n = encoder_rank(run)
        print(f"{run}: encoder effective rank {rank:.1f} over {n} test images")
