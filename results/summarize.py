"""Summarise the runs of results/run_all.sh: markdown tables on stdout, curves as PNGs.

Run:
    python results/summarize.py results/runs > results/tables.md
    python results/summarize.py results/runs --plots-dir /tmp/plots

Layout read (the one run_all.sh writes): OUT/<data>/<row>-s<seed>/ with
  eval.json   eval.py's metrics on the run's held-out split (required: a directory
              without it is reported on stderr and left out);
  log.jsonl   the training script's per-epoch log (epoch 0 = untrained), for the curves;
  last.pt     the checkpoint: its saved args give the exact command under each table.
Baseline rows (baseline-random, baseline-pretrained) have eval.json only; eval.json's
"source" names the checkpoint whose data and split they used.

The row name and seed come from the directory name and are checked against eval.json
(data and seed) and the saved args (seed). Each table cell is the mean +- the sample
standard deviation (ddof 1) over the row's seeds; with one seed, the value alone.
Metrics, from eval.json unless said otherwise (encoder embedding unless said otherwise):
  one-shot 20-way   Omniglot's official 20 runs;
  R@k               held-out pair retrieval, mean of left->right and right->left
                    (eval.py counts ties at random, so a collapsed network scores chance);
  train proj std / rank  the training script's own last collapse_std and effective rank
                    (log.jsonl: projector, up to 1024 training images);
  proj std / rank   collapse_std (mean per-dimension std of the l2-normalised projector
                    outputs; healthy = 1/sqrt(d), shown in its own column) and effective
                    rank, on the evaluated images. Baselines have no projector;
  enc std / rank    the same on the encoder features (baselines included);
  epochs            the epoch of the evaluated checkpoint.
The curves (RUN_PNG = <plots-dir>/<data>_curves.png) come from log.jsonl: the quality
metric the run logged (one_shot, else recall@1 left->right), collapse_std and
effective_rank of the projector against the epoch, mean over seeds with a +-1 std band.
"""

import argparse
import importlib
import json
import math
import os
import re
import shlex
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUN_DIR = re.compile(r"^(?P<row>.+)-s(?P<seed>\d+)$")
# Rows in this order first (run_all.sh's names), any others after them alphabetically.
ROW_ORDER = [
    "baseline-pixels",
    "baseline-random",
    "baseline-random-bn",
    "baseline-pretrained",
    "byol",
    "simsiam",
    "simsiam-lr0.05",
    "bn_only",
    "bn_only-no-bn",
    "bn_only-predictor",
    "bn_only-stop-grad",
    "bn_only-bn-all",
    "bn_only-joint-bn",
    "bn_only-simsiam-like",
]
# Saved args left out of the reproduction command: where and how fast, not what.
# Columns that should not vary over seeds: their distinct values, not mean +- std.
CONSTANT = {"proj_healthy", "enc_healthy", "epochs"}
RUN_ONLY = {"device", "workers", "no_progress", "log_every", "resume", "stop_after_epochs", "overwrite"}


# ----------------------------------------------------------------------------- reading


def read_log(run_dir):
    """Per-epoch records as eval.py --plot reads them (a repeated epoch keeps the rerun); [] without a log."""
    if not (run_dir / "log.jsonl").is_file():
        return []
    return script_module("eval").read_log(run_dir)[1]


def read_checkpoint(path):
    """(method, args) saved in last.pt, without reading the weights into memory."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # an older, non-zip file: read it whole
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt.get("method"), dict(ckpt.get("args") or {})


def flat_metrics(result):
    """The table's numbers from one eval.json (missing ones are absent)."""
    m, out = result.get("metrics", {}), {}
    if "one_shot" in m:
        out["one_shot_20"] = m["one_shot"]["20way"]
    if "val_one_shot" in m:
        out["val_one_shot_20"] = m["val_one_shot"]["20way"]
    if "retrieval" in m:
        l2r, r2l = m["retrieval"]["left_to_right"], m["retrieval"]["right_to_left"]
        for k in (1, 5, 10):
            out[f"r@{k}"] = (l2r[f"recall@{k}"] + r2l[f"recall@{k}"]) / 2
        out["r@1_l2r"], out["r@1_r2l"] = l2r["recall@1"], r2l["recall@1"]
    # Held-out classes (class folders): every held-out image is a query, not only one pair per class.
    for block, key in (("metric_learning", "r_precision"), ("metric_learning", "precision@1"),
                       ("classification", "knn@20"), ("classification", "linear_probe")):
        if key in m.get(block, {}):
            out[key] = m[block][key]
    source = result.get("source", {})
    if not source.get("baseline") and isinstance(source.get("epoch"), int):
        out["epochs"] = source["epoch"]
    for which, short in (("projector", "proj"), ("encoder", "enc")):
        c = m.get("collapse", {}).get(which)
        if c:
            out[f"{short}_std"], out[f"{short}_healthy"], out[f"{short}_rank"] = (
                c["std_mean"],
                c["healthy_std"],
                c["effective_rank"],
            )
    return out


def discover(out_dir):
    """{data: {row: [run, ...]}}, each run a dict; incomplete directories are reported and skipped."""
    tree = {}
    for data_dir in sorted(p for p in Path(out_dir).iterdir() if p.is_dir()):
        for run_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
            match = RUN_DIR.match(run_dir.name)
            if not match:
                print(f"note: {run_dir} is not named <row>-s<seed>; skipped", file=sys.stderr)
                continue
            if not (run_dir / "eval.json").is_file():
                print(f"note: {run_dir} has no eval.json yet (unfinished?); skipped", file=sys.stderr)
                continue
            run = {"dir": run_dir, "data": data_dir.name, "row": match["row"], "seed": int(match["seed"])}
            run["eval"] = json.loads((run_dir / "eval.json").read_text())
            run["metrics"] = flat_metrics(run["eval"])
            run["log"] = read_log(run_dir)
            if run["log"] and "collapse_std" in run["log"][-1]:
                # The training script's own end-of-run collapse check, on up to 1024 training images:
                # eval.py's is on the held-out images, only 54 of them on Omniglot (rank <= 54).
                run["metrics"]["log_std"] = run["log"][-1]["collapse_std"]
                run["metrics"]["log_rank"] = run["log"][-1]["effective_rank"]
            run["method"], run["args"] = (
                read_checkpoint(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else (None, None)
            )
            check(run)
            tree.setdefault(run["data"], {}).setdefault(run["row"], []).append(run)
    for rows in tree.values():
        for runs in rows.values():
            runs.sort(key=lambda r: r["seed"])
    return tree


def check(run):
    data = run["eval"].get("data", {})
    where = run["dir"]
    if data.get("data") not in (None, run["data"]):
        print(f"warning: {where}: eval.json says data {data.get('data')}, the directory {run['data']}", file=sys.stderr)
    if data.get("seed") not in (None, run["seed"]):
        print(f"warning: {where}: eval.json says seed {data.get('seed')}, the directory {run['seed']}", file=sys.stderr)
    if run["args"] and run["args"].get("seed") not in (None, run["seed"]):
        print(
            f"warning: {where}: last.pt says seed {run['args'].get('seed')}, the directory {run['seed']}",
            file=sys.stderr,
        )


def row_key(row):
    return (ROW_ORDER.index(row), "") if row in ROW_ORDER else (len(ROW_ORDER), row)


# ----------------------------------------------------------------------------- commands


def script_module(method):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(method)


def as_text(value):
    return str(value) if isinstance(value, Path) else value


def train_command(method, saved):
    """The shortest command of METHOD.py that gives these saved args: the flags whose value
    differs from what the script would fill in, added in the order the script defines them
    (so --epochs comes before the warm-up it implies). Seed and run directory are left to the caller."""
    try:
        mod = script_module(method)
        defaults = vars(mod.parse_args([]))
    except Exception as e:  # the script is gone or broken: list every saved arg
        print(f"note: cannot import {method}.py ({e.__class__.__name__}); listing all saved args", file=sys.stderr)
        return [f"{k}={v}" for k, v in saved.items() if k not in RUN_ONLY | {"seed", "out"}]
    argv, unknown = [], [k for k in saved if k not in defaults]
    selectors = ("data", "pretrained", "freeze_encoder")  # they pick the recipe, whose values the other flags default to
    for key in sorted(defaults, key=lambda k: k not in selectors):
        if key in RUN_ONLY | {"seed", "out"} or key not in saved:
            continue
        try:
            current = vars(mod.fill_defaults(mod.parse_args(argv)))
        except (Exception, SystemExit):
            current = defaults
        if as_text(current.get(key)) == as_text(saved[key]):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(defaults[key], bool):  # store_true flags, and --flag/--no-flag where the recipe says True
            argv.append(flag if saved[key] else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(saved[key])]
    if unknown:
        print(f"note: {method}.py no longer has the saved args {', '.join(unknown)}", file=sys.stderr)
    return argv


def seed_pattern(text, seed):
    """A path with its -s<seed> directory written as -sS."""
    return re.sub(rf"-s{seed}(?=/|$)", "-sS", str(text))


def commands(runs):
    """Markdown lines: the commands of one row, with S for the seed."""
    seeds = ", ".join(str(r["seed"]) for r in runs)
    variants = {}
    for run in runs:
        seed, source = run["seed"], run["eval"].get("source", {})
        if source.get("baseline"):
            ckpt = seed_pattern(source.get("checkpoint", "CHECKPOINT"), seed)
            shift = run["eval"].get("eval_shift", 0)  # explicit: the checkpoint's own args may say another
            cmd = [
                "python",
                "eval.py",
                ckpt,
                "--baseline",
                source["baseline"],
                *(["--eval-shift", str(shift)] if shift else []),
                "--out",
                seed_pattern(run["dir"], seed),
            ]
            lines = [shlex.join(cmd)]
        elif run["args"] is not None:
            out = seed_pattern(run["args"].get("out", run["dir"]), seed)
            train = [
                "python",
                f"{run['method']}.py",
                *train_command(run["method"], run["args"]),
                "--seed",
                "S",
                "--out",
                out,
            ]
            # An evaluation at another shift than the run logged with (the recipe changed after it trained).
            shift = run["eval"].get("eval_shift", run["args"].get("eval_shift", 0))
            override = ["--eval-shift", str(shift)] if shift != run["args"].get("eval_shift", 0) else []
            lines = [shlex.join(train), shlex.join(["python", "eval.py", f"{out}/last.pt", *override, "--out", out])]
        else:
            lines = [f"(no last.pt in {run['dir']}: command unknown)"]
        variants.setdefault(tuple(lines), []).append(seed)
    text = []
    for lines, variant_seeds in variants.items():
        which = seeds if len(variants) == 1 else ", ".join(map(str, variant_seeds)) + " (differs from the other seeds!)"
        text.append(f"- `{runs[0]['row']}`, S in {which}: " + " && ".join(f"`{line}`" for line in lines))
    return text


# ----------------------------------------------------------------------------- tables


def fmt(values, digits):
    """'mean ± std' (sample std over seeds); the value alone for one seed; '–' for none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return digits.format(mean)
    return f"{digits.format(mean)} ± {digits.format(statistics.stdev(values))}"


def columns_for(rows):
    """(key, header, format) of the columns that this dataset's runs have."""
    have = {k for runs in rows.values() for run in runs for k in run["metrics"]}
    cols = []
    if "one_shot_20" in have:
        cols += [("val_one_shot_20", "validation one-shot 20-way", "{:.4f}")] if "val_one_shot_20" in have else []
        cols.append(("one_shot_20", "test one-shot 20-way", "{:.4f}"))
        cols += [("r@1", "R@1 held-out", "{:.4f}")] if "r@1" in have else []
    elif "r@1" in have:
        cols += [
            ("r@1", "R@1", "{:.4f}"),
            ("r@5", "R@5", "{:.4f}"),
            ("r@10", "R@10", "{:.4f}"),
            ("r@1_l2r", "R@1 l→r", "{:.4f}"),
            ("r@1_r2l", "R@1 r→l", "{:.4f}"),
        ]
    cols += [
        ("r_precision", "R-Precision", "{:.4f}"),
        ("precision@1", "P@1", "{:.4f}"),
        ("knn@20", "kNN@20", "{:.4f}"),
        ("linear_probe", "linear probe", "{:.4f}"),
        ("log_std", "train proj collapse_std", "{:.2e}"),
        ("log_rank", "train proj eff. rank", "{:.1f}"),
        ("proj_std", "proj collapse_std", "{:.2e}"),
        ("proj_healthy", "proj healthy", "{:.3g}"),
        ("proj_rank", "proj eff. rank", "{:.1f}"),
        ("enc_std", "enc collapse_std", "{:.2e}"),
        ("enc_rank", "enc eff. rank", "{:.1f}"),
    ]
    cols.append(("epochs", "epochs", "{:d}"))
    return [c for c in cols if c[0] in have]


def table(data, rows):
    cols = columns_for(rows)
    lines = [f"## {data}", ""]
    splits = sorted(
        {
            f"{r['eval']['data'].get('split', '?')}, {r['eval']['data'].get('image_size', '?')} px"
            for runs in rows.values()
            for r in runs
            if r["eval"].get("data")
        }
    )
    splits = sorted({re.sub(r"\(seed \d+, ", "(seed S, ", s) for s in splits})
    lines += [f"Evaluated by eval.py on {'; '.join(splits)}. Mean ± sample std over seeds (n).", ""]
    lines.append("| row | " + " | ".join(c[1] for c in cols) + " | n |")
    lines.append("| --- |" + " ---: |" * (len(cols) + 1))
    for row in sorted(rows, key=row_key):
        runs = rows[row]
        cells = [
            fmt([r["metrics"].get(key) for r in runs], digits)
            if key not in CONSTANT
            else "/".join(digits.format(v) for v in sorted({r["metrics"][key] for r in runs if key in r["metrics"]}))
            or "–"
            for key, _, digits in cols
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {len(runs)} |")
    lines += ["", "Commands (from each run's saved args; S is the seed):", ""]
    for row in sorted(rows, key=row_key):
        lines += commands(rows[row])
    return lines


# ----------------------------------------------------------------------------- curves


def mean_curve(runs, key):
    """(epochs, mean, std) over the runs' logs, on the epochs every seed logged KEY at."""
    series = [{r["epoch"]: r[key] for r in run["log"] if key in r} for run in runs]
    series = [s for s in series if s]
    if not series:
        return None
    epochs = sorted(set.intersection(*(set(s) for s in series)))
    if not epochs:
        return None
    values = [[s[e] for s in series] for e in epochs]
    means = [statistics.fmean(v) for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return epochs, means, stds


def plot(data, rows, path):
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install -e '.[plot]'); no curves drawn", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    logged = {row: runs for row, runs in rows.items() if any(run["log"] for run in runs)}
    if not logged:
        return None
    keys = {k for runs in logged.values() for run in runs for rec in run["log"] for k in rec}
    quality = (
        "one_shot"
        if "one_shot" in keys
        else "recall@1"
        if "recall@1" in keys
        else "knn@20"
        if "knn@20" in keys
        else None
    )
    panels = (
        [(quality, {"one_shot": "20-way one-shot", "recall@1": "recall@1 (left→right)"}.get(quality, quality))]
        if quality
        else []
    ) + [("collapse_std", "projector collapse_std (log)"), ("effective_rank", "projector effective rank")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for i, row in enumerate(sorted(logged, key=row_key)):
        colour = f"C{i % 10}"
        runs = logged[row]
        for ax, (key, _) in zip(axes[0], panels):
            curve = mean_curve(runs, key)
            if curve is None:
                continue
            epochs, means, stds = curve
            ax.plot(epochs, means, marker="o", ms=3, color=colour, label=f"{row} (n={len(runs)})")
            ax.fill_between(
                epochs,
                [m - s for m, s in zip(means, stds)],
                [m + s for m, s in zip(means, stds)],
                color=colour,
                alpha=0.15,
                lw=0,
            )
            if key == "collapse_std":
                healthy = mean_curve(runs, "healthy_std")
                if healthy is not None:
                    ax.plot(healthy[0], healthy[1], ls=":", color=colour, lw=1)
    for ax, (key, title) in zip(axes[0], panels):
        ax.set_title(title)
        ax.set_xlabel("epoch (0 = untrained)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if key == "collapse_std":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{data}: mean over seeds, band ±1 std; dotted: healthy std 1/sqrt(d)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the runs directory of run_all.sh (OUT/<data>/<row>-s<seed>/)")
    p.add_argument("--plots-dir", type=Path, default=HERE, help="where <data>_curves.png go")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    return p.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    if not opts.out.is_dir():
        print(f"summarize.py: error: {opts.out} is not a directory", file=sys.stderr)
        return 2
    try:
        tree = discover(opts.out)
    except script_module("eval").UserError as e:  # a damaged log.jsonl
        print(f"summarize.py: error: {e}", file=sys.stderr)
        return 2
    if not tree:
        print(
            f"summarize.py: error: no finished runs (OUT/<data>/<row>-s<seed>/eval.json) under {opts.out}",
            file=sys.stderr,
        )
        return 2
    lines = [f"# Results (generated by results/summarize.py {opts.out}; do not edit by hand)", ""]
    for data in sorted(tree):
        lines += table(data, tree[data])
        if not opts.no_plots:
            png = plot(data, tree[data], opts.plots_dir / f"{data}_curves.png")
            if png is not None:
                shown = os.path.relpath(png)
                lines += ["", f"Curves over epochs: `{png if shown.startswith('..') else shown}`"]
                print(f"wrote {png}", file=sys.stderr)
        lines.append("")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
