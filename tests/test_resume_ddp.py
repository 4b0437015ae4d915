"""Checkpoints, exact --resume, monitoring (log.jsonl, TensorBoard) and the DDP code path of
byol.py, simsiam.py and bn_only.py, on a tiny TLL directory.

For each script three in-process runs share one module-scoped fixture:
  A: 2 epochs straight;  B: the same with --stop-after-epochs 1;  C: --resume B's last.pt.
C must end bit-identical to A. The DDP test starts torchrun (gloo, 2 CPU processes)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import byol
from tiny_data import (
    MODULES,
    REPO,
    SCRIPTS,
    args_for,
    one_thread,  # noqa: F401  (fixture)
    run_main,
    state_dicts_equal,
    tensors_in,
    tiny_flags,
    tll_dir,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=SCRIPTS)
def runs(request, tll_dir, tmp_path_factory):
    script = request.param
    mod = MODULES[script]
    tmp = tmp_path_factory.mktemp(f"resume_{script}")
    a, b = tmp / "straight", tmp / "resumed"
    res = {"script": script, "mod": mod, "A": a, "B": b}
    res["rc_a"], res["out_a"], res["err_a"] = run_main(mod, tiny_flags(script, tll_dir, a, epochs=2))
    res["rc_b"], res["out_b"], res["err_b"] = run_main(
        mod, tiny_flags(script, tll_dir, b, epochs=2, extra=["--stop-after-epochs", "1"])
    )
    res["files_b1"] = sorted(p.name for p in b.iterdir())
    res["ckpt_b1"] = torch.load(b / "last.pt", weights_only=False)
    res["log_b1"] = (b / "log.jsonl").read_text()
    res["rc_c"], res["out_c"], res["err_c"] = run_main(
        mod, ["--resume", b / "last.pt", "--no-progress", "--workers", "1"]
    )
    return res


def test_runs_succeed(runs):
    for k in "abc":
        assert runs[f"rc_{k}"] == 0, (k, runs[f"err_{k}"])
        assert "Traceback" not in runs[f"err_{k}"]
    assert "epoch 1/2" in runs["out_b"] and "epoch 2/2" not in runs["out_b"]
    assert "epoch 2/2" in runs["out_c"] and "epoch 1/2" not in runs["out_c"]
    assert not any(
        line.startswith("untrained:") for line in runs["out_c"].splitlines()
    )  # no re-evaluation from scratch


def test_resume_continues_exactly(runs):
    """2 epochs straight == 1 epoch, stop, --resume, 1 epoch: every tensor identical."""
    a = torch.load(runs["A"] / "last.pt", weights_only=False)
    c = torch.load(runs["B"] / "last.pt", weights_only=False)
    assert a["epoch"] == c["epoch"] == 2 and a["step"] == c["step"] == 4
    assert state_dicts_equal(a["model"], c["model"]) == []
    ta, tc = tensors_in(a["optimizer"]), tensors_in(c["optimizer"])
    assert ta.keys() == tc.keys() and ta and all(torch.equal(ta[k], tc[k]) for k in ta)
    assert a["optimizer"]["param_groups"] == c["optimizer"]["param_groups"]
    assert a["scheduler"] == c["scheduler"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "images_per_s"} for r in h]
    assert strip(a["history"]) == strip(c["history"])
    # and the run really moved: epoch 2 changed the parameters
    assert state_dicts_equal(runs["ckpt_b1"]["model"], c["model"])


def test_checkpoint_contents(runs, tll_dir):
    ck = runs["ckpt_b1"]
    assert "last.pt" in runs["files_b1"] and not [f for f in runs["files_b1"] if f.endswith(".tmp")]
    assert ck["method"] == runs["script"] and ck["epoch"] == 1 and ck["step"] == 2
    model_keys = ck["model"].keys()
    assert any(k.startswith("encoder.") for k in model_keys) and any(k.startswith("projector.") for k in model_keys)
    if runs["script"] == "byol":
        assert any(k.startswith("target_encoder.") for k in model_keys)
        assert any(k.startswith("target_projector.") for k in model_keys)
    assert ck["optimizer"]["state"], "optimizer state (momentum) missing"
    assert ck["scheduler"]["last_epoch"] == 2
    assert set(ck["rng"]) >= {"torch", "numpy", "python"}
    assert ck["args"]["epochs"] == 2 and ck["args"]["data"] == "tll" and ck["args"]["out"] == str(runs["B"])
    json.dumps(ck["args"])  # plain values: readable without this script's classes
    # the split is saved with the run, identical to what the loader derives from the seed
    split = byol.load_data(
        args_for(byol, ["--data", "tll", "--data-dir", tll_dir, "--image-size", "16", "--workers", "1"])
    ).split
    assert ck["split"] == split
    assert json.loads((runs["A"] / "split.json").read_text()) == split
    assert len(split["test_pairs"]) == 4


def test_log_jsonl_and_tensorboard(runs):
    records = [json.loads(line) for line in (runs["A"] / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:
        for key in ("recall@1", "collapse_std", "healthy_std", "effective_rank"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
    for r in records[1:]:
        for key in ("loss", "lr", "images_per_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert r["images_per_s"] > 0 and 0 < r["effective_rank"] <= 16
    assert records[2]["lr"] == pytest.approx(0.0, abs=1e-12)  # end of the cosine
    if runs["script"] == "byol":
        assert records[1]["tau"] < records[2]["tau"] == pytest.approx(1.0)
    else:
        assert "tau" not in records[1]
    # a collapse warning is printed exactly for the epochs whose collapse_std says so
    collapsed = sum(r["collapse_std"] < 0.1 * r["healthy_std"] for r in records[1:])
    assert runs["err_a"].count("warning: the representation looks collapsed") == collapsed
    # the resumed run appends to the same log: the same records as the straight run
    resumed = [json.loads(line) for line in (runs["B"] / "log.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rs]
    assert strip(resumed) == strip(records)
    # TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((runs["A"] / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(runs["A"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "images_per_s", "recall@1", "collapse_std", "effective_rank"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in records[1:]])


# ----------------------------------------------------------------------------- DDP

SPY = textwrap.dedent("""
    # torchrun entry point: byol.py's own main(), plus a record of what each rank ended with.
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    import byol

    rank, spy_dir = int(os.environ["RANK"]), os.environ["SPY_DIR"]
    real_train, real_augment_pair = byol.train, byol.augment_pair
    draws, inputs = [], []

    def augment_pair(x1, x2, gen, args, size=None):
        clone = torch.Generator(gen.device)
        clone.set_state(gen.get_state())
        draws.append(torch.rand(len(x1), generator=clone, device=gen.device).cpu())
        inputs.append(x1.float().mean().item())
        return real_augment_pair(x1, x2, gen, args, size)

    def train(args):
        model, history, args = real_train(args)
        torch.save({{"world": os.environ["WORLD_SIZE"], "draws": draws, "inputs": inputs,
                    "params": {{n: p.detach().clone() for n, p in model.named_parameters()}}}},
                   os.path.join(spy_dir, f"rank{{rank}}.pt"))
        return model, history, args

    byol.augment_pair, byol.train = augment_pair, train
    sys.exit(byol.main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def ddp_run(tll_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "spy").mkdir()
    entry = tmp / "byol_ddp.py"
    entry.write_text(SPY.format(repo=str(REPO)))
    out = tmp / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(entry),
        *tiny_flags("byol", tll_dir, out, epochs=1, extra=["--device", "cpu"]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPY_DIR": str(tmp / "spy"), "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=540)
    return {"r": r, "out": out, "spy": tmp / "spy"}


def test_ddp_two_cpu_processes_train_and_checkpoint(ddp_run):
    r = ddp_run["r"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    ck = torch.load(ddp_run["out"] / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] == 2
    assert [json.loads(line)["epoch"] for line in (ddp_run["out"] / "log.jsonl").read_text().splitlines()] == [0, 1]
    assert r.stdout.count("run directory:") == 1  # rank 0 only


def test_ddp_ranks_end_identical_and_saw_different_data(ddp_run):
    assert ddp_run["r"].returncode == 0, ddp_run["r"].stderr[-3000:]
    r0 = torch.load(ddp_run["spy"] / "rank0.pt", weights_only=False)
    r1 = torch.load(ddp_run["spy"] / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == "2"
    assert len(r0["inputs"]) == len(r1["inputs"]) == 2
    assert r0["inputs"] != r1["inputs"], "both ranks trained on the same images"
    diff = state_dicts_equal(r0["params"], r1["params"])
    assert diff == [], f"parameters differ between ranks: {diff[:5]}"
    saved = torch.load(ddp_run["out"] / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(saved[n], p) for n, p in r0["params"].items())


def test_ddp_ranks_augment_with_different_random_numbers(ddp_run):
    """Each rank augments its own share of the batch; if every rank replays the same random
    stream, the k-th pair of every rank gets the very same crop, jitter, blur and solarisation."""
    assert ddp_run["r"].returncode == 0, ddp_run["r"].stderr[-3000:]
    r0 = torch.load(ddp_run["spy"] / "rank0.pt", weights_only=False)
    r1 = torch.load(ddp_run["spy"] / "rank1.pt", weights_only=False)
    for d0, d1 in zip(r0["draws"], r1["draws"]):
        assert not torch.equal(d0, d1)


# ----------------------------------------------------------------------------- save_atomic


def _failing_save(real_save):
    def save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1000)}, f)  # half a file on disk, then the disk fills up
        raise OSError(28, "No space left on device")

    return save


def test_save_atomic_never_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    byol.save_atomic({"epoch": 1, "w": torch.arange(5)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.setattr(torch, "save", _failing_save(torch.save))
    with pytest.raises(OSError):
        byol.save_atomic({"epoch": 2, "w": torch.arange(7)}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=False)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.arange(5))


def test_save_atomic_failure_removes_its_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    monkeypatch.setattr(torch, "save", _failing_save(torch.save))
    with pytest.raises(OSError):
        byol.save_atomic({"epoch": 2}, path)
    assert list(tmp_path.iterdir()) == []
