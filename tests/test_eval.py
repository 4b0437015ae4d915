"""eval.py evaluate: its metrics on hand-made embeddings against direct transcriptions of their definitions, then on
tiny runs trained in-process on prepared data files written here (prepare.py's format), and its command line as a
user runs it. No network."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

import byol
import eval as ev

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the command-line processes: one thread too (one_thread)
TINY = [
    "--image-size",
    "28",
    "--arch",
    "conv4",
    "--width",
    "8",
    "--hidden-dim",
    "16",
    "--proj-dim",
    "8",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--holdout",
    "0.3",
    "--val-fraction",
    "0.25",
    "--no-progress",
]


def write_data(path, kind="classes", groups=12, per_group=5, size=28, seed=0, **extra):
    """A prepared file: groups x per_group random images, group g holding images g * per_group + 0 .. per_group - 1."""
    n = groups * per_group
    images = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    torch.save(
        {
            "format": 1,
            "images": images,
            "kind": kind,
            "groups": torch.arange(n).view(groups, per_group),
            "group_names": [f"g{i}" for i in range(groups)],
            "names": [f"i{i}" for i in range(n)],
            "meta": {"source": "test", "root": str(path.parent), "image_size": size, "key": f"{kind}{seed}"},
            **extra,
        },
        path,
    )
    return path


def train(data_file, out, *flags):
    """A tiny byol.py run (about a second), trained in this process."""
    byol.train(byol.parse_args(["--data-file", str(data_file), *TINY, "--out", str(out), *flags]))
    return out


def cli(*argv):
    """python eval.py ARGV in a fresh process, as a user runs it (one thread: see one_thread)."""
    return subprocess.run(
        [sys.executable, "eval.py", *map(str, argv)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def one_line_error(capsys, argv, *words):
    """eval.py's main exits 2 with one line that starts 'eval.py: error:' and names `words`."""
    try:
        code = ev.main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("eval.py: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation, and on a busy 2-core machine it waits for a core (a
    Lite0 forward pass 50 times slower). Module-wide and autouse, so that the training fixtures run after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def classes_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    return train(write_data(root / "classes.pt"), root / "run")


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return train(write_data(root / "pairs.pt", "pairs", groups=20, per_group=2), root / "run")


def run_data(run):
    mod, ckpt, args, _ = ev.load_run(run)
    return args, byol.load_data(args), ev.trained_model(mod, ckpt, args)


# ----------------------------------------------------------------------------- metrics on hand-made embeddings


def tie_orders(sim_row):
    """Every order of the gallery that sorts sim_row from high to low: ties broken every way, each equally likely."""
    return [
        order
        for order in itertools.permutations(range(len(sim_row)))
        if all(sim_row[a] >= sim_row[b] for a, b in itertools.pairwise(order))
    ]


def brute_force_pairs(queries, gallery, ks=(1, 5, 10)):
    """Recall@K and MRR as defined: over every tie order, where query i's match (gallery i) lands."""
    sim = (F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T).tolist()
    recall, mrr = {k: 0.0 for k in ks}, 0.0
    for i, row in enumerate(sim):
        ranks = [order.index(i) + 1 for order in tie_orders(row)]
        mrr += sum(1 / r for r in ranks) / len(ranks)
        for k in ks:
            recall[k] += sum(r <= k for r in ranks) / len(ranks)
    return {k: v / len(sim) for k, v in recall.items()}, mrr / len(sim)


def test_recall_and_mrr_match_brute_force_with_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        n = int(torch.randint(2, 7, (1,), generator=gen))
        left, right = (torch.randint(0, 2, (n, 3), generator=gen).float() + 0.01 * (i == 0) for i in range(2))
        got = ev.pair_metrics(left, right)
        for way, q, g in (("l2r", left, right), ("r2l", right, left)):
            recall, mrr = brute_force_pairs(q, g)
            assert [got[f"{way}_recall@{k}"] for k in (1, 5, 10)] == pytest.approx(list(recall.values()), abs=1e-6)
            assert got[f"{way}_mrr"] == pytest.approx(mrr, abs=1e-9)
        assert got["l2r_recall@1"] == byol.recall_at_1(left, right)  # the scripts' own, exactly
        assert got["r2l_recall@1"] == byol.recall_at_1(right, left)


def test_collapsed_embedding_scores_chance():
    n = 12
    same = torch.ones(n, 4)
    got = ev.pair_metrics(same, same)
    assert got["l2r_recall@1"] == pytest.approx(1 / n) and got["l2r_recall@5"] == pytest.approx(5 / n)
    assert got["r2l_mrr"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)
    labels = torch.arange(4).repeat_interleave(3)  # 4 classes of 3: 2 of the 11 others share a class
    assert ev.class_metrics(same, labels)["precision@1"] == pytest.approx(2 / 11)


def test_class_metrics_match_their_definitions():
    gen = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(16, 5, generator=gen), torch.tensor([0] * 5 + [1] * 4 + [2] * 6 + [3])  # 3: alone
    got = ev.class_metrics(feats, labels)
    sim = F.normalize(feats, dim=1) @ F.normalize(feats, dim=1).T
    p1, rp, mapr, queries = 0.0, 0.0, 0.0, 0
    for i in range(len(feats)):
        others = sorted((j for j in range(len(feats)) if j != i), key=lambda j: -sim[i, j].item())
        relevant = [labels[j] == labels[i] for j in others]
        r = sum(relevant)
        if r == 0:
            continue
        queries += 1
        p1 += relevant[0]
        rp += sum(relevant[:r]) / r
        mapr += sum(sum(relevant[: k + 1]) / (k + 1) for k in range(r) if relevant[k]) / r
    assert got["precision@1"] == pytest.approx(p1 / queries)
    assert got["r_precision"] == pytest.approx(rp / queries) == byol.r_precision(feats, labels)
    assert got["map@r"] == pytest.approx(mapr / queries)


def test_weighted_knn_matches_its_definition():
    gen = torch.Generator().manual_seed(2)
    bank, bank_labels = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    queries, labels = torch.randn(25, 6, generator=gen), torch.randint(0, 3, (25,), generator=gen)
    correct = 0
    for q, y in zip(queries, labels):
        sims = [F.cosine_similarity(q, b, dim=0).item() for b in bank]
        nearest = sorted(range(len(bank)), key=lambda j: -sims[j])[:20]
        votes = [sum(math.exp(sims[j] / 0.07) for j in nearest if bank_labels[j] == c) for c in range(3)]
        correct += max(range(3), key=votes.__getitem__) == y
    assert ev.knn_accuracy(bank, bank_labels, queries, labels) == pytest.approx(correct / len(labels))


def test_whitening_whitens_and_is_capped_at_the_rank():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(200, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 3
    mean, w = ev.fit_whitening(feats)
    z = (F.normalize(feats, dim=1) - mean) @ w
    assert w.shape == (6, 6) and torch.allclose(z.T @ z / (len(z) - 1), torch.eye(6), atol=1e-3)
    assert ev.fit_whitening(feats[:4])[1].shape == (6, 3)  # 4 points span 3 directions
    assert ev.fit_whitening(feats, dims=2)[1].shape == (6, 2)


def cirtorch_whitenlearn(X, qidxs, pidxs):
    """cirtorch's whitenlearn (filipradenovic/cnnimageretrieval-pytorch), transcribed: X [d, n], L2-normed columns."""
    m = X[:, qidxs].mean(axis=1, keepdims=True)
    df = X[:, qidxs] - X[:, pidxs]
    S = np.dot(df, df.T) / df.shape[1]
    return m, S


def cirtorch_whitenlearn_from(m, S, X):
    P = np.linalg.inv(np.linalg.cholesky(S))
    df = np.dot(P, X - m)
    D = np.dot(df, df.T)
    eigval, eigvec = np.linalg.eig(D)
    order = eigval.argsort()[::-1]
    return np.dot(eigvec[:, order].T, P)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    d=st.integers(2, 12),
    extra=st.integers(0, 40),
    dims=st.integers(1, 12),
    shrinkage=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_learned_whitening_is_cirtorchs_whitenlearn_with_shrinkage(seed, d, extra, dims, shrinkage):
    """The same whitened cosines as the transcription (up to each output axis' sign, which cosines ignore), with the
    pairs' covariance shrunk toward its diagonal by `shrinkage`: 0 is cirtorch's plain estimate."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * d + 4 + extra  # more pairs than dimensions: cirtorch's Cholesky needs a full-rank covariance
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix
    pairs = torch.stack([torch.arange(0, n - 1, 2), torch.arange(1, n, 2)], 1)
    mean, w = ev.fit_pair_whitening(feats, pairs, dims, shrinkage)
    ours = F.normalize((F.normalize(feats, dim=1).float() - mean) @ w, dim=1).double()
    X = F.normalize(feats, dim=1).numpy().T
    m, S = cirtorch_whitenlearn(X, pairs[:, 0].numpy(), pairs[:, 1].numpy())
    S = (1 - shrinkage) * S + shrinkage * np.diag(np.diag(S))
    P = cirtorch_whitenlearn_from(m, S, X)
    theirs = torch.from_numpy(np.dot(P[:dims], X - m).T.real)
    theirs = F.normalize(theirs, dim=1)
    assert w.shape == (d, min(dims, d))
    assert torch.allclose(ours @ ours.T, theirs @ theirs.T, atol=2e-4), (ours @ ours.T - theirs @ theirs.T).abs().max()


def test_verdict_names_the_strongest_baseline():
    found = {"raw pixels": {"m": 0.30}, "untrained conv4": {"m": 0.50}, "frozen x": {"other": 0.9}}
    assert ev.verdict("m", 0.4, found) == (
        "trained 0.4000: does NOT beat the strongest baseline, untrained conv4 0.5000, by -0.1000 (m)"
    )
    assert ev.verdict("m", 0.6, found).startswith("trained 0.6000: beats the strongest baseline, untrained conv4 0.5")
    assert ev.verdict("m", 0.5, found).startswith("trained 0.5000: does NOT beat")  # a tie does not beat


# ----------------------------------------------------------------------------- each kind of data, on raw pixels


@pytest.mark.parametrize("kind", ["labelled", "unlabelled", "one_shot"])
def test_each_kind_scores_its_metric(tmp_path, kind):
    gen = torch.Generator().manual_seed(4)
    runs = torch.randperm(30, generator=gen)[:24].view(3, 2, 4)
    near_copies = torch.randint(0, 256, (30, 3, 28, 28), generator=gen, dtype=torch.uint8)  # query i ~ reference i
    near_copies[runs[:, 1]] = (
        near_copies[runs[:, 0]] + torch.randint(0, 60, (3, 4, 3, 28, 28), generator=gen, dtype=torch.uint8)
    ).clamp(max=255)
    extra = {
        "labelled": {"labels": torch.randint(0, 3, (30,), generator=gen), "test": torch.arange(30) >= 20},
        "unlabelled": {},
        "one_shot": {"test_runs": runs, "images": near_copies},
    }[kind]
    path = write_data(
        tmp_path / "d.pt",
        "classes" if kind == "one_shot" else "images",
        30 if kind != "one_shot" else 6,
        1 if kind != "one_shot" else 5,
        **extra,
    )
    args = byol.parse_args(["--data-file", str(path), "--image-size", "28", "--holdout", "0.3", "--eval-shift", "0"])
    data, pixels = byol.load_data(args), byol.Pixels()
    got = ev.measure(pixels, data, args, "cpu")
    flat = lambda idx: byol.normalize(data.images[idx]).flatten(1)
    if kind == "labelled":
        bank, test = torch.arange(20), torch.arange(20, 30)  # the official split, not a seeded one
        assert got["knn@20"] == ev.knn_accuracy(flat(bank), data.labels[bank], flat(test), data.labels[test])
    elif kind == "unlabelled":
        assert got["aug_copy_recall@1"] == byol.score(pixels, data, "test", args, "cpu")[1]
    else:  # each run: the query i finds its reference i among the run's 4, ties at random
        sims = torch.stack([F.normalize(flat(r[1]), dim=1) @ F.normalize(flat(r[0]), dim=1).T for r in runs])
        expected = byol.rank_of_true(sims.flatten(0, 1), torch.arange(4).repeat(3)).mean().item()
        assert got["one_shot_20way"] == pytest.approx(expected) and expected > 0.9
        assert "r_precision" in got  # the held-out classes too


# ----------------------------------------------------------------------------- runs


def test_pairs_run_metrics_and_the_scripts_recall(pairs_run, tmp_path, capsys):
    assert ev.main([str(pairs_run), "--baselines", "none", "--out", str(tmp_path / "folder")]) == 0
    report = json.loads((tmp_path / "folder" / "eval.json").read_text())  # an --out without .json: a folder
    trained = report["results"]["trained"]
    assert {f"{w}_{m}" for w in ("l2r", "r2l") for m in ("recall@1", "recall@5", "recall@10", "mrr")} == set(trained)
    args, data, model = run_data(pairs_run)
    assert report["metric"] == "l2r_recall@1" and report["test_groups"] == len(data.test) == 6
    assert trained["l2r_recall@1"] == pytest.approx(byol.score(model, data, "test", args, "cpu")[1], abs=1e-7)
    assert report["verdict"] is None and "nothing to compare with" in capsys.readouterr().out


def test_run_dir_and_checkpoint_give_the_same_result(classes_run, tmp_path):
    for name, where in (("a", classes_run), ("b", classes_run / "best.pt")):
        assert ev.main(["evaluate", str(where), "--baselines", "cheap", "--out", str(tmp_path / f"{name}.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["results"] == b["results"] and a["checkpoint"] == b["checkpoint"] == str(classes_run / "best.pt")
    assert set(a["results"]) == {"trained", "raw pixels", "untrained conv4"}
    strongest = max(["raw pixels", "untrained conv4"], key=lambda k: a["results"][k]["r_precision"])
    assert f"the strongest baseline, {strongest} " in a["verdict"]
    assert {"collapse_std", "effective_rank"} <= set(a["collapse"])


def test_whitening_is_fitted_on_training_images_only(classes_run, tmp_path, monkeypatch, capsys):
    """The frozen-encoder baselines with a tiny stand-in encoder (native size 32 px: the 28 px images upsampled), PCA
    and learned whitening of them and of the trained features: each fitted on training images and their pairs."""
    torch.manual_seed(0)
    encoder = byol.build_encoder("conv4", width=[8] * 4)[0]
    monkeypatch.setattr(ev, "pretrained_encoder", lambda arch: (encoder, 32))
    fitted, fit, fit_pairs = [], ev.fit_whitening, ev.fit_pair_whitening
    monkeypatch.setattr(ev, "fit_whitening", lambda feats, *a: fitted.append((feats, None)) or fit(feats, *a))
    monkeypatch.setattr(ev, "fit_pair_whitening", lambda f, pairs: fitted.append((f, pairs)) or fit_pairs(f, pairs))
    assert ev.main([str(classes_run), "--out", str(tmp_path / "e.json")]) == 0
    results = json.loads((tmp_path / "e.json").read_text())["results"]
    frozen = "frozen tf_efficientnet_lite0 32px"
    assert {
        frozen,
        f"{frozen} whitened",
        f"{frozen} whitened from positives",
        "trained, whitened",
        "trained, whitened from positives",
    } <= set(results)
    assert "upsampled to 32 px" in capsys.readouterr().out
    _, data, _ = run_data(classes_run)
    members = data.groups[data.train].flatten()
    members = members[members >= 0].sort().values  # whitened() orders the images by index
    embed = lambda part: byol.embed_images(ev.Embedding(encoder), ev.Resized(data.images, 32)[part], "cpu")[0]
    train_feats = embed(members)
    (pca, _), (learned, pairs) = fitted[:2]  # the frozen features' (the trained ones' follow)
    assert torch.equal(pca, learned) and len(fitted) == 12
    assert pca.shape == train_feats.shape and torch.allclose(pca, train_feats, atol=1e-5)
    assert not torch.allclose(pca.mean(0), embed(data.groups[data.test].flatten()).mean(0), atol=1e-3)
    label = {int(i): g for g, row in enumerate(data.groups[data.train]) for i in row if i >= 0}
    assert len(pairs) and all(label[int(members[a])] == label[int(members[b])] for a, b in pairs)
    # Validation's whitenings (the trained features', then the frozen ones'): fitted again on half of the training
    # classes, so that the other half, its distractors, stays unseen; then the halves swap.
    args = run_data(classes_run)[0]
    halves = byol.split(data.train, len(data.train) // 2, args.seed + 3)
    for (fit, pool), ((pca, _), (learned, pairs)) in zip([halves, halves[::-1]], [fitted[6:8], fitted[10:12]]):
        half = data.groups[fit].flatten()
        half = half[half >= 0].sort().values
        assert torch.equal(pca, learned) and torch.allclose(pca, embed(half), atol=1e-5) and 0 < len(half) < len(members)
        assert set(pairs.flatten().tolist()) <= set(range(len(half))) and not set(half.tolist()) & set(
            data.groups[pool].flatten().tolist()
        )


def test_validation_halves_the_training_classes_down_to_three(tmp_path):
    """Ten classes, half held out and a fifth of the rest carved for validation, leave 3 training classes, as on a
    10-class folder: validation still ranks among one half of them and fits each whitening on the other."""
    path = write_data(tmp_path / "d.pt", groups=10, per_group=5, size=16)
    flags = ["--image-size", "16", "--holdout", "0.5", "--val-fraction", "0.4", "--eval-shift", "0"]
    args = byol.parse_args(["--data-file", str(path), *flags])
    data = byol.load_data(args)
    assert len(data.train) == 3 and len(data.val) == 2
    pixels = ev.Embedding(nn.Flatten())
    entries = {"raw pixels": (byol.Pixels(), data, args)}
    entries["pixels whitened"] = (ev.whitened(pixels, data, "cpu")["whitened"], data, args)  # PCA: well posed here
    _, scores, how = ev.validate(entries, data, args, "cpu")
    assert how.startswith("the validation groups among images of each half")
    halves = byol.split(data.train, 1, args.seed + 3)
    for name, (e, _, _) in entries.items():
        on_halves = []
        for fit, pool in (halves, halves[::-1]):
            if name != "raw pixels":  # whitened again on the other half
                fitted = ev.whitened(pixels, SimpleNamespace(**{**vars(data), "train": fit}), "cpu")
                e = fitted["whitened"]
            on_halves.append(byol.score(e, SimpleNamespace(**{**vars(data), "train": pool}), "val", args, "cpu")[1])
        assert scores[name] == pytest.approx(sum(on_halves) / 2), name
    on_all = byol.score(entries["pixels whitened"][0], data, "val", args, "cpu")[1]  # fitted on its distractors
    assert scores["pixels whitened"] != pytest.approx(on_all)


def test_the_run_ships_the_best_start_on_validation_and_says_which(classes_run, tmp_path, capsys):
    chosen, line = ev.choose(
        {"trained": 0.5, "trained, whitened": 0.6, "raw pixels": 0.9, "frozen X": 0.7, "frozen X whitened": None}
    )  # raw pixels are a baseline, not a start
    assert chosen == "frozen X" and "+0.1000 over trained, whitened" in line and "did not beat" in line
    tie = {"trained": 0.7, "frozen X": 0.7, "trained, whitened": 0.6}
    chosen, line = ev.choose(tie)  # a tie that nothing breaks: the trained embedding, and the line says so
    assert chosen == "trained" and line.endswith("validation cannot decide") and "ties with frozen X (0.7000)" in line
    chosen, line = ev.choose(tie, alone={"trained": 0.4, "frozen X": 0.5})  # the validation classes alone break it
    assert chosen == "frozen X" and line.endswith("scores 0.5000 against 0.4000")
    assert (
        ev.choose({"trained": 0.8, "frozen X": 0.7})[1] == "ships trained, the best on validation (0.8000, "
        "+0.1000 over frozen X)"
    )
    chosen, line = ev.choose({"trained": None, "frozen X": None})
    assert chosen == "trained" and line.startswith("no validation data")
    assert ev.main([str(classes_run), "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    starts = {k: v for k, v in report["validation"].items() if k.startswith(("trained", "frozen"))}
    assert len(starts) == 6 and set(report["validation"]) == set(report["results"])
    assert report["validation_protocol"].startswith("the validation groups among images of each half")  # it says so
    alone = report["validation_alone"]  # what breaks ties
    assert report["chosen"] == max(starts, key=lambda k: (starts[k], alone.get(k, -1)))
    args, data, model = run_data(classes_run)  # validation among each half of the training classes, averaged
    split = byol.split(data.train, len(data.train) // 2, args.seed + 3)
    halves = [SimpleNamespace(**{**vars(data), "train": half}) for half in split]
    on_halves = lambda m: [byol.score(m, half, "val", args, "cpu")[1] for half in halves]  # noqa: E731
    assert len(set(on_halves(model))) == 2  # so that the mean below is of both
    assert report["validation"]["trained"] == pytest.approx(sum(on_halves(model)) / 2)
    pixels = byol.Pixels()  # not among all the training images
    assert report["validation"]["raw pixels"] == pytest.approx(sum(on_halves(pixels)) / 2)
    assert report["validation"]["raw pixels"] != pytest.approx(byol.score(pixels, data, "val", args, "cpu")[1])
    assert report["chosen_line"] in capsys.readouterr().out
    assert torch.load(classes_run / "chosen.pt", weights_only=True)["chosen"] == report["chosen"]


def test_baseline_without_a_run_uses_the_scripts_split(tmp_path):
    path = write_data(tmp_path / "d.pt")
    assert (
        ev.main(
            [
                "evaluate",
                "--baseline",
                "pixels",
                "--data-file",
                str(path),
                "--image-size",
                "28",
                "--seed",
                "3",
                "--holdout",
                "0.3",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    args = byol.parse_args(["--data-file", str(path), "--image-size", "28", "--seed", "3", "--holdout", "0.3"])
    expected = ev.measure(byol.Pixels(), byol.load_data(args), args, "cpu")
    assert json.loads((tmp_path / "e.json").read_text())["results"] == {"raw pixels": expected}


def test_pretrained_baseline_decodes_a_source_again_at_its_native_size(tmp_path, monkeypatch, capsys):
    """--data tll: the frozen encoder sees the source prepared again at its size (a stand-in: 40 px), same groups."""
    from PIL import Image

    gen = torch.Generator().manual_seed(6)
    for side in ("left", "right"):
        (tmp_path / "tll" / side).mkdir(parents=True)
        for i in range(10):
            pixels = torch.randint(0, 256, (48, 48, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "tll" / side / f"p{i}.png")
    monkeypatch.setenv("POSITIVE_SIMILARITY_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    encoder = byol.build_encoder("conv4", width=[8] * 4)[0]
    monkeypatch.setattr(ev, "pretrained_encoder", lambda arch: (encoder, 40))
    flags = [
        "--data",
        "tll",
        "--data-dir",
        str(tmp_path / "tll"),
        "--seed",
        "0",
        "--holdout",
        "0.3",
        "--image-size",
        "24",
    ]
    assert ev.main(["evaluate", "--baseline", "pretrained", *flags, "--out", str(tmp_path / "e.json")]) == 0
    assert "tll prepared again at 40 px" in capsys.readouterr().out
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (tmp_path / "cache").iterdir()) == ["24px.pt", "40px.pt"]
    args = byol.parse_args(flags[:-2] + ["--image-size", "40"])
    expected = ev.measure(ev.Embedding(encoder), byol.load_data(args), args, "cpu")
    assert json.loads((tmp_path / "e.json").read_text())["results"] == {"frozen tf_efficientnet_lite0 40px": expected}


def test_eval_json_is_atomic_and_never_overwritten(classes_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "e.json"
    out.write_text("mine")
    one_line_error(capsys, [str(classes_run), "--baselines", "none", "--out", str(out)], str(out), "--overwrite")
    assert out.read_text() == "mine"

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ev.os, "replace", fail)
    one_line_error(capsys, [str(classes_run), "--baselines", "none", "--out", str(out), "--overwrite"], "No space")
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["e.json"]
    monkeypatch.undo()
    assert ev.main([str(classes_run), "--baselines", "none", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["written_by"] == "eval.py evaluate"


def test_bad_inputs_are_one_line(classes_run, tmp_path, capsys):
    garbage, old = tmp_path / "garbage.pt", tmp_path / "old.pt"
    garbage.write_text("not a checkpoint")
    torch.save({"model": {}, "args": {}}, old)  # the layout before prepare.py: no "format"
    one_line_error(capsys, [str(tmp_path / "missing")], "missing", "neither a run directory nor a checkpoint")
    one_line_error(capsys, [str(tmp_path)], str(tmp_path))  # a folder without a checkpoint
    one_line_error(capsys, [str(garbage)], "garbage.pt", "not a readable checkpoint")
    one_line_error(capsys, [str(old)], "old.pt", "retrain")
    one_line_error(capsys, [str(classes_run), "--data-dir", str(tmp_path / "nowhere")], "nowhere")
    other = write_data(tmp_path / "other.pt", groups=13)  # other groups: its test split is not the run's
    one_line_error(capsys, [str(classes_run), "--data-file", str(other)], "not the run's")
    one_line_error(capsys, [str(classes_run), "--baseline", "pixels"], "--baseline")
    one_line_error(capsys, ["evaluate"], "nothing to evaluate")
    one_line_error(capsys, [str(classes_run), "--baselines", "some"], "--baselines")  # argparse's, in one line too


def test_evaluate_from_the_command_line(classes_run, tmp_path):
    """As a user runs it: python eval.py RUN (evaluate is the default command)."""
    out = tmp_path / "e.json"
    proc = cli(classes_run, "--baselines", "cheap", "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    verdict = next(line for line in lines if "the strongest baseline" in line)
    assert verdict == json.loads(out.read_text())["verdict"]
    assert any(line.startswith("trained ") and "r_precision" in lines[1] for line in lines)
    bad = cli(tmp_path / "nope")
    assert bad.returncode == 2 and bad.stderr.startswith("eval.py: error: ") and bad.stderr.count("\n") == 1
