"""Test configuration.

* The correctness tests run the real Triton kernels on CPU tensors through Triton's
  interpreter. ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so
  it is set here, before anything imports triton or ``kernels``.
* ``pytest --benchmark`` runs only the benchmarks (``tests/bench_*.py``, timed with
  pytest-benchmark); a plain ``pytest`` never runs them. The exact ``--benchmark`` flag
  is defined here because pytest-benchmark alone rejects it as an ambiguous prefix of
  its ``--benchmark-*`` options. Under ``--benchmark`` the interpreter is NOT forced:
  on a CUDA machine the benchmarks must time the compiled kernels.
* ``KERNELS_TEST_DEVICE=cuda`` runs the kernel tests on a GPU against the compiled
  kernels, so the interpreter is not forced then either (see tests/triton_backends.py).
"""

import os
import sys

KERNELS_TEST_DEVICES = ("cpu", "cuda")
if "--benchmark" not in sys.argv[1:] and os.environ.get("KERNELS_TEST_DEVICE", "cpu") != "cuda":
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
        raise pytest.UsageError(f"KERNELS_TEST_DEVICE={device}: use cpu (Triton's interpreter, the default) or cuda (the compiled kernels)")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("KERNELS_TEST_DEVICE=cuda, but torch sees no CUDA device: unset it to test in Triton's interpreter")
    if not config.getoption("--benchmark"):
        if device != "cuda":
            # also covers pytest.main([...]) where sys.argv says nothing
            os.environ["TRITON_INTERPRET"] = "1"
    elif getattr(config.option, "benchmark_columns", None) is not None:
        # compact pytest-benchmark table (GB/s follow in our own summary below)
        default = ["min", "max", "mean", "stddev", "median", "iqr", "outliers", "ops", "rounds", "iterations"]
        if list(config.option.benchmark_columns) == default:
            config.option.benchmark_columns = ["min", "median", "rounds"]


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
# Bandwidth table for the benchmarks
# --------------------------------------------------------------------------------------
_BENCH_ROWS: list[tuple[str, str, str]] = []  # (case, column, cell)


@pytest.fixture
def bench_record():
    """``record(case, column, benchmark=None, nbytes=0, skipped=None)``.

    After ``benchmark.pedantic(...)`` call it with the number of bytes the operation
    must move at least; it stores ``GB/s`` in ``benchmark.extra_info`` and adds a cell
    to the summary table. For a skipped column pass ``skipped=reason`` before skipping.
    """

    def record(case, column, benchmark=None, nbytes=0, skipped=None):
        if skipped is not None:
            _BENCH_ROWS.append((case, column, "skip"))
            return
        median = benchmark.stats.stats.median
        gbps = nbytes / median / 1e9
        benchmark.extra_info.update({"bytes": int(nbytes), "GB/s": round(gbps, 3)})
        _BENCH_ROWS.append((case, column, f"{median * 1e3:9.3f} ms {gbps:7.2f} GB/s"))

    return record


_BENCH_TABLES: list[tuple[str, str]] = []  # (title, markdown) from the training benchmark


@pytest.fixture
def bench_table():
    """``add(title, markdown)``: a whole table for the summary (tests/bench_training.py)."""
    return lambda title, markdown: _BENCH_TABLES.append((title, markdown))


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--benchmark"):
        return
    tr = terminalreporter
    for title, table in _BENCH_TABLES:
        tr.write_sep("=", title)
        tr.write_line(table)
    if not _BENCH_ROWS:
        return
    tr.write_sep("=", "kernel benchmarks: median time and effective bandwidth")
    # one table per section (first word of the case: "loss", "ema", ...)
    sections: dict[str, list] = {}
    for row in _BENCH_ROWS:
        sections.setdefault(row[0].split()[0], []).append(row)
    for rows in sections.values():
        cases, columns, cells = [], [], {}
        for case, column, cell in rows:
            cases += [case] if case not in cases else []
            columns += [column] if column not in columns else []
            cells[case, column] = cell
        w0 = max(len(c) for c in cases)
        w = max(24, *(len(c) for c in columns))
        tr.write_line("")
        tr.write_line(f"{'case':<{w0}}  " + "  ".join(f"{c:>{w}}" for c in columns))
        for case in cases:
            tr.write_line(f"{case:<{w0}}  " + "  ".join(f"{cells.get((case, c), '-'):>{w}}" for c in columns))
    tr.write_line("")
    tr.write_line("GB/s = minimum bytes of the operation (each input read, each output written once) "
                  "/ median time; 'skip': column skipped, reason in the short summary (-rs).")
