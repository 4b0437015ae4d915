"""The command lines of byol.py, simsiam.py and bn_only.py: bad input, offline download,
divergence, collapse warning, and the importable methods (BYOL, SimSiam, BNOnly).

Runs are in-process (`<module>.main(argv)` returns the exit code) on tiny data in tmp dirs;
only the unknown-flag check starts a subprocess."""

import contextlib
import io
import math
import os
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bn_only
import byol
import simsiam
from tiny_data import (
    MODULES,
    REPO,
    args_for,
    decode_index,
    index_coded,
    make_folder,
    make_pairs_csv,
    make_tll,
    one_thread,  # noqa: F401  (fixture)
    tiny_flags,
    tll_dir,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_user_error(rc, err, out_dir, script, *needles):
    """Exit 2, exactly one line `<script>.py: error: ...` naming every needle, no traceback,
    and nothing written in the run directory."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    if out_dir.exists():
        left = [p.name for p in out_dir.rglob("*") if p.name == "last.pt" or p.name.endswith(".tmp")]
        assert not left, left


# ----------------------------------------------------------------------------- bad input


def _tll_bad_names(tmp):
    root = make_tll(tmp / "d", n=10)
    (root / "left" / "p009.jpg").unlink()
    (root / "right" / "p003.jpg").rename(root / "right" / "q999.jpg")
    return root, ["p003.jpg", "p009.jpg", "q999.jpg", "every left/NAME needs a right/NAME"]


def _tll_garbage_image(tmp):
    root = make_tll(tmp / "d", n=10)
    (root / "left" / "p003.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    return root, [root / "left" / "p003.jpg", "replace or remove"]


def _tll_truncated_in_zip(tmp):
    root = make_tll(tmp / "d", n=10, layout="zip")
    with zipfile.ZipFile(root / "right.zip") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["right/p002.jpg"] = members["right/p002.jpg"][:200]
    with zipfile.ZipFile(root / "right.zip", "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    return root, ["right.zip:right/p002.jpg", "replace or remove"]


def _tll_empty(tmp):
    for side in ("left", "right"):
        (tmp / "d" / side).mkdir(parents=True)
    return tmp / "d", ["empty", "left/"]


def _tll_no_right(tmp):
    root = make_tll(tmp / "d", n=4)
    for p in (root / "right").iterdir():
        p.unlink()
    (root / "right").rmdir()
    return root, ["right/", "right.zip"]


BAD_TLL = {
    "names_do_not_match": _tll_bad_names,
    "garbage_jpg": _tll_garbage_image,
    "truncated_jpg_in_zip": _tll_truncated_in_zip,
    "empty": _tll_empty,
    "no_right_side": _tll_no_right,
}


@pytest.mark.parametrize("case", list(BAD_TLL))
def test_bad_tll_data(tmp_path, capsys, case):
    root, needles = BAD_TLL[case](tmp_path)
    out = tmp_path / "run"
    rc = byol.main(tiny_flags("byol", root, out))
    assert_user_error(rc, capsys.readouterr().err, out, "byol", *needles)


def _missing_dir(tmp, tll):
    return ["--data", "tll", "--data-dir", str(tmp / "nope")], [tmp / "nope", "does not exist"]


def _no_data_dir(tmp, tll):
    return ["--data", "tll"], ["no data at", "--download"]


def _batch_too_large(tmp, tll):
    return ["--data", "tll", "--data-dir", str(tll), "--batch-size", "64", "--val-fraction", "0"], [
        "--batch-size 64",
        "16 training anchors",
        "lower --batch-size",
    ]


def _cuda_absent(tmp, tll):
    return ["--data", "tll", "--data-dir", str(tll), "--device", "cuda"], ["--device cuda", "--device cpu"]


def _empty_folder(tmp, tll):
    (tmp / "f" / "cat").mkdir(parents=True)
    (tmp / "f" / "cat" / "notes.txt").write_text("no images")
    return ["--data", "folder", "--data-dir", str(tmp / "f")], [tmp / "f", "empty"]


def _empty_csv(tmp, tll):
    (tmp / "p.csv").write_text("left,right\n")
    return ["--data", "pairs", "--pairs-csv", str(tmp / "p.csv")], [tmp / "p.csv", "empty"]


def _csv_one_column(tmp, tll):
    csv_path = make_pairs_csv(tmp / "p", n=4, header=False)
    csv_path.write_text(csv_path.read_text() + "imgs/a_1.png\n")
    return ["--data", "pairs", "--pairs-csv", str(csv_path)], ["rows [5]", "two columns"]


def _csv_missing_image(tmp, tll):
    csv_path = make_pairs_csv(tmp / "p", n=4, header=True)
    csv_path.write_text(csv_path.read_text() + "imgs/a_1.png,imgs/gone.png\n")
    return ["--data", "pairs", "--pairs-csv", str(csv_path)], ["gone.png", "do not exist"]


def _no_csv(tmp, tll):
    return ["--data", "pairs"], ["--pairs-csv"]


def _holdout(tmp, tll):
    return ["--data", "tll", "--data-dir", str(tll), "--holdout", "1.5"], ["--holdout 1.5", "[0, 1)"]


def _labels_not_folder(tmp, tll):
    return ["--data", "tll", "--data-dir", str(tll), "--labels", "none"], ["--labels none", "--data folder only"]


def _resume_missing(tmp, tll):
    return ["--resume", str(tmp / "none.pt")], [tmp / "none.pt", "does not exist"]


def _resume_other_method(tmp, tll):
    torch.save({"method": "simsiam", "args": {}}, tmp / "other.pt")
    return ["--resume", str(tmp / "other.pt")], ["simsiam", "not byol.py", "its own script"]


def _resume_garbage(tmp, tll):
    (tmp / "bad.pt").write_bytes(b"\x00garbage" * 100)
    return ["--resume", str(tmp / "bad.pt")], [tmp / "bad.pt", "not a readable checkpoint"]


def _init_missing(tmp, tll):
    return ["--data", "tll", "--data-dir", str(tll), "--init", str(tmp / "w.pt")], [tmp / "w.pt", "--init"]


BAD_ARGS = {
    f.__name__[1:]: f
    for f in [
        _missing_dir,
        _no_data_dir,
        _batch_too_large,
        _cuda_absent,
        _empty_folder,
        _empty_csv,
        _csv_one_column,
        _csv_missing_image,
        _no_csv,
        _holdout,
        _labels_not_folder,
        _resume_missing,
        _resume_other_method,
        _resume_garbage,
        _init_missing,
    ]
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(tmp_path, capsys, tll_dir, case):
    if case == "cuda_absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv, needles = BAD_ARGS[case](tmp_path, tll_dir)
    out = tmp_path / "run"
    common = [
        "--image-size",
        "16",
        "--stem",
        "imagenet",
        "--hidden-dim",
        "32",
        "--proj-dim",
        "16",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--workers",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    rc = byol.main([*common, *argv] if "--resume" not in argv else [*argv, "--no-progress"])  # argv's flags win
    assert_user_error(rc, capsys.readouterr().err, out, "byol", *needles)


@pytest.mark.parametrize("script", ["simsiam", "bn_only"])
def test_errors_name_their_own_script(tmp_path, capsys, script):
    out = tmp_path / "run"
    rc = MODULES[script].main(tiny_flags(script, tmp_path / "nope", out))
    assert_user_error(rc, capsys.readouterr().err, out, script, tmp_path / "nope")


def test_unknown_flag_exits_2_without_traceback():
    r = subprocess.run(
        [sys.executable, "byol.py", "--bogus"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2, r
    assert "unrecognized arguments: --bogus" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_download_offline_gives_manual_instructions(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def offline(file_id, root, filename=None, *a, **k):
        calls.append(filename)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tv_utils, "download_file_from_google_drive", offline)
    out, root = tmp_path / "run", tmp_path / "tll"
    rc = byol.main(tiny_flags("byol", root, out, extra=["--download"]))
    assert calls == ["left.zip"]
    assert_user_error(
        rc, capsys.readouterr().err, out, "byol", "left.zip", "right.zip", byol.TLL_PAGE, root, "without --download"
    )


def test_download_skips_what_is_already_there(tll_dir, tmp_path, capsys, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_file_from_google_drive", lambda *a, **k: pytest.fail("tried to download"))
    out = tmp_path / "run"
    # the data loads (then the oversized batch stops the run before any training)
    rc = byol.main(tiny_flags("byol", tll_dir, out, batch_size=64, extra=["--download"]))
    assert_user_error(rc, capsys.readouterr().err, out, "byol", "16 training anchors")


# ----------------------------------------------------------------------------- divergence, collapse


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    """byol on folder data (groups of 6): the loss turns NaN in epoch 2 and evaluation reports a
    collapsed representation after epoch 1. The pairs and augmentation generators of every step
    are recorded on the way."""
    tmp = tmp_path_factory.mktemp("diverge")
    root = make_folder(tmp / "data", classes=4, per_class=6, seed=2)
    out = tmp / "run"
    real_loss, real_eval = byol.symmetric_cosine_loss, byol.evaluate
    real_batch, real_aug = byol.make_pair_batch, byol.augment_pair
    seen = {"loss": 0, "eval": 0, "pairs": [], "aug": []}

    def loss(*a):
        seen["loss"] += 1
        value = real_loss(*a)
        return value * float("nan") if seen["loss"] > 2 else value  # 2 steps per epoch

    def evaluate(*a, **k):
        seen["eval"] += 1
        m = real_eval(*a, **k)
        if seen["eval"] > 1:  # not the untrained model
            m["collapse_std"] = 1e-5
        return m

    def make_pair_batch(data, order, step, *rest):
        c1, c2 = real_batch(index_coded(data), order, step, *rest[:-1], "cpu")
        seen["pairs"].append((data, decode_index(c1), decode_index(c2)))
        return real_batch(data, order, step, *rest)

    def augment_pair(x1, x2, gen, args, size=None):
        clone = torch.Generator(gen.device)
        clone.set_state(gen.get_state())
        seen["aug"].append(torch.rand(len(x1), generator=clone, device=gen.device).cpu())
        return real_aug(x1, x2, gen, args, size)

    argv = [
        "--data",
        "folder",
        "--data-dir",
        str(root),
        "--image-size",
        "16",
        "--stem",
        "imagenet",
        "--hidden-dim",
        "32",
        "--proj-dim",
        "16",
        "--batch-size",
        "8",
        "--epochs",
        "3",
        "--eval-every",
        "1",
        "--workers",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name, fn in [
            ("symmetric_cosine_loss", loss),
            ("evaluate", evaluate),
            ("make_pair_batch", make_pair_batch),
            ("augment_pair", augment_pair),
        ]:
            mp.setattr(byol, name, fn)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = byol.main(argv)
    return {"rc": rc, "out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), **seen}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(diverged_run):
    r = diverged_run
    assert r["rc"] == 1, r["stderr"]
    assert "Traceback" not in r["stderr"]
    errors = [line for line in r["stderr"].splitlines() if line.startswith("byol.py: error:")]
    assert len(errors) == 1 and "loss became nan in epoch 2" in errors[0] and "last good checkpoint" in errors[0], r[
        "stderr"
    ]
    assert sorted(p.name for p in r["out"].iterdir()) == [".lock", "last.pt", "log.jsonl", "split.json", "tb"]
    ckpt = torch.load(r["out"] / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 and len(ckpt["history"]) == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert math.isfinite(ckpt["history"][-1]["loss"])
    assert "epoch 1/3" in r["stdout"] and "epoch 2/3" not in r["stdout"]


def test_collapse_prints_a_plain_warning(diverged_run):
    r = diverged_run
    warnings = [line for line in r["stderr"].splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, r["stderr"]  # epoch 1 only: never for the untrained model
    assert "collapse" in warnings[0] and "collapse_std=1.00e-05" in warnings[0] and "effective_rank=" in warnings[0]


def test_partner_choice_and_augmentation_draw_independently(diverged_run):
    """Which other member of the group becomes the positive must not be tied to the random
    numbers that augment the anchor: the partner's slot and the first numbers of the step's
    augmentation generator (the view-1 crop areas) must not be correlated."""
    slots, draws = [], []
    for (data, first, second), u in zip(diverged_run["pairs"], diverged_run["aug"]):
        for a, b, x in zip(first.tolist(), second.tolist(), u.tolist()):
            row = data.anchors.tolist().index(a)
            others = [g for g in data.groups[row].tolist() if g not in (-1, a)]
            slots.append(others.index(b))
            draws.append(x)
    assert len(slots) >= 16
    s, d = torch.tensor(slots, dtype=torch.float), torch.tensor(draws)
    corr = torch.corrcoef(torch.stack([s, d]))[0, 1].item()
    assert abs(corr) < 0.6, f"partner slot and augmentation draw correlate: {corr:.3f}"


# ----------------------------------------------------------------------------- the methods


def tiny_encoder():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ), 8


def views(b=6, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def d(p, z):
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


def test_byol_wraps_any_encoder_and_only_the_online_network_learns():
    torch.manual_seed(0)
    model = byol.BYOL(*tiny_encoder(), hidden_dim=16, proj_dim=8)
    x1, x2 = views()
    loss = model(x1, x2)
    assert loss.ndim == 0 and 0 <= loss.item() <= 8
    g = grads(model, loss)
    target = [n for n, _ in model.named_parameters() if n.startswith("target_")]
    assert target and not any(n in g for n in target)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("target_"))
    online = [n for n, _ in model.named_parameters() if n.split(".")[0] in ("encoder", "projector", "predictor")]
    assert set(g) == set(online) and all(g[n].abs().sum() > 0 for n in online if "predictor.3" in n or "encoder.0" in n)
    # the loss is D(p1, z2') + D(p2, z1') with D = 2 - 2cos, each view through the networks on its own
    with torch.no_grad():
        p1, p2 = (model.predictor(model.projector(model.encoder(x))) for x in (x1, x2))
        z1, z2 = (model.target_projector(model.target_encoder(x)) for x in (x1, x2))
        assert torch.allclose(model(x1, x2), d(p1, z2) + d(p2, z1), atol=1e-5)
        # batch norm over both views at once would give another loss: the check can tell the two apart
        q1, q2 = model.predictor(model.projector(model.encoder(torch.cat([x1, x2])))).chunk(2)
        y1, y2 = model.target_projector(model.target_encoder(torch.cat([x1, x2]))).chunk(2)
        assert not torch.allclose(model(x1, x2), d(q1, y2) + d(q2, y1), atol=1e-3)
        # ... which is what joint_bn=True (--bn-stats joint) computes
        joint = byol.BYOL(*tiny_encoder(), hidden_dim=16, proj_dim=8, joint_bn=True)
        joint.load_state_dict(model.state_dict())
        assert torch.allclose(joint(x1, x2), d(q1, y2) + d(q2, y1), atol=1e-5)


def test_byol_update_target():
    torch.manual_seed(0)
    model = byol.BYOL(*tiny_encoder(), hidden_dim=16, proj_dim=8)
    x1, x2 = views()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x1, x2).backward()
    opt.step()  # the online network moves away from the target
    online = lambda: [p.detach().clone() for p in [*model.encoder.parameters(), *model.projector.parameters()]]
    target = lambda: [
        p.detach().clone() for p in [*model.target_encoder.parameters(), *model.target_projector.parameters()]
    ]
    t0, o0 = target(), online()
    assert any(not torch.equal(a, b) for a, b in zip(t0, o0))
    model.update_target(1.0)
    assert all(torch.equal(a, b) for a, b in zip(target(), t0))
    model.update_target(0.75)
    assert all(torch.allclose(a, 0.75 * t + 0.25 * o, atol=1e-6) for a, t, o in zip(target(), t0, o0))
    model.update_target(0.0)
    assert all(torch.allclose(a, o, rtol=0, atol=1e-7) for a, o in zip(target(), o0))
    assert online() and all(torch.equal(a, b) for a, b in zip(online(), o0))  # the online side is untouched


def test_target_tau_rises_from_base_to_one():
    taus = [byol.target_tau(s, 100, 0.99) for s in range(101)]
    assert taus[0] == pytest.approx(0.99) and taus[-1] == pytest.approx(1.0) and taus[50] == pytest.approx(0.995)
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_conv4_relu_after_the_max_pool_is_the_usual_block():
    # max-pool and ReLU commute: checkpoints of conv-BN-ReLU-pool blocks load and embed the same
    torch.manual_seed(0)
    net, _ = byol.build_encoder("conv4", width=8)
    usual = nn.Sequential(*[m for i in range(4) for m in (net[4 * i], net[4 * i + 1], nn.ReLU(), nn.MaxPool2d(2))],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    usual.load_state_dict(net.state_dict())
    x, _ = views(4, 28)
    for mode in (True, False):
        net.train(mode)
        usual.train(mode)
        assert torch.equal(net(x), usual(x))
    assert [type(m) for m in net[:4]] == [nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]


def test_byol_with_a_torchvision_encoder():
    model = byol.BYOL(*byol.build_encoder("resnet18", stem="small"), hidden_dim=32, proj_dim=16)
    x1, x2 = views(4, 16)
    loss = model(x1, x2)
    loss.backward()
    assert 0 <= loss.item() <= 8 and model.embed(x1).shape == (4, 512)
    assert isinstance(model.encoder.maxpool, nn.Identity) and model.encoder.conv1.stride == (1, 1)  # the small stem


def test_simsiam_loss_range_and_stop_gradient():
    torch.manual_seed(0)
    model = simsiam.SimSiam(*tiny_encoder(), proj_dim=8, pred_dim=4)
    x1, x2 = views()
    loss = model(x1, x2)
    assert loss.ndim == 0 and -1 <= loss.item() <= 1
    g = grads(model, loss)

    def manual(detach, per_view=True):
        if per_view:
            z1, z2 = (model.projector(model.encoder(x)) for x in (x1, x2))
        else:  # both views through batch norm at once
            z1, z2 = model.projector(model.encoder(torch.cat([x1, x2]))).chunk(2)
        p1, p2 = model.predictor(z1), model.predictor(z2)
        z1, z2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        return -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2

    with torch.no_grad():
        assert torch.allclose(model(x1, x2), manual(True), atol=1e-5)
        assert not torch.allclose(model(x1, x2), manual(True, per_view=False), atol=1e-3)
    assert close(g, grads(model, manual(True)))
    assert not close(g, grads(model, manual(False)))  # the check can tell the two apart


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("bn_stats", ["per-view", "joint"])
def test_bn_stats_sets_how_many_images_each_batch_norm_sees(name, bn_stats):
    module = MODULES[name]
    flags = ["--proj-dim", "8", "--pred-dim", "4"] if name == "simsiam" else ["--hidden-dim", "16", "--proj-dim", "8"]
    extra = ["--predictor"] if name == "bn_only" else []  # its predictor has batch norm too
    model = module.build_model(args_for(module, [*flags, *extra, "--image-size", "16", "--width", "8", "--bn-stats", bn_stats]))
    seen = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(lambda m, inputs: seen.append(len(inputs[0])))
    x1, x2 = views(5, 16)
    model(x1, x2)
    # conv4 has four batch norms and every projector one: at least five calls, each of the expected size.
    assert len(seen) >= 5 and set(seen) == ({10} if bn_stats == "joint" else {5})


def test_bad_bn_stats_names_the_flag_and_its_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        byol.parse_args(["--bn-stats", "both"])
    assert exit_info.value.code == 2
    assert "argument --bn-stats: invalid choice: 'both' (choose from 'per-view', 'joint')" in capsys.readouterr().err


def test_simsiam_fix_pred_lr_keeps_predictor_lr():
    args = args_for(
        simsiam, ["--fix-pred-lr", "--proj-dim", "16", "--pred-dim", "8", "--image-size", "16", "--lr", "0.1"]
    )
    model = simsiam.build_model(args)
    opt = simsiam.build_optimizer(args, model, model.predictor.parameters())
    fixed = [g for g in opt.param_groups if g.get("fix_lr")]
    assert len(fixed) == 1 and {id(p) for p in fixed[0]["params"]} == {id(p) for p in model.predictor.parameters()}
    assert not any(
        id(p) in {id(q) for q in fixed[0]["params"]}
        for g in opt.param_groups
        if not g.get("fix_lr")
        for p in g["params"]
    )


@pytest.mark.parametrize("stop_grad", [False, True])
def test_bn_only_gradients(stop_grad):
    torch.manual_seed(0)
    model = bn_only.BNOnly(*tiny_encoder(), hidden_dim=16, proj_dim=8, stop_grad=stop_grad)
    x1, x2 = views()
    loss = model(x1, x2)
    assert loss.ndim == 0 and 0 <= loss.item() <= 8
    g = grads(model, loss)

    def manual(detach, per_view=True):
        if per_view:
            z1, z2 = (model.projector(model.encoder(x)) for x in (x1, x2))
        else:  # both views through batch norm at once
            z1, z2 = model.projector(model.encoder(torch.cat([x1, x2]))).chunk(2)
        t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        return d(z1, t2) + d(z2, t1)

    assert close(g, grads(model, manual(stop_grad)))
    assert not close(g, grads(model, manual(not stop_grad)))
    assert not close(g, grads(model, manual(stop_grad, per_view=False)))


def bn_layers(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--no-bn"],
        ["--no-bn", "--predictor"],
        ["--bn-placement", "all"],
        ["--predictor"],
        ["--predictor", "--bn-placement", "all"],
    ],
)
def test_bn_only_ablation_switches(flags):
    args = args_for(bn_only, [*flags, "--hidden-dim", "16", "--proj-dim", "8", "--image-size", "16"])
    model = bn_only.build_model(args)
    heads = [model.projector, model.predictor]
    if "--no-bn" in flags:
        assert not any(bn_layers(h) for h in heads)
        assert bn_layers(model.encoder)  # the encoder's own BN stays
    else:
        assert isinstance(model.projector[1], nn.BatchNorm1d) and model.projector[1].affine
    last = model.projector[-1]
    if "--bn-placement" in flags:
        assert isinstance(last, nn.BatchNorm1d) and not last.affine and last.num_features == 8
    else:
        assert isinstance(last, nn.Linear)
    if "--predictor" in flags:
        assert any(isinstance(m, nn.Linear) for m in model.predictor.modules())
    else:
        assert isinstance(model.predictor, nn.Identity)
    x = torch.randn(4, 3, 16, 16)
    assert model(x, x.flip(-1)).ndim == 0
