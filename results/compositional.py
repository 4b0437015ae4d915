"""Compositional similarity (issue #29): pairs that share one attribute of two, where in-batch negatives are
often false negatives.

The images are Omniglot drawings (the embedded images_background_small1.zip) in one of four stroke colours. A
training pair shares the character (two people drew it; each drawing in its own random colour) or the colour
(two different characters in one colour), half and half. So a random other image of a batch shares the
anchor's colour one time in four: for a method with in-batch negatives that image is pushed away although it
is alike in colour. The test images are characters of other alphabets, each drawing in one random colour;
retrieval is scored per attribute.

    python results/compositional.py make OUT                     # OUT/train.csv, OUT/images/, OUT/test/, OUT/test.json
    python byol.py --data pairs --pairs-csv OUT/train.csv $(python results/compositional.py flags) --out RUN
    python results/compositional.py score OUT RUN [RUN ...]      # per attribute: P@1 and R-Precision, with baselines

`flags` prints the recipe every method trains with here: the pairs recipe at 28 px with conv4 32 64 128 256,
the handwriting augmentation of the Omniglot recipe, and no colour jitter or grayscale (colour is an attribute).
`bash results/negatives.sh compositional` runs it all for every method. Training pairs may share an image file (one
file per drawing and colour), so now and then one image's two pairs meet in a batch and, under in-batch negatives,
push its own copies apart: part of what a method with negatives pays here.
"""

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (200, 30, 30), "green": (30, 140, 30), "blue": (30, 60, 200), "orange": (210, 120, 0)}
TRAIN_ALPHABETS = ("Balinese", "Greek", "Korean")  # 88 characters
TEST_ALPHABETS = ("Early_Aramaic", "Latin")  # 48 characters, never trained on
SIZE = 28
FLAGS = (
    "--image-size 28 --width 32 64 128 256 --epochs 30 --jitter-strength 0 --gray-prob 0 --flip-prob 0 "
    "--solarize-prob 0 --crop-min-scale 0.6 --rotation 5 --shear 5 --stroke 0.3"
)


def drawings(zip_path):
    """{character: [drawing as float [SIZE, SIZE], 1 = white page]} for every character of small1."""
    out = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith(".png")):
            alphabet, character = name.split("/")[1:3]
            img = Image.open(io.BytesIO(zf.read(name))).convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
            out.setdefault((alphabet, f"{alphabet}/{character}"), []).append(np.asarray(img, dtype=np.float32) / 255)
    return out


def coloured(page, colour):
    """The drawing's strokes in `colour` on white."""
    rgb = np.array(COLOURS[colour], dtype=np.float32) / 255
    return Image.fromarray(np.round(255 * (page[..., None] + (1 - page[..., None]) * rgb)).astype(np.uint8))


def make(out, pairs, seed):
    rng = np.random.default_rng(seed)
    chars = drawings(REPO / "data" / "omniglot" / "images_background_small1.zip")
    train = {c: d for (a, c), d in chars.items() if a in TRAIN_ALPHABETS}
    test = {c: d for (a, c), d in chars.items() if a in TEST_ALPHABETS}
    names, colours = sorted(train), list(COLOURS)
    (out / "images").mkdir(parents=True)
    written = {}

    def image(char, k, colour):  # one file per (drawing, colour): pairs share files
        key = (char, k, colour)
        if key not in written:
            path = out / "images" / f"{char.replace('/', '_')}_{k:02d}_{colour}.png"
            coloured(train[char][k], colour).save(path)
            written[key] = path.relative_to(out)
        return written[key]

    rows = []
    for i in range(pairs):
        if i % 2 == 0:  # same character, two people's drawings, each in its own colour
            char = names[rng.integers(len(names))]
            k1, k2 = rng.choice(len(train[char]), 2, replace=False)
            rows.append(
                [image(char, k1, colours[rng.integers(4)]), image(char, k2, colours[rng.integers(4)]), "character"]
            )
        else:  # same colour, two characters
            c1, c2 = rng.choice(len(names), 2, replace=False)
            colour = colours[rng.integers(4)]
            rows.append(
                [image(names[c1], rng.integers(20), colour), image(names[c2], rng.integers(20), colour), "colour"]
            )
    with open(out / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([[str(a), str(b)] for a, b, _ in rows])
    (out / "test").mkdir()
    labels = {}
    for char in sorted(test):
        for k, page in enumerate(test[char]):
            colour = colours[rng.integers(4)]
            name = f"{char.replace('/', '_')}_{k:02d}_{colour}.png"
            coloured(page, colour).save(out / "test" / name)
            labels[name] = {"character": char, "colour": colour}
    (out / "test.json").write_text(json.dumps(labels, indent=0))
    return (
        f"{pairs} training pairs over {len(written)} images of {len(train)} characters (half share the "
        f"character, half the colour); {len(labels)} test images of {len(test)} other characters"
    )


def retrieval(emb, labels):
    """P@1 and R-Precision of one attribute: emb [N, D] (cosine), labels [N]."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1)
    same = labels[order] == labels[:, None]
    r = (labels[:, None] == labels[None]).sum(1) - 1
    rp = np.array([same[i, : r[i]].mean() for i in range(len(x)) if r[i] > 0])
    return {"p@1": float(same[:, 0].mean()), "r_precision": float(rp.mean())}


def run_ended(run):
    """RUN's last.pt (through byol.load_checkpoint, which reads any script's): its args, when it trained all its
    epochs or stopped early; else None."""
    sys.path.insert(0, str(REPO))
    import byol

    if not (run / "last.pt").exists():
        return None
    ckpt = byol.load_checkpoint(run / "last.pt")
    return ckpt["args"] if ckpt["epoch"] >= ckpt["args"]["epochs"] or ckpt["stopping"]["stopped"] else None


def embed(out, run, which, baseline=None, seed=0):
    """`eval.py embed` of OUT/test with RUN's best.pt (which="best": chosen on its validation pairs, else last.pt) or
    last.pt (which="last"), or a baseline (untrained: the omniglot recipe's conv4 32 64 128 256, as FLAGS, at seed)."""
    ckpt = run / "best.pt" if which == "best" and (run / "best.pt").exists() else run / "last.pt"
    npz = run / f"compositional-{baseline or which}.npz"
    if not npz.exists() or npz.stat().st_mtime < ckpt.stat().st_mtime:  # embedded from this checkpoint
        source = ["--baseline", baseline, "--image-size", str(SIZE), "--seed", str(seed)] if baseline else [str(ckpt)]
        cmd = [sys.executable, str(REPO / "eval.py"), "embed", *source, str(out / "test"), "--out", str(npz)]
        subprocess.run([*cmd, "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    data = np.load(npz)
    return data["embeddings"], [Path(p).name for p in data["paths"]]


def score(out, runs, which):
    labels = json.loads((out / "test.json").read_text())
    args = [run_ended(run) for run in runs]
    for run, a in zip(runs, args):
        if a is None:
            raise SystemExit(f"compositional.py: error: {run} has not finished training (its last.pt); rerun it")
    rows = []
    for run in runs:
        for who in [None, "untrained", "pixels"] if run == runs[0] else [None]:  # the baselines once
            emb, names = embed(out, run, which, who, args[0]["seed"])
            row = {"run": {"untrained": "untrained conv4", "pixels": "raw pixels"}.get(who, run.name)}
            for attr in ("character", "colour"):
                m = retrieval(emb, np.array([labels[n][attr] for n in names]))
                row.update({f"{attr}_{k}": v for k, v in m.items()})
            rows.append(row)
    print(f"{which}.pt of each run\n")
    print("| embedding | character P@1 | character R-Precision | colour P@1 | colour R-Precision |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['run']} | {r['character_p@1']:.3f} | {r['character_r_precision']:.3f} | {r['colour_p@1']:.3f} | "
            f"{r['colour_r_precision']:.3f} |"
        )
    print(
        f"\nchance: character {1 / 48:.3f} (48 test characters), colour 0.250 (four colours); "
        f"{len(labels)} test images, each its own query against all the others"
    )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write the data set")
    m.add_argument("out", type=Path)
    m.add_argument("--pairs", type=int, default=3000)
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser(
        "score", help="per-attribute retrieval of runs on the test images (the first run's baselines too)"
    )
    s.add_argument("out", type=Path)
    s.add_argument("runs", type=Path, nargs="+")
    s.add_argument(
        "--checkpoint",
        default="best",
        choices=["best", "last"],
        help="best.pt (chosen on the run's validation pairs, what a user of the recipe gets) or last.pt",
    )
    sub.add_parser("flags", help="print the training flags every method uses here")
    args = p.parse_args(argv)
    if args.cmd == "flags":
        print(FLAGS)
    elif args.cmd == "make":
        if args.out.exists():
            p.error(f"{args.out} exists; remove it or name another folder")
        partial = args.out.with_name(
            args.out.name + ".partial"
        )  # renamed when whole: an interrupted make leaves no OUT
        shutil.rmtree(partial, ignore_errors=True)
        summary = make(partial, args.pairs, args.seed)
        partial.rename(args.out)
        print(f"{args.out}: {summary}")
    else:
        score(args.out, args.runs, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
