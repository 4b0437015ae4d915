"""Nothing lost, nothing silent: run directories, resume, images as users have them, and bad
values that must end in one line before any data loads (issue #14)."""

import csv
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import bn_only
import byol
import simsiam
from tiny_data import make_tll, one_thread, tiny_flags  # noqa: F401  (one_thread is a fixture)

MODULES = {"byol": byol, "simsiam": simsiam, "bn_only": bn_only}
pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def tll(tmp_path_factory):
    return make_tll(tmp_path_factory.mktemp("tll"), n=20)


# ----------------------------------------------------------------------------- run directories


def test_a_new_run_never_replaces_another(tll, tmp_path, capsys):
    out = tmp_path / "run"
    assert byol.main(tiny_flags("byol", tll, out)) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert byol.main(tiny_flags("byol", tll, out, extra=["--seed", "5"])) == 2
    one_line(capsys, f"--out {out} already holds a run", "--resume", "--overwrite")
    assert (out / "last.pt").read_bytes() == before
    assert byol.main(tiny_flags("byol", tll, out, extra=["--seed", "5", "--overwrite"])) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]  # the old run's records are gone, not mixed in
    assert torch.load(out / "last.pt", weights_only=False)["args"]["seed"] == 5


def test_a_resumed_run_writes_where_its_checkpoint_lives(tll, tmp_path, monkeypatch):
    out = tmp_path / "elsewhere" / "run"
    assert byol.main(tiny_flags("byol", tll, out, epochs=2, extra=["--stop-after-epochs", "1"])) == 0
    other = tmp_path / "other-cwd"
    other.mkdir()
    monkeypatch.chdir(other)
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 0
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2
    assert not (other / "runs").exists()


def test_the_log_holds_each_epoch_once_after_a_kill_before_the_save(tll, tmp_path):
    out = tmp_path / "run"
    assert byol.main(tiny_flags("byol", tll, out, epochs=2, extra=["--stop-after-epochs", "1"])) == 0
    with open(out / "log.jsonl", "a") as f:  # epoch 2 logged, then killed before its checkpoint
        f.write(json.dumps({"epoch": 2, "loss": 9.0}) + "\n")
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


@pytest.mark.parametrize("name", MODULES)
def test_out_that_is_a_file_is_one_line_before_data_loads(name, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # --data-dir does not exist either: the output is checked first, before any data loads.
    assert (
        MODULES[name].main(["--data", "tll", "--data-dir", str(tmp_path / "missing"), "--out", str(blocker / "run")])
        == 2
    )
    one_line(capsys, "cannot be written to", blocker / "run")


def test_ctrl_c_is_one_line_with_the_resume_command(monkeypatch, capsys, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(byol, "train", interrupted)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")  # an epoch was saved (without one: test_bad_input_probe2, case 18)
    assert byol.main(["--out", str(tmp_path / "run")]) == 130
    one_line(capsys, "interrupted", f"--resume {tmp_path / 'run' / 'last.pt'}")


# ----------------------------------------------------------------------------- flags checked up front


BAD_FLAGS = [
    ("byol", ["--lr", "-1"], "--lr"),
    ("byol", ["--lr", "nan"], "--lr"),
    ("byol", ["--weight-decay", "-1"], "--weight-decay"),
    ("byol", ["--base-tau", "1.5"], "--base-tau"),
    ("byol", ["--hidden-dim", "0"], "--hidden-dim"),
    ("byol", ["--proj-dim", "0"], "--proj-dim"),
    ("simsiam", ["--pred-dim", "0"], "--pred-dim"),
    ("bn_only", ["--hidden-dim", "0"], "--hidden-dim"),
    ("byol", ["--device", "meta"], "--device meta"),
    ("byol", ["--device", "mps"], "--device mps"),
    ("byol", ["--eval-every", "0"], "--eval-every"),
    ("byol", ["--stop-after-epochs", "0"], "--stop-after-epochs"),
    ("byol", ["--image-size", "100000"], "--image-size 100000"),
    ("byol", ["--warmup-epochs", "-2"], "--warmup-epochs"),
    ("byol", ["--workers", "0"], "--workers"),
]


@pytest.mark.parametrize("name,argv,needle", BAD_FLAGS, ids=[" ".join(a) for _, a, _ in BAD_FLAGS])
def test_bad_values_are_one_line_before_anything_runs(name, argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    assert MODULES[name].main([*argv, "--data", "tll", "--data-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    one_line(capsys, needle)
    assert not out.exists()


# ----------------------------------------------------------------------------- images as users have them


def decode(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return byol.decode_image(buf.getvalue, "test-image", 8)


def test_16_bit_grayscale_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    x = decode(Image.fromarray(ramp)).float()  # Pillow stores a uint16 array as mode I;16
    assert x.min() < 20 and x.max() > 235 and 100 < x.mean() < 155  # a full ramp, mid-grey on average
    assert (x >= 255).float().mean() < 0.1


def test_transparent_background_is_white():
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (6, 6, 10, 10))
    x = decode(img)
    assert x[:, 0, 0].tolist() == [255, 255, 255]
    assert x[0, 4, 4] > 150 and x[1, 4, 4] < 80  # the opaque red square stays red


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (16, 8), "white")
    img.paste((0, 0, 0), (0, 0, 8, 8))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display: the black half goes to the top
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    x = byol.decode_image(buf.getvalue, "rotated.jpg", 8).float().mean(0)
    assert x[:4].mean() < 60 and x[4:].mean() > 190


@pytest.mark.parametrize("fmt,ext", [("PPM", ".pgm"), ("GIF", ".gif"), ("TIFF", ".tif")])
def test_folder_reads_every_format_pillow_reads(tmp_path, fmt, ext):
    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for k in range(3):
            Image.fromarray(np.full((12, 12), 40 * c + 10 * k, dtype=np.uint8)).save(
                tmp_path / f"class{c}" / f"{k}{ext}", format=fmt
            )
    args = byol.fill_defaults(
        byol.parse_args(
            ["--data", "folder", "--data-dir", str(tmp_path), "--image-size", "8", "--workers", "1", "--holdout", "0"]
        )
    )
    assert len(byol.load_data(args).images) == 6


# ----------------------------------------------------------------------------- files that name themselves


def write_pairs(root, rows, encoding, bom=False):
    path = root / "pairs.csv"
    with open(path, "w", newline="", encoding=encoding) as f:
        if bom:
            f.write("\ufeff")
        csv.writer(f).writerows(rows)
    return path


def test_csv_with_a_byte_order_mark_and_no_header(tll, tmp_path):
    rows = [[str(tll / "left" / f"p{i:03d}.jpg"), str(tll / "right" / f"p{i:03d}.jpg")] for i in range(12)]
    path = write_pairs(tmp_path, rows, "utf-8", bom=True)
    args = byol.fill_defaults(
        byol.parse_args(["--data", "pairs", "--pairs-csv", str(path), "--image-size", "8", "--workers", "1"])
    )
    data = byol.load_data(args)
    assert len(data.images) == 24 and not any("\ufeff" in n for n in data.names)


def test_csv_not_in_utf8_is_one_line(tmp_path, capsys):
    path = write_pairs(tmp_path, [["café_left.jpg", "café_right.jpg"]], "latin-1")
    assert byol.main(["--data", "pairs", "--pairs-csv", str(path), "--out", str(tmp_path / "run")]) == 2
    one_line(capsys, path, "not UTF-8")


def test_zip_member_with_a_bad_crc_is_one_line_naming_it(tmp_path, capsys):
    root = tmp_path / "tll"
    make_tll(root, n=12, layout="zip")
    raw = bytearray((root / "left.zip").read_bytes())
    with zipfile.ZipFile(root / "left.zip") as z:
        info = z.getinfo("left/p003.jpg")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 40] ^= 0xFF  # flip a byte of the stored JPEG: the CRC no longer matches
    (root / "left.zip").write_bytes(bytes(raw))
    assert byol.main(["--data", "tll", "--data-dir", str(root), "--out", str(tmp_path / "run"), "--workers", "1"]) == 2
    one_line(capsys, "left.zip:left/p003.jpg", "replace or remove")


# ----------------------------------------------------------------------------- numbers that cannot measure anything


def test_one_image_per_class_gives_no_knn_and_a_warning_not_zeros(tmp_path, capsys):
    from tiny_data import make_folder

    root = make_folder(tmp_path / "data", classes=12, per_class=1, seed=3)
    out = tmp_path / "run"
    argv = [
        "--data",
        "folder",
        "--data-dir",
        str(root),
        "--image-size",
        "16",
        "--width",
        "8",
        "--hidden-dim",
        "16",
        "--proj-dim",
        "8",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--eval-every",
        "1",
        "--workers",
        "1",
        "--no-progress",
        "--pairs",
        "aug",
        "--out",
        str(out),
    ]
    assert byol.main(argv) == 0
    printed = capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert not any(k.startswith("knn@") or k == "r_precision" for r in log for k in r)
    assert "warning: no held-out quality metric" in printed


def test_an_image_cache_larger_than_memory_is_refused_with_its_size(monkeypatch):
    monkeypatch.setattr(byol, "available_memory", lambda: 2 * 2**30)
    sources = [("x", bytes)] * 1000
    with pytest.raises(byol.UserError, match=r"would take 2\.8 GiB \(1000 images at 1000 px\).*lower --image-size"):
        byol.decode_all(sources, 1000, 1)


def test_eval_checks_its_flags_and_output_before_loading(tmp_path, capsys):
    import eval as ev

    assert ev.main(["--baseline", "random", "--memory-mb", "nan"]) == 2
    one_line(capsys, "--memory-mb nan")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        ev.main(
            [
                "--baseline",
                "random",
                "--data",
                "tll",
                "--data-dir",
                str(tmp_path / "missing"),
                "--out",
                str(blocker / "x"),
            ]
        )
        == 2
    )
    one_line(capsys, "cannot be written to")


def test_eval_ctrl_c_is_one_line(monkeypatch, capsys):
    import eval as ev

    def interrupted(opts):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "run", interrupted)
    assert ev.main(["--baseline", "random"]) == 130
    one_line(capsys, "interrupted")


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays(tll, tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "run"
    assert byol.main(tiny_flags("byol", tll, out, epochs=2, extra=["--stop-after-epochs", "1"])) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()

    def full(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(byol.torch, "save", full)
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err  # a collapse warning of the tiny run may come first
    errors = [line for line in err.splitlines() if line.startswith("byol.py: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in ("No space left on device", "the checkpoint of epoch 1 is kept", f"--resume {out / 'last.pt'}"):
        assert needle in errors[0]
    assert (out / "last.pt").read_bytes() == before and not list(out.glob("*.tmp"))


def corrupt_zip(root, how):
    """A TLL layout whose left.zip has one member deflated and then damaged (how="deflate") or
    flagged as encrypted (how="encrypted")."""
    make_tll(root, n=12)
    with zipfile.ZipFile(root / "left.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted((root / "left").iterdir()):
            z.write(p, f"left/{p.name}")
    import shutil as sh

    sh.rmtree(root / "left")
    raw = bytearray((root / "left.zip").read_bytes())
    with zipfile.ZipFile(root / "left.zip") as z:
        info = z.getinfo("left/p003.jpg")
    if how == "deflate":
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        raw[start : start + 8] = b"\xff" * 8  # an invalid deflate block header
    else:
        raw[info.header_offset + 6] |= 0x01  # general-purpose flag bit 0: encrypted (local header)
        at = 0
        while True:  # the member's central directory entry
            at = raw.find(b"PK\x01\x02", at)
            name_len = int.from_bytes(raw[at + 28 : at + 30], "little")
            if raw[at + 46 : at + 46 + name_len] == b"left/p003.jpg":
                raw[at + 8] |= 0x01
                break
            at += 4
    (root / "left.zip").write_bytes(bytes(raw))
    return root


@pytest.mark.parametrize("how", ["deflate", "encrypted"])
def test_a_damaged_or_encrypted_zip_member_is_one_line_naming_it(tmp_path, capsys, how):
    root = corrupt_zip(tmp_path / "tll", how)
    assert byol.main(["--data", "tll", "--data-dir", str(root), "--out", str(tmp_path / "run"), "--workers", "1"]) == 2
    one_line(capsys, "left.zip:left/p003.jpg", "replace or remove")


def test_holdout_zero_warns_instead_of_an_empty_summary(tll, tmp_path, capsys):
    assert byol.main(tiny_flags("byol", tll, tmp_path / "run", extra=["--holdout", "0"])) == 0
    assert "warning: no held-out quality metric" in capsys.readouterr().out
