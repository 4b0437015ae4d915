"""Time to quality (issue #16): training seconds until the one-shot accuracy on byol.py's validation
episodes first reaches a fixed level, for byol.py's own training and for lucidrains' byol-pytorch
as its users drive it. Same encoder, data, batch, optimiser, evaluation and cadence.

  ours          byol.train() itself: `python byol.py`'s default recipe (conv4, 28 px, batch 128,
                AdamW, 1024/256 MLPs, tau 0.996 rising to 1, handwriting augmentation) on the embedded
                Omniglot, where a positive pair is one character drawn by two people. Only
                --eval-every 1 is added (the recipe's 9 would give a coarser curve; evaluating never
                changes training).
  byol-pytorch  its BYOL class with its own defaults: its augmentation (the SimCLR/BYOL torchvision
                pipeline, one random draw per batch) at image_size 28 (the images are grayscale as
                RGB, so its colour jitter changes only brightness and contrast) and its EMA
                (moving_average_decay 0.99, constant). Each step gets one batch of images: the
                anchors of ours' batch at that step (same images, same order). It makes both views
                from each image, and never sees the second drawing. Same conv4 (seeded alike), same
                1024/256 MLPs (its simplicial embeddings off: ours has none), AdamW with byol.py's
                lr, weight decay, parameter groups and warm-up + cosine schedule, contiguous memory
                format (as its users run it; ours trains channels_last).

Both are evaluated every epoch (21 steps) with byol.one_shot_accuracy on the online encoder's
features, with the recipe's test-time shifts (--eval-shift): 50 fixed 20-way validation episodes
(byol.load_validation_runs, small2 minus Greek and Latin) and the official test runs. The clock counts training only: it starts when the data is
decoded and the model built, and stops during every evaluation, for both.

Two switches take one step each from these defaults, to tell apart what makes the difference:
--ours-flags passes byol.py flags (e.g. "--pairs aug": two augmentations of one image, as byol-pytorch
trains); --their-augment byol gives byol-pytorch byol.py's augmentation (augment_pair's two views, with
per-sample parameters) through its augment_fn and augment_fn2.

Run (byol-pytorch comes with `pip install -e ".[bench]"`):
    python benchmarks/time_to_quality.py        # both side by side, one thread each, 540 s of training each
    python benchmarks/time_to_quality.py --ours-flags "--pairs aug" --their-augment byol \\
        --json results/time_to_quality_same_positives.json
    python benchmarks/time_to_quality.py --plot-only \\
        --json results/time_to_quality.json results/time_to_quality_same_positives.json   # redraw both pairs
"""

import argparse
import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this repository's byol.py and kernels/

import byol

IMPLS = ("ours", "byol-pytorch")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise byol.UserError(message)  # byol.py's: one line, no traceback


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--impl",
        default="both",
        choices=["both", *IMPLS],
        help="both: the two side by side, as child processes with --threads threads each",
    )
    p.add_argument(
        "--level",
        type=float,
        default=0.70,
        help="validation one-shot accuracy to reach (the untrained conv4 scores about 0.37 with the recipe's test-time shifts)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="training seconds (evaluation excluded) after which a run stops, at its next evaluation",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    p.add_argument(
        "--width", default=None, help="conv4's channels, one number or four comma-separated (None: byol.py's recipe)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-flags", default="", help="byol.py flags added to ours' recipe, e.g. '--pairs aug'")
    p.add_argument(
        "--their-augment",
        default="default",
        choices=["default", "byol"],
        help="byol-pytorch's augmentation: its default, or byol.py's (the recipe's augment_pair views)",
    )
    p.add_argument(
        "--json",
        type=Path,
        nargs="+",
        default=[REPO / "results" / "time_to_quality.json"],
        help="where the curves go (with --impl both: of both runs); --plot-only reads and draws every one given",
    )
    p.add_argument(
        "--png", type=Path, default=REPO / "results" / "time_to_quality.png", help="accuracy against seconds"
    )
    p.add_argument(
        "--plot-only", action="store_true", help="no training: redraw --png and print the table from --json, at --level"
    )
    cfg = p.parse_args(argv)
    if not 0 < cfg.level < 1:
        raise byol.UserError(f"--level {cfg.level} must lie in (0, 1)")
    for flag, value, low in [("--budget-s", cfg.budget_s, 0), ("--threads", cfg.threads, 1)]:
        if value < low:
            raise byol.UserError(f"{flag} {value} is too small; use {low} or more")
    missing = [str(p) for p in cfg.json if not p.is_file()]
    if cfg.plot_only and missing:
        raise byol.UserError(f"--plot-only: {', '.join(missing)} does not exist; run without --plot-only first")
    if not cfg.plot_only and len(cfg.json) > 1:
        raise byol.UserError("--json takes one file, except with --plot-only")
    if cfg.impl != "ours" and not cfg.plot_only and importlib.util.find_spec("byol_pytorch") is None:
        raise byol.UserError("byol-pytorch is not installed: pip install -e '.[bench]'")
    if cfg.impl == "both" and importlib.util.find_spec("matplotlib") is None:  # said now, not after the runs
        raise byol.UserError("matplotlib draws the curves and is not installed: pip install -e '.[plot]'")
    return cfg


def recipe(cfg, out, extra=()):
    """`python byol.py`'s arguments, as byol.train() receives them, evaluating every epoch."""
    flags = f"--seed {cfg.seed} --eval-every 1 --no-progress".split() + (["--width", cfg.width] if cfg.width else [])
    return byol.parse_args([*flags, "--out", str(out), *extra])


def label(cfg, impl):
    if impl == "ours":
        return f"ours {cfg.ours_flags}".strip()
    return "byol-pytorch" + (", byol.py's augmentation" if cfg.their_augment == "byol" else "")


class TrainingClock:
    """Seconds of training: runs between resume() and pause(), starts paused at 0."""

    def __init__(self):
        self.seconds, self.since = 0.0, None

    def resume(self):
        self.since = time.perf_counter()

    def pause(self):
        if self.since is not None:
            self.seconds += time.perf_counter() - self.since
        self.since = None


class OutOfTime(Exception):
    """The budget is spent: ends byol.train() from inside its evaluation."""


def run_ours(cfg):
    """byol.train() on `python byol.py`'s recipe; byol.evaluate is wrapped to pause the clock, record the
    curve and stop the run once the budget is spent."""
    clock, curve, evaluate = TrainingClock(), [], byol.evaluate

    def timed_evaluate(model, data, device, **kwargs):
        clock.pause()
        start = time.perf_counter()
        metrics = evaluate(model, data, device, **kwargs)
        curve.append(
            {
                "epoch": len(curve),
                "train_s": clock.seconds,
                "eval_s": time.perf_counter() - start,
                "val_one_shot": metrics["val_one_shot"],
                "one_shot": metrics["one_shot"],
            }
        )
        print(f"ours: {curve[-1]}", flush=True)
        if clock.seconds >= cfg.budget_s:
            raise OutOfTime
        clock.resume()
        return metrics

    with tempfile.TemporaryDirectory() as tmp:
        args = recipe(cfg, Path(tmp) / "run", cfg.ours_flags.split())
        byol.evaluate = timed_evaluate
        try:
            byol.train(args)
        except OutOfTime:
            pass
        finally:
            byol.evaluate = evaluate
    args = byol.fill_defaults(recipe(cfg, "unused", cfg.ours_flags.split()))
    positives = "two augmentations of one image" if args.pairs == "aug" else "pairs of two drawings"
    return curve, settings(args, f"byol.py's train(): {positives}, its augmentation, channels_last")


def run_byol_pytorch(cfg):
    """byol-pytorch's BYOL with its defaults, trained by the loop its README shows (learner(images),
    backward, step, update_moving_average) with our optimiser and schedule, on ours' anchors."""
    from byol_pytorch import BYOL as TheirBYOL

    args = byol.fill_defaults(recipe(cfg, "unused"))
    device = torch.device("cpu")
    data = byol.load_omniglot(args)
    torch.manual_seed(args.seed)  # as byol.train() seeds before building: the same initial conv4
    random.seed(args.seed)  # its RandomApply draws from Python's random
    net = byol.build_encoder("conv4", width=args.width)[0]
    views = byol_views(args) if cfg.their_augment == "byol" else (None, None)  # None: its default
    learner = TheirBYOL(
        net,
        image_size=args.image_size,
        hidden_layer=-1,
        projection_size=args.proj_dim,
        projection_hidden_size=args.hidden_dim,
        use_simplicial_embeddings=False,
        augment_fn=views[0],
        augment_fn2=views[1],
    )
    optimizer = byol.build_optimizer(args, learner)
    steps_per_epoch = len(data.anchors) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, byol.warmup_cosine(total_steps, int(args.warmup_epochs * steps_per_epoch))
    )
    probe = torch.nn.Module()  # what byol.embed_images reads: the online encoder and projector
    probe.encoder, probe.projector = learner.net, learner.online_encoder.projector
    clock, curve = TrainingClock(), []

    def evaluate():
        clock.pause()
        start = time.perf_counter()
        curve.append(
            {
                "epoch": len(curve),
                "train_s": clock.seconds,
                "eval_s": 0.0,
                "val_one_shot": byol.one_shot_accuracy(probe, data.val_runs, device, shift=args.eval_shift),
                "one_shot": byol.one_shot_accuracy(probe, data.one_shot_runs, device, shift=args.eval_shift),
            }
        )
        curve[-1]["eval_s"] = time.perf_counter() - start
        print(f"byol-pytorch: {curve[-1]}", flush=True)
        clock.resume()

    evaluate()
    for epoch in range(args.epochs):
        order = byol.epoch_order(len(data.anchors), args.seed, epoch)
        for step in range(steps_per_epoch):
            x = data.images[data.anchors[order[step * args.batch_size : (step + 1) * args.batch_size]]].float() / 255
            loss = learner(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            learner.update_moving_average()
        evaluate()
        if clock.seconds >= cfg.budget_s:
            break
    augmentation = "byol.py's augmentation" if cfg.their_augment == "byol" else "its default augmentation"
    return curve, settings(args, f"two views of one image by {augmentation}, its EMA 0.99, contiguous")


def byol_views(args):
    """byol.py's two views for byol-pytorch's augment_fn and augment_fn2, as augment_pair makes them (blur
    1.0 / 0.1, solarize 0 / --solarize-prob), with per-sample parameters from the global generator. They
    receive its float batch in [0, 1]; byol.augment takes uint8."""

    def view(blur_prob, solarize_prob):
        return lambda x: byol.augment(
            (x * 255).round().clamp(0, 255).to(torch.uint8),
            None,
            blur_prob,
            solarize_prob,
            args.crop_min_scale,
            args.jitter_strength,
            args.flip_prob,
            rotation=args.rotation,
            shear=args.shear,
            stroke=args.stroke,
        )

    return view(1.0, 0.0), view(0.1, args.solarize_prob)


def settings(args, what):
    return (
        f"conv4 widths {','.join(map(str, args.width))}, {args.image_size} px, batch {args.batch_size}, {args.optimizer} lr {args.lr:g} "
        f"weight decay {args.weight_decay:g}, MLPs {args.hidden_dim}/{args.proj_dim}, {args.epochs}-epoch schedule; {what}"
    )


def time_to_level(curve, level):
    """(training seconds, epoch) of the first evaluation at or above level, or None."""
    return next(((p["train_s"], p["epoch"]) for p in curve if p["val_one_shot"] >= level), None)


def run_both(cfg):
    """Both runs at once, as child processes with cfg.threads threads each: the load on the machine falls on
    both alike. Returns {label: result}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as logs:
        children = {}
        for impl in IMPLS:
            flags = (
                f"--impl {impl} --level {cfg.level} --budget-s {cfg.budget_s} --threads {cfg.threads} "
                f"--seed {cfg.seed} --their-augment {cfg.their_augment}"
            ).split() + (["--width", cfg.width] if cfg.width else [])
            out = Path(tmp) / f"{impl}.json"
            argv = [sys.executable, __file__, *flags, f"--ours-flags={cfg.ours_flags}", "--json", str(out)]
            log = logs.enter_context(open(Path(tmp) / f"{impl}.log", "w"))
            children[impl] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        failed = []
        for impl, proc in children.items():
            if proc.wait() != 0:
                tail = (Path(tmp) / f"{impl}.log").read_text().splitlines()[-5:]
                failed.append(f"{impl} exited with {proc.returncode}: " + " / ".join(tail))
        if failed:
            raise byol.UserError("; ".join(failed))
        return {label(cfg, impl): json.loads((Path(tmp) / f"{impl}.json").read_text()) for impl in IMPLS}


def ratio_line(a, b, results, level):
    """a's time to the level over b's; a bound where only a got there (b ran out of budget)."""
    hit_a, hit_b = (time_to_level(results[x]["curve"], level) for x in (a, b))
    untrained_there = [x for x, hit in ((a, hit_a), (b, hit_b)) if hit is not None and hit[0] == 0]
    if untrained_there:  # no training time to compare
        verb = "starts" if len(untrained_there) == 1 else "start"
        return f"- {' and '.join(untrained_there)} {verb} at or above {level:.2f} (epoch 0); pick a higher --level"
    if hit_a is None:
        return f"- {a} did not reach {level:.2f}"
    if hit_b is None:
        budget_b = results[b]["curve"][-1]["train_s"]
        return f"- {a} / {b}: < {hit_a[0] / budget_b:.2f}x ({b} did not reach {level:.2f} in its {budget_b:.0f} s)"
    return f"- {a} / {b}: {hit_a[0] / hit_b[0]:.2f}x"


def table(results, level, pairs):
    """Time to the level, each pair's ratio, and the curves side by side, as markdown."""
    header = [
        "run",
        f"training s to val one-shot {level:.2f}",
        "at epoch",
        "best val (epoch)",
        "last evaluation: epoch, training s, val, test",
        "evaluation s (excluded)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, r in results.items():
        best = max(r["curve"], key=lambda p: p["val_one_shot"])
        last = r["curve"][-1]
        hit = time_to_level(r["curve"], level)
        lines.append(
            f"| {name} | {f'{hit[0]:.0f}' if hit else 'not reached'} | {hit[1] if hit else '-'} | "
            f"{best['val_one_shot']:.3f} ({best['epoch']}) | {last['epoch']}, {last['train_s']:.0f}, "
            f"{last['val_one_shot']:.3f}, {last['one_shot']:.3f} | {sum(p['eval_s'] for p in r['curve']):.0f} |"
        )
    lines += [""] + [ratio_line(a, b, results, level) for a, b in pairs]
    epochs = max(len(r["curve"]) for r in results.values())
    lines += [
        "",
        "| epoch | " + " | ".join(f"{name}: training s, val, test" for name in results) + " |",
        "| --- |" + " --- |" * len(results),
    ]
    for e in range(epochs):
        cells = [
            f"{p['train_s']:.0f}, {p['val_one_shot']:.3f}, {p['one_shot']:.3f}" if p else "-"
            for p in (r["curve"][e] if e < len(r["curve"]) else None for r in results.values())
        ]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, level, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, r in results.items():
        (line,) = ax.plot(
            [p["train_s"] for p in r["curve"]], [p["val_one_shot"] for p in r["curve"]], marker=".", label=name
        )
        hit = time_to_level(r["curve"], level)
        if hit:
            ax.axvline(hit[0], color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=f"level {level:.2f}")
    ax.set_xlabel("training seconds (evaluation excluded), 1 thread each, two runs side by side")
    ax.set_ylabel("validation one-shot, 20-way")
    ax.set_title("Time to quality: conv4 on Omniglot, 28 px, batch 128, AdamW")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None):
    try:
        cfg = parse_args(argv)
        if cfg.plot_only:
            saved = [json.loads(p.read_text())["runs"] for p in cfg.json]
            results, pairs = {k: v for runs in saved for k, v in runs.items()}, [tuple(runs) for runs in saved]
        elif cfg.impl == "both":
            results = run_both(cfg)
            pairs = [tuple(results)]
            cfg.json[0].parent.mkdir(parents=True, exist_ok=True)
            cfg.json[0].write_text(
                json.dumps(
                    {
                        "level": cfg.level,
                        "budget_s": cfg.budget_s,
                        "threads": cfg.threads,
                        "torch": torch.__version__,
                        "runs": results,
                    },
                    indent=1,
                )
            )
        else:
            torch.set_num_threads(cfg.threads)
            curve, setup = (run_ours if cfg.impl == "ours" else run_byol_pytorch)(cfg)
            cfg.json[0].parent.mkdir(parents=True, exist_ok=True)
            cfg.json[0].write_text(
                json.dumps({"setup": setup, "threads": torch.get_num_threads(), "curve": curve}, indent=1)
            )
            return 0
        plot(results, cfg.level, cfg.png)
        print(table(results, cfg.level, pairs))
        print(f"\nwrote {cfg.png}" + ("" if cfg.plot_only else f" and {cfg.json[0]}"))
    except byol.UserError as e:
        print(f"time_to_quality.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
