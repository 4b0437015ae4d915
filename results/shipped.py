"""What runs ship against what a user already has: from each run's eval.json (`python eval.py RUN`), the trained
embedding's test score, the embedding eval.py chose on validation (what embed and export use) and its test score, and
the strongest baseline on the test; then the mean ± std over the runs given (e.g. a set's seeds). Also on
validation: the shipped embedding over the strongest frozen one (the TLL target is 1.2x).

    python results/shipped.py RUN [RUN ...]   # run directories evaluated by eval.py
"""

import json
import statistics
import sys
from pathlib import Path


def row(run):
    ev = json.loads((Path(run) / "eval.json").read_text())
    metric, results, val = ev["metric"], ev["results"], ev["validation"]
    base = max((k for k in results if not k.startswith("trained")), key=lambda k: results[k][metric])
    frozen = max((k for k in val if k.startswith("frozen") and val[k] is not None), key=val.get)
    return {
        "run": Path(run).name,
        "trained": results["trained"][metric],
        "shipped": results[ev["chosen"]][metric],
        "chosen": ev["chosen"],
        "baseline": results[base][metric],
        "baseline name": base,
        "val shipped / frozen": val[ev["chosen"]] / val[frozen],
        "metric": metric,
    }


if __name__ == "__main__":
    rows = [row(run) for run in sys.argv[1:]]
    ms = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    numbers = ["trained", "shipped", "baseline", "val shipped / frozen"]
    print(
        f"| run ({rows[0]['metric']}) | trained | shipped | strongest baseline | validation: shipped / frozen "
        "| shipped − baseline | chosen on validation | strongest baseline |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        cells = " | ".join(f"{r[k]:.3f}" for k in numbers)
        names = [r[k].replace("tf_efficientnet_lite0", "Lite0") for k in ("chosen", "baseline name")]
        print(f"| {r['run']} | {cells} | {r['shipped'] - r['baseline']:+.3f} | {' | '.join(names)} |")
    means = " | ".join(ms([r[k] for r in rows]) for k in numbers)
    print(f"| mean ± std | {means} | {ms([r['shipped'] - r['baseline'] for r in rows])} | | |")
