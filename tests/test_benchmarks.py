"""benchmarks/training.py without byol-pytorch: bad arguments give one line, and a tiny run of
our step and augmentation (16 px, batch 4, 1 thread) reports sane timings."""

import json
import math
import time

import pytest
import torch
import torch.utils.flop_counter
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_data import load_benchmark, one_thread  # noqa: F401  (fixture)

training = load_benchmark("training")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--arch", "vgg11"], "invalid choice: 'vgg11'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--only", "everything"], "invalid choice: 'everything'"),
        (["--image-size", "8"], "--image-size 8 is too small"),
        (["--batch-size", "1"], "--batch-size 1 is too small"),
        (["--data-dir", "/no/such/dir"], "does not exist"),
        (["--max-pairs", "4", "--batch-size", "8"], "larger than the 4 pairs"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_bad_arguments_give_one_line(argv, needle, capsys):
    rc = training.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("training.py: error: ") and needle in lines[0], err


def test_data_dir_without_tll_layout_is_one_line(tmp_path, capsys):
    assert training.main(["--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("training.py: error: ") and "left" in err and "\n" not in err, err


def test_tiny_run_of_ours(tmp_path, monkeypatch, capsys):
    # Without byol-pytorch and lightly: only our rows, and the one-line hints instead of a failure.
    monkeypatch.setattr(training, "byol_pytorch_available", lambda: False)
    monkeypatch.setattr(training, "lightly_available", lambda: False)
    out = tmp_path / "result.json"
    rc = training.main(
        [
            "--device",
            "cpu",
            "--image-size",
            "16",
            "--batch-size",
            "4",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--workers",
            "0",
            "--only",
            "step",
            "augment",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert training.BYOL_PYTORCH_MISSING in printed and training.LIGHTLY_MISSING in printed
    assert "| ours channels_last |" in printed
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["step"]] == [
        "ours",
        "ours channels_last",
        training.FLOOR,
        training.FLOOR + ", channels_last",
    ]
    assert [r["name"] for r in result["augment"]] == ["ours augment_pair (cpu)", "torchvision per-image (CPU)"]
    for row in result["step"] + result["augment"]:
        assert row["images_per_call"] == 2 * 4  # both views of every pair
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("median_ms", "min_ms", "max_ms", "images_per_s"))
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["images_per_s"] == pytest.approx(8 / (row["median_ms"] / 1e3))


def test_tiny_epoch_section_reports_time_and_busy_share(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "byol_pytorch_available", lambda: False)
    monkeypatch.setattr(training, "lightly_available", lambda: False)
    out = tmp_path / "result.json"
    rc = training.main(
        [
            "--device",
            "cpu",
            "--image-size",
            "16",
            "--batch-size",
            "4",
            "--max-pairs",
            "8",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--workers",
            "0",
            "--only",
            "epoch",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert (
        "in torch ops (profiled epoch)" in printed
        and "8 synthetic 200x245 JPEG pairs, 8 pairs used, 2 steps of 4" in printed
    )
    [row] = json.loads(out.read_text())["epoch"]
    assert row["name"] == "ours" and row["images_per_epoch"] == 2 * 8 and len(row["epoch_s"]) == 1
    assert row["images_per_s"] == pytest.approx(16 / row["epoch_s"][0])
    assert 0.2 < row["busy"] <= 1.0 and row["profiled_epoch_s"] > 0  # a resnet18 step is almost all torch ops


def covered_cells(intervals):
    return {x for start, end in intervals for x in range(start, end)}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])), max_size=12))
def test_busy_share_is_the_union_of_the_intervals(intervals):
    # Overlapping and nested intervals count once: against a brute-force count of covered unit cells.
    assert training.busy_share(intervals, 80) == pytest.approx(len(covered_cells(intervals)) / 80)


def test_profiled_busy_share_sees_idle_time():
    a = torch.randn(256, 256)

    def busy():
        for _ in range(20):
            a @ a

    def half_idle():  # the idle time last: a share over the span of the events would miss it
        busy()
        with torch.profiler.record_function("waiting"):  # an annotation, as the DataLoader's wait is: not work
            time.sleep(0.5)

    cpu = torch.device("cpu")
    busy()  # warm-up
    working, working_s = training.profiled_busy_share(busy, cpu)
    idling, idling_s = training.profiled_busy_share(half_idle, cpu)
    assert idling_s >= 0.5 and working_s < idling_s
    assert 0.5 < working <= 1.0
    assert idling < 0.5 * working, (working, idling)


def test_our_step_has_byol_settings_and_a_finite_loss():
    cfg = training.parse_args(["--image-size", "16", "--batch-size", "4", "--only", "step"])
    bargs = training.byol_args(cfg)
    assert (bargs.stem, bargs.optimizer) == ("imagenet", "sgd")  # the same stem and optimiser as byol-pytorch's run
    x1, x2 = (training.random_images(4, 16, torch.device("cpu"), seed) for seed in (0, 1))
    torch.manual_seed(0)
    step = training.our_trainer(bargs, torch.device("cpu"))
    loss = step(x1, x2, 0)
    assert math.isfinite(loss.item()) and 0 <= loss.item() <= 8  # two terms of 2 - 2cos


@pytest.mark.skipif(not training.lightly_available(), reason=training.LIGHTLY_MISSING)
def test_lightly_step_trains_with_our_settings():
    cfg = training.parse_args(["--image-size", "16", "--batch-size", "4", "--only", "step"])
    bargs = training.byol_args(cfg)
    x1, x2 = (training.random_images(4, 16, torch.device("cpu"), seed) for seed in (0, 1))
    v1, v2 = training.byol.augment_pair(
        x1, x2, training.byol.step_generator(0, 0, torch.device("cpu"), stream=1), bargs
    )
    step = training.lightly_trainer(bargs, torch.device("cpu"))
    model = step.model
    assert model.projection_head.layers[0].out_features == bargs.hidden_dim  # the same MLPs as ours
    before = [p.detach().clone() for p in model.backbone.parameters()]
    momentum_before = [p.detach().clone() for p in model.backbone_momentum.parameters()]
    losses = [step(v1, v2).item() for _ in range(2)]
    assert all(math.isfinite(x) and -1 <= x <= 1 for x in losses), losses  # lightly's loss is -cos
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))  # SGD stepped
    # The second step's update_momentum moved the momentum network towards the stepped online one.
    assert any(not torch.equal(a, b) for a, b in zip(momentum_before, model.backbone_momentum.parameters()))


@settings(max_examples=25, deadline=None)
@given(
    c_in=st.integers(1, 8),
    c_out=st.integers(1, 8),
    kernel=st.sampled_from([1, 3, 7]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 3),
    size=st.integers(7, 20),
)
def test_conv_flops_match_torch_flop_counter(c_in, c_out, kernel, stride, padding, size):
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
    x = torch.randn(2, c_in, size, size)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        conv(x)
    assert training.conv_flops(conv, x.shape) == counter.get_total_flops()


def test_convs_section_times_each_convolution_of_the_encoder():
    argv = "--arch conv4 --width 4,8,8,16 --image-size 16 --batch-size 4 --repeats 2 --warmup 0 --only convs"
    cfg = training.parse_args(argv.split())
    result = training.run_convs_section(cfg, torch.device("cpu"))
    convs = ["3->4", "4->8", "8->8", "8->16"]
    assert [
        r["conv"].split(",")[0] for r in result["rows"]
    ] == convs * 2  # in call order, channels_last then contiguous
    assert [r["format"] for r in result["rows"]] == ["channels_last"] * 4 + ["contiguous"] * 4
    assert [r["conv"].split(", ")[-1] for r in result["rows"][:4]] == ["16x16 in", "8x8 in", "4x4 in", "2x2 in"]
    for r in result["rows"]:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in r if k.endswith(("_ms", "_gflops"))), r
    assert result["matmul_gflops"] > 0 and result["images_per_step"] == 8
    table = training.convs_table(result)
    expected = 2 * sum(r["forward_backward_ms"] + r["forward_ms"] for r in result["rows"][:4])
    assert f"- the convolutions of one step (8 images), channels_last: {expected:.1f} ms" in table, table


def test_encoder_convs_follow_a_resnet_forward():
    cfg = training.parse_args(["--arch", "resnet18", "--image-size", "32", "--batch-size", "2", "--only", "convs"])
    convs = training.encoder_convs(training.byol_args(cfg), torch.device("cpu"), channels_last=False)
    assert len(convs) == 20 and tuple(convs[0][1]) == (2, 3, 32, 32)  # resnet18: the stem, 16 in blocks, 3 downsamples
    assert convs[0][0].kernel_size == (7, 7) and tuple(convs[-1][1])[1] == 512
