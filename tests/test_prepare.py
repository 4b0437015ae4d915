"""prepare.py: each source's layout gives the right kind, groups, names and order; bad input is one line naming the
file or flag; the cache is reused while its files are unchanged, rebuilt when one changes, and never half-written.
Tiny images written here (one colour each, so that the order shows in the pixels), plus the embedded Omniglot."""

import csv
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prepare as P

HERE = Path(__file__).resolve().parent.parent


def image(path, red=0, size=(12, 10), fmt=None):
    """A one-colour image whose red channel tells it apart; the parent folders are made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (red, 50, 100)).save(path, format=fmt)
    return path


def reds(d):
    return d["images"][:, 0, 0, 0].tolist()


def build(tmp_path, data, **kw):
    return P.load(P.prepare(data, image_size=8, workers=2, cache_dir=tmp_path / "cache", **kw))


def test_class_folders_skip_hidden_fifos_and_loose_free_root(tmp_path):
    root = tmp_path / "classes"
    image(root / "b" / "1.png", 30)
    image(root / "a" / "2.png", 10)
    image(root / "a" / "sub" / "1.jpg", 20, fmt="PNG")  # the extension picks it, Pillow reads the bytes
    image(root / "d" / "only.png", 40)  # a class of one image: a group of 1
    image(root / "a" / ".hidden.png", 99)
    image(root / "a" / ".thumbs" / "t.png", 99)
    image(root / ".git" / "x.png", 99)
    (root / "c").mkdir()  # no images: no group
    (root / "notes.txt").write_text("not an image, so the root holds no loose images")
    os.mkfifo(root / "a" / "fifo.png")  # reading it would wait forever
    d = build(tmp_path, "folder", data_dir=root)
    assert d["kind"] == "classes" and d["group_names"] == ["a", "b", "d"]
    assert d["names"] == [str(root.resolve() / n) for n in ("a/2.png", "a/sub/1.jpg", "b/1.png", "d/only.png")]
    assert reds(d) == [10, 20, 30, 40]
    assert d["groups"].tolist() == [[0, 1], [2, -1], [3, -1]] and d["groups"].dtype == torch.int64
    assert d["images"].shape == (4, 3, 8, 8) and d["images"].dtype == torch.uint8
    assert "labels" not in d and "test" not in d and "episodes" not in d
    assert d["meta"]["source"] == "folder" and d["meta"]["root"] == str(root.resolve()) and d["meta"]["image_size"] == 8


def test_loose_images_are_unlabelled_whole_tree(tmp_path):
    root = tmp_path / "photos"
    image(root / "x.png", 20)
    image(root / "sub" / "y.png", 10)
    image(root / ".thumbs" / "z.png", 99)
    image(root / ".k.png", 99)
    os.mkfifo(root / "f.png")
    d = build(tmp_path, "folder", data_dir=root)
    assert d["kind"] == "images" and d["group_names"] == ["sub/y.png", "x.png"]
    assert reds(d) == [10, 20] and d["groups"].tolist() == [[0], [1]]


def test_resize_shorter_side_then_centre_crop(tmp_path):
    picture = Image.new("RGB", (16, 8), (255, 0, 0))
    picture.paste((0, 0, 255), (8, 0, 16, 8))  # left half red, right half blue
    picture.save(tmp_path / "wide.png")
    x = P.decode_all([tmp_path / "wide.png"], ["wide.png"], 4, 1)[0]  # 16x8 -> 8x4, the middle 4 columns
    assert x.shape == (3, 4, 4) and x[0, :, :2].min() > 200 and x[2, :, 2:].min() > 200


def test_transparency_on_white_and_16_bit_scaled(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "half.png")
    x = P.decode_all([tmp_path / f for f in ("clear.png", "deep.png", "half.png")], ["c", "d", "h"], 8, 1)
    assert x[0].min() == 255 and x[1].min() == 255 and x[2].max() == 128


def test_tll_folders_and_zips_pair_left_with_right(tmp_path):
    for side, red in (("left", 0), ("right", 100)):
        for i, name in enumerate(("b.jpg", "a.jpg")):
            image(tmp_path / "tll" / side / name, red + i, fmt="PNG")
    d = build(tmp_path, "tll", data_dir=tmp_path / "tll")
    assert d["kind"] == "pairs" and d["group_names"] == ["a.jpg", "b.jpg"]
    assert d["groups"].tolist() == [[0, 2], [1, 3]] and reds(d) == [1, 0, 101, 100]
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for side in ("left", "right"):
        with zipfile.ZipFile(zipped / f"{side}.zip", "w") as zf:
            for f in sorted((tmp_path / "tll" / side).iterdir()):
                zf.write(f, f"{side}/{f.name}")
            zf.writestr(f"__MACOSX/{side}/._a.jpg", b"resource fork")  # hidden: left out
    z = build(tmp_path, "tll", data_dir=zipped)
    assert torch.equal(z["images"], d["images"]) and z["groups"].tolist() == d["groups"].tolist()
    assert z["names"][0] == f"{zipped.resolve() / 'left.zip'}:left/a.jpg"
    image(tmp_path / "tll" / "left" / "c.jpg")
    with pytest.raises(P.UserError, match=r"only in left/ \['c.jpg'\], only in right/ \[\]"):
        build(tmp_path, "tll", data_dir=tmp_path / "tll")


def test_pairs_csv_with_bom_header_and_relative_paths(tmp_path):
    image(tmp_path / "imgs" / "b.png", 20)
    image(tmp_path / "imgs" / "a.png", 10)
    image(tmp_path / "elsewhere.png", 30)
    rows = [["left", "right"], ["imgs/a.png", " imgs/b.png"], [str(tmp_path / "elsewhere.png"), "imgs/a.png"], []]
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark
        csv.writer(f).writerows(rows)
    d = build(tmp_path, "pairs", pairs_csv=tmp_path / "pairs.csv")
    assert d["kind"] == "pairs" and d["names"] == [
        str(tmp_path / n) for n in ("elsewhere.png", "imgs/a.png", "imgs/b.png")
    ]
    assert d["groups"].tolist() == [[1, 2], [0, 1]] and reds(d) == [30, 10, 20]
    assert d["group_names"] == ["imgs/a.png,imgs/b.png", f"{tmp_path / 'elsewhere.png'},imgs/a.png"]
    (tmp_path / "pairs.csv").write_bytes("\ufeffimgs/b.png,imgs/a.png\n".encode())  # a byte-order mark, no header
    assert build(tmp_path, "pairs", pairs_csv=tmp_path / "pairs.csv")["groups"].tolist() == [[1, 0]]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"imgs/a.png,missing.png\n",
            r"--pairs-csv .*pairs.csv names images that do not exist, e.g. \['.*missing.png'\]",
        ),
        (b"imgs/a.png,imgs/a.png\nimgs/a.png\n", r"--pairs-csv .*: rows \[2\] do not have two columns"),
        (b"left,right\n", r"--pairs-csv .* holds no pairs"),
        (b"imgs/\xe9.png,imgs/a.png\n", r"--pairs-csv .* is not UTF-8 \(byte 5\); save it as UTF-8"),
    ],
)
def test_pairs_csv_errors_name_the_flag(tmp_path, content, message):
    image(tmp_path / "imgs" / "a.png")
    (tmp_path / "pairs.csv").write_bytes(content)
    with pytest.raises(P.UserError, match=message):
        build(tmp_path, "pairs", pairs_csv=tmp_path / "pairs.csv")


def test_missing_data_names_the_flag(tmp_path):
    with pytest.raises(P.UserError, match="--data-dir .*nowhere does not exist"):
        build(tmp_path, "tll", data_dir=tmp_path / "nowhere")
    with pytest.raises(P.UserError, match="--data folder needs --data-dir"):
        build(tmp_path, "folder")
    with pytest.raises(P.UserError, match="--data-dir .*nowhere does not exist"):  # --download fetches tll, not this
        build(tmp_path, "folder", data_dir=tmp_path / "nowhere", download=True)
    with pytest.raises(P.UserError, match="--data pairs needs --pairs-csv"):
        build(tmp_path, "pairs")
    with pytest.raises(P.UserError, match="--pairs-csv .*none.csv does not exist"):
        build(tmp_path, "pairs", pairs_csv=tmp_path / "none.csv")
    with pytest.raises(P.UserError, match="--data tll: no data at .*no-such-data-dir/tll"):  # conftest's $POSITIVE_...
        build(tmp_path, "tll")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(P.UserError, match="--data-dir .*empty holds no images"):
        build(tmp_path, "folder", data_dir=tmp_path / "empty")
    with pytest.raises(P.UserError, match="no cifar10 under --data-dir .*empty; add --download"):
        build(tmp_path, "cifar10", data_dir=tmp_path / "empty")


def test_unreadable_image_and_decompression_bomb_name_the_file(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    image(root / "good.png")
    (root / "bad.png").write_bytes(image(tmp_path / "whole.png").read_bytes()[:40])  # truncated in the pixels
    with pytest.raises(P.UserError, match=r"cannot read image .*bad.png \(.*\); replace or remove that file"):
        build(tmp_path, "folder", data_dir=root)
    (root / "bad.png").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 12 x 10 is more than twice that: a bomb
    with pytest.raises(P.UserError, match=r"cannot read image .*good.png \(DecompressionBombError"):
        build(tmp_path, "folder", data_dir=root)


def test_cache_reused_until_a_file_changes(tmp_path, monkeypatch, capsys):
    decoded = []
    real = P.decode_all
    monkeypatch.setattr(P, "decode_all", lambda sources, *a: decoded.append(len(sources)) or real(sources, *a))
    root = tmp_path / "photos"
    image(root / "a.png", 10)
    image(root / "b.png", 20)
    path = P.prepare("folder", root, image_size=8, cache_dir=tmp_path / "cache")
    assert decoded == [2] and capsys.readouterr().out.startswith(f"prepared {path}: 2 images, 2 images (")
    assert (
        path.parent == tmp_path / "cache" and path.name.startswith("folder-photos-") and path.name.endswith("-8px.pt")
    )
    assert P.prepare("folder", root, image_size=8, cache_dir=tmp_path / "cache") == path
    assert decoded == [2] and capsys.readouterr().out == ""  # reused: nothing decoded, nothing printed
    os.utime(root / "a.png", ns=(1, 1))  # same bytes, another mtime
    P.prepare("folder", root, image_size=8, cache_dir=tmp_path / "cache")
    image(root / "b.png", 30, size=(14, 10))  # another size in bytes
    assert reds(P.load(P.prepare("folder", root, image_size=8, cache_dir=tmp_path / "cache"))) == [10, 30]
    assert decoded == [2, 2, 2]
    other = tmp_path / "elsewhere" / "photos"  # a folder of the same name: its own file
    image(other / "c.png")
    assert P.prepare("folder", other, image_size=8, cache_dir=tmp_path / "cache") != path


def test_a_failed_write_leaves_no_tmp_and_the_old_file(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    image(root / "a.png", 10)
    path = P.prepare("folder", root, image_size=8, cache_dir=tmp_path / "cache")
    before = path.read_bytes()
    image(root / "b.png", 20)

    def save_half(obj, f):
        Path(f).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError, match="disk full"):
        P.prepare("folder", root, image_size=8, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name] and path.read_bytes() == before


def test_load_refuses_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(P.UserError, match="does not exist"):
        P.load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(P.UserError, match="cannot read .*junk.pt"):
        P.load(tmp_path / "junk.pt")
    torch.save({"format": 99}, tmp_path / "other.pt")
    with pytest.raises(P.UserError, match="not a prepared file of format 1"):
        P.load(tmp_path / "other.pt")


def test_cifar10_keeps_labels_and_the_official_test_split(tmp_path, monkeypatch):
    class FakeCIFAR10:  # torchvision's attributes: data [N, H, W, 3] uint8, targets, base_folder
        base_folder = "cifar-10-batches-py"

        def __init__(self, root, train=True, download=False):
            n = 3 if train else 2
            self.data = np.full((n, 32, 32, 3), 7 if train else 9, np.uint8)
            self.data[..., 0] = np.arange(32)[:, None] * 8  # red grows down the rows
            self.targets = list(range(n))

        def __len__(self):
            return len(self.data)

    monkeypatch.setattr(P.torchvision.datasets, "CIFAR10", FakeCIFAR10)
    image(tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1", fmt="PNG")  # a file to key on
    d = build(tmp_path, "cifar10", data_dir=tmp_path / "cifar")
    assert (
        d["kind"] == "images"
        and d["images"].shape == (5, 3, 8, 8)
        and d["images"][:, 1, 0, 0].tolist() == [7] * 3 + [9] * 2
    )
    red = d["images"][0, 0].int()
    assert (red[1:] > red[:-1]).all() and (red == red[:, :1]).all()  # rows stay rows (CIFAR-10 is [N, H, W, 3])
    assert d["labels"].tolist() == [0, 1, 2, 0, 1] and d["test"].tolist() == [False] * 3 + [True] * 2
    assert d["names"][3] == "cifar10[3]" and d["groups"].tolist() == [[i] for i in range(5)]


def test_cli_prints_the_file_or_one_error_line(tmp_path, capsys):
    image(tmp_path / "photos" / "a.png")
    P.main(["--data", "folder", "--data-dir", str(tmp_path / "photos"), "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith(".pt") and out[2] == "1 images of 28 px, 1 images"
    with pytest.raises(SystemExit) as exit:
        P.main(["--data", "tll", "--data-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err.startswith("prepare.py: error: --data-dir") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit:
        P.main(["--image-size", "4"])
    assert exit.value.code == 2 and "not a whole number of pixels of at least 8" in capsys.readouterr().err


def test_embedded_omniglot_episodes_and_official_runs(tmp_path):
    d = P.load(P.prepare("omniglot", image_size=28, cache_dir=tmp_path))
    assert d["kind"] == "classes" and len(d["groups"]) == 136 and d["group_names"][0] == "Balinese/character01"
    in_groups = d["groups"][d["groups"] >= 0]
    assert in_groups.tolist() == list(range(len(in_groups)))  # training images first, each in one group
    for key, shape in (("episodes", (50, 2, 20)), ("test_runs", (20, 2, 20))):
        runs = d[key]
        assert runs.shape == shape and runs.dtype == torch.int64
        assert runs.min() >= len(in_groups) and runs.max() < len(d["images"]) == len(d["names"])  # appended images
        assert all(len(set(r[0].tolist())) == 20 and not set(r[0].tolist()) & set(r[1].tolist()) for r in runs)
    small2 = "images_background_small2/Japanese_(katakana)/character35/0630_{}.png", "Sanskrit/character39/0889_{}.png"
    first, last = ([d["names"][i].split(":")[1] for i in d["episodes"][e, :, 0].tolist()] for e in (0, 49))
    assert first == [small2[0].format(n) for n in ("04", "13")]  # the old scripts' draws (seed 0), as they were
    assert last == ["images_background_small2/" + small2[1].format(n) for n in ("06", "17")]
    run = [d["names"][i].split(":")[1] for i in d["test_runs"][0, :, 0].tolist()]
    assert run == ["run01/training/class01.png", "run01/test/item" + _query_of("class01.png") + ".png"]


def _query_of(reference):
    """The official answer key: run01's test item whose class is `reference`."""
    with zipfile.ZipFile(HERE / "data" / "omniglot" / "all_runs.zip") as zf:
        lines = zf.read("run01/class_labels.txt").decode().split()
    return next(q for q, r in zip(lines[0::2], lines[1::2]) if r.endswith(reference)).rsplit("item", 1)[1][:-4]
