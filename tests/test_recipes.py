"""Recipes, the conv4 encoder, the handwriting augmentations, the validation episodes and the
tool that keeps the three scripts' shared parts identical."""

import io
import math
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import bn_only
import byol
import contrastive
import simsiam
from tiny_data import REPO, args_for, make_folder

MODULES = {"byol": byol, "simsiam": simsiam, "bn_only": bn_only, "contrastive": contrastive}


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"), classes=5, per_class=6, seed=1)


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("data", byol.DATASETS)
def test_each_recipe_is_the_default_of_its_data(name, data):
    mod = MODULES[name]
    args = mod.parse_args(["--data", data])
    recipe = mod.recipe_of(data)  # the RECIPES row, with its FINE_TUNE row where the row starts pretrained (tll)
    assert mod.RECIPES[data], data
    assert recipe == ({**mod.RECIPES[data], **mod.FINE_TUNE[data]} if mod.RECIPES[data].get("pretrained")
                      else {**mod.RECIPES[data], "pretrained": False}), data
    for key, value in recipe.items():
        if key in ("batch_size", "epochs"):  # ceilings, fitted to the data once it is loaded
            assert getattr(args, key) is None, (data, key)
    mod.fit_to_data(args, 1000, 1, is_main=False)  # data that lowers neither ceiling
    for key, value in recipe.items():
        if key != "max_pairs":  # not a flag: the pairs that lower the epochs
            assert getattr(args, key) == value, (data, key)


@pytest.mark.parametrize("name", MODULES)
def test_every_script_s_generic_recipes_validate_themselves(name):
    """folder, pairs and tll carve a validation fifth and stop after 5 evaluations without a gain, in every script
    (the README's promise); Omniglot has its own validation episodes and carves nothing."""
    mod = MODULES[name]
    for data in ("folder", "pairs", "tll"):
        args = mod.parse_args(["--data", data])
        assert (args.val_fraction, args.patience) == (0.2, 5), (name, data)
        assert args.eval_every == mod.recipe_of(data)["eval_every"] <= 5, (name, data)  # an evaluation every few epochs
    args = mod.parse_args([])
    assert (args.val_fraction, args.patience) == (0.0, 0), name


@pytest.mark.parametrize("name", MODULES)
def test_pretrained_adds_the_fine_tuning_row(name):
    mod = MODULES[name]
    args = mod.parse_args(["--data", "folder", "--pretrained"])
    mod.fit_to_data(args, 1000, 1, is_main=False)
    for key, value in mod.FINE_TUNE["folder"].items():
        if key != "max_pairs":
            assert getattr(args, key) == value, key
    assert args.crop_min_scale == mod.RECIPES["folder"]["crop_min_scale"]  # the rest is the data's recipe
    # A flag still wins; the frozen-encoder head takes the row's backbone only, not its fine-tuning controls.
    assert mod.parse_args(["--data", "folder", "--pretrained", "--no-freeze-bn-stats"]).freeze_bn_stats is False
    frozen = mod.parse_args(["--data", "folder", "--pretrained", "--freeze-encoder"])
    assert (frozen.arch, frozen.image_size) == (mod.FINE_TUNE["folder"]["arch"], mod.FINE_TUNE["folder"]["image_size"])
    assert (frozen.freeze_bn_stats, frozen.backbone_lr_factor) == (False, 1.0)
    # Without the flag, a row's own default decides: TLL photos start pretrained, class folders (without a colour
    # --data-dir: test_the_folder_recipe_fine_tunes_colour_and_trains_conv4_on_grayscale) from scratch.
    assert mod.parse_args(["--data", "tll"]).pretrained and not mod.parse_args(["--data", "folder"]).pretrained
    # --init gives the weights: the row's pretrained default gives way (an explicit --pretrained would not).
    assert not mod.parse_args(["--data", "tll", "--init", "w.pt"]).pretrained
    assert mod.parse_args(["--data", "tll", "--init", "w.pt", "--pretrained"]).pretrained
    scratch = mod.parse_args(["--data", "tll", "--no-pretrained"])
    assert (scratch.pretrained, scratch.arch, scratch.image_size) == (False, "conv4", mod.RECIPES["tll"]["image_size"])
    fitted = mod.parse_args(["--data", "folder", "--pretrained"])
    mod.fit_to_data(fitted, 10 ** 6, 1, is_main=False)
    assert fitted.epochs * 10 ** 6 <= mod.FINE_TUNE["folder"]["max_pairs"] or fitted.epochs == 1


def grayscale_folder(root, noise=0):
    """A copy of make_folder's tiny folder in grayscale; noise: each channel off by up to that many levels, as a
    scanner or a camera leaves a gray page."""
    colour = make_folder(root / "colour", classes=4, per_class=4, seed=2)
    rng = np.random.default_rng(0)
    for path in sorted(colour.rglob("*.png")):
        out = root / "gray" / path.relative_to(colour)
        out.parent.mkdir(parents=True, exist_ok=True)
        gray = np.asarray(Image.open(path).convert("L"), dtype=np.int16)[..., None].repeat(3, axis=2)
        gray = gray + rng.integers(-noise, noise + 1, gray.shape)
        Image.fromarray(gray.clip(0, 255).astype(np.uint8)).save(out)
    return colour, root / "gray"


@pytest.mark.colour_rule
@pytest.mark.parametrize("noise", [0, 2])
def test_the_folder_recipe_fine_tunes_colour_and_trains_conv4_on_grayscale(tmp_path, noise):
    colour, gray = grayscale_folder(tmp_path, noise)
    assert byol.folder_in_colour(colour) and not byol.folder_in_colour(gray)
    for name, mod in MODULES.items():
        photos = mod.parse_args(["--data", "folder", "--data-dir", str(colour)])
        assert (photos.pretrained, photos.arch, photos.image_size) == (True, *(mod.FINE_TUNE["folder"][k] for k in ("arch", "image_size"))), name
        drawings = mod.parse_args(["--data", "folder", "--data-dir", str(gray)])
        assert (drawings.pretrained, drawings.arch) == (False, "conv4"), name
    # A flag decides over the rule, and so do --init and --freeze-encoder (which take no recipe from it).
    assert not byol.parse_args(["--data", "folder", "--data-dir", str(colour), "--no-pretrained"]).pretrained
    assert byol.parse_args(["--data", "folder", "--data-dir", str(gray), "--pretrained"]).pretrained
    assert not byol.parse_args(["--data", "folder", "--data-dir", str(colour), "--init", "w.pt"]).pretrained
    assert not byol.parse_args(["--data", "folder", "--data-dir", str(colour), "--freeze-encoder"]).pretrained
    # Unlabelled images (loose in --data-dir, or --labels none) were not validated with it: conv4, as before.
    assert not byol.parse_args(["--data", "folder", "--data-dir", str(colour), "--labels", "none"]).pretrained
    shutil.copy(next(colour.rglob("*.png")), colour / "loose.png")
    assert not byol.folder_in_colour(colour)
    assert not byol.folder_in_colour(tmp_path / "missing") and not byol.folder_in_colour(None)


@pytest.mark.colour_rule
def test_a_colour_folder_run_says_it_fine_tunes(tmp_path, capsys):
    colour, gray = grayscale_folder(tmp_path)
    tiny = ["--data", "folder", "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--val-fraction", "0",
            "--holdout", "0.5", "--workers", "1", "--no-progress"]
    assert byol.main([*tiny, "--data-dir", str(colour), "--out", str(tmp_path / "c")]) == 0
    # The recipe's 96 px crops are capped at the 32 px images.
    assert "colour images: fine-tuning ImageNet weights (tf_efficientnet_lite0, trained at 32 px, embedded at 32 px)" in capsys.readouterr().out
    assert byol.main([*tiny, "--data-dir", str(gray), "--out", str(tmp_path / "g"), "--width", "8"]) == 0
    assert "grayscale images: conv4 from scratch" in capsys.readouterr().out


def test_the_command_line_overrides_the_recipe():
    args = byol.parse_args(["--epochs", "3", "--arch", "resnet18", "--rotation", "5"])
    assert (args.epochs, args.arch, args.rotation) == (3, "resnet18", 5.0)
    assert byol.parse_args(["--data", "tll"]).arch == byol.recipe_of("tll")["arch"] == "tf_efficientnet_lite0"
    assert byol.parse_args(["--image-size", "40", "--data=tll"]).image_size == 40


def test_help_shows_the_chosen_datas_recipe(capsys):
    for data in ("omniglot", "tll"):
        with pytest.raises(SystemExit):
            byol.parse_args(["--data", data, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"training epochs (default: the recipe's {byol.recipe_of(data)['epochs']}" in text


def test_no_argument_run_is_the_omniglot_recipe():
    args = args_for(byol, [])
    assert (args.data, args.arch, args.image_size) == ("omniglot", "conv4", 28)


# ----------------------------------------------------------------------------- conv4


@pytest.mark.parametrize(
    "size,width,features",
    [(28, 64, 64), (28, 8, 8), (56, 16, 16), (84, 32, 32), (28, "8,8,16,32", 32), (28, [4, 8, 8, 16], 16)],
)
def test_conv4_gives_its_last_width_as_features_at_any_small_size(size, width, features):
    torch.manual_seed(0)
    net, dim = byol.build_encoder("conv4", width=width)
    out = net(torch.randn(3, 3, size, size))
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert dim == features and out.shape == (3, features)
    assert [c.out_channels for c in convs] == byol.conv4_widths(width) and convs[-1].out_channels == features


def test_conv4_state_dict_round_trips_through_init(tmp_path):
    torch.manual_seed(0)
    net, _ = byol.build_encoder("conv4", width=8)
    torch.save(net.state_dict(), tmp_path / "enc.pt")
    loaded, _ = byol.build_encoder("conv4", init=tmp_path / "enc.pt", width=8)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))


def test_conv4_has_no_pretrained_weights():
    with pytest.raises(byol.UserError, match="conv4 has no ImageNet weights"):
        byol.build_encoder("conv4", pretrained=True)


# ----------------------------------------------------------------------------- handwriting augmentation


floats = st.floats(0.05, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    w=floats,
    h=floats,
    cx=st.floats(-1, 1),
    cy=st.floats(-1, 1),
    flip=st.sampled_from([-1.0, 1.0]),
    angle=st.floats(-180, 180),
    slant=st.floats(-60, 60),
)
def test_crop_affine_scales_area_by_the_crop_alone(w, h, cx, cy, flip, angle, slant):
    """Rotation and shear preserve area: the determinant is the crop's w * h * flip, and the shift is the centre."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    theta = byol.crop_affine(t(w), t(h), t(cx), t(cy), t(flip), t(angle), t(slant))[0]
    assert torch.linalg.det(theta[:, :2]).item() == pytest.approx(w * h * flip, rel=1e-9, abs=1e-12)
    assert theta[:, 2].tolist() == pytest.approx([cx, cy])


@settings(max_examples=20, deadline=None)
@given(angle=st.floats(-179, 179))
def test_crop_affine_without_crop_or_shear_is_a_rotation(angle):
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    m = byol.crop_affine(one, one, zero, zero, one, angle * one, zero)[0, :, :2]
    assert torch.allclose(m @ m.T, torch.eye(2, dtype=torch.float64))
    assert math.degrees(math.atan2(m[1, 0].item(), m[0, 0].item())) == pytest.approx(angle, abs=1e-6)


def ink(views):
    """Mean darkness (1 - intensity) of normalised views."""
    mean = torch.tensor(byol.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(byol.IMAGENET_STD).view(1, 3, 1, 1)
    return 1 - (views * std + mean).mean((1, 2, 3))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_stroke_thickens_or_thins_as_its_drawn_amount_says(seed):
    """A black cross on white: the views with stroke jitter hold more ink exactly where the drawn amount
    is positive (thicker) and less where it is negative; every other draw is the same."""
    x = torch.full((16, 3, 28, 28), 255, dtype=torch.uint8)
    x[:, :, 12:15, 4:24] = 0
    x[:, :, 4:24, 12:15] = 0
    args = dict(blur_prob=0.0, solarize_prob=0.0, crop_min_scale=0.9, jitter_strength=0.0, flip_prob=0.0)
    plain = byol.augment(x, torch.Generator().manual_seed(seed), **args, stroke=0.0)
    jittered = byol.augment(x, torch.Generator().manual_seed(seed), **args, stroke=1.0)
    amount = torch.rand(16, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # augment's first draw
    change = ink(jittered) - ink(plain)
    strong = amount.abs() > 0.05
    assert strong.any()
    assert torch.equal((change > 0)[strong], (amount > 0)[strong])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_rotation_and_shear_move_the_strokes(seed):
    """A horizontal bar: with rotation the views' dark pixels leave the bar's rows; without, they stay.
    64 views: the mean over 8 sometimes fell short when most of the random angles came out small."""
    x = torch.full((64, 3, 28, 28), 255, dtype=torch.uint8)
    x[:, :, 13:15, 2:26] = 0
    args = dict(blur_prob=0.0, solarize_prob=0.0, crop_min_scale=1.0, jitter_strength=0.0, flip_prob=0.0)

    def rows_spanned(views):
        mean = torch.tensor(byol.IMAGENET_MEAN).view(1, 3, 1, 1)
        dark = (views * torch.tensor(byol.IMAGENET_STD).view(1, 3, 1, 1) + mean).mean(1) < 0.5
        return dark.any(2).sum(1).float()

    still = byol.augment(x, torch.Generator().manual_seed(seed), **args)
    turned = byol.augment(x, torch.Generator().manual_seed(seed), **args, rotation=45.0, shear=20.0)
    assert rows_spanned(turned).mean() > rows_spanned(still).mean() + 3


# ----------------------------------------------------------------------------- validation episodes


def png(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_split(path, alphabets):
    """A zip laid out like images_background_small2: alphabet -> number of characters, 3 drawers each.
    Every image's grey level encodes (alphabet, character) so that the test can read it back."""
    with zipfile.ZipFile(path, "w") as z:
        for a, (alphabet, chars) in enumerate(alphabets.items()):
            for c in range(chars):
                for d in range(1, 4):
                    z.writestr(f"split/{alphabet}/character{c + 1:02d}/{a}{c:02d}_{d:02d}.png", png(a * 60 + c))
    return path


def test_validation_episodes_leave_out_training_alphabets_and_small_ones(tmp_path):
    path = make_split(tmp_path / "small2.zip", {"Greek": 24, "Sanskrit": 25, "Tagalog": 17, "Japanese": 20})
    runs = byol.load_validation_runs(path, {"Greek", "Latin"}, 10, 1, episodes=6)
    assert len(runs) == 6
    seen_alphabets = set()
    for train, test, answer in runs:
        assert train.shape == test.shape == (20, 3, 10, 10)
        levels_train, levels_test = train[:, 0, 0, 0].long(), test[:, 0, 0, 0].long()
        assert len(set(levels_train.tolist())) == 20  # 20 different characters
        assert torch.equal(levels_test, levels_train[answer])  # each query's answer is its own character
        seen_alphabets |= {v // 60 for v in levels_train.tolist()}
    assert seen_alphabets == {1, 3}  # Sanskrit and Japanese: Greek trains, Tagalog has under 20 characters


def test_validation_episodes_are_fixed_and_use_two_drawers(tmp_path):
    path = make_split(tmp_path / "small2.zip", {"Sanskrit": 22})
    names = []
    original = byol.zip_sources
    byol.zip_sources = lambda z, n: (names.extend(n), original(z, n))[1]
    try:
        first = byol.load_validation_runs(path, set(), 10, 1, episodes=3)
    finally:
        byol.zip_sources = original
    second = byol.load_validation_runs(path, set(), 10, 1, episodes=3)
    for (a, b, c), (d, e, f) in zip(first, second):
        assert torch.equal(a, d) and torch.equal(b, e) and torch.equal(c, f)
    drawers = {n.rsplit("_", 1)[1] for n in names}
    assert len(drawers) >= 2


def test_validation_needs_an_alphabet_of_20_characters(tmp_path):
    path = make_split(tmp_path / "small2.zip", {"Tagalog": 17})
    with pytest.raises(byol.UserError, match="no alphabet of 20 characters"):
        byol.load_validation_runs(path, set(), 10, 1)


def test_omniglot_reports_validation_beside_test(tmp_path):
    from test_eval import make_omniglot

    root = make_omniglot(tmp_path / "omniglot")
    data = byol.load_data(args_for(byol, ["--data-dir", root, "--image-size", "16", "--workers", "1"]))
    assert len(data.val_runs) == 50 and len(data.one_shot_runs) == 2
    torch.manual_seed(0)
    model = byol.build_model(
        args_for(byol, ["--image-size", "16", "--width", "8", "--hidden-dim", "16", "--proj-dim", "8"])
    )
    metrics = byol.evaluate(model, data, "cpu")
    assert 0 <= metrics["val_one_shot"] <= 1 and 0 <= metrics["one_shot"] <= 1


# ----------------------------------------------------------------------------- bad values of the new flags


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--rotation", "-1"),
        ("--shear", "90"),
        ("--stroke", "1.5"),
        ("--stroke", "nan"),
        ("--width", "0"),
        ("--width", "64,64"),
        ("--width", "64,x,64,64"),
        ("--width", "64,64,0,64"),
        ("--crop-min-scale", "0"),
        ("--crop-min-scale", "2"),
        ("--flip-prob", "2"),
        ("--solarize-prob", "-0.1"),
        ("--eval-shift", "-1"),
        ("--eval-shift", "14"),  # half of the recipe's 28 px
    ],
)
@pytest.mark.parametrize("name", MODULES)
def test_bad_augmentation_and_width_values_are_one_line(name, flag, value, capsys, tmp_path):
    assert MODULES[name].main([flag, value, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and flag in err
        and ("must lie in" in err or "too small" in err or "channel count" in err)
    )
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- shared parts


def sync(*argv):
    return subprocess.run([sys.executable, str(REPO / ".ci" / "sync_shared.py"), *argv], capture_output=True, text=True)


def test_the_four_scripts_share_their_machinery_word_for_word():
    result = sync("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_sync_check_catches_a_drifted_copy_and_sync_mends_it(tmp_path):
    for name in ("byol.py", "simsiam.py", "bn_only.py", "contrastive.py"):
        shutil.copy(REPO / name, tmp_path / name)
    text = (tmp_path / "simsiam.py").read_text()
    drifted = text.replace(
        "def epoch_order(num_anchors, seed, epoch):", "def epoch_order(num_anchors, seed, epoch):  # drift", 1
    )
    assert drifted != text
    (tmp_path / "simsiam.py").write_text(drifted)
    result = sync("--check", "--root", str(tmp_path))
    assert result.returncode == 1 and "simsiam.py" in result.stderr and "# drift" in result.stdout
    assert "bn_only.py" not in result.stderr and "contrastive.py" not in result.stderr
    assert sync("--root", str(tmp_path)).returncode == 0
    assert (tmp_path / "simsiam.py").read_text() == text
    # The method's own part is left alone.
    assert "class SimSiam" in text and "class SimSiam" not in (tmp_path / "byol.py").read_text()


# ----------------------------------------------------------------------------- held-out classes


def test_r_precision_counts_the_class_among_the_r_nearest():
    angle = torch.tensor([0.0, 0.1, 0.2, 3.0, 3.1, 1.5])
    features = torch.stack([angle.cos(), angle.sin()], 1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    # Class 0: each image's 2 nearest others are its class (1.0 each); class 1: its 1 nearest is its pair;
    # class 2 has no other image and asks nothing.
    assert byol.r_precision(features, labels) == pytest.approx(1.0)
    labels = torch.tensor([0, 1, 0, 1, 0, 2])
    # 0 (class 0, R=2): nearest 1 (no), 2 (yes) -> 1/2; 2: nearest 1 (no), 0 (yes) -> 1/2;
    # 4 (R=2): nearest 3 (no), then 5 (no) -> 0; 1 (class 1, R=1): nearest 0 or 2 -> 0; 3 (R=1): nearest 4 -> 0.
    assert byol.r_precision(features, labels) == pytest.approx((0.5 + 0.5 + 0 + 0 + 0) / 5)
    assert byol.r_precision(features, torch.arange(6)) is None


def test_held_out_class_folders_are_judged_on_every_held_out_image(folder_dir):
    args = args_for(
        byol,
        [
            "--data",
            "folder",
            "--data-dir",
            folder_dir,
            "--image-size",
            "16",
            "--workers",
            "1",
            "--holdout",
            "0.4",
            "--width",
            "8",
            "--hidden-dim",
            "16",
            "--proj-dim",
            "8",
        ],
    )
    data = byol.load_data(args)
    torch.manual_seed(0)
    model = byol.build_model(args)
    metrics = byol.evaluate(model, data, "cpu")
    assert byol.quality_name(metrics) == "r_precision"
    held = data.test_images.nonzero().flatten()
    assert len(held) == 12  # 2 of 5 classes, 6 images each
    features, _ = byol.embed_images(model, data.images[held], "cpu")
    assert metrics["r_precision"] == pytest.approx(byol.r_precision(features, data.labels[held]))


# ----------------------------------------------------------------------------- default data location


def test_tll_is_found_in_its_default_place_without_data_dir(tmp_path, monkeypatch):
    from tiny_data import make_tll

    make_tll(tmp_path / "tll", n=12)
    monkeypatch.setenv("POSITIVE_SIMILARITY_DATA", str(tmp_path))
    args = args_for(byol, ["--data", "tll", "--image-size", "16", "--workers", "1"])
    assert args.data_dir is None
    data = byol.load_data(args)
    assert len(data.images) == 24 and all(str(tmp_path / "tll") in n for n in data.names)


def test_missing_default_place_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSITIVE_SIMILARITY_DATA", str(tmp_path))
    assert byol.main(["--data", "tll", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "tll") in err and "--download" in err


# ----------------------------------------------------------------------------- the raw-pixel baseline


def test_pixel_baseline_finds_identical_pairs_and_misses_random_ones(tmp_path, capsys):
    import shutil as sh

    from test_eval import evaluate
    from tiny_data import make_tll

    random_pairs = make_tll(tmp_path / "random", n=10)  # right is drawn independently of left
    same_pairs = make_tll(tmp_path / "same", n=10)
    sh.rmtree(same_pairs / "right")
    sh.copytree(same_pairs / "left", same_pairs / "right")
    recall = {}
    for name, root in (("random", random_pairs), ("same", same_pairs)):
        result, printed = evaluate(
            [
                "--baseline",
                "pixels",
                "--data",
                "tll",
                "--data-dir",
                root,
                "--all-pairs",
                "--image-size",
                "16",
                "--out",
                tmp_path / f"eval-{name}",
                "--no-pictures",
            ],
            capsys,
        )
        assert "pixels baseline" in printed
        recall[name] = result["metrics"]["retrieval"]["left_to_right"]["recall@1"]
    assert recall["same"] == 1.0 and recall["random"] < 0.5


# ----------------------------------------------------------------------------- checkpoints from before the recipes


def test_a_checkpoint_older_than_a_flag_resumes_with_its_plain_default(tmp_path, monkeypatch):
    from tiny_data import make_tll, tiny_flags

    out = tmp_path / "run"
    argv = tiny_flags(
        "byol", make_tll(tmp_path / "tll", n=12), out, epochs=2, extra=["--stop-after-epochs", "1", "--width", "8"]
    )
    assert byol.main(argv) == 0
    ckpt = torch.load(out / "last.pt", weights_only=False)
    for flag in ("rotation", "shear", "stroke"):  # flags that checkpoints of 2026-11-23 did not have
        del ckpt["args"][flag]
    torch.save(ckpt, out / "last.pt")
    # Were the recipe's values taken, a run that trained without these augmentations would resume with them.
    monkeypatch.setitem(byol.RECIPES, "tll", dict(byol.RECIPES["tll"], rotation=7.0, shear=3.0, stroke=0.5))
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 0
    resumed = torch.load(out / "last.pt", weights_only=False)
    assert resumed["epoch"] == 2
    assert (resumed["args"]["rotation"], resumed["args"]["shear"], resumed["args"]["stroke"]) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- published TLL protocols


def test_asymmetric_recall_counts_a_hit_in_either_direction():
    import eval as ev

    none = torch.zeros(4, dtype=torch.long)
    lr = (torch.tensor([0, 3, 0, 5]), none)  # pairs 0 and 2 are first left->right
    rl = (torch.tensor([4, 0, 0, 5]), none)  # pairs 1 and 2 are first right->left
    out = ev.asymmetric_recall(lr, rl, ks=(1, 4))
    assert out["recall@1"] == pytest.approx(3 / 4)  # pairs 0, 1, 2
    assert out["recall@4"] == pytest.approx(3 / 4)  # pair 3 ranks 6th both ways
    # Ties at random: one tie with the true match ranks it first half the time, in each direction.
    half = (torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    assert ev.asymmetric_recall(half, half, ks=(1,))["recall@1"] == pytest.approx(1 - 0.5 * 0.5)
