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
# Tiny prepared data files (the format of byol.py's docstring), written with torch.save
# --------------------------------------------------------------------------------------
def write_prepared(
    path, kind="classes", groups=12, per_group=5, size=28, seed=0, episodes=0, way=4, key=None, labels=False, test=None
):
    """A prepared data file as prepare.py would write it, made here without prepare.py.

    kind "classes": `groups` classes of `per_group` images, class g holding images g * per_group ...; "pairs":
    `groups` pairs [i, groups + i] (left images first, then the right ones); "images": `groups` unlabelled images,
    one a group. The images of a group share a pattern (a group's own random image plus a little noise), so that
    they are a learnable signal and the raw pixels beat chance. episodes > 0: that many one-shot episodes of `way`
    references and `way` queries, query i drawn from reference i's pattern, appended after the grouped images and in
    no group. key: meta["key"] (by default it names the kind and the seed: other images, another key)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    noisy = lambda base, n: (base.short() + torch.randint(-12, 13, (n, *base.shape[1:]), generator=g)).clamp(0, 255)
    if kind == "classes":
        bases = torch.randint(0, 256, (groups, 1, 3, size, size), generator=g, dtype=torch.uint8)
        images = torch.cat([noisy(b, per_group) for b in bases]).to(torch.uint8)
        rows = torch.arange(groups * per_group).view(groups, per_group)
    elif kind == "pairs":
        left = torch.randint(0, 256, (groups, 3, size, size), generator=g, dtype=torch.uint8)
        images = torch.cat([left, noisy(left, groups).to(torch.uint8)])
        rows = torch.stack([torch.arange(groups), groups + torch.arange(groups)], 1)
    elif kind == "images":
        images = torch.randint(0, 256, (groups, 3, size, size), generator=g, dtype=torch.uint8)
        rows = torch.arange(groups)[:, None]
    else:
        raise ValueError(kind)
    n = len(images)
    d = {
        "images": images,
        "groups": rows,
        "kind": kind,
        "group_names": [f"{kind[0]}{i}" for i in range(len(rows))],
        "meta": {"key": key or f"{kind}-{groups}x{per_group}-{size}px-seed{seed}", "source": "tests"},
    }
    if episodes:
        bases = torch.randint(0, 256, (episodes * way, 1, 3, size, size), generator=g, dtype=torch.uint8)
        extra = torch.cat([noisy(b, 2) for b in bases]).to(torch.uint8)  # reference, query; reference, query; ...
        d["images"] = torch.cat([images, extra])
        d["episodes"] = (n + torch.arange(2 * episodes * way)).view(episodes, way, 2).transpose(1, 2).contiguous()
    if labels:
        d["labels"] = torch.full((len(d["images"]),), -1, dtype=torch.long)
        d["labels"][rows[rows >= 0]] = torch.arange(len(rows))[:, None].expand_as(rows)[rows >= 0]
    if test is not None:
        d["test"] = torch.as_tensor(test, dtype=torch.bool)
    d["names"] = [f"img{i}.png" for i in range(len(d["images"]))]
    torch.save(d, path)
    return path


@pytest.fixture(scope="session")
def make_data(tmp_path_factory):
    """make_data(**kwargs of write_prepared) -> the path of a new prepared file (session-scoped: hypothesis's tests
    may use it; each call writes a file of its own)."""

    def make(**kwargs):
        return write_prepared(tmp_path_factory.mktemp("data") / "data.pt", **kwargs)

    return make


@pytest.fixture(scope="session")
def classes_file(tmp_path_factory):
    """60 images of 28 px in 12 classes of 5."""
    return write_prepared(tmp_path_factory.mktemp("classes") / "classes.pt", "classes")


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    """20 pairs: 40 images of 28 px."""
    return write_prepared(tmp_path_factory.mktemp("pairs") / "pairs.pt", "pairs", groups=20)


@pytest.fixture(scope="session")
def images_file(tmp_path_factory):
    """60 unlabelled images of 28 px."""
    return write_prepared(tmp_path_factory.mktemp("images") / "images.pt", "images", groups=60)


@pytest.fixture(scope="session")
def episodes_file(tmp_path_factory):
    """The 12 classes of classes_file's kind and 3 one-shot validation episodes of 4 ways (24 more images)."""
    return write_prepared(tmp_path_factory.mktemp("episodes") / "episodes.pt", "classes", episodes=3)


def load_benchmark(script):
    """benchmarks/<script>.py as a module (benchmarks/ is a folder of scripts, loaded by path); registered once, as
    DataLoader workers may pickle its classes."""
    import importlib.util
    import pathlib

    name = f"benchmarks_{script}"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny networks are per-op overhead, and with other jobs on the cores, the
    threads of a second would spin waiting (measured: tests/test_methods.py 8 s alone, 46 s beside a training run)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(method, data_file, out, *extra, epochs=2, holdout=0.2):
    """The smallest run of `method` on a prepared file: validation on a quarter of the training groups."""
    dims = {"simsiam": ["--proj-dim", "8", "--pred-dim", "4"], "redundancy": ["--hidden-dim", "16"]}.get(
        method, ["--hidden-dim", "16", "--proj-dim", "8"]
    )
    return [
        "--arch",
        "conv4",
        "--width",
        "8",
        *dims,
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--image-size",
        "28",
        "--data-file",
        str(data_file),
        "--out",
        str(out),
        "--no-progress",
        "--holdout",
        str(holdout),
        "--val-fraction",
        "0.25",
        "--eval-every",
        "1",
        *extra,
    ]
