"""Training benchmark (issue #6) at a small size: run with ``pytest --benchmark``.

benchmarks/training.py's sections on resnet18, 32 px, batch 32, 1 thread (CPU); their tables
follow the run:

* step: a training step of ours (as byol.py runs it; plus channels_last on CPU), of byol-pytorch
  and of lightly (when installed), and the floor (our forward + backward alone), taking turns;
* epoch: a whole epoch over 64 synthetic JPEG pairs with data loading;
* augment: our batched augment_pair against torchvision's per-image transforms;
* kernels: fused Triton vs reference inside a step (CUDA only).

Full-size runs: the commands in benchmarks/training.py.
"""

import math

import pytest
import torch

from tiny_data import load_benchmark

training = load_benchmark("training")

pytestmark = pytest.mark.skipif(not training.byol_pytorch_available(), reason=training.BYOL_PYTORCH_MISSING)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CFG = training.parse_args(["--device", DEVICE.type, "--arch", "resnet18", "--image-size", "32", "--batch-size", "32",
                           "--repeats", "3", "--warmup", "1", "--threads", "1", "--workers", "1", "--epochs", "1",
                           "--max-pairs", "64"])
STEP_ROWS = []  # the step section's rows, for the augmentation's share of a step


@pytest.fixture(scope="module", autouse=True)
def small_size_threads():
    """One intra-op thread, as CFG says (the benchmark shares the machine with other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(CFG.threads)
    yield
    torch.set_num_threads(n)


def assert_timed(rows):
    for r in rows:
        assert math.isfinite(r["median_ms"]) and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], r


def test_training_step(bench_table):
    rows = training.run_step_section(CFG, DEVICE)
    assert {"ours", "byol-pytorch", training.FLOOR} <= {r["name"] for r in rows}
    assert_timed(rows)
    STEP_ROWS[:] = rows
    bench_table(f"training step ({training.describe(CFG, DEVICE)})",
                training.step_table(rows, "byol-pytorch") + f"\nNote: {training.THEIR_AUGMENTATION}.")


def test_epoch_with_data_loading(bench_table):
    rows, source = training.run_epoch_section(CFG, DEVICE)
    assert [r["name"] for r in rows] == ["ours", "byol-pytorch"] + (["lightly"] if training.lightly_available() else [])
    assert all(s > 0 for r in rows for s in r["epoch_s"]) and all(0 < r["busy"] <= 1 for r in rows), rows
    bench_table(f"epoch with data loading ({source})", training.epoch_table(rows, DEVICE))


def test_augmentation(bench_table):
    rows = training.run_augment_section(CFG, DEVICE)
    assert_timed(rows)
    table = training.step_table(rows, rows[0]["name"])
    if STEP_ROWS:  # the step benchmark ran first: compare with it
        table += "\n" + training.augmentation_share(rows, STEP_ROWS)
    bench_table(f"augmentation alone ({2 * CFG.batch_size} images per batch)", table)


def test_fused_kernels_in_a_step(bench_table):
    reason = training.fused_skip_reason(DEVICE)
    if reason:
        pytest.skip(reason)
    rows = training.run_kernels_section(CFG, DEVICE)
    assert_timed(rows)
    bench_table("fused kernels in a real step", training.kernels_table(rows))
