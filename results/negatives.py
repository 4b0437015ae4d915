"""The tables of results/negatives.sh, from its runs' logs: one-shot on the 20 official runs (the test) and on the
validation episodes, at the last epoch (what `python eval.py RUN/last.pt` reports), with wall time.

    python results/negatives.py [OUT]          # OUT: results/runs/negatives (default)

Rows of several seeds give mean ± sample std, as the Omniglot table of RESULTS.md. A row whose run has not finished is
left out, with a note on stderr.
"""

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROW = re.compile(r"^(?P<row>.+?)(?:-k(?P<k>\d+))?-s(?P<seed>\d+)$")


def run_ended(run):
    """True when RUN's last.pt says the run trained all its epochs or stopped early (a run killed part-way, whose
    log already holds evaluations, is not finished)."""
    path = run / "last.pt"
    if not path.exists():
        return False
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["epoch"] >= ckpt["args"]["epochs"] or bool(ckpt.get("early_stopping", {}).get("stopped"))


def finished(run):
    """(last log record, wall seconds) of a run that ended, else None."""
    txt = run.with_name(run.name + ".txt")
    if not txt.exists() or not (run / "log.jsonl").exists() or not run_ended(run):
        return None
    wall = re.search(r"^wall_s ([\d.]+)$", txt.read_text(), re.M)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    if wall is None or not records or "one_shot" not in records[-1]:
        return None
    return records[-1], float(wall.group(1))


def cell(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows, title, key_name):
    print(f"\n### {title}\n")
    print(f"| {key_name} | seeds | test one-shot | validation one-shot | wall time (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, runs in rows.items():
        test = [r["one_shot"] for r, _ in runs]
        val = [r["val_one_shot"] for r, _ in runs]
        wall = [w for _, w in runs]
        print(f"| {key} | {len(runs)} | {cell(test)} | {cell(val)} | {cell(wall, 0)} |")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "results/runs/negatives")
    groups = {"tune": defaultdict(list), "compare": defaultdict(list), "k": defaultdict(list)}
    for run in sorted(p for p in out.glob("**/*-s[0-9]*") if p.is_dir() and "compositional" not in p.parts):
        m = ROW.match(run.name)
        result = finished(run)
        if m is None:
            continue
        if result is None:
            print(f"note: {run} has not finished; left out", file=sys.stderr)
            continue
        if run.parent.name == "tune":
            groups["tune"][m["row"]].append(result)
        elif m["k"] is None:
            groups["compare"][m["row"]].append(result)
        else:
            groups["k"][(m["row"], int(m["k"]))].append(result)
    if groups["tune"]:
        table(groups["tune"], "Tuning contrastive.py on the validation episodes (seed 0)", "run")
    if groups["compare"]:
        table(groups["compare"], "Each method at its recipe (plain shuffled batches)", "row")
    if groups["k"]:
        by_row = dict(sorted(groups["k"].items()))
        table({f"{row}, K={k}": v for (row, k), v in by_row.items()}, "False negatives: --per-group K", "row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
