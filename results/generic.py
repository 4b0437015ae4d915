"""The generic class-folder recipe on data nobody tuned it on: runs and tables.

The development sets are ../shared/data/dev (notmnist, cifar10, gtsrb, signdigits) and Omniglot's small2 written
out as one folder per character. Every run holds out half of the classes as its test (--holdout 0.5); the recipe
carves its validation classes from the other half. Choices are made on val_r_precision (log.jsonl) only; each run is
then `python eval.py RUN` (best.pt, on the test classes, beside the baselines: RUN/eval.json). Its --freeze-encoder
and --pca-dim configurations and its eval-sizes and interpolate stages ran at commit a716684
(`git show a716684:results/generic.py`); its pretrained stage is now eval.py's baselines (BASELINES below).

    python results/generic.py tune  CONFIG [CONFIG ...] [--seeds 1 2]  # seed 0 (or these), every set, CONFIGS[name]'s flags
    python results/generic.py test  [--seeds 0 1 2]       # the shipped recipe (no flags), every set
    python results/generic.py test-pretrained [--seeds 0 1 2]  # the same with --pretrained (its FINE_TUNE row)
    python results/generic.py table [OUT]                 # per run: validation and test margins over the best baseline
    python results/generic.py seeds [OUT [STAGE ...]]     # a stage's runs over seeds (test, test-pretrained, tune/CONFIG)
    python results/generic.py starts [OUT]                # per test run, each start's validation and which won

Variables: DEV=../shared/data/dev  OUT=results/runs/generic-dev  THREADS=1  JOBS=2  SCRIPT=byol.py  SETS="..."
BASELINES=all (eval.py's: the raw pixels, the untrained network, frozen Lite0 at 224 px, and the same whitened)
EXTRA="--loss triplet" appends flags to every run (e.g. SCRIPT=contrastive.py's triplet loss).
"""

import json
import os
import statistics
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
ENV = {**os.environ, **dict.fromkeys(["OMP_NUM_THREADS", "MKL_NUM_THREADS"], os.environ.get("THREADS", "1"))}

# Candidate recipes, as flags on top of the shipped folder recipe; tuned on validation classes, seed 0.
S32 = "--image-size 32 --width 32 64 128 256 --epochs 30"
CONFIGS = {
    "shipped": "",
    "s32": S32,
    "s32-aug": f"{S32} --pairs aug",
    "s32-c5": f"{S32} --crop-min-scale 0.5",
    "s32-c5-shift": f"{S32} --crop-min-scale 0.5 --eval-shift 2",
    "s32-c5-e60": f"{S32} --crop-min-scale 0.5 --epochs 60",
    "s32-c5-e100": f"{S32} --crop-min-scale 0.5 --epochs 100",
    "s32-c5-j5": f"{S32} --crop-min-scale 0.5 --jitter-strength 0.5 --gray-prob 0",
    # Fine-tuning ImageNet weights at 96 px: the backbone at a tenth of the head's learning rate, its BN statistics kept.
    "ft96": "--arch tf_efficientnet_lite0 --pretrained --image-size 96 --backbone-lr-factor 0.1 --freeze-bn-stats "
    "--crop-min-scale 0.5 --epochs 6 --eval-every 1",
    "s48-c5": f"{S32} --image-size 48 --crop-min-scale 0.5",
    # Each method's own tuning budget on small2: the same two learning rates around the folder recipe's
    # (2e-3: AdamW's 4e-3 per 256 pairs at batch 128). SCRIPT=simsiam.py OUT=... SETS=small2 ... tune lr-half lr-double
    "lr-half": "--lr 1e-3",
    "lr-double": "--lr 4e-3",
    # Fine-tuning on 96 px crops of images decoded (and embedded) at 160 px (--crop-size), FixRes.
    "ft160-c96": "--pretrained --image-size 160 --crop-size 96",
    # The fine-tuned start against forgetting the classes it does not train on: positives that
    # are two augmentations of one image, and a quarter of the learning rate.
    "ft-aug": "--pairs aug",
    "ft-lr-quarter": "--lr 5e-4",
    # One start alone, as the competition trains it: conv4 from scratch (test-pretrained: the fine-tuned start).
    "scratch": "--no-pretrained",
}


def small2_folders():
    """Omniglot's small2 (5 alphabets, 156 characters) as one folder per character, written once (whole, or not at
    all)."""
    out = OUT / "data" / "small2"
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
    """The run and its evaluation ended (RUN.txt's last line)."""
    txt = run.with_suffix(".txt")
    return txt.is_file() and "\nexit 0, wall " in txt.read_text() and (run / "eval.json").is_file()


def train(run, name, flags, seed):
    """Train into RUN, then evaluate its best.pt; RUN.txt holds both commands' output and the training's wall time."""
    if finished(run):
        return
    cmd = [sys.executable, str(ROOT / SCRIPT), "--data", "folder", "--data-dir", str(data_dir(name)), "--out", str(run)]
    cmd += f"--holdout 0.5 --seed {seed} --overwrite --no-progress {flags} {os.environ.get('EXTRA', '')}".split()
    run.parent.mkdir(parents=True, exist_ok=True)
    (run / "eval.json").unlink(missing_ok=True)
    start = time.time()
    with open(run.with_suffix(".txt"), "w") as out:
        out.write("$ " + " ".join(cmd[1:]) + "\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        wall = time.time() - start
        if code == 0:
            cmd = [sys.executable, str(ROOT / "eval.py"), str(run), "--baselines", os.environ.get("BASELINES", "all")]
            code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        out.write(f"exit {code}, wall {wall:.0f} s\n")


def launch(jobs):
    OUT.mkdir(parents=True, exist_ok=True)
    small2_folders()
    with ThreadPoolExecutor(int(os.environ.get("JOBS", "2"))) as pool:
        list(pool.map(lambda job: train(*job), jobs))


def summary(run):
    """{val, val_base, test, test_base, baselines: {name: test}, epoch, wall} of a finished run: validation from its
    log at best.pt's epoch (baseline: the start's or the raw pixels', epoch 0), test from its eval.json. A run where
    the starts competed: the log of the start whose best.pt it kept (the higher best validation; a tie, pretrained)."""
    runs = [run] if (run / "log.jsonl").exists() else [run / "pretrained", run / "no-pretrained"]
    logs = [[json.loads(line) for line in (r / "log.jsonl").read_text().splitlines()] for r in runs]
    log = max(logs, key=lambda log: max(r[log[0]["metric"]] for r in log if r.get(log[0]["metric"]) is not None))
    ev = json.loads((run / "eval.json").read_text())
    name, at = log[0]["metric"], next(r for r in log if r["epoch"] == ev["epoch"])
    base = {k: v["r_precision"] for k, v in ev["results"].items() if not k.startswith("trained")}  # baselines
    wall = run.with_suffix(".txt").read_text().rsplit("wall ", 1)[1].split()[0]
    return {
        "val": at.get(name),
        "val_base": max(log[0][name], log[0][f"pixels_{name}"]),
        "test": ev["results"]["trained"]["r_precision"],
        "chosen": ev.get("chosen", "trained"),  # eval.py's choice on validation: what the run ships
        "shipped": ev["results"][ev.get("chosen", "trained")]["r_precision"],
        "test_base": max(base.values(), default=None),
        "baselines": base,
        "epoch": ev["epoch"],
        "wall": float(wall),
    }


def seeds_table(out, stage):
    """Mean ± std over a stage's seeds, per set: trained (best.pt, chosen on validation), the embedding eval.py chose
    on validation among the trained and the frozen ones (what the run ships), beside each baseline."""
    ms = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    runs = {name: [summary(r) for r in sorted(Path(out, stage).glob(f"s*-{name}")) if finished(r)] for name in SETS}
    names = list(dict.fromkeys(k for rows in runs.values() for r in rows for k in r["baselines"]))
    short = [k.replace("tf_efficientnet_lite0", "Lite0") for k in names]
    print(f"| set | seeds | trained | shipped | {' | '.join(short)} | shipped − best baseline | chosen | wall s |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * (len(names) + 1) + " --- | ---: |")
    for name, rows in runs.items():
        if rows:
            cells = [
                ms(values) if (values := [r["baselines"][k] for r in rows if k in r["baselines"]]) else "–"
                for k in names
            ]
            print(
                f"| {name} | {len(rows)} | {ms([r['test'] for r in rows])} | {ms([r['shipped'] for r in rows])} "
                f"| {' | '.join(cells)} | {ms([r['shipped'] - r['test_base'] for r in rows])} "
                f"| {'; '.join(r['chosen'].replace('tf_efficientnet_lite0', 'Lite0') for r in rows)} | {statistics.mean(r['wall'] for r in rows):.0f} |"
            )


def starts_table(out):
    """Per set and seed, the competition inside each test run: the best validation score of each start's run
    (RUN/pretrained, RUN/no-pretrained), the one whose best.pt became RUN/best.pt, and what eval.py then shipped."""
    print("| set | seed | fine-tuned Lite0: validation | conv4 from scratch: validation | best.pt | eval.py ships (test) |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for run in sorted(Path(out, "test").glob("s*-*")):
        if run.suffix or not finished(run):
            continue
        best = {}
        for start in ("pretrained", "no-pretrained"):
            records = [json.loads(line) for line in (run / start / "log.jsonl").read_text().splitlines()]
            best[start] = max(r["val_r_precision"] for r in records if r.get("val_r_precision") is not None)
        ev, (seed, name) = json.loads((run / "eval.json").read_text()), run.name.split("-", 1)
        won = "fine-tuned" if best["pretrained"] >= best["no-pretrained"] else "from scratch"
        shipped = ev["chosen"].replace("tf_efficientnet_lite0", "Lite0")
        print(
            f"| {name} | {seed[1:]} | {best['pretrained']:.3f} | {best['no-pretrained']:.3f} | {won} "
            f"| {shipped} ({ev['results'][ev['chosen']]['r_precision']:.3f}) |"
        )


def table(out):
    """Every finished run, then each configuration's validation margin per set and on average (what chose)."""
    print("| run | set | val | val baseline | val margin | test | test baseline | test margin | epoch | wall s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    margins = {}
    for run in sorted(p.parent / p.stem for p in Path(out).glob("**/*.txt")):
        if not finished(run):
            continue
        s, (tag, name) = summary(run), (run.parent.name, run.name)
        fmt = lambda v: "–" if v is None else f"{v:.3f}"
        margin = lambda a, b: "–" if a is None or b is None else f"{a - b:+.3f}"
        config, data = name.rsplit("-", 1)
        if s["val"] is not None:
            margins.setdefault(f"{tag}/{config}", {})[data] = s["val"] - s["val_base"]
        print(
            f"| {tag}/{config} | {data} | {fmt(s['val'])} | {fmt(s['val_base'])} | {margin(s['val'], s['val_base'])} "
            f"| {fmt(s['test'])} | {fmt(s['test_base'])} | {margin(s['test'], s['test_base'])} | {s['epoch']} "
            f"| {s['wall']:.0f} |"
        )
    print("\n| configuration | " + " | ".join(SETS) + " | mean |")
    print("| --- |" + " ---: |" * (len(SETS) + 1))
    for tag, by_set in margins.items():
        cells = [f"{by_set[n]:+.3f}" if n in by_set else "–" for n in SETS]
        mean = f"{sum(by_set.values()) / len(by_set):+.3f}" if len(by_set) == len(SETS) else "–"
        print(f"| {tag} | " + " | ".join(cells) + f" | {mean} |")


if __name__ == "__main__":
    stage, rest = sys.argv[1], sys.argv[2:]
    seeds = [int(s) for s in rest[rest.index("--seeds") + 1 :]] if "--seeds" in rest else None
    rest = rest[: rest.index("--seeds")] if "--seeds" in rest else rest
    if stage == "tune":  # seed 0 chooses; --seeds 1 2 then runs the chosen configuration's other seeds
        launch(
            [
                (OUT / "tune" / config / f"s{seed}-{name}", name, CONFIGS[config], seed)
                for config in rest
                for seed in seeds or [0]
                for name in SETS
            ]
        )
    elif stage in ("test", "test-pretrained"):
        flags = "--pretrained" if stage == "test-pretrained" else ""
        launch([(OUT / stage / f"s{seed}-{name}", name, flags, seed) for seed in seeds or [0, 1, 2] for name in SETS])
    elif stage == "seeds":
        for which in rest[1:] or ("test", "test-pretrained"):
            print(f"\n{which}:\n")
            seeds_table(rest[0] if rest else OUT, which)
    elif stage == "table":
        table(rest[0] if rest else OUT)
    elif stage == "starts":
        starts_table(rest[0] if rest else OUT)
    else:
        sys.exit(f"results/generic.py: unknown stage {stage}; use tune, test, test-pretrained, seeds, starts or table")
