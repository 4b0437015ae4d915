"""Kernel benchmarks (pytest-benchmark): run with ``pytest --benchmark``.

* loss: forward + backward of the symmetric loss as BYOL / SimSiam use it (grads into
  p1, p2; targets detached): fused Triton vs eager reference vs torch.compile(reference).
* ema: one EMA step over the parameters of torchvision resnet18 / resnet50: fused
  Triton vs ``torch._foreach_lerp_`` vs the reference (``_foreach_mul_`` +
  ``_foreach_add_``) vs a per-parameter Python loop.

CUDA: loss inputs in bf16, EMA parameters in fp32, every column runs. CPU: fp32, the
Triton columns are skipped (no device to run them on), rounds are cut for big sizes.
The GB/s table at the end counts the minimum traffic of each operation.
"""

import importlib
import os

import pytest
import torch

from kernels import backend
from kernels.cosine_loss import symmetric_cosine_loss_reference, symmetric_cosine_loss_triton
from kernels.ema import ema_update_reference_, ema_update_triton_

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LOSS_DTYPE = torch.bfloat16 if CUDA else torch.float32
TAU = 0.996


def _triton_skip_reason():
    if not CUDA:
        return "Triton kernels need a CUDA device; none here (under TRITON_INTERPRET the interpreter checks correctness, not speed)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: the interpreter would be timed, not the compiled kernels"
    if backend.is_reference_forced():
        return "the reference path is forced (KERNELS_FORCE_REFERENCE)"
    if not backend.triton_available():
        return "Triton is not installed"
    return None


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _rounds(nbytes):
    """pedantic() arguments: many short rounds on CUDA; on CPU a time budget by size."""
    if CUDA:
        return dict(rounds=30, warmup_rounds=5, iterations=3)
    if nbytes >= 1 << 30:
        return dict(rounds=1, warmup_rounds=0, iterations=1)
    if nbytes >= 1 << 26:
        return dict(rounds=3, warmup_rounds=1, iterations=1)
    return dict(rounds=10, warmup_rounds=2, iterations=1)


# ---- loss -----------------------------------------------------------------------------------
_LOSS_IMPLS = ["triton", "eager", "torch.compile"]


@pytest.mark.parametrize("impl", _LOSS_IMPLS)
@pytest.mark.parametrize("D", [128, 256, 2048])
@pytest.mark.parametrize("B", [256, 4096, 65536])
def test_loss_fwd_bwd(benchmark, bench_record, B, D, impl):
    dtype = LOSS_DTYPE
    case = f"loss B={B:<5} D={D:<4} {str(dtype).removeprefix('torch.')}"
    benchmark.group = case
    es = torch.tensor([], dtype=dtype).element_size()
    # forward reads p1 p2 z1 z2; backward reads them again and writes dp1, dp2
    nbytes = 10 * B * D * es

    if impl == "triton":
        reason = _triton_skip_reason()
        if reason:
            bench_record(case, impl, skipped=reason)
            pytest.skip(reason)
        fn = symmetric_cosine_loss_triton
    elif impl == "eager":
        fn = symmetric_cosine_loss_reference
    else:
        torch._dynamo.reset()  # a fresh static-shape compile per case (no recompile limit)
        fn = torch.compile(symmetric_cosine_loss_reference, dynamic=False)

    g = torch.Generator(device=DEVICE).manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(B, D, device=DEVICE, dtype=dtype, generator=g) for _ in range(4))
    p1.requires_grad_()
    p2.requires_grad_()

    def step():
        loss = fn(p1, p2, z1, z2)
        torch.autograd.grad(loss, (p1, p2))  # no .grad accumulation: fixed traffic per step
        _sync()

    if impl == "torch.compile":
        try:
            step()  # compiles (not timed)
        except Exception as e:  # e.g. no C++ compiler for inductor on CPU
            reason = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            bench_record(case, impl, skipped=reason)
            pytest.skip(reason)
    benchmark.pedantic(step, **_rounds(nbytes))
    bench_record(case, impl, benchmark, nbytes)


# ---- EMA ------------------------------------------------------------------------------------
def _foreach_lerp(target, online, tau):
    torch._foreach_lerp_(target, online, 1.0 - tau)


def _python_loop(target, online, tau):
    for t, o in zip(target, online):
        t.mul_(tau).add_(o, alpha=1.0 - tau)


_EMA_IMPLS = {
    "triton": ema_update_triton_,
    "foreach_lerp_": _foreach_lerp,
    "reference (foreach mul+add)": ema_update_reference_,
    "python loop": _python_loop,
}


@pytest.mark.parametrize("impl", list(_EMA_IMPLS))
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_ema_step(benchmark, bench_record, arch, impl):
    models = importlib.import_module("torchvision.models")
    online = getattr(models, arch)(weights=None).to(DEVICE)
    target = getattr(models, arch)(weights=None).to(DEVICE)
    tp = [p.detach() for p in target.parameters()]
    op = [p.detach() for p in online.parameters()]
    numel = sum(p.numel() for p in tp)
    case = f"ema {arch} ({len(tp)} tensors, {numel / 1e6:.1f}M fp32)"
    benchmark.group = case
    nbytes = 3 * 4 * numel  # read target, read online, write target

    if impl == "triton":
        reason = _triton_skip_reason()
        if reason:
            bench_record(case, impl, skipped=reason)
            pytest.skip(reason)
    fn = _EMA_IMPLS[impl]

    def step():
        with torch.no_grad():
            fn(tp, op, TAU)
        _sync()

    kw = _rounds(nbytes)
    if not CUDA:  # cheap enough on CPU for a few more rounds
        kw = dict(rounds=10, warmup_rounds=2, iterations=1)
    benchmark.pedantic(step, **kw)
    bench_record(case, impl, benchmark, nbytes)
