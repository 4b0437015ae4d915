"""Unlabelled folders (issue #18 item 4): --data folder on images with no class structure trains on two
augmentations of one image and is judged by aug_copy_recall@1, the retrieval of augmented copies of held-out
images, in the log, in the closing summary and in eval.py. Tiny generated data, one thread, no network."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

import byol
import eval as ev
from tiny_data import MODULES, SCRIPTS, args_for, jpeg_bytes, make_folder, one_thread, random_image  # noqa: F401  (a fixture)

METRIC = "aug_copy_recall@1"


def make_flat(root, n=24, seed=0):
    """n images directly in root: RGB PNGs, one grayscale ('L') PNG and one RGB JPEG."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n - 2):
        random_image(rng).save(root / f"img{i:02d}.png")
    random_image(rng).convert("L").save(root / "gray.png")
    (root / "photo.jpg").write_bytes(jpeg_bytes(random_image(rng)))
    return root


def tiny_argv(method, data_dir, out, extra=()):
    dims = (
        ["--proj-dim", "16", "--pred-dim", "8"] if method == "simsiam" else ["--hidden-dim", "32", "--proj-dim", "16"]
    )
    return [
        "--data",
        "folder",
        "--data-dir",
        str(data_dir),
        "--image-size",
        "16",
        "--width",
        "8",
        *dims,
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--workers",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def folder_args(data_dir, *extra):
    return args_for(byol, ["--data", "folder", "--data-dir", data_dir, "--image-size", "16", "--workers", "1", *extra])


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return make_flat(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="module")
def runs(flat, tmp_path_factory, one_thread):  # noqa: F811
    """Each script trained for two epochs on the flat folder: {method: (run dir, printed output)}."""
    done = {}
    for method in SCRIPTS:
        out, printed = tmp_path_factory.mktemp(method) / "run", io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert MODULES[method].main(tiny_argv(method, flat, out)) == 0
        done[method] = out, printed.getvalue()
    return done


# ----------------------------------------------------------------------------- which folders are unlabelled


def test_images_directly_in_the_folder_are_unlabelled_class_subfolders_are_classes(flat, tmp_path):
    args = folder_args(flat)
    assert (args.labels, args.pairs) == ("none", "aug")
    classes = folder_args(make_folder(tmp_path / "classes", classes=2, per_class=3))
    assert (classes.labels, classes.pairs) == ("folders", "natural")
    data = byol.load_data(args)
    assert data.labels is None and len(data.test_pairs) == 0
    assert len(data.images) == 24 and {n.rsplit("/", 1)[1] for n in data.names} >= {"gray.png", "photo.jpg"}
    gray = data.images[data.names.index(str(flat / "gray.png"))]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # 'L' decoded to RGB
    # Two views of one training image; the held-out ones are never trained on, and each has two copies.
    assert data.groups.shape[1] == 1 and torch.equal(data.groups[:, 0], data.anchors)
    assert not data.test_images[data.anchors].any() and data.test_images.sum() == round(24 * args.holdout)
    assert torch.equal(data.copy_of.unique(), data.test_images.nonzero().flatten())
    assert len(data.copies) == 2 * data.test_images.sum() and data.copies.dtype == torch.uint8


def test_a_tree_without_class_structure(tmp_path):
    root = tmp_path / "photos"
    make_flat(root / "2024" / "june", n=6, seed=1)
    make_flat(root / "2025", n=5, seed=2)
    # Class-like subfolders: auto reads classes; --labels none takes every image of the tree.
    assert folder_args(root).labels == "folders"
    data = byol.load_data(folder_args(root, "--labels", "none"))
    assert len(data.images) == 11 and data.labels is None and len(data.copies) == 2 * round(11 * 0.2)
    # A loose image beside the subfolders: no class structure to read, the whole tree is unlabelled.
    make_flat(root, n=3, seed=3)
    args = folder_args(root)
    assert args.labels == "none" and len(byol.load_data(args).images) == 14


def test_misread_folders_are_one_line_errors(flat, tmp_path, capsys):
    def error(argv):
        assert byol.main(argv + ["--out", str(tmp_path / "run"), "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "--labels none" in error(["--data", "folder", "--data-dir", str(flat), "--labels", "folders"])
    assert "unlabelled images" in error(["--data", "folder", "--data-dir", str(flat), "--freeze-encoder"])


# ----------------------------------------------------------------------------- the metric


def pixel_recall(data):
    """aug_copy_recall@1 of the raw pixels, in luminance: the augmentation turns one copy in five gray."""
    held, owner = data.copy_of.unique(return_inverse=True)
    pixels = lambda x: byol.gray(x.float() / 255).flatten(1)  # noqa: E731
    return byol.copy_recall_at_1(pixels(data.copies), pixels(data.images[held]), owner)


def test_raw_pixels_find_mildly_augmented_copies_and_a_constant_scores_chance(flat):
    mild = byol.load_data(
        folder_args(
            flat,
            "--holdout",
            "0.5",
            "--crop-min-scale",
            "0.9",
            "--jitter-strength",
            "0",
            "--flip-prob",
            "0",
            "--solarize-prob",
            "0",
        )
    )
    assert pixel_recall(mild) == 1.0
    assert (
        pixel_recall(byol.load_data(folder_args(flat, "--holdout", "0.5"))) < 0.7
    )  # the recipe's: the copies are hard
    held, owner = mild.copy_of.unique(return_inverse=True)
    assert byol.copy_recall_at_1(torch.ones(len(owner), 4), torch.ones(len(held), 4), owner) == pytest.approx(
        1 / len(held)
    )


def test_the_metric_is_the_same_at_every_evaluation(flat, one_thread):  # noqa: F811
    args = folder_args(flat)
    first, second = byol.load_data(args), byol.load_data(args)
    assert torch.equal(first.copies, second.copies) and torch.equal(first.copy_of, second.copy_of)
    torch.manual_seed(0)
    model = byol.build_model(args)
    a, b = byol.evaluate(model, first, "cpu"), byol.evaluate(model, second, "cpu")
    assert METRIC in a and a[METRIC] == b[METRIC]
    assert byol.quality_name(a) == METRIC


# ----------------------------------------------------------------------------- the three scripts and eval.py


@pytest.mark.parametrize("method", SCRIPTS)
def test_each_script_trains_and_reports_the_metric(runs, method):
    out, printed = runs[method]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 0 and log[-1]["epoch"] == 2
    assert METRIC in log[0] and METRIC in log[-1] and "collapse_std" in log[-1] and "effective_rank" in log[-1]
    assert not any(k in r for r in log for k in ("recall@1", "knn@20", "r_precision"))
    assert "unlabelled images" in printed and "--pairs aug" in printed
    # The trained value is best.pt's: the best validation epoch, the start (epoch 0) included.
    scored = [r for r in log if f"val_{METRIC}" in r]
    chosen = max(scored, key=lambda r: r[f"val_{METRIC}"]) if scored else log[-1]
    assert f"{METRIC}: {chosen[METRIC]:.3f} trained vs {log[0][METRIC]:.3f} untrained" in printed
    assert torch.load(out / "last.pt", weights_only=False)["args"]["labels"] == "none"


@pytest.mark.parametrize("method", SCRIPTS)
def test_eval_reports_the_same_value_as_the_last_log_line(runs, method, tmp_path, capsys):
    out, _ = runs[method]
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert ev.main([str(out / "last.pt"), "--no-pictures", "--out", str(tmp_path), "--workers", "1"]) == 0
    assert f"aug_copy_retrieval/{METRIC}" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert result["aug_copy_retrieval"][METRIC] == last[METRIC]
    assert (
        result["aug_copy_retrieval"]["copies"] == 2 * result["aug_copy_retrieval"]["originals"] == 2 * round(24 * 0.2)
    )
    assert "collapse" in result


def test_eval_keeps_the_runs_own_labels(runs, capsys):
    out, _ = runs["byol"]
    assert ev.main([str(out / "last.pt"), "--labels", "folders", "--no-pictures"]) == 2
    assert "--labels comes from CHECKPOINT" in capsys.readouterr().err
