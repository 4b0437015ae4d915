"""Property tests: the Triton cosine loss (run by Triton's interpreter on CPU tensors, or
compiled on a GPU with KERNELS_TEST_DEVICE=cuda) against the PyTorch reference evaluated
in fp64 on the same, upcast inputs."""

import importlib
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from triton_backends import DEVICE, nvidia_backend_available

import kernels
from kernels import backend

cl = importlib.import_module("kernels.cosine_loss")  # `kernels.cosine_loss` is the function
from kernels.cosine_loss import (
    EPS,
    cosine_loss,
    cosine_loss_reference,
    cosine_loss_triton,
    symmetric_cosine_loss,
    symmetric_cosine_loss_reference,
    symmetric_cosine_loss_triton,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
# fp16 gradients w.r.t. an all-zero row are ~1/eps and overflow to inf, as the reference's
# own autograd does (checked in assert_grad_close); the interpreter warns about that cast.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ---- tolerance tables (fitted: observed worst cases over ~150 random cases are noted) -------
# Loss: kernel and oracle see the same (upcast) values, so only the fp32 accumulation
# differs, whatever the input dtype (observed <= 6e-7 on a loss in [0, 4], D <= 8192).
LOSS_ATOL = {torch.float32: 4e-6, torch.float16: 4e-6, torch.bfloat16: 4e-6}
# Gradients are rounded to the input dtype. Error relative to the size of the terms the
# formula adds up (grad_scale) plus |grad|: fp32 sees fp32 rounding only (observed
# 2.3e-7 over 400 cases up to D=8192); fp16 / bf16 about 2 units of roundoff of the
# dtype (2^-11 = 4.9e-4, 2^-8 = 3.9e-3; observed 2.4e-4 and 3.8e-3).
GRAD_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Below the dtype's normal range the output rounding is absolute, not relative.
GRAD_ATOL = {dt: torch.finfo(dt).smallest_normal for dt in DTYPES}

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers ---------------------------------------------------------------------------
def make(shape, dtype, seed, scale=1.0, zero_rows=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if zero_rows:
        x[torch.rand(shape[0], generator=g) < zero_rows] = 0.0
    return x.to(DEVICE, dtype)


def grad_scale(x, y, g):
    """Elementwise error scale of d/dx [g * mean(2 - 2 cos(x, y))] = -2g/B (yh - cos xh)/nx:
    2|g|/B / nx * (|yh| + c |xh|) with c = sum |xh yh| >= |cos|, the size of the terms
    that the formula adds up (cos itself is a cancelling sum, known to ~ u * c)."""
    x, y = x.detach().double(), y.detach().double()
    B = x.shape[0]
    rx = x.norm(dim=1, keepdim=True)
    nx, ny = rx.clamp_min(EPS), y.norm(dim=1, keepdim=True).clamp_min(EPS)
    xh, yh = x / nx, y / ny
    c = (xh * yh).abs().sum(1, keepdim=True)
    return 2.0 * abs(g) / B / nx * (yh.abs() + c * xh.abs() * (rx > EPS))


def assert_grad_close(got, ref, scale, dtype, what):
    assert got is not None, f"{what}: no gradient"
    assert got.dtype == dtype, f"{what}: gradient dtype {got.dtype}, expected {dtype}"
    # Where the exact gradient does not fit the dtype, inf (of the right sign) is the
    # right answer, as the reference's autograd gives: fp16 and the 1/eps-sized gradient
    # with respect to an all-zero row. Everywhere else: finite and close.
    overflow = ~torch.isfinite(ref.to(dtype))
    assert torch.equal(got[overflow], ref.to(dtype)[overflow]), f"{what}: overflowing elements differ"
    got, ref, scale = got[~overflow], ref[~overflow], scale[~overflow]
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient where the exact one fits {dtype}"
    err = (got.double() - ref).abs()
    bound = GRAD_RTOL[dtype] * (scale + ref.abs()) + GRAD_ATOL[dtype]
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} gradient elements off; worst err {err.max().item():.3e}, "
        f"bound there {bound.flatten()[(err - bound).argmax()].item():.3e}"
    )


def assert_loss_close(got, ref, dtype):
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.isfinite(got), f"loss {got} not finite (oracle {ref})"
    assert abs(got.item() - ref.item()) <= LOSS_ATOL[dtype], f"loss {got.item()!r} vs oracle {ref.item()!r}"


def run_single(fn, p, z, need_p, need_z, g):
    """Loss and grads of fn(p, z) with grad_output g, on fresh leaves."""
    p = p.detach().clone().requires_grad_(need_p)
    z = z.detach().clone().requires_grad_(need_z)
    loss = fn(p, z)
    if need_p or need_z:
        loss.backward(torch.tensor(g, dtype=loss.dtype, device=loss.device))
    return loss.detach(), p.grad, z.grad


def check_single(p, z, need_p=True, need_z=True, g=1.0):
    dtype = p.dtype
    p0, z0 = p.clone(), z.clone()
    loss, gp, gz = run_single(cosine_loss_triton, p, z, need_p, need_z, g)
    ref, rp, rz = run_single(cosine_loss_reference, p.double(), z.double(), need_p, need_z, g)
    assert torch.equal(p, p0) and torch.equal(z, z0), "the loss modified its inputs"
    assert_loss_close(loss, ref, dtype)
    if need_p:
        assert_grad_close(gp, rp, grad_scale(p, z, g), dtype, "dL/dp")
    else:
        assert gp is None
    if need_z:
        assert_grad_close(gz, rz, grad_scale(z, p, g), dtype, "dL/dz")
    else:
        assert gz is None


# ---- strategies ------------------------------------------------------------------------
batch = st.one_of(st.just(1), st.integers(1, 48))
dim = st.one_of(st.sampled_from([1, 2, 3, 31, 127, 128, 129, 1000, 1025]), st.integers(1, 300))
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([1.0, 1e-3, 1e3])
zero_fracs = st.sampled_from([0.0, 0.0, 0.3])
grad_outs = st.sampled_from([1.0, -0.5, 3.0])


@st.composite
def pair_inputs(draw):
    B, D, dtype = draw(batch), draw(dim), draw(dtypes)
    p = make((B, D), dtype, draw(seeds), draw(scales), draw(zero_fracs))
    relation = draw(st.sampled_from(["independent", "independent", "parallel", "opposite"]))
    if relation == "independent":
        z = make((B, D), dtype, draw(seeds), draw(scales), draw(zero_fracs))
    else:  # cos = +-1 exactly: the worst cancellation in 2 - 2cos and in the gradient
        z = (p.double() * (2.0 if relation == "parallel" else -0.5)).to(dtype)
    return p, z


# ---- the package under test is this repository's --------------------------------------
def test_kernels_is_this_repository():
    # a PyPI package called `kernels` exists; pyproject's pythonpath must win
    path = pathlib.Path(kernels.__file__).resolve()
    assert REPO in path.parents, f"imported {path}, not the repository's kernels/"


# ---- single pair -------------------------------------------------------------------------
SHAPES = [(1, 1), (1, 8192), (2, 8192), (3, 4097), (64, 1), (257, 3), (33, 130), (5, 2048)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape_table(shape, dtype):
    p = make(shape, dtype, seed=1)
    z = make(shape, dtype, seed=2)
    check_single(p, z)


@SETTINGS
@given(inputs=pair_inputs(), need=st.sampled_from(["p", "z", "both", "none"]), g=grad_outs)
@example(inputs=(make((2, 8192), torch.bfloat16, 3), make((2, 8192), torch.bfloat16, 4)), need="p", g=1.0)
def test_cosine_loss_matches_reference(inputs, need, g):
    p, z = inputs
    check_single(p, z, need_p=need in ("p", "both"), need_z=need in ("z", "both"), g=g)


# ---- symmetric form: one launch, both pairs, aliasing ------------------------------------
@st.composite
def symmetric_inputs(draw):
    B, D, dtype = draw(batch), draw(dim), draw(dtypes)
    xs = [make((B, D), dtype, draw(seeds), draw(scales), draw(zero_fracs)) for _ in range(4)]
    mode = draw(st.sampled_from(["byol", "all", "random", "p_is_z"]))
    if mode == "byol":  # online predictions need grads, targets detached
        req = (True, True, False, False)
    elif mode == "all":
        req = (True, True, True, True)
    elif mode == "random":
        req = tuple(draw(st.booleans()) for _ in range(4))
    else:  # bn_only: the same tensor as p1 and z1 (and as p2 and z2)
        req = (True, True, True, True)
    return xs, req, mode == "p_is_z"


def run_symmetric(fn, xs, req, alias, g, cast=lambda x: x):
    leaves = [cast(x).detach().clone().requires_grad_(r) for x, r in zip(xs, req)]
    p1, p2, z1, z2 = leaves
    if alias:
        z1, z2 = p1, p2
    loss = fn(p1, p2, z1, z2)
    if loss.requires_grad:
        loss.backward(torch.tensor(g, dtype=loss.dtype, device=loss.device))
    return loss.detach(), leaves


@SETTINGS
@given(inputs=symmetric_inputs(), g=grad_outs)
def test_symmetric_matches_reference(inputs, g):
    xs, req, alias = inputs
    dtype = xs[0].dtype
    before = [x.clone() for x in xs]
    loss, leaves = run_symmetric(symmetric_cosine_loss_triton, xs, req, alias, g)
    ref, ref_leaves = run_symmetric(symmetric_cosine_loss_reference, xs, req, alias, g, cast=torch.Tensor.double)
    assert all(torch.equal(a, b) for a, b in zip(xs, before))
    assert_loss_close(loss, ref, dtype)
    p1, p2, z1, z2 = xs
    if alias:
        z1, z2 = p1, p2
    # roles: pair 0 = (p1, z2), pair 1 = (p2, z1); an aliased leaf plays two roles
    scales = [grad_scale(p1, z2, g), grad_scale(p2, z1, g), grad_scale(z1, p2, g), grad_scale(z2, p1, g)]
    if alias:
        scales = [scales[0] + scales[2], scales[1] + scales[3]]
    for i, (leaf, ref_leaf) in enumerate(zip(leaves, ref_leaves)):
        if alias and i >= 2:
            assert leaf.grad is None  # unused leaves
            continue
        if req[i]:
            assert_grad_close(leaf.grad, ref_leaf.grad, scales[i], dtype, f"grad of input {i}")
        else:
            assert leaf.grad is None


def test_symmetric_is_one_launch(monkeypatch):
    calls = []
    real = cl._cosine_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(cl, "_cosine_fwd_kernel", Spy())
    xs = [make((9, 40), torch.float32, s) for s in range(4)]
    symmetric_cosine_loss_triton(*xs)
    assert len(calls) == 1 and calls[0][1] == 2


# ---- special values ------------------------------------------------------------------------
def test_zero_rows_give_loss_two_and_finite_grads():
    for dtype in DTYPES:
        p = make((6, 37), dtype, 5)
        z = make((6, 37), dtype, 6)
        p[0] = 0
        z[1] = 0
        p[2] = 0
        z[2] = 0
        check_single(p, z)
        loss = cosine_loss_triton(p[2:3], z[2:3])
        assert loss.item() == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_at_the_eps_clamp(dtype):
    # Norms just below / above eps = 1e-12: below, F.normalize divides by eps (the loss
    # still sees a direction, cos != 0) and torch's clamp passes no gradient through the
    # norm; above, it does. (fp16 cannot hold such rows.)
    D = 40
    p = make((8, D), torch.float64, 13)
    z = make((8, D), torch.float64, 14)
    p = (
        p
        / p.norm(dim=1, keepdim=True)
        * torch.tensor([0.3, 0.5, 0.9, 0.99, 1.01, 2.0, 1.1, 0.5], device=DEVICE)[:, None]
        * EPS
    )
    z[6:] = z[6:] / z[6:].norm(dim=1, keepdim=True) * torch.tensor([0.5, 0.7], device=DEVICE)[:, None] * EPS
    z[0] = p[0] * 3e12  # parallel, z unclamped: cos = 0.3, far from 0
    p, z = p.to(dtype), z.to(dtype)
    check_single(p, z)
    check_single(z, p)


MAGNITUDES = [
    (torch.float16, 3e4, 1.0),
    (torch.float16, 6e4, 6e4),
    (torch.float16, 1e-7, 1.0),
    (torch.float16, 1e4, 1e-4),
    (torch.float32, 1e30, 1.0),
    (torch.float32, 1e30, 1e30),
    (torch.float32, 1e-30, 1.0),
    (torch.float32, 1e-30, 1e-30),
    (torch.float32, 1e30, 1e-30),
    (torch.bfloat16, 1e30, 1e30),
    (torch.bfloat16, 1e-30, 1.0),
    (torch.bfloat16, 1e30, 1e-30),
]


@pytest.mark.parametrize("dtype,sp,sz", MAGNITUDES, ids=lambda v: str(v))
def test_extreme_magnitudes(dtype, sp, sz):
    # |x| ~ 1e30 squares to 1e60: a plain fp32 sum of squares overflows. Inputs are
    # scaled so that they stay finite in their dtype.
    D = 300
    p = make((7, D), torch.float64, 7).clamp(-2, 2).mul(sp / 2).to(dtype)
    z = make((7, D), torch.float64, 8).clamp(-2, 2).mul(sz / 2).to(dtype)
    z[3] = p[3]  # cos = 1 at a huge scale
    assert torch.isfinite(p).all() and torch.isfinite(z).all()
    ref32 = cosine_loss_reference(p, z)
    assert torch.isfinite(ref32)  # the fp32 reference has no NaN/inf here, so neither may we
    check_single(p, z)
    for v in symmetric_cosine_loss_triton(p, z, z, p), cosine_loss_triton(z, p):
        assert torch.isfinite(v)


def test_noncontiguous_inputs():
    base_p = make((10, 2 * 77), torch.float32, 9)
    base_z = make((10, 2 * 77), torch.float32, 10)
    cases = [
        (base_p[:, ::2], base_z[:, 1::2]),  # stride along D: copied
        (base_p[:, 3:80], base_z[:, :77]),  # row stride > D: used as is
        (base_p[:, :77].t().contiguous().t(), base_z[:, :77]),  # column major
        (base_p[:, :77], base_z[0, :77].expand(10, 77)),  # row stride 0 (broadcast target)
    ]
    for p, z in cases:
        check_single(p, z)


def test_validation_errors():
    a = torch.randn(4, 8)
    for fn in (cosine_loss, cosine_loss_reference, cosine_loss_triton):
        with pytest.raises(ValueError, match="shapes differ"):
            fn(a, torch.randn(4, 9))
        with pytest.raises(ValueError, match="2-D"):
            fn(a[0], a[0])
        with pytest.raises(ValueError, match="2-D"):
            fn(a[None], a[None])
        with pytest.raises(ValueError, match="dtypes differ"):
            fn(a, a.half())
        with pytest.raises(ValueError, match="empty"):
            fn(a[:0], a[:0])
    for fn in (symmetric_cosine_loss, symmetric_cosine_loss_reference, symmetric_cosine_loss_triton):
        with pytest.raises(ValueError):
            fn(a, torch.randn(5, 8), a, torch.randn(5, 8))
        with pytest.raises(ValueError, match="dtypes differ"):
            fn(a, a, a, a.double())


# ---- backend / dispatch ----------------------------------------------------------------------
def test_backend_switch():
    cpu = torch.randn(2, 3)
    fake_cuda = types.SimpleNamespace(is_cuda=True)  # use_triton only asks .is_cuda
    assert not backend.use_triton(cpu)  # CPU tensors: reference
    assert not backend.use_triton(fake_cuda, cpu)
    assert not backend.use_triton()
    assert backend.use_triton(fake_cuda) == backend.triton_available()
    try:
        backend.force_reference(True)
        assert backend.is_reference_forced() and not backend.use_triton(fake_cuda)
        backend.force_reference(False)
        assert not backend.is_reference_forced() and backend.use_triton(fake_cuda)
    finally:
        backend.force_reference(False)


def test_force_reference_env_var(monkeypatch):
    try:
        monkeypatch.setenv("KERNELS_FORCE_REFERENCE", "1")
        importlib.reload(backend)
        assert backend.is_reference_forced()
        monkeypatch.setenv("KERNELS_FORCE_REFERENCE", "0")
        importlib.reload(backend)
        assert not backend.is_reference_forced()
    finally:
        monkeypatch.delenv("KERNELS_FORCE_REFERENCE")
        importlib.reload(backend)


def test_public_functions_dispatch(monkeypatch):
    p = make((4, 16), torch.float32, 11).cpu().requires_grad_()
    z = make((4, 16), torch.float32, 12).cpu()
    assert "Mean" in type(cosine_loss(p, z).grad_fn).__name__  # CPU: reference
    if DEVICE.type == "cuda":
        p, z = p.detach().to(DEVICE).requires_grad_(), z.to(DEVICE)
    else:
        monkeypatch.setattr(backend, "use_triton", lambda *t: True)  # pretend CUDA; the interpreter runs the kernel
    assert type(cosine_loss(p, z).grad_fn).__name__.startswith("_CosineLossFn")
    assert type(symmetric_cosine_loss(p, p, z, z).grad_fn).__name__.startswith("_SymmetricCosineLossFn")


# ---- the compiled (non-interpreted) kernels lower to PTX ----------------------------------
_AOT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import importlib
    cl = importlib.import_module("kernels.cosine_loss")
    target = GPUTarget("cuda", 90, 32)
    div16 = lambda n: {{(i,): [["tt.divisibility", 16]] for i in range(n)}}
    common = dict(P0="*{dt}", Z0="*{dt}", P1="*{dt}", Z1="*{dt}",
                  stride_p0="i32", stride_z0="i32", stride_p1="i32", stride_z1="i32")
    fwd = dict(common, STATS="*fp32", LOSS="*fp32", B="i32", D="i32",
               EPS="constexpr", FLT_MIN="constexpr", BLOCK_B="constexpr", BLOCK_D="constexpr")
    k = triton.compile(ASTSource(cl._cosine_fwd_kernel, fwd,
                       dict(EPS=cl.EPS, FLT_MIN=cl.FLT_MIN, BLOCK_B=4, BLOCK_D=1024), div16(12)),
                       target=target, options=dict(num_warps=8))
    assert "ld.global.v4" in k.asm["ptx"], "forward loads are not vectorised"
    exact = lambda ptx: not any(op in ptx for op in ("div.full", "div.approx", "sqrt.approx", "rcp.approx"))
    assert exact(k.asm["ptx"]), "forward: approximate division or square root (round as the interpreter does)"
    bwd = dict(common, DP0="*{dt}", DZ0="*{dt}", DP1="*{dt}", DZ1="*{dt}", STATS="*fp32",
               GRAD_OUT="*fp32", B="i32", D="i32", NEED_DP0="constexpr", NEED_DZ0="constexpr",
               NEED_DP1="constexpr", NEED_DZ1="constexpr", BLOCK_B="constexpr", BLOCK_D="constexpr")
    k = triton.compile(ASTSource(cl._cosine_bwd_kernel, bwd,
                       dict(NEED_DP0=True, NEED_DZ0=False, NEED_DP1=True, NEED_DZ1=True, BLOCK_B=32, BLOCK_D=128),
                       div16(16)), target=target, options=dict(num_warps=8))
    assert "st.global.v4" in k.asm["ptx"], "gradient stores are not vectorised"
    assert exact(k.asm["ptx"]), "backward: approximate division or square root"
    print("ok")
    """
)


@pytest.mark.skipif(not nvidia_backend_available(), reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_kernels_compile_for_sm90(dt):
    # The interpreter accepts some code the compiler rejects; compile ahead of time for
    # an H100 (no GPU needed: ptxas ships with Triton), in a process without the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _AOT.format(repo=str(REPO), dt=dt)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
