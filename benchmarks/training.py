"""Training benchmark: byol.py's step and pipeline against lucidrains' byol-pytorch and lightly (issues #6, #16).

All three train the same encoder, made by byol.build_encoder and seeded alike: conv4 with `python byol.py`'s recipe
(`byol.parse_args([])`: widths 32,64,128,256, 28 px, batch 128, AdamW, 1024/256 MLPs, batch norm per view, the
handwriting augmentation), or a resnet from scratch with the ImageNet stem, SGD and 4096/256 MLPs. Sections (--only):
  step     a training step, augmentation + forward + backward + optimiser + EMA (byol.train's step but its
           scheduler), ours channels_last as byol.py trains (bf16 autocast on CUDA); with --compile also ours
           compiled, as `byol.py --compile` runs it (torch.compile of the whole step; CUDA graphs on a GPU), its
           compile seconds timed apart; the floor: our forward and backward alone. The variants take turns, a step
           each per round: a change in load hits all alike
  epoch    an epoch with data loading: ours reads what prepare.py decodes once (load_data from an empty cache: the
           start-up), then make_pair_batch + our step; byol-pytorch and lightly read image files in a DataLoader
           every epoch (lightly's BYOLTransform augments there). Data: --data-dir's TLL pairs, else Omniglot for
           conv4, else synthetic JPEG pairs. After a warm-up epoch each they take turns; one more epoch each runs
           under torch.profiler for its busy share (CUDA: GPU kernels and copies; CPU: inside torch ops)
  augment  our batched per-sample augment_pair against torchvision's per-image BYOL transforms in a DataLoader
  kernels  CUDA only: the fused Triton kernels against the PyTorch reference in our step, resnet18 and resnet50
Images count 2 views x batch. byol-pytorch and lightly: `pip install -e ".[bench]"` (a missing one's rows are left out).

    python benchmarks/training.py --device cpu --threads 2 --arch conv4 --only step epoch   # byol.py's default recipe
    python benchmarks/training.py --device cpu --threads 2 --arch conv4 --only step --compile
    python benchmarks/training.py --device cpu --threads 2 --arch conv4 --only step --cpu-bf16   # byol.py --cpu-bf16
    python benchmarks/training.py --device cpu --threads 2 --arch resnet18 --data-dir ../shared/data/tll-dev
    bash benchmarks/gpu.sh training OUT [DATA_DIR]    # CUDA: conv4 at 28 px, resnet18 at 32 and 224 px, resnet50
"""

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_ZIP = REPO / "data" / "omniglot" / "images_background_small1.zip"  # byol.py's default training images
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # Kineto, behind torch.profiler, logs an error when it finds no GPU
sys.path.insert(0, str(REPO))  # this repository's byol.py and kernels/ (not the unrelated PyPI package `kernels`)

import byol  # noqa: E402
from kernels import backend  # noqa: E402

SECTIONS = ("step", "epoch", "augment", "kernels")
PEERS = ("byol-pytorch", "lightly")
INSTALLED = {peer: importlib.util.find_spec(peer.replace("-", "_")) is not None for peer in PEERS}
MISSING = {peer: f"{peer} is not installed (pip install -e '.[bench]'): its rows are left out" for peer in PEERS}
OURS, COMPILED, FLOOR = "ours channels_last", "ours compiled", "floor: forward + backward only"
THEIR_AUGMENTATION = (
    "byol-pytorch draws one random parameter set per batch (its default SimCLR-style pipeline) inside its step; "
    "lightly augments each image in its DataLoader, outside the step; ours draws per-sample parameters for BYOL's "
    "full pipeline (with conv4, byol.py's default recipe: plus rotation, shear and stroke thickness) inside the step"
)


def at_least(low):
    def number(text):
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"{text} is too small; use {low} or more")
        return int(text)

    return number


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the steps and our augmentation run")
    p.add_argument("--arch", default="conv4", choices=["conv4", "resnet18", "resnet50"], help="every one's encoder")
    p.add_argument("--width", help="conv4's channels, one number or four comma-separated (None: the recipe's)")
    p.add_argument("--image-size", type=at_least(16), help="pixels (None: 28 for conv4, the recipe's; 64 for resnets)")
    p.add_argument("--batch-size", type=at_least(2), help="pairs per step (None: 128 for conv4, the recipe's; 64)")
    p.add_argument("--repeats", type=at_least(1), default=10, help="timed steps (and augmentation batches)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=at_least(1), help="torch intra-op threads (None: torch's own choice)")
    p.add_argument("--only", nargs="+", default=list(SECTIONS), choices=SECTIONS, metavar="SECTION", help="sections")
    p.add_argument("--compile", action="store_true", help="step: also ours compiled, as byol.py --compile runs it")
    p.add_argument("--cpu-bf16", action="store_true", help="step: every trainer under bf16 autocast on the CPU too")
    p.add_argument("--workers", type=at_least(0), default=4, help="their DataLoaders' workers")
    p.add_argument("--data-dir", type=Path, help="epoch: TLL pairs, DIR/left/*.jpg and DIR/right/*.jpg")
    p.add_argument("--max-pairs", type=at_least(2), help="epoch: at most this many pairs (None: all; or 8 steps)")
    p.add_argument("--epochs", type=at_least(1), default=2, help="epoch: timed epochs of each, after a warm-up epoch")
    p.add_argument("--seed", type=int, default=0, help="seeds the synthetic data, the models and the augmentations")
    p.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    cfg = p.parse_args(argv)
    conv4 = cfg.arch == "conv4"
    cfg.image_size = cfg.image_size or (byol.parse_args([]).image_size if conv4 else 64)
    cfg.batch_size = cfg.batch_size or (byol.RECIPES["omniglot"]["batch_size"] if conv4 else 64)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for CUDA but torch sees no CUDA device; use --device cpu")
    pairs = epoch_pairs(cfg, p.error) if "epoch" in cfg.only else math.inf  # said now, not after the other sections
    if pairs < cfg.batch_size:
        p.error(f"--batch-size {cfg.batch_size} is larger than the {pairs} pairs of the epoch section")
    return cfg


def recipe(cfg, arch=None):
    """byol.py's arguments at this size and batch. conv4: `python byol.py`'s own (the Omniglot recipe). The resnets:
    its settings for pairs of photos, from scratch with byol-pytorch's ImageNet stem, SGD and 4096/256 MLPs."""
    argv = ["--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed)]
    argv += ["--cpu-bf16"] * getattr(cfg, "cpu_bf16", False)
    if (arch or cfg.arch) == "conv4":
        return fit(byol.parse_args(argv + (["--width", *cfg.width.split(",")] if cfg.width else [])), anchors=2720)
    argv += ["--arch", arch or cfg.arch, *"--data tll --no-pretrained --optimizer sgd --hidden-dim 4096".split()]
    args = fit(byol.parse_args(argv), anchors=2720)
    args.stem = "imagenet"  # as byol-pytorch's users run a torchvision resnet (byol.py picks CIFAR's at <= 64 px)
    return args


def fit(args, anchors):
    """What byol.train() fills in once it knows the number of training anchors (its fit_to_data, in one process, for
    a recipe without --pretrained): batch, epochs, warm-up, rate and weight decay. test_benchmarks.py compares."""
    r = byol.RECIPES[args.data]
    args.epochs = args.epochs or min(r["epochs"], max(1, r.get("max_pairs", 2**62) // anchors))
    args.batch_size = args.batch_size or min(r.get("batch_size", 64), max(2, 2 ** int(math.log2(max(1, anchors // 2)))))
    args.lr = byol.BASE_LR[args.optimizer] * args.batch_size / 256 if args.lr is None else args.lr
    args.warmup_epochs, args.weight_decay = min(10.0, 0.1 * args.epochs), {"sgd": 1e-4, "adamw": 1e-6}[args.optimizer]
    return args


def encoder(args):
    """(encoder, feature dim): the one byol.build_model(args) starts from, seeded alike."""
    torch.manual_seed(args.seed)
    return byol.build_encoder(args.arch, args.stem, args.pretrained, width=args.width)


def autocast(device, args):
    """bf16 on CUDA, as byol.py trains there; on the CPU fp32, or bf16 with --cpu-bf16 (every trainer alike)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or args.cpu_bf16)


def random_images(n, size, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen).to(device)


def generator(args, index, device):
    """One augmentation generator per step, as byol.train draws them."""
    return torch.Generator(device).manual_seed(args.seed * 1_000_003 + index)


# ----------------------------------------------------------------------------- the training steps


def our_trainer(args, device, total_steps):
    """step(x1, x2, index): byol.train's step on uint8 pairs (its scheduler aside), with args.compile compiled as
    byol.train compiles it (the augmentation's numbers drawn outside); its model, seeded and channels_last, is
    step.model: as byol.train builds it."""
    torch.manual_seed(args.seed)
    model = byol.build_model(args).to(device, memory_format=torch.channels_last)
    optimizer = byol.build_method_optimizer(args, model)  # with args.compile, tensor learning rates

    def train_step(x1, x2, gen, index):
        views = byol.augment_pair(x1, x2, gen, args)  # channels_last
        with autocast(device, args):
            loss = model(*views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        byol.after_step(model, args, index + 1, total_steps)
        return loss.detach()

    compiled = args.compile and torch.compile(train_step, mode="reduce-overhead")  # CUDA graphs on a GPU

    def step(x1, x2, index):
        gen = generator(args, index, device)
        if compiled:  # its numbers, drawn outside the compiled step as byol.train does
            return compiled(x1, x2, byol.drawn(gen, 34, len(x1), device), index)
        return train_step(x1, x2, gen, index)

    step.model = model
    return step


def compiled_trainer(args, device, total_steps, x1, x2):
    """(step, seconds): our_trainer compiled, and the seconds of its first two steps, where it compiles (the second
    recompiles once, as byol.py does: the step number turns dynamic)."""
    step = our_trainer(argparse.Namespace(**{**vars(args), "compile": True}), device, total_steps)
    return step, timed_call(lambda: (step(x1, x2, 0), step(x1, x2, 1)), device)


def their_trainer(args, device):
    """step(x): byol-pytorch's step on a float batch in [0, 1]; its forward makes both views of each image."""
    from byol_pytorch import BYOL

    net = encoder(args)[0].to(device)
    sizes = dict(projection_size=args.proj_dim, projection_hidden_size=args.hidden_dim)
    learner = BYOL(net, args.image_size, hidden_layer=-1, use_simplicial_embeddings=False, **sizes)
    # Our optimiser and parameter groups: build_method_optimizer reads the encoder's parameters and all the others.
    optimizer = byol.build_method_optimizer(args, torch.nn.ModuleDict(dict(encoder=net, learner=learner)))

    def step(x):
        with autocast(device, args):
            loss = learner(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_moving_average()
        return loss

    step.model = learner
    return step


def lightly_trainer(args, device):
    """step(v1, v2): lightly's BYOL as its documentation's example trains it, on views its DataLoader has augmented:
    update_momentum, then each view through the online and the momentum network on its own."""
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone, dim = encoder(args)
    online = torch.nn.Sequential(backbone, BYOLProjectionHead(dim, args.hidden_dim, args.proj_dim))
    predictor = BYOLPredictionHead(args.proj_dim, args.hidden_dim, args.proj_dim)
    momentum = copy.deepcopy(online)
    deactivate_requires_grad(momentum)
    model = torch.nn.ModuleDict(dict(encoder=backbone, online=online, predictor=predictor, momentum=momentum))
    model.to(device)
    criterion, optimizer = NegativeCosineSimilarity(), byol.build_method_optimizer(args, model)

    def step(v1, v2):
        update_momentum(online, momentum, m=args.base_tau)
        with autocast(device, args):
            p1, z1, p2, z2 = predictor(online(v1)), momentum(v1).detach(), predictor(online(v2)), momentum(v2).detach()
            loss = 0.5 * (criterion(p1, z2) + criterion(p2, z1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    step.model = model
    return step


def timed_call(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_round_robin(steps, warmup, repeats, device):
    """{name: seconds} of {name: step(index)}, one call of each per round, the first `warmup` rounds untimed: a change
    in the machine's load then hits every variant alike, and their ratios stay fair."""
    seconds = {name: [] for name in steps}
    for index in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = timed_call(lambda: step(index), device)  # noqa: B023  (called at once)
            seconds[name] += [elapsed] if index >= warmup else []
    return seconds


def timing_row(name, seconds, images, note):
    """A row of a table: milliseconds (median, min, max) and images/s, at `images` per call."""
    ms = [1e3 * s for s in seconds]
    median = statistics.median(ms)
    row = dict(name=name, median_ms=median, min_ms=min(ms), max_ms=max(ms), images_per_call=images, note=note)
    return row | {"images_per_s": 1e3 * images / median}


def run_step_section(cfg, device):
    args, total = recipe(cfg), cfg.warmup + cfg.repeats
    x1, x2 = (random_images(cfg.batch_size, cfg.image_size, device, cfg.seed + k) for k in (0, 1))
    precision = "bf16 autocast" if device.type == "cuda" or args.cpu_bf16 else "fp32"
    ours = our_trainer(args, device, total)
    steps = {OURS: (lambda i: ours(x1, x2, i), f"{precision}; model and views channels_last: byol.py's step")}
    compile_s = None
    if cfg.compile:  # compiled before the timed rounds; its compile seconds go in its row, not in its times
        compiled, compile_s = compiled_trainer(args, device, total, x1, x2)
        note = f"{precision}; {OURS}, the whole step torch.compile'd (byol.py --compile); compiling: {compile_s:.0f} s"
        steps[COMPILED] = (lambda i: compiled(x1, x2, i), note)
    if INSTALLED["byol-pytorch"]:
        theirs, x = their_trainer(args, device), x1.float() / 255
        steps["byol-pytorch"] = (lambda i: theirs(x), f"{precision}, contiguous; one augmentation draw per batch")
    views = byol.augment_pair(x1, x2, generator(args, 0, device), args)  # for the variants that do not augment
    if INSTALLED["lightly"]:
        lightly, v1, v2 = lightly_trainer(args, device), *(v.contiguous() for v in views)
        note = f"{precision}, contiguous; views augmented beforehand (in its DataLoader); each view on its own"
        steps["lightly"] = (lambda i: lightly(v1, v2), note)
    model = our_trainer(args, device, total).model

    def floor(index):
        model.zero_grad(set_to_none=True)
        with autocast(device, args):
            loss = model(*views)
        loss.backward()

    steps[FLOOR] = (floor, "ours without augmentation, optimiser or EMA: the compute of every step, channels_last")
    seconds = time_round_robin({name: step for name, (step, _) in steps.items()}, cfg.warmup, cfg.repeats, device)
    rows = [timing_row(name, seconds[name], 2 * cfg.batch_size, note) for name, (_, note) in steps.items()]
    return [r | ({"compile_s": compile_s} if r["name"] == COMPILED else {}) for r in rows]


# ----------------------------------------------------------------------------- epochs with data loading


class ImageFiles(torch.utils.data.Dataset):
    """What a byol-pytorch or lightly user feeds it: each epoch, each image file is read and transformed."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def tll_names(root, max_pairs):
    """The first max_pairs names of files in both root/left/ and root/right/ (none: no such folders)."""
    dirs = [root / side for side in ("left", "right") if (root / side).is_dir()]
    sides = [{p.name for p in d.iterdir() if p.is_file()} for d in dirs]
    return sorted(set.intersection(*sides))[:max_pairs] if len(sides) == 2 else []


def omniglot_names(max_pairs):
    """The first max_pairs images of byol.py's default training data, in the order of its anchors."""
    with zipfile.ZipFile(OMNIGLOT_ZIP) as zf:
        return sorted(n for n in zf.namelist() if n.endswith(".png"))[:max_pairs]


def epoch_pairs(cfg, error):
    if cfg.data_dir is None:
        return len(omniglot_names(cfg.max_pairs)) if cfg.arch == "conv4" else cfg.max_pairs or 8 * cfg.batch_size
    if len(names := tll_names(cfg.data_dir, cfg.max_pairs)) < 2:
        error(f"--data-dir {cfg.data_dir}: expected TLL pairs, images of the same name in left/ and right/")
    return len(names)


def tll_copy(cfg, root):
    """root/left/ and root/right/ with the epoch's pairs: links to --data-dir's, or synthetic 200 x 245 JPEGs (as TLL's
    images) of smooth random colour fields. Returns the left ones, sorted."""
    rng = np.random.default_rng(cfg.seed)
    synthetic = [f"{i:05d}.jpg" for i in range(epoch_pairs(cfg, None))] if cfg.data_dir is None else []
    names = tll_names(cfg.data_dir, cfg.max_pairs) if cfg.data_dir else synthetic
    for side, name in ((side, name) for side in ("left", "right") for name in names):
        (root / side).mkdir(parents=True, exist_ok=True)
        if cfg.data_dir:
            (root / side / name).symlink_to((cfg.data_dir / side / name).resolve())
        else:
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            coarse.resize((200, 245), Image.BILINEAR).save(root / side / name, quality=90)
    return sorted(str(p) for p in (root / "left").iterdir())


def our_epochs(cfg, device, data_argv, pairs):
    """(start-up seconds, images decoded, run_epoch(epoch)): byol.load_data from an empty cache (prepare.py decodes),
    then byol.train's loop over the first `pairs` anchors: make_pair_batch, then our step."""
    argv = [*data_argv, "--image-size", str(cfg.image_size), "--holdout", "0", "--val-fraction", "0"]
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, POSITIVE_SIMILARITY_CACHE=cache):
        start = time.perf_counter()
        data = byol.load_data(byol.parse_args(argv))
        if device.type == "cuda" and data.images.nbytes < torch.cuda.mem_get_info(device)[0] // 4:
            data.images = data.images.to(device)  # as byol.train: a batch is then a gather on the GPU
        startup_s = time.perf_counter() - start
    steps = pairs // cfg.batch_size
    step = our_trainer(recipe(cfg), device, total_steps=(2 + cfg.epochs) * steps)

    def run_epoch(epoch):
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        for i in range(steps):
            x1, x2, _ = byol.make_pair_batch(data, order, i, cfg.batch_size, 0, 1, cfg.seed, epoch * steps + i, device)
            step(x1, x2, epoch * steps + i)

    return startup_s, len(data.images), run_epoch


def loader_epochs(cfg, device, dataset, train_batch):
    """run_epoch(epoch): train_batch(*batch, on device) over a DataLoader of dataset, as their users run it."""
    kwargs = dict(shuffle=True, drop_last=True, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, **kwargs)

    def run_epoch(epoch):
        for batch in loader:
            train_batch(*(x.to(device, non_blocking=True) for x in (batch if isinstance(batch, list) else [batch])))

    return run_epoch


def busy_share(intervals, wall_us):
    """Share of wall_us covered by the union of the (start, end) intervals, all in microseconds."""
    covered, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered / wall_us


def profiled_busy_share(fn, device):
    """(share of fn()'s wall time in which the device works, that wall time in seconds), from torch.profiler: on CUDA
    the union of the GPU's kernels, copies and memsets (gaps: launch overhead, host syncs, data-loader stalls); on the
    CPU the union of this process's torch ops (gaps: Python and waiting; the DataLoader's wait is an annotation)."""
    cuda = device.type == "cuda"
    activity, kind = (ProfilerActivity.CUDA, DeviceType.CUDA) if cuda else (ProfilerActivity.CPU, DeviceType.CPU)
    with torch.profiler.profile(activities=[activity]) as prof:
        wall_s = timed_call(fn, device)
    events = [e for e in prof.events() if e.device_type == kind and not e.is_user_annotation]
    return busy_share([(e.time_range.start, e.time_range.end) for e in events], 1e6 * wall_s), wall_s


def run_epoch_section(cfg, device):
    """Each pipeline's epochs, taking turns epoch by epoch after one untimed warm-up epoch each; then one more epoch
    of each under the profiler for its busy share."""
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.data_dir is None and cfg.arch == "conv4":  # ours reads the zip; theirs, as their users do, files
            with zipfile.ZipFile(OMNIGLOT_ZIP) as zf:
                files, which, data_argv = [zf.extract(n, tmp) for n in omniglot_names(cfg.max_pairs)], "images", []
            source = f"embedded Omniglot ({OMNIGLOT_ZIP.name}, 105x105 PNG)"
        else:  # prepare.py reads a whole folder: the pairs used, linked or written into one
            files, which = tll_copy(cfg, Path(tmp) / "tll"), "left images"
            data_argv = ["--data", "tll", "--data-dir", str(Path(tmp) / "tll"), "--no-pretrained"]
            source = str(cfg.data_dir) if cfg.data_dir else f"{len(files)} synthetic 200x245 JPEG pairs"
        steps, args = len(files) // cfg.batch_size, recipe(cfg)
        startup_s, decoded, ours = our_epochs(cfg, device, data_argv, len(files))
        note = f"prepare.py decodes {decoded} images once (its threads), load_data reads them; then make_pair_batch"
        pipelines = {"ours": (startup_s, ours, note)}
        read = f"DataLoader ({cfg.workers} workers) reads {steps * cfg.batch_size} {which}"
        if INSTALLED["byol-pytorch"]:  # its two views come from one image: each anchor (TLL: the left images)
            resize = T.Compose([T.Resize(cfg.image_size), T.CenterCrop(cfg.image_size), T.ToTensor()])
            epochs = loader_epochs(cfg, device, ImageFiles(files, resize), their_trainer(args, device))
            pipelines["byol-pytorch"] = (0.0, epochs, f"{read}, resizes and converts them, every epoch")
        if INSTALLED["lightly"]:  # BYOLTransform makes both views of one image in the DataLoader
            from lightly.transforms import byol_transform as lt

            size, scale = cfg.image_size, args.crop_min_scale
            views = lt.BYOLTransform(
                *(v(size, min_scale=scale) for v in (lt.BYOLView1Transform, lt.BYOLView2Transform))
            )
            epochs = loader_epochs(cfg, device, ImageFiles(files, views), lightly_trainer(args, device))
            pipelines["lightly"] = (0.0, epochs, f"{read} and augments both views of each (BYOLTransform), every epoch")
        seconds = time_round_robin({name: p[1] for name, p in pipelines.items()}, 1, cfg.epochs, device)
        rows = []
        for name, (startup_s, epochs, note) in pipelines.items():
            busy, profiled_s = profiled_busy_share(lambda: epochs(1 + cfg.epochs), device)  # noqa: B023
            row = timing_row(name, seconds[name], 2 * cfg.batch_size * steps, note)
            rows.append(row | dict(startup_s=startup_s, epoch_s=seconds[name], busy=busy, profiled_epoch_s=profiled_s))
    return rows, f"{source}, {len(files)} pairs used, {steps} steps of {cfg.batch_size} per epoch"


# ----------------------------------------------------------------------------- augmentation alone


class TorchvisionPairs(torch.utils.data.Dataset):
    """Both BYOL views of in-memory PIL images, per image, as a DataLoader runs them: torchvision's transforms with
    byol.augment_pair's parameters (blur 1.0 / 0.1, solarize 0 / --solarize-prob; not its rotation, shear, stroke)."""

    def __init__(self, images, args):
        self.images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        size, k = images.shape[-1], args.jitter_strength
        blur = T.GaussianBlur(2 * max(1, math.ceil(6 * size / 224)) + 1, (0.1 * size / 224, 2.0 * size / 224))
        self.views = [T.Compose([
            T.RandomResizedCrop(size, scale=(args.crop_min_scale, 1.0)),
            T.RandomHorizontalFlip(args.flip_prob),
            T.RandomApply([T.ColorJitter(0.4 * k, 0.4 * k, 0.2 * k, 0.1 * k)], p=0.8),
            T.RandomGrayscale(args.gray_prob),
            T.RandomApply([blur], p=blur_prob),
            T.RandomSolarize(128, p=solarize_prob),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]) for blur_prob, solarize_prob in ((1.0, 0.0), (0.1, args.solarize_prob))]  # fmt: skip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return tuple(view(self.images[i]) for view in self.views)


def run_augment_section(cfg, device):
    args, batches, images = recipe(cfg), cfg.warmup + cfg.repeats, 2 * cfg.batch_size
    x1, x2 = (random_images(cfg.batch_size, cfg.image_size, device, cfg.seed + k) for k in (0, 1))
    augment = {0: lambda i: byol.augment_pair(x1, x2, generator(args, i, device), args)}
    ours = time_round_robin(augment, cfg.warmup, cfg.repeats, device)[0]
    dataset = TorchvisionPairs(random_images(cfg.batch_size * batches, cfg.image_size, "cpu", cfg.seed + 2), args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers)
    start = time.perf_counter()  # time between batch arrivals, after the warm-up ones (the first starts the workers)
    theirs = np.diff([start, *(time.perf_counter() for _ in loader)])[cfg.warmup :].tolist()
    note = f"PIL transforms in a DataLoader, {cfg.workers} workers"
    return [
        timing_row(f"ours augment_pair ({device.type})", ours, images, "batched tensor ops, per-sample parameters"),
        timing_row("torchvision per-image (CPU)", theirs, images, note),
    ]


# ----------------------------------------------------------------------------- fused kernels (CUDA)


def fused_skip_reason(device):
    reasons = [(device.type != "cuda", "the fused Triton kernels need CUDA"),
               (os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET=1 would time the interpreter"),
               (backend.is_reference_forced(), "the reference path is forced (KERNELS_FORCE_REFERENCE)"),
               (not backend.triton_available(), "Triton is not installed")]  # fmt: skip
    return next((f"{why}; kernels section skipped" for skip, why in reasons if skip), None)


def run_kernels_section(cfg, device):
    """Our step with the PyTorch reference ops, then with the fused kernels, resnet18 and resnet50."""
    x1, x2 = (random_images(cfg.batch_size, cfg.image_size, device, cfg.seed + k) for k in (0, 1))
    rows = []
    for arch, kernels in ((a, k) for a in ("resnet18", "resnet50") for k in ("reference", "fused")):
        backend.force_reference(kernels == "reference")  # read at every call of the loss and the EMA
        step = our_trainer(recipe(cfg, arch), device, cfg.warmup + cfg.repeats)
        seconds = time_round_robin({0: lambda i: step(x1, x2, i)}, cfg.warmup, cfg.repeats, device)[0]  # noqa: B023
        rows.append(timing_row(f"{arch} {kernels}", seconds, 2 * cfg.batch_size, "channels_last, bf16 autocast"))
    backend.force_reference(False)
    for reference, fused in zip(rows[::2], rows[1::2]):
        fused["note"] += f"; {fused['images_per_s'] / reference['images_per_s']:.2f}x the reference's images/s"
    return rows


# ----------------------------------------------------------------------------- report


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def with_ratios(header, rows, cells, baselines):
    """The table of cells (a list per row) with, before the last column, each row's images/s over each baseline's."""
    bases = [b for name in baselines for b in rows if b["name"] == name]
    ratios = [[f"{r['images_per_s'] / b['images_per_s']:.2f}x" for b in bases] for r in rows]
    header = [*header[:-1], *(f"vs {b['name']}" for b in bases), header[-1]]
    return markdown(header, [[*c[:-1], *ratio, c[-1]] for c, ratio in zip(cells, ratios)])


def step_table(rows, *baselines):
    numbers = ("median_ms", "min_ms", "max_ms", "images_per_s")
    cells = [[r["name"], *(f"{r[k]:.1f}" for k in numbers), r["note"]] for r in rows]
    return with_ratios(["variant", "median ms", "min ms", "max ms", "images/s", "note"], rows, cells, baselines)


def epoch_table(rows, device):
    busy = "GPU busy" if device.type == "cuda" else "in torch ops"
    header = ["pipeline", "start-up s", "epoch s (median)", "epochs s", "images/s", f"{busy} (profiled epoch)", "note"]
    cells = [
        [r["name"], f"{r['startup_s']:.2f}", f"{r['median_ms'] / 1e3:.2f}", ", ".join(f"{s:.2f}" for s in r["epoch_s"]),
         f"{r['images_per_s']:.1f}", f"{100 * r['busy']:.0f}% of {r['profiled_epoch_s']:.2f} s", r["note"]]
        for r in rows
    ]  # fmt: skip
    return with_ratios(header, rows, cells, PEERS)


def describe(cfg, device):
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    what = f"conv4 widths {recipe(cfg).width}, byol.py's default recipe" if cfg.arch == "conv4" else f"{cfg.arch}"
    return (
        f"{where}, torch {torch.__version__}, threads: {torch.get_num_threads()}; {what}, {cfg.image_size} px, batch "
        f"{cfg.batch_size}, {2 * cfg.batch_size} images a step; median, min, max of {cfg.repeats} after {cfg.warmup}"
    )


def run(cfg):
    """Runs the chosen sections and prints their tables; returns every measurement."""
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}}
    results["setup"] = describe(cfg, device)
    print(f"# Training benchmark\n\n{results['setup']}\n")
    print("".join(MISSING[peer] + "\n\n" for peer in PEERS if not INSTALLED[peer]), end="")
    if "step" in cfg.only:
        results["step"] = rows = run_step_section(cfg, device)
        table = step_table(rows, *PEERS)
        print(f"## Training step (the variants take turns, a step each per round)\n\n{table}\n")
        print(f"Note: {THEIR_AUGMENTATION}.\n")
    if "epoch" in cfg.only:
        results["epoch"], source = run_epoch_section(cfg, device)
        print(f"## Epoch with data loading\n\n{source}\n\n{epoch_table(results['epoch'], device)}\n")
    if "augment" in cfg.only:
        results["augment"] = rows = run_augment_section(cfg, device)
        print(f"## Augmentation alone\n\n{step_table(rows, rows[0]['name'])}\n")
        for step in (s for s in results.get("step", []) if s["name"] == OURS):  # is augmentation the bottleneck?
            print("".join(f"- {r['name']}: {100 * r['median_ms'] / step['median_ms']:.0f}% of a step\n" for r in rows))
    if "kernels" in cfg.only:
        reason = fused_skip_reason(device)
        results["kernels"] = rows = [] if reason else run_kernels_section(cfg, device)
        table = reason or step_table(rows)
        print(f"## Fused kernels in our step\n\n{table}\n")
    if cfg.json:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {cfg.json}")
    return results


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
