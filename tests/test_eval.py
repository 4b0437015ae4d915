"""eval.py: the metrics on hand-built embeddings whose answers are known, then the CLI end
to end on tiny data made in tmp_path (a TLL layout, a class-folder dataset, a miniature
of the embedded Omniglot) with a one-epoch byol.py checkpoint. No network."""

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import byol
import eval as ev

REPO = Path(__file__).resolve().parents[1]
FAST = ["--workers", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (3-5x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- metrics, by hand


def test_identical_embeddings_rank_first():
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    greater, ties, top = ev.match_ranks(x, x.clone(), rows=7)
    assert greater.tolist() == [0] * 30 and ties.tolist() == [0] * 30
    assert top[:, 0].tolist() == list(range(30))
    m = ev.retrieval_metrics(greater, ties)
    assert m == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0, "median_rank": 1.0}


def test_known_ranks_and_ties():
    # Every query is (4, 3, 2, 1) and the gallery is the identity: the match of query i
    # (gallery i) has similarity 4-i, so it ranks exactly i+1.
    query, gallery = torch.tensor([[4.0, 3, 2, 1]]).repeat(4, 1), torch.eye(4)
    greater, ties, top = ev.match_ranks(query, gallery, rows=3)
    assert greater.tolist() == [0, 1, 2, 3] and ties.tolist() == [0, 0, 0, 0]
    assert top.tolist() == [[0, 1, 2, 3]] * 4
    m = ev.retrieval_metrics(greater, ties, ks=(1, 2, 5))
    assert m["recall@1"] == pytest.approx(1 / 4) and m["recall@2"] == pytest.approx(2 / 4) and m["recall@5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert m["median_rank"] == pytest.approx(2.5)
    # The other way round all four gallery items are identical: a four-way tie, scored
    # as a random order in expectation (a collapsed network is at chance, not perfect).
    greater, ties, _ = ev.match_ranks(gallery, query, rows=4)
    assert greater.tolist() == [0] * 4 and ties.tolist() == [3] * 4
    m = ev.retrieval_metrics(greater, ties, ks=(1, 2, 5))
    assert m["recall@1"] == pytest.approx(1 / 4) and m["recall@2"] == pytest.approx(1 / 2) and m["recall@5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert m["median_rank"] == pytest.approx(2.5)


def test_shuffled_pairs_recall_is_the_fraction_of_fixed_points():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 16, generator=gen)
    perm = torch.tensor([0, 1, 2, 4, 3, 6, 7, 5, 9, 10, 11, 8])  # 3 fixed points
    m = ev.retrieval_metrics(*ev.match_ranks(x, x[perm], rows=5)[:2])
    assert m["recall@1"] == pytest.approx(3 / 12)


@pytest.mark.parametrize("rows", [1, 3, 7, 40])
def test_chunked_ranking_equals_one_block(rows):
    gen = torch.Generator().manual_seed(2)
    q, g = torch.randn(40, 16, generator=gen), torch.randn(40, 16, generator=gen)
    g[:20] = q[:20] + 0.5 * torch.randn(20, 16, generator=gen)
    whole = ev.match_ranks(q, g, rows=len(q))
    chunked = ev.match_ranks(q, g, rows=rows)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    labels = torch.randint(0, 5, (40,), generator=gen)
    assert ev.metric_learning_metrics(q, labels, rows=rows) == pytest.approx(
        ev.metric_learning_metrics(q, labels, rows=40)
    )


def test_chunk_rows_respects_the_memory_budget():
    assert ev.chunk_rows(6016, 512) * 6016 * 4 * 3 <= 512 * 2**20
    assert ev.chunk_rows(10**9, 1) == 1  # never zero rows


def test_metric_learning_by_hand():
    # Points on the unit circle (degrees). Class 0: A=0, B=30, C=100; class 1: D=45, E=120.
    # Neighbours by angle and relevance (1 = same class) within the first R:
    #   A (R=2): B, D -> [1, 0]  P@1=1  RP=1/2  MAP@R=(1/1)/2        = 1/2
    #   B (R=2): D, A -> [0, 1]  P@1=0  RP=1/2  MAP@R=(1/2)/2        = 1/4
    #   C (R=2): E, D -> [0, 0]  all 0
    #   D (R=1): B    -> [0]     all 0
    #   E (R=1): C    -> [0]     all 0
    angles = torch.tensor([0.0, 30, 100, 45, 120]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 0, 0, 1, 1])
    for rows in (1, 2, 5):
        m = ev.metric_learning_metrics(x, labels, rows=rows)
        assert m["queries"] == 5
        assert m["precision@1"] == pytest.approx(1 / 5)
        assert m["r_precision"] == pytest.approx((1 / 2 + 1 / 2) / 5)
        assert m["map@r"] == pytest.approx((1 / 2 + 1 / 4) / 5)
    # A class with a single item gives no query (R = 0).
    m = ev.metric_learning_metrics(
        torch.cat([x, torch.tensor([[0.0, -1.0]])]), torch.tensor([0, 0, 0, 1, 1, 2]), rows=2
    )
    assert m["queries"] == 5 and m["map@r"] == pytest.approx(0.15)


def test_one_shot_n_way():
    eye = torch.eye(20)
    answer = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    exact = [(eye, eye[answer], answer)] * 3
    assert ev.one_shot_accuracy(exact, 20) == 1.0 and ev.one_shot_accuracy(exact, 5) == 1.0
    # Each test item is closest to the class after its own, second to its own class: 20-way
    # is always wrong; 5-way is right when that class is not among the 4 of 19 distractors.
    wrong = [(eye, eye[(answer + 1) % 20] + 0.5 * eye[answer], answer)] * 50
    assert ev.one_shot_accuracy(wrong, 20) == 0.0
    assert ev.one_shot_accuracy(wrong, 5) == pytest.approx(15 / 19, abs=0.05)


def test_knn_and_linear_probe_on_separable_features():
    gen = torch.Generator().manual_seed(4)
    centres = 5 * torch.randn(3, 8, generator=gen)
    labels = torch.arange(3).repeat_interleave(30)
    feats = centres[labels] + torch.randn(90, 8, generator=gen)
    train, test = torch.arange(90) % 2 == 0, torch.arange(90) % 2 == 1
    for k in (20, 200):
        assert ev.knn_accuracy(byol, feats[train], labels[train], feats[test], labels[test], k, rows=4) == 1.0
    assert ev.linear_probe(feats[train], labels[train], feats[test], labels[test]) == 1.0
    # Labels that have nothing to do with the features: the probe is near chance (1/3).
    shuffled = labels[torch.randperm(90, generator=gen)]
    assert ev.linear_probe(feats[train], shuffled[train], feats[test], shuffled[test]) < 0.7


def test_knn_split_protocols():
    labels = torch.arange(6).repeat_interleave(5)
    # Whole classes held out (folder data): reference and queries come from held-out classes.
    data = SimpleNamespace(labels=labels, test_images=labels >= 4)
    ref, query, protocol = byol.knn_split(data, max_images=None)
    assert protocol.startswith("held-out classes")
    assert set(labels[ref].tolist()) == set(labels[query].tolist()) == {4, 5}
    assert not set(ref.tolist()) & set(query.tolist()) and len(ref) + len(query) == 10
    # Held-out images of the training classes (CIFAR/STL): training images are the reference.
    data = SimpleNamespace(labels=labels, test_images=torch.arange(30) % 5 == 0)
    ref, query, protocol = byol.knn_split(data, max_images=3)
    assert protocol.startswith("training") and len(ref) == len(query) == 3
    assert data.test_images[query].all() and not data.test_images[ref].any()


def test_separation_auc():
    m = ev.separation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0]))
    assert m["auc"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)  # the tie at 2.0 counts half
    assert m["positive_mean"] == pytest.approx(2.0) and m["random_mean"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- tiny data and a run


def make_tll(root, n=24, seed=0):
    """n pairs of 32x32 JPEGs: even pairs share a coarse pattern (findable), odd pairs are
    unrelated, so that retrieval is neither perfect nor hopeless."""
    rng = np.random.default_rng(seed)
    for side in ("left", "right"):
        (root / side).mkdir(parents=True)
    for i in range(n):
        bases = (
            [rng.integers(0, 256, (4, 4, 3))] * 2 if i % 2 == 0 else [rng.integers(0, 256, (4, 4, 3)) for _ in range(2)]
        )
        for side, base in zip(("left", "right"), bases):
            img = np.kron(base, np.ones((8, 8, 1))) + rng.integers(-40, 40, (32, 32, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / side / f"{i:03d}.jpg")
    return root


def make_folder(root, classes=4, per_class=6, seed=1):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for k in range(per_class):
            img = colour + rng.integers(-90, 90, (32, 32, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{k}.png")
    return root


def make_omniglot(root, characters=5, runs=2):
    """A miniature of the embedded data/omniglot: a few background characters, one validation
    alphabet's 20 characters by two drawers, and the first official one-shot runs, copied from the shipped zips."""
    root.mkdir(parents=True)
    src = REPO / "data" / "omniglot"
    with zipfile.ZipFile(src / "images_background_small1.zip") as zin:
        pngs = sorted(n for n in zin.namelist() if n.endswith(".png"))
        keep = sorted({n.rsplit("/", 1)[0] for n in pngs})[:characters]  # .../alphabet/character
        with zipfile.ZipFile(root / "images_background_small1.zip", "w") as zout:
            for n in pngs:
                if n.rsplit("/", 1)[0] in keep:
                    zout.writestr(n, zin.read(n))
    with zipfile.ZipFile(src / "images_background_small2.zip") as zin:
        pngs = sorted(n for n in zin.namelist() if n.endswith(".png") and "/Japanese_(katakana)/" in n)
        keep = sorted({n.rsplit("/", 1)[0] for n in pngs})[:20]  # one validation episode's worth of characters
        with zipfile.ZipFile(root / "images_background_small2.zip", "w") as zout:
            for n in pngs:
                if n.rsplit("/", 1)[0] in keep and n.rsplit("_", 1)[1] in ("01.png", "02.png"):
                    zout.writestr(n, zin.read(n))
    with zipfile.ZipFile(src / "all_runs.zip") as zin, zipfile.ZipFile(root / "all_runs.zip", "w") as zout:
        for n in zin.namelist():
            if n.split("/")[0] in {f"run{r:02d}" for r in range(1, runs + 1)} and not n.endswith("/"):
                zout.writestr(n, zin.read(n))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch byol.py run on the tiny TLL layout, half of the pairs held out."""
    base = tmp_path_factory.mktemp("eval")
    tll = make_tll(base / "tll")
    out = base / "run"
    code = byol.main(
        [
            "--data",
            "tll",
            "--no-pretrained",
            "--data-dir",
            str(tll),
            "--holdout",
            "0.5",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--image-size",
            "16",
            "--hidden-dim",
            "32",
            "--proj-dim",
            "16",
            "--stem",
            "imagenet",
            "--no-progress",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    ckpt = torch.load(out / "last.pt", weights_only=False)
    return SimpleNamespace(base=base, tll=tll, dir=out, ckpt=out / "last.pt", history=ckpt["history"])


def evaluate(argv, capsys):
    assert ev.main([str(a) for a in argv] + FAST) == 0
    printed = capsys.readouterr().out
    out = Path(printed.strip().splitlines()[-1].removeprefix("wrote ").split(",")[0])
    return json.loads(out.read_text()), printed


def check_ranges(metrics):
    """Every metric where it can lie."""
    for key, value in ev.flatten(metrics):
        name = key.rsplit("/", 1)[-1]
        if name in ("pairs", "runs", "queries", "dim", "reference_images", "query_images", "protocol"):
            continue
        if name == "median_rank":
            assert 1 <= value <= metrics["retrieval"]["pairs"], key
        elif name == "effective_rank":
            assert 1 <= value <= metrics["collapse"][key.split("/")[1]]["dim"], key
        elif name in ("positive_mean", "random_mean"):
            assert -1 <= value <= 1, key
        else:
            assert 0 <= value <= 1, key


def check_png(path):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_checkpoint_on_its_own_split(run, capsys):
    result, printed = evaluate([run.ckpt], capsys)
    assert result["source"]["method"] == "byol" and result["data"]["data"] == "tll"
    m = result["metrics"]
    assert m["retrieval"]["pairs"] == 12  # half of the 24 pairs, as in the run
    check_ranges(m)
    # The very split and weights the run evaluated at its last epoch: the same Recall@1.
    assert m["retrieval"]["left_to_right"]["recall@1"] == pytest.approx(run.history[-1]["recall@1"])
    assert 0 < m["retrieval"]["left_to_right"]["recall@1"] < 1
    assert (
        m["collapse"]["projector"]["dim"] == 16 and m["collapse"]["encoder"]["dim"] == 64
    )  # the tll recipe: conv4, width 64
    assert m["collapse"]["projector"]["effective_rank"] <= 16
    assert "left_to_right/recall@1" in printed and "median_rank" in printed
    assert (run.dir / "eval.json").is_file()
    for name in ("retrieval_grid.png", "similarity_hist.png"):
        check_png(run.dir / name)


def test_random_baseline_is_the_runs_untrained_network_on_the_same_split(run, tmp_path, capsys):
    with_ckpt, _ = evaluate([run.ckpt, "--baseline", "random", "--no-pictures"], capsys)
    assert (run.dir / "eval-baseline-random" / "eval.json").is_file()
    untrained = with_ckpt["metrics"]["retrieval"]["left_to_right"]["recall@1"]
    assert untrained == pytest.approx(run.history[0]["recall@1"])  # epoch 0 of the run
    # Without a checkpoint, the same seed and holdout give the same split and the same network.
    flags, _ = evaluate(
        [
            "--baseline",
            "random",
            "--data",
            "tll",
            "--arch",  # the run's: the tll recipe's own backbone is the pretrained Lite0
            "conv4",
            "--data-dir",
            run.tll,
            "--holdout",
            "0.5",
            "--image-size",
            "16",
            "--stem",
            "imagenet",
            "--out",
            tmp_path,
            "--no-pictures",
        ],
        capsys,
    )
    assert flags["metrics"]["retrieval"] == with_ckpt["metrics"]["retrieval"]
    assert "projector" not in flags["metrics"]["collapse"]


def first(module, kind):
    """The first submodule of a kind (conv4 and the resnets name their layers differently)."""
    return next(m for m in module.modules() if isinstance(m, kind))


def test_random_bn_baseline_fits_batch_norm_statistics_to_the_training_images(run, capsys, monkeypatch):
    fitted = {}
    recalibrate = ev.recalibrate_batch_norm

    def spy(mod, model, images, device, batch_size=256):
        recalibrate(mod, model, images, device, batch_size)
        fitted["images"], fitted["bn1"] = images, first(model.encoder, torch.nn.BatchNorm2d)

    monkeypatch.setattr(ev, "recalibrate_batch_norm", spy)
    result, _ = evaluate([run.ckpt, "--baseline", "random-bn", "--no-pictures"], capsys)
    assert result["source"]["baseline"] == "random-bn"
    # The first BN's statistics are those of its input on the training images, nothing held out.
    mod, ckpt = ev.load_checkpoint(run.ckpt)
    args, _ = ev.run_args(ev.parse_args([str(run.ckpt)]), mod, ckpt)
    data = mod.load_data(args)
    assert len(fitted["images"]) == len(data.anchors) < 256  # one batch: the plain mean and variance
    assert sorted(map(bytes, fitted["images"].numpy())) == sorted(map(bytes, data.images[data.anchors].numpy()))
    torch.manual_seed(args.seed)
    encoder = mod.build_encoder(args.arch, args.stem, width=args.width)[0].eval()
    conv1 = first(encoder, torch.nn.Conv2d)(byol.normalize(fitted["images"])).transpose(0, 1).flatten(1)
    assert torch.allclose(fitted["bn1"].running_mean, conv1.mean(1), atol=1e-5)
    assert torch.allclose(fitted["bn1"].running_var, conv1.var(1), rtol=1e-4)
    # ... and they change what the untrained network retrieves.
    untrained, _ = evaluate([run.ckpt, "--baseline", "random", "--no-pictures"], capsys)
    assert result["metrics"]["collapse"] != untrained["metrics"]["collapse"]


def test_pairs_csv_all_pairs_in_a_small_memory_budget(run, tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "left,right\n" + "".join(f"{run.tll}/left/{i:03d}.jpg,{run.tll}/right/{i:03d}.jpg\n" for i in range(24))
    )
    # A budget of a few bytes ranks one row at a time (equal to one block: see the unit test).
    whole, _ = evaluate(
        [
            run.ckpt,
            "--data",
            "pairs",
            "--pairs-csv",
            csv,
            "--all-pairs",
            "--memory-mb",
            "1e-6",
            "--out",
            tmp_path,
            "--no-pictures",
        ],
        capsys,
    )
    assert whole["metrics"]["retrieval"]["pairs"] == 24 and whole["data"]["data"] == "pairs"
    assert "all pairs" in whole["data"]["split"]
    check_ranges(whole["metrics"])


def test_checkpoint_on_labelled_folder_data(run, capsys):
    folder = make_folder(run.base / "folder")
    result, _ = evaluate(
        [run.ckpt, "--data", "folder", "--data-dir", folder, "--holdout", "0.5", "--embedding", "projector"], capsys
    )
    out = run.dir / "eval-folder-projector"
    assert result["embedding"] == "projector" and (out / "eval.json").is_file()
    m = result["metrics"]
    check_ranges(m)
    cls = m["classification"]
    assert cls["protocol"].startswith("held-out classes") and cls["reference_images"] == cls["query_images"] == 6
    # 3 references per class: k stops there (kNN@20 over 6 images would outvote a class by design)
    assert {"knn@3", "linear_probe"} <= set(cls) and not any(k in cls for k in ("knn@20", "knn@200"))
    assert m["metric_learning"]["queries"] == 12
    assert "retrieval" not in m  # one pair per held-out class is noise: R-Precision ranks them all


@pytest.mark.parametrize(
    "method, dims",
    [("simsiam", ["--proj-dim", "32", "--pred-dim", "16"]), ("bn_only", ["--hidden-dim", "32", "--proj-dim", "16"])],
)
def test_checkpoints_of_the_other_scripts(run, tmp_path, capsys, method, dims):
    mod = ev.import_method(method, "test")
    args = mod.fill_defaults(
        mod.parse_args(
            [
                "--data",
                "tll",
                "--data-dir",
                str(run.tll),
                "--holdout",
                "0.5",
                "--image-size",
                "16",
                "--stem",
                "imagenet",
                "--workers",
                "1",
                *dims,
            ]
        )
    )
    state = {
        "method": method,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": mod.build_model(args).state_dict(),
        "epoch": 0,
        "split": mod.load_data(args).split,
        "history": [],
    }
    torch.save(state, tmp_path / "last.pt")
    result, _ = evaluate([tmp_path / "last.pt", "--no-pictures", "--embedding", "projector"], capsys)
    assert result["source"]["method"] == method and result["metrics"]["retrieval"]["pairs"] == 12
    check_ranges(result["metrics"])


def test_omniglot_one_shot(tmp_path, capsys):
    omni = make_omniglot(tmp_path / "omniglot")
    result, _ = evaluate(
        [
            "--baseline",
            "random",
            "--data",
            "omniglot",
            "--data-dir",
            omni,
            "--image-size",
            "16",
            "--out",
            tmp_path / "out",
            "--no-pictures",
        ],
        capsys,
    )
    shot = result["metrics"]["one_shot"]
    assert shot["runs"] == 2
    assert 0 <= shot["20way"] <= shot["5way"] <= 1  # a 5-way choice keeps the true class
    assert result["metrics"]["retrieval"]["pairs"] == 1  # 1 of the 5 characters held out
    # The recipe trains on all of small1 (--holdout 0): collapse is then judged on the runs' images.
    result, _ = evaluate(
        [
            "--baseline",
            "random",
            "--data",
            "omniglot",
            "--data-dir",
            omni,
            "--image-size",
            "16",
            "--holdout",
            "0",
            "--out",
            tmp_path / "out0",
            "--no-pictures",
        ],
        capsys,
    )
    assert "retrieval" not in result["metrics"]
    features = byol.conv4_widths(byol.RECIPES["omniglot"]["width"])[-1]  # the recipe's untrained conv4
    assert (
        result["metrics"]["collapse"]["encoder"]["dim"] == features
        and result["metrics"]["val_one_shot"]["episodes"] == 50
    )


def test_plot_curves(run, tmp_path, capsys):
    assert ev.main(["--plot", str(run.dir), "--out", str(tmp_path)]) == 0
    check_png(tmp_path / "curves.png")
    # A log with an epoch logged twice (a crash between log and checkpoint) still plots.
    log = tmp_path / "log.jsonl"
    lines = (run.dir / "log.jsonl").read_text().splitlines()
    log.write_text("\n".join(lines + lines[-1:]) + "\n")
    assert ev.main(["--plot", str(log)]) == 0
    check_png(tmp_path / "curves.png")


def test_without_matplotlib(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert ev.main(["--plot", str(run.dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: matplotlib is not installed") and err.count("\n") == 1
    # Evaluation still writes its numbers, without pictures.
    assert ev.main([str(run.ckpt), "--out", str(tmp_path / "e")] + FAST) == 0
    assert "skipped the pictures" in capsys.readouterr().err
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["pictures"] == []


# ----------------------------------------------------------------------------- errors: one line, no traceback


def one_line_error(argv, capsys, *expected):
    assert ev.main([str(a) for a in argv] + FAST) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("eval.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_error_corrupt_and_foreign_checkpoints(run, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    one_line_error([garbage], capsys, str(garbage), "not a readable checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(run.ckpt.read_bytes()[:5000])
    one_line_error([truncated], capsys, str(truncated), "truncated")
    state_dict = tmp_path / "state_dict.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, state_dict)
    one_line_error([state_dict], capsys, str(state_dict), "something else")
    other = tmp_path / "moco.pt"
    torch.save({"method": "moco", "args": {}, "model": {}}, other)
    one_line_error([other], capsys, "written by moco")
    one_line_error([tmp_path / "missing.pt"], capsys, "does not exist")


def test_error_checkpoint_and_data_that_do_not_fit(run, tmp_path, capsys):
    one_line_error([run.ckpt, "--image-size", "32"], capsys, "--image-size 32", "16 px")
    one_line_error([run.ckpt, "--holdout", "0.1"], capsys, "--holdout 0.1", "training data")
    # Weights that do not match the checkpoint's own args.
    ckpt = torch.load(run.ckpt, weights_only=False)
    ckpt["args"]["hidden_dim"] = 64
    edited = tmp_path / "edited.pt"
    torch.save(ckpt, edited)
    one_line_error([edited], capsys, str(edited), "do not fit")
    # The data moved: the same split is found by file name. Different data: refused.
    moved = tmp_path / "moved"
    shutil.copytree(run.tll, moved)
    assert ev.main([str(run.ckpt), "--data-dir", str(moved), "--out", str(tmp_path / "m"), "--no-pictures"] + FAST) == 0
    capsys.readouterr()
    for side in ("left", "right"):
        (moved / side / "000.jpg").unlink()
    one_line_error([run.ckpt, "--data-dir", moved], capsys, f"--data-dir {moved}", "split differs")


def test_error_missing_data(run, tmp_path, capsys):
    one_line_error([run.ckpt, "--data-dir", tmp_path / "nowhere"], capsys, str(tmp_path / "nowhere"), "does not exist")
    one_line_error(["--baseline", "random", "--data", "tll"], capsys, "where it is looked for without --data-dir")
    one_line_error(["--baseline", "random", "--data", "omniglot", "--all-pairs"], capsys, "--all-pairs")
    one_line_error([], capsys, "nothing to evaluate")
    one_line_error(["--plot", tmp_path / "no-run"], capsys, "log.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 0}\nnot json\n')
    one_line_error(["--plot", bad], capsys, "line 2")
    one_line_error([run.ckpt, "--baseline", "random", "--embedding", "projector"], capsys, "no projector")
    one_line_error([run.ckpt, "--baseline", "random", "--init", tmp_path / "w.pt"], capsys, "--init")
    one_line_error([run.ckpt, "--arch", "resnet50"], capsys, "--arch comes from the checkpoint")


def test_pretrained_baseline_offline_is_one_line(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        if kwargs.get("weights") is not None:
            raise ConnectionError("no network")
        return real(*args, **kwargs)

    real = torchvision.models.resnet18
    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    one_line_error(["--baseline", "pretrained", "--image-size", "16"], capsys, "--baseline pretrained", "--init")


def test_cli_error_has_no_traceback(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 10)
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), str(garbage)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("eval.py: error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    )
