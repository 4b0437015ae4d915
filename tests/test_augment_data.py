"""Data loading, positive pairs and augmentation of the training scripts (byol.py, simsiam.py,
bn_only.py), checked in-process on tiny datasets made in tmp dirs (and the embedded Omniglot
zips). Nothing here trains a network."""

import argparse
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bn_only
import byol
import simsiam
from tiny_data import (
    args_for,
    batch_indices,
    make_folder,
    make_pairs_csv,
    make_tll,
    one_thread,  # noqa: F401  (fixture)
)

MODULES = {"byol": byol, "simsiam": simsiam, "bn_only": bn_only}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tll_dir(tmp_path_factory):
    return make_tll(tmp_path_factory.mktemp("tll"), n=20, seed=0)


@pytest.fixture(scope="module")
def tll_data(tll_dir):
    return byol.load_data(
        args_for(byol, ["--data", "tll", "--data-dir", tll_dir, "--image-size", "16", "--workers", "1"])
    )


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"), classes=5, per_class=6, seed=1)


@pytest.fixture(scope="module")
def omniglot():
    return byol.load_data(args_for(byol, ["--image-size", "16", "--workers", "2", "--holdout", "0.2"]))


def side_and_name(path):
    p = Path(path)
    return p.parent.name, p.name


# ----------------------------------------------------------------------------- TLL


def test_tll_images_are_the_files_in_name_order(tll_dir, tll_data):
    d = tll_data
    assert d.images.dtype == torch.uint8 and d.images.shape == (40, 3, 16, 16)
    assert len({bytes(im.flatten().tolist()) for im in d.images}) == 40, "tiny images must be distinct"
    for i in (0, 7, 19, 20, 33):
        side, name = side_and_name(d.names[i])
        want = byol.decode_image((tll_dir / side / name).read_bytes, name, 16)
        assert torch.equal(d.images[i], want), d.names[i]


def test_tll_positive_is_left_image_and_its_matching_right_image(tll_data):
    d = tll_data
    for epoch in (0, 1):
        first, second = batch_indices(byol, d, epoch, batch_size=8)
        assert len(first) == 16
        # every training anchor exactly once per epoch
        assert sorted(first.tolist()) == sorted(d.anchors.tolist())
        for i, j in zip(first.tolist(), second.tolist()):
            (s1, n1), (s2, n2) = side_and_name(d.names[i]), side_and_name(d.names[j])
            assert (s1, s2) == ("left", "right") and n1 == n2, (d.names[i], d.names[j])
    # the two epochs visit the anchors in different orders
    assert not torch.equal(batch_indices(byol, d, 0, 8)[0], batch_indices(byol, d, 1, 8)[0])


def test_tll_split_is_seeded_and_held_out_pairs_never_train(tll_dir, tll_data):
    d = tll_data
    held = d.split["test_pairs"]
    assert len(held) == 4 and len(d.test_pairs) == 4  # round(20 * 0.2)
    for left, right in held:
        assert side_and_name(left)[1] == side_and_name(right)[1]
    held_left = {side_and_name(left)[1] for left, _ in held}
    train_names = {side_and_name(d.names[i])[1] for i in d.anchors.tolist()}
    assert not held_left & train_names and len(held_left | train_names) == 20
    assert [[d.names[i], d.names[j]] for i, j in d.test_pairs.tolist()] == held
    again = byol.load_data(
        args_for(byol, ["--data", "tll", "--data-dir", tll_dir, "--image-size", "16", "--workers", "1"])
    )
    assert again.split == d.split
    other = byol.load_data(
        args_for(byol, ["--data", "tll", "--data-dir", tll_dir, "--image-size", "16", "--workers", "1", "--seed", "1"])
    )
    assert other.split != d.split


def test_tll_zip_archives_load_like_the_folders(tmp_path, tll_data):
    root = make_tll(tmp_path / "tllzip", n=20, seed=0, layout="zip")  # same images as tll_dir, zipped
    assert not (root / "left").exists()
    d = byol.load_data(args_for(byol, ["--data", "tll", "--data-dir", root, "--image-size", "16", "--workers", "3"]))
    assert torch.equal(d.images, tll_data.images)
    assert torch.equal(d.anchors, tll_data.anchors) and torch.equal(d.test_pairs, tll_data.test_pairs)
    assert [Path(n).name for n in d.names] == [Path(n).name for n in tll_data.names]
    assert all(n.startswith(f"{root}/left.zip:") for n in d.names[:20])
    assert all(n.startswith(f"{root}/right.zip:") for n in d.names[20:])


def test_tll_pairs_aug_uses_two_views_of_one_image(tll_dir):
    d = byol.load_data(
        args_for(
            byol, ["--data", "tll", "--data-dir", tll_dir, "--image-size", "16", "--workers", "1", "--pairs", "aug"]
        )
    )
    first, second = batch_indices(byol, d, 0, batch_size=8)
    assert len(first) == 32  # left and right images of the 16 training pairs
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------- pairs CSV


@pytest.mark.parametrize("header", [True, False])
def test_pairs_csv_relative_to_the_csv(tmp_path, monkeypatch, header):
    csv_path = make_pairs_csv(tmp_path / "p", n=12, header=header)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must resolve against the CSV, not the working directory
    d = byol.load_data(
        args_for(
            byol,
            ["--data", "pairs", "--pairs-csv", csv_path, "--image-size", "16", "--workers", "1", "--holdout", "0.25"],
        )
    )
    assert len(d.images) == 24 and len(d.anchors) == 9 and len(d.test_pairs) == 3
    first, second = batch_indices(byol, d, 0, batch_size=3)
    assert len(first) == 9
    for i, j in zip(first.tolist(), second.tolist()):
        a, b = Path(d.names[i]).name, Path(d.names[j]).name
        assert a.startswith("a_") and b == "b_" + a[2:], (a, b)
    want = byol.decode_image((csv_path.parent / "imgs" / "a_3.png").read_bytes, "a_3", 16)
    assert torch.equal(d.images[d.names.index(str(csv_path.parent / "imgs" / "a_3.png"))], want)


def test_pairs_csv_header_named_like_the_image_folders(tmp_path):
    """A CSV `left,right` header next to left/ and right/ folders (the TLL layout) is a header."""
    root = make_tll(tmp_path / "tll", n=10, seed=3)
    csv_path = root / "pairs.csv"
    csv_path.write_text("left,right\n" + "".join(f"left/p{i:03d}.jpg,right/p{i:03d}.jpg\n" for i in range(10)))
    d = byol.load_data(
        args_for(byol, ["--data", "pairs", "--pairs-csv", csv_path, "--image-size", "16", "--workers", "1"])
    )
    assert len(d.images) == 20 and len(d.anchors) + len(d.test_pairs) == 10


def test_pairs_csv_missing_first_image_is_reported_not_taken_for_a_header(tmp_path, capsys):
    """Without a header, a first row naming a missing image must be reported like any other row,
    not silently dropped as if it were a header."""
    csv_path = make_pairs_csv(tmp_path / "p", n=12, header=False)
    lines = csv_path.read_text().splitlines()
    lines[0] = lines[0].replace("a_0.png", "a_0_typo.png")
    csv_path.write_text("\n".join(lines) + "\n")
    rc = byol.main(
        [
            "--data",
            "pairs",
            "--pairs-csv",
            str(csv_path),
            "--image-size",
            "16",
            "--workers",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "a_0_typo.png" in err, err


# ----------------------------------------------------------------------------- folder


def test_folder_natural_pairs_are_two_images_of_one_class(folder_dir):
    d = byol.load_data(
        args_for(byol, ["--data", "folder", "--data-dir", folder_dir, "--image-size", "16", "--workers", "1"])
    )
    assert len(d.images) == 30
    assert int(d.test_images.sum()) == 6  # round(5 * 0.2) = 1 class held out
    first, second = batch_indices(byol, d, 0, batch_size=8)
    assert len(first) == 24
    for i, j in zip(first.tolist(), second.tolist()):
        assert i != j and Path(d.names[i]).parent == Path(d.names[j]).parent, (d.names[i], d.names[j])
        assert d.labels[i] == d.labels[j] and not d.test_images[i] and not d.test_images[j]
    # the partner is drawn at random among the other members: several partners per anchor over epochs
    partners = {}
    for epoch in range(6):
        f, s = batch_indices(byol, d, epoch, batch_size=8)
        for i, j in zip(f.tolist(), s.tolist()):
            partners.setdefault(i, set()).add(j)
    assert max(len(p) for p in partners.values()) >= 3


def test_folder_pairs_aug_uses_two_views_of_one_image(folder_dir):
    d = byol.load_data(
        args_for(
            byol,
            ["--data", "folder", "--data-dir", folder_dir, "--image-size", "16", "--workers", "1", "--pairs", "aug"],
        )
    )
    first, second = batch_indices(byol, d, 0, batch_size=8)
    assert len(first) == 24 and torch.equal(first, second)
    assert not d.test_images[first].any()


class ColourEncoder(nn.Module):
    """An 'oracle' encoder for make_folder's images: the mean colour, which differs per image,
    plus the class (folder) identity read from a lookup on the image itself."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # list of (normalised image, class one-hot)

    def forward(self, x):
        out = []
        for im in x:
            k = min(range(len(self.table)), key=lambda t: (self.table[t][0] - im).abs().sum().item())
            out.append(self.table[k][1])
        return torch.stack(out)


def test_folder_knn_metric_can_be_nonzero(folder_dir):
    """With an encoder that outputs the class itself, any kNN accuracy that the scripts report
    must be high; a kNN whose queries come from classes absent from its gallery is always 0."""
    d = byol.load_data(
        args_for(byol, ["--data", "folder", "--data-dir", folder_dir, "--image-size", "16", "--workers", "1"])
    )
    table = [
        (byol.normalize(d.images[i : i + 1])[0], nn.functional.one_hot(d.labels[i], 5).float() + 0.01 * torch.randn(5))
        for i in range(len(d.images))
    ]
    model = nn.Module()
    model.encoder, model.projector = ColourEncoder(table), nn.Identity()
    metrics = byol.evaluate(model, d, "cpu")
    assert "recall@1" not in metrics  # one pair per held-out class is noise: R-Precision ranks every held-out image
    assert metrics["r_precision"] == 1.0
    knn = [k for k in metrics if k.startswith("knn@")]
    assert knn and all(metrics[k] > 0.5 for k in knn), metrics


# ----------------------------------------------------------------------------- Omniglot


def test_omniglot_pair_is_one_character_by_two_people(omniglot):
    d = omniglot
    first, second = batch_indices(byol, d, 0, batch_size=64)
    assert len(first) == 64 * (len(d.anchors) // 64) > 1000
    for i, j in zip(first.tolist(), second.tolist()):
        char_i, file_i = d.names[i].rsplit("/", 1)
        char_j, file_j = d.names[j].rsplit("/", 1)
        assert char_i == char_j, (d.names[i], d.names[j])
        # Omniglot files are <character id>_<drawer>.png: another file of the character is another drawer
        assert file_i.split("_")[1] != file_j.split("_")[1], (d.names[i], d.names[j])


def test_omniglot_held_out_characters_never_train(omniglot):
    d = omniglot
    char = lambda i: d.names[i].rsplit("/", 1)[0]
    train_chars = {char(i) for i in d.anchors.tolist()}
    held = {char(i) for i in d.test_pairs.flatten().tolist()}
    assert held and not held & train_chars
    for i, j in d.test_pairs.tolist():
        assert char(i) == char(j) and i != j
    all_chars = {char(i) for i in range(len(d.names))}
    assert len(train_chars) + len(held) == len(all_chars) and len(held) == round(0.2 * len(all_chars))


def test_omniglot_split_names_the_held_out_characters(omniglot):
    """split.json is meant to hold the *names* of the held-out items (PairData.split); class
    indices like "3" cannot be read without re-deriving the loader's sort order."""
    held = sorted({omniglot.names[i].rsplit("/", 1)[0] for i in omniglot.test_pairs.flatten().tolist()})
    assert sorted(omniglot.split["test_classes"]) == held


def test_omniglot_one_shot_runs_are_20_by_20(omniglot):
    runs = omniglot.one_shot_runs
    assert len(runs) == 20
    for train, test, answer in runs:
        assert train.shape == test.shape == (20, 3, 16, 16) and train.dtype == test.dtype == torch.uint8
        assert sorted(answer.tolist()) == list(range(20))  # each training class is the answer of one test item
    # the runs differ from one another
    assert not torch.equal(runs[0][0], runs[1][0])


# ----------------------------------------------------------------------------- DDP sharing


def test_ddp_rank_shares_make_up_the_single_process_batch(folder_dir):
    """With 2 processes each rank takes half of the global batch; together they must draw the
    same positive pairs as one process with the same global batch (and the ranks must not all
    pick the same partner slot for their k-th pair)."""
    d = byol.load_data(
        args_for(byol, ["--data", "folder", "--data-dir", folder_dir, "--image-size", "16", "--workers", "1"])
    )
    f1, s1 = batch_indices(byol, d, 0, batch_size=8, world=1, rank=0)
    f0r, s0r = batch_indices(byol, d, 0, batch_size=8, world=2, rank=0)
    f1r, s1r = batch_indices(byol, d, 0, batch_size=8, world=2, rank=1)
    # anchors: rank r takes the r-th half of each global batch
    assert torch.equal(torch.stack([f0r.view(-1, 4), f1r.view(-1, 4)], 1).flatten(), f1)
    assert torch.equal(torch.stack([s0r.view(-1, 4), s1r.view(-1, 4)], 1).flatten(), s1)


# ----------------------------------------------------------------------------- augmentation


def aug_args(**overrides):
    """The augmentation flags with byol.py's non-Omniglot defaults."""
    return argparse.Namespace(
        **{
            "crop_min_scale": 0.2,
            "jitter_strength": 1.0,
            "flip_prob": 0.5,
            "solarize_prob": 0.2,
            "rotation": 0.0,
            "shear": 0.0,
            "stroke": 0.0,
            "gray_prob": 0.2,
            **overrides,
        }
    )


AUG = aug_args()
MEAN = torch.tensor(byol.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(byol.IMAGENET_STD).view(1, 3, 1, 1)


def unstandardize(v):
    return v * STD + MEAN


def test_augment_shape_dtype_and_range(tll_data):
    x = tll_data.images[:8]
    v1, v2 = byol.augment_pair(x, x.clone(), byol.step_generator(0, 0, "cpu"), AUG)
    for v in (v1, v2):
        assert v.shape == (8, 3, 16, 16) and v.dtype == torch.float32 and torch.isfinite(v).all()
        u = unstandardize(v)
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5


def test_augment_is_per_sample_and_seeded(tll_data):
    x = tll_data.images[3:4].expand(8, -1, -1, -1).contiguous()  # one image, 8 times
    v1, v2 = byol.augment_pair(x, x, byol.step_generator(0, 5, "cpu"), AUG)
    for v in (v1, v2):
        flat = v.flatten(1)
        dist = torch.cdist(flat, flat) + torch.eye(8) * 1e9
        assert dist.min() > 1e-3, "two copies of one image got the same view"
    assert not torch.equal(v1, v2)
    w1, w2 = byol.augment_pair(x, x, byol.step_generator(0, 5, "cpu"), AUG)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    u1, _ = byol.augment_pair(x, x, byol.step_generator(0, 6, "cpu"), AUG)
    assert not torch.equal(u1, v1)


def test_solarize_never_on_view_1_and_sometimes_on_view_2():
    """White images with no colour jitter stay white unless solarised (white -> black)."""
    x = torch.full((400, 3, 8, 8), 255, dtype=torch.uint8)
    args = aug_args(jitter_strength=0.0)
    v1, v2 = byol.augment_pair(x, x, byol.step_generator(1, 0, "cpu"), args)
    dark1 = (unstandardize(v1).flatten(1).max(1).values < 0.5).float().mean().item()
    dark2 = (unstandardize(v2).flatten(1).max(1).values < 0.5).float().mean().item()
    assert dark1 == 0.0
    assert 0.12 < dark2 < 0.28, dark2  # p = 0.2


def test_blur_always_on_view_1_and_rarely_on_view_2(monkeypatch):
    """Mark blurred samples: the blur is replaced by a constant grey 0.25 (never solarised)."""
    monkeypatch.setattr(byol, "gaussian_blur", lambda x, sigma: torch.full_like(x, 0.25))
    x = torch.full((400, 3, 8, 8), 255, dtype=torch.uint8)
    args = aug_args(jitter_strength=0.0)
    v1, v2 = byol.augment_pair(x, x, byol.step_generator(2, 0, "cpu"), args)
    grey = lambda v: ((unstandardize(v) - 0.25).abs().flatten(1).max(1).values < 1e-4).float().mean().item()
    assert grey(v1) == 1.0
    assert 0.04 < grey(v2) < 0.17, grey(v2)  # p = 0.1


def test_grayscale_sometimes_on_both_views():
    x = torch.full((400, 3, 8, 8), 25, dtype=torch.uint8)
    x[:, 0] = 100  # dull red: every channel below the solarisation threshold 0.5
    args = aug_args(jitter_strength=0.0)
    for v in byol.augment_pair(x, x, byol.step_generator(3, 0, "cpu"), args):
        u = unstandardize(v)
        g = ((u[:, 0] - u[:, 1]).abs().flatten(1).max(1).values < 1e-4).float().mean().item()
        assert 0.12 < g < 0.28, g  # p = 0.2


@pytest.mark.parametrize("gray_prob", [0.0, 0.5, 1.0])
def test_gray_prob_sets_how_often_a_view_turns_gray(gray_prob):
    """--gray-prob 0 keeps every view in colour (colour as an attribute of similarity), 1 turns every view gray."""
    x = torch.full((400, 3, 8, 8), 25, dtype=torch.uint8)
    x[:, 0] = 100
    for v in byol.augment_pair(x, x, byol.step_generator(3, 0, "cpu"), aug_args(jitter_strength=0.0, gray_prob=gray_prob)):
        u = unstandardize(v)
        g = ((u[:, 0] - u[:, 1]).abs().flatten(1).max(1).values < 1e-4).float().mean().item()
        assert abs(g - gray_prob) < 0.08, g


def test_crop_min_scale_one_keeps_the_whole_image_content():
    """Crop area 1 (and no jitter): a half-black/half-white image keeps half of each, up to flips."""
    x = torch.zeros(32, 3, 16, 16, dtype=torch.uint8)
    x[..., :8] = 255
    v1, _ = byol.augment_pair(x, x, byol.step_generator(4, 0, "cpu"), aug_args(crop_min_scale=1.0, jitter_strength=0.0))
    # solarize never hits view 1 and grayscale keeps black/white: the bright fraction stays near 1/2
    bright = (unstandardize(v1).mean(1) > 0.5).float().flatten(1).mean(1)
    assert ((bright - 0.5).abs() < 0.2).all(), bright
    small, _ = byol.augment_pair(
        x, x, byol.step_generator(4, 0, "cpu"), aug_args(crop_min_scale=0.05, jitter_strength=0.0)
    )
    bright_small = (unstandardize(small).mean(1) > 0.5).float().flatten(1).mean(1)
    assert ((bright_small - 0.5).abs() > 0.3).any()  # small crops can fall on one side only


def test_crop_size_cuts_views_of_that_size_from_the_same_crops():
    """--crop-size: the views are the same crops of the images, resampled to fewer pixels."""
    x = torch.zeros(32, 3, 16, 16, dtype=torch.uint8)
    x[..., :8] = 255
    args = aug_args(crop_min_scale=0.3, jitter_strength=0.0, solarize_prob=0.0)
    full = byol.augment_pair(x, x, byol.step_generator(4, 0, "cpu"), args)
    small = byol.augment_pair(x, x, byol.step_generator(4, 0, "cpu"), args, size=8)
    for f, v in zip(full, small):
        assert v.shape == (32, 3, 8, 8) and f.shape == (32, 3, 16, 16)
        # The same crop at half the pixels: each image's bright share agrees (blur and edges blur the border).
        share = lambda t: (unstandardize(t).mean(1) > 0.5).float().flatten(1).mean(1)
        assert (share(f) - share(v)).abs().max() < 0.15


def test_a_run_trains_on_crops_and_embeds_at_the_image_size(tmp_path, one_thread):  # noqa: F811
    root = make_folder(tmp_path / "data", classes=6, per_class=6)
    seen = []
    model_forward = byol.BYOL.forward

    def forward(self, v1, v2, *rest):
        seen.append(v1.shape[-1])
        return model_forward(self, v1, v2, *rest)

    byol.BYOL.forward = forward
    try:
        rc = byol.main(["--data", "folder", "--data-dir", str(root), "--image-size", "24", "--crop-size", "16",
                        "--width", "8", "--hidden-dim", "32", "--proj-dim", "16", "--epochs", "1", "--batch-size", "4",
                        "--val-fraction", "0", "--workers", "1", "--no-progress", "--out", str(tmp_path / "run")])
    finally:
        byol.BYOL.forward = model_forward
    assert rc == 0 and set(seen) == {16}
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert (ckpt["args"]["image_size"], ckpt["args"]["crop_size"]) == (24, 16)
    data = byol.load_data(byol.fill_defaults(byol.parse_args(["--data", "folder", "--data-dir", str(root), "--image-size", "24"])))
    assert data.images.shape[-1] == 24  # decoded, and so embedded, at --image-size


def test_solarize_prob_zero_keeps_white_pages_white():
    x = torch.full((400, 3, 8, 8), 255, dtype=torch.uint8)
    _, v2 = byol.augment_pair(x, x, byol.step_generator(1, 0, "cpu"), aug_args(jitter_strength=0.0, solarize_prob=0.0))
    assert (unstandardize(v2).flatten(1).max(1).values > 0.5).all()


def test_flip_prob_sets_how_often_the_bright_half_changes_sides():
    x = torch.zeros(400, 3, 16, 16, dtype=torch.uint8)
    x[..., :8] = 255  # bright left half
    for flip_prob, low, high in [(0.0, 0.0, 0.0), (0.5, 0.4, 0.6), (1.0, 1.0, 1.0)]:
        v1, _ = byol.augment_pair(
            x,
            x,
            byol.step_generator(5, 0, "cpu"),
            aug_args(crop_min_scale=1.0, jitter_strength=0.0, flip_prob=flip_prob),
        )
        u = unstandardize(v1).mean(1)
        flipped = (u[..., 8:].mean((1, 2)) > u[..., :8].mean((1, 2))).float().mean().item()
        assert low <= flipped <= high, (flip_prob, flipped)


def test_omniglot_defaults_switch_off_what_binary_chiral_strokes_do_not_need():
    omniglot = byol.fill_defaults(byol.parse_args([]))
    assert (omniglot.jitter_strength, omniglot.flip_prob, omniglot.solarize_prob) == (0.0, 0.0, 0.0)
    tll = byol.fill_defaults(byol.parse_args(["--data", "tll", "--data-dir", "x"]))
    assert (tll.jitter_strength, tll.flip_prob, tll.solarize_prob) == (1.0, 0.5, 0.2)
    chosen = byol.fill_defaults(
        byol.parse_args(["--flip-prob", "0.3", "--solarize-prob", "0.1", "--jitter-strength", "0.5"])
    )
    assert (chosen.jitter_strength, chosen.flip_prob, chosen.solarize_prob) == (0.5, 0.3, 0.1)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 5), s=st.integers(8, 40), seed=st.integers(0, 2**31))
def test_augment_any_size(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
    v1, v2 = byol.augment_pair(x, x, byol.step_generator(seed, 0, "cpu"), AUG)
    assert v1.shape == v2.shape == (b, 3, s, s) and torch.isfinite(v1).all() and torch.isfinite(v2).all()


# ----------------------------------------------------------------------------- shared parts
# (word for word: tests/test_recipes.py runs .ci/sync_shared.py --check)


@pytest.mark.parametrize("kind", ["tll", "folder"])
def test_shared_data_and_augmentation_give_identical_batches(kind, tll_dir, folder_dir):
    root = tll_dir if kind == "tll" else folder_dir
    argv = ["--data", kind, "--data-dir", root, "--image-size", "16", "--workers", "1", "--seed", "3"]
    datas = {name: mod.load_data(args_for(mod, argv)) for name, mod in MODULES.items()}
    batches = {}
    for name, mod in MODULES.items():
        d = datas[name]
        order = mod.epoch_order(len(d.anchors), 3, 1)
        out = []
        for step in range(2):
            x1, x2 = mod.make_pair_batch(d, order, step, 8, 0, 1, 3, 10 + step, "cpu")
            out += [x1, x2, *mod.augment_pair(x1, x2, mod.step_generator(3, 10 + step, "cpu"), AUG)]
        batches[name] = out
    for name in ("simsiam", "bn_only"):
        assert torch.equal(datas[name].images, datas["byol"].images)
        assert datas[name].split == datas["byol"].split
        for a, b in zip(batches[name], batches["byol"]):
            assert torch.equal(a, b), name
    assert not torch.equal(batches["byol"][0], batches["byol"][4])  # the two steps differ
