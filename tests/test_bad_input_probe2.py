"""Nothing lost, nothing silent, again (issue #30): the second probe's 21 defects, one test each, in the issue's
order. Each ends in the right result, or in one line naming the problem and the fix (exit 2), with nothing
overwritten or half-written."""

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import byol
import eval as ev
import simsiam
from tiny_data import REPO, make_folder, make_tll, one_thread, tiny_flags  # noqa: F401  (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--workers", "1", "--no-progress"]


def one_line(capsys, *needles, prefix=None):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def evaluate(argv, capsys, *needles):
    """eval.py with argv ends in one line holding every needle."""
    assert ev.main([str(a) for a in argv]) == 2
    return one_line(capsys, *needles)


@pytest.fixture(scope="module")
def tll(tmp_path_factory):
    return make_tll(tmp_path_factory.mktemp("tll"), n=20)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tll):
    """A finished one-epoch run (conv4 at 16 px), and a folder of 6 images embedded with it."""
    base = tmp_path_factory.mktemp("probe2")
    assert byol.main(tiny_flags("byol", tll, base / "run")) == 0
    images = base / "images"
    images.mkdir()
    for p in sorted((tll / "left").iterdir())[:6]:
        shutil.copy(p, images / p.name)
    npz = base / "images.npz"
    assert ev.main(["embed", str(base / "run" / "last.pt"), str(images), "--out", str(npz), *QUIET]) == 0
    return base / "run", images, npz


def copy_run(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def stopped_run(tll, out, extra=()):
    """A run of 2 epochs stopped after the first."""
    assert byol.main(tiny_flags("byol", tll, out, epochs=2, extra=["--stop-after-epochs", "1", *extra])) == 0


# ----------------------------------------------------------------------------- 1, 2: data loss


def test_1_a_second_run_into_a_folder_in_use_is_refused(tll, tmp_path, capsys):
    out = tmp_path / "run"
    stopped_run(tll, out)
    before = {p: (out / p).read_bytes() for p in ("last.pt", "log.jsonl")}
    # Another process holds the folder, as a running run does; it is killed, and the OS frees the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, time; f = open({str(out / '.lock')!r}, 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        for argv in (tiny_flags("byol", tll, out, extra=["--overwrite"]), ["--resume", str(out / "last.pt"), "--no-progress"]):
            assert byol.main(argv) == 2
            one_line(capsys, f"--out {out} is in use by another run", "another --out")
        assert {p: (out / p).read_bytes() for p in before} == before
    finally:
        holder.kill()
        holder.wait()
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 0


def test_1_a_run_holds_its_folder_while_it_runs(tll, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    real = byol.load_data

    def load_data(args):  # while the run runs: its folder is locked
        with open(out / ".lock", "a") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(True)
        return real(args)

    monkeypatch.setattr(byol, "load_data", load_data)
    assert byol.main(tiny_flags("byol", tll, out)) == 0
    assert seen
    with open(out / ".lock", "a") as f:  # and released once it ends
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_2_export_and_embed_never_replace_the_checkpoint(run, tmp_path, capsys):
    ckpt = copy_run(run[0], tmp_path) / "last.pt"
    before = ckpt.read_bytes()
    evaluate(["export", ckpt, "--out", ckpt], capsys, f"--out {ckpt} is one of the inputs")
    evaluate(["embed", ckpt, run[1], "--out", ckpt, *QUIET], capsys, f"--out {ckpt} is one of the inputs")
    evaluate(["embed", ckpt, run[1], "--out", ckpt, "--overwrite", *QUIET], capsys, "is one of the inputs")
    assert ckpt.read_bytes() == before


def test_2_search_never_replaces_its_query(run, capsys):
    query = sorted(run[1].iterdir())[0]
    before = query.read_bytes()
    evaluate(["search", run[2], "--query", query, "--out", query, "--workers", "1"], capsys,
             f"--out {query} is one of the inputs")
    assert query.read_bytes() == before


def test_2_export_to_a_json_name_would_write_the_sidecar_over_the_weights(run, tmp_path, capsys):
    out = tmp_path / "e.json"
    evaluate(["export", run[0] / "last.pt", "--out", out], capsys, f"--out {out}", "the same file", "e.pt")
    assert not out.exists()


def test_2_embed_refuses_to_replace_an_existing_file(run, tmp_path, capsys):
    ckpt = copy_run(run[0], tmp_path) / "last.pt"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copytree(run[1], tmp_path / "a" / "images")
    shutil.copytree(run[1], tmp_path / "b" / "images")
    assert ev.main(["embed", str(ckpt), str(tmp_path / "a" / "images"), *QUIET]) == 0
    default = ckpt.parent / "embeddings-images.npz"
    before = default.read_bytes()
    capsys.readouterr()
    evaluate(["embed", ckpt, tmp_path / "b" / "images", *QUIET], capsys, f"--out {default} exists", "--overwrite")
    assert default.read_bytes() == before
    assert ev.main(["embed", str(ckpt), str(tmp_path / "b" / "images"), "--overwrite", *QUIET]) == 0
    with np.load(default) as f:
        assert all("/b/images/" in p for p in f["paths"].tolist())


# ----------------------------------------------------------------------------- 3-7: silently wrong


def conv4_weights():
    return byol.build_encoder("conv4", width=8)[0].state_dict()


INITS = {
    "resnet18_into_conv4": (lambda: torchvision.models.resnet18().state_dict(), ["--arch", "conv4", "--width", "8"]),
    "conv4_into_resnet18": (conv4_weights, ["--arch", "resnet18"]),
    "unrelated_keys": (lambda: {"foo.weight": torch.zeros(3), "bar": torch.ones(2)}, ["--arch", "conv4", "--width", "8"]),
}


@pytest.mark.parametrize("case", INITS)
def test_3_init_with_none_of_the_architectures_weights_is_refused(case, tll, tmp_path, capsys):
    make, flags = INITS[case]
    init = tmp_path / "w.pt"
    torch.save(make(), init)
    assert byol.main(tiny_flags("byol", tll, tmp_path / "run", extra=[*flags, "--init", str(init)])) == 2
    one_line(capsys, f"--init {init} holds 0 of the", "pass a state dict saved from")


def test_3_init_reports_how_many_tensors_loaded(tll, tmp_path, capsys):
    init = tmp_path / "w.pt"
    torch.save(conv4_weights(), init)
    assert byol.main(tiny_flags("byol", tll, tmp_path / "run", extra=["--width", "8", "--init", str(init)])) == 0
    assert f"--init {init}: loaded all 20 tensors of conv4" in capsys.readouterr().out  # 4 convs, 4 BNs of 4


def test_4_resume_on_other_data_is_refused(tmp_path, capsys):
    data = make_tll(tmp_path / "tll", n=20)
    out = tmp_path / "run"
    stopped_run(data, out)
    split = (out / "split.json").read_text()
    for side in ("left", "right"):  # half the pairs gone
        for p in sorted((data / side).iterdir())[10:]:
            p.unlink()
    capsys.readouterr()
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 2
    one_line(capsys, f"--data-dir {data} no longer holds the images the run trained on", "start a new run")
    assert (out / "split.json").read_text() == split and torch.load(out / "last.pt", weights_only=False)["epoch"] == 1


def test_4_resume_on_images_changed_in_place_is_refused(tmp_path, capsys):
    data = make_tll(tmp_path / "tll", n=20)
    out = tmp_path / "run"
    stopped_run(data, out)
    shutil.copy(data / "left" / "p001.jpg", data / "left" / "p000.jpg")  # same names, other pixels
    capsys.readouterr()
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 2
    one_line(capsys, "no longer holds the images the run trained on")


def test_5_search_with_another_runs_checkpoint_is_refused(run, tll, tmp_path, capsys):
    assert byol.main(tiny_flags("byol", tll, tmp_path / "other", extra=["--seed", "3"])) == 0
    query = sorted(run[1].iterdir())[0]
    capsys.readouterr()
    evaluate(["search", run[2], "--query", query, "--checkpoint", tmp_path / "other" / "last.pt", "--out",
              tmp_path / "g.png", "--workers", "1"], capsys, "is not the model", "was embedded with", "--checkpoint")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("name", ["folder", "noext"])
def test_6_search_out_must_name_a_picture(name, run, tmp_path, capsys):
    out = tmp_path / name
    if name == "folder":
        out.mkdir()
    needle = "is a folder" if name == "folder" else "must end in one of .png"
    evaluate(["search", run[2], "--index", "0", "--out", out, "--workers", "1"], capsys, f"--out {out}", needle)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("flag", [["--epochs", "5"], ["--lr", "0.5"], ["--data-dir", "elsewhere"], ["--out", "x"]])
def test_7_resume_refuses_the_flags_it_would_ignore(flag, tll, tmp_path, capsys):
    out = tmp_path / "run"
    stopped_run(tll, out)
    capsys.readouterr()
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress", *flag]) == 2
    one_line(capsys, f"drop {flag[0]}", "start a new run")


def test_7_a_float_tiff_is_not_black(tmp_path):
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = tmp_path / "f.tif"
    Image.fromarray(ramp).save(path)
    x = byol.decode_image(path.read_bytes, str(path), 16).float()
    assert 100 < x.mean() < 155 and x.max() > 235


def test_7_symlinked_folders_are_read(tmp_path, capsys):
    real = make_folder(tmp_path / "real", classes=2, per_class=3)
    root = tmp_path / "tree"
    root.mkdir()
    Image.new("RGB", (20, 20), "red").save(root / "top.png")
    (root / "linked").symlink_to(real, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # read once, not forever
    args = byol.fill_defaults(byol.parse_args(["--data", "folder", "--data-dir", str(root), "--labels", "none",
                                               "--image-size", "16", "--workers", "1"]))
    assert len(byol.load_data(args).images) == 7
    assert ev.main(["embed", "--baseline", "pixels", str(root), "--image-size", "16", "--out", str(tmp_path / "e.npz"),
                    *QUIET]) == 0
    with np.load(tmp_path / "e.npz") as f:
        assert len(f["paths"]) == 7


def test_7_hidden_folders_are_not_classes(tmp_path):
    root = make_folder(tmp_path / "data", classes=3, per_class=3)
    (root / ".thumbs").mkdir()
    Image.new("RGB", (20, 20), "red").save(root / ".thumbs" / "t.png")
    args = byol.fill_defaults(byol.parse_args(["--data", "folder", "--data-dir", str(root), "--image-size", "16",
                                               "--workers", "1", "--holdout", "0"]))
    data = byol.load_data(args)
    assert len(data.images) == 9 and len(data.labels.unique()) == 3


def test_7_one_unlabelled_image_is_one_line_not_nan(tmp_path, capsys):
    root = tmp_path / "one"
    root.mkdir()
    Image.new("RGB", (20, 20), "red").save(root / "only.png")
    assert byol.main(["--data", "folder", "--data-dir", str(root), "--image-size", "16", "--batch-size", "2",
                      "--out", str(tmp_path / "run"), *QUIET]) == 2
    err = one_line(capsys, "1 training anchors", "add data")
    assert "nan" not in err


def test_7_collapse_is_not_judged_on_one_image(recwarn):
    model = byol.BYOL(*byol.build_encoder("conv4", width=8), 16, 8)
    data = byol.PairData(images=torch.zeros(1, 3, 16, 16, dtype=torch.uint8), names=["a"], anchors=torch.tensor([0]),
                         groups=torch.tensor([[0]]), group_sizes=torch.tensor([1]), anchor_pos=torch.tensor([0]),
                         test_pairs=torch.empty(0, 2, dtype=torch.long))
    assert "collapse_std" not in byol.evaluate(model, data, "cpu")
    assert not [w for w in recwarn if "degrees of freedom" in str(w.message)]


# ----------------------------------------------------------------------------- 8-17: hangs and tracebacks


def test_8_a_fifo_named_like_an_image_is_not_read(tmp_path):
    data = make_tll(tmp_path / "tll", n=12)
    for side in ("left", "right"):
        os.mkfifo(data / side / "p099.jpg")
    assert "p099.jpg" not in byol.list_side(data, "left")  # listed, its read would wait forever
    (tmp_path / "other").mkdir()
    os.mkfifo(tmp_path / "other" / "fifo.png")
    assert byol.image_files(tmp_path / "other") == []
    assert byol.main(tiny_flags("byol", data, tmp_path / "run")) == 0


def full_disk_torch_save(real):
    def save(obj, f, *a, **k):
        real({"partial": torch.zeros(100)}, f)  # half a file, then the disk is full
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nmore detail")

    return save


def test_9_a_full_disk_in_torch_save_is_one_line_and_the_checkpoint_stays(tll, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    stopped_run(tll, out)
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(byol.torch, "save", full_disk_torch_save(torch.save))
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("byol.py: error:")]
    assert len(errors) == 1 and "unexpected pos" in errors[0] and "the checkpoint of epoch 1 is kept" in errors[0]
    assert (out / "last.pt").read_bytes() == before and not list(out.glob("*.tmp"))


def test_9_a_full_disk_writing_the_feature_cache_is_one_line(tll, tmp_path, capsys, monkeypatch):
    init = tmp_path / "w.pt"
    torch.save(conv4_weights(), init)
    monkeypatch.setattr(byol.torch, "save", full_disk_torch_save(torch.save))
    out = tmp_path / "run"
    assert byol.main(tiny_flags("byol", tll, out, extra=["--width", "8", "--init", str(init), "--freeze-encoder"])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("byol.py: error:")]
    assert len(err) == 1 and f"could not write {out / 'features.pt'}" in err[0]
    assert not (out / "features.pt").exists() and not list(out.glob("*.tmp"))


def test_9_a_full_disk_under_tensorboard_is_one_line(tll, tmp_path, capsys, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    class WriterError(Exception):  # not an OSError: TensorBoard's writer raises its own kinds
        pass

    def flush(self):
        raise WriterError("No space left on device")

    monkeypatch.setattr(SummaryWriter, "flush", flush)
    assert byol.main(tiny_flags("byol", tll, tmp_path / "run")) == 2
    one_line(capsys, "could not write the log", "No space left on device", "free space")


def failing_savez(real):
    def savez(f, **arrays):
        f.write(b"PK\x03\x04" + b"\0" * 4000)  # 4 KB of a zip, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    return savez


def failing_savefig(real):
    def savefig(self, fname, *a, **k):
        Path(fname).write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    return savefig


def test_9_a_full_disk_in_embed_export_search_and_eval_is_one_line_and_no_file(run, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    ckpt = run[0] / "last.pt"
    with monkeypatch.context() as m:
        m.setattr(ev.np, "savez", failing_savez(np.savez))
        evaluate(["embed", ckpt, run[1], "--out", tmp_path / "e.npz", *QUIET], capsys, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(ev.torch, "save", full_disk_torch_save(torch.save))
        evaluate(["export", ckpt, "--out", tmp_path / "enc.pt"], capsys, f"could not write {tmp_path / 'enc.pt'}")
    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", failing_savefig(matplotlib.figure.Figure.savefig))
        assert ev.main(["search", str(run[2]), "--index", "0", "--out", str(tmp_path / "s.png"), "--workers", "1"]) == 2
        assert "No space left on device" in capsys.readouterr().err
        evaluate([ckpt, "--out", tmp_path / "eval", "--workers", "1"], capsys, "No space left on device")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


def test_10_a_decompression_bomb_is_one_line(run, tll, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 24 px image claims more than twice that
    assert byol.main(tiny_flags("byol", tll, tmp_path / "run")) == 2
    one_line(capsys, "DecompressionBombError", "replace or remove")
    evaluate(["embed", "--baseline", "pixels", run[1], "--image-size", "16", "--out", tmp_path / "e.npz", *QUIET],
             capsys, "DecompressionBombError")
    query = sorted(run[1].iterdir())[0]
    evaluate(["search", run[2], "--query", query, "--out", tmp_path / "s.png", "--workers", "1"], capsys,
             "DecompressionBombError")


@pytest.mark.parametrize("size", [8, 15])
def test_11_conv4_below_16_px_is_one_line(size, tmp_path, capsys):
    out = tmp_path / "run"
    assert byol.main(["--image-size", str(size), "--out", str(out)]) == 2
    one_line(capsys, f"--image-size {size} is too small for conv4", "16 or more")
    assert not out.exists()


@pytest.mark.parametrize("mod", [byol, simsiam], ids=["byol", "simsiam"])
def test_12_batch_size_1_is_one_line(mod, tll, tmp_path, capsys):
    assert mod.main(tiny_flags(mod.METHOD, tll, tmp_path / "run", batch_size=1)) == 2
    one_line(capsys, "--batch-size 1", "batch norm", "2 or more")


@pytest.mark.parametrize("seed", ["-5", str(2**32)])
def test_13_seeds_numpy_cannot_take_are_one_line(seed, tmp_path, capsys):
    out = tmp_path / "run"
    assert byol.main(["--seed", seed, "--out", str(out)]) == 2
    one_line(capsys, f"--seed {seed}", "2**32")
    assert not out.exists()


def test_14_a_truncated_npz_is_one_line(run, tmp_path, capsys):
    cut = tmp_path / "cut.npz"
    cut.write_bytes(run[2].read_bytes()[:-200])
    evaluate(["search", cut, "--index", "0"], capsys, f"EMBEDDINGS {cut} is not a file of python eval.py embed")


def test_15_resume_after_a_half_written_log_line(tll, tmp_path):
    out = tmp_path / "run"
    stopped_run(tll, out)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "lo')  # killed while writing
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_16_out_an_existing_folder_is_one_line_before_the_work(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "embed_sources", lambda *a, **k: pytest.fail("embedded before checking --out"))
    evaluate(["embed", run[0] / "last.pt", run[1], "--out", tmp_path, *QUIET], capsys, f"--out {tmp_path} is a folder")
    evaluate(["export", run[0] / "last.pt", "--out", tmp_path], capsys, f"--out {tmp_path} is a folder")
    assert ev.main(["search", str(run[2]), "--index", "0", "--out", str(tmp_path / "x.xyz")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--out" in captured.err and ".png" in captured.err  # refused before printing


def test_17_a_feature_cache_that_is_not_a_dict_is_recomputed(tll, tmp_path, capsys):
    init = tmp_path / "w.pt"
    torch.save(conv4_weights(), init)
    out = tmp_path / "run"
    out.mkdir()
    torch.save([1, 2, 3], out / "features.pt")
    assert byol.main(tiny_flags("byol", tll, out, extra=["--width", "8", "--init", str(init), "--freeze-encoder"])) == 0
    assert "cached the frozen encoder's features" in capsys.readouterr().out


def test_17_an_npz_whose_meta_lacks_a_key_is_one_line(run, tmp_path, capsys):
    with np.load(run[2]) as f:
        arrays = dict(f)
    meta = json.loads(arrays["meta"].item())
    del meta["layer"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**arrays, "meta": np.array(json.dumps(meta))})
    evaluate(["search", bad, "--query", sorted(run[1].iterdir())[0]], capsys, f"EMBEDDINGS {bad} is not a file of")


# ----------------------------------------------------------------------------- 18-21: unclear messages


def test_18_ctrl_c_before_the_first_checkpoint_says_what_works(tll, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = byol.Logger.log

    def log(self, record):  # interrupted in epoch 1: the untrained record is logged, no checkpoint yet
        real(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(byol.Logger, "log", log)
    assert byol.main(tiny_flags("byol", tll, out)) == 130
    err = one_line(capsys, "interrupted", "no checkpoint was written yet", "run the same command again")
    assert "--resume" not in err and (out / "log.jsonl").exists() and not (out / "last.pt").exists()
    monkeypatch.undo()
    assert byol.main(tiny_flags("byol", tll, out)) == 0  # the same command: not "already holds a run"
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_19_a_run_stopped_between_evaluations_reports_the_last_one(tll, tmp_path, capsys):
    out = tmp_path / "run"
    assert byol.main(tiny_flags("byol", tll, out, epochs=4, extra=["--eval-every", "2", "--stop-after-epochs", "1"])) == 0
    printed = capsys.readouterr().out
    assert "no held-out quality metric" not in printed and "recall@1:" in printed
    assert "stopped before its first evaluation" in printed
    assert byol.main(["--resume", str(out / "last.pt"), "--no-progress", "--stop-after-epochs", "2"]) == 0
    printed = capsys.readouterr().out
    # The trained metric may or may not beat the pixels on tiny data; what must not appear is the holdout warning.
    assert "no held-out quality metric" not in printed and "trained (epoch 2, the last evaluation) vs" in printed


def test_19_a_single_class_is_not_told_to_raise_holdout(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=1, per_class=8)
    argv = ["--data", "folder", "--data-dir", str(root), "--image-size", "16", "--width", "8", "--hidden-dim", "16",
            "--proj-dim", "8", "--batch-size", "4", "--epochs", "1", "--out", str(tmp_path / "run"), *QUIET]
    assert byol.main(argv) == 0
    captured = capsys.readouterr()
    assert "raise --holdout" not in captured.out + captured.err
    assert "single class" in captured.err and "warning: no held-out quality metric" in captured.out


def test_20_search_finds_the_members_of_an_upper_case_zip(run, tmp_path, capsys):
    archive = tmp_path / "X.ZIP"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(run[1].iterdir()):
            z.write(p, p.name)
    npz = tmp_path / "x.npz"
    assert ev.main(["embed", "--baseline", "pixels", str(archive), "--image-size", "16", "--out", str(npz), *QUIET]) == 0
    capsys.readouterr()
    assert ev.main(["search", str(npz), "--index", "0", "--out", str(tmp_path / "s.png"), "--workers", "1"]) == 0
    hits = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert float(hits[0][1]) == pytest.approx(1.0) and hits[0][2].startswith(f"{archive}:")


def test_21_under_torchrun_every_rank_gets_the_refusal(tll, tmp_path):
    out = tmp_path / "run"
    stopped_run(tll, out)
    entry = tmp_path / "entry.py"
    entry.write_text(textwrap.dedent(f"""
        import os, sys
        sys.stderr = open(f"rank{{os.environ['RANK']}}.err", "w", buffering=1)  # each rank's own, tracebacks included
        sys.path.insert(0, {str(REPO)!r})
        import byol
        sys.exit(byol.main(sys.argv[1:]))
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(entry),
           *tiny_flags("byol", tll, out, extra=["--device", "cpu"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout[-2000:]
    for rank in (0, 1):
        err = (tmp_path / f"rank{rank}.err").read_text().strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"byol.py: error: --out {out} already holds a run"), err
