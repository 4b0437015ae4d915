"""The tables of results/negatives.sh, from its runs: one-shot on the 20 official runs (the test: eval.json of
`python eval.py RUN/last.pt`) and on the validation episodes (log.jsonl), at the last epoch, with wall time.

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

ROW = re.compile(r"^(?P<row>.+?)(?:-k(?P<k>\d+))?-s(?P<seed>\d+)$")


def finished(run):
    """(test one-shot of last.pt's eval.json, the log's last validation one-shot, wall seconds) of a finished run (its
    eval.json is that of its last.pt, and RUN.txt holds the training's wall time), else None."""
    txt, ev = run.with_name(run.name + ".txt"), run / "eval.json"
    wall = re.search(r"^wall_s ([\d.]+)$", txt.read_text(), re.MULTILINE) if txt.exists() else None
    if wall is None or not ev.exists() or not (ev := json.loads(ev.read_text()))["checkpoint"].endswith("last.pt"):
        return None
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return (
        ev["results"]["trained"]["one_shot_20way"],
        [r for r in log if "val_one_shot" in r][-1]["val_one_shot"],
        float(wall[1]),
    )


def cell(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows, title, key_name):
    print(f"\n### {title}\n")
    print(f"| {key_name} | seeds | test one-shot | validation one-shot | wall time (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, runs in rows.items():
        test, val, wall = zip(*runs)
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
