"""Does validation carry signal on a small folder? Each run's start and its best.pt, scored on the run's validation
classes (or pairs) alone, as the scripts scored them before, and among up to 1024 training images as distractors, as
they score them now, beside the test that chose nothing; then best.pt's features plain and whitened as eval.py
whitens them, both ways (RESULTS.md, "A user's own images").

    python results/validation.py RUN [RUN ...]   # run directories of the training scripts (their best.pt)

The start is rebuilt as train() builds it (the run's seed, then build_model: ImageNet weights where the run
fine-tuned them). A protocol carries signal when it orders the start and best.pt as the test does, and does not
saturate: a score of 1.000 cannot tell a better epoch from a worse one.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ev


def protocols(run):
    mod, ckpt, args, _ = ev.load_run(run)
    data = mod.load_data(args)
    torch.manual_seed(args.seed)  # as train() seeds, then builds
    models = {"start": mod.build_model(args), "best.pt": ev.trained_model(mod, ckpt, args)}
    trained = ev.Embedding(ev.Remembered(models["best.pt"].encoder))
    models.update({f"best.pt, {k}": m for k, m in ev.whitened(trained, data, "cpu", args.eval_shift).items()})
    row = {}
    for name, model in models.items():
        row[name] = {
            "alone": mod.score(model, data, "val", args, "cpu", distractors=0)[1],
            "among training images": mod.score(model, data, "val", args, "cpu")[1],
            "test": next(iter(ev.measure(ev.as_embedding(model, "encoder"), data, args, "cpu").values())),
        }
    return row, len(data.val), ckpt["epoch"]


if __name__ == "__main__":
    print(
        "| run | validation groups | best.pt epoch | alone: start, best.pt | among training images: start, best.pt "
        "| test: start, best.pt |"
    )
    print("| --- | ---: | ---: | --- | --- | --- |")
    whitening = []
    for run in sys.argv[1:]:
        row, groups, epoch = protocols(run)
        cells = [f"{row['start'][k]:.3f}, {row['best.pt'][k]:.3f}" for k in ("alone", "among training images", "test")]
        print(f"| {Path(run).name} | {groups} | {epoch} | " + " | ".join(cells) + " |")
        whitening += [(Path(run).name, name, r) for name, r in row.items() if name.startswith("best.pt")]
    print("\n| run | best.pt's features | alone | among training images | test |\n| --- | --- | ---: | ---: | ---: |")
    for run, name, r in whitening:
        print(
            f"| {run} | {name[9:] or 'plain'} | {r['alone']:.3f} | {r['among training images']:.3f} | {r['test']:.3f} |"
        )
