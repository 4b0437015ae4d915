"""Training benchmark: byol.py's step and pipeline against lucidrains' byol-pytorch and lightly (issues #6, #16).

All three train the same encoder (--arch): conv4, byol.py's default (four conv3x3-BN-ReLU-maxpool blocks,
--width channels; byol.py's default recipe: 28 px, batch 128, AdamW, 1024/256 MLPs, handwriting
augmentation), or a torchvision resnet with the ImageNet stem (byol.py's TLL settings with SGD).

Sections (--only picks some; all by default):
  step     one training step: augmentation + forward + backward + optimiser + EMA, same encoder,
           image size, batch, MLPs and optimiser for all; ours contiguous and channels_last (as
           byol.py trains) and, with --compile, torch.compile. The floor rows are our model's forward
           and backward alone (no augmentation, optimiser or EMA): no implementation with that memory
           format and these settings steps faster
  epoch    a whole epoch with data loading: ours decodes once into a uint8 cache, byol-pytorch
           and lightly read image files through a DataLoader every epoch (lightly's BYOLTransform
           augments each image there). The data: --data-dir's TLL pairs; else, for conv4, byol.py's
           default data (the embedded Omniglot, read from its zip); else synthetic JPEGs. After an
           untimed warm-up epoch each, the pipelines take turns epoch by epoch; then one more epoch of
           each runs under torch.profiler for its busy share: on CUDA the share of the wall time in
           which the GPU runs kernels or copies (a gap is launch overhead, a host sync or a data-loader
           stall), on the CPU the share spent inside torch ops
  augment  augmentation alone: our batched per-sample augment_pair against torchvision's
           per-image transforms of the same BYOL pipeline in a DataLoader
  phases   where our step's time goes, on real batches of the embedded Omniglot: batch assembly,
           augmentation, forward, backward, optimiser (+ scheduler), EMA, each timed on its own;
           the torch ops that take the most time; and byol.py's evaluate() on the real evaluation
           data, per epoch at the recipe's --eval-every
  convs    each convolution of our encoder alone, at the input shape it sees in a step (one view's
           batch), channels_last (as byol.py trains) and contiguous: forward, and forward + backward,
           in ms and GFLOP/s, against the GFLOP/s of a 2048 x 2048 x 2048 matmul on the same device (all
           fp32, also on CUDA, where byol.py trains in bf16); then
           the convolutions' share of a BYOL step at those rates (each view forward + backward through
           the online encoder, forward through the target): the time no memory format saves
  kernels  CUDA only: fused Triton kernels against the PyTorch reference inside a real step,
           resnet18 and resnet50

Images are counted as 2 views x batch: each step of either implementation pushes 2 x batch
images through the online and the target network.

Run (byol-pytorch and lightly come with `pip install -e ".[bench]"`; a missing one is left out):
    python benchmarks/training.py --device cpu --threads 2 --arch conv4             # byol.py's default: conv4, 28 px, batch 128
    python benchmarks/training.py --device cpu --threads 2                          # resnet18, 64 px, batch 64
    python benchmarks/training.py --device cpu --threads 2 --data-dir ../shared/data/tll-dev --max-pairs 256
    python benchmarks/training.py --device cuda --arch resnet18 --image-size 224 --batch-size 256 --workers 16 \\
        --data-dir ~/data/tll --json runs/bench-training-r18.json
    python benchmarks/training.py --device cuda --arch resnet50 --image-size 224 --batch-size 128 --workers 16 \\
        --data-dir ~/data/tll --json runs/bench-training-r50.json
    python benchmarks/training.py --device cpu --only step --compile                 # torch.compile too (slow to compile)
"""

import argparse
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_ZIP = REPO / "data" / "omniglot" / "images_background_small1.zip"  # byol.py's default training data
# Kineto, behind torch.profiler, logs an error line when it finds no GPU; only the measurement matters here.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
# This repository's byol.py and kernels/ (not the unrelated PyPI package `kernels`).
sys.path.insert(0, str(REPO))

import byol  # noqa: E402
from kernels import backend  # noqa: E402

SECTIONS = ("step", "epoch", "augment", "phases", "convs", "kernels")
BYOL_PYTORCH_MISSING = "byol-pytorch is not installed: pip install -e '.[bench]'"
LIGHTLY_MISSING = "lightly is not installed: pip install -e '.[bench]'"
FLOOR = "floor: forward + backward only"
PEERS = ("byol-pytorch", "lightly")
THEIR_AUGMENTATION = (
    "byol-pytorch draws one random parameter set per batch (its default SimCLR-style "
    "pipeline) inside its step; lightly augments each image in its DataLoader, outside the step; "
    "ours draws per-sample parameters for BYOL's full pipeline (with conv4, byol.py's default "
    "recipe: plus rotation, shear and stroke thickness) inside the step"
)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise byol.UserError(message)  # byol.py's: one line, no traceback


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where the training steps and our augmentation run"
    )
    p.add_argument(
        "--arch",
        default="resnet18",
        choices=["conv4", "resnet18", "resnet50"],
        help="encoder of every implementation: byol.py's conv4 (with byol.py's default recipe), or a torchvision "
        "resnet with the ImageNet stem (the kernels section runs resnet18 and resnet50)",
    )
    p.add_argument(
        "--width", default=None, help="conv4's channels, one number or four comma-separated (None: byol.py's recipe)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="training resolution in pixels, square (None: 28 for conv4, as byol.py's recipe; 64 for the resnets)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pairs per step (ours) = images per step (byol-pytorch); 2 views each "
        "(None: 128 for conv4, as byol.py's recipe; 64 for the resnets)",
    )
    p.add_argument(
        "--repeats", type=int, default=10, help="timed steps (and timed augmentation batches; epochs: see --epochs)"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (None: torch's own choice)")
    p.add_argument(
        "--only",
        nargs="+",
        default=list(SECTIONS),
        choices=SECTIONS,
        metavar="SECTION",
        help=f"sections to run, any of: {', '.join(SECTIONS)}",
    )
    p.add_argument(
        "--compile", action="store_true", help="also time our step with torch.compile (slow to compile on CPU)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="DataLoader workers (byol-pytorch, torchvision augmentation) = decoding threads (ours)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="epoch section: TLL layout DIR/left/*.jpg, DIR/right/*.jpg (None: the embedded Omniglot for conv4, "
        "synthetic JPEGs in a temp dir for the resnets)",
    )
    p.add_argument(
        "--max-pairs",
        type=int,
        default=None,
        help="epoch section: use at most this many pairs (None: all of --data-dir or Omniglot; 8 batches of "
        "synthetic pairs)",
    )
    p.add_argument(
        "--epochs", type=int, default=2, help="epoch section: timed epochs of each pipeline (after one warm-up epoch)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the synthetic data, the models and the augmentations")
    p.add_argument(
        "--json", type=Path, default=None, help="also write every measurement to this JSON file (None: print only)"
    )
    cfg = p.parse_args(argv)
    if cfg.image_size is None:
        cfg.image_size = byol.RECIPES["omniglot"]["image_size"] if cfg.arch == "conv4" else 64
    if cfg.batch_size is None:
        cfg.batch_size = byol.RECIPES["omniglot"]["batch_size"] if cfg.arch == "conv4" else 64
    for flag, value, low in [
        ("--image-size", cfg.image_size, 16),
        ("--batch-size", cfg.batch_size, 2),
        ("--repeats", cfg.repeats, 1),
        ("--warmup", cfg.warmup, 0),
        ("--workers", cfg.workers, 0),
        ("--epochs", cfg.epochs, 1),
        ("--threads", cfg.threads, 1),
        ("--max-pairs", cfg.max_pairs, 2),
    ]:
        if value is not None and value < low:
            raise byol.UserError(f"{flag} {value} is too small; use {low} or more")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise byol.UserError("--device cuda asked for CUDA but torch sees no CUDA device; use --device cpu")
    if "epoch" in cfg.only:  # bad data is reported before minutes of other sections, not after
        if cfg.data_dir is not None and not cfg.data_dir.is_dir():
            raise byol.UserError(f"--data-dir {cfg.data_dir} does not exist or is not a directory; check the path")
        pairs = epoch_pairs(cfg)
        if pairs < cfg.batch_size:
            raise byol.UserError(
                f"--batch-size {cfg.batch_size} is larger than the {pairs} pairs of the epoch section; "
                "lower it or raise --max-pairs"
            )
    return cfg


def byol_pytorch_available():
    return importlib.util.find_spec("byol_pytorch") is not None


def lightly_available():
    return importlib.util.find_spec("lightly") is not None


def byol_args(cfg, arch=None):
    """byol.py's own settings. conv4: its default recipe (`python byol.py`, RECIPES["omniglot"]: AdamW,
    1024/256 MLPs, handwriting augmentation, tau 0.996) at this size and batch. The resnets: its settings
    for TLL-like data: SGD (lr 0.4 x B/256, momentum 0.9, weight decay 1e-4), BYOL's augmentation,
    4096/256 MLPs, tau 0.996; ImageNet stem like byol-pytorch."""
    size = ["--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed)]
    if (arch or cfg.arch) == "conv4":
        width = ["--width", cfg.width] if cfg.width else []
        return byol.fill_defaults(byol.parse_args(["--arch", "conv4", *width, *size]))
    return byol.fill_defaults(
        byol.parse_args(
            [
                "--data",
                "tll",
                "--no-pretrained",  # from scratch, as byol-pytorch and lightly train
                "--arch",
                arch or cfg.arch,
                "--stem",
                "imagenet",
                "--optimizer",
                "sgd",
                "--hidden-dim",
                "4096",
                *size,
            ]
        )
    )


def peer_backbone(bargs):
    """(encoder, feature dim, byol-pytorch's hidden_layer) for the peers, seeded: the same network as ours.
    conv4 ends in a Flatten, whose output byol-pytorch takes directly (hidden_layer -1); a torchvision
    resnet's representation is its avgpool output, without the classifier."""
    torch.manual_seed(bargs.seed)
    if bargs.arch == "conv4":
        return byol.conv4(bargs.width), bargs.width[-1], -1
    resnet = getattr(torchvision.models, bargs.arch)(weights=None)
    return resnet, resnet.fc.in_features, "avgpool"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device):
    """bf16 on CUDA, as byol.py trains there; fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def random_images(n, size, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen).to(device)


# ----------------------------------------------------------------------------- the training steps


def our_model(bargs, device, channels_last):
    """byol.py's BYOL module, seeded, on device."""
    torch.manual_seed(bargs.seed)
    model = byol.build_model(bargs).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def our_trainer(bargs, device, channels_last=False, compile_model=False):
    """step(x1, x2, index): byol.py's training step on uint8 pairs (scheduler aside)."""
    model = our_model(bargs, device, channels_last)
    optimizer = byol.build_optimizer(bargs, model)
    forward = torch.compile(model) if compile_model else model

    def step(x1, x2, index):
        gen = byol.step_generator(bargs.seed, index, device, stream=1)
        v1, v2 = byol.augment_pair(x1, x2, gen, bargs)
        if channels_last:
            v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            loss = forward(v1, v2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(bargs.base_tau)
        return loss

    return step


def their_trainer(bargs, device):
    """step(x): byol-pytorch's step on a float batch in [0, 1]; its forward makes both views."""
    from byol_pytorch import BYOL as TheirBYOL

    net, _, hidden_layer = peer_backbone(bargs)
    learner = TheirBYOL(
        net.to(device),
        image_size=bargs.image_size,
        hidden_layer=hidden_layer,
        use_simplicial_embeddings=False,
        projection_size=bargs.proj_dim,
        projection_hidden_size=bargs.hidden_dim,
    )
    # The same optimiser as ours (biases and BN without weight decay); the target network has no gradients.
    optimizer = byol.build_optimizer(bargs, learner)

    def step(x):
        with autocast(device):
            loss = learner(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_moving_average()
        return loss

    return step


def lightly_trainer(bargs, device):
    """step(v1, v2): lightly's BYOL as the example in its documentation trains it, on views its
    DataLoader has already augmented: each view goes through the online and the momentum
    network separately, then lightly's update_momentum. Same MLPs and optimiser as ours."""
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    class LightlyBYOL(torch.nn.Module):
        def __init__(self, backbone, feature_dim):
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(feature_dim, bargs.hidden_dim, bargs.proj_dim)
            self.prediction_head = BYOLPredictionHead(bargs.proj_dim, bargs.hidden_dim, bargs.proj_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    net, feature_dim, _ = peer_backbone(bargs)
    backbone = (
        net if bargs.arch == "conv4" else torch.nn.Sequential(*list(net.children())[:-1])
    )  # without the classifier
    model = LightlyBYOL(backbone, feature_dim).to(device)
    criterion = NegativeCosineSimilarity()
    optimizer = byol.build_optimizer(bargs, model)

    def step(v1, v2):
        update_momentum(model.backbone, model.backbone_momentum, m=bargs.base_tau)
        update_momentum(model.projection_head, model.projection_head_momentum, m=bargs.base_tau)
        with autocast(device):
            p1, z1 = model(v1), model.forward_momentum(v1)
            p2, z2 = model(v2), model.forward_momentum(v2)
            loss = 0.5 * (criterion(p1, z2) + criterion(p2, z1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    step.model = model  # for the tests
    return step


def timed_call(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_steps(step, warmup, repeats, device):
    """Seconds of each of `repeats` calls of step(index) after `warmup` untimed ones."""
    return [timed_call(lambda: step(index), device) for index in range(warmup + repeats)][warmup:]


def time_round_robin(steps, warmup, repeats, device):
    """{name: seconds} for {name: step(index)}, one step of each per round: a change in the
    machine's load (other jobs) then hits every variant alike, and their ratios stay fair."""
    seconds = {name: [] for name in steps}
    for index in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = timed_call(lambda: step(index), device)
            if index >= warmup:
                seconds[name].append(elapsed)
    return seconds


def timing_row(name, seconds, images_per_call, note=""):
    median = statistics.median(seconds)
    return {
        "name": name,
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(seconds),
        "max_ms": 1e3 * max(seconds),
        "images_per_call": images_per_call,
        "images_per_s": images_per_call / median,
        "note": note,
    }


def step_variants(cfg, device):
    """(name, zero-argument builder of step(index), note) for every variant this run times."""
    bargs = byol_args(cfg)
    x1 = random_images(cfg.batch_size, cfg.image_size, device, cfg.seed)
    x2 = random_images(cfg.batch_size, cfg.image_size, device, cfg.seed + 1)
    on_cuda = device.type == "cuda"

    def ours(channels_last, compile_model=False):
        def build():
            train = our_trainer(bargs, device, channels_last, compile_model)
            return lambda index: train(x1, x2, index)

        return build

    variants = [
        ("ours", ours(channels_last=on_cuda), "channels_last, bf16 autocast" if on_cuda else "fp32, contiguous")
    ]
    if not on_cuda:  # on CUDA "ours" is already channels_last
        variants.append(
            ("ours channels_last", ours(channels_last=True), "fp32, model and views channels_last: byol.py's step")
        )
    if cfg.compile:
        variants.append(
            (
                "ours torch.compile",
                ours(channels_last=True, compile_model=True),
                "channels_last, forward compiled, as byol.py --compile",
            )
        )
    if byol_pytorch_available():
        x = x1.float() / 255

        def theirs():
            train = their_trainer(bargs, device)
            return lambda index: train(x)

        variants.append(
            ("byol-pytorch", theirs, ("bf16 autocast; " if on_cuda else "fp32; ") + "one augmentation draw per batch")
        )
    # Views augmented once, beforehand, for the variants whose step does not augment.
    v1, v2 = byol.augment_pair(x1, x2, byol.step_generator(cfg.seed, 0, device, stream=1), bargs)
    if lightly_available():

        def lightly():
            train = lightly_trainer(bargs, device)
            return lambda index: train(v1, v2)

        variants.append(
            (
                "lightly",
                lightly,
                ("bf16 autocast; " if on_cuda else "fp32; ")
                + "views augmented beforehand (its DataLoader does it); each view through each network separately",
            )
        )

    def floor(channels_last):
        def build():
            model = our_model(bargs, device, channels_last)
            views = [v.contiguous(memory_format=torch.channels_last) if channels_last else v for v in (v1, v2)]

            def step(index):
                model.zero_grad(set_to_none=True)
                with autocast(device):
                    loss = model(*views)
                loss.backward()

            return step

        return build

    variants.append(
        (
            FLOOR,
            floor(channels_last=on_cuda),
            "ours without augmentation, optimiser or EMA: the compute every implementation does in this memory format",
        )
    )
    if not on_cuda:
        variants.append(
            (FLOOR + ", channels_last", floor(channels_last=True), "the same, model and views channels_last")
        )
    return variants


def run_step_section(cfg, device):
    steps, notes = {}, {}
    for name, build, note in step_variants(cfg, device):
        step = build()
        if name.endswith("torch.compile"):
            try:
                note += f"; its first step, which compiles, took {timed_call(lambda: step(0), device):.0f} s"
            except Exception as e:  # e.g. no C++ compiler for inductor
                print(
                    f"{name}: skipped, torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                )
                continue
        steps[name], notes[name] = step, note
    seconds = time_round_robin(steps, cfg.warmup, cfg.repeats, device)
    return [timing_row(name, seconds[name], 2 * cfg.batch_size, notes[name]) for name in steps]


# ----------------------------------------------------------------------------- epochs with data loading


class ImageFiles(torch.utils.data.Dataset):
    """What a byol-pytorch or lightly user feeds it: every epoch, each image is read (a file, or a member of
    zip_path) and transformed."""

    def __init__(self, paths, transform, zip_path=None):
        self.paths = paths
        self.transform = transform
        self.zip_path = zip_path
        self.zip = None  # (pid, ZipFile)

    def __len__(self):
        return len(self.paths)

    def read(self, i):
        if self.zip_path is None:
            return Path(self.paths[i]).read_bytes()
        # One ZipFile per process: forked DataLoader workers would otherwise share one file offset.
        if self.zip is None or self.zip[0] != os.getpid():
            self.zip = (os.getpid(), zipfile.ZipFile(self.zip_path))
        return self.zip[1].read(self.paths[i])

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self.read(i))) as img:
            return self.transform(img.convert("RGB"))


def write_synthetic_tll(root, pairs, seed):
    """root/left/NNNNN.jpg and root/right/NNNNN.jpg, 200 x 245 like TLL: smooth random colour fields."""
    rng = np.random.default_rng(seed)
    for side in ("left", "right"):
        (root / side).mkdir(parents=True)
        for i in range(pairs):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            coarse.resize((200, 245), Image.BILINEAR).save(root / side / f"{i:05d}.jpg", quality=90)
    return root


def tll_files(root, max_pairs):
    left, right = byol.list_side(root, "left"), byol.list_side(root, "right")
    names = sorted(set(left) & set(right))[:max_pairs]
    if len(names) < 2:
        raise byol.UserError(f"--data-dir {root}: fewer than 2 pairs with the same name in left/ and right/")
    return [left[n][0] for n in names], [right[n][0] for n in names]


def omniglot_names(max_pairs):
    """The first max_pairs images of byol.py's default training data in sorted order: whole characters of
    20 drawings each, but for the last."""
    with zipfile.ZipFile(OMNIGLOT_ZIP) as zf:
        return sorted(n for n in zf.namelist() if n.endswith(".png"))[:max_pairs]


def epoch_pairs(cfg):
    """How many anchors (pairs) an epoch of the epoch section has."""
    if cfg.data_dir is not None:
        return len(tll_files(cfg.data_dir, cfg.max_pairs)[0])
    if cfg.arch == "conv4":
        return len(omniglot_names(cfg.max_pairs))
    return cfg.max_pairs or 8 * cfg.batch_size


def tll_pair_data(cfg, left, right):
    images = byol.decode_all([byol.file_source(p) for p in left + right], cfg.image_size, cfg.workers)
    n = len(left)
    return byol.pairs_data(images, left + right, list(range(n)), list(range(n, 2 * n)), 0.0, cfg.seed, "natural")


def omniglot_pair_data(cfg, names):
    """As byol.load_omniglot builds its training data, without the evaluation runs: every image is an anchor,
    its positive another drawing of its character."""
    characters = [n.rsplit("/", 1)[0] for n in names]
    index = {c: i for i, c in enumerate(sorted(set(characters)))}
    images = byol.decode_all(byol.zip_sources(OMNIGLOT_ZIP, names), cfg.image_size, cfg.workers)
    return byol.grouped_data(images, names, [index[c] for c in characters], 0.0, cfg.seed, "natural")


def our_epochs(cfg, device, load_data):
    """(seconds to decode the cache once, images decoded, run_epoch(epoch)): byol.py's own epoch loop."""
    bargs = byol_args(cfg)
    start = time.perf_counter()
    data = load_data()
    byol.cache_on_device(data, device)
    decode_s = time.perf_counter() - start
    step = our_trainer(bargs, device, channels_last=True)  # byol.py trains channels_last on every device
    steps = len(data.anchors) // cfg.batch_size

    def run_epoch(epoch):
        order = byol.epoch_order(len(data.anchors), cfg.seed, epoch)
        for i in range(steps):
            index = epoch * steps + i
            x1, x2 = byol.make_pair_batch(data, order, i, cfg.batch_size, 0, 1, cfg.seed, index, device)
            step(x1, x2, index)

    return decode_s, len(data.images), run_epoch


def loader_epochs(cfg, device, dataset, train_batch):
    """run_epoch(epoch): train_batch(batch) over a DataLoader of dataset, as their users run it."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    def run_epoch(epoch):
        for batch in loader:
            train_batch(batch)

    return run_epoch


def their_epochs(cfg, device, files, zip_path):
    """byol-pytorch makes its two views from one image: each anchor (TLL: the left ones)."""
    step = their_trainer(byol_args(cfg), device)
    resize = T.Compose([T.Resize(cfg.image_size), T.CenterCrop(cfg.image_size), T.ToTensor()])
    return loader_epochs(
        cfg, device, ImageFiles(files, resize, zip_path), lambda x: step(x.to(device, non_blocking=True))
    )


def lightly_epochs(cfg, device, files, zip_path):
    """lightly's BYOLTransform makes both views of one image (each anchor; TLL: the left ones) in the DataLoader."""
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    bargs = byol_args(cfg)
    step = lightly_trainer(bargs, device)
    views = BYOLTransform(
        BYOLView1Transform(input_size=cfg.image_size, min_scale=bargs.crop_min_scale),
        BYOLView2Transform(input_size=cfg.image_size, min_scale=bargs.crop_min_scale),
    )
    return loader_epochs(
        cfg,
        device,
        ImageFiles(files, views, zip_path),
        lambda batch: step(*(v.to(device, non_blocking=True) for v in batch)),
    )


def busy_share(intervals, wall_us):
    """Share of wall_us covered by the union of the (start, end) intervals, all in microseconds."""
    covered, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered / wall_us


def profiled_busy_share(fn, device):
    """(share of fn()'s wall time during which the device works, that wall time in seconds), from
    torch.profiler, which slows fn() a little (on CUDA it traces every launch): on CUDA the union of the
    GPU's kernels, copies and memsets (idle gaps are launch overhead, host syncs or data-loader stalls); on
    the CPU the union of the torch ops of this process (gaps are Python and waiting)."""
    activity, device_type = (
        (ProfilerActivity.CUDA, DeviceType.CUDA) if device.type == "cuda" else (ProfilerActivity.CPU, DeviceType.CPU)
    )
    with torch.profiler.profile(activities=[activity]) as prof:
        wall_s = timed_call(fn, device)
    intervals = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == device_type and not e.is_user_annotation
    ]  # the DataLoader's wait is one
    return busy_share(intervals, 1e6 * wall_s), wall_s


def run_epoch_section(cfg, device):
    """Each pipeline's epochs, taking turns epoch by epoch as the steps do, after one untimed warm-up epoch
    each; then one more epoch of each under the profiler for its device-busy share."""
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.data_dir is None and cfg.arch == "conv4":
            files, zip_path = omniglot_names(cfg.max_pairs), OMNIGLOT_ZIP
            source, which = f"embedded Omniglot ({OMNIGLOT_ZIP.name}, 105x105 PNG)", "images"
            decode_s, decoded, ours = our_epochs(cfg, device, lambda: omniglot_pair_data(cfg, files))
        else:
            if cfg.data_dir is None:
                pairs = cfg.max_pairs or 8 * cfg.batch_size
                root, source = write_synthetic_tll(Path(tmp), pairs, cfg.seed), f"{pairs} synthetic 200x245 JPEG pairs"
            else:
                root, source = cfg.data_dir, str(cfg.data_dir)
            left, right = tll_files(root, cfg.max_pairs)
            files, zip_path, which = left, None, "left images"
            decode_s, decoded, ours = our_epochs(cfg, device, lambda: tll_pair_data(cfg, left, right))
        steps = len(files) // cfg.batch_size
        pipelines = [
            (
                "ours",
                decode_s,
                ours,
                f"decodes {decoded} images once ({count(max(1, cfg.workers), 'thread')}), then make_pair_batch + augment_pair",
            )
        ]
        if byol_pytorch_available():
            pipelines.append(
                (
                    "byol-pytorch",
                    0.0,
                    their_epochs(cfg, device, files, zip_path),
                    f"DataLoader ({count(cfg.workers, 'worker')}) reads, resizes and converts {steps * cfg.batch_size} "
                    f"{which} every epoch",
                )
            )
        if lightly_available():
            pipelines.append(
                (
                    "lightly",
                    0.0,
                    lightly_epochs(cfg, device, files, zip_path),
                    f"DataLoader ({count(cfg.workers, 'worker')}) reads {steps * cfg.batch_size} {which} and "
                    "augments both views of each (BYOLTransform) every epoch",
                )
            )
        seconds = time_round_robin({name: run_epoch for name, _, run_epoch, _ in pipelines}, 1, cfg.epochs, device)
        images = 2 * cfg.batch_size * steps
        rows = []
        for name, startup_s, run_epoch, note in pipelines:
            busy, profiled_s = profiled_busy_share(lambda: run_epoch(1 + cfg.epochs), device)
            rows.append(
                {
                    "name": name,
                    "startup_s": startup_s,
                    "epoch_s": seconds[name],
                    "images_per_epoch": images,
                    "images_per_s": images / statistics.median(seconds[name]),
                    "busy": busy,
                    "profiled_epoch_s": profiled_s,
                    "note": note,
                }
            )
    return rows, f"{source}, {len(files)} pairs used, {steps} steps of {cfg.batch_size} per epoch"


# ----------------------------------------------------------------------------- augmentation alone


def torchvision_view(size, bargs, blur_prob, solarize_prob):
    """torchvision's per-image BYOL view, with the same parameters as byol.augment."""
    k = bargs.jitter_strength
    radius = max(1, math.ceil(3 * 2.0 * size / 224))  # byol.gaussian_blur's kernel radius
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(bargs.crop_min_scale, 1.0)),
            T.RandomHorizontalFlip(bargs.flip_prob),
            T.RandomApply([T.ColorJitter(0.4 * k, 0.4 * k, 0.2 * k, 0.1 * k)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(2 * radius + 1, (0.1 * size / 224, 2.0 * size / 224))], p=blur_prob),
            T.RandomSolarize(128, p=solarize_prob),
            T.ToTensor(),
            T.Normalize(byol.IMAGENET_MEAN, byol.IMAGENET_STD),
        ]
    )


class TorchvisionPairs(torch.utils.data.Dataset):
    """Both BYOL views of in-memory PIL images, per image, as a DataLoader runs them."""

    def __init__(self, images, bargs):
        self.images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        size = images.shape[-1]
        self.view1 = torchvision_view(size, bargs, blur_prob=1.0, solarize_prob=0.0)
        self.view2 = torchvision_view(size, bargs, blur_prob=0.1, solarize_prob=bargs.solarize_prob)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.view1(self.images[i]), self.view2(self.images[i])


def run_augment_section(cfg, device):
    bargs = byol_args(cfg)
    images = 2 * cfg.batch_size
    x1 = random_images(cfg.batch_size, cfg.image_size, device, cfg.seed)
    x2 = random_images(cfg.batch_size, cfg.image_size, device, cfg.seed + 1)

    def ours(index):
        byol.augment_pair(x1, x2, byol.step_generator(cfg.seed, index, device, stream=1), bargs)

    rows = [
        timing_row(
            f"ours augment_pair ({device.type})",
            time_steps(ours, cfg.warmup, cfg.repeats, device),
            images,
            "batched tensor ops, per-sample parameters",
        )
    ]
    batches = cfg.warmup + cfg.repeats
    dataset = TorchvisionPairs(random_images(cfg.batch_size * batches, cfg.image_size, "cpu", cfg.seed + 2), bargs)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers)
    # Time between batch arrivals, after the warm-up batches (the first includes starting the workers).
    start = time.perf_counter()
    arrivals = [time.perf_counter() for _ in loader]
    seconds = np.diff([start, *arrivals])[cfg.warmup :].tolist()
    rows.append(
        timing_row(
            "torchvision per-image (CPU)",
            seconds,
            images,
            f"PIL transforms in a DataLoader, {count(cfg.workers, 'worker')}",
        )
    )
    return rows


# ----------------------------------------------------------------------------- where our step's time goes

PHASES = ("batch", "augment", "forward", "backward", "optimiser", "EMA")


def phased_trainer(bargs, device, data):
    """step(index) -> seconds of each of PHASES: the body of byol.py's training loop (channels_last, with its
    scheduler and its target_tau schedule), cut where one phase ends and the next begins. Each phase is also a
    record_function range, for the profiler."""
    model = our_model(bargs, device, channels_last=True)
    optimizer = byol.build_optimizer(bargs, model)
    steps_per_epoch = len(data.anchors) // bargs.batch_size
    total_steps = bargs.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, byol.warmup_cosine(total_steps, int(bargs.warmup_epochs * steps_per_epoch))
    )

    def step(index):
        epoch, i = divmod(index, steps_per_epoch)
        seconds = []

        def phase(name, fn):
            sync(device)
            start = time.perf_counter()
            with torch.profiler.record_function(name):
                out = fn()
            sync(device)
            seconds.append(time.perf_counter() - start)
            return out

        order = byol.epoch_order(len(data.anchors), bargs.seed, epoch)
        x1, x2 = phase(
            "batch", lambda: byol.make_pair_batch(data, order, i, bargs.batch_size, 0, 1, bargs.seed, index, device)
        )

        def augment():
            v1, v2 = byol.augment_pair(x1, x2, byol.step_generator(bargs.seed, index, device, stream=1), bargs)
            return v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)

        v1, v2 = phase("augment", augment)

        def forward():
            with autocast(device):
                return model(v1, v2)

        loss = phase("forward", forward)

        def backward():
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

        phase("backward", backward)
        phase("optimiser", lambda: (optimizer.step(), scheduler.step()))
        phase("EMA", lambda: byol.after_step(model, bargs, index + 1, total_steps))
        return seconds

    step.model = model
    return step


def top_ops(prof, device, steps, count=12):
    """The torch ops with the most self time in the profiled steps: (name, ms per step, share of all self time)."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = [e for e in prof.key_averages() if not e.is_user_annotation]
    total = sum(getattr(e, key) for e in averages)
    ranked = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:count]
    return [(e.key, getattr(e, key) / 1e3 / steps, getattr(e, key) / total) for e in ranked]


def run_phases_section(cfg, device):
    """Our step by phase on the embedded Omniglot (byol.py's default data), taking the median of each phase
    over --repeats steps after --warmup; then the top ops of a few profiled steps; then byol.py's evaluate()
    on the same data's evaluation runs (the official one-shot runs, the validation episodes and the
    collapse metrics), after one untimed call."""
    bargs = byol_args(cfg)
    data = byol.load_omniglot(bargs)
    byol.cache_on_device(data, device)
    step = phased_trainer(bargs, device, data)
    for index in range(cfg.warmup):
        step(index)
    per_step = np.array([step(cfg.warmup + r) for r in range(cfg.repeats)])  # [repeats, phases]
    profiled = min(cfg.repeats, 3)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for r in range(profiled):
            step(cfg.warmup + cfg.repeats + r)
    byol.evaluate(step.model, data, device, shift=bargs.eval_shift)
    evals = [
        timed_call(lambda: byol.evaluate(step.model, data, device, shift=bargs.eval_shift), device)
        for _ in range(min(cfg.repeats, 3))
    ]
    steps_per_epoch = len(data.anchors) // bargs.batch_size
    return {
        "phases": {name: 1e3 * float(np.median(per_step[:, k])) for k, name in enumerate(PHASES)},
        "step_ms": 1e3 * float(np.median(per_step.sum(1))),
        "images_per_step": 2 * bargs.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "eval_s": statistics.median(evals),
        "eval_every": bargs.eval_every,
        "top_ops": top_ops(prof, device, profiled),
        "profiled_steps": profiled,
    }


# ----------------------------------------------------------------------------- the convolutions alone


def encoder_convs(bargs, device, channels_last):
    """[(conv, input shape)] for each nn.Conv2d of our encoder in the order a forward pass calls them,
    with one view's batch of --image-size images."""
    encoder = our_model(bargs, device, channels_last).encoder
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, inputs, output: seen.append((m, inputs[0].shape)))
        for m in encoder.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    x = byol.normalize(random_images(bargs.batch_size, bargs.image_size, device, bargs.seed))
    with torch.no_grad():
        encoder(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    for hook in hooks:
        hook.remove()
    return seen


def conv_flops(conv, input_shape):
    """Multiply-adds x 2 of one forward call: output elements x (input channels / groups) x kernel area."""
    b, _, h, w = input_shape
    out_h = (h + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    out_w = (w + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
    k = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
    return 2 * b * out_h * out_w * conv.out_channels * k


def median_seconds(fn, device, warmup, repeats):
    return statistics.median(time_steps(lambda _: fn(), warmup, repeats, device))


def time_conv(conv, x, cfg, device):
    """(forward seconds, forward + backward seconds) of conv on x, medians."""
    grad = torch.randn_like(conv(x))

    def forward_backward():
        conv.weight.grad, x.grad = None, None
        conv(x).backward(grad)

    forward_s = median_seconds(lambda: conv(x).detach(), device, cfg.warmup, cfg.repeats)
    return forward_s, median_seconds(forward_backward, device, cfg.warmup, cfg.repeats)


def run_convs_section(cfg, device):
    """Each convolution of our encoder timed alone (forward; forward + backward, where the backward computes the
    weight gradient and, after the first convolution, the input gradient), in both memory formats; and a large
    matmul's rate on the same device, the arithmetic ceiling the convolutions are measured against."""
    bargs = byol_args(cfg)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    matmul_gflops = 2 * 2048**3 / median_seconds(lambda: a @ b, device, cfg.warmup, cfg.repeats) / 1e9
    rows = []
    for channels_last in (True, False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for index, (conv, shape) in enumerate(encoder_convs(bargs, device, channels_last)):
            x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_(index > 0)
            forward_s, both_s = time_conv(conv, x, cfg, device)
            flops = conv_flops(conv, shape)
            rows.append(
                {
                    "format": "channels_last" if channels_last else "contiguous",
                    "conv": f"{conv.in_channels}->{conv.out_channels}, {conv.kernel_size[0]}x{conv.kernel_size[1]}, "
                    f"stride {conv.stride[0]}, {shape[2]}x{shape[3]} in",
                    "forward_ms": 1e3 * forward_s,
                    "forward_gflops": flops / forward_s / 1e9,
                    "forward_backward_ms": 1e3 * both_s,
                    "forward_backward_gflops": flops * (3 if index > 0 else 2) / both_s / 1e9,
                }
            )
    return {"matmul_gflops": matmul_gflops, "rows": rows, "images_per_step": 2 * bargs.batch_size}


def convs_table(result):
    """Each convolution's rate, then the convolutions of one BYOL step at those rates in each format."""
    table = markdown(
        ["format", "convolution (one view's batch)", "forward ms", "GFLOP/s", "forward + backward ms", "GFLOP/s"],
        [
            [
                r["format"],
                r["conv"],
                f"{r['forward_ms']:.2f}",
                f"{r['forward_gflops']:.1f}",
                f"{r['forward_backward_ms']:.2f}",
                f"{r['forward_backward_gflops']:.1f}",
            ]
            for r in result["rows"]
        ],
    )
    lines = [f"- matmul 2048 x 2048 x 2048 on this device: {result['matmul_gflops']:.1f} GFLOP/s"]
    for fmt in ("channels_last", "contiguous"):
        rows = [r for r in result["rows"] if r["format"] == fmt]
        # Two views: forward + backward through the online encoder, forward through the target encoder.
        step_ms = 2 * sum(r["forward_backward_ms"] + r["forward_ms"] for r in rows)
        lines.append(f"- the convolutions of one step ({result['images_per_step']} images), {fmt}: {step_ms:.1f} ms")
    return table + "\n\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- fused kernels (CUDA)


def fused_skip_reason(device):
    if device.type != "cuda":
        return "the fused Triton kernels need CUDA; kernels section skipped"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: the interpreter would be timed, not the compiled kernels; kernels section skipped"
    if backend.is_reference_forced():
        return "the reference path is forced (KERNELS_FORCE_REFERENCE); kernels section skipped"
    if not backend.triton_available():
        return "Triton is not installed; kernels section skipped"
    return None


def run_kernels_section(cfg, device):
    """Our step with the PyTorch reference ops, then with the fused kernels, resnet18 and resnet50."""
    x1 = random_images(cfg.batch_size, cfg.image_size, device, cfg.seed)
    x2 = random_images(cfg.batch_size, cfg.image_size, device, cfg.seed + 1)
    rows = []
    try:
        for arch in ("resnet18", "resnet50"):
            for kernels, forced in (("reference", True), ("fused", False)):
                backend.force_reference(forced)  # read at every call of the loss and the EMA
                train = our_trainer(byol_args(cfg, arch), device, channels_last=True)
                seconds = time_steps(lambda index: train(x1, x2, index), cfg.warmup, cfg.repeats, device)
                rows.append(
                    timing_row(f"{arch} {kernels}", seconds, 2 * cfg.batch_size, "channels_last, bf16 autocast")
                )
    finally:
        backend.force_reference(False)
    return rows


# ----------------------------------------------------------------------------- report


def count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ratio_columns(rows, baselines):
    """(header, cells per row): each row's images/s divided by each baseline row's of the same run (the
    baselines that ran)."""
    bases = [next(r for r in rows if r["name"] == b) for b in baselines if any(r["name"] == b for r in rows)]
    return (
        [f"vs {b['name']}" for b in bases],
        [[f"{r['images_per_s'] / b['images_per_s']:.2f}x" for b in bases] for r in rows],
    )


def step_table(rows, *baselines):
    """Per-step timings, then images/s against each baseline row."""
    header, ratios = ratio_columns(rows, baselines)
    return markdown(
        ["variant", "median ms", "min ms", "max ms", "images/s", *header, "note"],
        [
            [
                r["name"],
                f"{r['median_ms']:.1f}",
                f"{r['min_ms']:.1f}",
                f"{r['max_ms']:.1f}",
                f"{r['images_per_s']:.1f}",
                *ratio,
                r["note"],
            ]
            for r, ratio in zip(rows, ratios)
        ],
    )


def epoch_table(rows, device):
    busy = "GPU busy" if device.type == "cuda" else "in torch ops"
    header, ratios = ratio_columns(rows, PEERS)
    return markdown(
        [
            "pipeline",
            "start-up s",
            "epoch s (median)",
            "epochs s",
            "images/s",
            *header,
            f"{busy} (profiled epoch)",
            "note",
        ],
        [
            [
                r["name"],
                f"{r['startup_s']:.2f}",
                f"{statistics.median(r['epoch_s']):.2f}",
                ", ".join(f"{s:.2f}" for s in r["epoch_s"]),
                f"{r['images_per_s']:.1f}",
                *ratio,
                f"{100 * r['busy']:.0f}% of {r['profiled_epoch_s']:.2f} s",
                r["note"],
            ]
            for r, ratio in zip(rows, ratios)
        ],
    )


def phases_table(result):
    """Each phase's median, its share of the step, then the evaluation at the recipe's cadence per epoch."""
    step_ms = result["step_ms"]
    lines = [
        [name, f"{ms:.1f}", f"{100 * ms / sum(result['phases'].values()):.0f}%"]
        for name, ms in result["phases"].items()
    ]
    lines.append(
        [
            "whole step (median of the sums)",
            f"{step_ms:.1f}",
            f"{result['images_per_step'] / step_ms * 1e3:.1f} images/s",
        ]
    )
    epoch_s = result["steps_per_epoch"] * step_ms / 1e3
    eval_per_epoch = result["eval_s"] / result["eval_every"]
    share = 100 * eval_per_epoch / (epoch_s + eval_per_epoch)
    epoch = f"an epoch of {result['steps_per_epoch']} steps ({epoch_s:.1f} s)"
    lines.append(
        [
            f"evaluate() per epoch: one call of {result['eval_s']:.2f} s / eval_every {result['eval_every']}",
            f"{1e3 * eval_per_epoch:.1f}",
            f"{share:.1f}% of {epoch} + its evaluation",
        ]
    )
    table = markdown(["phase", "median ms", "share"], lines)
    ops = markdown(
        [f"op (self time, {result['profiled_steps']} profiled steps)", "ms per step", "share"],
        [[name, f"{ms:.1f}", f"{100 * share:.1f}%"] for name, ms, share in result["top_ops"]],
    )
    return table + "\n\n" + ops


def kernels_table(rows):
    by_name = {r["name"]: r for r in rows}
    return markdown(
        ["arch", "reference ms", "fused ms", "speed-up", "fused images/s"],
        [
            [
                arch,
                f"{by_name[f'{arch} reference']['median_ms']:.1f}",
                f"{by_name[f'{arch} fused']['median_ms']:.1f}",
                f"{by_name[f'{arch} reference']['median_ms'] / by_name[f'{arch} fused']['median_ms']:.2f}x",
                f"{by_name[f'{arch} fused']['images_per_s']:.1f}",
            ]
            for arch in ("resnet18", "resnet50")
        ],
    )


def byol_step_row(step_rows):
    """The step as byol.py trains it: channels_last (on CUDA, plain "ours" is)."""
    return next(r for name in ("ours channels_last", "ours") for r in step_rows if r["name"] == name)


def augmentation_share(augment_rows, step_rows):
    """Is augmentation the bottleneck? Its time per image as a share of our whole step's."""
    ours = byol_step_row(step_rows)
    return "\n".join(
        f"- {r['name']}: {r['images_per_s'] / ours['images_per_s']:.1f}x the images/s of our training step "
        f"(would take {100 * ours['images_per_s'] / r['images_per_s']:.0f}% of the step's time)"
        for r in augment_rows
    )


def describe(cfg, device):
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    encoder = (
        f"conv4 widths {','.join(map(str, byol_args(cfg).width))}, byol.py's default recipe"
        if cfg.arch == "conv4"
        else f"{cfg.arch} (ImageNet stem)"
    )
    return (
        f"{where}, torch {torch.__version__}, {count(torch.get_num_threads(), 'thread')}; {encoder}, "
        f"{cfg.image_size} px, batch {cfg.batch_size} -> {2 * cfg.batch_size} images per step (2 views x batch); "
        f"median/min/max over {cfg.repeats} steps after {cfg.warmup} warm-up steps"
    )


def run(cfg):
    """Runs the chosen sections, prints their tables; returns every measurement."""
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "setup": describe(cfg, device),
    }
    print(f"# Training benchmark\n\n{results['setup']}\n")
    for available, missing in ((byol_pytorch_available, BYOL_PYTORCH_MISSING), (lightly_available, LIGHTLY_MISSING)):
        if not available():
            print(missing + "\n")
    if "step" in cfg.only:
        rows = run_step_section(cfg, device)
        results["step"] = rows
        print(
            "## Training step (the variants take turns, one step each per round)\n\n"
            + step_table(rows, *PEERS)
            + f"\n\nNote: {THEIR_AUGMENTATION}.\n"
        )
    if "epoch" in cfg.only:
        rows, source = run_epoch_section(cfg, device)
        results["epoch"] = rows
        print(f"## Epoch with data loading\n\n{source}\n\n" + epoch_table(rows, device) + "\n")
    if "augment" in cfg.only:
        rows = run_augment_section(cfg, device)
        results["augment"] = rows
        print("## Augmentation alone\n\n" + step_table(rows, rows[0]["name"]) + "\n")
        if "step" in cfg.only:
            print(augmentation_share(rows, results["step"]) + "\n")
    if "phases" in cfg.only:
        result = run_phases_section(cfg, device)
        results["phases"] = result
        print(
            "## Where our step's time goes (byol.py's loop body on Omniglot batches, channels_last)\n\n"
            + phases_table(result)
            + "\n"
        )
    if "convs" in cfg.only:
        result = run_convs_section(cfg, device)
        results["convs"] = result
        print(
            "## The convolutions alone (our encoder, each at its input shape in a step)\n\n"
            + convs_table(result)
            + "\n"
        )
    if "kernels" in cfg.only:
        reason = fused_skip_reason(device)
        if reason:
            print(f"## Fused kernels\n\n{reason}\n")
        else:
            rows = run_kernels_section(cfg, device)
            results["kernels"] = rows
            print("## Fused kernels in a real step\n\n" + kernels_table(rows) + "\n")
    if cfg.json:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {cfg.json}")
    return results


def main(argv=None):
    try:
        run(parse_args(argv))
    except byol.UserError as e:
        print(f"training.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
