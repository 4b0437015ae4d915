"""--freeze-encoder (issue #15): each method's head trains on the cached features of a fixed encoder.

On a tiny TLL directory, with conv4 encoders saved as local state dicts (--init): the feature cache
is reused, and rebuilt when the encoder or the image size changes; the frozen weights end
bit-identical; --resume continues exactly; the --pca-dim whitening is fitted on the training images
and travels in the checkpoint; eval.py ranks the projector outputs; bad values end in one line."""

import json

import pytest
import torch

import byol
import eval as ev
from tiny_data import (
    MODULES,
    SCRIPTS,
    args_for,
    one_thread,  # noqa: F401  (fixture)
    run_main,
    state_dicts_equal,
    tensors_in,
    tiny_flags,
    tll_dir,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Two different conv4 encoders (width 8), saved as state dicts for --init."""
    tmp = tmp_path_factory.mktemp("encoders")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net, _ = byol.build_encoder("conv4", width=8)
        torch.save(net.state_dict(), tmp / f"conv4-{seed}.pt")
        paths.append(tmp / f"conv4-{seed}.pt")
    return paths


def frozen_flags(method, data_dir, out, init, epochs=2, extra=()):
    return tiny_flags(
        method,
        data_dir,
        out,
        epochs=epochs,
        extra=["--arch", "conv4", "--width", "8", "--init", str(init), "--freeze-encoder", *extra],
    )


@pytest.fixture(scope="module", params=SCRIPTS)
def runs(request, tll_dir, encoders, tmp_path_factory):
    """A: 2 epochs straight; B: the same, stopped after 1; C: --resume B. All with --pca-dim 4."""
    script = request.param
    mod = MODULES[script]
    tmp = tmp_path_factory.mktemp(f"frozen_{script}")
    a, b = tmp / "straight", tmp / "resumed"
    res = {
        "script": script,
        "mod": mod,
        "A": a,
        "B": b,
        "flags": frozen_flags(script, tll_dir, a, encoders[0], extra=["--pca-dim", "4"]),
    }
    res["a"] = run_main(mod, res["flags"])
    res["b"] = run_main(
        mod, frozen_flags(script, tll_dir, b, encoders[0], extra=["--pca-dim", "4", "--stop-after-epochs", "1"])
    )
    res["ckpt_b1"] = torch.load(b / "last.pt", weights_only=False)
    res["c"] = run_main(mod, ["--resume", b / "last.pt", "--no-progress", "--workers", "1"])
    return res


def test_runs_succeed_and_say_what_they_rank(runs):
    for k in "abc":
        rc, out, err = runs[k]
        assert rc == 0 and "Traceback" not in err, (k, err)
        assert "ranking projector outputs (frozen encoder, trained head)" in out
    assert "cached the frozen encoder's features of 40 images" in runs["a"][1]
    assert "reusing cached features" in runs["c"][1]  # the resumed run reads B's cache
    # Epoch 0 also scores the frozen features alone, and the summary puts the trained head beside them.
    summary = next(line for line in runs["a"][1].splitlines() if line.startswith("recall@1: "))
    assert "frozen features (the head's input)" in summary and " untrained, " in summary


def test_the_frozen_encoder_stays_bit_identical_and_only_the_head_trains(runs, encoders):
    init = torch.load(encoders[0], weights_only=True)
    final = torch.load(runs["A"] / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(init[k], final[f"encoder.net.{k}"]) for k in init)  # BN statistics too
    moved = state_dicts_equal(runs["ckpt_b1"]["model"], final)
    assert moved and all(k.startswith(("projector.", "predictor.", "target_projector.")) for k in moved), moved
    model = runs["mod"].build_model(args_for(runs["mod"], runs["flags"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if "encoder" in n]
    if runs["script"] == "byol":  # the frozen encoder is its own target; the EMA moves the target projector
        assert model.target_encoder is model.encoder
        assert any(k.startswith("target_projector.") for k in moved)


def test_resume_continues_exactly(runs):
    """2 epochs straight == 1 epoch, stop, --resume, 1 epoch: every tensor identical."""
    a = torch.load(runs["A"] / "last.pt", weights_only=False)
    c = torch.load(runs["B"] / "last.pt", weights_only=False)
    assert a["epoch"] == c["epoch"] == 2
    assert state_dicts_equal(a["model"], c["model"]) == []
    ta, tc = tensors_in(a["optimizer"]), tensors_in(c["optimizer"])
    assert ta.keys() == tc.keys() and ta and all(torch.equal(ta[k], tc[k]) for k in ta)
    strip = lambda h: [{k: v for k, v in r.items() if k != "images_per_s"} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(c["history"])


def test_pca_is_fitted_on_the_training_images_and_kept_in_the_checkpoint(runs):
    model = torch.load(runs["A"] / "last.pt", weights_only=False)["model"]
    features = torch.load(runs["A"] / "features.pt", weights_only=True)["features"].double()
    data = runs["mod"].load_data(args_for(runs["mod"], runs["flags"]))
    train = torch.cat([data.anchors, data.groups.flatten()]).unique()
    assert len(train) == 32 and len(features) == 40  # 16 training pairs of 20
    mean, whiten = model["encoder.pca_mean"].double(), model["encoder.pca_whiten"].double()
    assert whiten.shape == (8, 4)
    assert torch.allclose(mean, features[train].mean(0))
    assert not torch.allclose(mean, features.mean(0))  # the held-out images would move it
    z = (features[train] - mean) @ whiten  # whitened: unit variance, uncorrelated
    assert torch.allclose(torch.cov(z.T), torch.eye(4, dtype=torch.float64), atol=1e-4)


def test_eval_ranks_the_projector_outputs_of_the_frozen_encoder(runs, tmp_path, capsys):
    assert ev.main([str(runs["A"] / "last.pt"), "--no-pictures", "--out", str(tmp_path), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "projector embedding (frozen encoder, trained head)" in printed.splitlines()[0]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["embedding"] == "projector" and result["source"]["frozen_encoder"] is True
    history = torch.load(runs["A"] / "last.pt", weights_only=False)["history"]
    assert result["metrics"]["retrieval"]["left_to_right"]["recall@1"] == pytest.approx(history[-1]["recall@1"])


def test_the_cache_is_reused_and_rebuilt_when_the_encoder_or_image_size_changes(tll_dir, encoders, tmp_path):
    out = tmp_path / "run"
    cache = out / "features.pt"

    def run(init, extra=()):
        rc, stdout, err = run_main(
            byol, frozen_flags("byol", tll_dir, out, init, epochs=1, extra=["--overwrite", *extra])
        )
        assert rc == 0, err
        return stdout, cache.stat().st_mtime_ns, torch.load(cache, weights_only=True)["features"]

    first, made, features = run(encoders[0])
    assert "previous cache: none yet" in first
    again, mtime, _ = run(encoders[0])
    assert "reusing cached features" in again and mtime == made
    other, mtime, other_features = run(encoders[1])
    assert "previous cache: made by other weights or from other images" in other and mtime != made
    assert not torch.equal(features, other_features)
    resized, _, _ = run(encoders[1], ["--image-size", "20"])
    assert "previous cache: made by other weights or from other images" in resized


def test_a_random_frozen_encoder_trains_with_a_warning(tll_dir, tmp_path):
    flags = tiny_flags(
        "simsiam", tll_dir, tmp_path / "run", extra=["--arch", "conv4", "--width", "8", "--freeze-encoder"]
    )
    rc, _, err = run_main(MODULES["simsiam"], flags)
    assert rc == 0 and err.count("warning: --freeze-encoder without --pretrained or --init") == 1, err


def _resnet18_state(tmp):
    torch.save(byol.build_encoder("resnet18", stem="imagenet")[0].state_dict(), tmp / "r18.pt")
    return tmp / "r18.pt"


BAD = {
    "pca_negative": (["--freeze-encoder", "--pca-dim", "-1"], ["--pca-dim -1", "0 (off)"]),
    "pca_without_freeze": (["--pca-dim", "4"], ["--pca-dim 4", "add --freeze-encoder"]),
    "pca_above_feature_dim": (["--freeze-encoder", "--pca-dim", "9"], ["--pca-dim 9", "8 features of conv4"]),
    # 4 training pairs: 8 images, which span 7 dimensions once centred
    "pca_above_training_images": (
        ["--freeze-encoder", "--pca-dim", "8", "--holdout", "0.8", "--batch-size", "2"],
        ["--pca-dim 8", "8 training images", "--pca-dim 7 or less"],
    ),
    "augmented_pairs": (["--freeze-encoder", "--pairs", "aug"], ["--pairs aug", "its own positive"]),
    "stem_of_another_net": (
        ["--arch", "resnet18", "--stem", "small", "--init", _resnet18_state],
        ["7x7", "--stem imagenet"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_end_in_one_line(case, tll_dir, encoders, tmp_path):
    extra, needles = BAD[case]
    extra = [x(tmp_path) if callable(x) else x for x in extra]
    init = [] if "--init" in extra else ["--init", str(encoders[0])]
    out = tmp_path / "run"
    rc, _, err = run_main(
        byol, tiny_flags("byol", tll_dir, out, extra=["--arch", "conv4", "--width", "8", *init, *extra])
    )
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("byol.py: error: "), err
    assert all(str(n) in lines[0] for n in needles), (needles, lines[0])
    assert not (out / "last.pt").exists()
