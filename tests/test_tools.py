"""eval.py embed, search, export and plot: round trips on tiny runs trained in-process, each tool once from the
command line in a fresh process as a user runs it, and the exported program reloaded in a process that never imports
the scripts (a conv4 and a tf_efficientnet_lite0 run; Lite0's ImageNet weights load offline)."""

import csv
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_eval import ENV, REPO, cli, one_line_error, one_thread, train, write_data  # noqa: F401  one_thread: autouse

import byol
import eval as ev


def embedding(run, images):
    """What the run's checkpoint embeds, as evaluation embeds: L2-normalised encoder features at its eval_shift."""
    mod, ckpt, args, _ = ev.load_run(run)
    return F.normalize(byol.embed_images(ev.trained_model(mod, ckpt, args), images, "cpu", args.eval_shift)[0], dim=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv4")
    return train(write_data(root / "classes.pt"), root / "run")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 PNGs in a folder tree, the same in a .zip, and a CSV list of them (with a header); and their pixels."""
    root = tmp_path_factory.mktemp("photos")
    images = torch.randint(0, 256, (12, 3, 28, 28), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    files = [root / "tree" / ("sub" if i % 3 == 0 else ".") / f"p{i:02d}.png" for i in range(12)]
    with zipfile.ZipFile(root / "photos.zip", "w") as zf:
        for x, f in zip(images, files):
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(f)
            zf.write(f, f.name)
    with open(root / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path"], *([str(p.relative_to(root))] for p in files)])
    return root, {f.resolve().name: x for f, x in zip(files, images)}


def read(npz):
    with np.load(npz) as f:
        return torch.from_numpy(f["embeddings"]), f["paths"].tolist(), json.loads(str(f["meta"]))


def test_embed_and_search_from_the_command_line(run, photos, tmp_path):
    root, images = photos
    out = tmp_path / "photos.npz"
    proc = cli("embed", run, root / "tree", "--out", out)
    assert proc.returncode == 0, proc.stderr
    embeddings, paths, meta = read(out)
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert embeddings.dtype == torch.float32 and sorted(names) == sorted(images)
    assert all(p.startswith("/") for p in paths)  # absolute: search finds them from anywhere
    assert torch.allclose(embeddings, embedding(run, torch.stack([images[n] for n in names])), atol=1e-5)
    assert {k: meta[k] for k in ("method", "checkpoint", "epoch", "arch", "image_size")} == {
        "method": "byol",
        "checkpoint": str(run / "best.pt"),
        "epoch": byol.load_checkpoint(run / "best.pt")["epoch"],
        "arch": "conv4",
        "image_size": 28,
    }

    query = paths[4]
    proc = cli("search", out, "--query", query, "--top-k", "3", "--out", tmp_path / "grid.png")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"query {query}" and lines[1].split() == ["1", "1.0000", query] and len(lines) == 5
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zip_and_csv_embed_like_the_folder(run, photos, tmp_path):
    root, _ = photos
    got = {}
    for source in ("tree", "photos.zip", "list.csv"):
        assert ev.main(["embed", str(run), str(root / source), "--out", str(tmp_path / f"{source}.npz")]) == 0
        embeddings, paths, _ = read(tmp_path / f"{source}.npz")
        got[source] = dict(zip((p.rsplit("/", 1)[-1].rsplit(":", 1)[-1] for p in paths), embeddings))
    assert got["tree"].keys() == got["photos.zip"].keys() == got["list.csv"].keys()
    for name, e in got["tree"].items():
        assert torch.equal(e, got["photos.zip"][name]) and torch.equal(e, got["list.csv"][name])


def test_search_by_index_skips_the_query_itself(run, photos, tmp_path, capsys):
    root, _ = photos
    npz = tmp_path / "e.npz"
    ev.main(["embed", str(run), str(root / "photos.zip"), "--out", str(npz)])  # names ZIP:MEMBER, drawn from the zip
    capsys.readouterr()
    assert ev.main(["search", str(npz), "--index", "2", "--top-k", "11"]) == 0
    embeddings, paths, _ = read(npz)
    sims = embeddings @ embeddings[2]
    sims[2] = -2
    found = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert found == [paths[i] for i in sims.argsort(descending=True)[:11]]
    assert (tmp_path / "e-search.png").is_file()


def test_baseline_embeddings(photos, tmp_path, capsys):
    root, images = photos
    out = tmp_path / "pixels.npz"
    assert ev.main(["embed", "--baseline", "pixels", str(root / "tree"), "--image-size", "28", "--out", str(out)]) == 0
    embeddings, paths, meta = read(out)
    pixels = F.normalize(byol.normalize(torch.stack([images[p.rsplit("/", 1)[-1]] for p in paths])).flatten(1), dim=1)
    assert meta["baseline"] == "pixels" and torch.allclose(embeddings, pixels, atol=1e-6)
    capsys.readouterr()
    assert ev.main(["search", str(out), "--query", paths[0], "--top-k", "1"]) == 0  # the baseline rebuilt from meta
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["1", "1.0000"]


def test_bad_embed_and_search_inputs_are_one_line(run, photos, tmp_path, capsys):
    root, _ = photos
    npz, foreign = tmp_path / "e.npz", tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    ev.main(["embed", str(run), str(root / "tree"), "--out", str(npz)])
    capsys.readouterr()
    one_line_error(capsys, ["embed", str(run), str(root / "tree"), "--out", str(npz)], str(npz), "--overwrite")
    one_line_error(capsys, ["embed", str(run), str(tmp_path / "none"), "--out", str(tmp_path / "x.npz")], "SOURCE")
    one_line_error(capsys, ["embed", str(root / "tree"), "--out", str(tmp_path / "x.npz")], "RUN")
    one_line_error(capsys, ["search", str(foreign), "--index", "0"], "foreign.npz", "not a file of python eval.py")
    one_line_error(capsys, ["search", str(npz), "--query", str(tmp_path / "me.jpg")], "--query", "me.jpg")
    one_line_error(capsys, ["search", str(npz), "--index", "12"], "--index 12", "0 to 11")
    one_line_error(capsys, ["search", str(npz)], "--query", "--index")


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """A conv4 and a Lite0 run, and the frozen ImageNet features (`--baseline pretrained`), each exported by `python
    eval.py export` (the processes at once), and their embeddings, to compare with the programs in a fresh process."""
    root = tmp_path_factory.mktemp("export")
    data32 = write_data(root / "d32.pt", groups=6, per_group=4, size=32)
    small = ["--image-size", "32", "--epochs", "1", "--batch-size", "4", "--val-fraction", "0"]  # last.pt only
    runs = {
        "conv4": run,
        "lite0": train(data32, root / "lite0", *small, "--arch", "tf_efficientnet_lite0", "--pretrained"),
    }
    runs["frozen"] = "--baseline=pretrained"
    procs = {
        a: subprocess.Popen(
            [sys.executable, "eval.py", "export", str(r), "--out", str(root / a / "enc.pt")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for a, r in runs.items()
    }
    for arch, r in runs.items():
        assert procs[arch].wait(timeout=300) == 0, procs[arch].communicate()[1]
        if arch == "frozen":  # the frozen features at their native 224 px: the encoder of eval.py's baseline
            images = torch.randint(
                0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
            )
            expected = ev.features(ev.baseline_model("pretrained", byol, None)[0], images, torch.arange(3), "cpu", 0)
            expected = torch.nn.functional.normalize(expected, dim=1)
        else:
            images = byol.load_data(ev.load_run(r)[2]).images[:7]
            expected = embedding(r, images)
        torch.save({"images": images, "expected": expected}, root / arch / "check.pt")
    return root


CHECK = """
import sys, torch
for folder in sys.argv[1:]:
    program = torch.export.load(f"{folder}/enc.pt2").module()
    check = torch.load(f"{folder}/check.pt")
    for x in (check["images"].float() / 255, check["images"][:1].float() / 255):  # any batch size
        print(folder, (program(x) - check["expected"][: len(x)]).abs().max().item())
print("byol" in sys.modules or "eval" in sys.modules)
"""


@pytest.fixture(scope="module")
def reloaded(exported):
    """{arch: largest difference} from a fresh process that loads the programs with torch alone."""
    folders = [exported / a for a in ("conv4", "lite0", "frozen")]
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, *map(str, folders)],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    *lines, imported = proc.stdout.splitlines()
    assert imported == "False"  # the program stands alone
    out = {}
    for line in lines:
        folder, diff = line.rsplit(" ", 1)
        out[folder.rsplit("/", 1)[-1]] = max(out.get(folder.rsplit("/", 1)[-1], 0), float(diff))
    return out


@pytest.mark.parametrize("arch", ["conv4", "lite0", "frozen"])
def test_export_reloads_in_a_fresh_process_and_embeds_like_the_checkpoint(exported, reloaded, arch):
    assert reloaded[arch] <= 1e-5
    sidecar = json.loads((exported / arch / "enc.json").read_text())
    assert sidecar["image_size"] == {"conv4": 28, "lite0": 32, "frozen": 224}[arch]
    assert sidecar["mean"] == list(byol.IMAGENET_MEAN) and (sidecar.get("baseline") == "pretrained") == (
        arch == "frozen"
    )
    code = sidecar["load"].replace("'enc.pt'", repr(str(exported / arch / "enc.pt")))
    exec(code, {"byol": byol, "torch": torch})  # noqa: S102  its recipe rebuilds the encoder from the weights alone


def test_embed_and_export_carry_the_whitening_that_evaluate_chose(run, photos, tmp_path, monkeypatch, capsys):
    mine = shutil.copytree(run, tmp_path / "run")
    monkeypatch.setattr(ev, "choose", lambda *scores: ("trained, whitened from positives", "as if it won"))
    assert ev.main([str(mine), "--out", str(tmp_path / "eval.json")]) == 0
    chosen = torch.load(mine / "chosen.pt", weights_only=True)
    whiten = ev.Whiten(chosen["whiten"]["mean"], chosen["whiten"]["w"])
    root, images = photos
    assert ev.main(["embed", str(mine), str(root / "tree"), "--out", str(tmp_path / "w.npz")]) == 0
    got, paths, meta = read(tmp_path / "w.npz")
    x = torch.stack([images[p.rsplit("/", 1)[-1]] for p in paths])
    mod, ckpt, args, _ = ev.load_run(mine)
    encoder = ev.trained_model(mod, ckpt, args).encoder
    expected = byol.embed_images(ev.Embedding(torch.nn.Sequential(encoder, whiten)), x, "cpu", args.eval_shift)[0]
    assert meta["chosen"] == "trained, whitened from positives" and got.shape[1] == whiten.w.shape[1]
    assert torch.allclose(got, F.normalize(expected, dim=1), atol=1e-5)
    assert ev.main(["export", str(mine), "--out", str(tmp_path / "enc.pt")]) == 0
    program = torch.export.load(tmp_path / "enc.pt2").module()
    assert torch.allclose(program(x.float() / 255), got, atol=1e-4)
    sidecar = json.loads((tmp_path / "enc.json").read_text())
    scope = {"byol": byol, "torch": torch, "eval": ev}
    exec(sidecar["load"].replace("'enc.pt'", repr(str(tmp_path / "enc.pt"))), scope)  # noqa: S102
    assert isinstance(scope["encoder"][1], ev.Whiten)
    with torch.no_grad():  # the sidecar's recipe rebuilds the whitened encoder from the weights alone
        assert torch.allclose(
            scope["encoder"].eval()(byol.normalize(x)),
            torch.nn.Sequential(encoder, whiten).eval()(byol.normalize(x)),
            atol=1e-5,
        )
    assert (
        ev.main(["embed", str(mine), str(root / "tree"), "--embedding", "encoder", "--out", str(tmp_path / "raw.npz")])
        == 0
    )
    assert torch.allclose(read(tmp_path / "raw.npz")[0], embedding(mine, x), atol=1e-5)
    torch.save({**chosen, "epoch": -1}, mine / "chosen.pt")  # evaluated at another epoch: stale, so not used
    assert ev.main(["embed", str(mine), str(root / "tree"), "--out", str(tmp_path / "stale.npz")]) == 0
    assert read(tmp_path / "stale.npz")[2]["chosen"] is None
    assert "chosen.pt is of another checkpoint or epoch" in capsys.readouterr().err


def test_failed_export_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", full_disk)  # the last of the three files
    one_line_error(capsys, ["export", str(run), "--out", str(tmp_path / "enc.pt")], "No space")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: 1 / 0)
    one_line_error(capsys, ["export", str(run), "--out", str(tmp_path / "enc.pt")], "cannot trace", "nothing written")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "enc.json").write_text("mine")
    one_line_error(capsys, ["export", str(run), "--out", str(tmp_path / "enc.pt")], "enc.json", "--overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["enc.json"]


# ----------------------------------------------------------------------------- plot and the command line


def test_plot_from_the_command_line(run, tmp_path, capsys):
    proc = cli("plot", run, "--out", tmp_path / "curves.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "metric": "val_x"}\nnot json\n')
    one_line_error(capsys, ["plot", str(tmp_path)], "line 2", "log.jsonl")
    one_line_error(capsys, ["plot", str(tmp_path / "nowhere")], "no log.jsonl")


def test_usage_names_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: eval.py [-h] {evaluate,embed,search,export,plot} ...")
    one_line_error(capsys, [], "command")
