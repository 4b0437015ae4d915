"""Prepare a dataset once: decode, resize and group its images into one file, which the training scripts read.

    python prepare.py                                                # embedded Omniglot (data/omniglot), 28 px
    python prepare.py --data tll --data-dir ~/tll --image-size 96    # also pairs --pairs-csv F, folder, cifar10, stl10

The file is torch.save of a dict, read with torch.load(path, weights_only=True) or load() below:
  "format": 1; "images": uint8 [N, 3, S, S] (shorter side resized to S, bilinear, then the centre crop);
  "kind": "pairs" (tll, a pairs CSV), "classes" (Omniglot characters, class folders) or "images" (unlabelled);
  "groups": int64 [M, G], each row the image indices of one group of positives, padded with -1: a pair [left, right],
    a class (its images in order), one unlabelled image; "group_names": M str; "names": N str (path or zip:member);
  "labels": int64 [N], each image's class, and "test": bool [M], the official test split (cifar10, stl10 only);
  "episodes" [50, 2, 20], "test_runs" [20, 2, 20]: int64 (omniglot only), validation episodes and the official one-shot
    runs: row 0 the reference indices, row 1 the queries, query i matching reference i; their images are appended
    to "images" and belong to no group;
  "meta": {"source", "root", "image_size", "key"}: key, a sha256 of the format, source, size and every file read
    (name, bytes, mtime), lets prepare() notice changed data from os.stat alone and build the file again.
"""

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from pathlib import Path
from zipfile import BadZipFile, ZipFile

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from PIL.Image import DecompressionBombError
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import pil_to_tensor

FORMAT = 1
SOURCES = ("omniglot", "tll", "pairs", "folder", "cifar10", "stl10")
HERE = Path(__file__).resolve().parent
TLL_DRIVE_IDS = {"left": "1jvkbTr_giSP3Ru8OwGNCg6B4PvVbcO34", "right": "1EzBZUb_mh_Dp_FKD0P4XiYYSd0QBH5zW"}
TLL_PAGE = "https://sites.google.com/view/totally-looks-like-dataset"
# What a bad image raises. RuntimeError: an encrypted zip member; a bomb: more pixels than Pillow agrees to decode.
BAD_IMAGE = (OSError, ValueError, EOFError, KeyError, RuntimeError, BadZipFile, zlib.error, DecompressionBombError)
OMNIGLOT = ("images_background_small1.zip", "images_background_small2.zip", "all_runs.zip")  # training, episodes, test


class UserError(Exception):
    """Bad input: one line naming the file or flag and the fix."""


def to_rgb(img):
    """RGB as a viewer shows it: EXIF orientation applied, 16-bit and float scaled to 8 bits, transparency on white
    (convert("RGB") alone clips 16-bit images to white and shows the colours hidden under transparent pixels)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # floats usually lie in [0, 1]; others scale by their peak
        high = img.getextrema()[1]
        peak = 65535 if img.mode.startswith("I;16") else 1.0 if img.mode == "F" and high <= 1 else max(1, high)
        x = np.nan_to_num(np.asarray(img, dtype=np.float64) * (255 / peak))
        img = Image.fromarray(x.clip(0, 255).round().astype(np.uint8))
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def square(img, size):
    """The shorter side resized to `size` (bilinear), then the centre size x size crop."""
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_all(sources, names, size, workers):
    """uint8 [N, 3, size, size] from sources: image files (Paths) or zip members ((zip Path, name))."""
    local = threading.local()  # one ZipFile per thread and archive: threads sharing one race on Python 3.12+

    def decode(source, name):
        try:
            open_zip = vars(local).setdefault("open_zip", cache(ZipFile))
            data = source.read_bytes() if isinstance(source, Path) else open_zip(source[0]).read(source[1])
            with Image.open(io.BytesIO(data)) as img:
                return pil_to_tensor(square(to_rgb(img), size))
        except BAD_IMAGE as e:
            msg = f"cannot read image {name} ({e.__class__.__name__}: {e}); replace or remove that file"
            raise UserError(msg) from None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return torch.stack(list(pool.map(decode, sources, names)))


def is_image(path):
    # is_file: regular files only, as reading a FIFO named like an image would wait forever
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def image_files(root):
    """Every image under root, sorted: hidden files and folders left out, linked folders followed (each once)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [p for f in files if is_image(p := Path(top) / f)]
    return sorted(found)


def zip_members(path, ends=IMG_EXTENSIONS, read=False):
    """Sorted names of the members ending with `ends` (hidden ones left out), or with read, {name: text}."""
    try:
        with ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(ends) and not Path(n).name.startswith("."))
            return {n: zf.read(n).decode() for n in names} if read else names
    except (OSError, BadZipFile) as e:
        raise UserError(f"cannot read {path} ({e}); check the file or download it again") from None


def planned(sources, files=(), **fields):
    """(the files whose stats make the key, build(size, workers) -> the file's dict) for images decoded from sources."""
    files = [*files, *sorted({s if isinstance(s, Path) else s[0] for s in sources})]
    names = [str(s) if isinstance(s, Path) else f"{s[0]}:{s[1]}" for s in sources]
    return files, lambda size, workers: dict(images=decode_all(sources, names, size, workers), names=names, **fields)


def omniglot(root, download):
    """Characters of images_background_small1 as classes, validation episodes from small2, the official test runs."""
    train, small2, runs = (root / f for f in OMNIGLOT)
    names = zip_members(train, ".png")
    groups = {}  # "alphabet/character" -> image indices
    for i, n in enumerate(names):
        groups.setdefault("/".join(n.split("/")[-3:-1]), []).append(i)
    drawn = {small2: validation_episodes(small2, {n.split("/")[-3] for n in names}), runs: one_shot_runs(runs)}
    extra = sorted({(z, m) for z, eps in drawn.items() for ep in eps for row in ep for m in row})
    at = {s: len(names) + i for i, s in enumerate(extra)}  # the episodes' images come after the training ones
    index = {z: torch.tensor([[[at[z, m] for m in row] for row in ep] for ep in eps]) for z, eps in drawn.items()}
    sources, chars = [(train, n) for n in names] + extra, sorted(groups)
    fields = dict(kind="classes", groups=[groups[c] for c in chars], group_names=chars, episodes=index[small2])
    return planned(sources, test_runs=index[runs], **fields)


def validation_episodes(zip_path, exclude_alphabets, episodes=50, way=20):
    """20-way episodes of 20 characters of one alphabet that training does not see (Japanese (katakana), Sanskrit),
    one drawer's image of each as reference, another's as query: the old scripts' draws (seed 0), runs compare."""
    drawings = {}  # alphabet -> character -> sorted image names
    for n in zip_members(zip_path, ".png"):
        *_, alphabet, character, _ = n.split("/")
        if alphabet not in exclude_alphabets:
            drawings.setdefault(alphabet, {}).setdefault(character, []).append(n)
    alphabets = sorted(a for a, chars in drawings.items() if len(chars) >= way)
    if not alphabets:
        raise UserError(f"{zip_path} has no alphabet of {way} characters outside the training ones; download it again")
    gen, out = torch.Generator().manual_seed(0), []
    for e in range(episodes):
        chars = drawings[alphabets[e % len(alphabets)]]
        picked = [sorted(chars)[i] for i in torch.randperm(len(chars), generator=gen)[:way].tolist()]
        reference, query = torch.randperm(min(len(chars[c]) for c in picked), generator=gen)[:2].tolist()
        torch.randperm(way, generator=gen)  # the old query order, unused: drawn so that later episodes stay the same
        out.append([[chars[c][reference] for c in picked], [chars[c][query] for c in picked]])
    return out


def one_shot_runs(zip_path):
    """Each run's class_labels.txt lists (query, reference) lines: references sorted, each query beside its match."""
    runs = [text.split() for text in zip_members(zip_path, "class_labels.txt", read=True).values()]
    if not runs:
        raise UserError(f"{zip_path} holds no one-shot runs; download it again")
    return [list(zip(*sorted(zip(r[1::2], r[0::2])))) for r in runs]


def tll(root, download):
    """Totally Looks Like: left/NAME and right/NAME (or left.zip and right.zip members) are a positive pair."""
    sides = []
    for side, file_id in TLL_DRIVE_IDS.items():
        folder, archive = root / side, root / f"{side}.zip"
        if download and not (folder.is_dir() or archive.is_file()):
            try:
                torchvision.datasets.utils.download_file_from_google_drive(file_id, root, archive.name)
            except Exception as e:  # every network failure looks different; the fix is the same
                why = f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0]}"  # gdown's run to many lines
                fix = f"download left.zip and right.zip by hand from {TLL_PAGE} into {root}, run without --download"
                raise UserError(f"could not download TLL {archive.name} ({why}); {fix}") from None
        if folder.is_dir():
            sides.append({p.name: p for p in sorted(folder.iterdir()) if is_image(p)})
        elif archive.is_file():
            sides.append({Path(n).name: (archive, n) for n in zip_members(archive)})
        else:
            raise UserError(f"--data-dir {root} has neither {side}/ nor {side}.zip (the Totally Looks Like layout)")
    left, right = sides
    if not left:
        raise UserError(f"--data-dir {root}: no images found in left/; the dataset is empty")
    if left.keys() != right.keys():
        only = [sorted(a.keys() - b.keys())[:3] for a, b in ((left, right), (right, left))]
        raise UserError(f"--data-dir {root}: names only in left/ {only[0]}, only in right/ {only[1]}; pair them up")
    keys = sorted(left)
    groups = [[i, len(keys) + i] for i in range(len(keys))]
    return planned([left[k] for k in keys] + [right[k] for k in keys], kind="pairs", groups=groups, group_names=keys)


def pairs(csv_path, download):
    """Any CSV of (left, right) image paths, relative to the CSV; a first row naming no image is a header."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of a path
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise UserError(f"--pairs-csv {csv_path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    where = lambda cell: Path(os.path.abspath(csv_path.parent / cell.strip()))  # noqa: E731
    if rows and not any(where(c).is_file() or c.strip().lower().endswith(IMG_EXTENSIONS) for c in rows[0][:2]):
        rows = rows[1:]
    if not rows:
        raise UserError(f"--pairs-csv {csv_path} holds no pairs; the dataset is empty")
    if bad := [i + 1 for i, r in enumerate(rows) if len(r) < 2]:
        raise UserError(f"--pairs-csv {csv_path}: rows {bad[:3]} do not have two columns (left,right); fix them")
    if missing := [str(where(c)) for r in rows for c in r[:2] if not where(c).is_file()]:
        raise UserError(f"--pairs-csv {csv_path} names images that do not exist, e.g. {missing[:3]}; fix the paths")
    files = sorted({where(c) for r in rows for c in r[:2]}, key=str)
    at = {f: i for i, f in enumerate(files)}
    groups, names = [[at[where(r[0])], at[where(r[1])]] for r in rows], [f"{r[0].strip()},{r[1].strip()}" for r in rows]
    return planned(files, [csv_path], kind="pairs", groups=groups, group_names=names)


def folder(root, download):
    """Loose images (any directly in root): every image of the tree, unlabelled. Else class subfolders."""
    if any(is_image(p) for p in root.iterdir()):
        files = image_files(root)
        names = [str(p.relative_to(root)) for p in files]
        return planned(files, kind="images", groups=[[i] for i in range(len(files))], group_names=names)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    found = {c: files for c in classes if (files := image_files(root / c))}
    if not found:
        raise UserError(f"--data-dir {root} holds no images, loose or in class subfolders; the dataset is empty")
    files = [p for members in found.values() for p in members]
    at = {p: i for i, p in enumerate(files)}
    groups = [[at[p] for p in members] for members in found.values()]
    return planned(files, kind="classes", groups=groups, group_names=list(found))


def torchvision_data(data, root, download):
    """CIFAR-10 or STL-10, train and test split (not STL-10's unlabeled one): each image its own group."""
    cls = torchvision.datasets.CIFAR10 if data == "cifar10" else torchvision.datasets.STL10
    splits = [{"train": True}, {"train": False}] if data == "cifar10" else [{"split": "train"}, {"split": "test"}]
    if download:
        cls(root, download=True, **splits[0])  # one archive holds both splits
    files = sorted(p for p in (root / cls.base_folder).rglob("*") if p.is_file())
    if not files:
        raise UserError(f"no {data} under --data-dir {root}; add --download or fix the path")

    def build(size, workers):
        try:
            sets = [cls(root, **s) for s in splits]
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            raise UserError(f"{data} under --data-dir {root}: {e}; add --download or fix the path") from None
        images = torch.cat([torch.as_tensor(d.data) for d in sets])
        images = images.permute(0, 3, 1, 2) if data == "cifar10" else images  # CIFAR-10's arrays are [N, H, W, 3]
        if images.shape[-1] != size:
            images = F.interpolate(images.float(), size, mode="bilinear", antialias=True).round().clamp(0, 255).byte()
        labels = torch.tensor([int(t) for d in sets for t in (d.targets if data == "cifar10" else d.labels)])
        n, names = len(images), [f"{data}[{i}]" for i in range(len(images))]
        out = dict(images=images.contiguous(), kind="images", groups=[[i] for i in range(n)], group_names=names)
        return out | dict(names=names, labels=labels, test=torch.arange(n) >= len(sets[0]))

    return files, build


LOADERS = dict(omniglot=omniglot, tll=tll, pairs=pairs, folder=folder)
LOADERS |= {data: partial(torchvision_data, data) for data in ("cifar10", "stl10")}


def location(data, data_dir, pairs_csv, download):
    """The data's absolute path: --pairs-csv, --data-dir, or the source's default folder."""
    if data == "pairs":
        if pairs_csv is None:
            raise UserError("--data pairs needs --pairs-csv FILE, a CSV of (left, right) image paths")
        if not Path(pairs_csv).is_file():
            raise UserError(f"--pairs-csv {pairs_csv} does not exist or is not a file; check the path")
        return Path(pairs_csv).resolve()
    if data == "folder" and data_dir is None:
        raise UserError("--data folder needs --data-dir DIR (class subfolders, or a folder of images)")
    default = Path(os.environ.get("POSITIVE_SIMILARITY_DATA") or HERE / "data") / data
    root = Path(data_dir or (HERE / "data" / data if data == "omniglot" else default))
    download = download and data in ("tll", "cifar10", "stl10")  # these make their folder when they download
    if data_dir and not (download or root.is_dir()):
        raise UserError(f"--data-dir {data_dir} does not exist or is not a directory; check the path")
    if not (download or root.is_dir()):
        where = "where it is looked for without --data-dir ($POSITIVE_SIMILARITY_DATA or data/ beside prepare.py)"
        raise UserError(f"--data {data}: no data at {root}, {where}; put it there, add --download or pass --data-dir")
    return root.resolve()


def prepare(data, data_dir=None, pairs_csv=None, image_size=28, download=False, workers=4, cache_dir=None):
    """The path of the prepared file of `data` (module docstring), built when missing or when its data changed."""
    if data not in SOURCES:
        raise UserError(f"--data {data} is not one of {', '.join(SOURCES)}")
    root = location(data, data_dir, pairs_csv, download)
    files, build = LOADERS[data](root, download)
    base = root.parent if data == "pairs" else root
    stats = [(os.path.relpath(f, base), (st := os.stat(f)).st_size, st.st_mtime_ns) for f in files]  # no decoding
    key = hashlib.sha256(json.dumps([FORMAT, data, image_size, stats]).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", root.stem if data == "pairs" else root.name)
    slug = f"{name}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"  # two folders of one name: two files
    cache_dir = Path(cache_dir or os.environ.get("POSITIVE_SIMILARITY_CACHE") or HERE / "data" / "cache")
    path = cache_dir / f"{data}-{slug}-{image_size}px.pt"
    with contextlib.suppress(UserError):  # missing or unreadable: built again
        if load(path, mmap=True)["meta"]["key"] == key:  # mmap: the images stay unread
            return path
    start = time.time()
    out = build(image_size, workers)
    width = max(map(len, out["groups"]))
    out["groups"] = torch.tensor([g + [-1] * (width - len(g)) for g in out["groups"]], dtype=torch.long)
    meta = {"source": data, "root": str(root), "image_size": image_size, "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # written whole, then renamed: never half a file
    try:
        torch.save({"format": FORMAT, **out, "meta": meta}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    took = time.time() - start
    print(f"prepared {path}: {len(out['images'])} images, {len(out['groups'])} {out['kind']} ({took:.1f} s)")
    return path


def load(path, mmap=False):
    """The dict of a prepared file (module docstring); mmap: tensors read from disk only when used."""
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist; make it with python prepare.py")
    try:
        out = torch.load(path, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, corrupt or foreign: torch.load's many errors mean the same
        raise UserError(f"cannot read {path} ({e.__class__.__name__}); delete it and run prepare.py again") from None
    if not isinstance(out, dict) or out.get("format") != FORMAT:
        raise UserError(f"{path} is not a prepared file of format {FORMAT}; delete it and run prepare.py again")
    return out


def pixels(text):
    if not text.isdigit() or int(text) < 8:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels of at least 8")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=SOURCES, default="omniglot")
    parser.add_argument("--data-dir", help="the data's folder (--data folder: required)")
    parser.add_argument("--pairs-csv", help="--data pairs: a CSV of (left, right) image paths, relative to the CSV")
    parser.add_argument("--image-size", type=pixels, default=28, help="S: images are resized to S x S")
    parser.add_argument("--download", action="store_true", help="fetch tll, cifar10 or stl10 into the data folder")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    parser.add_argument("--cache-dir", help="where the file goes (default $POSITIVE_SIMILARITY_CACHE or data/cache)")
    a = parser.parse_args(argv)
    try:
        path = prepare(a.data, a.data_dir, a.pairs_csv, a.image_size, a.download, a.workers, a.cache_dir)
        d = load(path, mmap=True)
    except UserError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    runs = "".join(f", {len(d[k])} {k.replace('_', ' ')}" for k in ("episodes", "test_runs") if k in d)
    print(f"{path}\n{len(d['images'])} images of {d['images'].shape[-1]} px, {len(d['groups'])} {d['kind']}{runs}")


if __name__ == "__main__":
    main()
