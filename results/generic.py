"""The generic class-folder recipe on data nobody tuned it on (issue #28): runs and tables.

The development sets are ../shared/data/dev (notmnist, cifar10, gtsrb, signdigits) and Omniglot's small2 written
out as one folder per character. Every run holds out half of the classes as its test (--holdout 0.5); the recipe
carves its validation classes from the other half. Choices are made on val_r_precision only.

    python results/generic.py tune  CONFIG [CONFIG ...] [--seeds 1 2]  # seed 0 (or these), every set, CONFIGS[name]'s flags
    python results/generic.py test  [--seeds 0 1 2]       # the shipped recipe (no flags), every set
    python results/generic.py test-pretrained [--seeds 0 1 2]  # the same with --pretrained (its FINE_TUNE row)
    python results/generic.py pretrained [--seeds 0 1 2]  # frozen ImageNet features (Lite0, 224 px) on each test split
    python results/generic.py table [OUT]                 # per run: validation and test margins over the best baseline
    python results/generic.py seeds [OUT [STAGE ...]]     # a stage's runs over seeds (test, test-pretrained, tune/CONFIG)
    python results/generic.py eval-sizes RUN [RUN ...]    # best.pt embedded at 96, 128, 160 and 224 px
    python results/generic.py interpolate RUN [RUN ...]   # last.pt moved back toward its start (WiSE-FT), 5 steps

Variables: DEV=../shared/data/dev  OUT=results/runs/generic-dev  THREADS=1  JOBS=2  SCRIPT=byol.py  SETS="..."
EXTRA="--loss triplet" appends flags to every run (e.g. SCRIPT=contrastive.py's triplet loss).
"""

import json
import os
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV = Path(os.environ.get("DEV", ROOT.parent / "shared" / "data" / "dev"))
OUT = Path(os.environ.get("OUT", ROOT / "results" / "runs" / "generic-dev"))
SETS = os.environ.get("SETS", "notmnist cifar10 gtsrb signdigits small2").split()
SCRIPT = os.environ.get("SCRIPT", "byol.py")

# Candidate recipes, as flags on top of the shipped folder recipe; tuned on validation classes, seed 0.
CONFIGS = {
    "shipped": [],
    "s32": ["--image-size", "32", "--width", "32,64,128,256", "--epochs", "30"],
    "s32-aug": ["--image-size", "32", "--width", "32,64,128,256", "--epochs", "30", "--pairs", "aug"],
    "s32-c5": ["--image-size", "32", "--width", "32,64,128,256", "--epochs", "30", "--crop-min-scale", "0.5"],
    "s32-c5-shift": ["--image-size", "32", "--width", "32,64,128,256", "--epochs", "30", "--crop-min-scale", "0.5",
                     "--eval-shift", "2"],
    "s32-c5-e60": ["--image-size", "32", "--width", "32,64,128,256", "--epochs", "60", "--crop-min-scale", "0.5"],
    "s32-c5-e100": ["--image-size", "32", "--width", "32,64,128,256", "--epochs", "100", "--crop-min-scale", "0.5"],
    "s32-c5-j5": ["--image-size", "32", "--width", "32,64,128,256", "--epochs", "30", "--crop-min-scale", "0.5",
                  "--jitter-strength", "0.5", "--gray-prob", "0"],
    # Fine-tuning ImageNet weights at 96 px: the backbone at a tenth of the head's learning rate, its BN statistics kept.
    "ft96": ["--arch", "tf_efficientnet_lite0", "--pretrained", "--image-size", "96", "--backbone-lr-factor", "0.1",
             "--freeze-bn-stats", "--crop-min-scale", "0.5", "--epochs", "6", "--eval-every", "1"],
    "s48-c5": ["--image-size", "48", "--width", "32,64,128,256", "--epochs", "30", "--crop-min-scale", "0.5"],
    # Each method's own tuning budget on small2 (issue #29): the same two learning rates around the folder recipe's
    # (2e-3: AdamW's 4e-3 per 256 pairs at batch 128). SCRIPT=simsiam.py OUT=... SETS=small2 ... tune lr-half lr-double
    "lr-half": ["--lr", "1e-3"],
    "lr-double": ["--lr", "4e-3"],
    # Fine-tuning on 96 px crops of images decoded (and embedded) at 160 px (--crop-size): the fine-tuned networks of
    # test-pretrained, embedded at 128 / 160 / 224 px, gained on signdigits' validation classes (FixRes).
    "ft160-c96": ["--pretrained", "--image-size", "160", "--crop-size", "96"],
    # The colour default (fine-tuning) against forgetting the classes it does not train on (issue #28): positives that
    # are two augmentations of one image, and a quarter of the learning rate.
    "ft-aug": ["--pairs", "aug"],
    "ft-lr-quarter": ["--lr", "5e-4"],
    # Frozen ImageNet features at 224 px (plain, PCA-whitened on the training images, with the last 3 stages pooled),
    # each with a BYOL head trained on class pairs of them; epoch 0's baseline_frozen_* is the features themselves.
    "frozen224": ["--pretrained", "--freeze-encoder", "--image-size", "224", "--epochs", "30"],
    "frozen224-pca256": ["--pretrained", "--freeze-encoder", "--image-size", "224", "--epochs", "30", "--pca-dim", "256"],
    "frozen224-pool3-pca256": ["--pretrained", "--freeze-encoder", "--image-size", "224", "--epochs", "30", "--pca-dim", "256",
                               "--pool-stages", "3"],
}


def small2_folders(out=None):
    """Omniglot's small2 (5 alphabets, 156 characters) as one folder per character, written once (whole, or not at
    all); results/run_all.sh writes its copy through `python results/generic.py small2-folders DIR`."""
    out = Path(out) if out is not None else OUT / "data" / "small2"
    if not out.is_dir():
        tmp = out.with_suffix(".tmp")
        with zipfile.ZipFile(ROOT / "data" / "omniglot" / "images_background_small2.zip") as zf:
            for name in zf.namelist():
                if name.endswith(".png"):  # images_background_small2/<alphabet>/<character>/<drawing>.png
                    _, alphabet, character, drawing = name.split("/")
                    (tmp / f"{alphabet}_{character}").mkdir(parents=True, exist_ok=True)
                    (tmp / f"{alphabet}_{character}" / drawing).write_bytes(zf.read(name))
        tmp.rename(out)
    return out


def data_dir(name):
    return small2_folders() if name == "small2" else DEV / name


def finished(run):
    """A run ended: its summary line was printed (last epoch, or stopped early)."""
    txt = run.with_suffix(".txt")
    return txt.is_file() and "run directory:" in txt.read_text()


def train(run, name, flags, seed):
    if finished(run):
        return
    cmd = [sys.executable, str(ROOT / SCRIPT), "--data", "folder", "--data-dir", str(data_dir(name)), "--holdout", "0.5",
           "--seed", str(seed), "--out", str(run), "--overwrite", "--no-progress", *flags, *os.environ.get("EXTRA", "").split()]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("THREADS", "1"), "MKL_NUM_THREADS": os.environ.get("THREADS", "1")}
    run.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run.with_suffix(".txt"), "w") as out:
        out.write("$ " + " ".join(cmd[1:]) + "\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        out.write(f"exit {code}, wall {time.time() - start:.0f} s\n")


def launch(jobs):
    OUT.mkdir(parents=True, exist_ok=True)
    small2_folders()
    with ThreadPoolExecutor(int(os.environ.get("JOBS", "2"))) as pool:
        list(pool.map(lambda job: train(*job), jobs))


def summary(run):
    """(best validation, its baselines' best, test at best.pt, the test baselines' best, epochs, wall s), from the log."""
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    first, evals = log[0], [r for r in log[1:] if "r_precision" in r]
    best_of = lambda key: max(v for k, v in first.items() if k.startswith("baseline_") and k.split("_", 2)[2] == key)
    chosen = max(evals, key=lambda r: r.get("val_r_precision", r["r_precision"])) if evals else first
    # The start competes for best.pt (since the twelfth session; a run logged before then is scored the same way).
    if "val_r_precision" in first and chosen["val_r_precision"] <= first["val_r_precision"]:
        chosen = first
    text = run.with_suffix(".txt").read_text()
    wall = text.rsplit("wall ", 1)[-1].split()[0] if "\nexit " in text else None  # None: its driver was stopped first
    return (chosen.get("val_r_precision"), best_of("val_r_precision") if "val_r_precision" in first else None,
            chosen["r_precision"], best_of("r_precision"), chosen["epoch"], wall)


def pretrained(name, seed):
    """eval.py --baseline pretrained on a set's test split: the frozen features a user could take off the shelf."""
    out = OUT / "pretrained" / f"{name}-224-s{seed}"
    if (out / "eval.json").is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "eval.py"), "--baseline", "pretrained", "--arch", "tf_efficientnet_lite0", "--data", "folder",
           "--data-dir", str(data_dir(name)), "--holdout", "0.5", "--seed", str(seed), "--image-size", "224", "--no-pictures",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("THREADS", "1"), "MKL_NUM_THREADS": os.environ.get("THREADS", "1")}
    with open(out.with_suffix(".txt"), "w") as log:
        log.write("$ " + " ".join(cmd[1:]) + "\n")
        log.flush()
        subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def seeds_table(out, stage):
    """Mean ± std over the test runs' seeds, per set: trained (best.pt, chosen on validation) beside each baseline
    (with --pretrained, the untrained column is the frozen pretrained features at the run's size)."""
    import statistics
    print("| set | seeds | trained | untrained | raw pixels | pretrained (Lite0, 224 px) | trained − best baseline | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ms = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    for name in SETS:
        rows = []
        for run in sorted(Path(out, stage).glob(f"s*-{name}")):
            if not finished(run):
                continue
            seed = int(run.name.split("-")[0][1:])
            first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
            _, _, test, _, _, wall = summary(run)
            pre = Path(out, "pretrained", f"{name}-224-s{seed}", "eval.json")
            pre = json.loads(pre.read_text())["metrics"]["metric_learning"]["r_precision"] if pre.is_file() else None
            start = first.get("baseline_pretrained_r_precision", first.get("baseline_untrained_r_precision"))
            base = [start, first["baseline_pixels_r_precision"], *([pre] if pre else [])]
            rows.append((test, base[0], base[1], pre, test - max(base), None if wall is None else float(wall)))
        if rows:
            col = lambda i, rows=rows: [r[i] for r in rows if r[i] is not None]
            print(f"| {name} | {len(rows)} | {ms(col(0))} | {ms(col(1))} | {ms(col(2))} | {ms(col(3)) if col(3) else '–'} "
                  f"| {ms(col(4))} | {f'{statistics.mean(col(5)):.0f}' if col(5) else '–'} |")


def table(out):
    """Every finished run, then each configuration's validation margin per set and on average (what chose)."""
    print("| run | set | val | val baseline | val margin | test | test baseline | test margin | epoch | wall s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    margins = {}
    for run in sorted(p.parent / p.stem for p in Path(out).glob("**/*.txt") if (p.parent / p.stem / "log.jsonl").is_file()):
        if not finished(run):
            continue
        val, val_base, test, test_base, epoch, wall = summary(run)
        fmt = lambda v: "–" if v is None else f"{v:.3f}"
        margin = lambda a, b: "–" if a is None or b is None else f"{a - b:+.3f}"
        tag, name = run.parent.name, run.name
        if val is not None and val_base is not None:
            margins.setdefault(f"{tag}/{name.rsplit('-', 1)[0]}", {})[name.rsplit("-", 1)[1]] = val - val_base
        print(f"| {tag}/{name.rsplit('-', 1)[0]} | {name.rsplit('-', 1)[1]} | {fmt(val)} | {fmt(val_base)} | {margin(val, val_base)} "
              f"| {fmt(test)} | {fmt(test_base)} | {margin(test, test_base)} | {epoch} | {wall} |")
    print("\n| configuration | " + " | ".join(SETS) + " | mean |")
    print("| --- |" + " ---: |" * (len(SETS) + 1))
    for tag, by_set in margins.items():
        cells = [f"{by_set[n]:+.3f}" if n in by_set else "–" for n in SETS]
        mean = f"{sum(by_set.values()) / len(by_set):+.3f}" if len(by_set) == len(SETS) else "–"
        print(f"| {tag} | " + " | ".join(cells) + f" | {mean} |")


def load_run(run, checkpoint):
    """(script module, checkpoint, args, eval-mode model) of RUN/checkpoint, as eval.py loads it, decoding on 1 thread."""
    sys.path.insert(0, str(ROOT))
    import eval as ev

    mod, ckpt, args, model = ev.load_model(Path(run) / checkpoint)
    args.workers = 1
    return mod, ckpt, args, model


def val_and_test(mod, model, data, args):
    import torch

    m = mod.evaluate(model, data, torch.device("cpu"), shift=args.eval_shift)
    return f"val {m['val_r_precision']:.3f} test {m['r_precision']:.3f}"


def eval_sizes(runs, sizes=(96, 128, 160, 224)):
    """Validation and test R-Precision of each run's best.pt with its images decoded (and so embedded) at each size."""
    for run in runs:
        mod, ckpt, args, model = load_run(run, "best.pt")
        cells = []
        for size in sizes:
            args.image_size = size
            cells.append(f"{size} px: {val_and_test(mod, model, mod.load_data(args), args)}")
        print(f"{run} (best.pt: epoch {ckpt['epoch']}) " + " | ".join(cells), flush=True)


def interpolate(runs, alphas=(0.0, 0.25, 0.5, 0.75, 1.0)):
    """WiSE-FT (Wortsman et al. 2022): each fine-tuned run's last.pt, its weights moved back toward its start (the
    pretrained weights) as start + alpha (last - start); validation and test R-Precision of each alpha."""
    import argparse

    for run in runs:
        mod, ckpt, args, model = load_run(run, "last.pt")
        start = mod.build_model(argparse.Namespace(**{**vars(args), "pretrained": True})).state_dict()  # load_model drops it
        end, data, cells = ckpt["model"], mod.load_data(args), []
        for alpha in alphas:
            model.load_state_dict({k: v + alpha * (end[k] - v) if v.is_floating_point() else end[k] for k, v in start.items()})
            cells.append(f"{alpha}: {val_and_test(mod, model, data, args)}")
        print(f"{run} (last.pt: epoch {ckpt['epoch']}) " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    stage, rest = sys.argv[1], sys.argv[2:]
    seeds = [int(s) for s in rest[rest.index("--seeds") + 1:]] if "--seeds" in rest else None
    rest = rest[:rest.index("--seeds")] if "--seeds" in rest else rest
    if stage == "tune":  # seed 0 chooses; --seeds 1 2 then runs the chosen configuration's other seeds
        launch([(OUT / "tune" / config / f"s{seed}-{name}", name, CONFIGS[config], seed)
                for config in rest for seed in seeds or [0] for name in SETS])
    elif stage in ("test", "test-pretrained"):
        seeds = seeds or [0, 1, 2]
        flags = ["--pretrained"] if stage == "test-pretrained" else []
        launch([(OUT / stage / f"s{seed}-{name}", name, flags, seed) for seed in seeds for name in SETS])
    elif stage == "pretrained":
        seeds = seeds or [0, 1, 2]
        OUT.mkdir(parents=True, exist_ok=True)
        small2_folders()
        with ThreadPoolExecutor(int(os.environ.get("JOBS", "2"))) as pool:
            list(pool.map(lambda job: pretrained(*job), [(name, seed) for seed in seeds for name in SETS]))
    elif stage == "seeds":
        for which in rest[1:] or ("test", "test-pretrained"):
            print(f"\n{which}:\n")
            seeds_table(rest[0] if rest else OUT, which)
    elif stage == "small2-folders":
        small2_folders(rest[0])
    elif stage == "table":
        table(rest[0] if rest else OUT)
    elif stage == "eval-sizes":
        eval_sizes(rest)
    elif stage == "interpolate":
        interpolate(rest)
    else:
        sys.exit(f"results/generic.py: unknown stage {stage}; use tune, test, test-pretrained, pretrained, seeds, table, small2-folders, eval-sizes or interpolate")
