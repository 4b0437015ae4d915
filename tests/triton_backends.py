"""Where the kernel tests run, and which Triton backends this install has.

DEVICE holds the kernel tests' tensors. The default, cpu, runs the kernels in Triton's
interpreter (conftest sets TRITON_INTERPRET=1). KERNELS_TEST_DEVICE=cuda runs the same
tests on the compiled kernels on a GPU:
    KERNELS_TEST_DEVICE=cuda python -m pytest -q tests/test_cosine_loss.py tests/test_ema.py
"""

import os

import torch

DEVICE = torch.device(os.environ.get("KERNELS_TEST_DEVICE", "cpu"))


def nvidia_backend_available():
    try:
        import triton.backends

        return "nvidia" in triton.backends.backends
    except Exception:
        return False
