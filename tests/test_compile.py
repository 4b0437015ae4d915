"""--compile: the compiled training step (augmentation, forward, backward, optimiser and EMA under torch.compile,
inductor's C++ kernels on the CPU) is the eager step. The same tiny run twice: the same losses and parameters, up to
float rounding (inductor fuses and reorders float arithmetic). The augmentation's random numbers are drawn before the
step, outside the compiled code, so both runs see the same views."""

import pytest
import torch

import byol
import conftest


def no_cpp_compiler():
    """Why inductor cannot compile on this CPU, or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # RuntimeError: no compiler found, or one that does not run
        return f"inductor needs a C++ compiler for CPU kernels: {e}"
    return None


# Fewer kernels to compile, so that the test's cold compile keeps the suite within its 2 minutes: no stroke jitter
# (its 9 shifted copies), batch norm over both views at once (one forward graph, not two).
CHEAP = ("--stroke", "0", "--bn-stats", "joint")


@pytest.mark.skipif(bool(no_cpp_compiler()), reason=str(no_cpp_compiler()))
def test_the_compiled_step_is_the_eager_step(make_data, tmp_path, one_thread):
    data = make_data(kind="classes", groups=8, per_group=4)  # 6 classes train (2 validate): 3 steps of 8 an epoch
    torch._dynamo.reset()  # compile afresh, whatever compiled before in this process
    runs = [byol.train(byol.parse_args(conftest.tiny("byol", data, tmp_path / flag, flag, *CHEAP, holdout=0)))
            for flag in ("--no-compile", "--compile")]  # fmt: skip
    (eager, eager_log, _), (compiled, compiled_log, _) = runs
    assert len(eager_log) == len(compiled_log) == 3  # epochs 0 (the start), 1 and 2: 6 steps
    # Losses within 1e-4 (measured: 2e-6); views 1% brighter in the compiled step fail it.
    assert [r["loss"] for r in compiled_log[1:]] == pytest.approx([r["loss"] for r in eager_log[1:]], rel=1e-4)
    assert [r["tau"] for r in compiled_log[1:]] == [r["tau"] for r in eager_log[1:]]  # the EMA's decay: exact
    # Parameters and statistics: the bulk within 1e-6 (measured: the median 0, 97% of them within 1e-7); each within
    # 2e-3, as AdamW turns the rounding noise of gradients that are zero in exact arithmetic (a Linear's bias before
    # batch norm) into steps of about the learning rate, whose 6 steps sum to 4.4e-4 (measured: 6e-4 at most).
    pairs = zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True)
    diffs = {name: (a.float() - b.float()).abs() for (name, a), b in pairs}
    assert torch.cat([d.flatten() for d in diffs.values()]).median() <= 1e-6
    assert max(d.max() for d in diffs.values()) <= 2e-3, {k: d.max().item() for k, d in diffs.items()}
    # compile_s: once, in the first epoch's record (step 1 compiles, step 2 once more: its number turns dynamic)
    assert compiled_log[1]["compile_s"] > 0 and "compile_s" not in compiled_log[2]
    assert not any("compile_s" in r for r in eager_log)
