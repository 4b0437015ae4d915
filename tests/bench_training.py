"""Training benchmark (issue #6) at a small size: run with ``pytest --benchmark``.

benchmarks/training.py's sections on resnet18, 32 px, batch 32, 1 thread (CPU):

* step: one training step of ours (as byol.py runs it; plus channels_last on CPU), of
  byol-pytorch and of lightly (when installed), and the floor (our forward + backward
  alone), timed by pytest-benchmark, same backbone, images and optimiser;
* epoch: a whole epoch over 64 synthetic JPEG pairs with data loading;
* augment: our batched augment_pair against torchvision's per-image transforms;
* kernels: fused Triton vs reference inside a step (CUDA only).

Their markdown tables follow pytest-benchmark's. Full-size runs: the commands in
benchmarks/training.py.
"""

import itertools

import pytest
import torch

from tiny_data import load_training_benchmark

training = load_training_benchmark()

pytestmark = pytest.mark.skipif(not training.byol_pytorch_available(), reason=training.BYOL_PYTORCH_MISSING)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CFG = training.parse_args(["--device", DEVICE.type, "--arch", "resnet18", "--image-size", "32", "--batch-size", "32",
                           "--repeats", "3", "--warmup", "1", "--threads", "1", "--workers", "1", "--epochs", "1",
                           "--max-pairs", "64"])
VARIANTS = {name: (build, note) for name, build, note in training.step_variants(CFG, DEVICE)} if training.byol_pytorch_available() else {}
STEP_ROWS = []


@pytest.fixture(scope="module", autouse=True)
def small_size_threads():
    """One intra-op thread, as CFG says (the benchmark shares the machine with other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(CFG.threads)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_step(benchmark, bench_table, name):
    build, note = VARIANTS[name]
    step, index = build(), itertools.count()

    def one_step():
        step(next(index))
        training.sync(DEVICE)

    benchmark.group = f"training step: {CFG.arch} {CFG.image_size} px batch {CFG.batch_size}"
    benchmark.pedantic(one_step, rounds=CFG.repeats, warmup_rounds=CFG.warmup, iterations=1)
    STEP_ROWS.append(training.timing_row(name, benchmark.stats.stats.data, 2 * CFG.batch_size, note))
    if len(STEP_ROWS) == len(VARIANTS):  # the last variant: the table compares them all
        bench_table(f"training step ({training.describe(CFG, DEVICE)})",
                    training.step_table(STEP_ROWS, "byol-pytorch") + f"\nNote: {training.THEIR_AUGMENTATION}."
                    "\nThe variants ran one after another: under a changing load their ratio drifts; "
                    "benchmarks/training.py interleaves them for fair ratios.")


def test_epoch_with_data_loading(bench_table):
    rows, source = training.run_epoch_section(CFG, DEVICE)
    assert [r["name"] for r in rows] == ["ours", "byol-pytorch"] + (["lightly"] if training.lightly_available() else [])
    bench_table(f"epoch with data loading ({source})", training.epoch_table(rows, DEVICE))


def test_augmentation(bench_table):
    rows = training.run_augment_section(CFG, DEVICE)
    table = training.step_table(rows, rows[0]["name"])
    if any(r["name"] == "ours" for r in STEP_ROWS):  # the step benchmark ran first: compare with it
        table += "\n" + training.augmentation_share(rows, STEP_ROWS)
    bench_table(f"augmentation alone ({2 * CFG.batch_size} images per batch)", table)


def test_fused_kernels_in_a_step(bench_table):
    reason = training.fused_skip_reason(DEVICE)
    if reason:
        pytest.skip(reason)
    bench_table("fused kernels in a real step", training.kernels_table(training.run_kernels_section(CFG, DEVICE)))
