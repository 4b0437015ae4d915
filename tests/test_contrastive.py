"""contrastive.py: its losses against pytorch-metric-learning (the field's reference implementation, in the test
extra only), the negatives it takes from the batch or the labels, the batch composition of --per-group, and
tiny runs of each loss. The scripts' shared harness (resume, DDP, frozen encoder, ...) is tested for
contrastive.py with the other scripts (tiny_data.SCRIPTS).

Tolerance: float64 inputs. Ours computes in float64 there as the reference does, so the two agree to rounding
(1e-9 relative); the same formulas in float32 agree to about 1e-6.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import losses, miners

import contrastive
from tiny_data import REPO, decode_index, index_coded, make_folder, one_thread, run_main, tiny_flags, tll_dir  # noqa: F401

TOL = dict(rtol=1e-9, atol=1e-9)


def batch(draw_seed, b, d, groups):
    """Two views' projections [b, d] each, float64 with gradients, and a group for each pair: one of `groups`
    classes, or with groups=0 the pair itself (--negatives batch)."""
    g = torch.Generator().manual_seed(draw_seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    z2 = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    return z1, z2, torch.randint(0, groups, (b,), generator=g) if groups else torch.arange(b)


def same_value_and_grads(ours, ref, *inputs):
    assert torch.allclose(ours, ref.to(ours.dtype), **TOL), (ours.item(), ref.item())
    g_ours = torch.autograd.grad(ours, inputs, allow_unused=True)
    g_ref = torch.autograd.grad(ref, inputs, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        a = torch.zeros_like(inputs[0]) if a is None else a
        b = torch.zeros_like(inputs[0]) if b is None else b
        assert torch.allclose(a, b, **TOL), (a - b).abs().max()


SIZES = dict(seed=st.integers(0, 2**31), b=st.integers(1, 24), d=st.integers(2, 16))


@settings(max_examples=40, deadline=None)
@given(**SIZES, temperature=st.floats(0.05, 1.0))
def test_ntxent_is_pml_ntxent_through_self_supervised_loss(seed, b, d, temperature):
    z1, z2, _ = batch(seed, b, d, 1)
    pair = torch.arange(b)
    ours = contrastive.ntxent_loss(torch.cat([z1, z2]), torch.cat([pair, pair]), temperature)
    ref = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=temperature))(z1, z2)
    same_value_and_grads(ours, ref, z1, z2)


@settings(max_examples=40, deadline=None)
@given(**SIZES, groups=st.integers(1, 6), temperature=st.floats(0.05, 1.0))
def test_ntxent_with_labels_is_pml_ntxent_on_the_labels(seed, b, d, groups, temperature):
    """--negatives labels: same-group images are positives and never negatives, as in PML's NTXentLoss(labels)."""
    z1, z2, g = batch(seed, b, d, groups)
    ours = contrastive.ntxent_loss(torch.cat([z1, z2]), torch.cat([g, g]), temperature)
    ref = losses.NTXentLoss(temperature=temperature)(torch.cat([z1, z2]), torch.cat([g, g]))
    same_value_and_grads(ours, ref, z1, z2)


REFERENCE_MINERS = {  # our --mining: the PML miner that picks the same triplets
    "batch-hard": lambda margin: miners.BatchHardMiner(),
    "semi-hard": lambda margin: miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard"),
}


@pytest.mark.parametrize("mining", REFERENCE_MINERS)
@settings(max_examples=40, deadline=None)
@given(**SIZES, groups=st.integers(0, 6), margin=st.floats(0.01, 1.0))
def test_triplet_is_pml_triplet_margin_loss_with_its_miner(mining, seed, b, d, groups, margin):
    z1, z2, g = batch(seed, b, d, groups)
    z, labels = torch.cat([z1, z2]), torch.cat([g, g])
    ours = contrastive.triplet_loss(z, labels, margin, mining)
    ref = losses.TripletMarginLoss(margin=margin)(z, labels, REFERENCE_MINERS[mining](margin)(z, labels))
    same_value_and_grads(ours, ref, z1, z2)


def test_batch_pairs_are_the_only_positives_unless_labels_are_given():
    """negatives="batch" ignores the groups (a method without labels); "labels" uses them."""
    torch.manual_seed(0)
    encoder = torch.nn.Flatten()
    x1, x2 = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    batch_model = contrastive.Contrastive(encoder, 4, hidden_dim=8, proj_dim=4, negatives="batch")
    labels_model = contrastive.Contrastive(encoder, 4, hidden_dim=8, proj_dim=4, negatives="labels")
    labels_model.load_state_dict(batch_model.state_dict())
    assert torch.equal(batch_model(x1, x2, groups), batch_model(x1, x2))
    assert not torch.allclose(labels_model(x1, x2, groups), batch_model(x1, x2, groups))
    assert torch.equal(labels_model(x1, x2, torch.arange(6)), batch_model(x1, x2))  # one group a pair: the same loss


# ----------------------------------------------------------------------------- --per-group


def grouped(sizes):
    """A PairData-like object whose anchors fall in groups of the given sizes (groups[:, 0] names the group)."""

    class Data:
        pass

    data = Data()
    first = torch.cat(
        [torch.full((n,), start) for n, start in zip(sizes, torch.tensor([0, *sizes]).cumsum(0)[:-1].tolist())]
    )
    data.groups = first[:, None]
    data.anchors = torch.arange(len(first))
    data.labels = None  # Omniglot's: the groups are the characters
    return data


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=30),
    k=st.sampled_from([1, 2, 4]),
    per_batch=st.integers(1, 8),
    epoch=st.integers(0, 3),
)
def test_per_group_batches_hold_k_anchors_of_distinct_groups(sizes, k, per_batch, epoch):
    data = grouped(sizes)
    batch_size = k * per_batch
    order = contrastive.per_group_order(data, 0, epoch, batch_size, k)
    assert len(order) % batch_size == 0 and len(set(order.tolist())) == len(order)  # whole batches, no anchor twice
    for b in order.view(-1, batch_size):
        counts = torch.bincount(data.groups[b, 0])
        assert set(counts[counts > 0].tolist()) == {k}  # k anchors of each group it holds, so batch_size / k groups
    # As many whole batches as the groups allow: more than one fewer would mean the deal dropped usable blocks.
    blocks = [n // k for n in sizes]
    best = max(nb for nb in range(0, sum(blocks) // per_batch + 1) if sum(min(b, nb) for b in blocks) >= nb * per_batch)
    assert len(order) // batch_size == best


def test_per_group_order_is_a_fresh_shuffle_each_epoch():
    data = grouped([8] * 12)
    a, b = (contrastive.per_group_order(data, 0, e, 16, 4) for e in (0, 1))
    assert sorted(a.tolist()) != a.tolist() and not torch.equal(a, b)


def test_per_group_one_keeps_every_group_once_per_batch_on_omniglot_sized_data():
    """136 characters of 20 drawings and batches of 128: k=1 must not put two drawings of a character together."""
    data = grouped([20] * 136)
    order = contrastive.per_group_order(data, 0, 0, 128, 1)
    assert len(order) // 128 == 21
    for b in order.view(-1, 128):
        assert len(set(data.groups[b, 0].tolist())) == 128


def test_each_pair_gets_its_own_group_on_every_rank():
    """batch_groups reads the same slice of the epoch's order, and the same rank's share, as make_pair_batch: the
    group handed to the loss is the class of the pair's images (index-coded images tell which they are)."""
    labels = torch.arange(60) // 5  # 12 classes of 5 images
    images = torch.zeros(60, 3, 2, 2, dtype=torch.uint8)
    data = index_coded(contrastive.grouped_data(images, [str(i) for i in range(60)], labels, 0.0, 0, "natural"))
    for order in (contrastive.epoch_order(len(data.anchors), 0, 1), contrastive.per_group_order(data, 0, 1, 8, 2)):
        for step in range(len(order) // 8):
            for rank in range(2):
                x1, x2 = contrastive.make_pair_batch(data, order, step, 8, rank, 2, 0, step, "cpu")
                groups = contrastive.batch_groups(contrastive.anchor_groups(data), order, step, 8, rank, 2, "cpu")
                assert len(groups) == 4
                assert torch.equal(labels[decode_index(x1)], groups) and torch.equal(labels[decode_index(x2)], groups)


def test_the_loss_is_fp32_under_autocast():
    """Under bf16 autocast the similarities are computed in fp32: the loss equals the one computed without autocast."""
    torch.manual_seed(0)
    model = contrastive.Contrastive(torch.nn.Flatten(), 16, hidden_dim=8, proj_dim=4)
    model.projector = torch.nn.Identity()  # z = the pixels, exactly, with or without autocast
    x1, x2 = torch.randn(32, 1, 4, 4), torch.randn(32, 1, 4, 4)
    plain = model(x1, x2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x1, x2)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


GATHER = textwrap.dedent("""
    # torchrun, 2 processes: each rank holds half of the batch; the loss over the gathered batch must be the
    # single-process loss, and each rank's gradient (world x, as DDP then averages) that of its own rows.
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    import contrastive

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    z1, z2, groups = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    full1, full2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    labels = torch.cat([groups, groups])
    full = contrastive.ntxent_loss(torch.cat([full1, full2]), labels, 0.2)
    full.backward()
    mine = slice(4 * rank, 4 * rank + 4)
    a, b = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
    g1, g2, gathered = contrastive.global_batch(a, b, groups[mine])
    loss = contrastive.ntxent_loss(torch.cat([g1, g2]), torch.cat([gathered, gathered]), 0.2)
    loss.backward()
    ok = torch.equal(gathered, groups) and torch.allclose(loss, full) and \
        torch.allclose(a.grad / world, full1.grad[mine], atol=1e-6) and torch.allclose(b.grad / world, full2.grad[mine], atol=1e-6)
    print(f"rank {{rank}} ok={{ok}} loss={{loss.item():.6f}} full={{full.item():.6f}}")
    dist.destroy_process_group()
""")


def test_ddp_negatives_come_from_the_whole_batch(tmp_path):
    entry = tmp_path / "gather.py"
    entry.write_text(GATHER.format(repo=str(REPO)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(entry)]
    r = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ok=True") == 2, r.stdout


def test_ddp_training_run(tll_dir, tmp_path):  # noqa: F811
    """contrastive.py's own main under torchrun (gloo, 2 CPU processes), through the gather."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(REPO / "contrastive.py"),
        *tiny_flags("contrastive", tll_dir, tmp_path / "run", extra=["--device", "cpu"]),
    ]
    r = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [0, 1]


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    "flags",
    [
        ["--loss", "ntxent"],
        ["--loss", "triplet", "--mining", "batch-hard"],
        ["--loss", "triplet", "--mining", "semi-hard"],
    ],
    ids=["ntxent", "batch-hard", "semi-hard"],
)
def test_each_loss_trains_and_evaluates(flags, tll_dir, tmp_path, one_thread):  # noqa: F811
    rc, out, err = run_main(contrastive, tiny_flags("contrastive", tll_dir, tmp_path / "run", epochs=2, extra=flags))
    assert rc == 0, err
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and all(r["loss"] > 0 for r in log[1:])
    assert "recall@1:" in out and "trained vs" in out


def test_labels_and_per_group_on_a_class_folder(tmp_path, one_thread):  # noqa: F811
    """--negatives labels and --per-group 2 on class folders: the loop passes each pair's class to the loss."""
    root = make_folder(tmp_path / "data", classes=6, per_class=6)
    seen = []
    real = contrastive.Contrastive.forward

    def spy(self, x1, x2, groups=None):
        seen.append(groups.clone())
        return real(self, x1, x2, groups)

    contrastive.Contrastive.forward = spy
    try:
        rc, _, err = run_main(
            contrastive,
            [
                "--data",
                "folder",
                "--data-dir",
                root,
                "--holdout",
                "0.34",
                "--val-fraction",
                "0",
                "--image-size",
                "16",
                "--width",
                "8",
                "--hidden-dim",
                "16",
                "--proj-dim",
                "8",
                "--batch-size",
                "4",
                "--epochs",
                "1",
                "--negatives",
                "labels",
                "--per-group",
                "2",
                "--workers",
                "1",
                "--no-progress",
                "--out",
                tmp_path / "run",
            ],
        )
    finally:
        contrastive.Contrastive.forward = real
    assert rc == 0, err
    assert seen and all(len(g) == 4 and torch.bincount(g).max() == 2 and len(g.unique()) == 2 for g in seen)


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "0"],
        ["--margin", "-1"],
        ["--temperature", "nan"],
        ["--hidden-dim", "0"],
        ["--per-group", "-1"],
        ["--data", "tll", "--negatives", "labels"],
        ["--data", "pairs", "--negatives", "labels"],
    ],
)
def test_bad_method_flags_are_one_line(flags, tmp_path, capsys):
    assert contrastive.main([*flags, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flags[-2] in err and "Traceback" not in err


def test_forward_with_labels_needs_the_groups():
    model = contrastive.Contrastive(torch.nn.Flatten(), 4, hidden_dim=8, proj_dim=4, negatives="labels")
    with pytest.raises(ValueError, match="groups"):
        model(torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2))


@pytest.mark.parametrize("k", ["3", "8"])  # 3 does not divide the batch of 8; 8 leaves one group a batch
def test_per_group_must_divide_the_batch_into_two_groups_or_more(k, tll_dir, tmp_path, capsys):  # noqa: F811
    assert contrastive.main(tiny_flags("contrastive", tll_dir, tmp_path / "run", extra=["--per-group", k])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--per-group {k}" in err and "--batch-size 8" in err
