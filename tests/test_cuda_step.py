"""On a GPU: byol.py's training loop body (the batch gathered from the image cache on the GPU,
augmentation, forward, backward, SGD, EMA) never waits for the GPU, so the host can queue the
next step while the GPU runs this one. Needs CUDA and the compiled kernels:
    KERNELS_TEST_DEVICE=cuda python -m pytest -q tests/test_cuda_step.py
(benchmarks/gpu.sh kernels runs it). Without a GPU it is skipped."""

import os

import pytest
import torch

import byol
from tiny_data import load_benchmark

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and the compiled kernels: KERNELS_TEST_DEVICE=cuda python -m pytest tests/test_cuda_step.py",
)


def test_training_step_makes_no_host_sync():
    device = torch.device("cuda")
    training = load_benchmark("training")
    cfg = training.parse_args(["--device", "cuda", "--image-size", "32", "--batch-size", "8"])
    bargs = training.byol_args(cfg)
    n = 16
    images = torch.randint(0, 256, (2 * n, 3, 32, 32), dtype=torch.uint8)
    data = byol.pairs_data(
        images, [f"{i}.jpg" for i in range(2 * n)], list(range(n)), list(range(n, 2 * n)), 0.0, 0, "natural"
    )
    byol.cache_on_device(data, device)
    assert data.images.is_cuda
    step = training.our_trainer(bargs, device, channels_last=True)  # byol.py's step: augment, bf16 forward, SGD, EMA
    order = byol.epoch_order(len(data.anchors), 0, 0)

    def one_step(index):
        x1, x2 = byol.make_pair_batch(data, order, index % 2, 8, 0, 1, 0, index, device)
        return step(x1, x2, index)

    one_step(0)  # compiles the kernels, builds the EMA plan, makes the constants, pins host memory
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
    try:
        losses = [one_step(index) for index in (1, 2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)
