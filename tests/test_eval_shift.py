"""--eval-shift: an image's embedding is the mean of the normalised embeddings of the image and
of its copies shifted left, right, up and down. The shift itself, the average, the flag's checks,
and that training and eval.py report the same number with it."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_eval import make_omniglot
from tiny_data import args_for, make_tll, run_main

import byol
import eval as ev


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), dx=st.integers(-4, 4), dy=st.integers(-4, 4), seed=st.integers(0, 2**16))
def test_shifted_moves_the_image_and_repeats_its_edge(h, w, dx, dy, seed):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    out = byol.shifted(x, dx, dy)
    assert out.shape == x.shape
    # Pixel (i, j) of the result is pixel (i - dy, j - dx) of the image, clamped to its edge.
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    assert torch.equal(out, x[..., rows[:, None], cols[None, :]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    args = args_for(byol, ["--image-size", "16", "--width", "8", "--hidden-dim", "16", "--proj-dim", "8"])
    return byol.build_model(args).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shift", [1, 3])
def test_the_embedding_is_the_mean_of_five_normalised_copies(model, images, shift):
    feats, projs = byol.embed_images(model, images, "cpu", batch_size=4, shift=shift)  # two batches
    x = byol.normalize(images)
    with torch.no_grad():
        copies = [byol.shifted(x, dx, dy) for dx, dy in [(0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift)]]
        hs = [model.encoder(c) for c in copies]
        want_feats = torch.stack([F.normalize(h, dim=1) for h in hs]).mean(0)
        want_projs = torch.stack([F.normalize(model.projector(h), dim=1) for h in hs]).mean(0)
    assert torch.allclose(feats, want_feats, atol=1e-5) and torch.allclose(projs, want_projs, atol=1e-5)
    # Not the image alone: the copies change the embedding's direction.
    alone = F.normalize(hs[0], dim=1)
    assert not torch.allclose(F.normalize(feats, dim=1), alone, atol=1e-3)


def test_no_shift_is_the_image_alone_unnormalised(model, images):
    feats, projs = byol.embed_images(model, images, "cpu", shift=0)
    with torch.no_grad():
        h = model.encoder(byol.normalize(images))
        assert torch.allclose(feats, h, atol=1e-5) and torch.allclose(projs, model.projector(h), atol=1e-5)


def test_the_omniglot_recipe_shifts_and_the_others_do_not():
    assert byol.parse_args([]).eval_shift == 3
    for data in ("tll", "pairs", "folder", "cifar10", "stl10"):
        assert byol.parse_args(["--data", data]).eval_shift == 0, data


def test_a_frozen_encoder_asks_for_no_shift(tmp_path):
    rc, _, err = run_main(byol, ["--freeze-encoder", "--out", tmp_path / "run"])  # omniglot: eval_shift 3
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--eval-shift 0" in err
    assert not (tmp_path / "run").exists()


def test_training_and_eval_report_the_same_shifted_one_shot(tmp_path, capsys):
    omni = make_omniglot(tmp_path / "omniglot")
    flags = ["--data-dir", omni, "--image-size", "16", "--width", "8", "--hidden-dim", "16", "--proj-dim", "8",
             "--batch-size", "8", "--epochs", "1", "--workers", "1", "--no-progress", "--out", tmp_path / "run"]
    rc, _, err = run_main(byol, flags)
    assert rc == 0, err
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert ev.main([str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "eval"), "--no-pictures"]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["eval_shift"] == byol.RECIPES["omniglot"]["eval_shift"]
    assert result["metrics"]["one_shot"]["20way"] == last["one_shot"]
    assert result["metrics"]["val_one_shot"]["20way"] == last["val_one_shot"]
    # --eval-shift 0 overrides the run's shift; out of range is one line.
    assert ev.main([str(tmp_path / "run" / "last.pt"), "--eval-shift", "0", "--out", str(tmp_path / "e0"), "--no-pictures"]) == 0
    assert json.loads((tmp_path / "e0" / "eval.json").read_text())["eval_shift"] == 0
    capsys.readouterr()
    assert ev.main([str(tmp_path / "run" / "last.pt"), "--eval-shift", "8", "--out", str(tmp_path / "e8")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eval-shift 8 must lie in [0, 7]" in err


def test_embed_checks_its_shift_in_one_line(tmp_path, capsys):
    images = make_tll(tmp_path / "tll", n=2) / "left"
    assert ev.main(["embed", "--baseline", "pixels", str(images), "--image-size", "8", "--eval-shift", "4",
                    "--out", str(tmp_path / "e.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eval-shift 4 must lie in [0, 3]" in err
    assert not (tmp_path / "e.npz").exists()
