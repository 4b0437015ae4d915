"""Backend selection: fused Triton kernels on CUDA tensors, plain PyTorch everywhere else.

The reference path is always available (CPU, no Triton installed, A/B runs). Triton
is imported lazily and only once, so that ``import kernels`` works where Triton is
missing or broken; a failed import simply means "use the reference".

Forcing the reference path:
  * ``force_reference(True)`` from Python (and ``force_reference(False)`` to undo);
  * ``KERNELS_FORCE_REFERENCE=1`` in the environment, read once at import.
"""

from __future__ import annotations

import os

import torch

__all__ = ["force_reference", "is_reference_forced", "triton_available", "use_triton"]

_FORCED: bool = os.environ.get("KERNELS_FORCE_REFERENCE", "").strip().lower() not in ("", "0", "false", "no", "off")
_TRITON_OK: bool | None = None  # None: not tried yet


def force_reference(enabled: bool = True) -> None:
    """Force (``enabled=True``) or stop forcing (``False``) the PyTorch reference path."""
    global _FORCED
    _FORCED = bool(enabled)


def is_reference_forced() -> bool:
    return _FORCED


def triton_available() -> bool:
    """True iff ``import triton`` works (tried once, then cached)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install raising something else
            _TRITON_OK = False
    return _TRITON_OK


def use_triton(*tensors: torch.Tensor) -> bool:
    """True iff the fused Triton kernels should run on these tensors.

    That is: the reference path is not forced, Triton imports, and every tensor lives
    on a CUDA device. (With no tensors at all there is nothing to run on: False.)
    """
    if _FORCED or not tensors:
        return False
    # Cheap check first so that CPU runs never pay for importing Triton.
    if not all(t.is_cuda for t in tensors):
        return False
    return triton_available()
