"""The training scripts' shared machinery, run on tiny prepared data files (tests/conftest.py writes them): a run's
log and checkpoints, best.pt and early stopping, exact --resume and what it refuses, run folders that are never
overwritten or shared, atomic checkpoints, the split and the batches it feeds, the augmentation, DDP on two CPU
processes, divergence, and each script as a user runs it.

Runs are in-process (SCRIPT.main(argv)) unless the test is about the process itself: the divergence message, and
each script run once as `python SCRIPT.py ...`. Tiny: conv4 of width 8 on 28 px images, 2 epochs of 5 steps."""

import contextlib
import fcntl
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bn_only
import byol
import contrastive
import redundancy
import simsiam
from conftest import tiny

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    "byol": byol, "simsiam": simsiam, "bn_only": bn_only, "contrastive": contrastive, "redundancy": redundancy
}  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(module, argv):
    """module.main(argv) with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def log_of(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def untimed(records):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def tensors_in(obj, prefix=""):
    """Every tensor nested in dicts and lists, as {path: tensor}."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors_in(value, f"{prefix}/{key}").items()}


def same_tensors(a, b):
    ta, tb = tensors_in(a), tensors_in(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def error_line(err, script="byol"):
    """The one line of a refusal: nothing else on stderr, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- a run, stopped and resumed


@pytest.fixture(scope="module", params=list(MODULES))
def runs(request, classes_file, tmp_path_factory, one_thread):
    """Per script, three runs: "straight" 2 epochs; "stopped" the same with --stop-after-epochs 1 (its files kept
    as they were then, "stopped1"); "resumed" that one continued with --resume."""
    name = request.param
    base = tmp_path_factory.mktemp(name)
    r = {"name": name, "module": MODULES[name], "base": base}
    r["straight"] = run_main(MODULES[name], tiny(name, classes_file, base / "straight"))
    r["stopped"] = run_main(MODULES[name], tiny(name, classes_file, base / "stopped", "--stop-after-epochs", "1"))
    shutil.copytree(base / "stopped", base / "stopped1")
    r["resumed"] = run_main(MODULES[name], ["--resume", base / "stopped" / "last.pt", "--no-progress"])
    return r


def test_a_run_logs_every_epoch_and_its_baselines(runs):
    rc, printed, err = runs["straight"]
    assert rc == 0 and "Traceback" not in err, err
    records = log_of(runs["base"] / "straight")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    first = records[0]
    assert first["metric"] == "val_r_precision"  # classes: R-Precision of the validation classes
    for key in ("val_r_precision", "pixels_val_r_precision", "collapse_std", "healthy_std", "effective_rank"):
        assert isinstance(first[key], float) and math.isfinite(first[key]), key
    assert "loss" not in first
    for r in records[1:]:
        for key in ("loss", "lr", "images_per_s", "val_r_precision", "collapse_std", "effective_rank"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert ("tau" in r) == (runs["name"] == "byol")
    assert records[2]["lr"] == pytest.approx(0.0, abs=1e-12)  # the end of the cosine
    if runs["name"] == "byol":
        assert records[1]["tau"] < records[2]["tau"] == pytest.approx(1.0)
    # The summary: best.pt's validation against the strongest baseline, and where the test split is.
    assert f"run directory: {runs['base'] / 'straight'}" in printed
    assert "val_r_precision: " in printed and "the strongest baseline" in printed
    assert f"python eval.py {runs['base'] / 'straight'}" in printed


def test_checkpoints_are_written_and_load_checkpoint_reads_them(runs, tmp_path):
    out, module = runs["base"] / "straight", runs["module"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best.pt", "last.pt", "log.jsonl"]
    last, best = module.load_checkpoint(out / "last.pt"), module.load_checkpoint(out)  # a run folder: its best.pt
    assert same_tensors(best["model"], load(out / "best.pt")["model"])
    shutil.copy(out / "last.pt", tmp_path / "last.pt")  # a run folder without best.pt (no validation): its last.pt
    assert same_tensors(module.load_checkpoint(tmp_path)["model"], last["model"])
    assert last["format"] == best["format"] == module.FORMAT and last["method"] == runs["name"]
    assert last["epoch"] == 2 and last["step"] == 10  # 40 training anchors (8 classes of 5), batches of 8
    history = untimed(last["history"])
    scored = [r["val_r_precision"] for r in history]
    assert best["epoch"] == max(range(3), key=lambda e: (scored[e], -e))  # the first of the best, the start included
    assert best["stopping"]["best"] == scored[best["epoch"]]
    assert any(k.startswith("encoder.") for k in last["model"]) and any(
        k.startswith("projector.") for k in last["model"]
    )
    assert any(k.startswith("target_encoder.") for k in last["model"]) == (runs["name"] == "byol")
    assert last["optimizer"]["state"] and last["scheduler"]["last_epoch"] == 10
    assert last["args"]["epochs"] == 2 and last["args"]["out"] == str(out)
    json.dumps(last["args"])  # plain values: readable without the scripts' classes
    for name in ("last.pt", "best.pt"):  # the model loads into the script's own network
        args = SimpleNamespace(**load(out / name)["args"])
        module.build_model(args).load_state_dict(load(out / name)["model"])


def test_resume_continues_exactly(runs):
    """2 epochs straight == 1 epoch, stop, --resume, 1 epoch: every tensor and every log record the same."""
    for k in ("stopped", "resumed"):
        assert runs[k][0] == 0, runs[k][2]
    assert "epoch=1 " in runs["stopped"][1] and "epoch=2 " not in runs["stopped"][1]
    assert "epoch=2 " in runs["resumed"][1] and "epoch=0 " not in runs["resumed"][1]  # no new start, no epoch 1
    straight, resumed = (load(runs["base"] / k / "last.pt") for k in ("straight", "stopped"))
    assert straight["epoch"] == resumed["epoch"] == 2 and straight["step"] == resumed["step"]
    assert same_tensors(straight["model"], resumed["model"])
    assert same_tensors(straight["optimizer"], resumed["optimizer"])
    assert straight["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]
    assert straight["scheduler"] == resumed["scheduler"] and straight["stopping"] == resumed["stopping"]
    assert untimed(straight["history"]) == untimed(resumed["history"])
    assert untimed(log_of(runs["base"] / "straight")) == untimed(log_of(runs["base"] / "stopped"))
    best = [load(runs["base"] / k / "best.pt") for k in ("straight", "stopped")]
    assert best[0]["epoch"] == best[1]["epoch"] and same_tensors(best[0]["model"], best[1]["model"])
    # And the second epoch did move the weights.
    assert not same_tensors(load(runs["base"] / "stopped1" / "last.pt")["model"], resumed["model"])


def test_a_resumed_run_writes_beside_its_checkpoint_from_any_folder(runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs["base"] / "stopped1", run)
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main(runs["module"], ["--resume", "run/last.pt", "--no-progress"])
    assert rc == 0, err
    assert load(run / "last.pt")["epoch"] == 2 and [r["epoch"] for r in log_of(run)] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no runs/ folder, nothing beside


def test_resume_drops_the_log_records_of_a_killed_invocation(runs, tmp_path):
    """Killed after logging epoch 2 and before its checkpoint: the resumed run logs epoch 2 once."""
    run = tmp_path / "run"
    shutil.copytree(runs["base"] / "stopped1", run)
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 9.0}) + "\n")
    rc, _, err = run_main(runs["module"], ["--resume", run / "last.pt", "--no-progress"])
    assert rc == 0, err
    assert untimed(log_of(run)) == untimed(log_of(runs["base"] / "straight"))


def test_resume_after_a_half_written_log_line(classes_file, tmp_path):
    """Killed while writing a record: its half line is dropped like a whole one, not a JSONDecodeError."""
    run = tmp_path / "run"
    assert run_main(byol, tiny("byol", classes_file, run, "--stop-after-epochs", "1"))[0] == 0
    with open(run / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "lo')
    rc, _, err = run_main(byol, ["--resume", run / "last.pt", "--no-progress"])
    assert rc == 0, err
    assert [r["epoch"] for r in log_of(run)] == [0, 1, 2]


def test_cpu_bf16_autocasts_the_step_on_the_cpu_for_this_invocation(classes_file, tmp_path, monkeypatch):
    """--cpu-bf16: the step's forward under bf16 autocast on the CPU, fp32 without it; like --device, it belongs to
    the invocation, so a resumed run takes it from the command that resumes it."""
    autocast = []
    forward = byol.BYOL.forward
    monkeypatch.setattr(byol.BYOL, "forward", lambda self, *v: autocast.append(torch.is_autocast_enabled("cpu"))
                        or forward(self, *v))  # fmt: skip
    run = tmp_path / "run"
    assert run_main(byol, tiny("byol", classes_file, run, "--stop-after-epochs", "1", "--cpu-bf16"))[0] == 0
    steps = len(autocast)
    assert steps and all(autocast) and byol.load_checkpoint(run / "last.pt")["args"]["cpu_bf16"]
    assert run_main(byol, ["--resume", run / "last.pt", "--no-progress"])[0] == 0
    assert len(autocast) == 2 * steps and not any(autocast[steps:])


def test_resume_refuses_changed_data(make_data, tmp_path):
    data, run = make_data(), tmp_path / "run"
    assert run_main(byol, tiny("byol", data, run, "--stop-after-epochs", "1"))[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    original = torch.load(data, weights_only=True)
    other = torch.load(make_data(seed=1), weights_only=True)  # other images (prepare.py's key changes with them)
    torch.save({**original, "images": other["images"], "meta": other["meta"]}, data)
    rc, _, err = run_main(byol, ["--resume", run / "last.pt", "--no-progress"])
    assert rc == 2
    assert "the data changed since the run began" in error_line(err) and "start anew" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize(
    "flag", [["--epochs", "5"], ["--lr", "0.5"], ["--data-file", "x.pt"], ["--out", "x"], ["--seed", "1"]]
)
def test_resume_refuses_the_flags_it_would_ignore(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # refused before the checkpoint is read
        byol.main(["--resume", str(tmp_path / "run" / "last.pt"), "--no-progress", *flag])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1] and "Traceback" not in err
    assert f"drop {flag[0]}" in errors[0] and "its own settings" in errors[0]


def test_old_layout_checkpoints_are_refused_in_one_line(tmp_path):
    """A checkpoint of the scripts before prepare.py: a dict without "format"."""
    old = tmp_path / "run" / "last.pt"
    old.parent.mkdir()
    torch.save({"method": "byol", "epoch": 1, "args": {"data": "tll"}, "model": {}}, old)
    with pytest.raises(byol.UserError, match="before prepare.py"):
        byol.load_checkpoint(old)
    rc, _, err = run_main(byol, ["--resume", old, "--no-progress"])
    assert rc == 2
    line = error_line(err)
    assert str(old) in line and "retrain it" in line and "git checkout a716684" in line
    assert sorted(p.name for p in old.parent.iterdir()) == ["last.pt"]


# ----------------------------------------------------------------------------- best.pt and early stopping


def scripted_validation(monkeypatch, values):
    """byol.score gives the trained network's validation `values` in turn (the start's first); the raw pixels'
    score stays real."""
    real, given = byol.score, iter(values)

    def score(model, data, part, args, device):
        name, value = real(model, data, part, args, device)
        return (name, value) if isinstance(model, nn.ModuleDict) else (name, next(given))

    monkeypatch.setattr(byol, "score", score)


def test_the_start_competes_for_best_pt_and_patience_counts_from_the_best_trained_epoch(
    classes_file, tmp_path, monkeypatch
):
    """Validation that never comes back to the start's: best.pt stays the network the run began with. Patience
    counts from the best trained evaluation, so the climb after epoch 1 is not cut short by the start's score."""
    scripted_validation(monkeypatch, [0.9, 0.5, 0.6, 0.7])
    out = tmp_path / "run"
    rc, printed, err = run_main(byol, tiny("byol", classes_file, out, "--patience", "1", epochs=3))
    assert rc == 0, err
    best, last = load(out / "best.pt"), load(out / "last.pt")
    assert best["epoch"] == 0 and last["epoch"] == 3 and not last["stopping"]["stopped"]
    assert last["stopping"]["best"] == 0.9 and last["stopping"]["best_epoch"] == 0
    assert last["stopping"]["trained_best"] == 0.7 and last["stopping"]["stale"] == 0
    torch.manual_seed(0)  # the run's seed: the weights it began with
    start = byol.build_model(byol.parse_args(tiny("byol", classes_file, out))).state_dict()
    assert same_tensors(best["model"], start)
    assert "val_r_precision: 0.900 best.pt (epoch 0 of 3)" in printed


def test_patience_stops_the_run_and_a_resumed_stopped_run_trains_no_more(classes_file, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.6, 0.55, 0.58, 0.9, 0.95])
    out = tmp_path / "run"
    rc, printed, err = run_main(byol, tiny("byol", classes_file, out, "--patience", "2", epochs=5))
    assert rc == 0, err
    last = load(out / "last.pt")
    assert last["epoch"] == 3 and last["stopping"]["stopped"] and last["stopping"]["stale"] == 2
    assert [r["epoch"] for r in log_of(out)] == [0, 1, 2, 3] and load(out / "best.pt")["epoch"] == 1
    assert "val_r_precision: 0.600 best.pt (epoch 1 of 5)" in printed
    before = (out / "last.pt").read_bytes()
    rc, _, err = run_main(byol, ["--resume", out / "last.pt", "--no-progress"])
    assert rc == 0 and (out / "last.pt").read_bytes() == before and len(log_of(out)) == 4, err


def test_eval_every_validates_on_its_epochs_and_the_last(classes_file, tmp_path):
    out = tmp_path / "run"
    assert run_main(byol, tiny("byol", classes_file, out, "--eval-every", "2", epochs=3))[0] == 0
    assert [("val_r_precision" in r) for r in log_of(out)] == [True, False, True, True]


# ----------------------------------------------------------------------------- run folders


def test_a_new_run_never_replaces_another_without_overwrite(classes_file, tmp_path):
    out = tmp_path / "run"
    assert run_main(byol, tiny("byol", classes_file, out, epochs=1))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = run_main(byol, tiny("byol", classes_file, out, "--seed", "5", epochs=1))
    assert rc == 2
    line = error_line(err)
    assert f"--out {out} holds a run" in line and f"--resume {out / 'last.pt'}" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc, _, err = run_main(byol, tiny("byol", classes_file, out, "--seed", "5", "--overwrite", epochs=1))
    assert rc == 0, err
    assert [r["epoch"] for r in log_of(out)] == [0, 1]  # the old run's records are gone, not mixed in
    assert load(out / "last.pt")["args"]["seed"] == 5


def hold_lock(folder):
    """Another process that holds the folder's lock, as a running run does, until it is killed."""
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_folder_in_use_is_refused(classes_file, tmp_path):
    first = tmp_path / "first"
    assert run_main(byol, tiny("byol", classes_file, first, "--stop-after-epochs", "1"))[0] == 0
    out = tmp_path / "run"
    shutil.copytree(first, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = hold_lock(out)
    try:
        for argv in (tiny("byol", classes_file, out, "--overwrite"), ["--resume", out / "last.pt", "--no-progress"]):
            rc, _, err = run_main(byol, argv)
            assert rc == 2
            line = error_line(err)
            assert f"--out {out}" in line and "another run uses it" in line and "pass another --out" in line
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()
    assert run_main(byol, ["--resume", out / "last.pt", "--no-progress"])[0] == 0  # the OS freed the lock


def test_a_run_holds_its_folder_while_it_runs_and_frees_it_when_it_returns(classes_file, tmp_path, monkeypatch):
    out, seen = tmp_path / "run", []
    real = byol.load_data

    def load_data(args):  # while the run runs, its folder is locked
        with open(out / ".lock", "a") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(True)
        return real(args)

    monkeypatch.setattr(byol, "load_data", load_data)
    assert run_main(byol, tiny("byol", classes_file, out, epochs=1))[0] == 0 and seen
    # Returned: another process (a resume in a terminal beside a notebook) may take the folder.
    code = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    probe = subprocess.run(
        [sys.executable, "-c", code, str(out / ".lock")], capture_output=True, text=True, check=False
    )
    assert probe.returncode == 0, f"main() returned and still holds {out}: {probe.stderr.splitlines()[-1:]}"


# ----------------------------------------------------------------------------- atomic checkpoints


def failing_save(real):
    def save(obj, f, *args, **kwargs):
        real({"partial": torch.zeros(1000)}, f)  # half a file on disk, then the disk is full
        raise OSError(28, "No space left on device")

    return save


def test_save_atomic_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    byol.save_atomic({"epoch": 1, "w": torch.arange(5)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.setattr(torch, "save", failing_save(torch.save))
    with pytest.raises(OSError):
        byol.save_atomic({"epoch": 2, "w": torch.arange(7)}, path)
    with pytest.raises(OSError):
        byol.save_atomic({"epoch": 2}, tmp_path / "new.pt")
    monkeypatch.undo()
    kept = load(path)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no .tmp, no half new.pt


@pytest.fixture
def full_disk_resume(classes_file, tmp_path, monkeypatch):
    """A run stopped after epoch 1, resumed while every torch.save fails halfway: (out, last.pt's bytes before,
    what main returned or raised, stderr)."""
    out = tmp_path / "run"
    assert run_main(byol, tiny("byol", classes_file, out, "--stop-after-epochs", "1"))[0] == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    monkeypatch.setattr(torch, "save", failing_save(torch.save))
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            result = byol.main(["--resume", str(out / "last.pt"), "--no-progress"])
    except OSError as e:
        result = e
    monkeypatch.undo()
    return out, before, result, err.getvalue()


def test_a_failed_checkpoint_save_keeps_the_last_one(full_disk_resume):
    out, before, result, _ = full_disk_resume
    assert result != 0, "the save failed: the run must not end as a success"
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob("*.tmp"))


def test_a_full_disk_is_one_line_naming_the_kept_checkpoint(full_disk_resume):
    out, _, result, err = full_disk_resume
    assert result == 2, f"main() ended in {result!r} instead of one line and exit 2"
    line = error_line(err)
    assert "No space left on device" in line and f"--resume {out / 'last.pt'}" in line


# ----------------------------------------------------------------------------- the split


def old_split(num_groups, holdout, val_fraction, seed):
    """byol.py's split before prepare.py (git show a716684:byol.py: split_items, then carve_validation), transcribed:
    (train, validation, test) group indices."""
    order = torch.randperm(num_groups, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = round(num_groups * holdout) if num_groups > 1 else 0
    train, test = sorted(order[n_test:]), sorted(order[:n_test])
    n_val = max(2, round(len(train) * val_fraction)) if val_fraction > 0 else 0
    if n_val == 0 or len(train) - n_val < 2:
        return train, [], test
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 2)).tolist()
    return sorted(train[i] for i in order[n_val:]), sorted(train[i] for i in order[:n_val]), test


def data_args(path, holdout=0.2, val_fraction=0.0, seed=0, pairs="natural", image_size=28):
    return SimpleNamespace(
        data_file=path,
        data="omniglot",
        image_size=image_size,
        holdout=holdout,
        val_fraction=val_fraction,
        seed=seed,
        pairs=pairs,
    )


@pytest.fixture(scope="module")
def files(make_data):
    """files(kind, groups) -> a prepared file of 8 px images, written once."""
    made = {}

    def get(kind, groups):
        if (kind, groups) not in made:
            made[kind, groups] = make_data(kind=kind, groups=groups, per_group=3, size=8)
        return made[kind, groups]

    return get


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["classes", "pairs", "images"]),
    groups=st.sampled_from([2, 3, 7, 20, 41]),
    holdout=st.sampled_from([0.0, 0.2, 0.5]),
    val_fraction=st.sampled_from([0.0, 0.1, 0.25]),
    pairs=st.sampled_from(["natural", "aug"]),
    seed=st.integers(0, 2**20),
)
def test_the_split_is_by_group_seeded_and_the_old_one(files, kind, groups, holdout, val_fraction, pairs, seed):
    path = files(kind, groups)
    data = byol.load_data(data_args(path, holdout, val_fraction, seed, pairs, image_size=8))
    assert (data.train, data.val, data.test) == old_split(groups, holdout, val_fraction, seed)
    assert sorted(data.train + data.val + data.test) == list(range(groups))
    # No image of a held-out group (validation or test) is ever a training anchor, or a training positive.
    held = data.groups[data.val + data.test]
    trained = set(data.anchors.tolist()) | set(data.rows[data.rows >= 0].tolist())
    assert not trained & set(held[held >= 0].tolist())
    rows = data.groups[data.train]
    natural_pairs = kind == "pairs" and pairs == "natural" and data.kind == "pairs"
    assert sorted(data.anchors.tolist()) == sorted((rows[:, 0] if natural_pairs else rows[rows >= 0]).tolist())
    assert data.split == {"val": [f"{kind[0]}{i}" for i in data.val], "test": [f"{kind[0]}{i}" for i in data.test]}
    again = byol.load_data(data_args(path, holdout, val_fraction, seed, pairs, image_size=8))
    assert (again.train, again.val, again.test) == (data.train, data.val, data.test)


def test_another_seed_holds_out_other_groups(classes_file):
    splits = {tuple(byol.load_data(data_args(classes_file, 0.25, 0.25, seed)).test) for seed in range(4)}
    assert len(splits) > 1


def test_a_files_own_test_split_is_kept(make_data):
    test = torch.zeros(12, dtype=torch.bool)
    test[[1, 5, 6]] = True
    data = byol.load_data(data_args(make_data(test=test), holdout=0.5, seed=3))
    assert data.test == [1, 5, 6] and data.train == [i for i in range(12) if i not in (1, 5, 6)]


def test_unlabelled_images_train_on_two_views_of_each_image(images_file):
    args = data_args(images_file, 0.2)
    data = byol.load_data(args)
    assert args.pairs == "aug" and data.kind == "images" and len(data.anchors) == 48 and (data.sizes == 1).all()


# ----------------------------------------------------------------------------- batches


def coded(data):
    """A copy of data whose image i holds its own index in its first pixel (channel 0: i % 256, 1: i // 256)."""
    n = len(data.images)
    images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 1, 0, 0] = torch.arange(n) % 256, torch.arange(n) // 256
    return SimpleNamespace(**{**vars(data), "images": images})


def decoded(x):
    return x[:, 0, 0, 0].long() + 256 * x[:, 1, 0, 0].long()


def epoch_pairs(data, epoch, batch_size=8, seed=0, world=1, rank=0, per_group=0):
    """(first, second, groups) of every pair the training loop draws in `epoch` (rank's share)."""
    code = coded(data)
    order = byol.epoch_order(data, seed, epoch, batch_size, per_group)
    steps = len(order) // batch_size
    parts = [
        list(byol.make_pair_batch(code, order, s, batch_size, rank, world, seed, epoch * steps + s, "cpu"))
        for s in range(steps)
    ]
    return (
        torch.cat([decoded(p[0]) for p in parts]),
        torch.cat([decoded(p[1]) for p in parts]),
        torch.cat([p[2] for p in parts]),
    )


def group_of_image(data):
    """Every grouped image's group index in the file."""
    owner = torch.full((len(data.images),), -1)
    rows = data.groups
    owner[rows[rows >= 0]] = torch.arange(len(rows))[:, None].expand_as(rows)[rows >= 0]
    return owner


def test_a_pairs_second_image_is_another_member_of_the_anchors_group(classes_file):
    data = byol.load_data(data_args(classes_file, 0.25))
    owner, partners = group_of_image(data), {}
    for epoch in range(4):
        first, second, groups = epoch_pairs(data, epoch)
        assert len(first) == 40 and len(set(first.tolist())) == 40  # 5 whole batches of the 45 anchors, each once
        assert set(first.tolist()) <= set(data.anchors.tolist())
        assert (first != second).all() and torch.equal(owner[first], owner[second])
        assert torch.equal(groups, owner[first])  # the group handed to a method with negatives: the class
        for a, b in zip(first.tolist(), second.tolist()):
            partners.setdefault(a, set()).add(b)
    assert max(len(p) for p in partners.values()) >= 3  # drawn at random among the other members
    assert not torch.equal(epoch_pairs(data, 0)[0], epoch_pairs(data, 1)[0])  # a fresh order each epoch


def test_a_natural_pair_is_the_left_image_and_its_right(pairs_file):
    data = byol.load_data(data_args(pairs_file, 0.2))
    first, second, groups = epoch_pairs(data, 0)
    assert len(first) == 16 and (first < 20).all() and torch.equal(second, first + 20)
    assert torch.equal(groups, first)  # a pair's group: the pair itself


@pytest.mark.parametrize("which", ["classes", "pairs"])
def test_pairs_aug_makes_each_anchor_its_own_positive(which, classes_file, pairs_file):
    path = {"classes": classes_file, "pairs": pairs_file}[which]
    data = byol.load_data(data_args(path, 0.2, pairs="aug"))
    first, second, _ = epoch_pairs(data, 0)
    assert torch.equal(first, second)
    grouped = data.groups[data.train]
    assert sorted(data.anchors.tolist()) == sorted(grouped[grouped >= 0].tolist())  # both sides of a pair anchor


def test_ranks_draw_their_shares_of_the_one_process_batch(classes_file):
    """2 processes with a global batch of 8 draw the very pairs that 1 process draws: rank r the r-th half."""
    data = byol.load_data(data_args(classes_file, 0.25))
    one = epoch_pairs(data, 1)
    ranks = [epoch_pairs(data, 1, world=2, rank=r) for r in (0, 1)]
    for i in range(3):
        assert torch.equal(torch.stack([ranks[0][i].view(-1, 4), ranks[1][i].view(-1, 4)], 1).flatten(), one[i])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_per_group_puts_k_anchors_of_each_group_in_a_batch(k, classes_file):
    data = byol.load_data(data_args(classes_file, 0.0))
    first, _, groups = epoch_pairs(data, 2, per_group=k)
    assert len(first) >= 8
    for b in groups.view(-1, 8):
        counts = torch.bincount(b)
        assert set(counts[counts > 0].tolist()) == {k}  # k of each group it holds: 8 / k groups
    assert torch.equal(groups, group_of_image(data)[first])
    assert not torch.equal(epoch_pairs(data, 3, per_group=k)[0], first)


def test_contrastive_trains_on_per_group_batches_with_label_negatives(classes_file, tmp_path, monkeypatch):
    seen, real = [], contrastive.Contrastive.forward

    def forward(self, x1, x2, groups=None):
        seen.append(groups.clone())
        return real(self, x1, x2, groups)

    monkeypatch.setattr(contrastive.Contrastive, "forward", forward)
    argv = tiny("contrastive", classes_file, tmp_path / "run", "--negatives", "labels", "--per-group", "2", epochs=1)
    rc, _, err = run_main(contrastive, argv)
    assert rc == 0, err
    assert seen and all(len(g) == 8 and set(torch.bincount(g)[torch.bincount(g) > 0].tolist()) == {2} for g in seen)


# ----------------------------------------------------------------------------- augmentation


def aug_args(**overrides):
    return SimpleNamespace(
        **{
            "crop_min_scale": 0.2,
            "jitter_strength": 1.0,
            "flip_prob": 0.5,
            "solarize_prob": 0.2,
            "gray_prob": 0.2,
            "rotation": 10.0,
            "shear": 5.0,
            "stroke": 0.3,
            "crop_size": 0,
            "image_size": 28,
            **overrides,
        }
    )


MEAN = torch.tensor(byol.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(byol.IMAGENET_STD).view(1, 3, 1, 1)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(b=st.integers(1, 6), s=st.integers(16, 40), crop=st.sampled_from([0, 16]), seed=st.integers(0, 2**31))
def test_augment_pair_gives_normalised_views_of_the_right_shape_per_generator(b, s, crop, seed):
    x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    args = aug_args(crop_size=crop, image_size=s)
    views = byol.augment_pair(x, x, byol.step_generator(seed, 3, "cpu", stream=1), args)
    side = min(crop, s) or s
    for v in views:
        assert v.shape == (b, 3, side, side) and v.dtype == torch.float32 and torch.isfinite(v).all()
        pixels = v * STD + MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert v.is_contiguous(memory_format=torch.channels_last)
    again = byol.augment_pair(x, x, byol.step_generator(seed, 3, "cpu", stream=1), args)
    assert all(torch.equal(a, c) for a, c in zip(views, again))  # the same generator: the same views
    other = byol.augment_pair(x, x, byol.step_generator(seed, 3, "cpu", stream=2), args)
    assert not torch.equal(views[0], other[0])  # another rank's stream: other views


def test_augment_is_per_sample():
    x = torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8).expand(8, -1, -1, -1).contiguous()
    v1, v2 = byol.augment_pair(x, x, torch.Generator().manual_seed(0), aug_args())
    for v in (v1, v2):
        flat = v.flatten(1)
        assert (torch.cdist(flat, flat) + 1e9 * torch.eye(8)).min() > 1e-3  # no two copies the same view
    assert not torch.equal(v1, v2)


def test_view_one_is_never_solarized_view_two_sometimes():
    """White images without colour jitter stay white unless solarised (white -> black); blur keeps them white."""
    x = torch.full((400, 3, 8, 8), 255, dtype=torch.uint8)
    args = aug_args(jitter_strength=0.0, rotation=0.0, shear=0.0, stroke=0.0, image_size=8)
    v1, v2 = byol.augment_pair(x, x, torch.Generator().manual_seed(1), args)
    dark = [((v * STD + MEAN).flatten(1).amax(1) < 0.5).float().mean().item() for v in (v1, v2)]
    assert dark[0] == 0.0 and 0.12 < dark[1] < 0.28  # --solarize-prob 0.2


def test_augment_draws_its_parameters_from_its_generator_alone():
    x = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    torch.manual_seed(0)
    a = byol.augment(x, torch.Generator().manual_seed(5), 1.0, 0.2, aug_args())
    torch.manual_seed(1)  # the global generator: untouched and unused
    b = byol.augment(x, torch.Generator().manual_seed(5), 1.0, 0.2, aug_args())
    assert torch.equal(a, b) and a.shape == (4, 3, 28, 28)
    assert byol.augment(x, torch.Generator().manual_seed(5), 1.0, 0.2, aug_args(), size=16).shape == (4, 3, 16, 16)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    w=st.floats(0.05, 1.0),
    h=st.floats(0.05, 1.0),
    cx=st.floats(-1, 1),
    cy=st.floats(-1, 1),
    flip=st.sampled_from([-1.0, 1.0]),
    angle=st.floats(-180, 180),
    slant=st.floats(-60, 60),
)
def test_crop_affine_scales_area_by_the_crop_alone(w, h, cx, cy, flip, angle, slant):
    """Rotation and shear keep area: the determinant is the crop's w * h * flip, and the shift is its centre."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    theta = byol.crop_affine(t(w), t(h), t(cx), t(cy), t(flip), t(angle), t(slant))[0]
    assert torch.linalg.det(theta[:, :2]).item() == pytest.approx(w * h * flip, rel=1e-9, abs=1e-12)
    assert theta[:, 2].tolist() == pytest.approx([cx, cy])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(angle=st.floats(-179, 179))
def test_crop_affine_without_crop_or_shear_is_a_rotation(angle):
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    m = byol.crop_affine(one, one, zero, zero, one, angle * one, zero)[0, :, :2]
    assert torch.allclose(m @ m.T, torch.eye(2, dtype=torch.float64))
    assert math.degrees(math.atan2(m[1, 0].item(), m[0, 0].item())) == pytest.approx(angle, abs=1e-6)


def ink(views):
    return 1 - (views * STD + MEAN).mean((1, 2, 3))


HANDWRITING = {
    "crop_min_scale": 0.9,
    "jitter_strength": 0.0,
    "flip_prob": 0.0,
    "gray_prob": 0.0,
    "rotation": 0.0,
    "shear": 0.0,
    "stroke": 0.0,
}


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31))
def test_stroke_thickens_or_thins_as_its_drawn_amount_says(seed):
    """A black cross on white: with stroke jitter the views hold more ink exactly where the drawn amount (augment's
    first draw) is positive, less where it is negative; every other draw is the same."""
    x = torch.full((16, 3, 28, 28), 255, dtype=torch.uint8)
    x[:, :, 12:15, 4:24] = 0
    x[:, :, 4:24, 12:15] = 0
    plain = byol.augment(x, torch.Generator().manual_seed(seed), 0.0, 0.0, aug_args(**HANDWRITING))
    jittered = byol.augment(
        x, torch.Generator().manual_seed(seed), 0.0, 0.0, aug_args(**{**HANDWRITING, "stroke": 1.0})
    )
    amount = torch.rand(16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    strong = amount.abs() > 0.05
    assert strong.any() and torch.equal(((ink(jittered) - ink(plain)) > 0)[strong], (amount > 0)[strong])


def test_rotation_and_shear_move_the_strokes():
    """A horizontal bar: with rotation and shear the views' dark pixels leave the bar's rows; without, they stay."""
    x = torch.full((64, 3, 28, 28), 255, dtype=torch.uint8)
    x[:, :, 13:15, 2:26] = 0
    still_args = aug_args(**{**HANDWRITING, "crop_min_scale": 1.0})

    def rows_spanned(views):
        return ((views * STD + MEAN).mean(1) < 0.5).any(2).sum(1).float().mean()

    still = byol.augment(x, torch.Generator().manual_seed(0), 0.0, 0.0, still_args)
    turned = byol.augment(
        x,
        torch.Generator().manual_seed(0),
        0.0,
        0.0,
        SimpleNamespace(**{**vars(still_args), "rotation": 45.0, "shear": 20.0}),
    )
    assert rows_spanned(turned) > rows_spanned(still) + 3


# ----------------------------------------------------------------------------- validation, summary, warnings


class Constant(nn.Module):
    def forward(self, x):
        return torch.ones(len(x), 4)


def test_validation_ties_score_chance_not_one():
    """A collapsed network ties everything: it must score what chance does, never a perfect recall."""
    assert byol.recall_at_1(torch.ones(5, 3), torch.ones(5, 3)) == pytest.approx(1 / 5)
    assert byol.recall_at_1(torch.eye(5), torch.eye(5)) == 1.0


def test_r_precision_counts_the_class_among_the_r_nearest():
    angle = torch.tensor([0.0, 0.1, 0.2, 3.0, 3.1, 1.5])
    features = torch.stack([angle.cos(), angle.sin()], 1)
    assert byol.r_precision(features, torch.tensor([0, 0, 0, 1, 1, 2])) == pytest.approx(1.0)
    # 0 (R=2): nearest 1 (no), 2 (yes): 1/2; 2 likewise; 4 (R=2): 3, 5: 0; 1 and 3 (R=1): 0; 5 asks nothing.
    assert byol.r_precision(features, torch.tensor([0, 1, 0, 1, 0, 2])) == pytest.approx(1 / 5)
    assert byol.r_precision(features, torch.arange(6)) is None
    # R differs between classes: an image's hits count among its own R nearest only (img 0's 2nd nearest, img 2,
    # is of its class, but its R is 1). c1's images 3 and 4: each other (yes), then img 2 (no): 1/2 each.
    angle = torch.tensor([0.0, 0.1, 0.15, 3.0, 3.1])
    features = torch.stack([angle.cos(), angle.sin()], 1)
    assert byol.r_precision(features, torch.tensor([0, 1, 0, 1, 1])) == pytest.approx((0 + 0 + 0 + 0.5 + 0.5) / 5)


@pytest.mark.parametrize("which", ["episodes", "pairs", "classes", "images"])
def test_validation_scores_each_kind_of_data_and_a_collapse_scores_chance(
    which, episodes_file, pairs_file, classes_file, images_file
):
    path = {"episodes": episodes_file, "pairs": pairs_file, "classes": classes_file, "images": images_file}[which]
    args = SimpleNamespace(
        **{
            **vars(data_args(path, 0.2, 0.4)),
            "eval_shift": 0,
            "crop_min_scale": 0.9,
            "jitter_strength": 0.0,
            "flip_prob": 0.0,
            "solarize_prob": 0.0,
            "gray_prob": 0.0,
            "rotation": 0.0,
            "shear": 0.0,
            "stroke": 0.0,
            "crop_size": 0,
        }
    )
    data = byol.load_data(args)
    name, pixels = byol.score(byol.Pixels(), data, "val", args, "cpu")
    assert (
        name
        == {
            "episodes": "val_one_shot",
            "pairs": "val_recall@1",
            "classes": "val_r_precision",
            "images": "val_aug_copy_recall@1",
        }[which]
    )
    assert pixels > 0.9  # the images of a group share a pattern: raw pixels find it
    assert byol.score(byol.Pixels(), data, "val", args, "cpu") == (name, pixels)  # the same at every evaluation
    if which == "images":  # the augmented copies it searches for are the same at every evaluation
        harsh = SimpleNamespace(**{**vars(args), **vars(aug_args())})
        originals = data.images[data.groups[data.val, 0]]
        assert torch.equal(byol.augmented_copies(originals, harsh), byol.augmented_copies(originals, harsh))
    collapsed = nn.ModuleDict({"encoder": Constant(), "projector": nn.Identity()})
    among = len(data.val) + len(data.train)  # pairs: each validation right image and every training one
    chance = {"episodes": 1 / 4, "pairs": 1 / among, "classes": None, "images": 1 / len(data.val)}[which]
    if chance is not None:
        assert byol.score(collapsed, data, "val", args, "cpu")[1] == pytest.approx(chance)


def test_validation_on_a_few_classes_ranks_among_training_images_and_does_not_saturate():
    """Two validation classes that raw pixels tell apart perfectly, among training classes that look like them (a
    small folder's carve): R-Precision over the two alone is 1 whatever the network; among the training images as
    distractors it is not, and an embedding that separates the classes still scores higher."""
    g = torch.Generator().manual_seed(0)
    noise = lambda base, n, amount: base + amount * torch.randn(n, *base.shape, generator=g)  # noqa: E731
    bases = torch.rand(2, 3, 16, 16, generator=g)  # validation classes 0 and 1; training classes 2-9 near them
    centres = torch.cat([bases, *[noise(bases[k % 2], 1, 0.01) for k in range(8)]])
    images = torch.cat([noise(c, 5, 0.05) for c in centres]).clamp(0, 1).mul(255).round().to(torch.uint8)
    data = SimpleNamespace(
        images=images,
        groups=torch.arange(50).view(10, 5),
        kind="classes",
        episodes=None,
        train=list(range(2, 10)),
        val=[0, 1],
    )
    args = SimpleNamespace(seed=0, eval_shift=0)
    val_alone = byol.r_precision(byol.embed_images(byol.Pixels(), images[:10], "cpu")[0], torch.arange(10) // 5)
    assert val_alone == 1.0  # the old protocol saturates
    name, pixels = byol.score(byol.Pixels(), data, "val", args, "cpu")
    assert name == "val_r_precision"

    class KnowsTheClass(nn.Module):  # the image's class as a one-hot feature, beside its pixels
        def forward(self, x):
            owner = (x.flatten(1)[:, None] == byol.normalize(images).flatten(1)[None]).all(2).float().argmax(1) // 5
            return torch.cat([torch.nn.functional.one_hot(owner, 10).float() * 30, x.flatten(1)], 1)

    better = nn.ModuleDict({"encoder": KnowsTheClass(), "projector": nn.Identity()})
    assert byol.score(better, data, "val", args, "cpu")[1] == 1.0 and pixels < 0.7


def test_the_summary_compares_best_pt_with_the_strongest_baseline():
    args = SimpleNamespace(out=Path("runs/x"), epochs=3, pretrained=False)
    first = {"epoch": 0, "metric": "val_r_precision", "val_r_precision": 0.4, "pixels_val_r_precision": 0.5}
    history = [first, {"epoch": 1, "val_r_precision": 0.6}, {"epoch": 2}, {"epoch": 3, "val_r_precision": 0.6}]
    assert byol.summary(history, args).splitlines() == [
        "run directory: runs/x",
        "val_r_precision: 0.600 best.pt (epoch 1 of 3) vs 0.500 raw pixels, the strongest baseline: beats it, +0.100",
    ]  # then main's line of what to run next: test_each_script_runs_in_a_fresh_process
    history = [{**first, "val_r_precision": 0.7}, {"epoch": 1, "val_r_precision": 0.6}]
    line = byol.summary(history, SimpleNamespace(**{**vars(args), "pretrained": True})).splitlines()[1]
    assert line == (
        "val_r_precision: 0.700 best.pt (epoch 0 of 3) vs 0.700 the pretrained start, the strongest "
        "baseline: does NOT beat it, +0.000"
    )
    history = [
        {**first, "val_r_precision": None, "pixels_val_r_precision": None},
        {"epoch": 1, "val_r_precision": None},
    ]
    assert byol.summary(history, args).splitlines()[1] == "no validation: add data, or raise --val-fraction"


@pytest.mark.parametrize("sick, warned", [({}, False), ({"collapse_std": 0.01}, True), ({"effective_rank": 0.4}, True)])
def test_a_collapse_gets_a_plain_warning(classes_file, tmp_path, monkeypatch, sick, warned):
    """The projector's spread under a tenth of 1/sqrt(d), or its effective rank under d/16: one warning line per
    validation, on stderr, the run going on."""
    healthy = {"collapse_std": 0.3, "healthy_std": 8**-0.5, "effective_rank": 6.0}
    monkeypatch.setattr(byol, "collapse", lambda *args: {**healthy, **sick})
    rc, _, err = run_main(byol, tiny("byol", classes_file, tmp_path / "run"))
    warnings = [line for line in err.splitlines() if line.startswith("warning: the representation looks collapsed")]
    assert rc == 0 and len(warnings) == (2 if warned else 0), err
    assert not warned or "effective_rank=" in warnings[0] and "collapse_std=" in warnings[0]


def test_partners_and_each_ranks_views_draw_from_streams_of_their_own():
    """Which member becomes the positive (stream 0) must not be tied to the numbers that augment (stream 1 + rank):
    no two (step, stream) of a run share a generator (nor one step's views the next step's partners), and the
    streams do not correlate."""
    draws = torch.stack(
        [
            torch.stack([torch.rand(3, generator=byol.step_generator(3, step, "cpu", stream)) for step in range(200)])
            for stream in range(4)
        ]
    )  # [stream, step, 3]
    assert len({tuple(d.tolist()) for d in draws.flatten(0, 1)}) == 4 * 200
    corr = torch.corrcoef(draws[:, :, 0])
    assert (corr - torch.eye(4)).abs().max() < 0.25


# ----------------------------------------------------------------------------- recipes and defaults that fit the data


@pytest.mark.parametrize("data", list(byol.RECIPES))
def test_each_recipe_is_the_default_of_its_data_and_a_flag_wins(data):
    args = byol.parse_args(["--data", data])
    recipe = byol.recipe_of(data, args.pretrained)
    for key, value in recipe.items():
        if key in ("batch_size", "epochs"):  # ceilings, fitted to the data once it is loaded
            assert getattr(args, key) is None, key
        elif key != "max_pairs":
            assert getattr(args, key) == value, key
    byol.fit_to_data(args, 1000, 1)
    assert args.batch_size == recipe.get("batch_size", 64) and args.epochs <= recipe["epochs"]
    chosen = byol.parse_args(
        ["--data", data, "--epochs", "3", "--batch-size", "10", "--image-size", "40", "--lr", "0.01"]
    )
    byol.fit_to_data(chosen, 1000, 1)
    assert (chosen.epochs, chosen.batch_size, chosen.image_size, chosen.lr) == (3, 10, 40, 0.01)


def test_pretrained_adds_the_fine_tuning_row_and_help_shows_the_recipe(capsys):
    args = byol.parse_args(["--data", "folder", "--pretrained"])
    for key, value in byol.FINE_TUNE["folder"].items():
        if key not in ("max_pairs", "epochs", "batch_size"):  # the last two: ceilings, fitted to the data
            assert getattr(args, key) == value, key
    assert args.crop_min_scale == byol.RECIPES["folder"]["crop_min_scale"]  # the rest is the data's recipe
    assert (
        byol.parse_args(["--data", "tll"]).pretrained
        and not byol.parse_args(["--data", "tll", "--no-pretrained"]).pretrained
    )
    with pytest.raises(SystemExit):
        byol.parse_args(["--data", "tll", "--help"])
    assert f"default {byol.recipe_of('tll', True)['epochs']}" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "anchors,world,expected",
    [(77, 1, 32), (3000, 1, 128), (4, 1, 2), (48, 1, 16), (77, 2, 32), (9, 4, 8), (77, 3, 30), (3000, 3, 126)],
)
def test_the_batch_follows_the_data_without_a_flag(anchors, world, expected):
    args = byol.parse_args(["--data", "folder"])
    byol.fit_to_data(args, anchors, world)
    assert args.batch_size == expected and args.batch_size % world == 0
    assert anchors // args.batch_size >= 2 or anchors < 4 * world  # two steps an epoch where the data has them
    assert args.lr == pytest.approx(byol.BASE_LR["adamw"] * expected / 256)


@pytest.mark.parametrize("anchors,expected", [(3, 100), (1000, 100), (3000, 50), (4000, 37), (10**7, 1)])
def test_the_epochs_follow_the_data_without_a_flag(anchors, expected):
    """The folder recipe: its 100 epochs, fewer where they would pass its 150,000 pairs (one at least)."""
    args = byol.parse_args(["--data", "folder"])
    assert byol.RECIPES["folder"]["max_pairs"] == 150_000
    byol.fit_to_data(args, anchors, 1)
    assert args.epochs == expected and args.warmup_epochs == min(10.0, 0.1 * expected)
    omniglot = byol.parse_args([])
    byol.fit_to_data(omniglot, anchors, 1)
    assert (omniglot.epochs, omniglot.warmup_epochs) == (45, 4.5)  # no pair budget: its tuned epochs


def test_the_starts_compete_on_a_folder_or_pairs_without_pretrained(tmp_path, capsys):
    """--data folder (or pairs) without --pretrained trains both starts, each in a run of its own; RUN/best.pt is
    the best.pt of the one with the higher validation score, and the run says which won and by how much. The same
    command again resumes both; a run folder holding a run of one start is not overwritten."""
    from PIL import Image

    assert [byol.parse_args(["--data", d]).pretrained for d in ("folder", "pairs", "tll", "omniglot")] == [
        None, None, True, False
    ]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for c in range(8):  # 8 classes of 3 random colour images: 2 held out, 2 for validation, 4 to train on
        (tmp_path / "classes" / f"c{c}").mkdir(parents=True)
        for k in range(3):
            pixels = torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "classes" / f"c{c}" / f"{k}.png")
    run = tmp_path / "run"
    argv = ["--data", "folder", "--data-dir", str(tmp_path / "classes"), "--out", str(run), "--epochs", "2",
            "--eval-every", "1", "--image-size", "32", "--crop-size", "0", "--width", "8", "--no-progress"]  # fmt: skip
    assert byol.main(argv) == 0
    out = capsys.readouterr().out
    scores = {s: byol.load_checkpoint(run / s)["stopping"]["best"] for s in ("pretrained", "no-pretrained")}
    assert scores["pretrained"] != scores["no-pretrained"]  # else the test below could not tell the better
    won, lost = sorted(scores, key=lambda s: -scores[s])
    best = byol.load_checkpoint(run / "best.pt")
    assert best["args"]["pretrained"] == (won == "pretrained") and best["args"]["out"] == str(run / won)
    assert all(torch.equal(v, best["model"][k]) for k, v in byol.load_checkpoint(run / won)["model"].items())
    line = f"the starts on validation: {run / won} {scores[won]:.3f} vs {run / lost} {scores[lost]:.3f}, "
    assert f"{line}{scores[won] - scores[lost]:+.3f}: best.pt is the first's" in out.splitlines()
    assert out.splitlines()[-1].endswith(f"python eval.py {run}")
    logs = {s: (run / s / "log.jsonl").read_text() for s in scores}
    assert byol.main(argv) == 0 and {s: (run / s / "log.jsonl").read_text() for s in scores} == logs  # resumed: done
    (tmp_path / "single").mkdir()
    shutil.copy(run / won / "last.pt", tmp_path / "single" / "last.pt")
    assert byol.main([*argv[:4], "--out", str(tmp_path / "single")]) == 2
    assert "holds a run" in capsys.readouterr().err and not (tmp_path / "single" / "best.pt").exists()


def test_the_four_scripts_share_their_machinery_word_for_word(tmp_path):
    def sync(*argv):
        return subprocess.run(
            [sys.executable, str(REPO / ".ci" / "sync_shared.py"), *argv], capture_output=True, text=True, check=False
        )

    result = sync("--check")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in MODULES:  # a drifted copy is caught, named, and mended
        shutil.copy(REPO / f"{name}.py", tmp_path / f"{name}.py")
    text = (tmp_path / "simsiam.py").read_text()
    line = "def epoch_order(data, seed, epoch, batch_size, per_group):"
    assert text.count(line) == 1
    (tmp_path / "simsiam.py").write_text(text.replace(line, line + "  # drift"))
    result = sync("--check", "--root", str(tmp_path))
    assert result.returncode == 1 and "simsiam.py" in result.stderr and "# drift" in result.stdout
    assert "bn_only.py" not in result.stderr and "contrastive.py" not in result.stderr
    assert sync("--root", str(tmp_path)).returncode == 0 and (tmp_path / "simsiam.py").read_text() == text


# ----------------------------------------------------------------------------- DDP, two CPU processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_steps(module, record):
    """Patches `module` so that a run records each step's loss, the images it got and its augmentation stream's
    first draws, and augments deterministically (no random draw), so that 1 and 2 processes see the same views."""
    real_forward = module.BNOnly.forward

    def forward(self, x1, x2):
        loss = real_forward(self, x1, x2)
        record["loss"].append(loss.item())
        return loss

    def augment_pair(x1, x2, gen, args):
        clone = torch.Generator(gen.device)
        clone.set_state(gen.get_state())
        record["draws"].append(torch.rand(4, generator=clone))
        record["images"].append(x1.clone())
        return module.normalize(x1), module.normalize(x2)

    return {"BNOnly.forward": forward, "augment_pair": augment_pair}


def ddp_argv(data_file, out):
    """bn_only without batch norm in the heads and with the encoder's frozen: the loss is a mean over pairs, so the
    mean of 2 ranks' losses over 4 pairs is the loss over 8, and DDP's mean gradient is the one-process gradient."""
    return tiny(
        "bn_only",
        data_file,
        out,
        "--no-bn",
        "--freeze-bn-stats",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--device",
        "cpu",
    )


def ddp_worker(rank, world, port, argv, spy):
    """One rank: a torchrun-like environment, then bn_only.main(argv) with record_steps' patches; writes what it saw
    to spy/rank<r>.pt, and first checks contrastive.py's gathered negatives on random projections."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    record = {"loss": [], "draws": [], "images": []}
    for name, fn in record_steps(bn_only, record).items():
        owner, attr = (bn_only.BNOnly, "forward") if "." in name else (bn_only, name)
        setattr(owner, attr, fn)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = bn_only.main(argv)
    gather = None
    if rc == 0:  # the process group is gone: a second one for the gather check
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port + 1}")
        gather = contrastive_gather_check(rank, world)
        dist.destroy_process_group()
    torch.save(
        {
            "rc": rc,
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "gather": gather,
            **record,
            "params": {
                k: v.clone()
                for k, v in torch.load(Path(argv[argv.index("--out") + 1]) / "last.pt", weights_only=False)[
                    "model"
                ].items()
            }
            if rank == 0 and rc == 0
            else None,
        },
        Path(spy) / f"rank{rank}.pt",
    )


def contrastive_gather_check(rank, world):
    """contrastive.global_batch: the loss over every rank's pairs is the one-process loss, and each rank's gradient
    (world times it, as DDP then averages) is that of its own rows."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    full1, full2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = contrastive.ntxent_loss(torch.cat([full1, full2]), torch.cat([groups, groups]), 0.2)
    full.backward()
    mine = slice(4 * rank, 4 * rank + 4)
    a, b = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
    g1, g2, gathered = contrastive.global_batch(a, b, groups[mine])
    loss = contrastive.ntxent_loss(torch.cat([g1, g2]), torch.cat([gathered, gathered]), 0.2)
    loss.backward()
    return {
        "groups": torch.equal(gathered, groups),
        "loss": (loss.item(), full.item()),
        "grad": max(
            (a.grad / world - full1.grad[mine]).abs().max().item(),
            (b.grad / world - full2.grad[mine]).abs().max().item(),
        ),
    }


@pytest.fixture(scope="module")
def ddp(classes_file, tmp_path_factory):
    """The same run in 1 process (in this one) and in 2 (spawned, gloo)."""
    import torch.multiprocessing as mp

    base = tmp_path_factory.mktemp("ddp")
    (base / "spy").mkdir()
    one = {"loss": [], "draws": [], "images": []}
    with pytest.MonkeyPatch.context() as patch:
        for name, fn in record_steps(bn_only, one).items():
            owner, attr = (bn_only.BNOnly, "forward") if "." in name else (bn_only, name)
            patch.setattr(owner, attr, fn)
        one["result"] = run_main(bn_only, ddp_argv(classes_file, base / "one"))
    port = free_port()
    mp.spawn(ddp_worker, args=(2, port, ddp_argv(classes_file, base / "two"), str(base / "spy")), nprocs=2, join=True)
    ranks = [torch.load(base / "spy" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"one": one, "ranks": ranks, "base": base}


def test_ddp_two_processes_give_the_one_process_loss_curve(ddp):
    one, ranks = ddp["one"], ddp["ranks"]
    assert one["result"][0] == 0, one["result"][2]
    for r in ranks:
        assert r["rc"] == 0 and "Traceback" not in r["stderr"], r["stderr"]
    assert len(one["loss"]) == len(ranks[0]["loss"]) == len(ranks[1]["loss"]) == 10
    two = [(a + b) / 2 for a, b in zip(ranks[0]["loss"], ranks[1]["loss"])]
    assert two == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    assert one["loss"][0] != pytest.approx(one["loss"][-1], rel=1e-3)  # the curve moves: it tells runs apart
    # The same images: rank r the r-th half of each global batch.
    for step, images in enumerate(one["images"]):
        assert torch.equal(torch.cat([ranks[0]["images"][step], ranks[1]["images"][step]]), images)
    final = load(ddp["base"] / "one" / "last.pt")["model"]
    assert all(torch.allclose(ranks[0]["params"][k].float(), v.float(), rtol=1e-4, atol=1e-6) for k, v in final.items())


def test_ddp_rank_zero_alone_writes_and_prints(ddp):
    ranks, out = ddp["ranks"], ddp["base"] / "two"
    assert all(r["rc"] == 0 for r in ranks), [r["stderr"] for r in ranks]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best.pt", "last.pt", "log.jsonl"]
    assert [r["epoch"] for r in log_of(out)] == [0, 1, 2] and load(out / "last.pt")["epoch"] == 2
    assert "run directory:" in ranks[0]["stdout"] and ranks[1]["stdout"] == ""


def test_ddp_ranks_augment_with_their_own_random_streams(ddp):
    """Each rank augments its own share: were both to replay one stream, the k-th pair of every rank would get the
    very same crop, jitter, blur and solarisation."""
    draws = [r["draws"] for r in ddp["ranks"]]
    assert len(draws[0]) == len(draws[1]) == 10 and all(not torch.equal(a, b) for a, b in zip(*draws))
    assert all(torch.equal(a, b) for a, b in zip(draws[0], ddp["one"]["draws"]))  # rank 0: the one process's stream


def test_ddp_contrastive_negatives_come_from_the_whole_batch(ddp):
    for r in ddp["ranks"]:
        gather = r["gather"]
        assert gather is not None, r["stderr"]
        assert gather["groups"] and gather["loss"][0] == pytest.approx(gather["loss"][1], rel=1e-6)
        assert gather["grad"] < 1e-6


# ----------------------------------------------------------------------------- processes, as a user runs them


@pytest.fixture(scope="module")
def fresh(classes_file, pairs_file, images_file, episodes_file, tmp_path_factory):
    """Each script once as `python SCRIPT.py ...` in a fresh process, one per kind of data (episodes: Omniglot's
    one-shot validation), and byol.py once with --lr 1e30; all at once."""
    base = tmp_path_factory.mktemp("fresh")
    data = {"byol": pairs_file, "simsiam": images_file, "bn_only": episodes_file, "contrastive": classes_file,
            "redundancy": pairs_file}  # fmt: skip
    commands = {name: [f"{name}.py", *tiny(name, data[name], base / name)] for name in MODULES}
    commands["diverged"] = ["byol.py", *tiny("byol", classes_file, base / "diverged", "--lr", "1e30")]
    started = {
        name: subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, argv in commands.items()
    }
    done = {}
    for name, p in started.items():
        out, err = p.communicate(timeout=300)
        done[name] = SimpleNamespace(rc=p.returncode, out=out, err=err, dir=base / name)
    return done


METRICS = {
    "byol": "val_recall@1",
    "simsiam": "val_aug_copy_recall@1",
    "bn_only": "val_one_shot",
    "contrastive": "val_r_precision",
    "redundancy": "val_recall@1",
}


@pytest.mark.parametrize("name", MODULES)
def test_each_script_runs_in_a_fresh_process(fresh, name):
    r = fresh[name]
    assert r.rc == 0 and "Traceback" not in r.err, r.err
    metric = METRICS[name]
    records = log_of(r.dir)
    assert [x["epoch"] for x in records] == [0, 1, 2] and records[0]["metric"] == metric
    assert 0 <= records[0][metric] <= 1 and 0 <= records[0][f"pixels_{metric}"] <= 1
    summary = r.out.strip().splitlines()[-3:]
    assert summary[0] == f"run directory: {r.dir}"
    assert summary[1].startswith(f"{metric}: ") and ("beats it" in summary[1] or "does NOT beat it" in summary[1])
    assert (
        summary[2] == f"the test, every baseline, and the embedding to ship (chosen on validation): python eval.py "
        f"{r.dir}"
    )


def test_the_pixel_baseline_sees_the_groups_pattern(fresh):
    """The images of a group share a pattern: raw pixels find a class far above chance (guards the fixture)."""
    first = log_of(fresh["contrastive"].dir)[0]
    assert first["pixels_val_r_precision"] > 0.9


def test_a_divergent_run_ends_in_one_line_and_exit_1(fresh):
    r = fresh["diverged"]
    assert r.rc == 1 and "Traceback" not in r.err, r.err
    errors = [line for line in r.err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(errors) == 1, r.err
    assert errors[0].startswith("byol.py: error: the loss became nan in epoch 1") and "lower --lr" in errors[0]
    assert load(r.dir / "best.pt")["epoch"] == 0 and not (r.dir / "last.pt").exists()  # the start: still good
    assert "run directory:" not in r.out


def test_a_divergent_run_does_not_claim_a_checkpoint_it_never_wrote(classes_file, tmp_path):
    """Without validation data nothing is saved before epoch 1 ends: the message must not send the user to one."""
    out = tmp_path / "run"
    argv = [a if a != "0.25" else "0" for a in tiny("byol", classes_file, out, "--lr", "1e30")]  # --val-fraction 0
    rc, _, err = run_main(byol, argv)
    assert rc == 1 and not list(out.glob("*.pt"))
    line = error_line(err)
    assert "the loss became nan" in line and "checkpoint is kept" not in line, line


def test_resume_from_a_run_folder_continues_its_last_epoch_in_place(classes_file, tmp_path):
    """--resume RUN (a folder) means RUN/last.pt, and the run goes on in RUN, not in its parent."""
    out = tmp_path / "run"
    assert run_main(byol, tiny("byol", classes_file, out, "--stop-after-epochs", "1"))[0] == 0
    rc, stdout, _ = run_main(byol, ["--resume", out, "--no-progress"])
    assert rc == 0 and f"run directory: {out}" in stdout
    assert [r["epoch"] for r in log_of(out)] == [0, 1, 2] and not list(tmp_path.glob("*.jsonl"))


def test_per_group_batches_take_any_seed(classes_file, tmp_path):
    """The sampler's numpy seed stays in numpy's range for every --seed the flag accepts."""
    rc, _, err = run_main(byol, tiny("byol", classes_file, tmp_path / "run", "--per-group", "2", "--seed", 2**32 - 1))
    assert rc == 0, err
