"""--data cifar10 / stl10 on tiny files in the official on-disk formats.

The files are ours (random pixels), so torchvision's md5 checks are patched out; the
parsing is torchvision's own and the rest is the scripts' code path.
"""

import pickle

import numpy as np
import pytest
import torch
import torchvision

import byol
from tiny_data import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trusted_files(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)


def write_cifar10(root, per_batch=8, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return 5 * per_batch, n_test


def write_stl10(root, n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n in [("train", n_train), ("test", n_test)]:
        (folder / f"{split}_X.bin").write_bytes(rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tobytes())
        (folder / f"{split}_y.bin").write_bytes(rng.integers(1, 11, n, dtype=np.uint8).tobytes())
    return n_train, n_test


def load(argv):
    return byol.load_data(byol.fill_defaults(byol.parse_args(argv)))


def test_cifar10_positives_are_two_augmentations_of_one_image(tmp_path, trusted_files):
    n_train, n_test = write_cifar10(tmp_path)
    data = load(["--data", "cifar10", "--data-dir", str(tmp_path)])
    assert data.images.shape == (n_train + n_test, 3, 32, 32) and data.images.dtype == torch.uint8
    assert len(data.anchors) == n_train and data.test_images.sum() == n_test
    assert data.labels.shape == (n_train + n_test,)
    # No natural pairs: every anchor's only positive is itself.
    assert torch.equal(data.groups[:, 0], data.anchors) and (data.group_sizes == 1).all()
    order = byol.epoch_order(len(data.anchors), 0, 0)
    x1, x2 = byol.make_pair_batch(data, order, 0, 8, 0, 1, 0, 0, "cpu")
    assert torch.equal(x1, x2)
    # The first training image is CIFAR's first row, in CHW order.
    first = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())["data"][0]
    assert torch.equal(data.images[0], torch.from_numpy(first.reshape(3, 32, 32)))


def test_stl10_is_resized_to_the_image_size(tmp_path, trusted_files):
    n_train, n_test = write_stl10(tmp_path)
    data = load(["--data", "stl10", "--data-dir", str(tmp_path), "--image-size", "48"])
    assert data.images.shape == (n_train + n_test, 3, 48, 48)
    assert len(data.anchors) == n_train and int(data.labels.min()) >= 0 and int(data.labels.max()) <= 9


def test_cifar10_trains_and_reports_knn(tmp_path, trusted_files, capsys):
    write_cifar10(tmp_path)
    out = tmp_path / "run"
    rc = byol.main(
        [
            "--data",
            "cifar10",
            "--data-dir",
            str(tmp_path),
            "--image-size",
            "16",
            "--stem",
            "imagenet",
            "--hidden-dim",
            "32",
            "--proj-dim",
            "16",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--workers",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    last = torch.load(out / "last.pt", weights_only=False)["history"][-1]
    knn = [k for k in last if k.startswith("knn@")]  # k: at most 20, at most the smallest class's references
    assert len(knn) == 1 and 0.0 <= last[knn[0]] <= 1.0 and last["epoch"] == 1


def test_missing_cifar10_is_one_line_naming_the_fix(tmp_path, capsys):
    rc = byol.main(["--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("byol.py: error: cifar10 not found") and "--download" in err[0]
    assert not (tmp_path / "run" / "last.pt").exists()
