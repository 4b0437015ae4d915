"""Test configuration.

* The correctness tests run the real Triton kernels on CPU tensors through Triton's
  interpreter. ``TRITON_INTERPRET`` is read when ``triton.language`` is imported and when
  ``@triton.jit`` decorates a kernel, so it is set here, before anything imports them.
* ``pytest --benchmark`` runs only the benchmarks (``tests/bench_*.py``, thin tests over
  benchmarks/kernels.py and benchmarks/training.py); a plain ``pytest`` never runs them.
  The exact ``--benchmark`` flag is defined here (pytest-benchmark, where installed, would
  take it for an ambiguous prefix of its ``--benchmark-*`` options). With a CUDA device
  ``--benchmark`` times the compiled kernels, so the interpreter is not forced then.
* ``KERNELS_TEST_DEVICE=cuda`` runs the kernel tests on a GPU against the compiled
  kernels, so the interpreter is not forced then either (see tests/triton_backends.py).
"""

import os
import sys

KERNELS_TEST_DEVICES = ("cpu", "cuda")


def compiled_kernels(benchmark: bool) -> bool:
    """Whether this run uses the compiled kernels on a GPU rather than Triton's interpreter."""
    if os.environ.get("KERNELS_TEST_DEVICE", "cpu") == "cuda":
        return True
    if benchmark:
        import torch  # imports triton, not triton.language: the interpreter can still be set

        return torch.cuda.is_available()
    return False


if not compiled_kernels("--benchmark" in sys.argv[1:]):
    os.environ["TRITON_INTERPRET"] = "1"

# Hermetic: datasets that a user keeps in data/<name> (tll, cifar10, stl10) are never found there by a test.
os.environ["POSITIVE_SIMILARITY_DATA"] = os.path.join(os.path.dirname(__file__), "no-such-data-dir")

import pytest  # noqa: E402

_BENCH_PREFIX = "bench_"


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run only the benchmarks (tests/bench_*.py); without it they are skipped",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    device = os.environ.get("KERNELS_TEST_DEVICE", "cpu")
    if device not in KERNELS_TEST_DEVICES:
        raise pytest.UsageError(
            f"KERNELS_TEST_DEVICE={device}: use cpu (Triton's interpreter, the default) or cuda (the compiled kernels)"
        )
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(
                "KERNELS_TEST_DEVICE=cuda, but torch sees no CUDA device: unset it to test in Triton's interpreter"
            )
    if not compiled_kernels(config.getoption("--benchmark")):
        os.environ["TRITON_INTERPRET"] = "1"  # also covers pytest.main([...]) where sys.argv says nothing
    config.addinivalue_line("markers", "colour_rule: the test sees the folder recipe's colour rule (not stubbed)")


def _is_bench(path) -> bool:
    return path.name.startswith(_BENCH_PREFIX) and path.suffix == ".py"


def pytest_collect_file(file_path, parent):
    # bench_*.py does not match pytest's default python_files (test_*.py): collect it
    # ourselves under --benchmark (files named on the command line are collected anyway)
    if _is_bench(file_path) and parent.config.getoption("--benchmark") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    bench_mode = config.getoption("--benchmark")
    keep, drop = [], []
    for item in items:
        is_bench = _is_bench(item.path)
        if bench_mode:
            (keep if is_bench else drop).append(item)
        else:
            if is_bench:  # only reachable when a bench file is named explicitly
                item.add_marker(pytest.mark.skip(reason="benchmark: run with `pytest --benchmark`"))
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --------------------------------------------------------------------------------------
# The benchmarks' tables, printed after the run
# --------------------------------------------------------------------------------------
_BENCH_TABLES: list[tuple[str, str]] = []  # (title, markdown)


@pytest.fixture
def bench_table():
    """``add(title, markdown)``: a table for the summary at the end of ``pytest --benchmark``."""
    return lambda title, markdown: _BENCH_TABLES.append((title, markdown))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, table in _BENCH_TABLES:
        terminalreporter.write_sep("=", title)
        terminalreporter.write_line(table)


# --------------------------------------------------------------------------------------
# Tiny folders train conv4
# --------------------------------------------------------------------------------------
SCRIPTS = ("byol", "simsiam", "bn_only", "contrastive")
_REAL_COLOUR_RULE = {}


@pytest.fixture(scope="session", autouse=True)
def conv4_for_tiny_colour_folders():
    """The tests' tiny class folders are random colour images, on which the folder recipe would fine-tune ImageNet
    weights (folder_in_colour). Tests train conv4 on them, as the recipe does on a grayscale folder, unless marked
    colour_rule: tests/test_recipes.py tests the rule itself, on the real function. Session-wide, so that module
    fixtures that train see it too."""
    import importlib

    with pytest.MonkeyPatch.context() as patch:
        for name in SCRIPTS:
            mod = importlib.import_module(name)
            _REAL_COLOUR_RULE[name] = mod.folder_in_colour
            patch.setattr(mod, "folder_in_colour", lambda root, sample=64: False)
        yield


@pytest.fixture(autouse=True)
def the_real_colour_rule(request, monkeypatch):
    if request.node.get_closest_marker("colour_rule"):
        import importlib

        for name in SCRIPTS:
            monkeypatch.setattr(importlib.import_module(name), "folder_in_colour", _REAL_COLOUR_RULE[name])
