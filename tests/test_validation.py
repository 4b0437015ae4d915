"""Runs that validate themselves and are honest about their baselines (issue 28): validation carved from the
training part alone, best.pt at the best validation epoch, early stopping that survives --resume, the baselines
of the epoch-0 record and the summary's warning, and defaults that fit the data's size."""

import json
from argparse import Namespace

import pytest
import torch

import byol
import eval as ev
from tiny_data import make_folder, make_tll, one_thread, run_main  # noqa: F401

FAST = ["--image-size", "16", "--width", "8", "--hidden-dim", "32", "--proj-dim", "16", "--workers", "1", "--no-progress"]


# ----------------------------------------------------------------------------- the validation split


def images_of(data, which):
    """Image indices of the held-out part (test: data; validation: data.validation) and of what training sees."""
    held = set(which.test_pairs.flatten().tolist())
    if which.test_images is not None:
        held |= set(which.test_images.nonzero().flatten().tolist())
    return held


def seen_in_training(data):
    return set(data.anchors.tolist()) | set(data.groups[data.groups >= 0].tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validation_classes_are_disjoint_from_test_classes_and_from_training(seed):
    labels = torch.arange(20).repeat_interleave(3)
    images = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)
    d = byol.grouped_data(images, [str(i) for i in range(len(labels))], labels, 0.3, seed, "natural", None, 0.25)
    test, val, train = images_of(d, d), images_of(d, d.validation), seen_in_training(d)
    assert test and val and train
    assert not test & val and not val & train and not test & train
    val_classes, test_classes = set(labels[list(val)].tolist()), set(labels[list(test)].tolist())
    assert len(val_classes) == round(14 * 0.25) and not val_classes & test_classes  # whole classes: 4 of the 14 training ones


@pytest.mark.parametrize("seed", [0, 1])
def test_validation_pairs_are_disjoint_from_test_pairs_and_from_training(seed):
    n = 30
    images = torch.zeros(2 * n, 3, 8, 8, dtype=torch.uint8)
    for mode in ("natural", "aug"):
        d = byol.pairs_data(images, [str(i) for i in range(2 * n)], list(range(n)), list(range(n, 2 * n)), 0.2, seed, mode, 0.2)
        test, val, train = images_of(d, d), images_of(d, d.validation), seen_in_training(d)
        assert len(d.validation.test_pairs) == round(24 * 0.2) and len(d.test_pairs) == 6
        assert not test & val and not val & train and not test & train


def test_validation_images_of_an_unlabelled_folder_are_disjoint(tmp_path):
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    args = byol.fill_defaults(byol.parse_args(["--data", "folder", "--image-size", "8", "--arch", "resnet18", "--holdout", "0.25", "--val-fraction", "0.2"]))
    d = byol.unlabelled_data(images, [str(i) for i in range(40)], args)
    test, val, train = images_of(d, d), images_of(d, d.validation), seen_in_training(d)
    assert len(test) == 10 and len(val) == 6 and len(train) == 24
    assert not test & val and not val & train and not test & train
    assert set(d.validation.copy_of.tolist()) == val  # its copies are of validation images only


def test_too_few_classes_carve_no_validation():
    assert byol.carve_validation([0, 1, 2], 0.2, 0) == ([0, 1, 2], [])  # two to validate would leave one to train
    assert byol.carve_validation([0, 1, 2, 3], 0.0, 0) == ([0, 1, 2, 3], [])
    train, val = byol.carve_validation(list(range(10)), 0.2, 0)
    assert len(val) == 2 and sorted(train + val) == list(range(10))


# ----------------------------------------------------------------------------- best.pt, early stopping, resume


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"), classes=12, per_class=6)


def folder_run(folder, out, *extra):
    # Seed 1: validation peaks at epoch 2 of 6 here, so that best.pt is not last.pt.
    return ["--data", "folder", "--data-dir", folder, "--out", out, "--eval-every", "1", "--seed", "1", *FAST, *extra]


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory, one_thread):  # noqa: F811
    base = tmp_path_factory.mktemp("runs")
    whole = run_main(byol, folder_run(folder, base / "whole", "--epochs", "6", "--patience", "0"))
    stopped = run_main(byol, folder_run(folder, base / "stopped", "--epochs", "6", "--patience", "1"))
    first = run_main(byol, folder_run(folder, base / "split", "--epochs", "6", "--patience", "0", "--stop-after-epochs", "3"))
    second = run_main(byol, ["--resume", base / "split" / "last.pt", "--no-progress"])
    return {"base": base, "whole": whole, "stopped": stopped, "first": first, "second": second}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_best_pt_is_the_best_validation_epoch(runs):
    assert runs["whole"][0] == 0, runs["whole"][2]
    last, best = load(runs["base"] / "whole" / "last.pt"), load(runs["base"] / "whole" / "best.pt")
    scored = [r for r in last["history"] if "val_r_precision" in r]
    assert len(scored) == 7  # the start and the 6 epochs
    top = max(scored, key=lambda r: r["val_r_precision"])  # the first of equals
    assert 0 < best["epoch"] == top["epoch"] < last["epoch"] == 6
    assert best["early_stopping"]["best"] == top["val_r_precision"] == best["history"][-1]["val_r_precision"]
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    # The summary reports best.pt's test metric, chosen on validation, beside the last epoch's.
    assert f"r_precision: {top['r_precision']:.3f} trained vs " in runs["whole"][1]
    assert f"best.pt: epoch {top['epoch']}, chosen on val_r_precision" in runs["whole"][1]


def test_the_start_competes_for_best_pt(folder, tmp_path, monkeypatch, one_thread):  # noqa: F811
    # Validation that only falls after the start: best.pt must stay the network the run began with.
    real, calls = byol.evaluate, []

    def falling(*a, **k):
        record = real(*a, **k)
        calls.append(1)
        return {**record, "val_r_precision": 1.0 - 0.1 * len(calls)} if "val_r_precision" in record else record

    monkeypatch.setattr(byol, "evaluate", falling)
    out = tmp_path / "run"
    rc, printed, err = run_main(byol, folder_run(folder, out, "--epochs", "3", "--patience", "0"))
    assert rc == 0, err
    best, last = load(out / "best.pt"), load(out / "last.pt")
    assert best["epoch"] == 0 and last["epoch"] == 3 and last["early_stopping"]["best_epoch"] == 0
    # Patience counts against the best trained evaluation, not the start: epoch 1 resets it, 2 and 3 do not.
    trained = [r["val_r_precision"] for r in last["history"][1:]]
    assert trained == sorted(trained, reverse=True) and last["history"][0]["val_r_precision"] > trained[0]
    assert last["early_stopping"]["trained_best"] == trained[0] and last["early_stopping"]["stale"] == 2
    torch.manual_seed(1)  # the run's seed: the weights it started from
    start = byol.build_model(byol.parse_args([str(a) for a in folder_run(folder, out)])).state_dict()
    assert all(torch.equal(best["model"][k], start[k]) for k in start)
    first = last["history"][0]
    assert f"r_precision: {first['r_precision']:.3f} trained vs " in printed
    assert "best.pt: epoch 0, the start: no epoch beat its val_r_precision 0.900" in printed
    assert ev.main([str(out / "best.pt"), "--no-pictures"]) == 0  # a checkpoint of epoch 0 evaluates like any other


def test_patience_stops_when_validation_stops_improving(runs):
    rc, out, err = runs["stopped"]
    assert rc == 0, err
    last = load(runs["base"] / "stopped" / "last.pt")
    state = last["early_stopping"]
    scored = [r["val_r_precision"] for r in last["history"][1:]]  # patience counts evaluations of training only
    # Stopped at the first evaluation that did not beat the best trained one before it, and not before.
    first_stale = next(i for i in range(1, len(scored)) if scored[i] <= max(scored[:i]))
    assert state["stopped"] and last["epoch"] == first_stale + 1 < 6  # this seed's validation stalls by then
    assert "early stop: val_r_precision has not improved for 1 evaluations" in out
    # A resumed run that had stopped early trains nothing more.
    rc, out, err = run_main(byol, ["--resume", runs["base"] / "stopped" / "last.pt", "--no-progress"])
    assert rc == 0 and load(runs["base"] / "stopped" / "last.pt")["epoch"] == last["epoch"], err


def test_resume_keeps_the_early_stopping_state(runs):
    assert runs["first"][0] == 0 and runs["second"][0] == 0, runs["second"][2]
    whole, split = load(runs["base"] / "whole" / "last.pt"), load(runs["base"] / "split" / "last.pt")
    assert split["early_stopping"] == whole["early_stopping"]  # the count and the best carried over the resume
    assert load(runs["base"] / "split" / "best.pt")["epoch"] == load(runs["base"] / "whole" / "best.pt")["epoch"]
    log = [json.loads(line) for line in (runs["base"] / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(7))


# ----------------------------------------------------------------------------- baselines


def test_the_epoch_0_record_holds_the_baselines_on_the_same_held_out_data(runs, capsys):
    first = load(runs["base"] / "whole" / "last.pt")["history"][0]
    for metric in ("r_precision", "val_r_precision"):
        assert first[f"baseline_untrained_{metric}"] == first[metric]
        assert 0 <= first[f"baseline_pixels_{metric}"] <= 1
    assert "baselines of r_precision: " in runs["whole"][1] and " raw pixels" in runs["whole"][1]
    # eval.py's raw pixels on the run's own split give the logged pixel baseline.
    ev.main([str(runs["base"] / "whole" / "last.pt"), "--baseline", "pixels", "--no-pictures", "--eval-shift", "0"])
    pixels = json.loads((runs["base"] / "whole" / "eval-baseline-pixels" / "eval.json").read_text())
    assert pixels["metrics"]["metric_learning"]["r_precision"] == pytest.approx(first["baseline_pixels_r_precision"])
    # eval.py on the checkpoint prints the trained value beside them.
    capsys.readouterr()
    ev.main([str(runs["base"] / "whole" / "best.pt"), "--no-pictures"])
    printed = capsys.readouterr().out
    assert "(baselines: the run's epoch 0, same held-out data)" in printed and "raw pixels" in printed


def history(trained, **baselines):
    first = {"epoch": 0, "r_precision": baselines.get("untrained", 0.3), **{f"baseline_{k}_r_precision": v for k, v in baselines.items()}}
    first["baseline_pixels_val_r_precision"] = 0.99  # another metric's baseline: never compared with this one
    return [first, {"epoch": 1, "r_precision": trained}]


def test_summary_warns_when_the_trained_metric_beats_no_baseline():
    text = byol.summary(history(0.45, untrained=0.44, pixels=0.54))
    assert text.splitlines()[0] == "r_precision: 0.450 trained vs 0.440 untrained, 0.540 raw pixels"
    assert text.splitlines()[1].startswith("warning: trained r_precision 0.450 does not beat raw pixels 0.540")
    # A baseline another helper adds (frozen pretrained features) joins by its key alone.
    text = byol.summary(history(0.60, untrained=0.44, pixels=0.54, pretrained=0.70))
    assert "0.700 frozen pretrained features" in text and "does not beat frozen pretrained features 0.700" in text
    # Above every baseline: no warning; level with one is not above it.
    assert "warning" not in byol.summary(history(0.60, untrained=0.44, pixels=0.54))
    assert "warning" in byol.summary(history(0.54, untrained=0.44, pixels=0.54))


# ----------------------------------------------------------------------------- defaults that fit the data


def fit_args(**given):
    """What fit_to_data reads: no flag given unless `given` says so."""
    none_given = {"data": "folder", "pretrained": False, "freeze_encoder": False, "batch_size": None, "epochs": None,
                  "warmup_epochs": None, "lr": None, "optimizer": "adamw"}
    return Namespace(**{**none_given, **given})


@pytest.mark.parametrize("anchors, world, expected", [(77, 1, 32), (3000, 1, 128), (4, 1, 2), (48, 1, 16), (77, 2, 32), (9, 4, 8)])
def test_the_batch_follows_the_data_without_a_flag(anchors, world, expected):
    args = fit_args(epochs=3, warmup_epochs=0.3)
    byol.fit_to_data(args, anchors, world, is_main=False)
    assert args.batch_size == expected and args.batch_size % world == 0
    assert anchors // args.batch_size >= 2 or anchors < 4 * world  # two steps an epoch wherever the data has them
    assert args.lr == pytest.approx(byol.BASE_LR["adamw"] * expected / 256)
    given = fit_args(batch_size=100, epochs=3, warmup_epochs=0.3)
    byol.fit_to_data(given, anchors, world, is_main=False)
    assert given.batch_size == 100  # a flag is never overridden


@pytest.mark.parametrize("anchors", [3, 50, 1000, 3000, 30_000, 10 ** 7])
def test_the_epochs_follow_the_data_without_a_flag(anchors):
    recipe = byol.RECIPES["folder"]
    args = fit_args()
    byol.fit_to_data(args, anchors, 1, is_main=False)
    # Within the pair budget (one epoch at least), and lowered no further than it needs.
    assert args.epochs == recipe["epochs"] or args.epochs * anchors <= recipe["max_pairs"] < (args.epochs + 1) * anchors \
        or (args.epochs == 1 and anchors > recipe["max_pairs"])
    assert args.epochs * anchors <= recipe["max_pairs"] or args.epochs == 1
    assert args.warmup_epochs == min(10.0, 0.1 * args.epochs)
    given = fit_args(epochs=500)
    byol.fit_to_data(given, anchors, 1, is_main=False)
    assert given.epochs == 500  # a flag is never overridden
    omniglot = fit_args(data="omniglot")
    byol.fit_to_data(omniglot, anchors, 1, is_main=False)
    assert (omniglot.epochs, omniglot.warmup_epochs) == (45, 4.5)  # no budget: its tuned epochs, whatever the data


def test_the_folder_recipe_starts_on_77_training_anchors(tmp_path, one_thread):  # noqa: F811
    root = make_folder(tmp_path / "data", classes=14, per_class=11)  # 7 classes held out, 77 images left to train
    rc, out, err = run_main(byol, ["--data", "folder", "--data-dir", root, "--holdout", "0.5", "--val-fraction", "0",
                                   "--epochs", "1", "--out", tmp_path / "run", *FAST])
    assert rc == 0, err
    assert "batch size 32: the recipe's 128, lowered for the 77 training anchors" in out
    assert f"--baseline pretrained --arch tf_efficientnet_lite0 --image-size 224 --data folder --data-dir {root}" in out


def test_a_low_effective_rank_gets_a_plain_warning(capsys):
    healthy = {"collapse_std": 0.05, "healthy_std": 0.0625, "effective_rank": 40.0, "r_precision": 0.6}
    byol.warn_collapse(healthy)
    assert capsys.readouterr().err == ""
    byol.warn_collapse({**healthy, "effective_rank": 9.0})
    assert "warning: the representation spans few directions" in capsys.readouterr().err
    byol.warn_collapse({**healthy, "collapse_std": 1e-4})
    assert "warning: the representation looks collapsed" in capsys.readouterr().err


def test_the_logged_knn_and_r_precision_agree_with_eval(runs):
    last = load(runs["base"] / "whole" / "last.pt")
    record = last["history"][-1]
    ev.main([str(runs["base"] / "whole" / "last.pt"), "--no-pictures"])
    result = json.loads((runs["base"] / "whole" / "eval.json").read_text())
    knn = [k for k in record if k.startswith("knn@")]
    assert knn == ["knn@3"]  # 6 images per held-out class: 3 references, so k stops at 3
    assert result["metrics"]["classification"]["knn@3"] == pytest.approx(record["knn@3"])
    assert result["metrics"]["metric_learning"]["r_precision"] == pytest.approx(record["r_precision"])


@pytest.mark.parametrize("name", ["byol", "simsiam", "bn_only", "contrastive"])
def test_a_run_from_scratch_names_the_pretrained_baseline_it_did_not_measure(name):
    mod = __import__(name)
    args = mod.parse_args(["--data", "folder", "--data-dir", "photos", "--holdout", "0.5", "--seed", "3"])
    note = mod.pretrained_note(args)
    assert "--baseline pretrained" in note and "--data folder --data-dir photos --holdout 0.5 --seed 3" in note
    # Nothing to add where the run measured pretrained features itself, or where no user data is in question.
    assert mod.pretrained_note(mod.parse_args(["--data", "folder", "--data-dir", "photos", "--pretrained"])) is None
    # Fine-tuned photo pairs: the whitened frozen features at 224 px, same split, into a run directory of their own.
    tll = mod.fill_defaults(mod.parse_args(["--data", "tll", "--data-dir", "tll", "--holdout", "0.3", "--seed", "2"]))
    note = mod.pretrained_note(tll)
    assert "--data tll --data-dir tll --holdout 0.3 --seed 2 --freeze-encoder --pca-dim 256" in note
    assert f"--out {tll.out}-whitened" in note
    assert mod.pretrained_note(mod.parse_args([])) is None
