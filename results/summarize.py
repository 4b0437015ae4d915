"""Summarise the runs of results/run_all.sh: markdown tables on stdout, curves as PNGs.

    python results/summarize.py results/runs > results/tables.md
    python results/summarize.py results/runs --plots-dir /tmp/plots

Reads OUT/<data>/<row>-s<seed>/: eval.json (`python eval.py`'s; a directory without it is noted on stderr and left
out), log.jsonl (the training log; epoch 0 is the start, with the raw pixels' validation score) and command.txt (the
commands run_all.sh ran, listed under each table with S for the seed). A cell is the mean ± the sample standard
deviation over the row's seeds (the value alone for one seed). Columns:
  validation   the log's validation metric (its "metric") at the evaluated epoch; for the baselines epoch 0's: the
               raw pixels' pixels_<metric>, and the untrained network's <metric> (the start of a run not pretrained)
  test         eval.json's results: the trained embedding's; each of its baselines is a row of its own, taken once
               per seed and data file (from the first row that has it)
  collapse     eval.json's: the projector on up to 1024 training images (collapse_std, its healthy 1/sqrt(d), rank)
  epoch        of the evaluated checkpoint
The curves (<plots-dir>/<data>_curves.png) are log.jsonl's validation metric, collapse_std and effective_rank against
the epoch, mean over seeds with a ±1 std band. Runs of the scripts before prepare.py (their baseline-* directories,
the old eval.json) are summarised by commit a716684 (`git show a716684:results/summarize.py`).
"""

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN_DIR = re.compile(r"^(?P<row>.+)-s(?P<seed>\d+)$")
ROW_ORDER = "byol simsiam bn_only bn_only-no-bn bn_only-predictor bn_only-stop-grad bn_only-bn-all bn_only-joint-bn"
ROW_ORDER = [*ROW_ORDER.split(), "bn_only-simsiam-like"]  # then any others, alphabetically
COLLAPSE = [
    ("collapse_std", "proj collapse_std", "{:.2e}"),
    ("healthy_std", "proj healthy", "{:.3g}"),
    ("effective_rank", "proj eff. rank", "{:.1f}"),
    ("epoch", "epoch", "{:d}"),
]
CONSTANT = {"healthy_std", "epoch"}  # the same over seeds: their distinct values, not mean ± std


def pretrained(checkpoint):
    """Whether a run started from pretrained weights (its checkpoint's args); None when the checkpoint is gone."""
    sys.path.insert(0, str(HERE.parent))
    import byol

    return byol.load_checkpoint(checkpoint)["args"].get("pretrained", False) if Path(checkpoint).is_file() else None


def discover(out_dir):
    """{data: {row: [run, ...]}}: each run {seed, metrics: {column: value}, baselines: {name: metrics}, log, ...}."""
    tree = {}
    for run_dir in sorted(p for p in Path(out_dir).glob("*/*") if p.is_dir()):
        match = RUN_DIR.match(run_dir.name)
        if not match or not (run_dir / "eval.json").is_file():
            print(f"note: {run_dir} is not <row>-s<seed> with an eval.json (unfinished?); skipped", file=sys.stderr)
            continue
        ev = json.loads((run_dir / "eval.json").read_text())
        log = (
            [json.loads(r) for r in (run_dir / "log.jsonl").read_text().splitlines()]
            if (run_dir / "log.jsonl").is_file()
            else []
        )
        name = log[0]["metric"] if log else None
        at = next((r for r in log if r["epoch"] == ev["epoch"]), {})
        run = {
            "dir": run_dir,
            "seed": int(match["seed"]),
            "eval": ev,
            "log": log,
            "metrics": {"validation": at.get(name), **ev["results"]["trained"], **ev["collapse"], "epoch": ev["epoch"]},
            "baselines": {},
        }
        for key, result in ev["results"].items():
            if key.startswith("trained"):  # the run itself (and its whitened features): not a baseline
                continue
            val = None
            if log and key == "raw pixels":
                val = log[0].get(f"pixels_{name}")
            elif log and key.startswith("untrained") and pretrained(ev["checkpoint"]) is False:
                val = log[0].get(name)
            run["baselines"][key] = {"validation": val, **result}
        tree.setdefault(run_dir.parent.name, {}).setdefault(match["row"], []).append(run)
    return tree


def with_baselines(rows):
    """The rows, baseline rows first: each baseline once per (seed, data file), named for the file when several."""
    files = {r["eval"]["data"] for runs in rows.values() for r in runs}
    found, seen = {}, set()
    for row in sorted(rows, key=row_key):
        for run in rows[row]:
            for key, metrics in run["baselines"].items():
                name = key if len(files) == 1 else f"{key} ({run['eval']['data']})"
                if (name, run["seed"], run["eval"]["data"]) not in seen:
                    seen.add((name, run["seed"], run["eval"]["data"]))
                    found.setdefault(name, []).append({**run, "metrics": metrics})
    return {**found, **{row: rows[row] for row in sorted(rows, key=row_key)}}


def row_key(row):
    return (ROW_ORDER.index(row), "") if row in ROW_ORDER else (len(ROW_ORDER), row)


def fmt(values, digits, constant=False):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1 or constant:
        return "/".join(digits.format(v) for v in sorted(set(values)))
    return f"{digits.format(statistics.fmean(values))} ± {digits.format(statistics.stdev(values))}"


def commands(row, runs):
    """Markdown lines: a row's commands (command.txt) with S for the seed; seeds that ran others are set apart."""
    variants = {}
    for run in runs:
        path, s = run["dir"] / "command.txt", run["seed"]
        text = path.read_text().strip() if path.is_file() else f"(no command.txt in {run['dir']})"
        text = re.sub(rf"(-s|--seed ){s}\b", r"\1S", text)
        variants.setdefault(text, []).append(str(s))
    return [
        f"- `{row}`, S in {', '.join(seeds)}"
        + (" (differs from the other seeds!)" if len(variants) > 1 else "")
        + ": "
        + " && ".join(f"`{line}`" for line in text.splitlines())
        for text, seeds in variants.items()
    ]


def table(data, rows):
    runs_all = [r for runs in rows.values() for r in runs]
    tests = list(dict.fromkeys(k for r in runs_all for k in r["eval"]["results"]["trained"]))
    cols = [
        ("validation", f"validation {runs_all[0]['log'][0]['metric'] if runs_all[0]['log'] else ''}", "{:.4f}"),
        *[(k, f"test {k}", "{:.4f}") for k in tests],
        *COLLAPSE,
    ]
    where = sorted(
        {
            f"{Path(r['eval']['checkpoint']).name} on {r['eval']['data']}: {r['eval']['test_groups']} held-out "
            f"{r['eval']['kind']}" + (", the 20 official one-shot runs" * ("one_shot_20way" in tests))
            for r in runs_all
        }
    )
    lines = [
        f"## {data}",
        "",
        f"Evaluated by eval.py: {'; '.join(where)}. Mean ± sample std over seeds (n).",
        "",
        "| row | " + " | ".join(c[1] for c in cols) + " | n |",
        "| --- |" + " ---: |" * (len(cols) + 1),
    ]
    for row, runs in with_baselines(rows).items():
        cells = [fmt([r["metrics"].get(key) for r in runs], digits, key in CONSTANT) for key, _, digits in cols]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {len(runs)} |")
    lines += ["", "Commands (S is the seed):", ""]
    for row in sorted(rows, key=row_key):
        lines += commands(row, rows[row])
    return lines


def mean_curve(runs, key):
    """(epochs, mean, std) over the runs' logs, on the epochs every seed logged `key` at; None when none did."""
    series = [s for s in ({r["epoch"]: r[key] for r in run["log"] if r.get(key) is not None} for run in runs) if s]
    epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not epochs:
        return None
    values = [[s[e] for s in series] for e in epochs]
    return epochs, [statistics.fmean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]


def plot(data, rows, path):
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed; no curves drawn", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = {row: runs for row, runs in sorted(rows.items(), key=lambda kv: row_key(kv[0])) if runs[0]["log"]}
    if not logged:
        return None
    metric = next(iter(logged.values()))[0]["log"][0]["metric"]
    panels = [
        (metric, metric),
        ("collapse_std", "projector collapse_std (log)"),
        ("effective_rank", "projector effective rank"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
    for i, (row, runs) in enumerate(logged.items()):
        for ax, (key, _) in zip(axes[0], panels):
            if (curve := mean_curve(runs, key)) is None:
                continue
            epochs, means, stds = curve
            ax.plot(epochs, means, marker="o", ms=3, color=f"C{i % 10}", label=f"{row} (n={len(runs)})")
            ax.fill_between(
                epochs,
                [m - s for m, s in zip(means, stds)],
                [m + s for m, s in zip(means, stds)],
                color=f"C{i % 10}",
                alpha=0.15,
                lw=0,
            )
            if key == "collapse_std" and (healthy := mean_curve(runs, "healthy_std")) is not None:
                ax.plot(healthy[0], healthy[1], ls=":", color=f"C{i % 10}", lw=1)
    for ax, (key, title) in zip(axes[0], panels):
        ax.set(title=title, xlabel="epoch (0 = the start)", yscale="log" if key == "collapse_std" else "linear")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{data}: mean over seeds, band ±1 std; dotted: healthy std 1/sqrt(d)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the runs directory of run_all.sh (OUT/<data>/<row>-s<seed>/)")
    p.add_argument("--plots-dir", type=Path, default=HERE, help="where <data>_curves.png go")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    opts = p.parse_args(argv)
    tree = discover(opts.out) if opts.out.is_dir() else {}
    if not tree:
        print(
            f"summarize.py: error: no finished runs (OUT/<data>/<row>-s<seed>/eval.json) under {opts.out}",
            file=sys.stderr,
        )
        return 2
    lines = [f"# Results (generated by results/summarize.py {opts.out}; do not edit by hand)", ""]
    for data, rows in sorted(tree.items()):
        lines += table(data, rows)
        if not opts.no_plots and (png := plot(data, rows, opts.plots_dir / f"{data}_curves.png")) is not None:
            shown = os.path.relpath(png)
            lines += ["", f"Curves over epochs: `{png if shown.startswith('..') else shown}`"]
            print(f"wrote {png}", file=sys.stderr)
        lines.append("")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
