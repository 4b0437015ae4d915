"""Time to quality (issue #16): training seconds until the validation one-shot accuracy first reaches a level, for
byol.py's own training and for lucidrains' byol-pytorch as its users drive it: the same conv4 (seeded alike), data,
batch, MLPs, optimiser, schedule, epochs and validation. The clock counts the training loops only, for both.

  ours          byol.train(byol.parse_args([...])): `python byol.py`'s recipe (conv4, 28 px, batch 128, AdamW, tau
                0.996 rising to 1, the handwriting augmentation) on the embedded Omniglot, a positive pair being one
                character drawn by two people, with --eval-every 1. Its curve: its history (validation, images/s)
  byol-pytorch  its BYOL with its defaults: its augmentation (torchvision's, one draw per batch) and EMA (0.99,
                constant), on the anchors of the batches byol.make_pair_batch makes (both of its views come from one
                image); byol.py's AdamW, parameter groups and schedule; contiguous. Validated as byol.train validates

--ours-flags passes byol.py flags (e.g. "--pairs aug": two augmentations of one image, as byol-pytorch trains);
--their-augment byol gives byol-pytorch byol.py's augment_pair views as its augment_fn and augment_fn2.

    python benchmarks/time_to_quality.py        # both side by side, a thread each, the recipe's 45 epochs
    python benchmarks/time_to_quality.py --ours-flags "--pairs aug" --their-augment byol \\
        --json results/time_to_quality_same_positives.json
    python benchmarks/time_to_quality.py --plot-only --json results/time_to_quality*.json   # redraw both pairs
"""

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # this repository's byol.py and kernels/; training.py

import byol  # noqa: E402
from training import fit  # noqa: E402

IMPLS = ("ours", "byol-pytorch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="both", choices=["both", *IMPLS], help="both: side by side, as child processes")
    p.add_argument("--level", type=float, default=0.70, help="validation one-shot to reach (untrained: about 0.37)")
    p.add_argument("--epochs", type=int, help="epochs of both runs (None: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    p.add_argument("--width", help="conv4's channels, one number or four comma-separated (None: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-flags", default="", help="byol.py flags added to ours' recipe, e.g. '--pairs aug'")
    p.add_argument("--their-augment", default="default", choices=["default", "byol"], help="or byol.py's augment_pair")
    p.add_argument("--json", type=Path, nargs="+", default=[REPO / "results" / "time_to_quality.json"], help="curves")
    p.add_argument("--png", type=Path, default=REPO / "results" / "time_to_quality.png", help="the curves, drawn")
    p.add_argument("--plot-only", action="store_true", help="no training: redraw --png, print the table of --json")
    cfg = p.parse_args(argv)
    if not 0 < cfg.level < 1 or cfg.threads < 1 or (cfg.epochs or 1) < 1:
        p.error("--level must lie in (0, 1), --threads and --epochs be 1 or more")
    if len(cfg.json) > 1 and not cfg.plot_only or not all(path.is_file() for path in cfg.json) and cfg.plot_only:
        p.error("--json: one file to write, or with --plot-only files that exist")
    needed = ["byol_pytorch"] * (cfg.impl != "ours" and not cfg.plot_only) + ["matplotlib"] * (cfg.impl == "both")
    if missing := [name for name in needed if importlib.util.find_spec(name) is None]:  # said now, not after the runs
        p.error(f"{' and '.join(missing)} not installed: pip install -e '.[bench]'")
    return cfg


def recipe_argv(cfg):
    """`python byol.py`'s arguments as both runs use them: validation every epoch."""
    argv = ["--seed", str(cfg.seed), "--eval-every", "1", "--no-progress"]
    argv += ["--epochs", str(cfg.epochs)] if cfg.epochs else []
    return argv + (["--width", *cfg.width.split(",")] if cfg.width else [])


def settings(args, what):
    return f"conv4 {args.width}, batch {args.batch_size}, lr {args.lr:g}, {args.epochs} epochs; {what}"


def run_ours(cfg):
    """byol.train on `python byol.py`'s recipe; the curve from its history: an epoch's images over its images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        _, history, args = byol.train(byol.parse_args([*recipe_argv(cfg), "--out", tmp, *cfg.ours_flags.split()]))
    images = 2 * args.batch_size * (len(byol.load_data(args).anchors) // args.batch_size)  # per epoch (no --per-group)
    seconds = [0.0] + [images / entry["images_per_s"] for entry in history[1:]]
    train_s = [sum(seconds[: i + 1]) for i in range(len(seconds))]
    curve = [dict(epoch=e["epoch"], train_s=s, val_one_shot=e["val_one_shot"]) for e, s in zip(history, train_s)]
    positives = "two augmentations of one image" if args.pairs == "aug" else "pairs of two drawings"
    return curve, settings(args, f"byol.py's train(): {positives}, its augmentation, channels_last")


def one_shot(model, data, args):
    """The validation one-shot accuracy as byol.train scores it: 20-way episodes of reference and query images (query
    i matches reference i), on the encoder's features with the recipe's shifts, ties counted at random."""
    e = data.episodes
    embed = lambda i: byol.embed_images(model, data.images[e[:, i].flatten()], "cpu", args.eval_shift)[0]  # noqa: E731
    ref, query = (F.normalize(embed(i), dim=1).view(*e[:, i].shape, -1) for i in (0, 1))
    sim = query @ ref.transpose(1, 2)
    own = sim.diagonal(dim1=1, dim2=2)[..., None]
    return (((sim > own).sum(-1) == 0).float() / (sim == own).sum(-1)).mean().item()


def schedule(args, steps_per_epoch):
    """byol.train's learning rate factor at each step: a linear warm-up, then a cosine decay to 0."""
    warmup, total = int(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))  # noqa: E731
    return lambda s: (s + 1) / warmup if s < warmup else cosine(s)


def byol_views(args):
    """byol.py's two views for byol-pytorch's augment_fn and augment_fn2 (it calls them in that order on one batch):
    augment_pair on its float batch in [0, 1], per-sample parameters, a generator per batch."""
    batches, second = iter(range(2**62)), []

    def first(x):
        x = (x * 255).round().clamp(0, 255).to(torch.uint8)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + next(batches))
        v1, v2 = (v.contiguous() for v in byol.augment_pair(x, x, gen, args))
        second[:] = [v2]
        return v1

    return first, lambda x: second.pop()


def run_byol_pytorch(cfg):
    """byol-pytorch's BYOL, trained by the loop its README shows (learner(images), backward, step,
    update_moving_average) with byol.py's optimiser and schedule, on the anchors of byol.py's batches."""
    from byol_pytorch import BYOL

    args = byol.parse_args(recipe_argv(cfg))
    data = byol.load_data(args)
    steps = len(data.anchors) // fit(args, len(data.anchors)).batch_size
    torch.manual_seed(args.seed)  # as byol.train seeds before building: the same initial conv4
    random.seed(args.seed)  # its RandomApply draws from Python's random
    net = byol.build_encoder("conv4", width=args.width)[0]
    views = byol_views(args) if cfg.their_augment == "byol" else (None, None)  # None: its default
    sizes = dict(projection_size=args.proj_dim, projection_hidden_size=args.hidden_dim, use_simplicial_embeddings=False)
    learner = BYOL(net, args.image_size, -1, augment_fn=views[0], augment_fn2=views[1], **sizes)
    optimizer = byol.build_method_optimizer(args, torch.nn.ModuleDict(dict(encoder=net, learner=learner)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args, steps))
    probe = torch.nn.ModuleDict(dict(encoder=net, projector=learner.online_encoder.projector))  # for embed_images
    curve = [{"epoch": 0, "train_s": 0.0, "val_one_shot": one_shot(probe, data, args)}]
    for epoch in range(args.epochs):
        order = torch.randperm(len(data.anchors), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        start = time.perf_counter()
        for i in range(steps):  # the same anchors in the same order as ours (byol.train's order without --per-group)
            x = next(byol.make_pair_batch(data, order, i, args.batch_size, 0, 1, args.seed, epoch * steps + i, "cpu"))
            loss = learner(x.float() / 255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            learner.update_moving_average()
        seconds = curve[-1]["train_s"] + time.perf_counter() - start
        curve.append({"epoch": epoch + 1, "train_s": seconds, "val_one_shot": one_shot(probe, data, args)})
        print(f"byol-pytorch: {curve[-1]}", flush=True)
    augmentation = "byol.py's augmentation" if cfg.their_augment == "byol" else "its default augmentation"
    return curve, settings(args, f"two views of one image by {augmentation}, its EMA 0.99, contiguous")


def label(cfg, impl):
    their = "byol-pytorch" + (", byol.py's augmentation" if cfg.their_augment == "byol" else "")
    return f"ours {cfg.ours_flags}".strip() if impl == "ours" else their


def run_both(cfg):
    """Both runs at once, as child processes of cfg.threads threads each: the machine's load falls on both alike."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    flags = [f"--threads={cfg.threads}", f"--seed={cfg.seed}", f"--their-augment={cfg.their_augment}"]
    flags += [f"--ours-flags={cfg.ours_flags}", *[f"--epochs={cfg.epochs}"] * bool(cfg.epochs)]
    flags += [f"--width={cfg.width}"] * bool(cfg.width)
    with tempfile.TemporaryDirectory() as tmp:
        tmp, children = Path(tmp), {}
        for impl in IMPLS:
            argv = [sys.executable, __file__, "--impl", impl, *flags, "--json", str(tmp / f"{impl}.json")]
            with open(tmp / f"{impl}.log", "w") as log:
                children[impl] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        tails = {impl: " / ".join((tmp / f"{impl}.log").read_text().splitlines()[-5:]) for impl in IMPLS}
        if failed := [f"{impl} exited with {p.returncode}: {tails[impl]}" for impl, p in children.items() if p.wait()]:
            raise SystemExit("time_to_quality.py: error: " + "; ".join(failed))
        return {label(cfg, impl): json.loads((tmp / f"{impl}.json").read_text()) for impl in IMPLS}


def time_to_level(curve, level):
    """(training seconds, epoch) of the first validation at or above level, or None."""
    return next(((p["train_s"], p["epoch"]) for p in curve if p["val_one_shot"] >= level), None)


def ratio_line(a, b, results, level):
    """a's time to the level over b's; a bound where only a got there."""
    hit_a, hit_b = (time_to_level(results[x]["curve"], level) for x in (a, b))
    untrained_there = [x for x, hit in ((a, hit_a), (b, hit_b)) if hit is not None and hit[0] == 0]
    if untrained_there:  # no training time to compare
        verb = "starts" if len(untrained_there) == 1 else "start"
        return f"- {' and '.join(untrained_there)} {verb} at or above {level:.2f} (epoch 0); pick a higher --level"
    if hit_a is None:
        return f"- {a} did not reach {level:.2f}"
    if hit_b is None:
        end_b = results[b]["curve"][-1]["train_s"]
        return f"- {a} / {b}: < {hit_a[0] / end_b:.2f}x ({b} did not reach {level:.2f} in its {end_b:.0f} s)"
    return f"- {a} / {b}: {hit_a[0] / hit_b[0]:.2f}x"


def table(results, level, pairs):
    """Time to the level, each pair's ratio, and the curves side by side, as markdown."""
    point = lambda p: f"{p['train_s']:.0f}, {p['val_one_shot']:.3f}"  # noqa: E731
    lines = [f"| run | training s to val one-shot {level:.2f} | at epoch | best val (epoch) | last: epoch, s, val |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        best, hit = max(r["curve"], key=lambda p: p["val_one_shot"]), time_to_level(r["curve"], level)
        reached = f"{hit[0]:.0f} | {hit[1]}" if hit else "not reached | -"
        last = f"{r['curve'][-1]['epoch']}, {point(r['curve'][-1])}"
        lines.append(f"| {name} | {reached} | {best['val_one_shot']:.3f} ({best['epoch']}) | {last} |")
    lines += ["", *(ratio_line(a, b, results, level) for a, b in pairs), ""]
    lines += ["| epoch | " + " | ".join(f"{name}: training s, val" for name in results) + " |"]
    lines += ["|" + " --- |" * (1 + len(results))]
    for e in range(max(len(r["curve"]) for r in results.values())):
        cells = [point(r["curve"][e]) if e < len(r["curve"]) else "-" for r in results.values()]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, level, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, r in results.items():
        (line,) = ax.plot([p["train_s"] for p in r["curve"]], [p["val_one_shot"] for p in r["curve"]], ".-", label=name)
        if hit := time_to_level(r["curve"], level):
            ax.axvline(hit[0], color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=f"level {level:.2f}")
    ax.set(xlabel="training seconds (validation excluded), 1 thread each, side by side", ylabel="validation one-shot")
    ax.set_title("Time to quality: conv4 on Omniglot, 28 px, batch 128, AdamW")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None):
    cfg = parse_args(argv)
    cfg.json[0].parent.mkdir(parents=True, exist_ok=True)
    if cfg.impl in IMPLS and not cfg.plot_only:  # one run, in this process (a child of --impl both)
        torch.set_num_threads(cfg.threads)
        curve, setup = (run_ours if cfg.impl == "ours" else run_byol_pytorch)(cfg)
        cfg.json[0].write_text(json.dumps({"setup": setup, "threads": cfg.threads, "curve": curve}, indent=1))
        return 0
    saved = [json.loads(path.read_text())["runs"] for path in cfg.json] if cfg.plot_only else [run_both(cfg)]
    results, pairs = {k: v for runs in saved for k, v in runs.items()}, [tuple(runs) for runs in saved]
    if not cfg.plot_only:
        saved = dict(level=cfg.level, threads=cfg.threads, torch=torch.__version__, runs=results)
        cfg.json[0].write_text(json.dumps(saved, indent=1))
    plot(results, cfg.level, cfg.png)
    print(table(results, cfg.level, pairs))
    print(f"\nwrote {cfg.png}" + ("" if cfg.plot_only else f" and {cfg.json[0]}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
