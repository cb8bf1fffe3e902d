"""Held-out bits per code at equal time: `vqtok prior fit`'s recipe against a gated PixelCNN.

The tokens: the seventeen photographs of `vqtok demo` (scikit-image's), scaled to a shorter side of 256 px;
64x64 crops of the left three quarters of each for training, of the right quarter for the held-out part, so
that no held-out pixel is ever seen in training. A tokenizer is fitted on the training crops by `vqtok fit`
(16x16 grids, K = 512) and both parts are encoded by `vqtok encode`, the photograph as `cls`. All of it is kept
in OUT, so that later runs start at once.

Both priors train on the same tokens in memory, class-conditional, for the same time: vqtok's `Prior` with the
recipe `vqtok prior fit` uses by default (optimizer, schedule, batch, sizes), and the reference, a gated
PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders": vertical and
horizontal stacks, gated activations, a class-conditional bias), written here. Each budget is a run of its
own, its learning rate's cosine stretched over the budget's time; evaluation is not counted. Printed: held-out
bits per code for both and for the unigram (order-0) model of the training codes, and the sampling speed of
vqtok's prior (64 grids of 16x16) with and without its key/value cache; OUT/samples.png shows its samples.
Every run is appended to OUT/results.jsonl.

    pip install -e '.[bench]'
    python benchmarks/prior.py                        # 2 and 10 minutes of wall time each
    python benchmarks/prior.py --budget cpu --minutes 2 --prior-args "width=192 lr=2e-3"

`--budget cpu` measures CPU time divided by the threads torch uses (time.process_time() / threads), so that
"10 minutes" is 10 minutes of all cores' work however busy the machine is with other programs; `--budget wall`
(the default) is the clock on the wall, the figure to quote from a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vqtok.demo import HELD_OUT_PHOTOS, TRAIN_PHOTOS

PHOTOS = TRAIN_PHOTOS + HELD_OUT_PHOTOS  # the class of a crop is its photograph's index here
SHORTER_SIDE, CROP, TRAIN_CROPS, HELD_OUT_CROPS = 256, 64, 1000, 100  # crops per photograph
TOKENIZER_ARGS = ["--image-size", "64", "--codebook-size", "512", "--code-dim", "64", "--hidden", "64"]
TOKENIZER_ARGS += ["--steps", "1000", "--batch-size", "32", "--lr", "1e-3", "--eval-every", "1000"]
TOKENIZER_ARGS += ["--num-workers", "1"]


# ------------------------------------------------------------------------------------------ the tokens


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 with a shorter side of SHORTER_SIDE px."""
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    scale = SHORTER_SIDE / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC))


def crops(pixels: np.ndarray, count: int, columns: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
    """`count` CROPxCROP crops lying within the columns [start, stop) of a photograph."""
    start, stop = columns
    out = []
    for _ in range(count):
        y = rng.integers(0, pixels.shape[0] - CROP + 1)
        x = rng.integers(start, stop - CROP + 1)
        out.append(pixels[y : y + CROP, x : x + CROP])
    return out


def write_shard(path: Path, samples: list[tuple[str, np.ndarray, int]]) -> str:
    import webdataset

    with webdataset.TarWriter(str(path)) as sink:
        for key, pixels, label in samples:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            sink.write({"__key__": key, "png": buffer.getvalue(), "cls": str(label).encode()})
    return str(path)


def vqtok(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vqtok", *args], check=True)


def prepare(out: Path) -> dict:
    """The tokenizer and the two token datasets, made once and kept in OUT."""
    tokenizer = out / "tokenizer"
    # made from OUT on every call, so the cache serves whichever folder the benchmark is run from
    paths = {"tokenizer": str(tokenizer / "model"), "train": str(out / "train.parquet")}
    paths["held_out"] = str(out / "held-out.parquet")
    done = out / "tokens.done"
    if done.exists():
        return paths
    rng = np.random.default_rng(0)
    train, held_out = [], []
    for label, name in enumerate(PHOTOS):
        pixels = load_photo(name)
        split = pixels.shape[1] * 3 // 4  # the right quarter is held out
        train += [(f"{name}/{i:04d}", c, label) for i, c in enumerate(crops(pixels, TRAIN_CROPS, (0, split), rng))]
        held = crops(pixels, HELD_OUT_CROPS, (split, pixels.shape[1]), rng)
        held_out += [(f"{name}/held-{i:04d}", c, label) for i, c in enumerate(held)]
    order = rng.permutation(len(train))
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    train_shards = [
        write_shard(shards / f"train-{i:06d}.tar", [train[j] for j in part])
        for i, part in enumerate(np.array_split(order, 4))
    ]
    held_out_shard = write_shard(shards / "held-out.tar", held_out)
    if not (tokenizer / "model").is_dir():
        vqtok("fit", *train_shards, "--out", str(tokenizer), "--val", held_out_shard, *TOKENIZER_ARGS)
    model = paths["tokenizer"]
    vqtok("encode", *train_shards, paths["train"], "--model", model, "--keep", "cls", "--overwrite")
    vqtok("encode", held_out_shard, paths["held_out"], "--model", model, "--keep", "cls", "--overwrite")
    done.touch()
    return paths


class Tokens:
    """The training and held-out grids and classes, as tensors in memory."""

    def __init__(self, paths: dict) -> None:
        import pandas as pd

        from vqtok.tokens import read_codes

        self.train, self.train_cls = self._read(paths["train"], pd, read_codes)
        self.held_out, self.held_out_cls = self._read(paths["held_out"], pd, read_codes)
        self.codebook_size = 512
        self.classes = len(PHOTOS)

    @staticmethod
    def _read(path, pd, read_codes):
        keys, codes = read_codes(path)
        labels = pd.read_parquet(path, columns=["key", "cls"]).set_index("key").loc[keys, "cls"].to_numpy()
        return torch.from_numpy(codes), torch.from_numpy(labels.astype(np.int64))  # (N, 16, 16), (N,)

    def unigram_bits(self, per_class: bool = False) -> float:
        """Held-out bits per code of the order-0 model of the training codes (add-one smoothing), or of one
        such model per class."""
        K = self.codebook_size
        if not per_class:
            p = (torch.bincount(self.train.flatten(), minlength=K).double() + 1) / (self.train.numel() + K)
            return float(-p.log2()[self.held_out.flatten()].mean())
        total = 0.0
        for c in range(self.classes):
            train, held = self.train[self.train_cls == c], self.held_out[self.held_out_cls == c]
            p = (torch.bincount(train.flatten(), minlength=K).double() + 1) / (train.numel() + K)
            total += float(-p.log2()[held.flatten()].sum())
        return total / self.held_out.numel()


# ------------------------------------------------------------------------------------------ the reference


class GatedLayer(nn.Module):
    """One layer of the gated PixelCNN: a vertical stack that sees the rows above, a horizontal stack that
    sees the pixels to the left in the row (and the vertical stack's view, shifted down a row so that it sees
    only rows above), each through tanh(W_f x + V_f h) * sigmoid(W_g x + V_g h), h the class."""

    def __init__(self, channels: int, kernel: int, classes: int, first: bool) -> None:
        super().__init__()
        self.first, half = first, kernel // 2
        self.vertical = nn.Conv2d(channels, 2 * channels, (half + 1, kernel), padding=(half, half))
        # the first layer must not see the pixel it predicts: its horizontal kernel stops one short
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, half if first else half + 1), padding=(0, half))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        self.class_bias = nn.Embedding(classes, 4 * channels)  # the class-conditional biases of both stacks

    @staticmethod
    def gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v, h, cls):
        H, W = v.shape[2:]
        bias_v, bias_h = self.class_bias(cls)[:, :, None, None].chunk(2, dim=1)  # (B, 2C, 1, 1) each
        v_pre = self.vertical(v)[:, :, :H, :W]  # (B, 2C, H, W): row i sees rows i - k//2 .. i
        shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :H]  # row i sees rows above it only
        h_pre = self.horizontal(h)[:, :, :, :W] + self.v_to_h(shifted)  # column j sees j - k//2 .. j (j - 1)
        v = self.gate(v_pre + bias_v)  # (B, C, H, W)
        gated = self.gate(h_pre + bias_h)  # (B, C, H, W)
        h = self.h_out(gated) + (0 if self.first else h)  # no residual around the first: it holds the pixel
        return v, h, self.skip(gated)


class GatedPixelCNN(nn.Module):
    """van den Oord et al. 2016, class-conditional, over (H, W) grids of K codes."""

    def __init__(self, codebook_size: int, classes: int, channels: int = 128, layers: int = 10, kernel: int = 5):
        super().__init__()
        self.embed = nn.Embedding(codebook_size, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel, classes, i == 0) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU())
        self.out = nn.Conv2d(channels, codebook_size, 1)

    def forward(self, codes: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, C, H, W)
        v, h, skips = x, x, 0
        for layer in self.layers:
            v, h, skip = layer(v, h, cls)
            skips = skips + skip
        return self.out(self.head(skips))  # (B, K, H, W) logits

    def log_prob(self, codes: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(self(codes, cls), codes, reduction="none").sum(dim=(1, 2))  # (B,)


# ------------------------------------------------------------------------------------------ training at equal time


# The reference's network and recipe (Adam, no weight decay or clipping), the best of those tried
# (docs/performance.md); --pixelcnn-args overrides them.
PIXELCNN = {"channels": 64, "layers": 8, "kernel": 5, "lr": 3e-3, "batch_size": 32, "warmup_steps": 100}
PIXELCNN |= {"min_lr_ratio": 0.1, "weight_decay": 0.0, "grad_clip": 0.0}


def settings_from(text: str) -> dict:
    """'width=192 lr=2e-3' -> {"width": 192, "lr": 0.002}."""
    out = {}
    for item in text.split():
        name, value = item.split("=")
        out[name] = json.loads(value)
    return out


def label_of(who: str, text: str) -> str:
    """The settings that differ from the side's defaults, as 'name=value ...', or 'defaults'."""
    from vqtok.config import PriorConfig, PriorTrainConfig

    defaults = PIXELCNN if who == "pixelcnn" else {**PriorConfig().to_dict(), **PriorTrainConfig().to_dict()}
    changed = {k: v for k, v in settings_from(text).items() if defaults.get(k) != v}
    return " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(changed.items())) or "defaults"


class Clock:
    """Seconds of wall time, or of CPU time per thread torch uses (process_time counts every thread's)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.threads = torch.get_num_threads()
        self.start = self.now()

    def now(self) -> float:
        return time.perf_counter() if self.kind == "wall" else time.process_time() / self.threads

    def elapsed(self) -> float:
        return self.now() - self.start


def train_for(model, optimizer, train_config, loss_of, tokens: Tokens, budget: float, clock_kind: str, seed: int):
    """Train until the budget is spent. The learning rate follows vqtok.runs.lr_lambda's shape with time for
    steps: a linear warm-up over warmup_steps (at most a tenth of the steps the budget is on course to
    allow), then a cosine over the budget's time down to min_lr_ratio of the peak."""
    gen = torch.Generator().manual_seed(seed)
    n, batch = len(tokens.train), train_config.batch_size
    order, position, steps = torch.randperm(n, generator=gen), 0, 0
    clock = Clock(clock_kind)
    model.train()
    while (elapsed := clock.elapsed()) < budget:
        warmup = train_config.warmup_steps
        if warmup is None:  # the default: its limit, cut to a tenth of the run below
            warmup = train_config.default_warmup_limit
        if steps:  # at most a tenth of the steps the budget is on course to allow
            warmup = max(1, min(warmup, int(steps * budget / elapsed) // 10))
        if steps < warmup:
            factor = (steps + 1) / warmup
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
            factor = train_config.min_lr_ratio + (1 - train_config.min_lr_ratio) * cosine
        for group in optimizer.param_groups:
            group["lr"] = train_config.lr * factor
        if position + batch > n:
            order, position = torch.randperm(n, generator=gen), 0
        index = order[position : position + batch]
        position += batch
        loss = loss_of(tokens.train[index], tokens.train_cls[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if getattr(train_config, "grad_clip", 0):
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        steps += 1
    return steps, clock.elapsed()


@torch.no_grad()
def held_out_bits(model, tokens: Tokens) -> float:
    model.eval()
    nats = sum(
        -float(model.log_prob(tokens.held_out[i : i + 256], tokens.held_out_cls[i : i + 256]).sum())
        for i in range(0, len(tokens.held_out), 256)
    )
    return nats / tokens.held_out.numel() / math.log(2)


def run_vqtok(tokens: Tokens, budget: float, clock: str, overrides: dict, seed: int) -> dict:
    from vqtok.config import PriorConfig, PriorTrainConfig
    from vqtok.prior import Prior
    from vqtok.prior.fit import configure_optimizer

    model_fields = {f.name for f in dataclasses.fields(PriorConfig)}
    config = PriorConfig(
        codebook_size=tokens.codebook_size,
        grid=(16, 16),
        num_classes=tokens.classes,
        **{k: v for k, v in overrides.items() if k in model_fields},
    )
    train = PriorTrainConfig(**{k: v for k, v in overrides.items() if k not in model_fields})
    torch.manual_seed(seed)
    model = Prior(config)
    optimizer = configure_optimizer(model, train)
    steps, seconds = train_for(model, optimizer, train, lambda c, y: model(c, y)[1], tokens, budget, clock, seed)
    parameters = sum(p.numel() for p in model.parameters())
    return {"model": model, "steps": steps, "seconds": seconds, "parameters": parameters, "batch": train.batch_size}


def run_pixelcnn(tokens: Tokens, budget: float, clock: str, overrides: dict, seed: int) -> dict:
    from vqtok.config import PriorTrainConfig

    settings = {**PIXELCNN, **overrides}
    network = {k: settings.pop(k) for k in ("channels", "layers", "kernel")}
    train = PriorTrainConfig(**settings)
    torch.manual_seed(seed)
    model = GatedPixelCNN(tokens.codebook_size, tokens.classes, **network)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)

    def loss_of(codes, cls):
        return F.cross_entropy(model(codes, cls), codes)

    steps, seconds = train_for(model, optimizer, train, loss_of, tokens, budget, clock, seed)
    parameters = sum(p.numel() for p in model.parameters())
    return {"model": model, "steps": steps, "seconds": seconds, "parameters": parameters, "batch": train.batch_size}


def sampling_speed(prior, cls: torch.Tensor) -> dict:
    """Codes per second sampling a grid per class in cls, with the key/value cache and recomputing every prefix."""
    speeds = {}
    for cache in (True, False):
        started = time.perf_counter()
        prior.sample(len(cls), cls=cls, generator=torch.Generator().manual_seed(0), cache=cache).cpu()  # GPU: waits
        speeds["cached" if cache else "recomputed"] = len(cls) * prior.config.length / (time.perf_counter() - started)
    return speeds


def save_samples(prior, tokens: Tokens, tokenizer: str, path: Path) -> None:
    """A row per class (eight spread over the seventeen): two held-out crops as the tokenizer decodes them, a
    gap, then eight grids sampled for that class, decoded."""
    from vqtok.model import VQVAE
    from vqtok.prior.fit import sample_classes

    decoder = VQVAE.from_pretrained(tokenizer)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for label in sample_classes(tokens.classes):
        held_out = tokens.held_out[tokens.held_out_cls == label][:2]
        grids = torch.cat([held_out, prior.sample(8, cls=label, generator=generator)])  # (10, 16, 16)
        pixels = decoder.decode(grids).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (10, 64, 64, 3)
        gap = np.full((CROP, CROP // 4, 3), 255, np.uint8)
        rows.append(np.concatenate([pixels[0], pixels[1], gap, *pixels[2:]], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/prior_bench"))
    parser.add_argument("--minutes", default="2,10", help="Budgets, comma-separated.")
    parser.add_argument("--budget", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--only", choices=["vqtok", "pixelcnn"])
    parser.add_argument("--prior-args", default="", help="PriorConfig and PriorTrainConfig fields, e.g. 'width=192'.")
    parser.add_argument("--pixelcnn-args", default="", help="channels, layers, kernel, lr, batch_size, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice).")
    parser.add_argument("--no-sampling", action="store_true", help="Skip the sampling speeds.")
    parser.add_argument("--table-only", action="store_true", help="Print the table of the runs made before.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = prepare(args.out)
    tokens = Tokens(paths)
    print(
        f"{len(tokens.train):,} training and {len(tokens.held_out):,} held-out 16x16 grids of K = 512 codes, "
        f"{tokens.classes} classes; budget by {args.budget} time, {torch.get_num_threads()} thread(s)"
    )
    print(f"unigram: {tokens.unigram_bits():.4f} bits per code; one unigram per class {tokens.unigram_bits(True):.4f}")
    results = args.out / "results.jsonl"
    for minutes in [] if args.table_only else [float(m) for m in args.minutes.split(",")]:
        for who in ("vqtok", "pixelcnn"):
            if args.only and who != args.only:
                continue
            label = args.prior_args if who == "vqtok" else args.pixelcnn_args
            overrides = settings_from(label)
            run = (run_vqtok if who == "vqtok" else run_pixelcnn)(
                tokens, minutes * 60, args.budget, overrides, args.seed
            )
            bits = held_out_bits(run["model"], tokens)
            entry = {"who": who, "label": label or "defaults", "minutes": minutes, "budget": args.budget}
            entry["settings"] = label_of(who, label)
            entry.update(threads=torch.get_num_threads(), seed=args.seed, bits_per_code=bits)
            entry.update({k: v for k, v in run.items() if k != "model"})
            if who == "vqtok" and not args.no_sampling and minutes == max(float(m) for m in args.minutes.split(",")):
                entry["sampling_codes_per_second"] = sampling_speed(run["model"], torch.arange(64) % tokens.classes)
                save_samples(run["model"], tokens, paths["tokenizer"], args.out / "samples.png")
                entry["samples"] = str(args.out / "samples.png")
            with results.open("a") as file:
                file.write(json.dumps(entry) + "\n")
            print(
                f"{minutes:g} min {who} ({entry['label']}): {bits:.4f} bits per code, {run['steps']} steps of "
                f"{run['batch']}, {run['parameters'] / 1e6:.2f}M parameters"
                + (f", sampling {entry['sampling_codes_per_second']}" if "sampling_codes_per_second" in entry else ""),
                flush=True,
            )
    print_table(results, args, tokens)


def print_table(results: Path, args, tokens: Tokens) -> None:
    """Held-out bits per code at each budget, from every run in results.jsonl with this invocation's labels,
    budget kind and threads (the latest of each), so that budgets run apart come together."""
    labels = {"vqtok": label_of("vqtok", args.prior_args), "pixelcnn": label_of("pixelcnn", args.pixelcnn_args)}
    latest = {}
    for line in results.read_text().splitlines() if results.exists() else []:
        r = json.loads(line)
        same = label_of(r["who"], "" if r["label"] == "defaults" else r["label"]) == labels[r["who"]]
        if same and r["budget"] == args.budget and r["threads"] == torch.get_num_threads():
            latest[(r["who"], r["minutes"])] = r
    unit = "min of wall time" if args.budget == "wall" else "CPU-min per thread"
    print(f"\nheld-out bits per code; vqtok prior: {labels['vqtok']}; gated PixelCNN: {labels['pixelcnn']}")
    print(f"{'budget (' + unit + ')':>28} | {'vqtok prior':>12} | {'gated PixelCNN':>14} | {'unigram':>8}")
    for minutes in sorted({m for _, m in latest}):
        cells = [f"{latest[(w, minutes)]['bits_per_code']:.4f}" if (w, minutes) in latest else "-" for w in labels]
        print(f"{minutes:>28g} | {cells[0]:>12} | {cells[1]:>14} | {tokens.unigram_bits():>8.4f}")
    for (who, minutes), r in sorted(latest.items()):
        print(f"{who} at {minutes:g}: {r['steps']} steps of {r['batch']}, {r['parameters'] / 1e6:.2f}M parameters")
        if "sampling_codes_per_second" in r:
            speeds = r["sampling_codes_per_second"]
            print(
                f"  sampling 64 16x16 grids: {speeds['cached']:,.0f} codes/s with the key/value cache, "
                f"{speeds['recomputed']:,.0f} recomputing every prefix ({speeds['cached'] / speeds['recomputed']:.1f}x)"
            )
            print(f"  decoded samples (two held-out crops, then eight samples, a row per class): {r['samples']}")


if __name__ == "__main__":
    main()
