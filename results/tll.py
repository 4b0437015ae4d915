"""TLL photo pairs from a pretrained backbone on 2 CPU cores (issue #27): validation runs, the default over seeds, tables.

Every run is `python SCRIPT --data tll --data-dir TLL --seed S` plus a configuration's flags: --holdout 0.2 holds out a
fifth of the pairs as the test, and the recipe carves its validation pairs (a fifth) from the rest. Configurations are
chosen on val_recall@1 of seed 0; the test pairs choose nothing.

    python results/tll.py validate CONFIG [CONFIG ...] [--seeds 0 1 2] [--scripts byol simsiam ...]   # seed 0 unless told
    python results/tll.py test [--seeds 0 1 2] [--scripts byol simsiam bn_only contrastive]   # the shipped default
    python results/tll.py frozen-head [--seeds 0 1 2]       # Lite0 frozen at 224 px, PCA-256, BYOL head (--pool-stages 1)
    python results/tll.py pretrained [--seeds 0 1 2]        # eval.py --baseline pretrained, Lite0 at 96 and 224 px
    python results/tll.py eval                              # eval.py on each test run's best.pt
    python results/tll.py table                             # every run: validation and test, against the frozen features
    python results/tll.py seeds                             # the test runs over seeds: hit@k, asymmetric recall, ratio
    python results/tll.py whiten RUN [RUN ...]              # validation R@1 of best.pt's features, plain and whitened
    OMP_NUM_THREADS=2 python results/tll.py phases [FLAG ...]   # alone: where the default's time goes (BENCHMARKS.md)

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
LITE0 = ["--pretrained", "--arch", "tf_efficientnet_lite0"]

# Candidates on seed 0, each a full set of flags over the pretrained default (so that they keep their meaning when the
# default changes). ft = Lite0 fine-tuned at 96 px, backbone at 0.1x the head's learning rate, frozen BN statistics.
FT = [*LITE0, "--image-size", "96", "--backbone-lr-factor", "0.1", "--freeze-bn-stats", "--eval-every", "2",
      "--patience", "0"]
CONFIGS = {
    "ft-b128": [*FT, "--batch-size", "128", "--epochs", "10"],
    "ft-b32": [*FT, "--batch-size", "32", "--epochs", "10"],  # shipped (PHOTO_PAIRS)
    "ft-b16": [*FT, "--batch-size", "16", "--epochs", "10"],
    "ft-b32-light": [*FT, "--batch-size", "32", "--epochs", "10", "--crop-min-scale", "0.5", "--jitter-strength", "0.5",
                     "--solarize-prob", "0", "--gray-prob", "0"],
    "ft-b32-freeze3": [*FT, "--batch-size", "32", "--epochs", "10", "--freeze-stages", "3"],
    "ft-b32-e20": [*FT, "--batch-size", "32", "--epochs", "20"],
    "head-pool1": [*LITE0, "--freeze-encoder", "--image-size", "224", "--pca-dim", "256", "--epochs", "100",
                   "--eval-every", "10", "--patience", "0"],
    "head-pool3": [*LITE0, "--freeze-encoder", "--image-size", "224", "--pca-dim", "256", "--pool-stages", "3",
                   "--epochs", "100", "--eval-every", "10", "--patience", "0"],
    # Each method's own tuning budget (issue #29): the same two learning rates around the default's (5e-4: AdamW's
    # 4e-3 per 256 pairs at batch 32), on the default otherwise. `validate lr-half lr-double --scripts ...`.
    "lr-half": ["--lr", "2.5e-4"],
    "lr-double": ["--lr", "1e-3"],
}


def finished(run):
    txt = run.with_suffix(".txt")
    return txt.is_file() and "run directory:" in txt.read_text()


def train(run, script, flags, seed):
    if finished(run):
        return
    cmd = [sys.executable, str(ROOT / script), "--data", "tll", "--data-dir", str(TLL), "--seed", str(seed),
           *flags, "--no-progress", "--out", str(run), "--overwrite"]
    run.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("THREADS", "1")}
    with open(run.with_suffix(".txt"), "w") as log:
        log.write(" ".join(cmd[1:]) + "\n")
        log.flush()
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)  # its .txt says why


def pretrained(seed, size):
    out = OUT / "pretrained" / f"s{seed}-{size}"
    if (out / "eval.json").is_file():
        return
    cmd = [sys.executable, str(ROOT / "eval.py"), "--baseline", "pretrained", "--arch", "tf_efficientnet_lite0",
           "--image-size", str(size), "--data", "tll", "--data-dir", str(TLL), "--holdout", "0.2", "--seed", str(seed),
           "--out", str(out), "--no-pictures"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("THREADS", "1")}
    subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env, cwd=ROOT, check=True)


def run_all(jobs):
    with ThreadPoolExecutor(int(os.environ.get("JOBS", "2"))) as pool:
        for future in [pool.submit(*job) for job in jobs]:
            future.result()


def arg_list(argv, flag, default):
    if flag not in argv:
        return default
    rest = argv[argv.index(flag) + 1:]
    return [a for a in rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]]


def log_of(run):
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def chosen(history):
    """The epoch-0 record and the record best.pt holds (the first best val_recall@1, the start's included: it competes
    since the twelfth session, and a run logged before then is scored the same way), else the last."""
    scored = [r for r in history if "val_recall@1" in r]
    return history[0], (max(scored, key=lambda r: r["val_recall@1"]) if scored else history[-1])


def frozen_r1(seed, size):
    path = OUT / "pretrained" / f"s{seed}-{size}" / "eval.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["metrics"]["retrieval"]["left_to_right"]["recall@1"]


def table():
    print("| run | val: start | val: best | test: start | test: best.pt | frozen Lite0 96 / 224 px (test) | "
          "best.pt / frozen at 224 px | epoch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = {}
    for run in sorted(p for p in OUT.glob("*/*") if (p / "log.jsonl").is_file() and finished(p)):
        history = log_of(run)
        if len(history) < 2:
            continue
        first, best = chosen(history)
        seed = int(run.name.rsplit("-s", 1)[1])
        start = first.get("baseline_frozen_recall@1", first["recall@1"])
        f96, f224 = frozen_r1(seed, 96), frozen_r1(seed, 224)
        ratio = best["recall@1"] / f224 if f224 else None
        if ratio is not None:
            ratios.setdefault(run.parent.name + "/" + run.name.rsplit("-s", 1)[0], []).append(ratio)
        val0 = first.get("baseline_frozen_val_recall@1", first.get("val_recall@1"))
        print(f"| {run.parent.name}/{run.name} | {val0:.3f} | {best.get('val_recall@1', float('nan')):.3f} | {start:.3f} | "
              f"{best['recall@1']:.3f} | {f96 or float('nan'):.3f} / {f224 or float('nan'):.3f} | "
              f"{ratio or float('nan'):.2f}x | {best['epoch']} |")
    for name, values in ratios.items():
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        print(f"{name}: best.pt over frozen Lite0 at 224 px, {statistics.mean(values):.2f}x{spread} over {len(values)} seeds")


def evaluate(run):
    """eval.py on the run's best.pt (chosen on validation): Finetuner's hit@k and upstream's asymmetric recall too."""
    out = run / "eval-best"
    if (out / "eval.json").is_file() or not finished(run):  # a running run's best.pt is not its last word
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("THREADS", "1")}
    subprocess.run([sys.executable, str(ROOT / "eval.py"), str(run / "best.pt"), "--out", str(out), "--no-pictures"],
                   stdout=subprocess.DEVNULL, env=env, cwd=ROOT, check=True)


def retrieval(path):
    m = json.loads(path.read_text())["metrics"]["retrieval"]
    lr, asym = m["left_to_right"], m["asymmetric"]
    return {"R@1 l→r": lr["recall@1"], "R@5 l→r": lr["recall@5"], "R@10 l→r": lr["recall@10"],
            "R@1 r→l": m["right_to_left"]["recall@1"], "asym R@1": asym["recall@1"], "asym R@3": asym["recall@3"],
            "asym R@5": asym["recall@5"]}


def seeds_table():
    """The test runs over seeds (best.pt, through eval.py) beside the frozen Lite0 features on the same pairs."""
    def ms(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    rows = {}
    for size in (224, 96):
        for path in sorted((OUT / "pretrained").glob(f"s*-{size}/eval.json")):
            rows.setdefault(f"frozen Lite0, {size} px", []).append(retrieval(path))
    ratios = {}
    for path in sorted((OUT / "test").glob("*-s*/eval-best/eval.json")):
        name, seed = path.parent.parent.name.rsplit("-s", 1)
        if chosen(log_of(path.parent.parent))[1]["epoch"] == 0 and not name.startswith("head"):
            # best.pt is the start (a run logged before the start competed holds a later epoch): Lite0's ImageNet
            # weights, whose features at 96 px eval.py --baseline pretrained scores on the same split.
            path = OUT / "pretrained" / f"s{seed}-96" / "eval.json"
        rows.setdefault(name, []).append(retrieval(path))
        frozen = OUT / "pretrained" / f"s{seed}-224" / "eval.json"
        if frozen.is_file():
            ratios.setdefault(name, []).append(rows[name][-1]["R@1 l→r"] / retrieval(frozen)["R@1 l→r"])
    keys = list(next(iter(rows.values()))[0])
    print(f"| row | seeds | {' | '.join(keys)} | R@1 l→r over frozen 224 px |")
    print("| --- | ---: |" + " ---: |" * (len(keys) + 1))
    for name, runs in rows.items():
        ratio = ratios.get(name)
        ratio = (f"{statistics.mean(ratio):.2f}x" + (f" ± {statistics.stdev(ratio):.2f}" if len(ratio) > 1 else "")
                 + f" ({', '.join(f'{r:.2f}' for r in ratio)})") if ratio else "–"
        print(f"| {name} | {len(runs)} | " + " | ".join(ms([r[k] for r in runs]) for k in keys) + f" | {ratio} |")


def whiten(runs, dims=(64, 128, 256)):
    """Validation R@1 of each run's best.pt features, plain and PCA-whitened to `dims`, the whitening fitted on the
    features of the run's training images (no pairs): is whitening after fine-tuning worth keeping?"""
    import torch

    sys.path.insert(0, str(ROOT))
    import byol
    import eval as ev

    for run in runs:
        _, _, args, model = ev.load_model(Path(run) / "best.pt")
        args.data_dir, args.workers = TLL, 2
        data = byol.load_data(args)
        def features(idx, model=model, images=data.images):
            return byol.embed_images(model, images[idx], torch.device("cpu"))[0].double()

        train = features(data.groups[data.groups >= 0].unique())
        left, right = features(data.validation.test_pairs[:, 0]), features(data.validation.test_pairs[:, 1])
        variance, axes = torch.linalg.eigh(torch.cov(train.T))  # ascending
        row = [f"plain {byol.recall_at_1(left.float(), right.float()):.3f}"]
        for d in dims:
            w = axes.flip(1)[:, :d] / variance.flip(0)[:d].clamp(min=1e-6 * variance[-1].item()).sqrt()
            mean = train.mean(0)
            row.append(f"whitened-{d} {byol.recall_at_1(((left - mean) @ w).float(), ((right - mean) @ w).float()):.3f}")
        print(f"{run}: validation R@1 " + ", ".join(row))


def phases(extra=(), steps=12, warmup=3):
    """Where the TLL default's time goes, in this process (run it alone, OMP_NUM_THREADS=2): start-up (decoding the
    images, building the pretrained model), each phase of a training step as train() runs it, one evaluation of the
    validation and test pairs, and one checkpoint."""
    import tempfile
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    import byol

    clock, device = time.perf_counter, torch.device("cpu")
    start = clock()
    args = byol.fill_defaults(byol.parse_args(["--data", "tll", "--data-dir", str(TLL), "--workers", "2", *extra]))
    data = byol.load_data(args)
    decoded = clock()
    byol.fit_to_data(args, len(data.anchors), 1, is_main=False)
    model = byol.build_model(args).to(device, memory_format=torch.channels_last)
    for encoder in (model.encoder, model.target_encoder):
        byol.freeze_bn_stats(encoder)
        if args.freeze_stages:
            byol.freeze_stages(encoder, args.freeze_stages)
    optimizer = byol.build_method_optimizer(args, model)
    built = clock()
    order = byol.epoch_order(len(data.anchors), args.seed, 0)
    times = {k: [] for k in ("batch + augmentation", "forward (online + target)", "backward", "optimiser", "EMA")}
    for step in range(warmup + steps):
        t = [clock()]
        x1, x2 = byol.make_pair_batch(data, order, step, args.batch_size, 0, 1, args.seed, step, device)
        v1, v2 = byol.augment_pair(x1, x2, byol.step_generator(args.seed, step, device, stream=1), args)
        v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
        t.append(clock())
        loss = model(v1, v2)
        t.append(clock())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.append(clock())
        optimizer.step()
        t.append(clock())
        byol.after_step(model, args, step + 1, warmup + steps)
        t.append(clock())
        if step >= warmup:
            for key, a, b in zip(times, t, t[1:]):
                times[key].append(b - a)
    step_s = sum(statistics.median(v) for v in times.values())
    t = clock()
    byol.evaluate(model, data, device, embedding="encoder", shift=args.eval_shift)
    evaluated = clock() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = clock()
        byol.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(tmp) / "last.pt")
        saved = clock() - t
    steps_per_epoch = len(data.anchors) // args.batch_size
    print(f"TLL default (byol.py --data tll --data-dir {TLL} {' '.join(extra)}): {args.arch} at {args.image_size} px, batch {args.batch_size}, "
          f"{len(data.anchors)} training pairs ({steps_per_epoch} steps an epoch), {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads")
    print(f"decode {len(data.images)} images: {decoded - start:.1f} s; build the pretrained model: {built - decoded:.1f} s")
    print("| phase of a step | median ms | share |")
    print("| --- | ---: | ---: |")
    for key, values in times.items():
        print(f"| {key} | {1000 * statistics.median(values):.0f} | {statistics.median(values) / step_s:.0%} |")
    print(f"| step | {1000 * step_s:.0f} | {2 * args.batch_size / step_s:.1f} images/s |")
    print(f"one evaluation (validation and test pairs): {evaluated:.1f} s; one checkpoint: {saved:.1f} s")


def main(argv):
    stage = argv[0] if argv else "table"
    seeds = [int(s) for s in arg_list(argv, "--seeds", ["0", "1", "2"])]
    if stage == "validate":
        names = argv[1:next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))]
        val_seeds = seeds if "--seeds" in argv else [0]
        scripts = arg_list(argv, "--scripts", ["byol"])
        extra, tag = os.environ.get("EXTRA", "").split(), os.environ.get("TAG", "")
        prefix = lambda s: "" if s == "byol" and not tag else f"{s}{tag}-"  # BYOL's runs keep their old names
        run_all([(train, OUT / "validate" / f"{prefix(s)}{name}-s{seed}", f"{s}.py", [*CONFIGS[name], *extra], seed)
                 for s in scripts for name in names for seed in val_seeds])
    elif stage == "test":
        scripts = arg_list(argv, "--scripts", ["byol", "simsiam", "bn_only"])
        extra, tag = os.environ.get("EXTRA", "").split(), os.environ.get("TAG", "")
        run_all([(train, OUT / "test" / f"{s}{tag}-s{seed}", f"{s}.py", extra, seed) for s in scripts for seed in seeds])
    elif stage == "frozen-head":
        run_all([(train, OUT / "test" / f"head-pool1-s{seed}", "byol.py", CONFIGS["head-pool1"], seed) for seed in seeds])
    elif stage == "pretrained":
        run_all([(pretrained, seed, size) for seed in seeds for size in (96, 224)])
    elif stage == "eval":
        run_all([(evaluate, run) for run in sorted(p for p in (OUT / "test").glob("*-s*") if p.is_dir())])
    elif stage == "table":
        table()
    elif stage == "seeds":
        seeds_table()
    elif stage == "phases":
        phases(argv[1:])
    elif stage == "whiten":
        whiten(argv[1:])
    else:
        sys.exit(f"tll.py: error: unknown stage {stage!r}; one of validate, test, frozen-head, pretrained, eval, table, seeds, whiten, phases")


if __name__ == "__main__":
    main(sys.argv[1:])
