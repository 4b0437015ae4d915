"""Fused exponential moving average of parameter lists (BYOL's target network update).

    target <- tau * target + (1 - tau) * online        for every (target, online) pair

Which tensors: parameters only, not BN running statistics (nor any buffer). The target
network always runs in train mode, so its BatchNorm layers normalise with batch
statistics and their running statistics are never used during training; evaluation
uses the online network. Integer buffers (``num_batches_tracked``) could not be
averaged anyway. Callers therefore pass ``list(target.parameters())`` and
``list(online.parameters())``.

CUDA design (a "multi-tensor apply", as in apex / torch's ``_foreach`` kernels, but in
Triton): ONE kernel launch for the whole list (one per dtype group; normally a model
has a single dtype). Two device tables describe the work:
  * ``ptrs``: int64 data pointers, row 0 targets, row 1 onlines;
  * ``chunks``: one row ``(tensor index, start, count)`` per BLOCK-sized chunk.
Program ``i`` reads chunk ``i``, casts the int64 addresses to typed pointers
(``tl.load(...).to(tl.pointer_type(DT))``; this also works under TRITON_INTERPRET=1
on CPU tensors, where the addresses are host addresses) and updates its chunk with
one masked block. The tables are built once and cached, keyed by the tensors' data
pointers, sizes and dtypes, so the hot path is: build the key, one dict lookup, one
launch. ``tau`` is a runtime float argument: no recompilation as it changes each step.

Numerics: computed in fp32, stored in the tensor's dtype (one rounding; the reference
rounds twice for fp16/bf16). tau=1 leaves finite targets bit-identical and tau=0 copies
``online`` exactly, on both paths (up to the sign of a zero and inf*0 = nan, which the
literal formula cannot avoid). Note that in bf16 a step of (1-tau)*(online-target) is
often below half an ulp of target and is lost: keep EMA targets in fp32.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from . import backend

try:  # guarded: without Triton the reference path still works
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = ["ema_update_", "ema_update_reference_", "ema_update_triton_"]

BLOCK = 2048  # elements per chunk (= per program)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAN_CACHE_SIZE = 8  # a few models (e.g. A/B runs) at a time; least recently used goes


# --------------------------------------------------------------------------------------
# Validation and reference
# --------------------------------------------------------------------------------------
def _check_tau(tau) -> float:
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:  # also rejects nan
        raise ValueError(f"ema_update_: tau must lie in [0, 1], got {tau}")
    return tau


def _check_lists(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor]) -> None:
    if len(target) != len(online):
        raise ValueError(f"ema_update_: {len(target)} target tensors but {len(online)} online tensors")
    for i, (t, o) in enumerate(zip(target, online)):
        if not isinstance(t, torch.Tensor) or not isinstance(o, torch.Tensor):
            raise ValueError(f"ema_update_: item {i} is not a pair of tensors")
        if t.shape != o.shape:
            raise ValueError(
                f"ema_update_: item {i}: shapes differ: target {tuple(t.shape)} vs online {tuple(o.shape)}"
            )
        if t.dtype != o.dtype:
            raise ValueError(f"ema_update_: item {i}: dtypes differ: target {t.dtype} vs online {o.dtype}")
        if not t.is_floating_point():
            raise ValueError(
                f"ema_update_: item {i}: cannot average {t.dtype} tensors (pass parameters, not integer buffers)"
            )
        if t.device != o.device:
            raise ValueError(f"ema_update_: item {i}: devices differ: target {t.device} vs online {o.device}")


@torch.no_grad()
def ema_update_reference_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """In place ``target <- tau * target + (1 - tau) * online``, plain vectorised PyTorch."""
    tau = _check_tau(tau)
    target, online = list(target), list(online)
    _check_lists(target, online)
    if not target:
        return
    torch._foreach_mul_(target, tau)
    torch._foreach_add_(target, online, alpha=1.0 - tau)


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _ema_kernel(
        PTRS, CHUNKS, n_tensors, tau, one_minus_tau, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
    ):
        chunk = tl.program_id(0).to(tl.int64)
        idx = tl.load(CHUNKS + chunk * 3)
        start = tl.load(CHUNKS + chunk * 3 + 1)
        count = tl.load(CHUNKS + chunk * 3 + 2)
        t_ptr = tl.load(PTRS + idx).to(tl.pointer_type(DT))
        o_ptr = tl.load(PTRS + n_tensors + idx).to(tl.pointer_type(DT))
        if ALIGNED:
            # host checked every address is 16-byte aligned; starts are multiples of
            # BLOCK by construction. Without these hints the loads are not vectorised:
            # the compiler knows nothing about an address loaded from memory.
            t_ptr = tl.multiple_of(t_ptr, 16)
            o_ptr = tl.multiple_of(o_ptr, 16)
            start = tl.multiple_of(start, BLOCK)
        offs = start + tl.arange(0, BLOCK)
        # the literal formula, like the reference: tau=1 gives t + 0 = t, tau=0 gives 0 + o = o
        if count == BLOCK:
            # full chunk (all but each tensor's last): no mask, so that the compiler can
            # vectorise (a mask against a runtime count defeats that)
            t = tl.load(t_ptr + offs).to(tl.float32)
            o = tl.load(o_ptr + offs).to(tl.float32)
            tl.store(t_ptr + offs, (t * tau + o * one_minus_tau).to(DT))
        else:
            mask = tl.arange(0, BLOCK) < count
            t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
            o = tl.load(o_ptr + offs, mask=mask).to(tl.float32)
            tl.store(t_ptr + offs, (t * tau + o * one_minus_tau).to(DT), mask=mask)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class _Group:
    """One launch: the device tables for the tensors of one dtype."""

    __slots__ = ("dtype", "ptrs", "chunks", "n_tensors", "n_chunks", "aligned")

    def __init__(self, dtype, ptrs, chunks, n_tensors, n_chunks, aligned):
        self.dtype, self.ptrs, self.chunks = dtype, ptrs, chunks
        self.n_tensors, self.n_chunks, self.aligned = n_tensors, n_chunks, aligned


class _Plan:
    __slots__ = ("groups", "rest")

    def __init__(self, groups, rest):
        self.groups = groups  # list[_Group]
        self.rest = rest  # indices handled by the reference (non-dense layouts, fp64, ...)


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()


def _dense_same_layout(t: torch.Tensor, o: torch.Tensor) -> bool:
    # flat indexing is right iff both cover exactly numel elements with equal strides
    if t.stride() != o.stride():
        return False
    if t.is_contiguous():
        return True
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _build_plan(target: list, online: list) -> _Plan:
    _check_lists(target, online)
    device = target[0].device
    by_dtype: dict = {}
    rest = []
    for i, (t, o) in enumerate(zip(target, online)):
        if t.dtype in _KERNEL_DTYPES and _dense_same_layout(t, o):
            if t.numel() > 0:
                by_dtype.setdefault(t.dtype, []).append(i)
        else:
            rest.append(i)
    groups = []
    for dtype, idxs in by_dtype.items():
        numel = np.array([target[i].numel() for i in idxs], dtype=np.int64)
        ptrs = np.array([[target[i].data_ptr() for i in idxs], [online[i].data_ptr() for i in idxs]], dtype=np.int64)
        n_chunks = (numel + BLOCK - 1) // BLOCK
        owner = np.repeat(np.arange(len(idxs), dtype=np.int64), n_chunks)
        first_chunk = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        start = (np.arange(owner.size, dtype=np.int64) - first_chunk) * BLOCK
        count = np.minimum(BLOCK, numel[owner] - start)
        chunks = np.stack([owner, start, count], axis=1)  # [n_chunks, 3]
        aligned = bool((ptrs % 16 == 0).all())
        groups.append(
            _Group(
                dtype,
                torch.from_numpy(ptrs.reshape(-1)).to(device),
                torch.from_numpy(np.ascontiguousarray(chunks).reshape(-1)).to(device),
                len(idxs),
                int(owner.size),
                aligned,
            )
        )
    return _Plan(groups, rest)


def _plan_key(target: list, online: list) -> tuple:
    # everything the plan depends on: addresses, sizes, dtypes (shapes and strides are
    # checked when a plan is built; the same addresses with the same sizes and dtypes
    # describe the same memory, so a hit needs no new validation)
    ptr, numel = torch.Tensor.data_ptr, torch.Tensor.numel
    return (
        tuple(map(ptr, target)),
        tuple(map(ptr, online)),
        tuple(map(numel, target)),
        tuple(map(numel, online)),
        tuple(t.dtype for t in target),
        tuple(o.dtype for o in online),
        target[0].device,
    )


def _get_plan(target: list, online: list) -> _Plan:
    key = _plan_key(target, online)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(target, online)
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


@torch.no_grad()
def ema_update_triton_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """The fused Triton path, whatever the device (CPU tensors need TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: use ema_update_reference_")
    tau = _check_tau(tau)
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"ema_update_: {len(target)} target tensors but {len(online)} online tensors")
    if not target:
        return
    plan = _get_plan(target, online)
    for g in plan.groups:
        _ema_kernel[(g.n_chunks,)](
            g.ptrs,
            g.chunks,
            g.n_tensors,
            tau,
            1.0 - tau,
            DT=_TL_DTYPES[g.dtype],
            ALIGNED=g.aligned,
            BLOCK=BLOCK,
            num_warps=4,
        )
    if plan.rest:
        ema_update_reference_([target[i] for i in plan.rest], [online[i] for i in plan.rest], tau)


def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """In place ``target <- tau * target + (1 - tau) * online`` for every pair.

    One fused Triton launch on CUDA (see the module docstring), the vectorised PyTorch
    reference elsewhere. Pass parameters only (``list(model.parameters())``).
    """
    target, online = list(target), list(online)
    if backend.use_triton(*target, *online):
        ema_update_triton_(target, online, tau)
    else:
        ema_update_reference_(target, online, tau)
