"""Kernel benchmarks at the quick size: run with ``pytest --benchmark``.

``benchmarks/kernels.py --quick`` on this machine's device; its tables follow the run. On the
CPU the Triton column runs in Triton's interpreter (conftest sets it): there it checks the
kernels' outputs, not their speed. Full sizes: ``python benchmarks/kernels.py --device cuda``.
"""

import math

import pytest
import torch
from conftest import load_benchmark

bench = load_benchmark("kernels")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_kernel_benchmark(bench_table):
    rows = bench.run(DEVICE, quick=True)
    bench_table(f"kernel benchmarks, quick ({bench.describe(DEVICE)})", bench.report(rows))
    timed = [r for r in rows if r["ms"] is not None]
    # every column ran (the Triton one too, in the interpreter on the CPU); only torch.compile may be
    # skipped, where inductor finds no C++ compiler
    assert {(r["op"], r["impl"]) for r in rows} - {(r["op"], r["impl"]) for r in timed} <= {
        ("loss", "torch.compile(reference)")
    }
    assert {("loss", "triton"), ("ema", "triton"), ("ema", "_foreach_lerp_")} <= {(r["op"], r["impl"]) for r in timed}
    for r in timed:
        assert math.isfinite(r["ms"]) and r["ms"] > 0, r
        if r["impl"] != "copy":  # the copy has no reference output
            assert r["err"] <= bench.MAX_ERR, f"{r['impl']} differs from the reference at {r['case']}: {r}"
