"""Training benchmarks (issues #6, #16) at a small size: run with ``pytest --benchmark``.

benchmarks/training.py's sections, 1 thread (CPU), for conv4 (byol.py's default encoder and
recipe, width 8, 28 px, batch 16) and resnet18 (32 px, batch 32); their tables follow the run:

* step: a training step of ours (contiguous and channels_last, as byol.py trains), of byol-pytorch
  and of lightly (when installed), and the floor (our forward + backward alone), taking turns;
* epoch: a whole epoch with data loading, over 64 Omniglot images (conv4) or 64 synthetic JPEG
  pairs (resnet18);
* augment: our batched augment_pair against torchvision's per-image transforms;
* phases (conv4): our step by phase on Omniglot batches, its top ops, evaluate() per epoch;
* convs (conv4): each convolution of our encoder alone, against a large matmul's GFLOP/s;
* kernels: fused Triton vs reference inside a step (CUDA only).

Then benchmarks/time_to_quality.py with both runs side by side for one epoch of a width-8 conv4.

Full-size runs: the commands in benchmarks/training.py and benchmarks/time_to_quality.py.
"""

import itertools
import json
import math

import pytest
import torch

from tiny_data import load_benchmark

training = load_benchmark("training")
time_to_quality = load_benchmark("time_to_quality")

pytestmark = pytest.mark.skipif(not training.byol_pytorch_available(), reason=training.BYOL_PYTORCH_MISSING)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMMON = f"--device {DEVICE.type} --repeats 3 --warmup 1 --threads 1 --workers 1 --epochs 1 --max-pairs 64".split()
CFGS = {
    "conv4": training.parse_args(["--arch", "conv4", "--width", "8", "--batch-size", "16", *COMMON]),
    "resnet18": training.parse_args(["--arch", "resnet18", "--image-size", "32", "--batch-size", "32", *COMMON]),
}
STEP_ROWS = {}  # arch -> the step section's rows, for the augmentation's share of a step
ARCHS = pytest.mark.parametrize("arch", list(CFGS))


@pytest.fixture(scope="module", autouse=True)
def small_size_threads():
    """One intra-op thread, as the configurations say (the benchmark shares the machine with other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_timed(rows):
    for r in rows:
        assert math.isfinite(r["median_ms"]) and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], r


@ARCHS
def test_training_step(arch, bench_table):
    cfg = CFGS[arch]
    rows = training.run_step_section(cfg, DEVICE)
    assert {"ours", "byol-pytorch", training.FLOOR} <= {r["name"] for r in rows}
    assert_timed(rows)
    assert all(r["images_per_call"] == 2 * cfg.batch_size for r in rows)
    STEP_ROWS[arch] = rows
    bench_table(
        f"training step ({training.describe(cfg, DEVICE)})",
        training.step_table(rows, *training.PEERS) + f"\nNote: {training.THEIR_AUGMENTATION}.",
    )


def test_peers_train_the_same_conv4():
    # The same encoder for every implementation, seeded alike: ours, byol-pytorch's net and lightly's backbone.
    bargs = training.byol_args(CFGS["conv4"])
    assert (bargs.arch, bargs.width, bargs.optimizer, bargs.hidden_dim) == (
        "conv4",
        [8, 8, 8, 8],
        "adamw",
        1024,
    )  # the default recipe at --width 8
    ours = training.our_model(bargs, torch.device("cpu"), channels_last=False).encoder.state_dict()
    net, feature_dim, hidden_layer = training.peer_backbone(bargs)
    assert (feature_dim, hidden_layer) == (8, -1)
    assert ours.keys() == net.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in net.state_dict().items())


@ARCHS
def test_epoch_with_data_loading(arch, bench_table):
    cfg = CFGS[arch]
    rows, source = training.run_epoch_section(cfg, DEVICE)
    assert [r["name"] for r in rows] == ["ours", "byol-pytorch"] + (["lightly"] if training.lightly_available() else [])
    assert all(s > 0 for r in rows for s in r["epoch_s"]) and all(0 < r["busy"] <= 1 for r in rows), rows
    expected = {
        "conv4": "embedded Omniglot (images_background_small1.zip, 105x105 PNG), 64 pairs used, 4 steps of 16",
        "resnet18": "64 synthetic 200x245 JPEG pairs, 64 pairs used, 2 steps of 32",
    }[arch]
    assert source.startswith(expected), source
    bench_table(f"epoch with data loading ({source})", training.epoch_table(rows, DEVICE))


@ARCHS
def test_augmentation(arch, bench_table):
    cfg = CFGS[arch]
    rows = training.run_augment_section(cfg, DEVICE)
    assert_timed(rows)
    table = training.step_table(rows, rows[0]["name"])
    if arch in STEP_ROWS:  # the step benchmark ran first: compare with it
        table += "\n" + training.augmentation_share(rows, STEP_ROWS[arch])
    bench_table(f"augmentation alone ({arch}, {2 * cfg.batch_size} images per batch)", table)


def test_phases_of_our_step(bench_table):
    result = training.run_phases_section(CFGS["conv4"], DEVICE)
    phases = result["phases"]
    assert tuple(phases) == training.PHASES and all(math.isfinite(ms) and ms > 0 for ms in phases.values()), phases
    assert 0.5 * sum(phases.values()) < result["step_ms"] < 2 * sum(phases.values()), result
    assert (
        result["steps_per_epoch"] == 2720 // 16
        and result["eval_every"] == training.byol.RECIPES["omniglot"]["eval_every"]
        and result["eval_s"] > 0
    )  # byol.py's recipe
    shares = [share for _, _, share in result["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-6, result["top_ops"]
    assert any("conv" in name for name, _, _ in result["top_ops"]), result["top_ops"]  # the encoder's convolutions
    bench_table("where our step's time goes (conv4 width 8, batch 16)", training.phases_table(result))


def test_convolutions_alone(bench_table):
    result = training.run_convs_section(CFGS["conv4"], DEVICE)
    assert len(result["rows"]) == 8 and result["matmul_gflops"] > 0  # conv4's 4 convolutions in 2 memory formats
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > r["forward_ms"] for r in result["rows"]), result
    bench_table("the convolutions alone (conv4 width 8, batch 16)", training.convs_table(result))


def test_time_to_quality_runs_both_side_by_side(tmp_path, bench_table):
    out, png = tmp_path / "ttq.json", tmp_path / "ttq.png"
    assert time_to_quality.main(["--budget-s", "1", "--width", "8", "--json", str(out), "--png", str(png)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["runs"]) == {"ours", "byol-pytorch"} and png.stat().st_size > 0
    for impl, run in saved["runs"].items():
        curve = run["curve"]
        assert curve[0]["train_s"] == 0 and [p["epoch"] for p in curve] == list(range(len(curve))), (impl, curve)
        assert len(curve) >= 2 and curve[-1]["train_s"] >= 1, (impl, curve)  # trained until the budget was spent
        assert all(b["train_s"] > a["train_s"] for a, b in itertools.pairwise(curve)), (impl, curve)
        assert all(0 <= p[k] <= 1 for p in curve for k in ("val_one_shot", "one_shot")), (impl, curve)
        assert all(p["eval_s"] > 0 for p in curve), (impl, curve)
    bench_table(
        "time to quality (width-8 conv4, one epoch each)",
        time_to_quality.table(saved["runs"], 0.1, [tuple(saved["runs"])]),
    )


def test_fused_kernels_in_a_step(bench_table):
    reason = training.fused_skip_reason(DEVICE)
    if reason:
        pytest.skip(reason)
    cfg = CFGS["resnet18"]
    rows = training.run_kernels_section(cfg, DEVICE)
    assert_timed(rows)
    bench_table("fused kernels in a real step", training.kernels_table(rows))


def test_time_to_quality_has_no_ratio_when_the_untrained_network_is_already_there():
    start = {
        "curve": [{"epoch": 0, "train_s": 0.0, "val_one_shot": 0.2}, {"epoch": 1, "train_s": 5.0, "val_one_shot": 0.3}]
    }
    later = {
        "curve": [{"epoch": 0, "train_s": 0.0, "val_one_shot": 0.05}, {"epoch": 1, "train_s": 4.0, "val_one_shot": 0.3}]
    }
    line = time_to_quality.ratio_line("ours", "byol-pytorch", {"ours": later, "byol-pytorch": start}, 0.1)
    assert line == "- byol-pytorch starts at or above 0.10 (epoch 0); pick a higher --level"
    assert time_to_quality.ratio_line("ours", "byol-pytorch", {"ours": start, "byol-pytorch": later}, 0.1) == (
        "- ours starts at or above 0.10 (epoch 0); pick a higher --level"
    )
    both = time_to_quality.ratio_line("ours", "byol-pytorch", {"ours": start, "byol-pytorch": start}, 0.1)
    assert both == "- ours and byol-pytorch start at or above 0.10 (epoch 0); pick a higher --level"
    assert time_to_quality.ratio_line("ours", "byol-pytorch", {"ours": later, "byol-pytorch": later}, 0.2) == (
        "- ours / byol-pytorch: 1.00x"
    )
