"""Training benchmarks (issues #6, #16) at a small size: run with ``pytest --benchmark``.

benchmarks/training.py's sections, one thread (CPU), for conv4 (byol.py's default recipe at width 8, 28 px, batch 16)
and resnet18 (32 px, batch 32); their tables follow the run:

* step: a training step of ours (channels_last, as byol.py trains), for conv4 also compiled (byol.py --compile; not
  for resnet18, whose compile takes minutes on a CPU), of byol-pytorch and of lightly (when installed), and the floor
  (our forward + backward alone), taking turns;
* epoch: a whole epoch with data loading, over 64 Omniglot images (conv4) or 64 synthetic JPEG pairs (resnet18);
* augment: our batched augment_pair against torchvision's per-image transforms;
* kernels: fused Triton vs reference inside our step (CUDA only).

Then benchmarks/time_to_quality.py, both runs side by side for one epoch of a width-8 conv4. Full-size runs: the
commands in the two scripts' docstrings.
"""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]


training, time_to_quality = load_benchmark("training"), load_benchmark("time_to_quality")
pytestmark = pytest.mark.skipif(not training.INSTALLED["byol-pytorch"], reason=training.MISSING["byol-pytorch"])
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMMON = f"--device {DEVICE.type} --repeats 3 --warmup 1 --threads 1 --workers 1 --epochs 1 --max-pairs 64".split()
CFGS = {
    "conv4": training.parse_args(["--arch", "conv4", "--width", "8", "--batch-size", "16", "--compile", *COMMON]),
    "resnet18": training.parse_args(["--arch", "resnet18", "--image-size", "32", "--batch-size", "32", *COMMON]),
}
ARCHS = pytest.mark.parametrize("arch", list(CFGS))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
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
    names = [training.OURS, *[training.COMPILED] * cfg.compile, "byol-pytorch"]
    assert [r["name"] for r in rows] == [*names, *(["lightly"] * training.INSTALLED["lightly"]), training.FLOOR]
    assert all((r.get("compile_s", 0) > 0) == (r["name"] == training.COMPILED) for r in rows)  # timed apart
    assert_timed(rows)
    assert all(r["images_per_call"] == 2 * cfg.batch_size for r in rows)
    note = f"\nNote: {training.THEIR_AUGMENTATION}."
    bench_table(f"training step ({training.describe(cfg, DEVICE)})", training.step_table(rows, *training.PEERS) + note)


@ARCHS
def test_epoch_with_data_loading(arch, bench_table):
    cfg = CFGS[arch]
    rows, source = training.run_epoch_section(cfg, DEVICE)
    assert [r["name"] for r in rows] == ["ours", "byol-pytorch"] + (
        ["lightly"] if training.INSTALLED["lightly"] else []
    )
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
    bench_table(
        f"augmentation alone ({arch}, {2 * cfg.batch_size} images per batch)",
        training.step_table(rows, rows[0]["name"]),
    )


def test_fused_kernels_in_a_step(bench_table):
    if reason := training.fused_skip_reason(DEVICE):
        pytest.skip(reason)
    rows = training.run_kernels_section(CFGS["resnet18"], DEVICE)
    assert [r["name"] for r in rows] == [f"{a} {k}" for a in ("resnet18", "resnet50") for k in ("reference", "fused")]
    assert_timed(rows)
    bench_table("fused kernels in our step", training.step_table(rows))


def test_time_to_quality_runs_both_side_by_side(tmp_path, bench_table, monkeypatch):
    monkeypatch.setenv("POSITIVE_SIMILARITY_CACHE", str(tmp_path / "cache"))  # inherited by both children
    out, png = tmp_path / "ttq.json", tmp_path / "ttq.png"
    assert time_to_quality.main(["--epochs", "1", "--width", "8", "--json", str(out), "--png", str(png)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["runs"]) == {"ours", "byol-pytorch"} and png.stat().st_size > 0
    for impl, run in saved["runs"].items():
        curve = run["curve"]
        assert [p["epoch"] for p in curve] == [0, 1] and curve[0]["train_s"] == 0 < curve[1]["train_s"], (impl, curve)
        assert all(0 <= p["val_one_shot"] <= 1 for p in curve), (impl, curve)
        assert all(b["train_s"] > a["train_s"] for a, b in itertools.pairwise(curve)), (impl, curve)
    table = time_to_quality.table(saved["runs"], 0.1, [tuple(saved["runs"])])
    bench_table("time to quality (width-8 conv4, one epoch each)", table)
