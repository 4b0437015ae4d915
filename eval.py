"""Evaluate a run of byol.py, simsiam.py, bn_only.py or contrastive.py, or a baseline, on held-out data.

The architecture, the data and the held-out split come from the checkpoint: eval.py
imports the script that wrote it and rebuilds the model and the data with that
script's own code, so the held-out pairs and classes are exactly those the run never
trained on.

Run:
    python eval.py runs/byol-omniglot-s0/last.pt                     # the run's own held-out split
    python eval.py runs/byol-tll-s0/last.pt --data-dir ~/data/tll    # the data moved: same split
    python eval.py runs/byol-tll-s0/last.pt --embedding projector
    python eval.py runs/byol-omniglot-s0/last.pt --data tll --data-dir ~/data/tll --all-pairs
    python eval.py runs/byol-folder-s0/last.pt --baseline pixels     # raw pixels, same split
    python eval.py runs/byol-folder-s0/last.pt --baseline random     # untrained network, same split
    python eval.py runs/byol-folder-s0/last.pt --baseline random-bn  # the same, BN statistics fitted to the training images
    python eval.py --baseline random --data tll --data-dir ~/data/tll --seed 0 --holdout 0.2
    python eval.py --baseline pretrained --data tll --data-dir ~/data/tll --all-pairs --image-size 224
    python eval.py --plot runs/byol-tll-s0                           # curves.png from log.jsonl
Use the learned similarity (python eval.py embed --help, search --help, export --help):
    python eval.py embed runs/byol-omniglot-s0/last.pt ~/photos --out photos.npz   # a folder tree, a .zip or a CSV list
    python eval.py embed --baseline pixels ~/photos --image-size 64 --out pixels.npz
    python eval.py search photos.npz --query query.jpg --top-k 5   # prints the top 5, draws photos-search.png
    python eval.py search photos.npz --index 0 17
    python eval.py export runs/byol-omniglot-s0/last.pt --out encoder.pt     # + encoder.json: arch, size, mean, std

Metrics (cosine similarity throughout; a query is never its own neighbour):
  retrieval        held-out pairs, left->right and right->left: Recall@1/5/10, MRR and
                   median rank (left->right alone is the protocol Jina's Finetuner reports
                   on TLL), and "asymmetric" Recall@1/3/5, a hit in either direction (the
                   protocol of the TLL adaptation-function project). Ties count at random
                   (in expectation), so a collapsed network scores chance level, not 1.
  one_shot         Omniglot's official 20 runs (data/omniglot/all_runs.zip), 20- and 5-way: the test.
  val_one_shot     the validation episodes (images_background_small2.zip, alphabets training
                   never sees): what recipes are tuned on.
  classification   labelled data: weighted kNN (k=20, 200) and a linear probe.
  metric_learning  labelled data: Precision@1, R-Precision, MAP@R (Musgrave et al. 2020).
  aug_copy_retrieval  unlabelled folders: retrieval of augmented copies of held-out images, aug_copy_recall@1
                   (as in the training log): each of two fixed augmented copies of a held-out image looks for
                   its original among all the held-out originals.
  collapse         per-dimension std of the l2-normalised embeddings, and effective rank.
Outputs: a table on stdout, eval.json, retrieval_grid.png and similarity_hist.png, next
to the checkpoint (other data or a baseline: in a subfolder of the run) or in --out.
Checkpoints are unpickled: evaluate only files you trust.
"""

import argparse
import csv
import hashlib
import importlib
import json
import logging
import math
import os
import re
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

METHODS = ("byol", "simsiam", "bn_only", "contrastive")  # the scripts whose checkpoints eval.py reads
HERE = Path(__file__).resolve().parent
RECALL_KS = (1, 5, 10)
KNN_KS = (20, 200)


class UserError(Exception):
    """Bad input: reported as one line, without a traceback."""


def user_errors():
    """eval.py's UserError and those of the training scripts imported so far (each script has its own)."""
    return (UserError, *(sys.modules[m].UserError for m in METHODS if hasattr(sys.modules.get(m), "UserError")))


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Also: python eval.py embed|search|export --help (embed images, search them, "
                                       "export the encoder).")
    p.add_argument("checkpoint", nargs="?", type=Path, default=None,
                   help="last.pt written by byol.py, simsiam.py, bn_only.py or contrastive.py")
    p.add_argument("--baseline", choices=["pixels", "random", "random-bn", "pretrained"], default=None,
                   help="no trained weights: the raw pixels (at the image size); an untrained network; the same with its batch-norm statistics "
                        "re-estimated on the training images (what any training run gets for free); or "
                        "torchvision's ImageNet weights (data and split from the checkpoint if one is given, "
                        "else from the data flags)")
    p.add_argument("--plot", type=Path, default=None, metavar="RUN_DIR",
                   help="only draw the curves of RUN_DIR/log.jsonl into curves.png")
    # Data flags default to None: unset means "as the checkpoint says" (or the training scripts' default).
    g = p.add_argument_group("data (default: the checkpoint's own data and split)")
    g.add_argument("--data", default=None, choices=["omniglot", "tll", "pairs", "folder", "cifar10", "stl10"],
                   help="evaluate on this dataset instead (default without a checkpoint: omniglot)")
    g.add_argument("--data-dir", type=Path, default=None, help="dataset location, as for the training scripts")
    g.add_argument("--pairs-csv", type=Path, default=None, help="--data pairs: CSV of (left, right) image paths")
    g.add_argument("--labels", default=None, choices=["auto", "folders", "none"],
                   help="--data folder on other data: class subfolders or unlabelled images, as for the training scripts "
                        "(default auto); the run's own data keeps the run's")
    g.add_argument("--download", action="store_true", help="download tll/cifar10/stl10 into --data-dir")
    g.add_argument("--holdout", type=float, default=None, help="held-out fraction for other data (default 0.2)")
    g.add_argument("--seed", type=int, default=None, help="split seed for other data (default: the run's, else 0)")
    g.add_argument("--all-pairs", action="store_true",
                   help="tll/pairs: evaluate every pair, not only the held-out ones (for baselines and other data)")
    g.add_argument("--image-size", type=int, default=None, help="baselines only; a checkpoint fixes its own")
    g.add_argument("--workers", type=int, default=4, help="threads that decode images")
    g = p.add_argument_group("baseline model (a checkpoint fixes its own)")
    g.add_argument("--arch", default=None, help="conv4, resnet18, resnet50 or a timm model name (default: the --data recipe's)")
    g.add_argument("--width", default=None, help="conv4's channels, one number or four comma-separated (default: the --data recipe's)")
    g.add_argument("--stem", default=None, choices=["small", "imagenet"],
                   help="default: as the training scripts (random) / imagenet (pretrained, keeps the pretrained first conv)")
    g.add_argument("--init", type=Path, default=None, help="--baseline pretrained: a local state dict instead of a download")
    g = p.add_argument_group("evaluation")
    g.add_argument("--embedding", default=None, choices=["encoder", "projector"],
                   help="which output to compare: backbone features or the projector's (default: the projector's for a "
                        "--freeze-encoder run, whose encoder never trained; else the encoder's)")
    g.add_argument("--eval-shift", type=int, default=None, metavar="N",
                   help="test-time shifts, as the training scripts' --eval-shift (0: each image alone; default: the run's, "
                        "else the --data recipe's)")
    g.add_argument("--memory-mb", type=float, default=512,
                   help="budget for one block of similarities; larger sets are ranked block by block")
    g.add_argument("--max-images", type=int, default=None, help="labelled data: subsample at most this many train and test images")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out", type=Path, default=None, help="output directory (default: next to the checkpoint)")
    g.add_argument("--no-pictures", action="store_true", help="skip the PNGs")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- loading


def import_method(name, source):
    if name not in METHODS:
        raise UserError(f"{source} was written by {name or 'something else'}, not by {', '.join(m + '.py' for m in METHODS)}; "
                        "pass the last.pt of one of their runs")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise UserError(f"{source} was written by {name}.py, which is not next to eval.py in {HERE}; add it") from None


def load_checkpoint(path):
    if not path.is_file():
        raise UserError(f"CHECKPOINT {path} does not exist; pass the last.pt of a run")
    try:
        # weights_only=False: the checkpoint holds numpy RNG state and plain Python objects.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"CHECKPOINT {path} is not a readable checkpoint ({e.__class__.__name__}); "
                        "it may be truncated or another kind of file: pass a last.pt written by a training script") from None
    method = ckpt.get("method") if isinstance(ckpt, dict) else None
    mod = import_method(method, f"CHECKPOINT {path}")
    needed = ("data", "seed", "holdout", "image_size", "arch", "stem")
    if not all(k in ckpt for k in ("args", "model")) or not all(k in ckpt["args"] for k in needed):
        raise UserError(f"CHECKPOINT {path} lacks its args or weights; pass a last.pt written by {method}.py")
    return mod, ckpt


def given(opts, flag):
    return getattr(opts, flag.lstrip("-").replace("-", "_")) is not None


def run_args(opts, mod, ckpt):
    """The training script's arguments that rebuild this evaluation's model and data.

    Returns (args, own_data): own_data means the checkpoint's own data and held-out split.
    """
    saved = ckpt["args"] if ckpt else None
    if saved and not opts.baseline:
        for flag in ("--arch", "--width", "--stem", "--init"):
            if given(opts, flag):
                raise UserError(f"{flag} comes from the checkpoint ({saved.get(flag[2:])}); drop {flag}")
    if saved and given(opts, "--image-size") and opts.image_size != saved["image_size"]:
        raise UserError(f"--image-size {opts.image_size} does not fit CHECKPOINT {opts.checkpoint}: it was trained at "
                        f"{saved['image_size']} px and its first layers depend on it; drop --image-size")
    # The script's defaults for this data (its recipe), so that args it added later are present.
    args = mod.parse_args(["--data", opts.data or (saved["data"] if saved else "omniglot")])
    if saved:
        vars(args).update({"val_fraction": 0.0, **saved})  # the model; for its own data also the data and split (older runs carved no validation)
    own_data = saved is not None and opts.data in (None, saved["data"])
    if own_data:
        if opts.labels is not None:
            raise UserError(f"--labels comes from CHECKPOINT {opts.checkpoint} for its own data ({args.labels}); drop --labels, "
                            "or pass --data to evaluate on other data")
        for flag in ("--holdout", "--seed"):
            value = getattr(opts, flag[2:])
            if value is not None and value != saved[flag[2:]]:
                raise UserError(f"{flag} {value} differs from the run's {saved[flag[2:]]}: that split would contain "
                                f"training data; drop {flag}, or pass --data to evaluate on other data")
        # The data may have moved: a new location is fine, the split is checked after loading.
        for flag in ("--data-dir", "--pairs-csv"):
            name = flag[2:].replace("-", "_")
            if getattr(opts, name) is not None:
                setattr(args, name, getattr(opts, name))
            elif getattr(args, name) is not None and not Path(getattr(args, name)).exists():
                raise UserError(f"the data of CHECKPOINT {opts.checkpoint} was at {flag} {getattr(args, name)}, which does "
                                f"not exist here; pass {flag} with its new location")
    else:
        args.data = opts.data or "omniglot"
        args.data_dir, args.pairs_csv, args.labels = opts.data_dir, opts.pairs_csv, opts.labels or "auto"
        args.holdout = 0.2 if opts.holdout is None else opts.holdout
        args.seed = opts.seed if opts.seed is not None else (saved["seed"] if saved else 0)
        args.image_size = saved["image_size"] if saved else (opts.image_size or args.image_size)
    if opts.init is not None and opts.baseline != "pretrained":
        raise UserError("--init gives the weights of --baseline pretrained; drop it, or add --baseline pretrained")
    if saved and opts.baseline:
        # random: the run's own untrained network; pretrained: keep the ImageNet first conv
        args.stem = opts.stem or (saved["stem"] if opts.baseline in ("random", "random-bn") else "imagenet")
        if opts.baseline == "pretrained":  # any backbone with ImageNet weights, on the run's data and split
            args.arch = opts.arch or (args.arch if args.arch != "conv4" else "resnet18")
    elif not saved:
        if opts.baseline == "pretrained":  # the recipe's backbone; conv4 has no ImageNet weights
            args.arch = opts.arch or (args.arch if args.arch != "conv4" else "resnet18")
        else:
            args.arch = opts.arch or args.arch
        args.width = opts.width or args.width
        args.stem = opts.stem or ("imagenet" if opts.baseline == "pretrained" else None)
    if opts.all_pairs:
        if args.data not in ("tll", "pairs"):
            raise UserError(f"--all-pairs needs explicit pairs (--data tll or pairs), not --data {args.data}")
        args.holdout = args.val_fraction = 0.0  # every pair a training pair, none carved off: all of them evaluated
    args.data_dir = Path(args.data_dir) if args.data_dir is not None else None
    args.pairs_csv = Path(args.pairs_csv) if args.pairs_csv is not None else None
    args.workers, args.download = opts.workers, opts.download
    args.pairs = "natural"  # how training drew positives; the held-out split does not depend on it
    args.pretrained, args.init = False, None  # the checkpoint's weights replace any initialisation
    if opts.eval_shift is not None:
        args.eval_shift = opts.eval_shift  # fill_defaults checks it against the image size
    return mod.fill_defaults(args), own_data


def load_eval_data(opts, mod, ckpt, args, own_data):
    """The training script's own loader; with a checkpoint's own data, check the split is the run's."""
    data = mod.load_data(args)
    if opts.all_pairs:
        data.test_pairs = data.groups[:, :2].clone()  # holdout 0 and natural pairs: every (left, right)
    elif own_data and ckpt.get("split") is not None and comparable(data.split) != comparable(ckpt["split"]):
        where = f"--data-dir {args.data_dir}" if args.data != "pairs" else f"--pairs-csv {args.pairs_csv}"
        raise UserError(f"{where} does not hold the data CHECKPOINT {opts.checkpoint} was trained on: its held-out "
                        f"split differs from the run's; point {where.split()[0]} at the run's data, or pass --data "
                        "to evaluate on other data")
    return data


def comparable(split):
    """A split by file names only, so that data moved to another directory still matches."""
    def name(x):
        return Path(x.split(":")[-1]).name if isinstance(x, str) else [name(y) for y in x] if isinstance(x, list) else x

    return {k: name(v) for k, v in split.items()} if isinstance(split, dict) else split


class Baseline(nn.Module):
    """A bare encoder, shaped like the methods (encoder, projector) for embed_images."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Identity()


@torch.no_grad()
def recalibrate_batch_norm(mod, model, images, device, batch_size=256):
    """Re-estimate every BN layer's running statistics on `images`, with no gradient step.

    An untrained network evaluates with BN's initial statistics (mean 0, variance 1), while
    any training run, collapsed or not, also adapts them to its data. This baseline takes
    that adaptation alone: plain, un-augmented training images, equal weight per batch."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches, not an EMA
    model.train()
    for i in range(0, len(images), batch_size):
        model.encoder(mod.normalize(images[i: i + batch_size].to(device)))
    model.eval()


def build_eval_model(opts, mod, ckpt, args):
    if opts.baseline is None:
        model = mod.build_model(args)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1][:160]
            raise UserError(f"CHECKPOINT {opts.checkpoint}: its weights do not fit the model its own args describe "
                            f"({detail}); the file was edited or written by another version") from None
        return model
    if opts.embedding == "projector":
        raise UserError("--embedding projector needs a trained checkpoint; a baseline has no projector")
    if opts.baseline == "pixels":
        return Baseline(nn.Flatten())  # the normalised pixels themselves: what any learned similarity must beat
    mod.check_conv4_size(args.arch, args.image_size)
    if opts.baseline in ("random", "random-bn"):
        torch.manual_seed(args.seed)  # the same draw as a run's untrained network (its epoch 0)
        return Baseline(mod.build_encoder(args.arch, args.stem, width=args.width)[0])
    try:
        pretrained = opts.init is None  # --init: local weights, no download
        return Baseline(mod.build_encoder(args.arch, args.stem, pretrained, opts.init, args.width)[0])
    except user_errors() as e:
        raise UserError(f"--baseline pretrained: {str(e).removeprefix('--pretrained: ')}") from None


# ----------------------------------------------------------------------------- metrics


def chunk_rows(num_columns, memory_mb):
    """Rows of a [rows, num_columns] float32 similarity block (plus masks) that fit in memory_mb."""
    return max(1, int(memory_mb * 2**20 // (num_columns * 4 * 3)))


def harmonic(n):
    return torch.special.digamma(n.double() + 1) + 0.5772156649015329


@torch.no_grad()
def match_ranks(query, gallery, rows, top=5):
    """Where query[i]'s true match gallery[i] ranks among all of gallery, by cosine similarity.

    Returns (greater, ties, top_idx): how many gallery items score strictly higher than
    the match, how many others score exactly the same, and the `top` best indices (or None).
    `rows` queries at a time: only a [rows, len(gallery)] block is ever held.
    """
    q, g = F.normalize(query.float(), dim=1), F.normalize(gallery.float(), dim=1)
    greater, ties, tops = [], [], []
    for i in range(0, len(q), rows):
        sim = q[i: i + rows] @ g.T
        true = sim.diagonal(offset=i)[:, None]
        greater.append((sim > true).sum(1))
        ties.append((sim == true).sum(1) - 1)
        if top:
            tops.append(sim.topk(min(top, len(g)), dim=1).indices)
    return torch.cat(greater).cpu(), torch.cat(ties).cpu(), torch.cat(tops).cpu() if top else None


def retrieval_metrics(greater, ties, ks=RECALL_KS):
    """Recall@k, MRR and median rank, with ties broken uniformly at random, in expectation.

    The match is equally likely at each rank greater+1 .. greater+ties+1.
    """
    n = (ties + 1).double()
    g = greater.double()
    out = {f"recall@{k}": ((k - g).clamp(min=0).minimum(n) / n).mean().item() for k in ks}
    # Mean of 1/rank over those positions; exactly 1/(greater+1) without ties.
    out["mrr"] = torch.where(n == 1, 1 / (g + 1), (harmonic(g + n) - harmonic(g)) / n).mean().item()
    out["median_rank"] = (g + 1 + (n - 1) / 2).quantile(0.5).item()
    return out


def asymmetric_recall(lr, rl, ks=(1, 3, 5)):
    """The TLL project's "asymmetric" Recall@k: a pair counts when it ranks in the top k in either
    direction. lr, rl: (greater, ties) of left->right and right->left; ties broken at random, the
    two directions independently, in expectation."""
    def hit(greater, ties, k):
        n = (ties + 1).double()
        return (k - greater.double()).clamp(min=0).minimum(n) / n

    return {f"recall@{k}": (1 - (1 - hit(*lr, k)) * (1 - hit(*rl, k))).mean().item() for k in ks}


def one_shot_accuracy(runs, ways, seed=0):
    """runs: [(train embeddings [C,D], test embeddings [T,D], answer [T])]. N-way: each test item
    chooses among its class and ways-1 other classes of the run, drawn with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for train, test, answer in runs:
        sim = (F.normalize(test.float(), dim=1) @ F.normalize(train.float(), dim=1).T).cpu()
        if ways < sim.shape[1]:
            draw = torch.rand(sim.shape, generator=gen)
            draw[torch.arange(len(answer)), answer] = -1.0  # the true class is always a candidate
            keep = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, draw.argsort(1)[:, :ways], True)
            sim = sim.masked_fill(~keep, -math.inf)
        correct += (sim.argmax(1) == answer).sum().item()
        total += len(answer)
    return correct / total


@torch.no_grad()
def metric_learning_metrics(feats, labels, rows):
    """Precision@1, R-Precision and MAP@R (Musgrave et al. 2020) with every item as a query
    against all the others; R is the number of other items of the query's class. Queries
    whose class has no other item are left out."""
    x = F.normalize(feats.float(), dim=1)
    labels = labels.to(x.device)
    counts = torch.bincount(labels)
    r_all = counts[labels] - 1
    p1, rp, mapr = [], [], []
    for i in range(0, len(x), rows):
        r = r_all[i: i + rows]
        sim = x[i: i + rows] @ x.T
        sim[torch.arange(len(sim)), torch.arange(i, i + len(sim))] = -math.inf  # not its own neighbour
        width = int(r.max().clamp(min=1))
        rel = (labels[sim.topk(width, dim=1).indices] == labels[i: i + rows, None]).double()
        within = torch.arange(1, width + 1, device=x.device)[None] <= r[:, None]  # the first R ranks
        rel = rel * within
        precision_at = rel.cumsum(1) / torch.arange(1, width + 1, device=x.device)
        keep = r > 0
        rr = r[keep].double()
        p1.append(rel[keep, 0])
        rp.append(rel[keep].sum(1) / rr)
        mapr.append((precision_at * rel)[keep].sum(1) / rr)
    p1, rp, mapr = torch.cat(p1), torch.cat(rp), torch.cat(mapr)
    if not len(p1):
        return {}
    return {"queries": len(p1), "precision@1": p1.mean().item(), "r_precision": rp.mean().item(), "map@r": mapr.mean().item()}


def knn_accuracy(mod, train, train_labels, test, test_labels, k, rows):
    """The training script's weighted kNN, fed `rows` test items at a time (bounded memory)."""
    correct = 0.0
    for i in range(0, len(test), rows):
        part = test_labels[i: i + rows]
        correct += mod.knn_accuracy(train, train_labels, test[i: i + rows], part, k=k) * len(part)
    return correct / len(test)


def linear_probe(train, train_labels, test, test_labels, steps=100, l2=1e-3):
    """Multinomial logistic regression on frozen, standardised features: full-batch L-BFGS."""
    classes, y = torch.cat([train_labels, test_labels]).unique(return_inverse=True)
    y_train, y_test = y[: len(train_labels)], y[len(train_labels):]
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    a, b = (train - mean) / std, (test - mean) / std
    w = torch.zeros(a.shape[1], len(classes), device=a.device, requires_grad=True)
    bias = torch.zeros(len(classes), device=a.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + l2 * w.square().sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return ((b @ w + bias).argmax(1) == y_test).float().mean().item()


def collapse_stats(mod, z):
    """Per-dimension std of the l2-normalised embeddings (about 1/sqrt(d) healthy, 0 collapsed)."""
    std = F.normalize(z.float(), dim=1).std(0)
    return {"dim": z.shape[1], "std_mean": std.mean().item(), "std_min": std.min().item(), "std_max": std.max().item(),
            "healthy_std": 1 / math.sqrt(z.shape[1]), "effective_rank": mod.effective_rank(z)}


class Embeddings:
    """Embeds each needed image once; rows are looked up by image index."""

    def __init__(self, mod, model, images, indices, device, shift=0):
        self.index = torch.full((len(images),), -1, dtype=torch.long)
        unique = torch.cat(indices).unique() if indices else torch.empty(0, dtype=torch.long)
        self.index[unique] = torch.arange(len(unique))
        self.feats, self.projs = mod.embed_images(model, images[unique], device, shift=shift) if len(unique) else (None, None)
        self.count = len(unique)

    def __call__(self, idx, which):
        return (self.feats if which == "encoder" else self.projs)[self.index[idx].to(self.feats.device)]


def evaluate(opts, mod, model, data, args, device):
    """All metrics that apply to this data, timings, and what the pictures need."""
    rows_for = lambda n: chunk_rows(n, opts.memory_mb)  # noqa: E731
    which = opts.embedding
    pick = 1 if which == "projector" else 0  # embed_images returns (features, projections)
    pairs = data.test_pairs
    labelled = data.labels is not None and data.test_images is not None and bool(data.test_images.any())
    if labelled:
        ref, query, protocol = mod.knn_split(data, opts.max_images)  # the training log's split: the same kNN
        # Ranking metrics on the held-out images: the query images, or all of the held-out classes.
        held_out = query if protocol.startswith("training") else torch.cat([ref, query]).sort().values
    copied = data.copies is not None and len(data.copies) > 0  # unlabelled folders
    if copied:
        originals, owner = data.copy_of.unique(return_inverse=True)
    needed = [i for i in ([pairs.flatten()] + ([ref, query] if labelled else []) + ([originals] if copied else [])) if len(i)]

    start = time.perf_counter()
    shift = args.eval_shift
    emb = Embeddings(mod, model, data.images, needed, device, shift)
    copies = mod.embed_images(model, data.copies, device, shift=shift)[pick] if copied else None
    def embed_runs(episodes):
        return [(mod.embed_images(model, train, device, shift=shift)[pick], mod.embed_images(model, test, device, shift=shift)[pick],
                 answer) for train, test, answer in episodes]

    runs = embed_runs(data.one_shot_runs)
    timing = {"images_embedded": emb.count + (len(copies) if copied else 0) + sum(len(t) + len(s) for t, s, _ in data.one_shot_runs),
              "embed_s": time.perf_counter() - start}

    start = time.perf_counter()
    metrics, extras = {}, {}
    if len(pairs):
        left, right = emb(pairs[:, 0], which), emb(pairs[:, 1], which)
        greater, ties, top = match_ranks(left, right, rows_for(len(right)))
        back = match_ranks(right, left, rows_for(len(left)), top=0)[:2]
        metrics["retrieval"] = {"pairs": len(pairs), "left_to_right": retrieval_metrics(greater, ties),
                                "right_to_left": retrieval_metrics(*back),
                                "asymmetric": asymmetric_recall((greater, ties), back)}
        extras.update(left=left, right=right, greater=greater, ties=ties, top=top)
    if runs:
        metrics["one_shot"] = {"runs": len(runs), **{f"{w}way": one_shot_accuracy(runs, w) for w in (20, 5)}}
    if data.val_runs:  # the validation episodes (images_background_small2), never the test runs
        val = embed_runs(data.val_runs)
        metrics["val_one_shot"] = {"episodes": len(val), **{f"{w}way": one_shot_accuracy(val, w) for w in (20, 5)}}
    if labelled:
        cls = {"protocol": protocol, "reference_images": len(ref), "query_images": len(query)}
        if len(ref) and len(query):
            r, q = emb(ref, which), emb(query, which)
            r_labels, q_labels = data.labels[ref].to(r.device), data.labels[query].to(r.device)
            voted = torch.isin(q_labels, r_labels)  # queries of a class kNN can vote for, as in the training log
            for k in [] if not voted.any() else sorted({mod.knn_k(r_labels, q_labels[voted], k) for k in KNN_KS}):  # k <= the smallest class's references
                cls[f"knn@{k}"] = knn_accuracy(mod, r, r_labels, q[voted], q_labels[voted], k, min(1024, rows_for(len(r))))
            cls["linear_probe"] = linear_probe(r, r_labels, q, q_labels)
        metrics["classification"] = cls
        if len(held_out):
            dml = metric_learning_metrics(emb(held_out, which), data.labels[held_out], rows_for(len(held_out)))
            if dml:
                metrics["metric_learning"] = dml
    if copied:  # the training log's aug_copy_recall@1, computed by the script's own function on the same images
        metrics["aug_copy_retrieval"] = {
            "protocol": "two augmented copies of each held-out image (the run's own views, fixed seed) -> the held-out originals",
            "originals": len(originals), "copies": len(copies),
            "aug_copy_recall@1": mod.copy_recall_at_1(copies, emb(originals, which), owner)}
    if needed:
        # Collapse is judged on every evaluated image (each alone, unshifted), for both outputs of a trained model.
        every = torch.cat(needed).unique()
        alone = emb if shift == 0 else Embeddings(mod, model, data.images, [every], device)
        metrics["collapse"] = {"encoder": collapse_stats(mod, alone(every, "encoder"))}
        if opts.baseline is None:
            metrics["collapse"]["projector"] = collapse_stats(mod, alone(every, "projector"))
    elif data.one_shot_runs:  # Omniglot trains on all of small1: judge collapse on the test runs' 800 images
        images = torch.cat([torch.cat([train, test]) for train, test, _ in data.one_shot_runs])
        features, projections = mod.embed_images(model, images, device)
        metrics["collapse"] = {"encoder": collapse_stats(mod, features)}
        if opts.baseline is None:
            metrics["collapse"]["projector"] = collapse_stats(mod, projections)
    timing["metrics_s"] = time.perf_counter() - start
    return metrics, extras, timing


def similarity_stats(left, right, samples=20000, seed=0):
    """Cosine similarity of the positive pairs and of random non-matching (left, right) pairs."""
    left, right = F.normalize(left.float(), dim=1).cpu(), F.normalize(right.float(), dim=1).cpu()
    positive = (left * right).sum(1)
    if len(left) < 2:
        return positive, None
    n = len(left)
    if n * (n - 1) <= samples:  # few pairs: every non-matching one
        i, j = (~torch.eye(n, dtype=torch.bool)).nonzero().T
    else:
        gen = torch.Generator().manual_seed(seed)
        i = torch.randint(n, (samples,), generator=gen)
        j = (i + torch.randint(1, n, (samples,), generator=gen)) % n  # never i's own partner
    return positive, (left[i] * right[j]).sum(1)


def separation(positive, random):
    """Means, and the chance that a positive pair is more similar than a random one (ROC AUC)."""
    ordered = random.sort().values
    below = torch.searchsorted(ordered, positive, right=False).double()
    at_or_below = torch.searchsorted(ordered, positive, right=True).double()
    auc = ((below + at_or_below) / 2 / len(ordered)).mean().item()  # ties count half
    return {"positive_mean": positive.mean().item(), "random_mean": random.mean().item(), "auc": auc}


# ----------------------------------------------------------------------------- writing files


def write_atomic(path, write):
    """write(tmp) fills a temporary file beside `path`, which then replaces it: a full disk or a kill never leaves
    half a file. A failed write (torch.save reports a full disk as a RuntimeError) is one line."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")  # the suffix kept: savefig reads the format from it
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = (getattr(e, "strerror", None) or str(e) or e.__class__.__name__).splitlines()[0]
        raise UserError(f"could not write {path} ({reason}); free space, then run again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_out(out, inputs=(), overwrite=False, suffixes=None):
    """--out names a new file, not a folder, an input or (without --overwrite) an existing file; checked before the work."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name a file in it, e.g. {out / ('out' + (suffixes or ['.npz'])[0])}")
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise UserError(f"--out {out} must end in one of {', '.join(suffixes)}: that suffix picks the picture's format")
    if not out.exists():
        return
    if any(p is not None and Path(p).exists() and os.path.samefile(p, out) for p in inputs):
        raise UserError(f"--out {out} is one of the inputs; name another file")
    if not overwrite:
        raise UserError(f"--out {out} exists; add --overwrite to replace it, or name another file")


# ----------------------------------------------------------------------------- pictures


def pyplot():
    """matplotlib, imported only to draw (it is an optional dependency)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed; pip install matplotlib (the 'plot' extra) to draw pictures") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def outline(ax, colour, width):
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(colour)
        spine.set_linewidth(width)


def retrieval_grid(path, data, extras, rows=8, seed=0):
    """Each row: a held-out left image, its top-5 right images and its true match, outlined
    in green wherever it appears."""
    plt = pyplot()
    pairs, top, greater, ties = data.test_pairs, extras["top"], extras["greater"], extras["ties"]
    chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:rows].sort().values.tolist()
    cols = top.shape[1] + 2
    fig, axes = plt.subplots(len(chosen), cols, figsize=(1.3 * cols, 1.45 * len(chosen)), squeeze=False)
    for row, i in zip(axes, chosen):
        rank = f"{greater[i] + 1}" + (f"-{greater[i] + ties[i] + 1}" if ties[i] else "")
        cells = [(pairs[i, 0], "query", False)]
        cells += [(pairs[j, 1], f"top {k + 1}", j == i) for k, j in enumerate(top[i].tolist())]
        cells += [(pairs[i, 1], f"match: rank {rank}", True)]
        for ax, (image, title, is_match) in zip(row, cells):
            ax.imshow(data.images[image].permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=7)
            outline(ax, "limegreen" if is_match else "lightgray", 3 if is_match else 0.5)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def similarity_hist(path, positive, random):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    low, high = min(positive.min(), random.min()).item(), max(positive.max(), random.max()).item()
    bins = torch.linspace(low, max(high, low + 1e-6), 41).numpy()
    ax.hist(random.numpy(), bins, density=True, alpha=0.55, label=f"random pairs ({len(random)})")
    ax.hist(positive.numpy(), bins, density=True, alpha=0.55, label=f"positive pairs ({len(positive)})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


QUALITY = ("one_shot", "val_one_shot", "r_precision", "recall@1", "knn@20", "aug_copy_recall@1")  # the training scripts' per-epoch quality metrics


def read_log(run_dir):
    path = run_dir / "log.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"--plot {run_dir} holds no log.jsonl; pass a run directory written by "
                        f"{', '.join(m + '.py' for m in METHODS)}")
    by_epoch = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"--plot: line {number} of {path} is not JSON; the log is damaged, delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise UserError(f"--plot: line {number} of {path} has no epoch; it is not a training log")
        by_epoch[record["epoch"]] = record  # an epoch logged twice (a crash before its checkpoint): keep the rerun
    if not by_epoch:
        raise UserError(f"--plot: {path} is empty; it fills after the first evaluation of a run")
    return path, [by_epoch[e] for e in sorted(by_epoch)]


def plot_curves(run_dir, out=None):
    """Quality, loss and collapse against epoch, from a training script's log.jsonl."""
    path, records = read_log(run_dir)
    plt = pyplot()

    def series(key):
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (quality, loss, collapse) = plt.subplots(1, 3, figsize=(14, 3.8))
    for key in QUALITY:
        if series(key)[0]:
            quality.plot(*series(key), marker="o", label=key)
    quality.set_title("held-out quality (epoch 0: untrained)")
    loss.plot(*series("loss"), marker="o", color="tab:red")
    loss.set_title("training loss")
    collapse.plot(*series("collapse_std"), marker="o", label="collapse_std")
    collapse.plot(*series("healthy_std"), linestyle="--", color="gray", label="healthy std (1/sqrt d)")
    collapse.set_title("collapse")
    collapse.set_ylim(bottom=0)
    rank = collapse.twinx()
    rank.plot(*series("effective_rank"), marker="s", color="tab:green", label="effective rank")
    rank.set_ylabel("effective rank")
    for ax in (quality, loss, collapse):
        ax.set_xlabel("epoch")
    quality.legend(fontsize=8)
    lines = collapse.get_legend_handles_labels(), rank.get_legend_handles_labels()
    collapse.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8)
    fig.tight_layout()
    out = Path(out) if out is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "curves.png", lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return out / "curves.png"


# ----------------------------------------------------------------------------- embed, search, export


EMBED_CHUNK = 1024  # images decoded at a time: only one chunk of uint8 images is ever in memory, plus the embeddings
GRID_PX = 96  # the search grid's picture size
GRID_ROWS = 16  # queries drawn in the search grid (all of them are printed)
GRID_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")  # what search --out may end in: matplotlib writes these


def parse_tool_args(argv):
    """The arguments of `eval.py embed|search|export ...` (argv[0] names the tool)."""
    tool = argv[0]
    about = {
        "embed": "Embed images, preprocessed exactly as evaluation does, into one .npz: embeddings (float32 [N, D], raw: "
                 "search compares them by cosine), paths and meta (JSON: how to rebuild the model). An unreadable image "
                 "stops it with one line naming the file.",
        "search": "Exact cosine search, block by block: the top-k images of each query, printed and drawn. A query that "
                  "is in the file finds itself first, at a score of 1.",
        "export": "Write the run's whole embedding function as a torch.export program (OUT.pt2: RGB in [0, 1] to the "
                  "embedding evaluation ranks by, with the whitening and projector of a --freeze-encoder run; it loads with "
                  "torch alone, and embed and search take it in place of a checkpoint), the online encoder's state dict "
                  "(OUT; torchvision's or timm's keys) and a JSON sidecar (OUT.json) with the architecture and preprocessing.",
    }[tool]
    p = argparse.ArgumentParser(prog=f"eval.py {tool}", description=about, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if tool == "embed":
        p.add_argument("checkpoint", nargs="?", type=Path, default=None,
                       help="last.pt of a run, or the OUT.pt2 of eval.py export (omit it with --baseline)")
        p.add_argument("images", type=Path,
                       help="a folder (every image in its tree), a .zip of images, or a CSV whose first column lists image paths")
        p.add_argument("--out", type=Path, default=None,
                       help="the .npz to write (default: embeddings-IMAGES.npz next to the checkpoint; "
                            "a baseline without one: here)")
        p.add_argument("--layer", choices=["encoder", "projector"], default=None,
                       help="the online encoder's features or the projector's outputs (default: what evaluation compares, "
                            "the encoder's; a --freeze-encoder run's projector)")
        p.add_argument("--baseline", choices=["pixels", "random"], default=None,
                       help="no trained weights: the normalised pixels, or the untrained network "
                            "(the run's own with a checkpoint)")
        p.add_argument("--eval-shift", type=int, default=None, metavar="N",
                       help="test-time shifts, as evaluation's (0: each image alone; default: the checkpoint's, else the "
                            "omniglot recipe's); search embeds its queries the same way")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--workers", type=int, default=4, help="threads that decode images")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        g = p.add_argument_group("baseline model without a checkpoint (default: the omniglot recipe's)")
        g.add_argument("--arch", default=None, help="conv4, resnet18, resnet50 or a timm model name")
        g.add_argument("--width", default=None, help="conv4's channels, one number or four comma-separated")
        g.add_argument("--stem", default=None, choices=["small", "imagenet"])
        g.add_argument("--image-size", type=int, default=None)
        g.add_argument("--seed", type=int, default=None, help="--baseline random: the draw of the untrained weights")
    elif tool == "search":
        p.add_argument("embeddings", type=Path, help="the .npz written by python eval.py embed")
        q = p.add_mutually_exclusive_group(required=True)
        q.add_argument("--query", type=Path, nargs="+", help="image files, embedded with the model the .npz records")
        q.add_argument("--index", type=int, nargs="+", help="rows of the .npz as queries")
        p.add_argument("--checkpoint", type=Path, default=None,
                       help="embed --query with this checkpoint (default: the recorded one)")
        p.add_argument("--top-k", type=int, default=5)
        p.add_argument("--out", type=Path, default=None, help="the grid PNG (default: EMBEDDINGS-search.png next to the .npz)")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--memory-mb", type=float, default=512, help="budget for one block of similarities")
        p.add_argument("--workers", type=int, default=4, help="threads that decode images")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    else:
        p.add_argument("checkpoint", type=Path, help="last.pt of a run")
        p.add_argument("--out", type=Path, default=None,
                       help="the state dict (default: encoder.pt next to the checkpoint; a --freeze-encoder run: embedding.pt, "
                            "not written); the sidecar: OUT.json; the embedding function: OUT.pt2")
        p.add_argument("--overwrite", action="store_true", help="replace --out and its sidecar if they exist")
    return p.parse_intermixed_args(argv[1:])  # intermixed: embed CKPT --layer projector IMAGES works too


def load_model(checkpoint=None, baseline=None, layer=None, **model_flags):
    """(script module, checkpoint, args, eval-mode model) for embed, search and export: the checkpoint's model, or a
    baseline built as evaluation builds it. model_flags (arch, width, stem, image_size, seed): a baseline without a
    checkpoint, on top of the omniglot recipe; a checkpoint fixes its own."""
    if checkpoint is None and baseline is None:
        raise UserError("nothing to embed with: pass a CHECKPOINT, or --baseline pixels|random")
    if baseline is not None and layer == "projector":
        raise UserError("--layer projector needs a trained checkpoint; a baseline has no projector")
    model_flags = {k: v for k, v in model_flags.items() if v is not None}
    if checkpoint is not None and Path(checkpoint).suffix.lower() == ".pt2":
        return load_exported(checkpoint, baseline, layer, model_flags)
    if checkpoint is not None:
        mod, ckpt = load_checkpoint(checkpoint)
        if model_flags:
            flag = "--" + next(iter(model_flags)).replace("_", "-")
            raise UserError(f"{flag} comes from CHECKPOINT {checkpoint}; drop {flag}")
        saved = ckpt["args"]
    else:
        mod, ckpt, saved = import_method("byol", "eval.py"), None, {}  # the scripts share their model code
    args = mod.parse_args(["--data", saved.get("data", "omniglot")])  # the recipe's defaults, for args a run lacks
    vars(args).update(saved, **model_flags)
    args.pretrained, args.init = False, None  # the checkpoint's weights replace any initialisation
    args = mod.fill_defaults(args)
    how = SimpleNamespace(checkpoint=checkpoint, baseline=baseline, embedding=layer, init=None)
    return mod, ckpt, args, build_eval_model(how, mod, ckpt, args).eval()


def csv_paths(mod, path):
    """The first column of a CSV; relative paths are relative to the CSV, and a header row is skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of a path
            cells = [r[0].strip() for r in csv.reader(f) if r and r[0].strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"IMAGES {path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    files = [Path(c) if Path(c).is_absolute() else path.parent / c for c in cells]
    if files and not (files[0].is_file() or cells[0].lower().endswith(mod.IMAGE_EXTENSIONS)):
        files = files[1:]  # a header: it names no image
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"IMAGES {path} names images that do not exist, e.g. {missing[:3]}; fix the paths")
    return files


def image_sources(mod, images):
    """(name, read bytes) of every image of a folder tree, a .zip or a CSV list, with absolute names, in a fixed order."""
    images = images.absolute()  # names that still work from another directory
    exts = mod.IMAGE_EXTENSIONS
    if images.is_dir():
        sources = [mod.file_source(p) for p in mod.image_files(images)]
    elif images.suffix.lower() == ".zip" and images.is_file():
        names = sorted(n for n in mod.open_zip(images).namelist() if n.lower().endswith(exts) and not n.startswith("__MACOSX/"))
        sources = mod.zip_sources(images, names)
    elif images.suffix.lower() == ".csv" and images.is_file():
        sources = [mod.file_source(p) for p in csv_paths(mod, images)]
    elif not images.exists():
        raise UserError(f"IMAGES {images} does not exist; pass a folder, a .zip or a CSV of image paths")
    else:
        raise UserError(f"IMAGES {images} is not a folder, a .zip or a .csv; pass one of those")
    if not sources:
        raise UserError(f"IMAGES {images} holds no images (files ending in one of Pillow's {len(exts)} extensions, "
                        "e.g. .png, .jpg)")
    return sources


def image_source(mod, path, what):
    """(name, read bytes) of an image file, or of ZIP:MEMBER (how embed names the images of a zip)."""
    split = re.match(r"(.*?\.zip):(.*)", str(path), re.IGNORECASE)  # X.ZIP too: embed keeps the name's case
    if split and not Path(path).exists() and Path(split[1]).is_file():
        archive, member = split.groups()
        zf = mod.open_zip(archive)
        try:
            zf.getinfo(member)
        except KeyError:
            raise UserError(f"{what} {path}: {archive} holds no {member}") from None
        return str(path), lambda: zf.read(member)
    if not Path(path).is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    return mod.file_source(path)


def embed_sources(mod, model, sources, layer, image_size, device, batch_size, workers, progress, shift=0):
    """Embeddings [N, D] of (name, read bytes) sources on the CPU, through the code evaluation uses (decode_image,
    embed_images): decoded EMBED_CHUNK at a time, so that only the embeddings accumulate."""
    pick = 1 if layer == "projector" else 0  # embed_images returns (features, projections)
    out = []
    with tqdm(total=len(sources), unit="img", desc=f"embed ({layer})", disable=not progress, leave=False) as bar:
        for start in range(0, len(sources), EMBED_CHUNK):
            images = mod.decode_all(sources[start: start + EMBED_CHUNK], image_size, workers)
            for i in range(0, len(images), batch_size):
                out.append(mod.embed_images(model, images[i: i + batch_size], device, batch_size, shift)[pick].cpu())
                bar.update(len(out[-1]))
    return torch.cat(out)


def describe(meta):
    """Which model made the embeddings, in words."""
    shifts = f", averaged over {meta['eval_shift']} px shifts" if meta.get("eval_shift") else ""
    if meta["baseline"] == "pixels":
        return f"the pixels baseline ({meta['image_size']} px{shifts})"
    model = f"{meta['arch']} at {meta['image_size']} px{shifts}"
    if meta["baseline"] == "random":
        return f"the untrained {model}" + (f" of {meta['checkpoint']}" if meta["checkpoint"] else f", seed {meta['seed']}")
    return f"the online {meta['layer']} of {meta['method']} checkpoint {meta['checkpoint']} (epoch {meta['epoch']}; {model})"


def run_embed(opts):
    if opts.batch_size < 1:
        raise UserError(f"--batch-size {opts.batch_size} must be 1 or more")
    mod, ckpt, args, model = load_model(opts.checkpoint, opts.baseline, opts.layer, arch=opts.arch, width=opts.width,
                                        stem=opts.stem, image_size=opts.image_size, seed=opts.seed)
    layer = opts.layer or default_embedding(opts, args)
    shift = args.eval_shift if opts.eval_shift is None else opts.eval_shift
    mod.check_eval_shift(shift, args.image_size)
    device = mod.pick_device(opts.device, 0)
    sources = image_sources(mod, opts.images)
    name = f"embeddings-{opts.images.stem}" + ("-projector" if layer == "projector" else "")
    name += f"-baseline-{opts.baseline}" if opts.baseline else ""
    out = opts.out or (opts.checkpoint.parent if opts.checkpoint else Path(".")) / f"{name}.npz"
    check_out(out, [opts.checkpoint, opts.images, *(Path(n) for n, _ in sources)], opts.overwrite)
    mod.require_writable(out.parent)  # before the work
    start = time.perf_counter()
    embeddings = embed_sources(mod, model.to(device), sources, layer, args.image_size, device, opts.batch_size,
                               opts.workers, not opts.no_progress, shift)
    meta = {"written_by": "eval.py embed", "images": str(opts.images.absolute()), "layer": layer, "eval_shift": shift,
            "checkpoint": str(opts.checkpoint.absolute()) if opts.checkpoint else None, "baseline": opts.baseline,
            "method": ckpt["method"] if ckpt else None, "epoch": ckpt.get("epoch") if ckpt else None,
            "arch": args.arch, "width": args.width, "stem": args.stem, "image_size": args.image_size, "seed": args.seed,
            "weights": weights_key(model)}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: numpy would add .npz to any other name
            np.savez(f, embeddings=embeddings.numpy(), paths=np.array([n for n, _ in sources]), meta=np.array(json.dumps(meta)))

    write_atomic(out, write)
    print(f"embedded {len(sources)} images of {opts.images} with {describe(meta)}: {embeddings.shape[1]} dimensions, "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"wrote {out}")


def weights_key(model):
    """A hash of every weight and buffer of the model that embedded: search checks its queries use the same one."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


META_KEYS = ("layer", "checkpoint", "baseline", "method", "epoch", "arch", "width", "stem", "image_size", "seed")


def read_embeddings(path):
    """(embeddings [N, D], paths, meta) of a file written by eval.py embed."""
    if not path.is_file():
        raise UserError(f"EMBEDDINGS {path} does not exist; write it with python eval.py embed")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(f["meta"].item())
            embeddings, paths = torch.from_numpy(f["embeddings"]), f["paths"].tolist()
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:  # TypeError: a .npy; BadZipFile: truncated
        raise UserError(f"EMBEDDINGS {path} is not a file of python eval.py embed ({e.__class__.__name__}); "
                        "write one with it") from None
    if not (isinstance(meta, dict) and meta.get("written_by") == "eval.py embed" and embeddings.ndim == 2
            and len(paths) == len(embeddings) and all(k in meta for k in META_KEYS)):
        raise UserError(f"EMBEDDINGS {path} is not a file of python eval.py embed; write one with it")
    return embeddings, paths, meta


@torch.no_grad()
def top_k(queries, gallery, k, memory_mb):
    """Exact cosine top-k of every query over the gallery: (scores, indices), both [Q, k]. The gallery is compared
    a block of rows at a time, its best k kept along, so only a [Q, block] matrix is ever held."""
    q = F.normalize(queries.float(), dim=1)
    scores, indices = torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long)
    rows = chunk_rows(len(q), memory_mb)
    for start in range(0, len(gallery), rows):
        sim = q @ F.normalize(gallery[start: start + rows].float(), dim=1).T
        scores = torch.cat([scores, sim], 1)
        indices = torch.cat([indices, torch.arange(start, start + sim.shape[1]).expand(len(q), -1)], 1)
        scores, best = scores.topk(min(k, scores.shape[1]), dim=1)
        indices = indices.gather(1, best)
    return scores, indices


def search_grid(path, plt, mod, query_sources, paths, scores, indices, what):
    """Each row: a query and its top-k, with their cosine scores."""
    rows, cols = min(len(query_sources), GRID_ROWS), 1 + indices.shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    for row, query, hits, sims in zip(axes, query_sources, indices.tolist(), scores.tolist()):
        cells = [(query, "query")] + [(image_source(mod, paths[j], what), f"{k + 1}: {s:.3f}")
                                      for k, (j, s) in enumerate(zip(hits, sims))]
        for ax, ((name, read_bytes), title) in zip(row, cells):
            ax.imshow(mod.decode_image(read_bytes, name, GRID_PX).permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=7)
            outline(ax, "lightgray", 0.5)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def run_search(opts):
    if opts.top_k < 1:
        raise UserError(f"--top-k {opts.top_k} must be 1 or more")
    if not (math.isfinite(opts.memory_mb) and opts.memory_mb > 0):
        raise UserError(f"--memory-mb {opts.memory_mb} must be a finite number above 0")
    embeddings, paths, meta = read_embeddings(opts.embeddings)
    listed = f"an image that {opts.embeddings} lists,"
    out = opts.out or opts.embeddings.with_name(f"{opts.embeddings.stem}-search.png")
    check_out(out, [opts.embeddings, *(opts.query or []), *paths], opts.overwrite, GRID_FORMATS)
    if opts.index is not None:
        mod = import_method(meta["method"] or "byol", f"EMBEDDINGS {opts.embeddings}")  # its decode_image, for the grid
        bad = [i for i in opts.index if not 0 <= i < len(paths)]
        if bad:
            raise UserError(f"--index {bad[0]} is out of range: {opts.embeddings} holds rows 0 to {len(paths) - 1}")
        queries, query_sources = embeddings[opts.index], [image_source(mod, paths[i], listed) for i in opts.index]
    else:
        checkpoint = opts.checkpoint or (Path(meta["checkpoint"]) if meta["checkpoint"] else None)
        if opts.checkpoint is None and checkpoint is not None and not checkpoint.is_file():
            raise UserError(f"{opts.embeddings} was embedded with CHECKPOINT {checkpoint}, which does not exist here; "
                            "pass its new location with --checkpoint")
        model_flags = {} if checkpoint else {k: meta[k] for k in ("arch", "width", "stem", "image_size", "seed")}
        mod, _, args, model = load_model(checkpoint, meta["baseline"], meta["layer"], **model_flags)
        if meta.get("weights") not in (None, weights_key(model)):  # None: a file older than the check
            raise UserError(f"{checkpoint} is not the model {opts.embeddings} was embedded with (its weights differ from "
                            f"those of {meta['checkpoint']} at epoch {meta['epoch']}); pass that one with --checkpoint, "
                            "or embed again")
        device = mod.pick_device(opts.device, 0)
        query_sources = [image_source(mod, q, "--query") for q in opts.query]
        queries = embed_sources(mod, model.to(device), query_sources, meta["layer"], args.image_size, device, 256,
                                opts.workers, progress=False, shift=meta.get("eval_shift", 0))
        if queries.shape[1] != embeddings.shape[1]:
            raise UserError(f"--checkpoint {checkpoint} embeds in {queries.shape[1]} dimensions, {opts.embeddings} in "
                            f"{embeddings.shape[1]}; pass the checkpoint the file was embedded with")
    mod.require_writable(out.parent)
    scores, indices = top_k(queries, embeddings, opts.top_k, opts.memory_mb)
    print(f"cosine similarity in {opts.embeddings} ({len(paths)} images), embedded with {describe(meta)}")
    for (name, _), hits, sims in zip(query_sources, indices.tolist(), scores.tolist()):
        print(f"query {name}")
        for k, (j, s) in enumerate(zip(hits, sims)):
            print(f"  {k + 1:>3}  {s:.4f}  {paths[j]}")
    try:
        plt = pyplot()
    except UserError as e:  # no matplotlib: the printed results still count
        print(f"note: {e}; skipped the grid", file=sys.stderr)
        return
    search_grid(out, plt, mod, query_sources, paths, scores, indices, listed)
    print(f"wrote {out}")


class Embedding(nn.Module):
    """A run's whole embedding function, as export writes it: RGB images in [0, 1], [B, 3, S, S], to the embedding
    evaluation ranks them by. It standardises, encodes (a --freeze-encoder run: frozen backbone, PCA whitening, then
    the trained projector) and, with test-time shifts, takes the mean direction of the shifted copies' outputs."""

    def __init__(self, mod, model, layer, shift):
        super().__init__()
        self.encoder, self.head = model.encoder, model.projector if layer == "projector" else nn.Identity()
        self.offsets, self.shifted, self.standardize = mod.shift_offsets(shift), mod.shifted, mod.standardize

    def forward(self, x):
        x = self.standardize(x)
        outs = [self.head(self.encoder(self.shifted(x, dx, dy))) for dx, dy in self.offsets]
        return outs[0] if len(outs) == 1 else torch.stack([F.normalize(o, dim=1) for o in outs]).mean(0)


class Exported(nn.Module):
    """An embedding function written by export, shaped like the methods for embed_images: its encoder takes the
    standardised images evaluation feeds every model and hands the program the RGB in [0, 1] it was exported for."""

    def __init__(self, mod, program):
        super().__init__()
        self.program, self.projector = program, nn.Identity()
        self.register_buffer("mean", torch.tensor(mod.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(mod.IMAGENET_STD).view(1, 3, 1, 1))

    def encoder(self, x):
        return self.program(x * self.std + self.mean)

    def train(self, mode=True):  # an exported program has no training mode: it is always the eval-mode function
        self.training = mode
        return self


PROGRAM_META = "positive_similarity.json"  # the extra file of an exported program that says what it is


def load_exported(path, baseline, layer, model_flags):
    """(script module, a checkpoint-like record, args, Exported) for a program written by export (a .pt2)."""
    if baseline is not None or model_flags:
        raise UserError(f"{path} is an exported embedding function: it fixes its own model; drop --baseline and the model flags")
    extra, quiet = {PROGRAM_META: ""}, logging.getLogger("torch.export")
    try:
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        quiet.disabled = True  # torch logs a failed load with a traceback before raising: the one line below says it
        program = torch.export.load(path, extra_files=extra)
        meta = json.loads(extra[PROGRAM_META])
    except Exception as e:
        raise UserError(f"{path} is not an embedding function written by python eval.py export ({e.__class__.__name__}); "
                        "write one with it") from None
    finally:
        quiet.disabled = False
    if layer not in (None, meta["layer"]):
        raise UserError(f"--layer {layer}: {path} exports the {meta['layer']} only; drop --layer, or export another")
    mod = import_method(meta["method"], f"CHECKPOINT {path}")
    args = SimpleNamespace(**{k: meta[k] for k in ("arch", "width", "stem", "image_size", "seed")},
                           eval_shift=0, freeze_encoder=meta["layer"] == "projector")  # its shifts are inside it
    return mod, {"method": meta["method"], "epoch": meta["epoch"]}, args, Exported(mod, program.module())


def export_program(mod, model, args, layer, path, meta):
    """torch.export of the run's Embedding, for any batch size, with `meta` inside: it loads with torch alone."""
    model = model.eval()
    function = Embedding(mod, model, layer, args.eval_shift).eval()
    example = torch.rand(2, 3, args.image_size, args.image_size)
    try:
        program = torch.export.export(function, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:
        raise UserError(f"torch.export could not trace {args.arch} ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); "
                        "the state dict and its sidecar still describe the encoder") from None
    write_atomic(path, lambda tmp: torch.export.save(program, tmp, extra_files={PROGRAM_META: json.dumps(meta)}))
    with torch.no_grad():
        return function(example).shape[1]


def run_export(opts):
    mod, ckpt, args, model = load_model(opts.checkpoint)
    frozen = args.freeze_encoder  # what it learned is its projector, on the --init or --pretrained encoder
    out = opts.out or opts.checkpoint.parent / ("embedding.pt" if frozen else "encoder.pt")
    if out.suffix.lower() in (".json", ".pt2"):
        raise UserError(f"--out {out}: the sidecar and the embedding function are written to OUT.json and OUT.pt2, which "
                        f"would be the same file; name the weights e.g. {out.with_suffix('.pt')}")
    program = out.with_suffix(".pt2")
    for path in ([] if frozen else [out]) + [out.with_suffix(".json"), program]:
        check_out(path, [opts.checkpoint], opts.overwrite)
    mod.require_writable(out.parent)
    encoder, layer = model.encoder, default_embedding(SimpleNamespace(baseline=None), args)
    conv4 = args.arch == "conv4"
    sidecar = {"checkpoint": str(opts.checkpoint.absolute()), "method": ckpt["method"], "epoch": ckpt.get("epoch"),
               "arch": args.arch, "width": args.width if conv4 else None, "stem": None if conv4 else args.stem,
               "image_size": args.image_size, "seed": args.seed, "layer": layer, "eval_shift": args.eval_shift}
    sidecar["embedding_dim"] = export_program(mod, model, args, layer, program, sidecar)
    sidecar["program"] = {"file": program.name, "input": "float RGB in [0, 1], [B, 3, image_size, image_size], "
                          "preprocessed as below without the standardisation, which it does itself",
                          "load": "torch.export.load(PATH).module()"}
    sidecar["preprocess"] = "RGB; resize the shorter side to image_size (bilinear), centre crop; /255; (x - mean) / std"
    written = [program]
    if not frozen:
        with torch.no_grad():
            sidecar["feature_dim"] = encoder(torch.zeros(1, 3, args.image_size, args.image_size)).shape[1]
        # A timm backbone is exported as timm's own model (its keys, its mean and std): it loads with timm.create_model.
        timm_net = isinstance(encoder, mod.TimmBackbone)
        mean, std = (encoder.mean, encoder.std) if timm_net else (mod.IMAGENET_MEAN, mod.IMAGENET_STD)
        write_atomic(out, lambda tmp: torch.save((encoder.net if timm_net else encoder).state_dict(), tmp))
        sidecar.update(mean=list(mean), std=list(std))
        if timm_net:
            sidecar["load"] = f"timm.create_model({args.arch!r}, num_classes=0).load_state_dict(torch.load(PATH))"
            if args.pool_stages != 1:
                sidecar["load"] += f"; the embedding also pools {args.pool_stages - 1} earlier stages: use OUT.pt2"
        written.insert(0, out)
    write_atomic(out.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=1) + "\n"))
    shape = f"conv4, widths {','.join(map(str, args.width))}" if conv4 else f"{args.arch}, {args.stem} stem"
    what = "its whole embedding function (frozen encoder, whitening, trained projector)" if frozen else "the online encoder"
    print(f"wrote {what} of {opts.checkpoint} ({shape}, {args.image_size} px, {sidecar['embedding_dim']} dimensions): "
          f"{', '.join(map(str, written))} and {out.with_suffix('.json')}")


# ----------------------------------------------------------------------------- main

# Where each training-log quality metric sits in eval.py's metrics (kNN: "classification/knn@k").
LOG_METRIC = {"one_shot": ("one_shot", "20way"), "val_one_shot": ("val_one_shot", "20way"),
              "r_precision": ("metric_learning", "r_precision"), "recall@1": ("retrieval", "left_to_right", "recall@1"),
              "aug_copy_recall@1": ("aug_copy_retrieval", "aug_copy_recall@1")}


def run_baselines(mod, ckpt, metrics):
    """The baselines the run logged at epoch 0 (untrained, raw pixels, ...) on this same held-out data, beside
    this evaluation's value of the run's quality metric, and the run's warning when it beats none of them."""
    first = (ckpt.get("history") or [{}])[0]
    name = mod.quality_name(first)
    path = ("classification", name) if name and name.startswith("knn@") else LOG_METRIC.get(name)
    value = metrics
    for key in path or ["missing"]:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return None
    text, warning = mod.against_baselines(name, value, first)
    return {"metric": name, "trained": value, "baselines": {k: v for k, v in first.items() if k.startswith("baseline_")},
            "line": f"{name}: {value:.3f} trained vs {text}" if text else None, "warning": warning}



def default_embedding(opts, args):
    """What the run learned: a --freeze-encoder run's projector outputs (its encoder never trained), else the encoder's."""
    return "projector" if args.freeze_encoder and opts.baseline is None else "encoder"


def default_out(opts, args, own_data):
    """Next to the checkpoint; other data, baselines and the other embedding get their own subfolder."""
    parts = [f"baseline-{opts.baseline}"] if opts.baseline else []
    parts += [] if own_data else [args.data]
    parts += ["all-pairs"] if opts.all_pairs else []
    parts += [opts.embedding] if opts.embedding != default_embedding(opts, args) else []
    if opts.checkpoint is None:
        return Path("runs") / f"{'-'.join(parts)}-s{args.seed}"
    return opts.checkpoint.parent / f"eval-{'-'.join(parts)}" if parts else opts.checkpoint.parent


def flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def print_table(result):
    src, data = result["source"], result["data"]
    if src["baseline"]:
        who = f"{src['baseline']} baseline" + ("" if src["baseline"] == "pixels" else f" ({src['arch']}, {src['stem']} stem)")
        who += f" with the data of {src['checkpoint']}" if "checkpoint" in src else ""
    else:
        who = f"{src['method']} checkpoint {src['checkpoint']} (epoch {src['epoch']})"
    print(f"{who}; {result['embedding']} embedding" + (" (frozen encoder, trained head)" if src.get("frozen_encoder") else ""))
    print(f"data: {data['data']}, {data['split']}, {data['image_size']} px")
    rows = [(k, v) for k, v in flatten(result["metrics"])]
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    verdict = result.get("against_baselines")
    if verdict and verdict["line"]:
        print(f"{verdict['line']} (baselines: the run's epoch 0, same held-out data)")
        if verdict["warning"]:
            print(verdict["warning"])
    t = result["seconds"]
    print(f"embedded {t['images_embedded']} images in {t['embed_s']:.1f} s; metrics in {t['metrics_s']:.2f} s")


def run(opts):
    if opts.plot is not None:
        if opts.checkpoint is not None or opts.baseline is not None:
            raise UserError("--plot only draws the curves of a run; pass it without CHECKPOINT and --baseline")
        print(f"wrote {plot_curves(opts.plot, opts.out)}")
        return
    if opts.checkpoint is None and opts.baseline is None:
        raise UserError("nothing to evaluate: pass a CHECKPOINT, --baseline random|random-bn|pretrained, or --plot RUN_DIR")
    if not (math.isfinite(opts.memory_mb) and opts.memory_mb > 0):
        raise UserError(f"--memory-mb {opts.memory_mb} must be a finite number above 0")
    if opts.max_images is not None and opts.max_images < 1:
        raise UserError(f"--max-images {opts.max_images} must be 1 or more")
    if opts.checkpoint is not None:
        mod, ckpt = load_checkpoint(opts.checkpoint)
    else:
        mod, ckpt = import_method("byol", "eval.py"), None  # the scripts share their data and model code
    args, own_data = run_args(opts, mod, ckpt)
    opts.embedding = opts.embedding or default_embedding(opts, args)
    out = opts.out if opts.out is not None else default_out(opts, args, own_data)
    mod.require_writable(out)  # before any data loads
    device = mod.pick_device(opts.device, 0)
    model = build_eval_model(opts, mod, ckpt, args).to(device)  # before the data: a bad file fails fast
    data = load_eval_data(opts, mod, ckpt, args, own_data)
    if opts.baseline == "random-bn":
        # The images the run trains on, at most 4096 of them (a seeded draw).
        train_images = data.anchors[torch.randperm(len(data.anchors), generator=torch.Generator().manual_seed(args.seed))[:4096]]
        recalibrate_batch_norm(mod, model, data.images[train_images], device)
    metrics, extras, timing = evaluate(opts, mod, model, data, args, device)
    if "left" in extras:
        positive, random = similarity_stats(extras["left"], extras["right"])
        if random is not None:
            metrics["similarity"] = separation(positive, random)

    if opts.all_pairs:
        split = "all pairs" + (" (the run trained on most of them)" if own_data and opts.baseline is None else "")
    elif own_data:
        split = f"the run's held-out split (seed {args.seed}, holdout {args.holdout})"
    else:
        split = f"held-out split (seed {args.seed}, holdout {args.holdout})"
    source = {"baseline": opts.baseline, "arch": args.arch, "stem": args.stem}
    if ckpt is not None:
        source.update(checkpoint=str(opts.checkpoint), method=ckpt["method"], epoch=ckpt.get("epoch"),
                      frozen_encoder=args.freeze_encoder and opts.baseline is None)
    result = {
        "source": source,
        "data": {"data": args.data, "data_dir": None if args.data_dir is None else str(args.data_dir),
                 "pairs_csv": None if args.pairs_csv is None else str(args.pairs_csv), "split": split,
                 "seed": args.seed, "holdout": args.holdout, "image_size": args.image_size, "images": len(data.images)},
        "embedding": opts.embedding,
        "eval_shift": args.eval_shift,
        "metrics": metrics,
        "seconds": timing,
    }
    if ckpt is not None and opts.baseline is None and own_data and not opts.all_pairs:
        result["against_baselines"] = run_baselines(mod, ckpt, metrics)
    pictures = []
    if not opts.no_pictures and "left" in extras:
        try:
            pyplot()
        except UserError as e:  # no matplotlib: the metrics still count
            print(f"note: {e}; skipped the pictures", file=sys.stderr)
        else:
            retrieval_grid(out / "retrieval_grid.png", data, extras)
            pictures.append(str(out / "retrieval_grid.png"))
            if "similarity" in metrics:
                similarity_hist(out / "similarity_hist.png", positive, random)
                pictures.append(str(out / "similarity_hist.png"))
    result["pictures"] = pictures
    write_atomic(out / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    print_table(result)
    print(f"wrote {out / 'eval.json'}" + "".join(f", {p}" for p in pictures))
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tools = {"embed": run_embed, "search": run_search, "export": run_export}
    tool = tools.get(argv[0]) if argv else None
    opts = parse_tool_args(argv) if tool else parse_args(argv)
    try:
        (tool or run)(opts)
    except user_errors() as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eval.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
