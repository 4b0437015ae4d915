"""Each method's semantics, on tiny networks and random inputs: what its loss is (against a direct transcription of
the paper's formula), where its gradients flow, what its flags build, and contrastive.py's losses against
pytorch-metric-learning, the field's reference implementation (in the test extra only). Nothing here trains.

Tolerances by dtype (TOL): in float64 ours and the transcription differ by rounding alone; in float32 by the
rounding of a few reductions over at most a few hundred numbers.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import losses, miners
from torch import nn

import bn_only
import byol
import contrastive
import redundancy
import simsiam

pytestmark = pytest.mark.usefixtures("one_thread")
MODULES = {
    "byol": byol, "simsiam": simsiam, "bn_only": bn_only, "contrastive": contrastive, "redundancy": redundancy
}  # fmt: skip
TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
DTYPES = list(TOL)
SETTINGS = {"deadline": None, "derandomize": True}  # the same examples every run: a failure reproduces


def tiny_encoder():
    """conv-BN-ReLU-pool: an encoder with batch norm (so that per-view and joint batch norm differ), 4 features."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ), 4


def views(b=6, s=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 3, s, s, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(b, 3, s, s, generator=g, dtype=torch.float64).to(dtype),
    )


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(a, b, dtype=torch.float32):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], **TOL[dtype]) for k in a)


def d(p, z):
    """BYOL's D: the batch mean of 2 - 2 cos."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


def both(net, x1, x2, joint):
    return net(torch.cat([x1, x2])).chunk(2) if joint else (net(x1), net(x2))


def tiny_args(module, *flags):
    dims = {simsiam: ["--proj-dim", "8", "--pred-dim", "4"], redundancy: ["--hidden-dim", "16"]}.get(
        module, ["--hidden-dim", "16", "--proj-dim", "8"]
    )
    return module.parse_args(["--arch", "conv4", "--width", "4", "--image-size", "16", *dims, *flags])


# ----------------------------------------------------------------------------- BYOL


def byol_model(dtype=torch.float32, joint=False, seed=0):
    torch.manual_seed(seed)
    return byol.BYOL(*tiny_encoder(), hidden_dim=16, proj_dim=8, joint_bn=joint).to(dtype)


INPUTS = {"b": st.integers(3, 9), "seed": st.integers(0, 2**16)}


@pytest.mark.parametrize("joint", [False, True], ids=["per-view", "joint"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=6, **SETTINGS)
@given(**INPUTS)
def test_byol_loss_is_the_symmetric_2_minus_2cos_of_prediction_and_target(dtype, joint, b, seed):
    """loss = D(p1, z2') + D(p2, z1'), p the online prediction, z' the target projection, each view through batch
    norm alone (or both at once with joint_bn); the gradient is that of the formula with z' constant."""
    model = byol_model(dtype, joint, seed)
    with torch.no_grad():  # the target apart from the online network, as after a few steps
        for p in [*model.target_encoder.parameters(), *model.target_projector.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    x1, x2 = views(b, seed=seed, dtype=dtype)
    loss = model(x1, x2)
    assert loss.ndim == 0 and 0 <= loss.item() <= 8
    p1, p2 = both(lambda x: model.predictor(model.projector(model.encoder(x))), x1, x2, joint)
    with torch.no_grad():
        z1, z2 = both(lambda x: model.target_projector(model.target_encoder(x)), x1, x2, joint)
    formula = d(p1, z2) + d(p2, z1)
    assert torch.allclose(loss, formula, **TOL[dtype])
    assert close(grads(model, loss), grads(model, formula), dtype)
    # The check tells the two kinds of batch norm apart.
    q1, q2 = both(lambda x: model.predictor(model.projector(model.encoder(x))), x1, x2, not joint)
    with torch.no_grad():
        y1, y2 = both(lambda x: model.target_projector(model.target_encoder(x)), x1, x2, not joint)
        assert not torch.allclose(loss, d(q1, y2) + d(q2, y1), rtol=1e-3, atol=1e-3)


def test_byol_target_gets_no_gradient_and_the_online_network_all_of_it():
    model = byol_model()
    g = grads(model, model(*views()))
    target = {n for n, _ in model.named_parameters() if n.startswith("target_")}
    assert target and not target & set(g)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in target)
    online = {n for n, _ in model.named_parameters() if n.split(".")[0] in ("encoder", "projector", "predictor")}
    assert set(g) == online and all(g[n].abs().sum() > 0 for n in online if n.endswith("weight"))


def online_and_target(model):
    return (
        [p.detach().clone() for p in [*model.encoder.parameters(), *model.projector.parameters()]],
        [p.detach().clone() for p in [*model.target_encoder.parameters(), *model.target_projector.parameters()]],
    )


@settings(max_examples=25, **SETTINGS)
@given(tau=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_byol_update_target_is_an_ema_of_the_online_network(tau, seed):
    """target <- tau target + (1 - tau) online: tau 1 leaves it, tau 0 copies the online network; never the reverse."""
    model = byol_model(torch.float64, seed=seed)
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))  # the online network moved away from the target
    online, target = online_and_target(model)
    assert any(not torch.equal(o, t) for o, t in zip(online, target))
    model.update_target(tau)
    online_after, target_after = online_and_target(model)
    for t_new, t, o in zip(target_after, target, online):
        if tau in (0.0, 1.0):
            assert torch.equal(t_new, o if tau == 0 else t)
        assert torch.allclose(t_new, tau * t + (1 - tau) * o, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(online_after, online))


def test_byol_tau_rises_from_base_tau_to_one_along_a_cosine():
    taus = []
    model = type("Spy", (), {"update_target": lambda self, tau: taus.append(tau)})()
    args = tiny_args(byol, "--base-tau", "0.99")
    logged = [byol.after_step(model, args, step, 100) for step in range(101)]
    assert [r["tau"] for r in logged] == taus  # the tau it logs is the tau it used
    assert taus[0] == pytest.approx(0.99) and taus[50] == pytest.approx(0.995) and taus[100] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(taus))
    assert taus[25] == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)  # BYOL eq. 3


# ----------------------------------------------------------------------------- SimSiam


def simsiam_manual(model, x1, x2, detach, joint=False):
    z1, z2 = both(lambda x: model.projector(model.encoder(x)), x1, x2, joint)
    p1, p2 = both(model.predictor, z1, z2, joint)
    if detach:
        z1, z2 = z1.detach(), z2.detach()
    return -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2


@pytest.mark.parametrize("joint", [False, True], ids=["per-view", "joint"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=6, **SETTINGS)
@given(**INPUTS)
def test_simsiam_loss_is_minus_half_the_cosines_with_z_detached(dtype, joint, b, seed):
    torch.manual_seed(seed)
    model = simsiam.SimSiam(*tiny_encoder(), proj_dim=8, pred_dim=4, joint_bn=joint).to(dtype)
    x1, x2 = views(b, seed=seed, dtype=dtype)
    loss = model(x1, x2)
    assert loss.ndim == 0 and -1 <= loss.item() <= 1
    assert torch.allclose(loss, simsiam_manual(model, x1, x2, True, joint), **TOL[dtype])
    g = grads(model, loss)
    assert close(g, grads(model, simsiam_manual(model, x1, x2, True, joint)), dtype)
    assert not close(g, grads(model, simsiam_manual(model, x1, x2, False, joint)), dtype)  # it can tell


def test_simsiam_gradients_reach_z_only_through_the_predictor():
    """Stop-gradient: the loss's gradient with respect to each projection z is all the one that flows back through
    p = predictor(z); the direct path into z, as the other view's target, carries none."""
    torch.manual_seed(0)
    model = simsiam.SimSiam(*tiny_encoder(), proj_dim=8, pred_dim=4)
    seen = []

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)

    model.projector.register_forward_hook(keep)
    model(*views()).backward()
    z1, z2 = seen
    # z as leaves into the predictor only, the targets constants: the same gradient.
    y1, y2 = (z.detach().clone().requires_grad_() for z in (z1, z2))
    p1, p2 = model.predictor(y1), model.predictor(y2)
    (-(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2).backward()
    assert torch.allclose(z1.grad, y1.grad, atol=1e-7) and torch.allclose(z2.grad, y2.grad, atol=1e-7)


def test_simsiam_fix_pred_lr_keeps_the_predictor_rate_constant():
    args = tiny_args(simsiam, "--fix-pred-lr", "--lr", "0.1")
    simsiam.fit_to_data(args, 100, 1)
    model = simsiam.build_model(args)
    opt = simsiam.build_method_optimizer(args, model)
    fixed = [g for g in opt.param_groups if g.get("fix_lr")]
    predictor = {id(p) for p in model.predictor.parameters()}
    assert len(fixed) == 1 and {id(p) for p in fixed[0]["params"]} == predictor
    assert all(id(p) not in predictor for g in opt.param_groups if not g.get("fix_lr") for p in g["params"])
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    # Without the flag the predictor follows the schedule with the rest.
    args = tiny_args(simsiam, "--lr", "0.1")
    simsiam.fit_to_data(args, 100, 1)
    assert not any(g.get("fix_lr") for g in simsiam.build_method_optimizer(args, model).param_groups)


# ----------------------------------------------------------------------------- BN-only


def bn_only_manual(model, x1, x2, detach, joint=False):
    z1, z2 = both(lambda x: model.projector(model.encoder(x)), x1, x2, joint)
    p1, p2 = both(model.predictor, z1, z2, joint)
    t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
    return d(p1, t2) + d(p2, t1)


@pytest.mark.parametrize("predictor", [False, True], ids=["no-predictor", "predictor"])
@pytest.mark.parametrize("stop_grad", [False, True], ids=["both-views", "stop-grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=4, **SETTINGS)
@given(**INPUTS)
def test_bn_only_gradients_reach_both_views_unless_stop_grad(dtype, stop_grad, predictor, b, seed):
    torch.manual_seed(seed)
    model = bn_only.BNOnly(*tiny_encoder(), hidden_dim=16, proj_dim=8, stop_grad=stop_grad, predictor=predictor).to(
        dtype
    )
    x1, x2 = views(b, seed=seed, dtype=dtype)
    loss = model(x1, x2)
    assert loss.ndim == 0 and 0 <= loss.item() <= 8
    assert torch.allclose(loss, bn_only_manual(model, x1, x2, stop_grad), **TOL[dtype])
    g = grads(model, loss)
    assert close(g, grads(model, bn_only_manual(model, x1, x2, stop_grad)), dtype)
    assert not close(g, grads(model, bn_only_manual(model, x1, x2, not stop_grad)), dtype)


def batch_norms(module):
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
        ["--stop-grad"],
    ],
    ids=lambda f: " ".join(f) or "default",
)
def test_bn_only_switches_change_the_module_as_named(flags):
    model = bn_only.build_model(tiny_args(bn_only, *flags))
    heads = [model.projector, model.predictor]
    if "--no-bn" in flags:
        assert not any(batch_norms(h) for h in heads) and batch_norms(model.encoder)  # the encoder keeps its own
    else:
        assert isinstance(model.projector[1], nn.BatchNorm1d) and model.projector[1].affine
    last = model.projector[-1]
    if "--bn-placement" in flags:
        assert isinstance(last, nn.BatchNorm1d) and not last.affine and last.num_features == 8
    else:
        assert isinstance(last, nn.Linear) and last.out_features == 8
    if "--predictor" in flags:
        linears = [m for m in model.predictor.modules() if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 8)]
        assert bool(batch_norms(model.predictor)) == ("--no-bn" not in flags)
        assert not any(isinstance(m, nn.BatchNorm1d) and not m.affine for m in model.predictor.modules())
    else:
        assert isinstance(model.predictor, nn.Identity)
    assert model.stop_grad == ("--stop-grad" in flags)
    x = torch.randn(4, 3, 16, 16)
    assert model(x, x.flip(-1)).ndim == 0


# ----------------------------------------------------------------------------- redundancy: VICReg and Barlow Twins


def barlow_twins_algorithm_1(z_a, z_b, lambd=5e-3):
    """The paper's Algorithm 1, line by line; its normalisation as the authors' code (BatchNorm1d(affine=False): the
    biased std with eps 1e-5), where the printed pseudo-code's std is unbiased."""
    n, d = z_a.shape
    z_a_norm = (z_a - z_a.mean(0)) / (z_a.var(0, unbiased=False) + 1e-5).sqrt()
    z_b_norm = (z_b - z_b.mean(0)) / (z_b.var(0, unbiased=False) + 1e-5).sqrt()
    c = torch.mm(z_a_norm.T, z_b_norm) / n
    c_diff = (c - torch.eye(d, dtype=c.dtype)).pow(2)
    c_diff[~torch.eye(d, dtype=torch.bool)] *= lambd  # off_diagonal(c_diff).mul_(lambda)
    return c_diff.sum()


# b from 4: over 2 or 3 rows a standardised column is about +-1 and its float32 gradient carries rounding past 1e-5
REDUNDANCY_SIZES = {"seed": st.integers(0, 2**31), "b": st.integers(4, 24), "d": st.integers(2, 16)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=30, **SETTINGS)
@given(**REDUNDANCY_SIZES, scale=st.floats(0.01, 10.0))
def test_vicreg_loss_is_pml_vicreg_loss(dtype, seed, b, d, scale):
    """Its three terms with the paper's weights 25/25/1; scale sweeps the variance hinge from all on to all off."""
    z1, z2, _ = batch(seed, b, d, 0, dtype)
    ours = redundancy.vicreg_loss(z1 * scale, z2 * scale)
    ref = losses.VICRegLoss()(z1 * scale, ref_emb=z2 * scale)
    same_value_and_grads(ours, ref, (z1, z2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=30, **SETTINGS)
@given(**REDUNDANCY_SIZES, lambd=st.floats(1e-4, 1.0))
def test_barlow_twins_loss_is_the_papers_algorithm_1(dtype, seed, b, d, lambd):
    z1, z2, _ = batch(seed, b, d, 0, dtype)
    same_value_and_grads(
        redundancy.barlow_twins_loss(z1, z2, lambd), barlow_twins_algorithm_1(z1, z2, lambd), (z1, z2), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=30, **SETTINGS)
@given(**REDUNDANCY_SIZES)
def test_barlow_twins_loss_is_lightlys(dtype, seed, b, d):
    lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is in the bench extra").BarlowTwinsLoss()
    z1, z2, _ = batch(seed, b, d, 0, dtype)
    same_value_and_grads(redundancy.barlow_twins_loss(z1, z2), lightly_loss(z1, z2), (z1, z2), dtype)


@pytest.mark.parametrize("loss", ["vicreg", "barlow"])
def test_redundancy_trains_a_3_layer_expander_by_its_loss_alone(loss):
    model = redundancy.build_model(tiny_args(redundancy, "--loss", loss))
    linears = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 16), (16, 16), (16, 16)]
    assert len(batch_norms(model.projector)) == 2 and not hasattr(model, "predictor")
    x1, x2 = views(5, 16)
    z1, z2 = model.projector(model.encoder(x1)), model.projector(model.encoder(x2))
    reference = {"vicreg": losses.VICRegLoss()(z1, ref_emb=z2), "barlow": barlow_twins_algorithm_1(z1, z2)}[loss]
    assert torch.allclose(model(x1, x2), reference, **TOL[torch.float32])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # batch statistics stay fp32
        assert model(x1, x2).dtype == torch.float32


# ----------------------------------------------------------------------------- batch norm per view or joint


@pytest.mark.parametrize("bn_stats", ["per-view", "joint"])
@pytest.mark.parametrize("name", MODULES)
def test_bn_stats_sets_how_many_images_each_batch_norm_sees(name, bn_stats):
    module = MODULES[name]
    extra = ["--predictor"] if name == "bn_only" else []  # its predictor has batch norm too
    model = module.build_model(tiny_args(module, *extra, "--bn-stats", bn_stats))
    seen = []
    for m in batch_norms(model):
        m.register_forward_pre_hook(lambda m, inputs: seen.append(len(inputs[0])))
    model(*views(5, 16))
    # conv4 has four batch norms and every head one at least: each call of the expected size.
    assert len(seen) >= 5 and set(seen) == ({10} if bn_stats == "joint" else {5})


# ----------------------------------------------------------------------------- contrastive: the losses


def batch(seed, b, d, groups, dtype=torch.float64):
    """Two views' projections [b, d] each with gradients, and each pair's group: one of `groups` classes, or with
    groups=0 the pair itself."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    z2 = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return z1, z2, torch.randint(0, groups, (b,), generator=g) if groups else torch.arange(b)


def same_value_and_grads(ours, ref, inputs, dtype):
    assert ours.dtype == inputs[0].dtype  # computed at the inputs' precision (float32 at least)
    assert torch.allclose(ours, ref.to(ours.dtype), **TOL[dtype]), (ours.item(), ref.item())
    g_ours = torch.autograd.grad(ours, inputs, allow_unused=True)
    g_ref = torch.autograd.grad(ref, inputs, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        a = torch.zeros_like(inputs[0]) if a is None else a
        b = torch.zeros_like(inputs[0]) if b is None else b
        assert torch.allclose(a, b, **TOL[dtype]), (a - b).abs().max()


SIZES = {"seed": st.integers(0, 2**31), "b": st.integers(1, 24), "d": st.integers(2, 16)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=30, **SETTINGS)
@given(**SIZES, temperature=st.floats(0.05, 1.0))
def test_ntxent_is_pml_ntxent_through_self_supervised_loss(dtype, seed, b, d, temperature):
    """--negatives batch: SimCLR's NT-Xent, every other image of the batch a negative."""
    z1, z2, _ = batch(seed, b, d, 0, dtype)
    pair = torch.arange(b)
    ours = contrastive.ntxent_loss(torch.cat([z1, z2]), torch.cat([pair, pair]), temperature)
    ref = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=temperature))(z1, z2)
    same_value_and_grads(ours, ref, (z1, z2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=30, **SETTINGS)
@given(**SIZES, groups=st.integers(1, 6), temperature=st.floats(0.05, 1.0))
def test_ntxent_with_labels_is_pml_ntxent_on_the_labels(dtype, seed, b, d, groups, temperature):
    """--negatives labels: same-group images are positives and never negatives, as in PML's NTXentLoss(labels)."""
    z1, z2, g = batch(seed, b, d, groups, dtype)
    ours = contrastive.ntxent_loss(torch.cat([z1, z2]), torch.cat([g, g]), temperature)
    ref = losses.NTXentLoss(temperature=temperature)(torch.cat([z1, z2]), torch.cat([g, g]))
    same_value_and_grads(ours, ref, (z1, z2), dtype)


REFERENCE_MINERS = {  # our --mining: the PML miner that picks the same triplets
    "batch-hard": lambda margin: miners.BatchHardMiner(),
    "semi-hard": lambda margin: miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard"),
}


@pytest.mark.parametrize("mining", REFERENCE_MINERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=30, **SETTINGS)
@given(**SIZES, groups=st.integers(0, 6), margin=st.floats(0.01, 1.0))
def test_triplet_is_pml_triplet_margin_loss_with_its_miner(dtype, mining, seed, b, d, groups, margin):
    z1, z2, g = batch(seed, b, d, groups, dtype)
    z, labels = torch.cat([z1, z2]), torch.cat([g, g])
    ours = contrastive.triplet_loss(z, labels, margin, mining)
    ref = losses.TripletMarginLoss(margin=margin)(z, labels, REFERENCE_MINERS[mining](margin)(z, labels))
    same_value_and_grads(ours, ref, (z1, z2), dtype)


def contrastive_model(negatives="batch", **kw):
    torch.manual_seed(0)
    return contrastive.Contrastive(nn.Flatten(), 4, hidden_dim=8, proj_dim=4, negatives=negatives, **kw)


@pytest.mark.parametrize("loss", ["ntxent", "triplet"])
def test_batch_negatives_ignore_the_groups_and_labels_use_them(loss):
    """negatives="batch": each pair its own group, whatever groups say; "labels": same-group images are positives
    (the loss of one group a pair is the batch loss again)."""
    x1, x2 = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    by_batch = contrastive_model("batch", loss=loss)
    by_labels = contrastive_model("labels", loss=loss)
    by_labels.load_state_dict(by_batch.state_dict())
    assert torch.equal(by_batch(x1, x2, groups), by_batch(x1, x2))
    assert not torch.allclose(by_labels(x1, x2, groups), by_batch(x1, x2, groups))
    assert torch.equal(by_labels(x1, x2, torch.arange(6)), by_batch(x1, x2))
    # The loss is the function's on both views' projections, each pair labelled by its group.
    with torch.no_grad():
        z = torch.cat(both(lambda x: by_labels.projector(by_labels.encoder(x)), x1, x2, False))
        labels = torch.cat([groups, groups])
        direct = (
            contrastive.ntxent_loss(z, labels, 0.2)
            if loss == "ntxent"
            else contrastive.triplet_loss(z, labels, 0.2, "batch-hard")
        )
        assert torch.allclose(by_labels(x1, x2, groups), direct, atol=1e-6)


def test_negatives_labels_needs_the_groups():
    model = contrastive_model("labels")
    with pytest.raises(ValueError, match="groups"):
        model(torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2))
    assert contrastive.Contrastive.takes_groups  # so the training loop passes them


@pytest.mark.parametrize("loss", ["ntxent", "triplet"])
def test_the_loss_is_computed_in_fp32_under_bf16_autocast(loss):
    """Under autocast the similarities are fp32: the loss is the one computed without autocast (bf16 logits would
    be off by about 0.03)."""
    model = contrastive_model(loss=loss)
    model.projector = nn.Identity()  # z = the pixels, exactly, with or without autocast
    x1, x2 = torch.randn(32, 1, 4, 4), torch.randn(32, 1, 4, 4)
    plain = model(x1, x2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x1, x2)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


# ----------------------------------------------------------------------------- encoders (shared by the methods)


@pytest.mark.parametrize("width,features", [([8], 8), ([4, 8, 8, 16], 16), (8, 8)])
@pytest.mark.parametrize("size", [16, 28, 33])
def test_conv4_gives_its_last_width_as_features_at_any_small_size(width, features, size):
    net, dim = byol.build_encoder("conv4", width=width)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert dim == features and net(torch.randn(3, 3, size, size)).shape == (3, features)
    assert [c.out_channels for c in convs] == (list(width) * (4 // len(width)) if isinstance(width, list) else [8] * 4)


def test_conv4_relu_after_the_max_pool_is_the_usual_block():
    """max-pool and ReLU commute: conv-BN-ReLU-pool checkpoints load and embed the same."""
    torch.manual_seed(0)
    net, _ = byol.build_encoder("conv4", width=[8])
    usual = nn.Sequential(
        *[m for i in range(4) for m in (net[4 * i], net[4 * i + 1], nn.ReLU(), nn.MaxPool2d(2))],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    usual.load_state_dict(net.state_dict())
    x = torch.randn(4, 3, 28, 28)
    for mode in (True, False):
        net.train(mode)
        usual.train(mode)
        assert torch.equal(net(x), usual(x))


def test_resnet18_takes_the_small_stem_for_small_images():
    net, dim = byol.build_encoder("resnet18", stem="small")
    assert dim == 512 and isinstance(net.maxpool, nn.Identity) and net.conv1.stride == (1, 1)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert byol.parse_args(["--image-size", "64", "--arch", "resnet18"]).stem == "small"
    assert byol.parse_args(["--image-size", "96", "--arch", "resnet18"]).stem == "imagenet"


def test_an_unknown_arch_and_conv4_pretrained_are_user_errors():
    with pytest.raises(byol.UserError, match="--arch resnet7"):
        byol.build_encoder("resnet7")
    with pytest.raises(byol.UserError, match="conv4 has no ImageNet weights"):
        byol.build_encoder("conv4", pretrained=True, width=8)
