"""results/summarize.py on a fabricated runs tree (two seeds, hand-computed means and stds).
No training: eval.json and log.jsonl are written by hand, last.pt holds only method and args."""

import importlib.util
import json
import math
import statistics
from pathlib import Path

import torch

import bn_only
import byol

REPO = Path(__file__).resolve().parents[1]


def load_summarize():
    spec = importlib.util.spec_from_file_location("results_summarize", REPO / "results" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def retrieval(l2r, r2l):
    """eval.py's retrieval block; l2r and r2l are (R@1, R@5, R@10)."""

    def block(r):
        return {"recall@1": r[0], "recall@5": r[1], "recall@10": r[2], "mrr": 0.5, "median_rank": 2.0}

    return {"pairs": 10, "left_to_right": block(l2r), "right_to_left": block(r2l)}


def collapse(std, rank, dim):
    return {
        "dim": dim,
        "std_mean": std,
        "std_min": std / 2,
        "std_max": std * 2,
        "healthy_std": 1 / math.sqrt(dim),
        "effective_rank": rank,
    }


def write_run(run_dir, data, seed, metrics, baseline=None, checkpoint=None, module=None, argv=(), log=None):
    run_dir.mkdir(parents=True)
    source = {"baseline": baseline, "arch": "resnet18", "stem": "imagenet"}
    if module is not None:
        args = module.fill_defaults(module.parse_args([*argv, "--seed", str(seed), "--out", str(run_dir)]))
        saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        torch.save({"method": module.METHOD, "args": saved}, run_dir / "last.pt")
        source.update(checkpoint=str(run_dir / "last.pt"), method=module.METHOD, epoch=3)
    if checkpoint is not None:
        source.update(checkpoint=str(checkpoint), method="byol", epoch=3)
    result = {
        "source": source,
        "data": {
            "data": data,
            "split": f"the run's held-out split (seed {seed}, holdout 0.2)",
            "seed": seed,
            "holdout": 0.2,
            "image_size": 28,
        },
        "embedding": "encoder",
        "metrics": metrics,
    }
    (run_dir / "eval.json").write_text(json.dumps(result))
    if log is not None:
        (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def epoch_log(quality_key, values, stds, ranks):
    return [
        {"epoch": e, quality_key: q, "collapse_std": s, "healthy_std": 1 / 16, "effective_rank": r}
        for e, (q, s, r) in enumerate(zip(values, stds, ranks))
    ]


def table_rows(section):
    """{row name: [cells]} of the markdown table in one section of the output."""
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith(("| row", "| ---"))
    }


def test_tables_and_curves(tmp_path, capsys):
    out = tmp_path / "runs"
    om, tll = out / "omniglot", out / "tll"
    # byol on Omniglot, seeds 0 and 1
    for seed, (one_shot, l2r, r2l, pstd, prank, estd, erank) in enumerate(
        [(0.25, 0.2, 0.4, 0.01, 10.0, 0.03, 100.0), (0.30, 0.5, 0.3, 0.03, 20.0, 0.05, 120.0)]
    ):
        write_run(
            om / f"byol-s{seed}",
            "omniglot",
            seed,
            module=byol,
            metrics={
                "retrieval": retrieval((l2r, 0.9, 1.0), (r2l, 0.9, 1.0)),
                "one_shot": {"runs": 20, "20way": one_shot, "5way": 0.6},
                "collapse": {"encoder": collapse(estd, erank, 512), "projector": collapse(pstd, prank, 256)},
            },
            log=epoch_log("one_shot", [0.2, one_shot], [0.02, pstd], [30.0, prank]),
        )
    # one ablation seed (bn_only --no-bn) and the random baseline for both seeds
    write_run(
        om / "bn_only-no-bn-s0",
        "omniglot",
        0,
        module=bn_only,
        argv=["--no-bn"],
        metrics={
            "retrieval": retrieval((0.1, 0.5, 0.9), (0.1, 0.5, 0.9)),
            "one_shot": {"runs": 20, "20way": 0.05, "5way": 0.2},
            "collapse": {"encoder": collapse(0.001, 1.5, 512), "projector": collapse(0.0004, 1.2, 256)},
        },
        log=epoch_log("one_shot", [0.2, 0.05], [0.02, 0.0004], [30.0, 1.2]),
    )
    for seed, (one_shot, estd) in enumerate([(0.20, 0.004), (0.22, 0.006)]):
        write_run(
            om / f"baseline-random-s{seed}",
            "omniglot",
            seed,
            baseline="random",
            checkpoint=om / f"byol-s{seed}" / "last.pt",
            metrics={
                "retrieval": retrieval((0.1, 0.5, 0.9), (0.3, 0.5, 0.9)),
                "one_shot": {"runs": 20, "20way": one_shot, "5way": 0.5},
                "collapse": {"encoder": collapse(estd, 40.0, 512)},
            },
        )
    (om / "simsiam-s0").mkdir()  # unfinished: no eval.json, left out
    (om / "simsiam-s0" / "log.jsonl").write_text(json.dumps({"epoch": 0, "one_shot": 0.2}) + "\n")
    # byol on TLL, seeds 0 and 1: retrieval only
    data_dir = tmp_path / "tll-dev"
    for seed, (r1, r5, r10) in enumerate([(0.10, 0.30, 0.50), (0.20, 0.40, 0.70)]):
        write_run(
            tll / f"byol-s{seed}",
            "tll",
            seed,
            module=byol,
            argv=[
                "--data",
                "tll",
                "--no-pretrained",  # a recipe's True, turned off: the command must say --no-pretrained
                "--data-dir",
                str(data_dir),
                "--image-size",
                "32",
                "--stem",
                "imagenet",
                "--epochs",
                "10",
            ],
            metrics={
                "retrieval": retrieval((r1, r5, r10), (r1 + 0.02, r5 + 0.02, r10 + 0.02)),
                "collapse": {"encoder": collapse(0.02, 50.0, 512), "projector": collapse(0.05, 40.0, 256)},
            },
            log=epoch_log("recall@1", [0.05, r1], [0.02, 0.05], [30.0, 40.0]),
        )

    summarize = load_summarize()
    plots = tmp_path / "plots"
    assert summarize.main([str(out), "--plots-dir", str(plots)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    omniglot, tll_text = text.split("## tll")
    rows = table_rows(omniglot)

    # Omniglot: one-shot, R@1 (mean of both directions), proj std, proj healthy, proj rank, enc std, enc rank, n
    s = statistics.stdev
    assert abs(s([0.25, 0.30]) - 0.0354) < 5e-5 and abs(s([0.3, 0.4]) - 0.0707) < 5e-5  # the hand values below
    assert rows["byol"] == [
        "0.2750 ± 0.0354",
        "0.3500 ± 0.0707",
        "2.00e-02 ± 1.41e-02",
        "15.0 ± 7.1",
        "2.00e-02 ± 1.41e-02",
        "0.0625",
        "15.0 ± 7.1",
        "4.00e-02 ± 1.41e-02",
        "110.0 ± 14.1",
        "3",
        "2",
    ]
    assert rows["bn_only-no-bn"] == [
        "0.0500",
        "0.1000",
        "4.00e-04",
        "1.2",
        "4.00e-04",
        "0.0625",
        "1.2",
        "1.00e-03",
        "1.5",
        "3",
        "1",
    ]
    assert rows["baseline-random"] == [
        "0.2100 ± 0.0141",
        "0.2000 ± 0.0000",
        "–",
        "–",
        "–",
        "–",
        "–",
        "5.00e-03 ± 1.41e-03",
        "40.0 ± 0.0",
        "–",
        "2",
    ]
    assert "simsiam" not in rows and "simsiam-s0 has no eval.json" in captured.err
    assert omniglot.index("| baseline-random") < omniglot.index("| byol") < omniglot.index("| bn_only-no-bn")
    assert (
        "| row | test one-shot 20-way | R@1 held-out | train proj collapse_std | train proj eff. rank | proj collapse_std |"
        in omniglot
    )

    # Commands rebuilt from the saved args: only the non-default flags, S for the seed.
    assert (
        f"`python byol.py --seed S --out {om}/byol-sS` && `python eval.py {om}/byol-sS/last.pt --out {om}/byol-sS`"
        in text
    )
    assert f"`python bn_only.py --no-bn --seed S --out {om}/bn_only-no-bn-sS`" in text
    assert f"`python eval.py {om}/byol-sS/last.pt --baseline random --out {om}/baseline-random-sS`" in text
    assert "`byol`, S in 0, 1:" in omniglot and "`bn_only-no-bn`, S in 0:" in omniglot

    # TLL: R@1/5/10 as the mean of both directions (r->l is l->r + 0.02), then each direction's R@1
    assert "| row | R@1 | R@5 | R@10 | R@1 l→r | R@1 r→l | train proj collapse_std |" in tll_text
    assert table_rows(tll_text) == {
        "byol": [
            "0.1600 ± 0.0707",
            "0.3600 ± 0.0707",
            "0.6100 ± 0.1414",
            "0.1500 ± 0.0707",
            "0.1700 ± 0.0707",
            "5.00e-02 ± 0.00e+00",
            "40.0 ± 0.0",
            "5.00e-02 ± 0.00e+00",
            "0.0625",
            "40.0 ± 0.0",
            "2.00e-02 ± 0.00e+00",
            "50.0 ± 0.0",
            "3",
            "2",
        ]
    }
    assert (
        f"`python byol.py --data tll --no-pretrained --data-dir {data_dir} --image-size 32 --stem imagenet --epochs 10 "
        f"--seed S --out {tll}/byol-sS`"
    ) in tll_text

    for data in ("omniglot", "tll"):
        png = plots / f"{data}_curves.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commands_name_an_evaluation_shift_other_than_the_runs_own(tmp_path):
    """A run trained when the recipe logged at --eval-shift 1 and evaluated later at 3: its eval command says 3;
    a baseline's says its shift; a run evaluated at its own shift gets no flag."""
    summarize = load_summarize()
    args = byol.fill_defaults(byol.parse_args(["--eval-shift", "1", "--out", str(tmp_path / "byol-s0")]))
    saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    run = {"seed": 0, "row": "byol", "method": "byol", "dir": str(tmp_path / "byol-s0"), "args": saved}
    for shift, flag in [(3, "--eval-shift 3 "), (1, "")]:
        (line,) = summarize.commands([{**run, "eval": {"eval_shift": shift, "source": {}}}])
        assert "python byol.py --eval-shift 1 --seed S" in line
        assert f"python eval.py {tmp_path}/byol-sS/last.pt {flag}--out" in line
    source = {"baseline": "random", "checkpoint": str(tmp_path / "byol-s0" / "last.pt")}
    (line,) = summarize.commands(
        [{**run, "row": "baseline-random", "args": None, "eval": {"eval_shift": 3, "source": source}}]
    )
    assert f"--baseline random --eval-shift 3 --out {tmp_path}/byol-sS`" in line


def test_held_out_class_rows_show_r_precision_and_rows_without_it_a_dash(tmp_path, capsys):
    """Class folders are judged on every held-out image (R-Precision, P@1, kNN@20, linear probe), pairs on R@k."""
    out = tmp_path / "runs" / "generic"
    folders = {
        "retrieval": retrieval((0.3, 0.6, 0.9), (0.5, 0.7, 0.9)),
        "metric_learning": {"queries": 620, "precision@1": 0.629, "r_precision": 0.35, "map@r": 0.2},
        "classification": {"protocol": "x", "reference_images": 1, "query_images": 1, "knn@20": 0.561,
                           "knn@200": 0.4, "linear_probe": 0.784},
        "collapse": {"projector": collapse(0.03, 40.0, 256)},
    }
    write_run(out / "folder-byol-s0", "generic", 0, metrics=folders)
    write_run(out / "pairs-byol-s0", "generic", 0, metrics={"retrieval": retrieval((0.1, 0.2, 0.3), (0.1, 0.2, 0.3))})
    assert load_summarize().main([str(tmp_path / "runs"), "--plots-dir", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "| R@1 r→l | R-Precision | P@1 | kNN@20 | linear probe | proj collapse_std |" in text
    rows = table_rows(text)
    assert rows["folder-byol"][5:9] == ["0.3500", "0.6290", "0.5610", "0.7840"]
    assert rows["pairs-byol"][5:9] == ["–", "–", "–", "–"]
