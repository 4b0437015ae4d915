"""Kernel benchmarks: the fused Triton kernels against their PyTorch references (issue #16).

  loss  forward + backward of the symmetric cosine loss as BYOL and SimSiam use it (gradients into
        p1 and p2, targets detached): Triton vs the eager reference vs torch.compile of the reference,
        B in {256, 4096, 65536}, D in {128, 256, 2048}
  ema   one EMA step over the parameters of torchvision resnet18 and resnet50: Triton vs the reference
        (_foreach_mul_ + _foreach_add_) vs torch._foreach_lerp_ vs a per-parameter Python loop

Each case also times a plain copy of as many bytes: the bandwidth this device reaches at that size,
the yardstick of the issue's targets (H100: loss >= 5x eager at B=256, D=256 and >= 80% of memory
bandwidth at B=65536, D=2048; EMA over resnet50 >= 85% of copy bandwidth, no slower than
_foreach_lerp_). Before it is timed, every implementation's output is checked against the reference's
on the same inputs; a mismatch fails the run.

Times are medians: triton.testing.do_bench on CUDA, the same recipe with a wall clock on the CPU.
CUDA: loss inputs in bf16 (what byol.py's autocast feeds the loss), EMA in fp32. CPU: fp32, and the
Triton column runs in Triton's interpreter, which checks the output but does not time the kernel;
only with --quick, as the full sizes would take hours there.

Run:
    python benchmarks/kernels.py --device cuda --json runs/bench-kernels.json   # the tables of BENCHMARKS.md
    python benchmarks/kernels.py --quick                                        # one small case per op, CPU
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# Off CUDA the Triton kernels run only in Triton's interpreter. Set before anything imports
# triton.language (torchvision does, kernels/ does): its tl.* helpers read it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# This repository's kernels/ (python puts this file's folder first, where `kernels` is this very file).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchvision  # noqa: E402

from kernels import backend  # noqa: E402
from kernels.cosine_loss import symmetric_cosine_loss_reference, symmetric_cosine_loss_triton  # noqa: E402
from kernels.ema import ema_update_reference_, ema_update_triton_  # noqa: E402

LOSS_SHAPES = [(B, D) for B in (256, 4096, 65536) for D in (128, 256, 2048)]
EMA_MODELS = ["resnet18", "resnet50"]
# --quick: seconds in Triton's interpreter; (256, 256) is also the small target
QUICK_LOSS_SHAPES, QUICK_EMA_MODELS = [(256, 256)], ["squeezenet1_1"]
TAU = 0.996
# An output may be this many eps(dtype) x max |reference output| away from the reference's: a few
# roundings (fp32 accumulation order, one rounding to bf16). A wrong kernel is off by ~1 / eps.
MAX_ERR = 8
TITLES = {"loss": "loss forward + backward", "ema": "EMA step"}


# ---- the bytes each op must move; GB/s = these bytes / median time ---------------------------
def loss_bytes(B, D, dtype):
    # forward reads p1, p2, z1, z2; backward (its own pass under autograd) reads them again, writes dp1, dp2
    return 10 * B * D * dtype.itemsize


def ema_bytes(numel, dtype):
    return 3 * numel * dtype.itemsize  # read target and online, write target


# ---- timing ------------------------------------------------------------------------------------
def bench(fn, device, warmup=25, rep=100):
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing  # here: a CPU-only torch may come without Triton

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    # CUDA events do not time the CPU: do_bench's recipe with a wall clock. One call estimates the
    # time, then warm-up calls fill `warmup` ms and timed calls `rep` ms, at least one of each.
    estimate = wall_ms(fn)
    n_warmup, n_repeat = max(1, int(warmup / estimate)), max(1, int(rep / estimate))
    return statistics.median([wall_ms(fn) for _ in range(n_warmup + n_repeat)][n_warmup:])


def wall_ms(fn):
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def error(got, want):
    """Largest |got - want| over the outputs, in units of eps(dtype) x max |want|."""
    return max(
        ((g.float() - w.float()).abs().max() / (w.float().abs().max() * torch.finfo(g.dtype).eps)).item()
        for g, w in zip(got, want)
    )


def measure(op, case, impls, step, outputs, nbytes, dtype, device):
    """A row per implementation (impls: name -> function, or the reason it is skipped): its outputs
    against the reference's, then the median time of step(function); and a row for the copy."""
    want = outputs(impls["reference"])
    rows = []
    for impl, fn in impls.items():
        row = {"op": op, "case": case, "impl": impl, "bytes": nbytes, "ms": None, "gbps": None, "err": None, "note": ""}
        if isinstance(fn, str):
            row["note"] = f"skipped: {fn}"
        else:
            row["err"] = error(outputs(fn), want)
            row["ms"] = bench(lambda: step(fn), device)
            row["gbps"] = nbytes / row["ms"] / 1e6
            if impl == "triton" and device.type == "cpu":
                row["note"] = "Triton's interpreter: checks the output, does not time the kernel"
        rows.append(row)
    src = torch.randn(nbytes // 2 // dtype.itemsize, device=device).to(dtype)  # read half the bytes, write half
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    rows.append(
        {
            "op": op,
            "case": case,
            "impl": "copy",
            "bytes": nbytes,
            "ms": ms,
            "gbps": nbytes / ms / 1e6,
            "err": None,
            "note": "one flat tensor, as many bytes",
        }
    )
    return rows


def triton_skip_reason(device, quick):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not backend.triton_available():
        return "Triton is not installed"
    if device.type == "cuda" and interpreted:
        return "TRITON_INTERPRET=1 is set: the interpreter would be timed, not the compiled kernels"
    if device.type == "cpu" and not interpreted:
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1"
    if device.type == "cpu" and not quick:
        return "Triton's interpreter would take hours at these sizes: --quick checks the kernels on the CPU"
    return None


# ---- the ops -----------------------------------------------------------------------------------
def loss_rows(B, D, device, quick):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(B, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    p1.requires_grad_()
    p2.requires_grad_()

    def step(fn):
        loss = fn(p1, p2, z1, z2)
        return (loss, *torch.autograd.grad(loss, (p1, p2)))  # no .grad accumulation: the same traffic each call

    impls = {
        "triton": triton_skip_reason(device, quick) or symmetric_cosine_loss_triton,
        "reference": symmetric_cosine_loss_reference,
    }
    torch._dynamo.reset()  # a fresh static-shape compile per case (no recompile limit)
    compiled = torch.compile(symmetric_cosine_loss_reference, dynamic=False)
    try:
        step(compiled)  # compiles here, not while timed
        impls["torch.compile(reference)"] = compiled
    except Exception as e:  # e.g. no C++ compiler for inductor on the CPU
        impls["torch.compile(reference)"] = (
            f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        )
    case = f"B={B} D={D} {str(dtype).removeprefix('torch.')}"
    return measure("loss", case, impls, step, step, loss_bytes(B, D, dtype), dtype, device)


def python_loop(target, online, tau):
    for t, o in zip(target, online):
        t.mul_(tau).add_(o, alpha=1.0 - tau)


def ema_rows(arch, device, quick):
    torch.manual_seed(0)
    start, online = (
        [p.detach().to(device) for p in getattr(torchvision.models, arch)().parameters()] for _ in range(2)
    )
    target = [x.clone() for x in start]  # the timed steps move it; every check starts from `start`

    def step(fn):
        fn(target, online, TAU)

    def outputs(fn):  # one flat tensor: many BN biases are all zero, a per-tensor max |want| would be 0
        t = [x.clone() for x in start]
        fn(t, online, TAU)
        return [torch.cat([x.flatten() for x in t])]

    impls = {
        "triton": triton_skip_reason(device, quick) or ema_update_triton_,
        "reference": ema_update_reference_,
        "_foreach_lerp_": lambda t, o, tau: torch._foreach_lerp_(t, o, 1.0 - tau),
        "python loop": python_loop,
    }
    numel = sum(p.numel() for p in target)
    case = f"{arch}: {len(target)} tensors, {numel / 1e6:.1f}M fp32"
    return measure("ema", case, impls, step, outputs, ema_bytes(numel, torch.float32), torch.float32, device)


def run(device, quick=False):
    rows = []
    for B, D in QUICK_LOSS_SHAPES if quick else LOSS_SHAPES:
        rows += loss_rows(B, D, device, quick)
    for arch in QUICK_EMA_MODELS if quick else EMA_MODELS:
        rows += ema_rows(arch, device, quick)
    return rows


# ---- report ------------------------------------------------------------------------------------
def describe(device):
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, intra-op threads: {torch.get_num_threads()}"
    )
    return f"{where}, torch {torch.__version__}, median times"


def report(rows):
    """A markdown table per op; speed-up against the reference and share of the copy's GB/s from the same case."""
    text = []
    for op, title in TITLES.items():
        lines = [
            f"### {title}",
            "",
            "| case | impl | median ms | GB/s | vs reference | of copy GB/s | err | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in (r for r in rows if r["op"] == op):
            same = {s["impl"]: s for s in rows if s["case"] == r["case"]}
            timed = r["ms"] is not None
            lines.append(
                " | ".join(
                    [
                        f"| {r['case']}",
                        r["impl"],
                        f"{r['ms']:.3f}" if timed else "-",
                        f"{r['gbps']:.1f}" if timed else "-",
                        f"{same['reference']['ms'] / r['ms']:.2f}x" if timed and r["impl"] != "copy" else "-",
                        f"{r['gbps'] / same['copy']['gbps']:.0%}" if timed else "-",
                        f"{r['err']:.2g}" if r["err"] is not None else "-",
                        f"{r['note']} |",
                    ]
                )
            )
        text.append("\n".join(lines))
    text.append(
        "GB/s: the bytes the op must move (loss: 10 x B x D elements, as the backward re-reads the four "
        f"inputs; EMA: 3 x the parameters) / median time. err: the largest |output - reference output| in "
        f"units of eps(dtype) x max |reference output|; above {MAX_ERR} fails the run."
    )
    return "\n\n".join(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--quick", action="store_true", help="one small case per op (the Triton column in the interpreter on the CPU)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write every row to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for CUDA but torch sees no CUDA device; use --device cpu")
    device = torch.device(args.device)
    rows = run(device, args.quick)
    print(f"## Kernel benchmarks ({describe(device)})\n\n{report(rows)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setup": describe(device), "max_err": MAX_ERR, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    wrong = [
        f"{r['impl']} at {r['case']} (err {r['err']:.3g})"
        for r in rows
        if r["err"] is not None and not r["err"] <= MAX_ERR
    ]
    if wrong:
        print(f"kernels.py: error: outputs differ from the reference's: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
