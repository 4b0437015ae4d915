"""Tiny datasets and helpers shared by the script tests (test_scripts.py, test_resume_ddp.py,
test_augment_data.py). Everything is written under a pytest tmp dir; nothing is downloaded.

Every image is distinct (random background, random ellipse), so a decoded image identifies
its file; `index_coded` goes further and replaces the pixels by the image's own index, so
that a batch tells exactly which images it was made of.
"""

import contextlib
import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import bn_only
import byol
import contrastive
import simsiam

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("byol", "simsiam", "bn_only", "contrastive")
MODULES = {"byol": byol, "simsiam": simsiam, "bn_only": bn_only, "contrastive": contrastive}


def random_image(rng, size=24):
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
    x1, y1 = (int(v) for v in rng.integers(size // 2, size, 2))
    ImageDraw.Draw(img).ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_tll(root, n=20, seed=0, layout="dirs", size=24):
    """Totally-Looks-Like layout: root/left/pNNN.jpg and root/right/pNNN.jpg (layout="dirs"),
    or root/left.zip and root/right.zip whose members sit under left/ and right/ (layout="zip")."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for side in ("left", "right"):
        blobs = {f"p{i:03d}.jpg": jpeg_bytes(random_image(rng, size)) for i in range(n)}
        if layout == "dirs":
            (root / side).mkdir(exist_ok=True)
            for name, blob in blobs.items():
                (root / side / name).write_bytes(blob)
        else:
            with zipfile.ZipFile(root / f"{side}.zip", "w") as zf:
                for name, blob in blobs.items():
                    zf.writestr(f"{side}/{name}", blob)
    return root


def make_folder(root, classes=4, per_class=6, seed=0, size=24):
    """Class subfolders root/cK/imgJ.png (PNG: lossless)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            random_image(rng, size).save(root / f"c{c}" / f"img{j}.png")
    return root


def make_pairs_csv(root, n=12, header=True, seed=0, name="pairs.csv"):
    """root/imgs/a_i.png, root/imgs/b_i.png and a CSV of relative paths (a_i, b_i)."""
    root = Path(root)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for side in ("a", "b"):
            random_image(rng).save(root / "imgs" / f"{side}_{i}.png")
        rows.append([f"imgs/a_{i}.png", f"imgs/b_{i}.png"])
    with open(root / name, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["left", "right"])
        w.writerows(rows)
    return root / name


def tiny_flags(method, data_dir, out, epochs=1, batch_size=8, extra=()):
    """The smallest sensible training run of `method` on a TLL directory."""
    dims = (
        ["--proj-dim", "16", "--pred-dim", "8"] if method == "simsiam" else ["--hidden-dim", "32", "--proj-dim", "16"]
    )
    return [
        "--data",
        "tll",
        "--no-pretrained",  # conv4 from scratch: the tll recipe's pretrained backbone is tested in test_pretrained.py
        "--data-dir",
        str(data_dir),
        "--image-size",
        "16",
        "--stem",
        "imagenet",
        *dims,
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(epochs),
        "--eval-every",
        "1",
        "--val-fraction",  # these runs test other things; tests/test_validation.py tests the validation split
        "0",
        "--workers",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def index_coded(data):
    """A copy of `data` whose image i holds its own index (channel 0: i % 256, channel 1: i // 256)."""
    import dataclasses

    n = len(data.images)
    codes = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    codes[:, 0] = (torch.arange(n) % 256).view(n, 1, 1).to(torch.uint8)
    codes[:, 1] = (torch.arange(n) // 256).view(n, 1, 1).to(torch.uint8)
    return dataclasses.replace(data, images=codes)


def decode_index(x):
    """Inverse of index_coded for a batch of images: LongTensor of image indices."""
    return x[:, 0, 0, 0].long() + 256 * x[:, 1, 0, 0].long()


def batch_indices(module, data, epoch, batch_size, seed=0, world=1, rank=0):
    """(first, second) image indices of every pair the training loop of `module` would draw in `epoch`."""
    coded = index_coded(data)
    order = module.epoch_order(len(data.anchors), seed, epoch)
    steps = len(data.anchors) // batch_size
    firsts, seconds = [], []
    for step in range(steps):
        x1, x2 = module.make_pair_batch(coded, order, step, batch_size, rank, world, seed, epoch * steps + step, "cpu")
        firsts.append(decode_index(x1))
        seconds.append(decode_index(x2))
    return torch.cat(firsts), torch.cat(seconds)


def load_benchmark(script):
    """benchmarks/<script>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    import importlib.util
    import sys

    name = f"benchmarks_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{script}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(
            spec
        )  # registered: DataLoader workers may pickle its classes
        spec.loader.exec_module(module)
    return sys.modules[name]


def args_for(module, argv):
    """Parsed and completed arguments of `module` (no training), without a validation split (tests/test_validation.py
    tests that) unless argv asks for one."""
    return module.fill_defaults(module.parse_args(["--val-fraction", "0", *[str(a) for a in argv]]))


def run_main(module, argv):
    """module.main(argv) with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def state_dicts_equal(a, b):
    """Names of the tensors that differ between two state dicts (empty when identical)."""
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))[:5]
    return [k for k in a if not torch.equal(a[k], b[k])]


def tensors_in(obj, prefix=""):
    """Every tensor nested in dicts/lists, as {path: tensor}."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_in(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_in(v, f"{prefix}/{i}"))
    return out


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """ResNet-18 on tiny images is dominated by per-op overhead; with other jobs on the same
    cores, intra-op threads only add contention (measured: ~6x slower with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tll_dir(tmp_path_factory):
    """A tiny TLL layout (20 pairs), shared by the tests of one module."""
    return make_tll(tmp_path_factory.mktemp("tll"), n=20, seed=0)
