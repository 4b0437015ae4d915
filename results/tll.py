"""TLL photo pairs from a pretrained backbone on 2 CPU cores (issue #27): validation runs, the default over seeds, tables.

Every run is `python SCRIPT --data tll --data-dir TLL --seed S --out RUN` plus a configuration's flags: the recipe holds
out a fifth of the pairs as the test (--holdout 0.2) and carves its validation pairs (a fifth) from the rest.
Configurations are chosen on val_recall@1 of seed 0 (log.jsonl); the test pairs choose nothing. Its frozen-head,
pretrained-at-96-px, whiten and phases stages ran at commit a716684 (`git show a716684:results/tll.py`).

    python results/tll.py validate CONFIG [CONFIG ...] [--seeds 0 1 2] [--scripts byol simsiam ...]   # seed 0 unless told
    python results/tll.py test [--seeds 0 1 2] [--scripts byol simsiam bn_only contrastive]   # the shipped default
    python results/tll.py eval        # `eval.py RUN --baselines all` (best.pt, frozen Lite0 224 px) of each test run
    python results/tll.py table       # every run: validation at the start and at best.pt, and its test when evaluated
    python results/tll.py seeds       # the test runs over seeds beside the frozen Lite0 features on the same pairs

Variables: TLL=../shared/data/tll-dev  OUT=results/runs/tll-cpu  THREADS=1  JOBS=2; for test and validate,
EXTRA="--loss triplet" appends flags to every run and TAG=-triplet names them (contrastive-triplet-s0, ...).
"""

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TLL = Path(os.environ.get("TLL", ROOT.parent / "shared" / "data" / "tll-dev"))
OUT = Path(os.environ.get("OUT", ROOT / "results" / "runs" / "tll-cpu"))
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("THREADS", "1")}
FROZEN = "frozen tf_efficientnet_lite0 224px"  # eval.py's name of the pretrained baseline
# Candidates on seed 0, each a full set of flags (so that they keep their meaning when the default changes; a later
# flag overrides an earlier one). FT: Lite0 fine-tuned at 96 px, the backbone at 0.1x the head's rate, BN statistics
# frozen, batch 32, 10 epochs (the shipped default but for its --patience 5).
FT = "--pretrained --arch tf_efficientnet_lite0 --image-size 96 --backbone-lr-factor 0.1 --freeze-bn-stats"
FT = f"{FT} --eval-every 2 --patience 0 --batch-size 32 --epochs 10"
CONFIGS = {
    "ft-b128": f"{FT} --batch-size 128",
    "ft-b32": FT,
    "ft-b16": f"{FT} --batch-size 16",
    "ft-b32-light": f"{FT} --crop-min-scale 0.5 --jitter-strength 0.5 --solarize-prob 0 --gray-prob 0",
    "ft-b32-e20": f"{FT} --epochs 20",
    # results/tll_sweep.sh's fine-tuning rows (eighth session, on a GPU: add EXTRA="--device cuda"): 224 px, batch 128,
    # 30 epochs, the backbone at 0.1x or 0.01x.
    "ft224-0.1": f"{FT} --image-size 224 --batch-size 128 --epochs 30 --eval-every 5",
    "ft224-0.01": f"{FT} --image-size 224 --batch-size 128 --epochs 30 --eval-every 5 --backbone-lr-factor 0.01",
    # Each method's own tuning budget (issue #29): two rates around the default's (5e-4: AdamW's 4e-3 per 256 pairs
    # at batch 32). `validate lr-half lr-double --scripts ...`.
    "lr-half": "--lr 2.5e-4",
    "lr-double": "--lr 1e-3",
}


def finished(run):
    """The script printed its end-of-run summary."""
    txt = run.with_suffix(".txt")
    return txt.is_file() and "run directory:" in txt.read_text()


def train(run, script, flags, seed):
    if finished(run):
        return
    cmd = [sys.executable, str(ROOT / script), "--data", "tll", "--data-dir", str(TLL), "--seed", str(seed)]
    cmd += [*flags, "--no-progress", "--out", str(run), "--overwrite"]
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.with_suffix(".txt"), "w") as log:
        log.write(" ".join(cmd[1:]) + "\n")
        log.flush()
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, check=False)  # its .txt says why


def evaluate(run):
    """eval.py on the run's best.pt (chosen on validation) beside every baseline: RUN/eval.json."""
    if finished(run) and not (run / "eval.json").is_file():  # a running run's best.pt is not its last word
        cmd = [sys.executable, str(ROOT / "eval.py"), str(run), "--baselines", "all"]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, env=ENV, cwd=ROOT, check=True)


def run_all(jobs):
    with ThreadPoolExecutor(int(os.environ.get("JOBS", "2"))) as pool:
        for future in [pool.submit(*job) for job in jobs]:
            future.result()


def arg_list(argv, flag, default):
    if flag not in argv:
        return default
    rest = argv[argv.index(flag) + 1 :]
    return rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


def results(run):
    """eval.json's results of a run ({} before eval), and its log.jsonl's records."""
    path = run / "eval.json"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return json.loads(path.read_text())["results"] if path.is_file() else {}, log


def table():
    print("| run | val: start | val: best.pt (epoch) | test: best.pt | test: frozen Lite0 224 px | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for run in sorted(p for p in OUT.glob("*/*") if (p / "log.jsonl").is_file() and finished(p)):
        res, log = results(run)
        best = max(log, key=lambda r: r.get("val_recall@1", -1))  # the first of equals, the start's included
        test, frozen = (res.get(k, {}).get("l2r_recall@1") for k in ("trained", FROZEN))
        ratio = f"{test / frozen:.2f}x" if test is not None and frozen else "–"
        test, frozen = ("–" if v is None else f"{v:.3f}" for v in (test, frozen))
        val = f"{log[0]['val_recall@1']:.3f} | {best['val_recall@1']:.3f} ({best['epoch']})"
        print(f"| {run.parent.name}/{run.name} | {val} | {test} | {frozen} | {ratio} |")


def seeds_table():
    """The test runs over seeds (best.pt, through eval.py) beside the frozen Lite0 features (eval.py's baseline)."""

    def ms(v):
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    keys = ["l2r_recall@1", "l2r_recall@5", "l2r_recall@10", "r2l_recall@1", "l2r_mrr"]
    rows, ratios = {}, {}
    for path in sorted((OUT / "test").glob("*-s*/eval.json")):
        res, name = json.loads(path.read_text())["results"], path.parent.name.rsplit("-s", 1)[0]
        for row, metrics in ((name, res["trained"]), *((k, v) for k, v in res.items() if k.startswith("frozen"))):
            rows.setdefault(row, {}).setdefault(path.parent.name.rsplit("-s", 1)[1], metrics)  # a baseline once a seed
        ratios.setdefault(name, []).append(res["trained"]["l2r_recall@1"] / res[FROZEN]["l2r_recall@1"])
    print(f"| row | seeds | {' | '.join(keys)} | R@1 l→r over frozen 224 px |")
    print("| --- | ---: |" + " ---: |" * (len(keys) + 1))
    for name, by_seed in rows.items():
        r = ratios.get(name)
        r = f"{ms(r)}x ({', '.join(f'{x:.2f}' for x in r)})" if r else "–"
        cells = " | ".join(ms([m[k] for m in by_seed.values()]) for k in keys)
        print(f"| {name} | {len(by_seed)} | {cells} | {r} |")


def main(argv):
    stage = argv[0] if argv else "table"
    seeds = [int(s) for s in arg_list(argv, "--seeds", ["0", "1", "2"])]
    extra, tag = os.environ.get("EXTRA", "").split(), os.environ.get("TAG", "")
    if stage == "validate":
        names = argv[1 : next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))]
        scripts = arg_list(argv, "--scripts", ["byol"])
        prefix = lambda s: "" if s == "byol" and not tag else f"{s}{tag}-"  # BYOL's runs keep their old names
        seeds = seeds if "--seeds" in argv else [0]
        jobs = [
            (OUT / "validate" / f"{prefix(s)}{name}-s{seed}", f"{s}.py", [*CONFIGS[name].split(), *extra], seed)
            for s in scripts
            for name in names
            for seed in seeds
        ]
        run_all([(train, *job) for job in jobs])
    elif stage == "test":
        scripts = arg_list(argv, "--scripts", ["byol", "simsiam", "bn_only"])
        run_all(
            [(train, OUT / "test" / f"{s}{tag}-s{seed}", f"{s}.py", extra, seed) for s in scripts for seed in seeds]
        )
    elif stage == "eval":
        run_all([(evaluate, run) for run in sorted(p for p in (OUT / "test").glob("*-s*") if p.is_dir())])
    elif stage == "table":
        table()
    elif stage == "seeds":
        seeds_table()
    else:
        sys.exit(f"tll.py: error: unknown stage {stage!r}; one of validate, test, eval, table, seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
