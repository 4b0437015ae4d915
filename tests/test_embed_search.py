"""eval.py embed / search / export (issue #18): a folder, a .zip or a CSV list embedded into one .npz with
evaluation's own preprocessing, exact cosine search in it, and the encoder exported for use without this
repository. Tiny data made in tmp_path and a one-epoch byol.py checkpoint; no network."""

import json
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import byol
import eval as ev
from tiny_data import make_folder, make_tll, one_thread, tiny_flags  # noqa: F401  (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch byol.py run (conv4, widths 16,16,32,64, 16 px) on a tiny TLL layout: 20 left and 20 right JPEGs."""
    base = tmp_path_factory.mktemp("embed")
    tll = make_tll(base / "tll", n=20)
    assert byol.main(tiny_flags("byol", tll, base / "run", extra=["--width", "16,16,32,64"])) == 0
    return SimpleNamespace(tll=tll, ckpt=base / "run" / "last.pt")


def embed(argv, capsys):
    """Runs eval.py embed; returns the (embeddings, paths, meta) of the .npz it wrote."""
    assert ev.main(["embed", *map(str, argv), *QUIET]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote "))
    with np.load(out) as f:
        return torch.from_numpy(f["embeddings"]), f["paths"].tolist(), json.loads(f["meta"].item())


def search(argv, capsys):
    """Runs eval.py search; returns [(rank, score, path)] of the printed hits."""
    assert ev.main(["search", *map(str, argv), "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [(int(r), float(s), p) for r, s, p in (line.split() for line in lines if line.startswith("  "))]


def save_checkpoint(mod, args, model, path):
    """A checkpoint as the training scripts write one, without training."""
    saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    torch.save({"method": mod.METHOD, "args": saved, "model": model.state_dict(), "epoch": 0}, path)
    return path


def check_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


# ----------------------------------------------------------------------------- embed


def test_a_nested_folder_in_chunks_at_any_batch_size(run, tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "photos", classes=2, per_class=3)
    make_folder(root / "c1" / "deeper", classes=1, per_class=2, seed=1)  # a tree, not only class folders
    (root / "notes.txt").write_text("not an image")
    chunks = []
    decode_all = byol.decode_all
    monkeypatch.setattr(ev, "EMBED_CHUNK", 3)
    monkeypatch.setattr(byol, "decode_all", lambda sources, *a: chunks.append(len(sources)) or decode_all(sources, *a))
    whole, paths, meta = embed([run.ckpt, root, "--out", tmp_path / "a.npz"], capsys)
    assert paths == [str(p) for p in sorted(root.rglob("*.png"))] and len(paths) == 8
    assert whole.shape == (8, 64) and whole.dtype == torch.float32
    assert chunks == [3, 3, 2]  # never more than a chunk of decoded images at once
    assert meta["checkpoint"] == str(run.ckpt) and meta["layer"] == "encoder"
    assert (meta["arch"], meta["image_size"], meta["method"], meta["baseline"]) == ("conv4", 16, "byol", None)
    one, same_paths, _ = embed([run.ckpt, root, "--batch-size", "1", "--out", tmp_path / "b.npz"], capsys)
    assert same_paths == paths and torch.allclose(one, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer, dim", [("encoder", 64), ("projector", 16)])
def test_the_embeddings_are_those_evaluation_computes(run, tmp_path, capsys, layer, dim):
    embeddings, paths, meta = embed([run.ckpt, run.tll, "--layer", layer, "--out", tmp_path / "e.npz"], capsys)
    assert embeddings.shape == (40, dim) and meta["layer"] == layer
    # eval.py's own path: the run's model and data, rebuilt by the training script's code.
    mod, ckpt = ev.load_checkpoint(run.ckpt)
    opts = ev.parse_args([str(run.ckpt)])
    args, own_data = ev.run_args(opts, mod, ckpt)
    data = ev.load_eval_data(opts, mod, ckpt, args, own_data)
    features, projections = mod.embed_images(ev.build_eval_model(opts, mod, ckpt, args), data.images, "cpu")
    row = {p: i for i, p in enumerate(paths)}
    assert sorted(row) == sorted(data.names)
    expected = features if layer == "encoder" else projections
    assert torch.allclose(embeddings[[row[n] for n in data.names]], expected, rtol=1e-5, atol=1e-6)


def test_a_zip_and_a_csv_list_embed_like_the_folder(run, tmp_path, capsys):
    folder, paths, _ = embed([run.ckpt, run.tll / "left", "--out", tmp_path / "f.npz"], capsys)
    with zipfile.ZipFile(tmp_path / "left.zip", "w") as zf:
        for p in paths:
            zf.write(p, f"left/{Path(p).name}")
    zipped, members, _ = embed([run.ckpt, tmp_path / "left.zip", "--out", tmp_path / "z.npz"], capsys)
    assert members == [f"{tmp_path / 'left.zip'}:left/{Path(p).name}" for p in paths]
    assert torch.allclose(zipped, folder, rtol=1e-5, atol=1e-6)
    # A CSV: a header, paths relative to the CSV and absolute ones, kept in their order, one row each.
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "first.jpg").write_bytes(Path(paths[0]).read_bytes())
    (tmp_path / "list.csv").write_text("path,label\nimgs/first.jpg,a\n" + "".join(f"{p},b\n" for p in paths[:0:-1]))
    listed, rows, _ = embed([run.ckpt, tmp_path / "list.csv", "--out", tmp_path / "c.npz"], capsys)
    assert rows == [str(tmp_path / "imgs" / "first.jpg")] + paths[:0:-1]
    assert torch.allclose(listed, torch.cat([folder[:1], folder[1:].flip(0)]), rtol=1e-5, atol=1e-6)


def test_baselines_and_the_other_scripts_checkpoints(run, tmp_path, capsys):
    pixels, paths, meta = embed(
        [
            "--baseline",
            "pixels",
            run.tll / "left",
            "--image-size",
            "8",
            "--eval-shift",
            "0",
            "--out",
            tmp_path / "p.npz",
        ],
        capsys,
    )
    assert pixels.shape == (20, 3 * 8 * 8) and meta["checkpoint"] is None and meta["baseline"] == "pixels"
    image = byol.decode_image(Path(paths[0]).read_bytes, paths[0], 8)
    assert torch.allclose(pixels[0], byol.normalize(image[None]).flatten())  # the normalised pixels themselves
    random, _, meta = embed([run.ckpt, "--baseline", "random", run.tll / "left", "--out", tmp_path / "r.npz"], capsys)
    assert random.shape == (20, 64) and meta["baseline"] == "random"
    for method, dims in [
        ("simsiam", ["--proj-dim", "32", "--pred-dim", "16"]),
        ("bn_only", ["--hidden-dim", "32", "--proj-dim", "16"]),
    ]:
        mod = ev.import_method(method, "test")
        args = mod.fill_defaults(mod.parse_args(["--data", "tll", "--image-size", "16", *dims]))
        ckpt = save_checkpoint(mod, args, mod.build_model(args), tmp_path / f"{method}.pt")
        projected, _, meta = embed(
            [ckpt, run.tll / "left", "--layer", "projector", "--out", tmp_path / f"{method}.npz"], capsys
        )
        assert meta["method"] == method and projected.shape == (20, 32 if method == "simsiam" else 16)


def test_a_frozen_encoder_run_embeds_what_it_learned(run, tmp_path, capsys):
    """--freeze-encoder trains the projector alone: embed takes its outputs, as evaluation ranks them; export writes that
    whole function (frozen encoder, whitening, projector) as a program, and no encoder state dict."""
    args = byol.fill_defaults(
        byol.parse_args(
            [
                "--data",
                "tll",
                "--image-size",
                "16",
                "--no-pretrained",
                "--width",
                "8",
                "--freeze-encoder",
                "--pca-dim",
                "4",
                "--hidden-dim",
                "32",
                "--proj-dim",
                "16",
            ]
        )
    )
    model = byol.build_model(args)
    with torch.no_grad():  # a whitening and projector batch norm that are not the identity, so that each must be exported
        model.encoder.fit_pca(torch.randn(64, 8) * torch.arange(1, 9))
        model.projector(torch.randn(32, 4))
    ckpt = save_checkpoint(byol, args, model, tmp_path / "last.pt")
    embeddings, _, meta = embed([ckpt, run.tll / "left"], capsys)
    assert meta["layer"] == "projector" and embeddings.shape == (20, 16)
    assert (tmp_path / "embeddings-left-projector.npz").is_file()  # the default --out: next to the checkpoint
    assert ev.main(["export", str(ckpt)]) == 0
    assert not (tmp_path / "embedding.pt").exists()  # the encoder is the one it started from: no state dict
    sidecar = json.loads((tmp_path / "embedding.json").read_text())
    assert (sidecar["layer"], sidecar["embedding_dim"], sidecar["program"]["file"]) == ("projector", 16, "embedding.pt2")
    again, _, meta = embed([tmp_path / "embedding.pt2", run.tll / "left", "--out", tmp_path / "again.npz"], capsys)
    assert meta["layer"] == "projector"
    torch.testing.assert_close(again, embeddings, rtol=1e-5, atol=1e-5)
    one_line_error(["embed", tmp_path / "embedding.pt2", run.tll, "--layer", "encoder", *QUIET], capsys, "--layer encoder")


# ----------------------------------------------------------------------------- search


def test_search_finds_the_query_itself_first(run, tmp_path, capsys, monkeypatch):
    npz = tmp_path / "tll.npz"
    _, paths, _ = embed([run.ckpt, run.tll, "--out", npz], capsys)
    hits = search([npz, "--query", paths[3], "--top-k", "4"], capsys)
    assert [h[0] for h in hits] == [1, 2, 3, 4] and hits[0][2] == paths[3] and hits[0][1] == pytest.approx(1, abs=1e-4)
    assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
    check_png(tmp_path / "tll-search.png")
    by_index = search([npz, "--index", "3", "0", "--out", tmp_path / "g.png"], capsys)  # rows of the file as queries
    assert len(by_index) == 10 and by_index[0][2] == paths[3] and by_index[5][2] == paths[0]
    check_png(tmp_path / "g.png")
    # The checkpoint moved: --checkpoint finds it; the baselines rebuild from what the file records.
    moved = tmp_path / "moved.pt"
    moved.write_bytes(run.ckpt.read_bytes())
    assert search([npz, "--query", paths[3], "--checkpoint", moved, "--overwrite"], capsys)[0][2] == paths[3]
    pixels = tmp_path / "pixels.npz"
    embed(["--baseline", "pixels", run.tll, "--image-size", "8", "--out", pixels], capsys)
    assert search([pixels, "--query", paths[5]], capsys)[0][2] == paths[5]
    # Without matplotlib: the results, no grid. A budget of one row per block; --top-k beyond the file: all of it.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    everything = search(
        [npz, "--index", "1", "--top-k", "100", "--memory-mb", "1e-9", "--out", tmp_path / "no.png"], capsys
    )
    assert len(everything) == 40 and everything[0][2] == paths[1] and sorted(h[2] for h in everything) == sorted(paths)
    assert not (tmp_path / "no.png").exists()


def test_top_k_block_by_block_equals_one_block():
    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(7, 8, generator=gen), torch.randn(50, 8, generator=gen)
    best = (F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T).topk(5, dim=1)
    for memory_mb in (1e-9, 1e-4, 512):  # one gallery row per block, a few, all at once
        scores, indices = ev.top_k(queries, gallery, 5, memory_mb)
        assert torch.equal(indices, best.indices) and torch.allclose(scores, best.values, atol=1e-6)


# ----------------------------------------------------------------------------- export


def test_the_exported_conv4_loads_into_plain_torch_nn(run, tmp_path, capsys):
    assert ev.main(["export", str(run.ckpt), "--out", str(tmp_path / "encoder.pt")]) == 0
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert (meta["arch"], meta["width"], meta["image_size"], meta["feature_dim"]) == ("conv4", [16, 16, 32, 64], 16, 64)
    # README's lines: torch.nn alone, no BYOL class, no training script.
    widths = meta["width"]
    blocks = [
        m
        for c_in, c_out in zip([3, *widths], widths)
        for m in (
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.MaxPool2d(2),
            nn.ReLU(),
        )
    ]
    encoder = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    encoder.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True))
    # The sidecar's preprocessing with plain PIL (the images are square: resizing is all there is to do).
    embeddings, paths, _ = embed([run.ckpt, run.tll / "left", "--out", tmp_path / "e.npz"], capsys)
    size = meta["image_size"]
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR))) for p in paths]
    ).permute(0, 3, 1, 2)
    x = (images / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(encoder(x), embeddings, rtol=1e-5, atol=1e-6)
    # The whole embedding function, with torch alone: RGB in [0, 1] in, the embeddings embed writes out.
    program = torch.export.load(tmp_path / "encoder.pt2").module()
    torch.testing.assert_close(program(images / 255), embeddings, rtol=1e-5, atol=1e-5)


def test_the_exported_program_keeps_test_time_shifts(run, tmp_path, capsys):
    """A run evaluated with --eval-shift exports the mean over the shifted copies; embed and search take the program."""
    shifted = tmp_path / "shifted.pt"
    ckpt = torch.load(run.ckpt, weights_only=False)
    ckpt["args"]["eval_shift"] = 2
    torch.save(ckpt, shifted)
    reference, paths, _ = embed([shifted, run.tll / "left", "--out", tmp_path / "ref.npz"], capsys)
    plain, _, _ = embed([shifted, run.tll / "left", "--eval-shift", "0", "--out", tmp_path / "plain.npz"], capsys)
    assert not torch.allclose(reference, plain, atol=1e-3)  # the shifts change the embedding
    assert ev.main(["export", str(shifted), "--out", str(tmp_path / "shifted-encoder.pt")]) == 0
    exported, _, meta = embed([tmp_path / "shifted-encoder.pt2", run.tll / "left", "--out", tmp_path / "x.npz"], capsys)
    assert meta["eval_shift"] == 0 and meta["checkpoint"].endswith("shifted-encoder.pt2")  # the shifts are inside it
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-5)
    hits = search([tmp_path / "x.npz", "--query", paths[2], "--top-k", "1"], capsys)
    assert hits[0][2] == paths[2] and hits[0][1] == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_an_exported_resnet_has_torchvision_keys(tmp_path, capsys, stem):
    args = byol.fill_defaults(
        byol.parse_args(
            [
                "--data",
                "tll",
                "--no-pretrained",
                "--arch",
                "resnet18",
                "--stem",
                stem,
                "--image-size",
                "32",
                "--hidden-dim",
                "32",
                "--proj-dim",
                "16",
            ]
        )
    )
    model = byol.build_model(args)
    with torch.no_grad():
        model.encoder(torch.randn(4, 3, 32, 32))  # batch-norm statistics of its own, so that eval mode matters
    ckpt = save_checkpoint(byol, args, model, tmp_path / "last.pt")
    assert ev.main(["export", str(ckpt)]) == 0
    assert json.loads((tmp_path / "encoder.json").read_text())["stem"] == stem
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    if stem == "small":  # README: the two lines of the small stem
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), model.encoder.eval()(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors: one line, no traceback


def one_line_error(argv, capsys, *expected):
    assert ev.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert str(text) in err, (text, err)


def test_bad_input_to_embed(run, tmp_path, capsys):
    one_line_error(["embed", run.ckpt, tmp_path / "nowhere", *QUIET], capsys, tmp_path / "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    one_line_error(["embed", run.ckpt, tmp_path / "empty", *QUIET], capsys, tmp_path / "empty", "holds no images")
    broken = make_folder(tmp_path / "broken", classes=1, per_class=2)
    (broken / "c0" / "img1.png").write_bytes(b"not a png")
    one_line_error(
        ["embed", run.ckpt, broken, "--out", tmp_path / "b.npz", *QUIET],
        capsys,
        f"cannot read image {broken / 'c0' / 'img1.png'}",
    )
    assert not (tmp_path / "b.npz").exists()  # nothing half-written
    (tmp_path / "list.csv").write_text(f"{broken / 'c0' / 'img0.png'}\nmissing.png\n")
    one_line_error(["embed", run.ckpt, tmp_path / "list.csv", *QUIET], capsys, tmp_path / "missing.png")
    one_line_error(["embed", run.tll, *QUIET], capsys, "nothing to embed with")
    one_line_error(
        ["embed", "--baseline", "random", "--layer", "projector", run.tll, *QUIET], capsys, "--layer projector"
    )
    one_line_error(["embed", run.ckpt, run.tll, "--arch", "resnet18", *QUIET], capsys, "--arch comes from CHECKPOINT")
    one_line_error(["embed", run.ckpt, run.tll, "--batch-size", "0", *QUIET], capsys, "--batch-size 0")
    one_line_error(["export", tmp_path / "list.csv"], capsys, tmp_path / "list.csv", "not a readable checkpoint")
    (tmp_path / "fake.pt2").write_bytes(b"not a program")
    one_line_error(["embed", tmp_path / "fake.pt2", run.tll, *QUIET], capsys, "fake.pt2", "not an embedding function")
    one_line_error(["export", run.ckpt, "--out", tmp_path / "e.pt2"], capsys, "--out", "OUT.pt2")


def test_bad_input_to_search(run, tmp_path, capsys):
    npz = tmp_path / "left.npz"
    embed([run.ckpt, run.tll / "left", "--out", npz], capsys)
    one_line_error(
        ["search", tmp_path / "missing.npz", "--index", "0"], capsys, tmp_path / "missing.npz", "does not exist"
    )
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    one_line_error(["search", garbage, "--index", "0"], capsys, garbage, "not a file of python eval.py embed")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, embeddings=np.zeros((3, 4), np.float32))
    one_line_error(["search", foreign, "--index", "0"], capsys, foreign, "not a file of python eval.py embed")
    array = tmp_path / "array.npy"
    np.save(array, np.zeros((3, 4), np.float32))
    one_line_error(["search", array, "--index", "0"], capsys, array, "not a file of python eval.py embed")
    for index in ("20", "-1"):
        one_line_error(["search", npz, "--index", index], capsys, f"--index {index} is out of range", "rows 0 to 19")
    one_line_error(["search", npz, "--query", tmp_path / "nope.png"], capsys, f"--query {tmp_path / 'nope.png'}")
    one_line_error(["search", npz, "--index", "0", "--top-k", "0"], capsys, "--top-k 0")
    # The checkpoint the file records is gone: say so, and how to point at it.
    ckpt = tmp_path / "gone.pt"
    ckpt.write_bytes(run.ckpt.read_bytes())
    gone = tmp_path / "gone.npz"
    embed([ckpt, run.tll / "left", "--out", gone], capsys)
    ckpt.unlink()
    one_line_error(["search", gone, "--query", run.tll / "left" / "p000.jpg"], capsys, ckpt, "--checkpoint")


def test_command_line_with_a_progress_bar(run, tmp_path, capsys, monkeypatch):
    """sys.argv reaches the tools; an unreadable image ends the bar with one error line, no traceback."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    monkeypatch.setattr(sys, "argv", ["eval.py", "embed", "--workers", "1", str(run.ckpt), str(tmp_path / "imgs")])
    assert ev.main() == 2
    err = capsys.readouterr().err
    assert "embed (encoder)" in err and "Traceback" not in err, err  # the bar
    last = err.splitlines()[-1]
    assert (
        last.startswith(f"eval.py: error: cannot read image {tmp_path / 'imgs' / 'bad.jpg'} (")
        and err.count("error") == 1
    )
