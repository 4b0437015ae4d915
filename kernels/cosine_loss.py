"""Fused cosine-similarity loss (BYOL's normalised MSE), forward + backward in Triton.

    cosine_loss(p, z)              = mean_i (2 - 2 cos(p_i, z_i))
    symmetric_cosine_loss(p1, p2, z1, z2) = cosine_loss(p1, z2) + cosine_loss(p2, z1)

``||F.normalize(p) - F.normalize(z)||^2 = 2 - 2 cos``, so this is exactly BYOL's loss;
SimSiam's negative cosine is ``loss / 2 - 1``. Norms are guarded like ``F.normalize``:
``x / max(||x||, eps)`` with ``eps = 1e-12``, so an all-zero row gives loss 2 and finite
gradients.

Layout of this file (as in the Triton "layer norm" tutorial and Liger-Kernel):
  1. the plain PyTorch reference (the oracle, and the path used off-GPU);
  2. Triton kernels: forward writes the per-row loss plus per-row fp32 statistics,
     backward re-reads the inputs once and writes the gradients once;
  3. launchers and the ``torch.autograd.Function``;
  4. public functions that dispatch on :func:`kernels.backend.use_triton`.

Both pairs of the symmetric loss go through ONE launch: the grid is
``(row blocks, pairs)`` and the pair index picks the pointers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend

try:  # guarded: without Triton the reference path still works
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = [
    "cosine_loss",
    "symmetric_cosine_loss",
    "cosine_loss_reference",
    "symmetric_cosine_loss_reference",
    "cosine_loss_triton",
    "symmetric_cosine_loss_triton",
]

EPS = 1e-12  # F.normalize's default
FLT_MIN = 2.0**-126  # smallest normal fp32
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Validation (shared by both paths so that they fail the same way)
# --------------------------------------------------------------------------------------
def _check_pair(p: torch.Tensor, z: torch.Tensor, names: str = "p, z") -> None:
    if not isinstance(p, torch.Tensor) or not isinstance(z, torch.Tensor):
        raise ValueError(f"cosine loss ({names}): expected tensors, got {type(p).__name__} and {type(z).__name__}")
    if p.dim() != 2 or z.dim() != 2:
        raise ValueError(
            f"cosine loss ({names}): expected 2-D [B, D] tensors, got shapes {tuple(p.shape)} and {tuple(z.shape)}"
        )
    if p.shape != z.shape:
        raise ValueError(f"cosine loss ({names}): shapes differ: {tuple(p.shape)} vs {tuple(z.shape)}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(
            f"cosine loss ({names}): empty input of shape {tuple(p.shape)} (the mean over rows is undefined)"
        )
    if p.dtype != z.dtype:
        raise ValueError(f"cosine loss ({names}): dtypes differ: {p.dtype} vs {z.dtype}; cast both to one dtype")
    if not p.is_floating_point():
        raise ValueError(f"cosine loss ({names}): expected floating point inputs, got {p.dtype}")


def _check_symmetric(p1, p2, z1, z2) -> None:
    _check_pair(p1, z2, "p1, z2")
    _check_pair(p2, z1, "p2, z1")
    if p1.shape != p2.shape or p1.dtype != p2.dtype:
        raise ValueError(
            f"symmetric cosine loss: the two views differ: p1 {tuple(p1.shape)} {p1.dtype}, p2 {tuple(p2.shape)} {p2.dtype}"
        )


# --------------------------------------------------------------------------------------
# 1. Reference (PyTorch). Upcast to at least fp32; fp64 stays fp64 (used as the oracle).
# --------------------------------------------------------------------------------------
def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cosine_loss_reference(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i (2 - 2 cos(p_i, z_i)) in plain PyTorch, computed in fp32 (fp64 for fp64 inputs)."""
    _check_pair(p, z)
    p = F.normalize(_upcast(p), dim=1, eps=EPS)
    z = F.normalize(_upcast(z), dim=1, eps=EPS)
    return (2.0 - 2.0 * (p * z).sum(dim=1)).mean()


def symmetric_cosine_loss_reference(p1, p2, z1, z2) -> torch.Tensor:
    """cosine_loss_reference(p1, z2) + cosine_loss_reference(p2, z1)."""
    _check_symmetric(p1, p2, z1, z2)
    return cosine_loss_reference(p1, z2) + cosine_loss_reference(p2, z1)


# --------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------
# Per pair and row, the forward saves 4 fp32 statistics, rows of a [4, B] block:
#   0: 1/np        np = max(||p||, eps)
#   1: 1/nz        nz = max(||z||, eps)
#   2: cos if ||p|| > eps else 0   (coefficient of the p-term in d cos / dp)
#   3: cos if ||z|| > eps else 0   (same for z)
# With ph = p/np, zh = z/nz and cos = <ph, zh>:
#   d cos/dp = (zh - cos*ph) / np   (the cos*ph term vanishes where the clamp is active,
#   d cos/dz = (ph - cos*zh) / nz    exactly as torch's clamp_min passes no gradient there)
# and the loss row is 2 - 2 cos, averaged over B, so dL/dp = (-2 g / B) * d cos/dp.
_N_STATS = 4

if triton is not None:

    @triton.jit
    def _cos_fwd_rows(
        p_ptr,
        z_ptr,
        stride_p,
        stride_z,
        stats_ptr,
        loss_ptr,
        B,
        D,
        row0,
        EPS: tl.constexpr,
        FLT_MIN: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = row0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        rows64 = rows.to(tl.int64)  # row * stride may pass 2**31 elements
        p_rows = p_ptr + rows64[:, None] * stride_p
        z_rows = z_ptr + rows64[:, None] * stride_z

        # Sums of squares overflow fp32 once |x| ~ 1e19 (1e30 is legal in fp32/bf16), so
        # accumulate like LAPACK's nrm2 / online softmax: keep the running row max m and
        # sums of (x/m)^2 and (p/mp)(z/mz), rescaling them when m grows. A few extra
        # flops per element in a memory-bound kernel; tiny inputs stop underflowing too.
        # m starts at FLT_MIN (not 0) so that 1/m stays finite for zero/subnormal rows.
        mp = tl.full([BLOCK_B], FLT_MIN, tl.float32)
        mz = tl.full([BLOCK_B], FLT_MIN, tl.float32)
        spp = tl.zeros([BLOCK_B], dtype=tl.float32)
        szz = tl.zeros([BLOCK_B], dtype=tl.float32)
        spz = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < D)[None, :]
            p = tl.load(p_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mp_new = tl.maximum(mp, tl.max(tl.abs(p), axis=1))
            mz_new = tl.maximum(mz, tl.max(tl.abs(z), axis=1))
            # Per-row divisions and square roots are IEEE-rounded (div_rn, sqrt_rn), not the GPU's
            # approximate ones: they cost nothing next to the per-element work, and the compiled
            # kernel then rounds as the interpreter does, so one tolerance table fits both.
            rp = tl.div_rn(mp, mp_new)  # <= 1: shrink what was accumulated at the old scale
            rz = tl.div_rn(mz, mz_new)
            ps = p * tl.div_rn(1.0, mp_new)[:, None]
            zs = z * tl.div_rn(1.0, mz_new)[:, None]
            spp = spp * (rp * rp) + tl.sum(ps * ps, axis=1)
            szz = szz * (rz * rz) + tl.sum(zs * zs, axis=1)
            spz = spz * (rp * rz) + tl.sum(ps * zs, axis=1)
            mp = mp_new
            mz = mz_new

        norm_p = mp * tl.sqrt_rn(spp)
        norm_z = mz * tl.sqrt_rn(szz)
        inv_np = tl.div_rn(1.0, tl.maximum(norm_p, EPS))
        inv_nz = tl.div_rn(1.0, tl.maximum(norm_z, EPS))
        # cos = <p, z> / (np nz) = spz * (mp/np) * (mz/nz): never forms the raw dot product
        cos = spz * (mp * inv_np) * (mz * inv_nz)

        tl.store(stats_ptr + rows, inv_np, mask=row_mask)
        tl.store(stats_ptr + B + rows, inv_nz, mask=row_mask)
        tl.store(stats_ptr + 2 * B + rows, tl.where(norm_p > EPS, cos, 0.0), mask=row_mask)
        tl.store(stats_ptr + 3 * B + rows, tl.where(norm_z > EPS, cos, 0.0), mask=row_mask)
        tl.store(loss_ptr + rows, 2.0 - 2.0 * cos, mask=row_mask)

    @triton.jit
    def _cosine_fwd_kernel(
        P0,
        Z0,
        P1,
        Z1,
        stride_p0,
        stride_z0,
        stride_p1,
        stride_z1,
        STATS,
        LOSS,
        B,
        D,
        EPS: tl.constexpr,
        FLT_MIN: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # grid = (cdiv(B, BLOCK_B), n_pairs); pair 1 exists only for the symmetric loss
        row0 = tl.program_id(0) * BLOCK_B
        pair = tl.program_id(1)
        if pair == 0:
            _cos_fwd_rows(P0, Z0, stride_p0, stride_z0, STATS, LOSS, B, D, row0, EPS, FLT_MIN, BLOCK_B, BLOCK_D)
        else:
            _cos_fwd_rows(
                P1, Z1, stride_p1, stride_z1, STATS + 4 * B, LOSS + B, B, D, row0, EPS, FLT_MIN, BLOCK_B, BLOCK_D
            )

    @triton.jit
    def _cos_bwd_rows(
        p_ptr,
        z_ptr,
        stride_p,
        stride_z,
        dp_ptr,
        dz_ptr,
        stats_ptr,
        scale,
        B,
        D,
        row0,
        NEED_DP: tl.constexpr,
        NEED_DZ: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = row0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        rows64 = rows.to(tl.int64)
        p_rows = p_ptr + rows64[:, None] * stride_p
        z_rows = z_ptr + rows64[:, None] * stride_z
        inv_np = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
        inv_nz = tl.load(stats_ptr + B + rows, mask=row_mask, other=0.0)
        cos_p = tl.load(stats_ptr + 2 * B + rows, mask=row_mask, other=0.0)
        cos_z = tl.load(stats_ptr + 3 * B + rows, mask=row_mask, other=0.0)
        # row factors; the order (x * 1/nx) * (scale/ny) keeps every product in range
        # even for |x| ~ 1e30 (1/(np nz) alone would underflow)
        cp = scale * inv_np
        cz = scale * inv_nz
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < D)[None, :]
            p = tl.load(p_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            ph = p * inv_np[:, None]
            zh = z * inv_nz[:, None]
            # gradients are written contiguously ([B, D], row stride D)
            offs = rows64[:, None] * D + cols[None, :]
            if NEED_DP:
                dp = cp[:, None] * (zh - cos_p[:, None] * ph)
                tl.store(dp_ptr + offs, dp.to(dp_ptr.dtype.element_ty), mask=mask)
            if NEED_DZ:
                dz = cz[:, None] * (ph - cos_z[:, None] * zh)
                tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cosine_bwd_kernel(
        P0,
        Z0,
        P1,
        Z1,
        stride_p0,
        stride_z0,
        stride_p1,
        stride_z1,
        DP0,
        DZ0,
        DP1,
        DZ1,
        STATS,
        GRAD_OUT,
        B,
        D,
        NEED_DP0: tl.constexpr,
        NEED_DZ0: tl.constexpr,
        NEED_DP1: tl.constexpr,
        NEED_DZ1: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row0 = tl.program_id(0) * BLOCK_B
        pair = tl.program_id(1)
        # grad_output is read on the device: no .item(), no host sync
        scale = tl.div_rn(tl.load(GRAD_OUT).to(tl.float32) * -2.0, B * 1.0)  # B * 1.0: also when B is specialised to 1
        # two inlined copies, each with its own constexpr flags, so that a gradient
        # nobody asked for (detached targets) is neither computed nor stored
        if pair == 0:
            _cos_bwd_rows(
                P0, Z0, stride_p0, stride_z0, DP0, DZ0, STATS, scale, B, D, row0, NEED_DP0, NEED_DZ0, BLOCK_B, BLOCK_D
            )
        else:
            _cos_bwd_rows(
                P1,
                Z1,
                stride_p1,
                stride_z1,
                DP1,
                DZ1,
                STATS + 4 * B,
                scale,
                B,
                D,
                row0,
                NEED_DP1,
                NEED_DZ1,
                BLOCK_B,
                BLOCK_D,
            )


# --------------------------------------------------------------------------------------
# 3. Launchers and autograd.Function
# --------------------------------------------------------------------------------------
def _row_major(x: torch.Tensor) -> torch.Tensor:
    # the kernels take a row stride but need unit stride along D (coalesced loads)
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def _row_stride(x: torch.Tensor) -> int:
    return x.stride(0)


def _tiles(B: int, D: int) -> tuple[int, int, int]:
    """Tile heuristic (as in the layer-norm tutorial, no autotuning): 2-D tiles of about
    4096 elements per input, BLOCK_D up to 1024 and a loop over D beyond that; small D
    packs many rows into one program so that e.g. D=128, B=65536 is not 65536 tiny
    programs."""
    block_d = min(triton.next_power_of_2(D), 1024)
    block_b = max(1, min(triton.next_power_of_2(B), 4096 // block_d))
    num_warps = 4 if block_b * block_d <= 2048 else 8
    return block_b, block_d, num_warps


def _fwd(pairs):
    """pairs: 1 or 2 (p, z) pairs of contiguous-rows tensors of one shape/dtype."""
    (p0, z0) = pairs[0]
    (p1, z1) = pairs[-1]
    B, D = p0.shape
    n_pairs = len(pairs)
    stats = torch.empty((n_pairs, _N_STATS, B), device=p0.device, dtype=torch.float32)
    rowloss = torch.empty((n_pairs, B), device=p0.device, dtype=torch.float32)
    block_b, block_d, num_warps = _tiles(B, D)
    grid = (triton.cdiv(B, block_b), n_pairs)
    _cosine_fwd_kernel[grid](
        p0,
        z0,
        p1,
        z1,
        _row_stride(p0),
        _row_stride(z0),
        _row_stride(p1),
        _row_stride(z1),
        stats,
        rowloss,
        B,
        D,
        EPS=EPS,
        FLT_MIN=FLT_MIN,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    # sum over pairs of the row means; a plain (deterministic, atomic-free) torch sum
    loss = rowloss.sum() / B
    return loss, stats


def _bwd(pairs, stats, grad_output, needs):
    """needs: ((need_dp0, need_dz0), (need_dp1, need_dz1)); returns [(dp, dz), ...]."""
    (p0, z0) = pairs[0]
    (p1, z1) = pairs[-1]
    B, D = p0.shape
    n_pairs = len(pairs)
    grads = []
    for (p, z), (need_p, need_z) in zip(pairs, needs):
        grads.append(
            (
                torch.empty((B, D), dtype=p.dtype, device=p.device) if need_p else None,
                torch.empty((B, D), dtype=z.dtype, device=z.device) if need_z else None,
            )
        )
    if n_pairs == 1:
        needs = (needs[0], (False, False))
    # any tensor will do as a placeholder for an unneeded gradient: it is never touched
    (dp0, dz0), (dp1, dz1) = grads[0], grads[-1]
    dp0, dz0 = (dp0 if dp0 is not None else p0), (dz0 if dz0 is not None else z0)
    dp1, dz1 = (dp1 if dp1 is not None else p1), (dz1 if dz1 is not None else z1)
    grad_output = grad_output.reshape(1).to(torch.float32).contiguous()
    block_b, block_d, num_warps = _tiles(B, D)
    grid = (triton.cdiv(B, block_b), n_pairs)
    _cosine_bwd_kernel[grid](
        p0,
        z0,
        p1,
        z1,
        _row_stride(p0),
        _row_stride(z0),
        _row_stride(p1),
        _row_stride(z1),
        dp0,
        dz0,
        dp1,
        dz1,
        stats,
        grad_output,
        B,
        D,
        NEED_DP0=needs[0][0],
        NEED_DZ0=needs[0][1],
        NEED_DP1=needs[1][0],
        NEED_DZ1=needs[1][1],
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return grads


def _check_triton_inputs(*xs: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed: use the reference functions")
    if xs[0].dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"Triton cosine loss supports {_SUPPORTED_DTYPES}, got {xs[0].dtype}")
    if any(x.device != xs[0].device for x in xs):
        raise ValueError("cosine loss: all inputs must be on one device")


class _CosineLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, z):
        p, z = _row_major(p), _row_major(z)
        loss, stats = _fwd([(p, z)])
        ctx.save_for_backward(p, z, stats)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        p, z, stats = ctx.saved_tensors
        need_p, need_z = ctx.needs_input_grad
        [(dp, dz)] = _bwd([(p, z)], stats, grad_output, [(need_p, need_z)])
        return dp, dz


class _SymmetricCosineLossFn(torch.autograd.Function):
    # pair 0 = (p1, z2), pair 1 = (p2, z1). If p1 is z1 (bn_only), autograd adds the two
    # gradients it receives for that tensor; the kernel writes them to separate buffers.
    @staticmethod
    def forward(ctx, p1, p2, z1, z2):
        p1, p2, z1, z2 = (_row_major(x) for x in (p1, p2, z1, z2))
        loss, stats = _fwd([(p1, z2), (p2, z1)])
        ctx.save_for_backward(p1, p2, z1, z2, stats)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        p1, p2, z1, z2, stats = ctx.saved_tensors
        n_p1, n_p2, n_z1, n_z2 = ctx.needs_input_grad
        (dp1, dz2), (dp2, dz1) = _bwd([(p1, z2), (p2, z1)], stats, grad_output, [(n_p1, n_z2), (n_p2, n_z1)])
        return dp1, dp2, dz1, dz2


def cosine_loss_triton(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The fused Triton path, whatever the device (CPU tensors need TRITON_INTERPRET=1)."""
    _check_pair(p, z)
    _check_triton_inputs(p, z)
    return _CosineLossFn.apply(p, z)


def symmetric_cosine_loss_triton(p1, p2, z1, z2) -> torch.Tensor:
    """The fused Triton path of :func:`symmetric_cosine_loss`: one launch for both pairs."""
    _check_symmetric(p1, p2, z1, z2)
    _check_triton_inputs(p1, p2, z1, z2)
    return _SymmetricCosineLossFn.apply(p1, p2, z1, z2)


# --------------------------------------------------------------------------------------
# 4. Public API
# --------------------------------------------------------------------------------------
def cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i (2 - 2 cos(p_i, z_i)) for [B, D] inputs; an fp32 scalar.

    Gradients flow to whichever of ``p``, ``z`` requires grad (detach the target for
    BYOL / SimSiam). Fused Triton kernels on CUDA, the PyTorch reference elsewhere.
    """
    _check_pair(p, z)
    if p.dtype in _SUPPORTED_DTYPES and backend.use_triton(p, z):
        return _CosineLossFn.apply(p, z)
    return cosine_loss_reference(p, z)


def symmetric_cosine_loss(p1, p2, z1, z2) -> torch.Tensor:
    """cosine_loss(p1, z2) + cosine_loss(p2, z1) in one kernel launch; an fp32 scalar.

    ``p1`` may be the very same tensor as ``z1`` (and ``p2`` as ``z2``): gradients add up.
    """
    _check_symmetric(p1, p2, z1, z2)
    if p1.dtype in _SUPPORTED_DTYPES and backend.use_triton(p1, p2, z1, z2):
        return _SymmetricCosineLossFn.apply(p1, p2, z1, z2)
    return symmetric_cosine_loss_reference(p1, p2, z1, z2)
