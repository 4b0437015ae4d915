"""Evaluate a run of byol.py, simsiam.py, bn_only.py or contrastive.py on its held-out test data against the baselines
a user already has, then use its similarity: embed images, search them, export the encoder, plot the training curves.

    python eval.py runs/byol-omniglot-s0                            # = evaluate: test metrics, baselines, a verdict
    python eval.py evaluate runs/byol-tll-s0/best.pt --data-dir ~/tll --baselines cheap   # the data moved: same split
    python eval.py evaluate --baseline pretrained --whiten --data tll --data-dir ~/tll --seed 0 --holdout 0.2
    python eval.py embed runs/byol-tll-s0 ~/photos --out photos.npz  # a folder tree, a .zip or a CSV list of paths
    python eval.py embed --baseline pretrained ~/photos --out photos-lite0.npz
    python eval.py search photos.npz --query me.jpg --top-k 5 --out me.png   # or --index 0 17: rows of the .npz
    python eval.py export runs/byol-tll-s0 --out enc.pt             # enc.pt, enc.json and enc.pt2 (torch.export)
    python eval.py plot runs/byol-tll-s0                            # curves.png of its log.jsonl

RUN is a run directory (its best.pt; last.pt when the run had no validation) or a checkpoint file. The model, the data
and the split come from the checkpoint: eval.py calls the script that wrote it (build_model, load_data), so the test
groups are those the run never trained on, and the metrics are the scripts' own (rank_of_true, recall_at_1,
r_precision, score): ties count at random, so a collapsed embedding scores chance, not 1.
  one-shot runs (Omniglot)  the 20 official 20-way runs: nearest reference of each query (one_shot_20way)
  pairs (tll, --pairs-csv)  Recall@1/5/10 and MRR, left->right (l2r, the headline) and right->left (r2l)
  classes (class folders)   R-Precision (the headline), Precision@1 and MAP@R (Musgrave et al. 2020)
  labelled images           cifar10, stl10: weighted kNN accuracy (k=20) on the official test split
  unlabelled images         the recall@1 of augmented copies among the held-out originals (as validation)
Baselines, on the same test data: raw pixels, the untrained network (same arch and seed), a frozen ImageNet encoder
at its native resolution (tf_efficientnet_lite0 at 224 px, offline), and the same whitened on training images: by
PCA, and from the positive pairs (learned whitening). The trained features are whitened the same ways.
What ships: each embedding is also scored on the run's validation split, as training scores it; the best of the
trained and the frozen ones, plain or whitened, is the run's embedding (RUN/chosen.pt), which embed, search and
export use.
Checkpoints are unpickled: evaluate only files you trust.
"""

import argparse
import csv
import hashlib
import importlib
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS

import byol  # the machinery below its "shared" marker is the same in all five scripts
import prepare

METHODS = ("byol", "simsiam", "bn_only", "contrastive", "redundancy")
COMMANDS = ("evaluate", "embed", "search", "export", "plot")
PATH_ARGS = ("data_dir", "pairs_csv", "data_file", "out")  # stored in checkpoints as str
HEADLINE = ("one_shot_20way", "l2r_recall@1", "r_precision", "knn@20", "aug_copy_recall@1")  # the first found: verdict
RECALL_KS = (1, 5, 10)
KNN_K, KNN_T = 20, 0.07  # weighted kNN (Wu et al. 2018): the neighbours' votes weigh exp(cosine / T)
WHITEN_DIMS, WHITEN_IMAGES, SHRINKAGE = 256, 4096, 0.3
LITE0 = "tf_efficientnet_lite0"
CHUNK = 1024  # images decoded or embedded, or queries compared, at a time: memory stays bounded
BASELINES = {"none": [], "cheap": ["pixels", "untrained"], "all": ["pixels", "untrained", "pretrained", "whitened"]}
STARTS = ("trained", "frozen")  # the embeddings a run may ship (names that begin so), chosen on validation


class UserError(Exception):
    """Bad input: one line naming the file or flag and the fix. Each script and prepare.py has its own such class;
    main() reports any exception of that name."""


def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# ----------------------------------------------------------------------------- runs and models


def load_run(run):
    """(script module, checkpoint, its args, the checkpoint file) of a run directory or a checkpoint file."""
    path = Path(run)
    if path.is_dir():  # a run without validation data writes no best.pt
        path = path / ("last.pt" if (path / "last.pt").is_file() and not (path / "best.pt").is_file() else "best.pt")
    if not path.is_file():
        raise UserError(f"{run} is neither a run directory nor a checkpoint; pass a run's folder or its best.pt")
    ckpt = byol.load_checkpoint(path)  # one checkpoint layout for all five scripts
    if ckpt.get("method") not in METHODS:
        raise UserError(f"{path} is not a checkpoint of {', '.join(m + '.py' for m in METHODS)}")
    args = SimpleNamespace(**ckpt["args"])
    for key in PATH_ARGS:
        if getattr(args, key, None) is not None:
            setattr(args, key, Path(getattr(args, key)))
    return importlib.import_module(ckpt["method"]), ckpt, args, path


def trained_model(mod, ckpt, args):
    model = mod.build_model(SimpleNamespace(**{**vars(args), "pretrained": False}))  # the weights: the checkpoint's
    model.load_state_dict(ckpt["model"])
    return model


def untrained_model(mod, args):
    torch.manual_seed(args.seed)  # the run's own start: train() seeds, then builds
    return mod.build_model(SimpleNamespace(**{**vars(args), "pretrained": False}))


class Embedding(nn.Module):
    """An embedding function shaped like the methods' models for embed_images and score: `encoder` is all of it."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.projector = encoder, nn.Identity()


class Remembered(nn.Module):
    """An encoder that keeps its output for each batch it has seen (keyed by the batch's bytes): the embeddings built
    on it (plain and whitened), scored on validation and on the test, extract each image's features once."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.seen = encoder, {}

    def forward(self, x):
        key = hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
        if key not in self.seen:
            self.seen[key] = self.encoder(x)
        return self.seen[key]


def as_embedding(model, which):
    return Embedding(nn.Sequential(model.encoder, model.projector) if which == "projector" else model.encoder)


def pretrained_encoder(arch):
    """A frozen ImageNet encoder and the resolution its weights were trained at (timm's data config; else 224)."""
    try:
        encoder, _ = byol.build_encoder(arch, "imagenet", True)
    except Exception as e:  # torchvision's weights are a download: offline, any of many errors
        if type(e).__name__ == "UserError":
            raise
        raise UserError(f"--pretrained-arch {arch}: no ImageNet weights here ({e.__class__.__name__}); use {LITE0}, "
                        "whose weights load offline") from None
    if isinstance(encoder, byol.TimmBackbone):
        from timm.data import resolve_model_data_config
        return encoder, resolve_model_data_config(encoder.net)["input_size"][-1]
    return encoder, 224


def baseline_model(kind, mod, args, embedding="encoder", arch=LITE0):
    """(model for embed_images, its image size) of the pixels, untrained or pretrained baseline."""
    if kind == "pixels":
        return byol.Pixels(), args.image_size
    if kind == "untrained":
        return as_embedding(untrained_model(mod, args), embedding), args.image_size
    encoder, size = pretrained_encoder(arch)
    return Embedding(encoder), size


class Whiten(nn.Module):
    """PCA whitening of L2-normalised features: (x - mean) @ w."""

    def __init__(self, mean, w):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("w", w)

    def forward(self, x):
        return (F.normalize(x.float(), dim=1) - self.mean) @ self.w


def fit_whitening(feats, dims=WHITEN_DIMS):
    """(mean, w) that whiten L2-normalised features: their top `dims` principal directions (at most the rank of the
    centred features), each scaled to unit variance, with a floor on small variances that would blow up noise.
    The SVD of the centred features gives the covariance's eigenvectors, and its eigenvalues s^2 / (n - 1)."""
    x = F.normalize(feats.double(), dim=1)
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    k = max(1, min(dims, len(x) - 1, x.shape[1]))
    variances = s[:k] ** 2 / max(1, len(x) - 1)
    floor = max(1e-6 * variances[0].item(), 1e-12)
    return mean.float(), (vh[:k].T / variances.clamp(min=floor).sqrt()).float()


def fit_pair_whitening(feats, pairs, dims=WHITEN_DIMS, shrinkage=SHRINKAGE):
    """(mean, w) of learned whitening from positive pairs (Radenovic, Tolias & Chum 2018; cirtorch's whitenlearn) on
    L2-normalised features: whiten by the covariance of the differences within pairs, shrunk toward its diagonal
    (fewer pairs than dimensions), then rotate by PCA of the whitened features, keeping the top `dims`. Positives
    only, in closed form: it cannot collapse. The inverse square root stands for cirtorch's inverse Cholesky factor:
    they differ by a rotation, which the PCA undoes (up to each axis' sign, which cosines ignore)."""
    x = F.normalize(feats.double(), dim=1)
    mean, diff = x[pairs[:, 0]].mean(0), x[pairs[:, 0]] - x[pairs[:, 1]]
    cov = diff.T @ diff / len(diff)
    cov = (1 - shrinkage) * cov + shrinkage * torch.diag(cov.diagonal())
    values, vectors = torch.linalg.eigh(cov)
    p = vectors @ torch.diag(values.clamp(min=max(1e-6 * values[-1].item(), 1e-12)).rsqrt()) @ vectors.T
    values, vectors = torch.linalg.eigh(p @ (x - mean).T @ (x - mean) @ p)  # the whitened features' PCA, ascending
    return mean.float(), (p @ vectors.flip(1)[:, :dims]).float()


def positive_pairs(rows):
    """(a, b) image indices of the same group, each member with the next one (rows padded with -1)."""
    a, b = rows[:, :-1].flatten(), rows[:, 1:].flatten()
    return torch.stack([a, b], 1)[(a >= 0) & (b >= 0)]


def whitened(frozen, data, device, shift=0, fit_groups=None):
    """{suffix: frozen, then whitened}: PCA whitening, and learned whitening from the positive pairs, both fitted on
    features of training images only (the images of a seeded sample of training groups, at most 4096 images; with
    fit_groups, those of its groups in fit_groups: the features are the sample's, extracted once)."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    rows, groups = data.groups[data.train][order], torch.tensor(data.train, dtype=torch.long)[order]
    sample = ((rows >= 0).sum(1).cumsum(0) <= WHITEN_IMAGES) | (torch.arange(len(rows)) == 0)
    rows, groups = rows[sample].clone(), groups[sample]
    images, rows[rows >= 0] = torch.unique(rows[rows >= 0], return_inverse=True)  # rows: positions in `images`
    feats = features(frozen, data.images, images, device, shift)
    if fit_groups is not None:  # the sample's rows of those groups, and their images' features
        rows = rows[torch.isin(groups, torch.tensor(fit_groups, dtype=torch.long))].clone()
        used, rows[rows >= 0] = torch.unique(rows[rows >= 0], return_inverse=True)
        feats = feats[used]
    found = {"whitened": Whiten(*fit_whitening(feats))}
    if data.kind != "images" and len(pairs := positive_pairs(rows)):
        found["whitened from positives"] = Whiten(*fit_pair_whitening(feats, pairs))
    return {k: Embedding(nn.Sequential(frozen.encoder, w)) for k, w in found.items()}


# ----------------------------------------------------------------------------- data


class Resized:
    """images[index] upsampled to size x size when read (bilinear, as prepare.py resizes): the images stay small in
    memory, and only a chunk is ever upsampled."""

    def __init__(self, images, size):
        self.images, self.size = images, size

    def __getitem__(self, index):
        x = F.interpolate(self.images[index].float(), size=self.size, mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8)


def run_data(mod, args, ckpt, opts):
    """The run's data through its script's load_data, from where it lives now (--data-dir, --pairs-csv,
    --data-file), refused when its test groups are not the run's."""
    moved = {k: Path(v) for k in ("data_dir", "pairs_csv", "data_file") if (v := getattr(opts, k)) is not None}
    if moved.keys() & {"data_dir", "pairs_csv"}:
        args.data_file = None  # the source moved: prepare it from there
    vars(args).update(moved, download=False)
    data = mod.load_data(args)
    if data.split != ckpt["split"]:
        raise UserError("the data is not the run's: its validation and test groups differ from those the run held "
                        "out (a changed dataset would leak training data into the test); pass the run's data")
    return data


def at_size(mod, args, data, size):
    """(data, args, note) at `size` px for a pretrained encoder: its source decoded again when there is one with
    more pixels; else (--data-file, cifar10's 32 px originals) the images upsampled. The same groups and split."""
    args = SimpleNamespace(**{**vars(args), "image_size": size, "eval_shift": 0})
    if size == data.images.shape[-1]:
        return data, args, None
    if args.data_file is None and args.data != "cifar10":
        again = mod.load_data(args)
        if again.split != data.split:
            raise UserError(f"--data {args.data} prepared at {size} px has other groups; prepare it again")
        return again, args, f"{args.data} prepared again at {size} px"
    why = "--data-file: no source to decode again" if args.data_file else "its originals are 32 px"
    return SimpleNamespace(**{**vars(data), "images": Resized(data.images, size)}), args, \
        f"the {data.images.shape[-1]} px images upsampled to {size} px ({why})"


def image_sources(source):
    """The images of a folder tree, a .zip or a CSV list of paths (first column, relative to the CSV), as prepare.py
    names them: absolute Paths, or (zip, member)."""
    source = Path(os.path.abspath(source))
    if source.is_dir():
        found = prepare.image_files(source)
    elif source.suffix.lower() == ".zip" and source.is_file():
        found = [(source, m) for m in prepare.zip_members(source)]
    elif source.suffix.lower() == ".csv" and source.is_file():
        found = csv_images(source)
    elif not source.exists():
        raise UserError(f"SOURCE {source} does not exist; pass a folder, a .zip or a CSV list of image paths")
    else:
        raise UserError(f"SOURCE {source} is not a folder, a .zip or a .csv; pass one of those")
    if not found:
        raise UserError(f"SOURCE {source} holds no images (.png, .jpg, ...)")
    return found


def csv_images(path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of a path
            cells = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"SOURCE {path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    files = [Path(os.path.abspath(path.parent / c)) for c in cells]
    if files and not files[0].is_file() and not cells[0].lower().endswith(IMG_EXTENSIONS):
        files = files[1:]  # a header: it names no image
    if missing := [str(f) for f in files if not f.is_file()]:
        raise UserError(f"SOURCE {path} names images that do not exist, e.g. {missing[:3]}; fix the paths")
    return files


def source_of(name, flag):
    """The prepare.py source of a name that embed wrote (a path, or ZIP:MEMBER) or that a user typed."""
    if not Path(name).is_file() and (m := re.match(r"(.*?\.zip):(.+)", str(name), re.IGNORECASE)) \
            and Path(m[1]).is_file():
        return Path(m[1]), m[2]
    if not Path(name).is_file():
        raise UserError(f"{flag} {name} does not exist; check the path")
    return Path(os.path.abspath(name))


def source_name(source):
    """A source as prepare.py names it: the path, or ZIP:MEMBER."""
    return str(source) if isinstance(source, Path) else f"{source[0]}:{source[1]}"


def decode(sources, size, workers):
    """uint8 [N, 3, size, size] of prepare.py sources, decoded and resized as prepare.py does."""
    return prepare.decode_all(sources, [source_name(s) for s in sources], size, workers)


# ----------------------------------------------------------------------------- metrics


def features(model, images, index, device, shift=0):
    """Encoder outputs (embed_images' first) of images[index] on the CPU, a chunk at a time."""
    model.to(device)
    parts = [byol.embed_images(model, images[i], device, shift)[0].cpu() for i in index.split(CHUNK)]
    return torch.cat(parts) if parts else torch.empty(0)


def ranks(queries, gallery):
    """For each query i: how many gallery items score above gallery[i] (cosine), and how many score exactly as it,
    itself included. rank_of_true's counts, a chunk of queries at a time."""
    q, g = F.normalize(queries.float(), dim=1), F.normalize(gallery.float(), dim=1)
    greater, tied = [], []
    for start in range(0, len(q), CHUNK):
        sim = q[start: start + CHUNK] @ g.T
        own = sim.gather(1, torch.arange(start, start + len(sim))[:, None])
        greater.append((sim > own).sum(1))
        tied.append((sim == own).sum(1))
    return torch.cat(greater), torch.cat(tied)


def pair_metrics(left, right):
    """Recall@K and MRR both ways, in expectation over random tie orders: the match sits at each of the ranks
    greater+1 .. greater+tied alike (rank_of_true's rule, so Recall@1 is the scripts' recall_at_1)."""
    out = {}
    for way, queries, gallery in (("l2r", left, right), ("r2l", right, left)):
        greater, tied = ranks(queries, gallery)
        for k in RECALL_KS:
            out[f"{way}_recall@{k}"] = ((k - greater).clamp(min=0).minimum(tied).float() / tied).mean().item()
        harmonic = lambda n: torch.special.digamma(n.double() + 1)  # H(n), less a constant that cancels
        out[f"{way}_mrr"] = ((harmonic(greater + tied) - harmonic(greater)) / tied).mean().item()
    return out


def class_metrics(feats, labels):
    """R-Precision (the scripts'), Precision@1 (ties at random) and MAP@R over the R nearest others of each image
    whose class has another (R: their number), ordered as r_precision orders them."""
    f = F.normalize(feats.float(), dim=1)
    sim = (f @ f.T).fill_diagonal_(-float("inf"))
    same = (labels[:, None] == labels[None]).fill_diagonal_(False)
    r, keep = same.sum(1), same.sum(1) > 0
    if not keep.any():
        return {}
    top = sim == sim.max(1, keepdim=True).values
    hits = same.gather(1, sim.topk(int(r.max()), dim=1).indices) & (torch.arange(int(r.max()))[None] < r[:, None])
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    return {"r_precision": byol.r_precision(feats, labels),
            "precision@1": ((top & same).sum(1) / top.sum(1))[keep].mean().item(),
            "map@r": ((precision * hits).sum(1) / r.clamp(min=1))[keep].mean().item()}


def knn_accuracy(bank, bank_labels, queries, labels, k=KNN_K):
    """Weighted kNN: each query takes the class of the largest sum of exp(cosine / T) among its k nearest."""
    b, correct = F.normalize(bank.float(), dim=1), 0
    for q, y in zip(F.normalize(queries.float(), dim=1).split(CHUNK), labels.split(CHUNK)):
        sim, idx = (q @ b.T).topk(min(k, len(b)), dim=1)
        votes = torch.zeros(len(q), int(bank_labels.max()) + 1).scatter_add_(1, bank_labels[idx], (sim / KNN_T).exp())
        correct += (votes.argmax(1) == y).sum().item()
    return correct / len(labels)


def measure(model, data, args, device):
    """The test metrics of one embedding function (model shaped for embed_images: its encoder output is used)."""
    model, out = model.to(device), {}
    embed = lambda index: features(model, data.images, index, device, args.eval_shift)
    if data.test_runs is not None:  # the official runs, scored by score()'s own episode code
        runs = SimpleNamespace(**{**vars(data), "episodes": data.test_runs})
        out["one_shot_20way"] = byol.score(model, runs, "val", args, device)[1]
    rows = data.groups[data.test]
    if len(rows) < 2:  # a ranking among fewer says nothing
        return out
    if data.kind == "pairs":
        out.update(pair_metrics(embed(rows[:, 0]), embed(rows[:, 1])))
    elif data.kind == "classes":
        out.update(class_metrics(embed(rows[rows >= 0]), torch.arange(len(rows))[:, None].expand_as(rows)[rows >= 0]))
    elif data.labels is not None:
        bank = data.groups[data.train + data.val][:, 0]
        out[f"knn@{KNN_K}"] = knn_accuracy(embed(bank), data.labels[bank], embed(rows[:, 0]), data.labels[rows[:, 0]])
    else:
        out["aug_copy_recall@1"] = byol.score(model, data, "test", args, device)[1]
    return out


def baselines(kinds, mod, args, data, device, embedding, arch):
    """({name: (model, data, args)}, notes) of the baselines `kinds`, each with the data it reads: the pretrained
    encoder's at its native size."""
    found, notes = {}, []
    for kind in [k for k in kinds if k != "whitened"]:
        model, size = baseline_model(kind, mod, args, embedding, arch)
        if kind != "pretrained":
            found["raw pixels" if kind == "pixels" else f"untrained {args.arch}"] = (model, data, args)
            continue
        name, model = f"frozen {arch} {size}px", Embedding(Remembered(model.encoder))
        sized, sized_args, note = at_size(mod, args, data, size)
        notes += [f"{name}: {note}"] if note else []
        if "pretrained" in kinds:
            found[name] = (model, sized, sized_args)
        for suffix, whitened_model in whitened(model, sized, device).items() if "whitened" in kinds else ():
            found[f"{name} {suffix}"] = (whitened_model, sized, sized_args)
    return found, notes


def validate(entries, data, args, device):
    """(metric, {name: score}, how) of each embedding (name: (model, data, args)) on validation, as the scripts score:
    pairs and classes rank among up to 1024 training images. Here those are of one half of the training groups, and
    each whitening is fitted again on the other half, so that it never saw its distractors, which would flatter it
    (RESULTS.md, "A user's own images"); then the halves swap, and the two scores are averaged. Episodes, and copies
    of loose images, rank no training images: they are scored once, as they are."""
    halves = byol.split(data.train, len(data.train) // 2, args.seed + 3)
    split = data.episodes is None and data.kind != "images" and len(data.train) >= 2  # 10 classes, half held out: 3
    scores = {}
    for fit, pool in [halves, halves[::-1]] if split else [(None, data.train)]:
        refitted = {}
        for name, (e, d, a) in entries.items():
            if fit is not None and isinstance(e.encoder, nn.Sequential) and isinstance(e.encoder[-1], Whiten):
                base = e.encoder[0]  # the encoder its whitenings share
                refitted[base] = refitted.get(base) or whitened(Embedding(base), d, device, a.eval_shift, fit)
                e = refitted[base].get("whitened from positives" if name.endswith("from positives") else "whitened", e)
            metric, value = byol.score(e, SimpleNamespace(**{**vars(d), "train": pool}), "val", a, device)
            scores.setdefault(name, []).append(value)
    how = ("the validation groups among images of each half of the training groups in turn, each whitening fitted on "
           "the other half; the two scores averaged") if split else "as the training scripts score it"
    return metric, {name: None if None in s else sum(s) / len(s) for name, s in scores.items()}, how


def choose(validation, alone=None):
    """(name, line) of the embedding a run ships: of the trained and the frozen embeddings, plain or whitened, the
    best on validation; between equals, the best over the validation groups alone (`alone`), then the first (the
    trained one comes first); the trained one when nothing was validated."""
    scored, alone = {k: v for k, v in validation.items() if v is not None and k.startswith(STARTS)}, alone or {}
    if "trained" not in scored:
        return "trained", "no validation data: the trained embedding ships, unchosen (raise --val-fraction)"
    key = lambda k: (scored[k], alone.get(k) or -float("inf"))  # noqa: E731
    best = max(scored, key=key)
    runner_up = max((k for k in scored if k != best), key=key, default=None)
    if runner_up and scored[best] == scored[runner_up]:
        return best, f"ships {best}: on validation it ties with {runner_up} ({scored[best]:.4f}), " + (
            f"and over the validation groups alone scores {alone[best]:.4f} against {alone[runner_up]:.4f}"
            if key(best) != key(runner_up) else "and so it does over the validation groups alone: validation cannot "
            "decide")
    margin = f", {scored[best] - scored[runner_up]:+.4f} over {runner_up}" if runner_up else ""
    lost = "" if best.startswith("trained") else ": training did not beat the frozen features, so they ship"
    return best, f"ships {best}, the best on validation ({scored[best]:.4f}{margin}){lost}"


def verdict(metric, trained, baseline_results):
    """The one plain line: does the trained embedding beat the strongest baseline on the headline metric?"""
    scored = {name: r[metric] for name, r in baseline_results.items() if r.get(metric) is not None}
    if not scored:
        return None
    name = max(scored, key=scored.get)
    return (f"trained {trained:.4f}: {'beats' if trained > scored[name] else 'does NOT beat'} the strongest baseline, "
            f"{name} {scored[name]:.4f}, by {trained - scored[name]:+.4f} ({metric})")


def table(results):
    metrics = list(dict.fromkeys(k for r in results.values() for k in r))
    width, cols = max(map(len, results)), [max(7, len(m)) for m in metrics]
    cell = lambda v, w: f"{'-':>{w}}" if v is None else f"{v:>{w}.4f}"
    lines = [" " * width + "".join(f"  {m:>{w}}" for m, w in zip(metrics, cols))]
    lines += [f"{name:<{width}}" + "".join(f"  {cell(r.get(m), w)}" for m, w in zip(metrics, cols))
              for name, r in results.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- outputs


def check_out(path, overwrite):
    if path.exists() and not overwrite:
        raise UserError(f"--out {path} exists; add --overwrite to replace it, or name another file")


def write_atomic(writers):
    """{path: write(tmp)}: each file written to a temporary name beside it, then all renamed once all are written;
    a failure (a full disk, a kill, a failed export) leaves no half file and none of the set."""
    tmps = {p: p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}") for p in writers}  # suffix: savefig reads it
    try:
        for path, write in writers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free space or pick another --out") from None
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def write_json(path, obj):
    write_atomic({path: lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n")})


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- commands


def cmd_evaluate(opts):
    device = pick_device(opts.device)
    standalone = [f"--{k.replace('_', '-')}" for k in ("data", "seed", "holdout", "image_size", "arch", "whiten")
                  if getattr(opts, k) not in (None, False)]
    if opts.run is None and opts.baseline is None:
        raise UserError("nothing to evaluate: pass RUN (a run directory or checkpoint), or --baseline with --data")
    if opts.run is not None and (opts.baseline or standalone):
        raise UserError(f"{(['--baseline'] if opts.baseline else standalone)[0]} is for a baseline without a run: "
                        "RUN fixes its data and model; its baselines are --baselines none|cheap|all")
    out = Path(opts.out) if opts.out else None
    if out is not None:
        out = out if out.suffix == ".json" else out / "eval.json"  # a folder, as the old eval.py took
        check_out(out, opts.overwrite)
    if opts.run is None:
        return evaluate_baseline(opts, device, out)
    mod, ckpt, args, path = load_run(opts.run)
    model = trained_model(mod, ckpt, args).to(device)  # before the data: a bad checkpoint fails fast
    data = run_data(mod, args, ckpt, opts)
    trained = Embedding(Remembered(as_embedding(model, opts.embedding).encoder))  # features shared by its whitenings
    results = {"trained": measure(trained, data, args, device)}
    if not results["trained"]:
        raise UserError(f"{path} holds out nothing to test (--holdout {args.holdout}, and its data has no official "
                        "test split); retrain with --holdout 0.2")
    diagnostics = byol.collapse(model, data, device)
    found, notes = baselines(BASELINES[opts.baselines], mod, args, data, device, opts.embedding, opts.pretrained_arch)
    entries = {"trained": (trained, data, args)}
    if "whitened" in BASELINES[opts.baselines]:  # the trained features, whitened as the frozen ones
        entries.update({f"trained, {k}": (w, data, args) for k, w in whitened(trained, data, device, args.eval_shift)
                        .items()})
    entries.update(found)
    results.update({name: measure(*entry, device) for name, entry in entries.items() if name != "trained"})
    val_metric, validation, protocol = validate(entries, data, args, device)
    starts = {k: v for k, v in validation.items() if k.startswith(STARTS) and v is not None}
    tied = [k for k, v in starts.items() if v == max(starts.values())]
    alone = {k: byol.score(entries[k][0], entries[k][1], "val", entries[k][2], device, distractors=0)[1]
             for k in tied} if len(tied) > 1 else {}  # a tie at the top: the validation groups alone break it
    metric = next(m for m in HEADLINE if results["trained"].get(m) is not None)
    line = verdict(metric, results["trained"][metric], {k: v for k, v in results.items() if k in found})
    chosen, chosen_line = choose(validation, alone)
    source = str(args.data_file) if args.data_file else args.data
    print(f"{ckpt['method']} {path} (epoch {ckpt['epoch']}, {opts.embedding}) on {source}: {len(data.test)} held-out "
          f"{data.kind}" + (", the 20 official one-shot runs" if data.test_runs is not None else ""))
    print(table({name: {val_metric: validation[name], **r} for name, r in results.items()}), *notes,
          f"{val_metric}: {protocol}", sep="\n")
    print("collapse (projector, training images): " + ", ".join(f"{k} {v:.4g}" for k, v in diagnostics.items()))
    print(line or "no baselines (--baselines none): nothing to compare with")
    print(f"{chosen_line}; on the test, {metric} {results[chosen][metric]:.4f}")
    out = out or path.parent / "eval.json"
    whiten = entries[chosen][0].encoder[-1] if isinstance(entries[chosen][0].encoder, nn.Sequential) else None
    state = {"written_by": "eval.py evaluate", "checkpoint": str(path.resolve()), "epoch": ckpt["epoch"],
             "chosen": chosen, "embedding": opts.embedding, "pretrained_arch": opts.pretrained_arch,
             "image_size": entries[chosen][2].image_size, "eval_shift": entries[chosen][2].eval_shift,
             "whiten": whiten.state_dict() if isinstance(whiten, Whiten) else None}
    write_atomic({path.parent / "chosen.pt": lambda tmp: torch.save(state, tmp)})
    write_json(out, {"written_by": "eval.py evaluate", "checkpoint": str(path.resolve()), "method": ckpt["method"],
                     "epoch": ckpt["epoch"], "embedding": opts.embedding, "data": source, "kind": data.kind,
                     "test_groups": len(data.test), "metric": metric, "results": results, "collapse": diagnostics,
                     "notes": notes, "verdict": line, "validation_metric": val_metric, "validation": validation,
                     "validation_protocol": protocol, "validation_alone": alone, "chosen": chosen,
                     "chosen_line": chosen_line})
    print(f"wrote {out} and {path.parent / 'chosen.pt'} (what embed and export use)")


def baseline_args(opts, keys):
    """The training scripts' arguments for a baseline without a run: the --data recipe, with the flags given."""
    flags = [f"--{k.replace('_', '-')}={v}" for k in keys if (v := getattr(opts, k, None)) is not None]
    return byol.parse_args(flags), flags


def evaluate_baseline(opts, device, out):
    if opts.whiten and opts.baseline != "pretrained":
        raise UserError("--whiten whitens the pretrained features; add --baseline pretrained")
    args, _ = baseline_args(opts, ("data", "data_dir", "pairs_csv", "data_file", "seed", "holdout", "image_size",
                                   "arch"))
    data = byol.load_data(args)
    kinds = ["pretrained", "whitened"] if opts.whiten else [opts.baseline]
    found, notes = baselines(kinds, byol, args, data, device, "encoder", opts.pretrained_arch)
    results = {name: measure(*entry, device) for name, entry in found.items()}
    print(f"{args.data_file or args.data}: {len(data.test)} held-out {data.kind} (seed {args.seed}, holdout "
          f"{args.holdout}, {args.image_size} px)")
    print(table(results), *notes, sep="\n")
    if out is not None:
        write_json(out, {"written_by": "eval.py evaluate", "baseline": opts.baseline, "data": str(args.data_file or
                         args.data), "kind": data.kind, "results": results, "notes": notes})
        print(f"wrote {out}")


def chosen_of(path, epoch):
    """The chosen.pt that evaluate wrote beside the checkpoint `path` at `epoch`, or None (none, or a stale one)."""
    file = path.parent / "chosen.pt"
    chosen = torch.load(file, weights_only=True) if file.is_file() else None
    return chosen if chosen and (chosen["checkpoint"], chosen["epoch"]) == (str(path.resolve()), epoch) else None


def embedder(run=None, baseline=None, flags=(), embedding="chosen", arch=LITE0):
    """(model for embed_images, image size, test-time shift, meta) of a run, or of a baseline built from the training
    scripts' flags: what embed writes into its .npz and search rebuilds from it. A run's "chosen" embedding is the
    one evaluate chose on validation (its chosen.pt), else the trained encoder's."""
    if run is not None:
        mod, ckpt, args, path = load_run(run)
        chosen = chosen_of(path, ckpt["epoch"]) if embedding == "chosen" else None
        if embedding == "chosen" and chosen is None and (path.parent / "chosen.pt").is_file():
            print(f"note: {path.parent / 'chosen.pt'} is of another checkpoint or epoch, so the trained encoder is "
                  f"used; python eval.py {path.parent} chooses again", file=sys.stderr)
        meta = {"method": ckpt["method"], "checkpoint": str(path.resolve()), "epoch": ckpt["epoch"], "arch": args.arch,
                "width": args.width, "stem": args.stem, "chosen": chosen and chosen["chosen"]}
        if chosen and chosen["chosen"].startswith("frozen"):
            meta.update(arch=chosen["pretrained_arch"], width=None, stem="imagenet")
            model = Embedding(pretrained_encoder(chosen["pretrained_arch"])[0])
        else:
            model = as_embedding(trained_model(mod, ckpt, args), chosen["embedding"] if chosen else
                                 "encoder" if embedding == "chosen" else embedding)
        size, shift = (chosen["image_size"], chosen["eval_shift"]) if chosen else (args.image_size, args.eval_shift)
        if chosen and chosen["whiten"] is not None:
            model = Embedding(nn.Sequential(model.encoder, Whiten(chosen["whiten"]["mean"], chosen["whiten"]["w"])))
    else:
        args, embedding = byol.parse_args(flags), "encoder" if embedding == "chosen" else embedding
        model, size = baseline_model(baseline, byol, args, embedding, arch)
        shift = 0 if baseline == "pretrained" else args.eval_shift
        meta = {"baseline": baseline, "flags": list(flags), "arch": arch if baseline == "pretrained" else args.arch}
    return model, size, shift, {**meta, "image_size": size, "eval_shift": shift, "embedding": embedding}


def embed_sources(model, sources, size, shift, device, workers):
    """L2-normalised embeddings of prepare.py sources, decoded CHUNK at a time at the model's size."""
    out = []
    for start in range(0, len(sources), CHUNK):
        images = decode(sources[start: start + CHUNK], size, workers)
        out.append(F.normalize(features(model, images, torch.arange(len(images)), device, shift), dim=1))
    return torch.cat(out)


def cmd_embed(opts):
    if (opts.run is None) == (opts.baseline is None):
        raise UserError("embed needs RUN or --baseline pixels|untrained|pretrained (one of them), then SOURCE")
    out = Path(opts.out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out} must end in .npz")
    check_out(out, opts.overwrite)
    flags = [*baseline_args(opts, ("image_size", "arch", "seed"))[1], "--eval-shift=0"] if opts.baseline else ()
    model, size, shift, meta = embedder(opts.run, opts.baseline, flags, opts.embedding, opts.pretrained_arch)
    sources = image_sources(opts.source)
    embeddings = embed_sources(model, sources, size, shift, pick_device(opts.device), opts.workers)
    meta = {"written_by": "eval.py embed", **meta}
    paths = np.array([source_name(s) for s in sources])
    write_atomic({out: lambda tmp: np.savez(tmp, embeddings=embeddings.numpy().astype(np.float32), paths=paths,
                                            meta=np.array(json.dumps(meta)))})
    what = f"{meta.get('chosen') or meta['embedding']} of {meta.get('checkpoint') or 'the ' + meta['baseline']}"
    print(f"wrote {out}: {len(sources)} images x {embeddings.shape[1]} dimensions ({what}, {size} px)")


def read_npz(path):
    """(embeddings, paths, meta) of a file written by embed."""
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist; write it with python eval.py embed")
    try:
        with np.load(path, allow_pickle=False) as f:
            embeddings, paths, meta = torch.from_numpy(f["embeddings"]), f["paths"].tolist(), json.loads(str(f["meta"]))
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):  # TypeError: a .npy
        meta = None
    if not (isinstance(meta, dict) and meta.get("written_by") == "eval.py embed" and embeddings.ndim == 2
            and len(embeddings) == len(paths)):
        raise UserError(f"{path} is not a file of python eval.py embed; write one with it")
    return embeddings, paths, meta


def cmd_search(opts):
    embeddings, paths, meta = read_npz(opts.embeddings)
    out = Path(opts.out) if opts.out else Path(opts.embeddings).with_name(Path(opts.embeddings).stem + "-search.png")
    if opts.out:
        check_out(out, opts.overwrite)
    if opts.index is not None:
        if bad := [i for i in opts.index if not 0 <= i < len(paths)]:
            raise UserError(f"--index {bad[0]} is out of range: {opts.embeddings} holds rows 0 to {len(paths) - 1}")
        names, queries = [paths[i] for i in opts.index], embeddings[opts.index]
    else:
        names, sources = opts.query, [source_of(q, "--query") for q in opts.query]
        model, size, shift, now = embedder(meta.get("checkpoint"), meta.get("baseline"), meta.get("flags", ()),
                                           meta["embedding"], meta["arch"])
        if (now.get("epoch"), now.get("chosen")) != (meta.get("epoch"), meta.get("chosen")):
            was = meta.get("chosen") or "its encoder"
            raise UserError(f"{meta['checkpoint']} is now epoch {now['epoch']} ({now['chosen'] or 'its encoder'}), "
                            f"{opts.embeddings} was embedded at epoch {meta['epoch']} ({was}); embed again")
        queries = embed_sources(model, sources, size, shift, pick_device(opts.device), 1)
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(embeddings.float(), dim=1).T
    if opts.index is not None:  # an image is not its own result
        sim[torch.arange(len(sim)), torch.tensor(opts.index)] = -float("inf")
    scores, hits = sim.topk(min(opts.top_k, len(paths) - (opts.index is not None)), dim=1)
    for name, row, score in zip(names, hits.tolist(), scores.tolist()):
        print(f"query {name}")
        print("\n".join(f"  {k + 1:>3}  {s:.4f}  {paths[j]}" for k, (j, s) in enumerate(zip(row, score))))
    search_grid(out, names, [[paths[j] for j in row] for row in hits.tolist()], scores.tolist())
    print(f"wrote {out}")


def search_grid(out, queries, results, scores, px=96, rows=16):
    """A row per query (the first 16): the query, then its results with their cosine similarity."""
    def picture(name):
        try:
            return decode([source_of(name, "image")], px, 1)[0].permute(1, 2, 0).numpy()
        except Exception as e:  # a result moved since embed: drawn blank, the printed list still holds it
            if type(e).__name__ != "UserError":
                raise
            return np.full((px, px, 3), 255, np.uint8)

    plt = pyplot()
    n, cols = min(rows, len(queries)), 1 + len(results[0])
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.45 * n), squeeze=False)
    for ax_row, query, found, sims in zip(axes, queries, results, scores):
        titles = ["query", *(f"{k + 1}: {s:.3f}" for k, s in enumerate(sims))]
        for ax, name, title in zip(ax_row, [query, *found], titles):
            ax.imshow(picture(name))
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    write_atomic({out: lambda tmp: fig.savefig(tmp, dpi=100)})
    plt.close(fig)


class Exported(nn.Module):
    """The run's embedding as export writes it: images [B, 3, S, S], uint8 or float RGB in [0, 1], to the
    L2-normalised embedding that embed_images gives (with the run's test-time shifts); the program takes float, as
    torch.export fixes the dtype it traces. It standardises with buffers of its own: a traced program must hold no
    tensor that the scripts create, or cache, outside it."""

    def __init__(self, encoder, shift):
        super().__init__()
        self.encoder, self.offsets = encoder, byol.shift_offsets(shift)
        self.register_buffer("mean", torch.tensor(byol.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(byol.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        x = (x - self.mean) / self.std
        copies = [F.normalize(self.encoder(byol.shifted(x, dx, dy)), dim=1) for dx, dy in self.offsets]
        return F.normalize(torch.stack(copies).mean(0), dim=1)


def cmd_export(opts):
    out = Path(opts.out)
    if out.suffix in (".json", ".pt2"):
        raise UserError(f"--out {out}: the sidecar and the program go to OUT.json and OUT.pt2; name it e.g. "
                        f"{out.with_suffix('.pt')}")
    files = [out, out.with_suffix(".json"), out.with_suffix(".pt2")]
    for path in files:
        check_out(path, opts.overwrite)
    if (opts.run is None) == (opts.baseline is None):
        raise UserError("export needs RUN, or --baseline pretrained (frozen ImageNet features), not both")
    model, size, shift, meta = embedder(opts.run, opts.baseline, (), "chosen", opts.pretrained_arch)
    function, path = Exported(model.encoder, shift).eval(), Path(meta.get("checkpoint", meta["arch"]))
    args = SimpleNamespace(arch=meta["arch"], width=meta.get("width"), stem=meta.get("stem", "imagenet"))
    whiten = model.encoder[-1] if isinstance(model.encoder, nn.Sequential) else None
    whiten = whiten if isinstance(whiten, Whiten) else None
    example = torch.rand(2, 3, size, size)
    try:
        program = torch.export.export(function, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        with torch.no_grad():
            expected = function(example)
            error = (program.module()(example) - expected).abs().max().item()
    except Exception as e:  # noqa: BLE001  torch.export fails in many ways; the fix is the same
        raise UserError(f"torch.export cannot trace --arch {args.arch} ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:120]}); nothing written") from None
    if error > 1e-5:
        raise UserError(f"the exported program of {path} differs from it by {error:.1e}; nothing written")
    sidecar = {**{k: meta[k] for k in ("method", "checkpoint", "epoch", "baseline", "chosen") if k in meta},
               "arch": args.arch,
               "width": args.width, "stem": args.stem, "image_size": size, "mean": byol.IMAGENET_MEAN,
               "std": byol.IMAGENET_STD, "eval_shift": shift, "embedding_dim": expected.shape[1],
               "weights": f"{out.name}: the encoder's state dict; it takes (RGB / 255 - mean) / std",
               "load": f"encoder = byol.build_encoder({args.arch!r}, stem={args.stem!r}"
                       + (f", width={args.width!r})[0]; " if args.width else ")[0]; ")
                       + (f"encoder = torch.nn.Sequential(encoder, eval.Whiten(torch.zeros({whiten.w.shape[0]}), "
                          f"torch.zeros{tuple(whiten.w.shape)})); " if whiten is not None else "")
                       + f"encoder.load_state_dict(torch.load({out.name!r}))",
               "program": f"{files[2].name}: torch.export.load(PATH).module() maps float RGB in [0, 1] [B, 3, "
                          f"{size}, {size}] (uint8 / 255) to the L2-normalised embedding, shifts and mean/std inside",
               "preprocess": f"RGB; shorter side resized to {size} (bilinear), then the centre crop"}
    write_atomic({files[0]: lambda tmp: torch.save(model.encoder.state_dict(), tmp),
                  files[1]: lambda tmp: tmp.write_text(json.dumps(sidecar, indent=1) + "\n"),
                  files[2]: lambda tmp: torch.export.save(program, tmp)})
    print(f"wrote {', '.join(map(str, files))}: {meta.get('chosen') or 'the encoder'} of {path} ({args.arch}, "
          f"{size} px, {sidecar['embedding_dim']} dimensions)")


def cmd_plot(opts):
    run = Path(opts.run)
    log = (run if run.is_dir() else run.parent) / "log.jsonl"  # a file: one of the run's, e.g. its best.pt
    if not run.exists() or not log.is_file():
        raise UserError(f"{run} holds no log.jsonl; pass a run directory of the training scripts")
    records = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError:
            raise UserError(f"line {number} of {log} is not JSON; the log is damaged, delete that line") from None
    if not records or not isinstance(records[0], dict) or "metric" not in records[0]:
        raise UserError(f"{log} is not a training log (its first record names no validation metric)")
    metric = records[0]["metric"]
    series = lambda key: zip(*[(r["epoch"], r[key]) for r in records if r.get(key) is not None])  # (epochs, values)
    out = Path(opts.out) if opts.out else log.parent / "curves.png"
    if opts.out:
        check_out(out, opts.overwrite)
    plt = pyplot()
    fig, (loss, quality) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss.plot(*series("loss"), marker="o", color="tab:red")
    loss.set_title("training loss")
    quality.plot(*series(metric), marker="o", label="trained (epoch 0: the start)")
    if records[0].get(f"pixels_{metric}") is not None:
        quality.axhline(records[0][f"pixels_{metric}"], linestyle="--", color="gray", label="raw pixels")
    quality.set_title(metric)
    quality.legend(fontsize=8)
    for ax in (loss, quality):
        ax.set_xlabel("epoch")
    fig.tight_layout()
    write_atomic({out: lambda tmp: fig.savefig(tmp, dpi=100)})
    plt.close(fig)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every error of eval.py
        self.exit(2, f"eval.py: error: {message} (python {self.prog} --help)\n")


def parse_args(argv):
    p = Parser(prog="eval.py", description=__doc__.split("\n\n")[0],
               epilog="python eval.py RUN ... is python eval.py evaluate RUN ...")
    sub = p.add_subparsers(dest="command", required=True)
    run_help = "a run directory (its best.pt) or a checkpoint"
    parch = {"default": LITE0, "help": "the frozen ImageNet baseline (timm name or resnet18/50), at its native size"}

    add = lambda name, text: sub.add_parser(name, help=text, description=text)
    e = add("evaluate", "a run's test metrics beside its baselines', and a verdict (the default command)")
    e.add_argument("run", nargs="?", metavar="RUN", help=run_help)
    e.add_argument("--embedding", choices=["encoder", "projector"], default="encoder")
    e.add_argument("--baselines", choices=list(BASELINES), default="all", help="cheap: pixels and untrained")
    e.add_argument("--pretrained-arch", **parch)
    e.add_argument("--data-dir", help="where the run's data (or --data) lives now: the same split")
    e.add_argument("--pairs-csv", help="where the run's pairs CSV (or --data pairs') lives now")
    e.add_argument("--data-file", help="a prepared file instead")
    e.add_argument("--out", help="the .json, or a folder for its eval.json (default: eval.json beside the checkpoint, "
                   "refreshed)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.add_argument("--device", default="auto")
    g = e.add_argument_group("a baseline without a run: its data and split as a training script makes them")
    g.add_argument("--baseline", choices=["pixels", "untrained", "pretrained"])
    g.add_argument("--whiten", action="store_true", help="also the pretrained features PCA-whitened")
    g.add_argument("--data", choices=list(byol.RECIPES))
    g.add_argument("--seed", type=byol.bounded(int, 0, 2**32 - 1))
    g.add_argument("--holdout", type=byol.bounded(float, 0, 0.99))
    g.add_argument("--image-size", type=byol.bounded(int, 16, 1024))
    g.add_argument("--arch", help="the untrained network's (default: the --data recipe's)")
    e.set_defaults(command=cmd_evaluate)

    e = add("embed", "embed a folder tree, a .zip or a CSV list of images into an .npz")
    e.add_argument("run", nargs="?", metavar="RUN", help=run_help)
    e.add_argument("source", metavar="SOURCE", help="a folder tree, a .zip, or a CSV whose first column lists images")
    e.add_argument("--out", required=True, help="the .npz: embeddings (L2-normalised), paths, meta")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--embedding", choices=["chosen", "encoder", "projector"], default="chosen",
                   help="chosen: what evaluate chose on validation (RUN/chosen.pt; without one, the encoder)")
    e.add_argument("--baseline", choices=["pixels", "untrained", "pretrained"], help="instead of RUN")
    e.add_argument("--image-size", type=byol.bounded(int, 16, 1024), help="--baseline pixels, untrained")
    e.add_argument("--arch", help="--baseline untrained (default conv4)")
    e.add_argument("--seed", type=byol.bounded(int, 0, 2**32 - 1), help="--baseline untrained")
    e.add_argument("--pretrained-arch", **parch)
    e.add_argument("--workers", type=byol.bounded(int, 1), default=4, help="decoding threads")
    e.add_argument("--device", default="auto")
    e.set_defaults(command=cmd_embed)

    e = add("search", "the nearest images of an .npz to query images or to its rows")
    e.add_argument("embeddings", metavar="EMBEDDINGS", help="an .npz written by embed")
    q = e.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", nargs="+", help="image files (or ZIP:MEMBER), embedded as the .npz was")
    q.add_argument("--index", nargs="+", type=int, help="rows of the .npz")
    e.add_argument("--top-k", type=byol.bounded(int, 1), default=5)
    e.add_argument("--out", help="the grid picture (default: EMBEDDINGS-search.png, refreshed)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--device", default="auto")
    e.set_defaults(command=cmd_search)

    e = add("export", "a run's embedding, as evaluate chose it (RUN/chosen.pt; else its encoder), or frozen features: "
            "OUT (state dict), OUT.json and OUT.pt2 (torch.export)")
    e.add_argument("run", nargs="?", metavar="RUN", help=run_help)
    e.add_argument("--baseline", choices=["pretrained"], help="instead of RUN: frozen ImageNet features")
    e.add_argument("--pretrained-arch", **parch)
    e.add_argument("--out", required=True, help="e.g. enc.pt")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(command=cmd_export)

    e = add("plot", "the loss and validation curves of a run's log.jsonl")
    e.add_argument("run", metavar="RUN", help="a run directory (or a file in it)")
    e.add_argument("--out", help="the picture (default: RUN/curves.png, refreshed)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(command=cmd_plot)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "evaluate")  # python eval.py RUN
    opts = parse_args(argv)
    try:
        opts.command(opts)
    except Exception as e:  # each script and prepare.py raise their own UserError; Diverged: non-finite embeddings
        if type(e).__name__ not in ("UserError", "Diverged"):
            raise
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
