"""benchmarks/training.py and benchmarks/time_to_quality.py at tiny sizes on the CPU (one thread): their arguments,
that they drive byol.py as byol.train does (recipe, fitted settings, schedule, validation score), that every timed
variant trains, and their tables. byol-pytorch and lightly (the bench extra) are needed only by the tests that say so.
"""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from hypothesis import given, settings
from hypothesis import strategies as st

import byol

REPO = Path(__file__).resolve().parents[1]


training, ttq = load_benchmark("training"), load_benchmark("time_to_quality")
CPU = torch.device("cpu")
TINY = "--width 4 --image-size 16 --batch-size 4 --repeats 2 --warmup 1 --threads 1 --workers 0".split()
needs_peers = pytest.mark.skipif(not all(training.INSTALLED.values()), reason="byol-pytorch and lightly: .[bench]")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_peers(monkeypatch):
    monkeypatch.setattr(training, "INSTALLED", dict.fromkeys(training.PEERS, False))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """prepare.py's files in a temporary folder."""
    monkeypatch.setenv("POSITIVE_SIMILARITY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory):
    """One epoch of byol.train on `python byol.py`'s recipe (width 4, 16 px): (model, history, args, data)."""
    tmp = tmp_path_factory.mktemp("omniglot")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POSITIVE_SIMILARITY_CACHE", str(tmp / "cache"))
        torch.set_num_threads(1)
        argv = ["--width", "4", "--image-size", "16", "--eval-every", "1", "--stop-after-epochs", "1", "--no-progress"]
        model, history, args = byol.train(byol.parse_args([*argv, "--out", str(tmp / "run")]))
        torch.set_num_threads(threads)
        return model, history, args, byol.load_data(args), argv


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--arch", "vgg11"], "invalid choice: 'vgg11'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--only", "phases"], "invalid choice: 'phases'"),  # archived with the convs section
        (["--image-size", "8"], "8 is too small; use 16 or more"),
        (["--batch-size", "1"], "1 is too small; use 2 or more"),
        (["--data-dir", "/no/such/dir"], "expected TLL pairs"),
        (["--max-pairs", "4", "--batch-size", "8"], "--batch-size 8 is larger than the 4 pairs"),
        pytest.param(["--device", "cuda"], "no CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="")),
    ],
    ids=["arch", "bogus", "only", "image-size", "batch-size", "data-dir", "max-pairs", "device"],
)
def test_bad_arguments_exit_with_their_reason(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit:
        training.parse_args(argv)
    assert exit.value.code == 2 and needle in capsys.readouterr().err.splitlines()[-1]


def test_the_recipes_are_byol_pys():
    conv4 = training.recipe(training.parse_args([]))  # `python byol.py`'s own, fitted as train() fits it
    fitted = dict(batch_size=128, epochs=45, lr=4e-3 * 128 / 256, weight_decay=1e-6, warmup_epochs=4.5)
    expected = vars(byol.parse_args([])) | fitted
    assert {k: vars(conv4)[k] for k in expected} == expected
    resnet = training.recipe(training.parse_args(["--arch", "resnet50", "--image-size", "32"]))
    assert (resnet.arch, resnet.stem, resnet.optimizer, resnet.hidden_dim, resnet.pretrained) == (
        "resnet50",
        "imagenet",  # byol-pytorch's users' torchvision resnet
        "sgd",
        4096,
        False,
    )
    assert (resnet.batch_size, resnet.lr, resnet.weight_decay) == (64, 0.4 * 64 / 256, 1e-4)


def test_fit_is_what_train_fills_in(omniglot_run):
    *_, args, data, argv = omniglot_run
    fitted = training.fit(byol.parse_args(argv), len(data.anchors))
    names = ("epochs", "batch_size", "lr", "warmup_epochs", "weight_decay")
    assert [getattr(fitted, k) for k in names] == [getattr(args, k) for k in names] == [45, 128, 2e-3, 4.5, 1e-6]


def test_time_to_quality_validates_and_schedules_as_train_does(omniglot_run):
    model, history, args, data, _ = omniglot_run
    assert ttq.one_shot(model, data, args) == pytest.approx(history[-1]["val_one_shot"], abs=1e-6)
    pixels = torch.nn.ModuleDict(dict(encoder=torch.nn.Flatten(), projector=torch.nn.Identity()))
    assert ttq.one_shot(pixels, data, args) == pytest.approx(history[0]["pixels_val_one_shot"], abs=1e-6)
    collapsed = torch.nn.ModuleDict(dict(encoder=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 4))))
    collapsed.projector = torch.nn.Identity()
    torch.nn.init.zeros_(collapsed.encoder[1].weight)
    assert ttq.one_shot(collapsed, data, args) == pytest.approx(1 / 20)  # ties count at random: chance, not 1
    steps = len(data.anchors) // args.batch_size
    assert history[-1]["lr"] == pytest.approx(args.lr * ttq.schedule(args, steps)(steps))  # after epoch 1's steps


def test_our_step_trains_the_encoder_the_peers_get():
    args = training.recipe(training.parse_args(TINY))
    ours = training.our_trainer(args, CPU, total_steps=10)
    start = {k: v.clone() for k, v in ours.model.state_dict().items()}
    theirs = training.encoder(args)[0].state_dict()
    assert theirs.keys() == ours.model.encoder.state_dict().keys()
    assert all(torch.equal(v, start[f"encoder.{k}"]) for k, v in theirs.items())
    x1, x2 = (training.random_images(4, 16, CPU, seed) for seed in (0, 1))
    loss = ours(x1, x2, 0)
    assert math.isfinite(loss.item()) and 0 <= loss.item() <= 8  # two terms of 2 - 2cos
    after = ours.model.state_dict()
    assert not torch.equal(start["encoder.0.weight"], after["encoder.0.weight"])  # AdamW stepped
    assert not torch.equal(start["target_encoder.0.weight"], after["target_encoder.0.weight"])  # after_step's EMA


@needs_peers
def test_the_peers_train_our_encoder_with_our_settings():
    args = training.recipe(training.parse_args(TINY))
    ours = training.encoder(args)[0].state_dict()
    x1, x2 = (training.random_images(4, 16, CPU, seed) for seed in (0, 1))
    theirs, lightly = training.their_trainer(args, CPU), training.lightly_trainer(args, CPU)
    assert all(
        torch.equal(ours[k], v)
        for k, v in theirs.model.net.state_dict().items()
        if "running" not in k and "num_batches" not in k
    )
    assert all(torch.equal(ours[k], v) for k, v in lightly.model.encoder.state_dict().items())
    assert lightly.model.online[1].layers[0].out_features == args.hidden_dim == 1024  # the same MLPs
    momentum = [p.clone() for p in lightly.model.momentum.parameters()]
    views = [v.contiguous() for v in byol.augment_pair(x1, x2, torch.Generator().manual_seed(0), args)]
    losses = [theirs(x1.float() / 255).item(), *(lightly(*views).item() for _ in range(2))]
    assert all(math.isfinite(x) for x in losses) and -1 <= losses[-1] <= 1, losses  # lightly's loss is -cos
    assert any(not torch.equal(a, b) for a, b in zip(momentum, lightly.model.momentum.parameters()))


def test_tiny_step_and_augment_report_sane_rows(no_peers, tmp_path, capsys):
    out = tmp_path / "result.json"
    training.main([*TINY, "--only", "step", "augment", "kernels", "--json", str(out)])
    printed = capsys.readouterr().out
    assert all(training.MISSING[peer] in printed for peer in training.PEERS)
    assert "| ours channels_last |" in printed and "kernels section skipped" in printed
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["step"]] == [training.OURS, training.FLOOR]
    assert [r["name"] for r in result["augment"]] == ["ours augment_pair (cpu)", "torchvision per-image (CPU)"]
    for row in result["step"] + result["augment"]:
        assert row["images_per_call"] == 8 and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"], row
        assert row["images_per_s"] == pytest.approx(8 / (row["median_ms"] / 1e3))


@pytest.mark.parametrize("peers", [False, pytest.param(True, marks=needs_peers)])
def test_tiny_epoch_section_on_tll_pairs(peers, tmp_path, cache, monkeypatch):
    monkeypatch.setattr(training, "INSTALLED", dict.fromkeys(training.PEERS, peers))
    made = training.parse_args([*TINY, "--arch", "resnet18", "--max-pairs", "10", "--only", "step"])
    training.tll_copy(made, tmp_path / "tll")  # 10 synthetic pairs, then 8 of them through --data-dir's links
    cfg = training.parse_args([*TINY, "--data-dir", str(tmp_path / "tll"), "--max-pairs", "8", "--epochs", "1"])
    links = training.tll_copy(cfg, tmp_path / "links")
    assert [Path(p).name for p in links] == [f"{i:05d}.jpg" for i in range(8)]
    for side, name in ((side, Path(p).name) for side in ("left", "right") for p in links):
        assert (tmp_path / "links" / side / name).resolve() == (tmp_path / "tll" / side / name).resolve()
    rows, source = training.run_epoch_section(cfg, CPU)
    assert source == f"{tmp_path / 'tll'}, 8 pairs used, 2 steps of 4 per epoch"
    assert [r["name"] for r in rows] == ["ours", *(training.PEERS if peers else ())]
    assert "prepare.py decodes 16 images once" in rows[0]["note"] and rows[0]["startup_s"] > 0
    for r in rows:
        assert len(r["epoch_s"]) == 1 and r["images_per_s"] == pytest.approx(16 / r["epoch_s"][0]), r
        assert 0 < r["busy"] <= 1 and r["profiled_epoch_s"] > 0, r


def test_tables_put_the_ratios_before_the_note():
    rows = [training.timing_row(name, [s], 10, "n") for name, s in (("a", 1.0), ("b", 2.0))]
    assert training.step_table(rows, "b").splitlines()[2:] == [
        "| a | 1000.0 | 1000.0 | 1000.0 | 10.0 | 2.00x | n |",
        "| b | 2000.0 | 2000.0 | 2000.0 | 5.0 | 1.00x | n |",
    ]
    assert training.fused_skip_reason(CPU) == "the fused Triton kernels need CUDA; kernels section skipped"


def covered_cells(intervals):
    return {x for start, end in intervals for x in range(start, end)}


@settings(max_examples=100, deadline=None)
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
            time.sleep(0.3)

    busy()  # warm-up
    (working, working_s), (idling, idling_s) = (training.profiled_busy_share(f, CPU) for f in (busy, half_idle))
    assert idling_s >= 0.3 and working_s < idling_s and 0.5 < working <= 1.0 and idling < 0.5 * working


def test_time_to_quality_ratio_lines():
    start = {
        "curve": [{"epoch": 0, "train_s": 0.0, "val_one_shot": 0.2}, {"epoch": 1, "train_s": 5.0, "val_one_shot": 0.3}]
    }
    later = {
        "curve": [{"epoch": 0, "train_s": 0.0, "val_one_shot": 0.05}, {"epoch": 1, "train_s": 4.0, "val_one_shot": 0.3}]
    }
    line = lambda a, b, level: ttq.ratio_line("ours", "byol-pytorch", {"ours": a, "byol-pytorch": b}, level)
    assert line(later, start, 0.1) == "- byol-pytorch starts at or above 0.10 (epoch 0); pick a higher --level"
    assert line(start, start, 0.1) == "- ours and byol-pytorch start at or above 0.10 (epoch 0); pick a higher --level"
    assert line(later, later, 0.2) == "- ours / byol-pytorch: 1.00x"
    assert line(later, later, 0.5) == "- ours did not reach 0.50"
    table = ttq.table({"ours": later, "byol-pytorch": start}, 0.25, [("ours", "byol-pytorch")]).splitlines()
    assert table[:4] == [
        "| run | training s to val one-shot 0.25 | at epoch | best val (epoch) | last: epoch, s, val |",
        "| --- | --- | --- | --- | --- |",
        "| ours | 4 | 1 | 0.300 (1) | 1, 4, 0.300 |",
        "| byol-pytorch | 5 | 1 | 0.300 (1) | 1, 5, 0.300 |",
    ]
    assert table[-3:] == ["| --- | --- | --- |", "| 0 | 0, 0.050 | 0, 0.200 |", "| 1 | 4, 0.300 | 5, 0.300 |"]


def test_time_to_quality_gives_byol_pytorch_our_two_views_in_order():
    args = byol.parse_args(["--image-size", "16"])
    first, second = ttq.byol_views(args)
    x = torch.rand(4, 3, 16, 16)
    v1, v2 = first(x), second(x)
    u8 = (x * 255).round().to(torch.uint8)
    expected = byol.augment_pair(u8, u8, torch.Generator().manual_seed(0), args)
    assert torch.equal(v1, expected[0]) and torch.equal(v2, expected[1]) and v1.is_contiguous()


def test_time_to_quality_refuses_bad_arguments(capsys):
    for argv in (["--level", "1.5"], ["--json", "a.json", "b.json"], ["--plot-only", "--json", "/no/such.json"]):
        with pytest.raises(SystemExit):
            ttq.parse_args(argv)
    assert "--json: one file to write" in capsys.readouterr().err
