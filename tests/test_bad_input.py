"""Bad input ends in ONE line on stderr that names the flag or the file and the fix, exit 2, no traceback, and
nothing written (a run folder holds at most its .lock; a run it would replace is left whole).

In-process (`SCRIPT.main(argv)`; argparse's own errors raise SystemExit(2) after printing its usage block, which is
allowed above the one error line), and once as a user runs it, in a fresh process."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bn_only
import byol
import contrastive
import redundancy
import simsiam
import conftest

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    "byol": byol, "simsiam": simsiam, "bn_only": bn_only, "contrastive": contrastive, "redundancy": redundancy
}  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method, data_file, out):
    """conftest's smallest run, in one epoch, with nothing held out as test (the omniglot recipe's)."""
    return conftest.tiny(method, data_file, out, epochs=1, holdout=0)


def refused(module, argv, capsys):
    """main(argv) as `python SCRIPT.py argv` runs it (argparse names the program after sys.argv[0]): its exit code
    (argparse's SystemExit included) and its one error line."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [f"{module.METHOD}.py"])
        try:
            rc = module.main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{module.METHOD}.py: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    # argparse prints its usage first: "usage: ..." and its indented continuation lines, nothing else.
    before = lines[:-1]
    assert not before or (before[0].startswith("usage: ") and all(line.startswith(" ") for line in before[1:])), err
    return rc, errors[0]


def assert_untouched(out):
    assert not out.exists() or sorted(p.name for p in out.iterdir()) in ([], [".lock"]), sorted(out.iterdir())


# ----------------------------------------------------------------------------- the cases


def missing_file(tmp, data):
    return {"--data-file": tmp / "none.pt"}, [str(tmp / "none.pt"), "prepare.py"]


def not_a_dict(tmp, data):
    torch.save([1, 2, 3], tmp / "list.pt")
    return {"--data-file": tmp / "list.pt"}, [str(tmp / "list.pt"), "not a prepared data file", "prepare.py"]


def no_groups(tmp, data):
    torch.save({"images": torch.zeros(4, 3, 28, 28, dtype=torch.uint8)}, tmp / "nogroups.pt")
    return {"--data-file": tmp / "nogroups.pt"}, [str(tmp / "nogroups.pt"), "not a prepared data file", "prepare.py"]


def no_meta(tmp, data):
    """A file with images and groups but not the rest of the format (kind, group_names, meta)."""
    torch.save(
        {"images": torch.zeros(8, 3, 28, 28, dtype=torch.uint8), "groups": torch.arange(8).view(4, 2)},
        tmp / "nometa.pt",
    )
    return {"--data-file": tmp / "nometa.pt"}, [str(tmp / "nometa.pt"), "not a prepared data file", "prepare.py"]


def numpy_images(tmp, data):
    """A pickle that torch.load(weights_only=True) refuses, with its many-line explanation."""
    torch.save({"images": np.zeros((4, 3, 28, 28), np.uint8), "groups": torch.zeros(1, 4)}, tmp / "numpy.pt")
    return {"--data-file": tmp / "numpy.pt"}, [str(tmp / "numpy.pt"), "not a prepared data file", "prepare.py"]


def text_file(tmp, data):
    (tmp / "notes.txt").write_text("left,right\na.png,b.png\n")
    return {"--data-file": tmp / "notes.txt"}, [str(tmp / "notes.txt"), "not a prepared data file", "prepare.py"]


def wrong_image_size(tmp, data):
    return {"--image-size": "32"}, [f"--data-file {data} holds 28 px images", "pass --image-size 28"]


def everything_held_out(tmp, data):
    return {"--holdout": "0.99"}, [str(data), "no training images after the hold-out", "lower --holdout"]


def batch_larger_than_data(tmp, data):
    return {"--batch-size": "100"}, ["--batch-size 100", "45 training anchors", "change it"]


def per_group_not_dividing(tmp, data):
    return {"--per-group": "3"}, ["--per-group 3 with --batch-size 8", "divide"]


def per_group_one_group_a_batch(tmp, data):
    """K = the batch: one group a batch, so no negatives at all (contrastive.py's loss would be 0)."""
    return {"--per-group": "8"}, ["--per-group 8", "--batch-size 8", "2 groups"]


def not_a_model(tmp, data):
    return {"--arch": "resnet7"}, ["--arch resnet7", "Unknown model"]


def pretrained_conv4(tmp, data):
    return {"--pretrained": None}, ["--pretrained", "conv4 has no ImageNet weights", "--no-pretrained"]


def out_is_a_file(tmp, data):
    (tmp / "a-file").write_text("x")
    return {"--out": tmp / "a-file" / "run"}, [f"--out {tmp / 'a-file' / 'run'}", "pass another --out"]


def no_cuda(tmp, data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return {"--device": "cuda"}, ["--device cuda", "--device cpu"]


def not_a_device(tmp, data):
    return {"--device": "gpu0"}, ["--device gpu0", "cpu"]


def resume_missing(tmp, data):
    return {"--resume": tmp / "none.pt"}, [str(tmp / "none.pt"), "not a readable checkpoint", "check the path"]


def resume_garbage(tmp, data):
    (tmp / "bad.pt").write_bytes(b"\x00garbage" * 100)
    return {"--resume": tmp / "bad.pt"}, [str(tmp / "bad.pt"), "not a readable checkpoint", "check the path"]


def resume_folder_without_checkpoints(tmp, data):
    (tmp / "empty-run").mkdir()
    return {"--resume": tmp / "empty-run"}, [str(tmp / "empty-run"), "not a readable checkpoint", "check the path"]


def resume_other_method(tmp, data):
    run = tmp / "theirs"
    assert simsiam.main(tiny("simsiam", data, run)) == 0
    return {"--resume": run / "last.pt"}, [f"--resume {run / 'last.pt'} is a simsiam run", "resume it with simsiam.py"]


DATA_CASES = {
    f.__name__: f
    for f in [
        missing_file,
        not_a_dict,
        no_groups,
        no_meta,
        numpy_images,
        text_file,
        wrong_image_size,
        everything_held_out,
        batch_larger_than_data,
        per_group_not_dividing,
        per_group_one_group_a_batch,
        not_a_model,
        pretrained_conv4,
        out_is_a_file,
        no_cuda,
        not_a_device,
        resume_missing,
        resume_garbage,
        resume_folder_without_checkpoints,
        resume_other_method,
    ]
}


def argv_of(changes, data, out):
    """tiny()'s flags with `changes` applied (a flag set to None: given alone); --resume alone when resuming."""
    if "--resume" in changes:
        return ["--resume", changes["--resume"], "--no-progress"]
    argv, flags = tiny("byol", data, out), dict(changes)
    for i, a in enumerate(argv):
        if a in flags:
            argv[i + 1] = flags.pop(a)
    return argv + [x for flag, value in flags.items() for x in ([flag] if value is None else [flag, value])]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_and_settings_are_one_line(case, classes_file, tmp_path, capsys):
    changes, needles = DATA_CASES[case](tmp_path, classes_file)
    capsys.readouterr()
    out = tmp_path / "run"
    rc, line = refused(byol, argv_of(changes, classes_file, out), capsys)
    assert rc == 2
    for needle in needles:
        assert needle in line, (needle, line)
    assert_untouched(out)


BAD_VALUES = [  # (script, flags, what the line names)
    ("byol", ["--lr", "0"], "--lr"),
    ("byol", ["--lr", "nan"], "--lr"),
    ("byol", ["--holdout", "1.5"], "--holdout"),
    ("byol", ["--val-fraction", "-0.1"], "--val-fraction"),
    ("byol", ["--width", "1", "2"], "--width"),
    ("byol", ["--width", "0"], "--width"),
    ("byol", ["--eval-shift", "14"], "--eval-shift"),  # half of the 28 px images
    ("byol", ["--eval-shift", "-1"], "--eval-shift"),
    ("byol", ["--crop-size", "8"], "--crop-size"),
    ("byol", ["--image-size", "8"], "--image-size"),
    ("byol", ["--image-size", "100000"], "--image-size"),
    ("byol", ["--batch-size", "1"], "--batch-size"),
    ("byol", ["--epochs", "0"], "--epochs"),
    ("byol", ["--seed", "-5"], "--seed"),
    ("byol", ["--seed", str(2**32)], "--seed"),
    ("byol", ["--stop-after-epochs", "0"], "--stop-after-epochs"),
    ("byol", ["--eval-every", "0"], "--eval-every"),
    ("byol", ["--patience", "-1"], "--patience"),
    ("byol", ["--per-group", "-1"], "--per-group"),
    ("byol", ["--rotation", "-1"], "--rotation"),
    ("byol", ["--shear", "90"], "--shear"),
    ("byol", ["--stroke", "1.5"], "--stroke"),
    ("byol", ["--crop-min-scale", "0"], "--crop-min-scale"),
    ("byol", ["--flip-prob", "2"], "--flip-prob"),
    ("byol", ["--solarize-prob", "nan"], "--solarize-prob"),
    ("byol", ["--base-tau", "1.5"], "--base-tau"),
    ("byol", ["--hidden-dim", "0"], "--hidden-dim"),
    ("byol", ["--optimizer", "lars"], "--optimizer"),  # LARS was cut: sgd or adamw
    ("byol", ["--bn-stats", "both"], "--bn-stats"),
    ("byol", ["--bogus"], "--bogus"),
    ("simsiam", ["--pred-dim", "0"], "--pred-dim"),
    ("bn_only", ["--bn-placement", "output"], "--bn-placement"),
    ("contrastive", ["--temperature", "0"], "--temperature"),
    ("contrastive", ["--margin", "-1"], "--margin"),
    ("contrastive", ["--mining", "hardest"], "--mining"),
    ("redundancy", ["--loss", "simclr"], "--loss"),
]


@pytest.mark.parametrize("name,flags,needle", BAD_VALUES, ids=[f"{n} {' '.join(f)}" for n, f, _ in BAD_VALUES])
def test_bad_values_are_refused_before_anything_runs(name, flags, needle, classes_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc, line = refused(MODULES[name], [*tiny(name, classes_file, out), *flags], capsys)
    assert rc == 2 and needle in line, line
    assert not out.exists()


@pytest.mark.parametrize("flag", sorted(byol.REMOVED))
def test_removed_flags_are_refused_naming_what_changed(flag, classes_file, tmp_path, capsys):
    out = tmp_path / "run"
    for argv in ([*tiny("byol", classes_file, out), flag, "1"], [*tiny("byol", classes_file, out), f"{flag}=1"]):
        rc, line = refused(byol, argv, capsys)
        assert rc == 2, f"exit {rc!r}"
        assert line == f"byol.py: error: {flag} was removed: {byol.REMOVED[flag]}"
    assert not out.exists()


def test_every_script_refuses_the_same_removed_flags():
    assert all(m.REMOVED == byol.REMOVED for m in MODULES.values())
    assert set(byol.REMOVED) >= {
        "--freeze-encoder",
        "--pca-dim",
        "--pool-stages",
        "--freeze-stages",
        "--labels",
        "--init",
        "--workers",
        "--stem",
        "--weight-decay",
        "--warmup-epochs",
        "--log-every",
        "--reference-kernels",
    }


@pytest.mark.parametrize("name", MODULES)
def test_errors_name_their_own_script(name, tmp_path, capsys):
    out = tmp_path / "run"
    rc, line = refused(MODULES[name], tiny(name, tmp_path / "none.pt", out), capsys)
    assert rc == 2 and line.startswith(f"{name}.py: error: --data-file {tmp_path / 'none.pt'}")
    assert_untouched(out)


def test_bad_input_never_costs_the_run_it_would_replace(classes_file, tmp_path, capsys):
    """--overwrite with a typo in the data: the old run must still be there when the new one is refused."""
    out = tmp_path / "run"
    assert byol.main(tiny("byol", classes_file, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for changes in ({"--data-file": tmp_path / "typo.pt"}, {"--batch-size": "100"}, {"--arch": "resnet7"}):
        rc, _ = refused(byol, argv_of({**changes, "--overwrite": None}, classes_file, out), capsys)
        assert rc == 2
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, f"{changes}: the old run is gone"


def test_a_user_sees_one_line_and_exit_2_in_a_fresh_process(classes_file, tmp_path):
    """As a user runs them: a removed flag (refused before argparse), and a missing file (after it)."""
    runs = {
        name: subprocess.Popen(
            [sys.executable, "byol.py", *tiny("byol", data, tmp_path / name), *extra],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, data, extra in [
            ("removed", classes_file, ["--freeze-encoder"]),
            ("missing", tmp_path / "none.pt", []),
        ]
    }
    for name, p in runs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and out == "" and len(err.strip().splitlines()) == 1, (name, p.returncode, err)
        assert err.startswith("byol.py: error: ") and "Traceback" not in err
        assert_untouched(tmp_path / name)
