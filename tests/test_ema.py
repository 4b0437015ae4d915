"""Property tests: the fused Triton EMA (run by Triton's interpreter on CPU tensors, or
compiled on a GPU with KERNELS_TEST_DEVICE=cuda) against the exact update computed in fp64."""

import importlib
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_backends import DEVICE, nvidia_backend_available

from kernels import backend
from kernels.ema import BLOCK, ema_update_, ema_update_reference_, ema_update_triton_

ema_mod = importlib.import_module("kernels.ema")
REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# ---- tolerance table ----------------------------------------------------------------------
# |result - exact| <= ULPS * eps(dtype) * (|tau t| + |(1-tau) o|). The kernel rounds once to
# the dtype after fp32 arithmetic (<= 0.5 ulp + ~2 fp32 ulps); the reference rounds after
# each of its two foreach ops (<= ~1.5 ulps in fp16/bf16).
KERNEL_ULPS = {torch.float32: 2.0, torch.float16: 1.0, torch.bfloat16: 1.0}
REFERENCE_ULPS = {torch.float32: 2.0, torch.float16: 2.0, torch.bfloat16: 2.0}

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exact(t, o, tau):
    return tau * t.double() + (1.0 - tau) * o.double()


def assert_close_ulps(got, t, o, tau, ulps, what):
    want = exact(t, o, tau)
    bound = ulps * torch.finfo(got.dtype).eps * (tau * t.double().abs() + (1.0 - tau) * o.double().abs())
    bound = bound + torch.finfo(got.dtype).smallest_normal * torch.finfo(got.dtype).eps  # subnormal results
    err = (got.double() - want).abs()
    assert (err <= bound).all(), (
        f"{what}: worst error {err.max().item():.3e} (bound {bound.flatten()[err.argmax()].item():.3e})"
    )


def bits(x):
    return x.view(INT_VIEW[x.dtype])


# ---- lists of views into guarded buffers ------------------------------------------------------
# Different guard patterns on the two sides: an out-of-bounds EMA of a guard element then
# changes it (with equal patterns tau*s + (1-tau)*s == s would hide the overrun).
SENTINEL = {"t": 1234.5, "o": -777.25}


def guarded_views(specs, seed):
    """specs: [(shape, dtype)]. Returns (target views, online views, buffers, guard masks):
    per dtype one buffer per side, the tensors laid out in it with guard gaps of 1..17
    elements (so views also start at odd, unaligned offsets) filled with sentinels."""
    g = torch.Generator().manual_seed(seed)
    layout, sizes = [], {}
    for shape, dtype in specs:
        n = 1
        for s in shape:
            n *= s
        gap = int(torch.randint(1, 18, (1,), generator=g))
        off = sizes.get(dtype, 0) + gap
        layout.append((off, n))
        sizes[dtype] = off + n
    bufs = {
        side: {dt: torch.full((n + 9,), SENTINEL[side], dtype=dt, device=DEVICE) for dt, n in sizes.items()}
        for side in "to"
    }
    guards = {dt: torch.ones(n + 9, dtype=torch.bool, device=DEVICE) for dt, n in sizes.items()}
    target, online = [], []
    for (shape, dtype), (off, n) in zip(specs, layout):
        guards[dtype][off : off + n] = False
        for side, out in (("t", target), ("o", online)):
            v = bufs[side][dtype][off : off + n].view(shape)
            v.copy_(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
            out.append(v)
    return target, online, bufs, guards


@st.composite
def tensor_specs(draw):
    n = draw(st.integers(1, 7))
    dtype_mode = draw(st.sampled_from(DTYPES + ["mixed"]))
    specs = []
    for _ in range(n):
        numel = draw(
            st.one_of(st.just(1), st.integers(1, 3000), st.sampled_from([BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3]))
        )
        shape = draw(st.sampled_from([(numel,), (1, numel), (numel, 1)])) if numel % 3 else (3, numel // 3)
        dtype = draw(st.sampled_from(DTYPES)) if dtype_mode == "mixed" else dtype_mode
        specs.append((shape, dtype))
    return specs


taus = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0), st.sampled_from([0.99, 0.996, 0.5]))


@SETTINGS
@given(specs=tensor_specs(), tau=taus, seed=st.integers(0, 2**31 - 1))
def test_ema_matches_exact_update(specs, tau, seed):
    target, online, bufs, guards = guarded_views(specs, seed)
    t0 = [t.clone() for t in target]
    buf_before = {side: {dt: b.clone() for dt, b in d.items()} for side, d in bufs.items()}

    ema_update_triton_(target, online, tau)

    for dt, b in bufs["o"].items():  # online untouched, guards included
        assert torch.equal(bits(b), bits(buf_before["o"][dt])), "online buffer modified"
    for dt, b in bufs["t"].items():  # nothing written outside the target tensors
        assert torch.equal(bits(b[guards[dt]]), bits(buf_before["t"][dt][guards[dt]])), "guard region overwritten"
    for i, (t, old, o) in enumerate(zip(target, t0, online)):
        if tau == 1.0:
            assert torch.equal(bits(t), bits(old)), f"tensor {i}: tau=1 changed the target"
        elif tau == 0.0:
            assert torch.equal(t, o), f"tensor {i}: tau=0 is not a copy of online"
        else:
            assert_close_ulps(t, old, o, tau, KERNEL_ULPS[t.dtype], f"tensor {i} {tuple(t.shape)} {t.dtype}")

    # the reference, from the same start, within its own (two roundings) tolerance
    ref = [x.clone() for x in t0]
    ema_update_reference_(ref, online, tau)
    for r, old, o in zip(ref, t0, online):
        if tau in (0.0, 1.0):
            assert torch.equal(r, o if tau == 0.0 else old)
        else:
            assert_close_ulps(r, old, o, tau, REFERENCE_ULPS[r.dtype], "reference")


class LaunchCounter:
    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_one_launch_per_dtype_group(monkeypatch):
    counter = LaunchCounter(ema_mod._ema_kernel)
    monkeypatch.setattr(ema_mod, "_ema_kernel", counter)
    shapes = [(64, 3, 3, 3), (64,), (64,), (10, 64), (10,), (1,), (5000,)] * 3
    target = [torch.randn(s, device=DEVICE) for s in shapes]
    online = [torch.randn(s, device=DEVICE) for s in shapes]
    ema_update_triton_(target, online, 0.9)
    assert len(counter.grids) == 1
    n = sum((t.numel() + BLOCK - 1) // BLOCK for t in target)
    assert counter.grids[0] == (n,)
    target[3], online[3] = target[3].bfloat16(), online[3].bfloat16()
    counter.grids.clear()
    ema_update_triton_(target, online, 0.9)
    assert len(counter.grids) == 2


def test_plan_is_cached_and_reused():
    target = [torch.randn(7, 3, device=DEVICE), torch.randn(4099, device=DEVICE)]
    online = [torch.randn(7, 3, device=DEVICE), torch.randn(4099, device=DEVICE)]
    ema_update_triton_(target, online, 0.5)
    key = ema_mod._plan_key(target, online)
    plan = ema_mod._PLANS[key]
    for step in range(3):  # tau changes every step: same plan (and same compiled kernel)
        tau = 0.9 + 0.01 * step
        old = [t.clone() for t in target]
        ema_update_triton_(target, online, tau)
        assert ema_mod._PLANS[key] is plan
        for t, o, x in zip(target, online, old):
            assert_close_ulps(t, x, o, tau, KERNEL_ULPS[t.dtype], "cached plan")
    # other tensors: another plan; the cache stays bounded
    for _ in range(ema_mod._PLAN_CACHE_SIZE + 3):
        ema_update_triton_([torch.randn(5, device=DEVICE)], [torch.randn(5, device=DEVICE)], 0.5)
    assert len(ema_mod._PLANS) <= ema_mod._PLAN_CACHE_SIZE


def test_non_dense_and_fp64_fall_back_inside_one_call():
    base_t, base_o = torch.randn(6, 10, device=DEVICE), torch.randn(6, 10, device=DEVICE)
    target = [base_t[:, ::2], torch.randn(9, dtype=torch.float64, device=DEVICE), torch.randn(33, device=DEVICE)]
    online = [base_o[:, ::2], torch.randn(9, dtype=torch.float64, device=DEVICE), torch.randn(33, device=DEVICE)]
    before = base_t.clone()
    old = [t.clone() for t in target]
    ema_update_triton_(target, online, 0.75)
    for t, x, o in zip(target, old, online):
        assert_close_ulps(t, x, o, 0.75, 2.0, "fallback")
    assert torch.equal(base_t[:, 1::2], before[:, 1::2])  # the gaps of the strided view


def test_parameters_with_requires_grad():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(6, 5)).to(DEVICE)
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(6, 5)).to(DEVICE)
    ref = [p.detach().clone() for p in target.parameters()]
    ema_update_triton_(list(target.parameters()), list(online.parameters()), 0.99)
    ema_update_reference_(ref, [p.detach() for p in online.parameters()], 0.99)
    for p, r in zip(target.parameters(), ref):
        torch.testing.assert_close(p.detach(), r)


def test_alignment_hint_only_for_aligned_addresses():
    # the kernel promises 16-byte alignment to the compiler when `aligned` is set (the
    # interpreter ignores the hint, so this is checked on the plan)
    buf_t, buf_o = torch.zeros(4096 + 64), torch.zeros(4096 + 64)
    fresh = ema_mod._build_plan([torch.randn(100), torch.randn(3)], [torch.randn(100), torch.randn(3)])
    assert [g.aligned for g in fresh.groups] == [True]
    for off in (1, 2, 3):  # 4, 8, 12 bytes past an aligned address
        plan = ema_mod._build_plan([buf_t[off : off + 50], buf_t[1000:1050]], [buf_o[0:50], buf_o[100:150]])
        assert [g.aligned for g in plan.groups] == [False]
    plan = ema_mod._build_plan([buf_t[4:54]], [buf_o[8:58]])  # 16 and 32 bytes in
    assert [g.aligned for g in plan.groups] == [True]


def test_validation_errors():
    a, b = [torch.randn(3), torch.randn(4)], [torch.randn(3), torch.randn(4)]
    for fn in (ema_update_, ema_update_reference_, ema_update_triton_):
        with pytest.raises(ValueError, match="target tensors but"):
            fn(a, b[:1], 0.5)
        with pytest.raises(ValueError, match="shapes differ"):
            fn(a, [b[0], torch.randn(5)], 0.5)
        with pytest.raises(ValueError, match="dtypes differ"):
            fn(a, [b[0], b[1].half()], 0.5)
        with pytest.raises(ValueError, match="cannot average"):
            fn([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], 0.5)
        for tau in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="tau"):
                fn(a, b, tau)
        fn([], [], 0.5)  # nothing to do


def test_public_function_dispatch(monkeypatch):
    counter = LaunchCounter(ema_mod._ema_kernel)
    monkeypatch.setattr(ema_mod, "_ema_kernel", counter)
    target, online = [torch.randn(10)], [torch.randn(10)]
    ema_update_(target, online, 0.5)  # CPU: reference
    assert counter.grids == []
    if DEVICE.type == "cuda":
        target, online = [t.to(DEVICE) for t in target], [o.to(DEVICE) for o in online]
    else:
        monkeypatch.setattr(backend, "use_triton", lambda *t: True)  # pretend CUDA; the interpreter runs the kernel
    ema_update_(target, online, 0.5)
    assert len(counter.grids) == 1


# ---- the compiled kernel lowers to PTX, vectorised when aligned ----------------------------
_AOT = textwrap.dedent(
    """
    import importlib, sys
    sys.path.insert(0, {repo!r})
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ema = importlib.import_module("kernels.ema")
    sig = dict(PTRS="*i64", CHUNKS="*i64", n_tensors="i32", tau="fp32", one_minus_tau="fp32",
               DT="constexpr", ALIGNED="constexpr", BLOCK="constexpr")
    for dt in (tl.float32, tl.bfloat16, tl.float16):
        for aligned in (True, False):
            k = triton.compile(ASTSource(ema._ema_kernel, sig, dict(DT=dt, ALIGNED=aligned, BLOCK=ema.BLOCK),
                                         {{(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}}),
                               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
            v4 = "ld.global.v4" in k.asm["ptx"]
            assert v4 == aligned, (dt, aligned, "vectorised" if v4 else "not vectorised")
    print("ok")
    """
)


@pytest.mark.skipif(not nvidia_backend_available(), reason="Triton's NVIDIA backend is not installed")
def test_kernel_compiles_for_sm90():
    # the int64 -> pointer cast and the alignment hints must also pass the real compiler,
    # not only the interpreter; with the hints, full chunks use 128-bit loads
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _AOT.format(repo=str(REPO))], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
