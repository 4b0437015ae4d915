"""Fused Triton kernels for the training scripts, each with its plain PyTorch reference.

* :func:`cosine_loss` / :func:`symmetric_cosine_loss`: BYOL's normalised MSE
  ``mean_i (2 - 2 cos(p_i, z_i))``, forward and backward fused (the symmetric form
  covers both views in one launch).
* :func:`ema_update_`: the target network's EMA over a list of parameters, one launch
  for the whole list.

On CUDA tensors the Triton kernels run; on CPU, without Triton, or when forced with
:func:`force_reference` / ``KERNELS_FORCE_REFERENCE=1``, the ``*_reference`` functions
run instead (they are also the oracles of the tests in ``tests/``).
"""

from .backend import force_reference, use_triton
from .cosine_loss import (
    cosine_loss,
    cosine_loss_reference,
    symmetric_cosine_loss,
    symmetric_cosine_loss_reference,
)
from .ema import ema_update_, ema_update_reference_

__all__ = [
    "cosine_loss",
    "symmetric_cosine_loss",
    "ema_update_",
    "force_reference",
    "use_triton",
    "cosine_loss_reference",
    "symmetric_cosine_loss_reference",
    "ema_update_reference_",
]
