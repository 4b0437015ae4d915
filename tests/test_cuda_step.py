"""On a GPU: one step of the training loop (the batch gathered from the image cache on the GPU, augmentation, bf16
forward, backward, optimiser and scheduler steps, BYOL's EMA) never waits for the GPU, so that the host queues the
next step while the GPU runs this one. Needs CUDA and the compiled kernels:
    KERNELS_TEST_DEVICE=cuda python -m pytest -q tests/test_cuda_step.py
(benchmarks/gpu.sh kernels runs it). Without a GPU it is skipped."""

import os

import pytest
import torch

import byol

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and the compiled kernels: KERNELS_TEST_DEVICE=cuda python -m pytest tests/test_cuda_step.py",
)


def training_step(data_file, device):
    """byol.py's loop body, as train() builds it, for a tiny run on `data_file`: step(index) -> the step's loss."""
    args = byol.parse_args(
        [
            "--arch",
            "conv4",
            "--width",
            "8",
            "--hidden-dim",
            "16",
            "--proj-dim",
            "8",
            "--image-size",
            "28",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--data-file",
            str(data_file),
            "--device",
            str(device),
            "--holdout",
            "0",
        ]
    )
    data = byol.load_data(args)
    byol.fit_to_data(args, len(data.anchors), 1)
    data.images = data.images.to(device)  # the image cache on the GPU: a batch is a gather there
    torch.manual_seed(args.seed)
    model = byol.build_model(args).to(device, memory_format=torch.channels_last)
    optimizer = byol.build_method_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, byol.warmup_cosine(100, 10))
    order = byol.epoch_order(data, args.seed, 0, args.batch_size, args.per_group)
    steps = len(order) // args.batch_size

    def step(index):
        x1, x2, _ = byol.make_pair_batch(data, order, index % steps, args.batch_size, 0, 1, args.seed, index, device)
        v1, v2 = byol.augment_pair(x1, x2, byol.step_generator(args.seed, index, device, stream=1), args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(v1, v2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        byol.after_step(model, args, index + 1, 100)
        return loss.detach()

    return step


def test_training_step_makes_no_host_sync(make_data):
    device = torch.device("cuda")
    step = training_step(make_data(), device)
    step(0)  # compiles the kernels, makes the constants, pins host memory
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
    try:
        losses = [step(index) for index in (1, 2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)
