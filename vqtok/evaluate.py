"""The report card of a tokenizer: how well it reconstructs images it is shown, and how it uses its codebook.

One pass of `evaluate` serves both `vqtok fit`'s evaluation on `--val` and `vqtok eval`, so the two always
report the same numbers for the same model and images:

- PSNR, as the mean of each image's PSNR and over all pixels at once (10 log10(1 / MSE) for images in [0, 1]);
- SSIM (Wang et al. 2004: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03), per image;
- codebook usage (the share of the K codes that appear at least once), perplexity (2 ** bits per code) and
  bits per code (the order-0 entropy of the codes);
- encode and decode images per second (the model alone, not reading or decoding files);
- the worst reconstructed images, and typical ones (those nearest the median PSNR), as a picture.

Reconstructions are compared in float32, before any rounding to 8 bits. Under `torch.distributed` each
process evaluates its own part of the data and the sums are added up across processes.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vqtok.data import expand_inputs, make_loader
from vqtok.errors import DataError
from vqtok.tokenizers import load_tokenizer, pick_device

SSIM_SIGMA, SSIM_WINDOW = 1.5, 11  # Wang et al.'s window: 11 taps, as scikit-image's gaussian_weights=True
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # (K1 * L)^2, (K2 * L)^2 for a data range L of 1
MAX_PSNR = 100.0  # a perfect reconstruction's PSNR, instead of infinity
EXAMPLES = 8  # images in each row of the picture: the worst, and typical ones
PICTURE_NAME = "reconstructions.png"
RESERVOIR = 64  # images kept at random, from which the typical ones are picked once the median is known


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of images (B, C, H, W) in [0, 1]: the mean over channels and over the positions where
    the whole window fits (scikit-image's `structural_similarity` with `gaussian_weights=True`,
    `use_sample_covariance=False`, `data_range=1`). Images smaller than 11 pixels get the largest odd window
    that fits."""
    B, C, H, W = x.shape
    size = min(SSIM_WINDOW, H - (H % 2 == 0), W - (W % 2 == 0))
    taps = torch.arange(size, dtype=torch.float32, device=x.device) - size // 2
    kernel = torch.exp(-(taps**2) / (2 * SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()  # (size,)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, each channel on its own, valid positions only
        t = F.conv2d(t, kernel.view(1, 1, 1, -1).expand(t.shape[1], 1, 1, size), groups=t.shape[1])
        return F.conv2d(t, kernel.view(1, 1, -1, 1).expand(t.shape[1], 1, size, 1), groups=t.shape[1])

    x, y = x.float(), y.float()
    stats = blur(torch.cat([x, y, x * x, y * y, x * y], dim=1))  # (B, 5C, h, w)
    mu_x, mu_y, xx, yy, xy = stats.split(C, dim=1)  # each (B, C, h, w)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (numerator / denominator).mean(dim=(1, 2, 3))  # (B,)


def psnr(mse: float | torch.Tensor):
    """10 log10(1 / MSE) for images in [0, 1], MAX_PSNR for a perfect reconstruction."""
    if isinstance(mse, torch.Tensor):
        return (10 * torch.log10(1 / mse.clamp(min=10 ** (-MAX_PSNR / 10)))).clamp(max=MAX_PSNR)
    return MAX_PSNR if mse <= 10 ** (-MAX_PSNR / 10) else 10 * math.log10(1 / mse)


@dataclass
class Example:
    psnr: float
    key: str
    original: np.ndarray  # uint8 (H, W, 3)
    reconstruction: np.ndarray  # uint8 (H, W, 3)


@dataclass
class Report:
    """What `evaluate` measured; `metrics()` is the flat dict fit logs and eval prints."""

    images: int = 0
    errors: int = 0  # samples that could not be decoded into an image
    psnr_image_mean: float = 0.0
    psnr: float = 0.0  # over all pixels
    ssim: float = 0.0
    mse: float = 0.0
    codebook_size: int = 0
    codes_used: int = 0
    usage: float = 0.0
    perplexity: float = 0.0
    bits_per_code: float = 0.0
    encode_images_per_second: float = 0.0
    decode_images_per_second: float = 0.0
    worst: list[Example] = field(default_factory=list)
    typical: list[Example] = field(default_factory=list)

    def metrics(self) -> dict:
        names = ["images", "errors", "psnr_image_mean", "psnr", "ssim", "mse", "codebook_size", "codes_used"]
        names += ["usage", "perplexity", "bits_per_code", "encode_images_per_second", "decode_images_per_second"]
        metrics = {name: getattr(self, name) for name in names}
        metrics["worst"] = [{"key": e.key, "psnr": e.psnr} for e in self.worst]
        return metrics

    def picture(self) -> np.ndarray | None:
        """uint8 (4H, n*W, 3): the worst originals over their reconstructions, then typical ones likewise."""
        rows = []
        for examples in (self.worst, self.typical):
            if examples:
                rows.append(np.concatenate([e.original for e in examples], axis=1))
                rows.append(np.concatenate([e.reconstruction for e in examples], axis=1))
        if not rows:
            return None
        width = max(row.shape[1] for row in rows)  # fewer typical images than worst ones: pad with black
        rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
        return np.concatenate(rows, axis=0)

    def save_picture(self, path: Path) -> bool:
        from PIL import Image

        picture = self.picture()
        if picture is None:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path)
        return True


class _Examples:
    """The worst `EXAMPLES` images seen so far, and a uniform random sample (a reservoir) of `RESERVOIR`."""

    def __init__(self, seed: int) -> None:
        self.worst: list[tuple[float, int, Example]] = []  # a heap of (-psnr, order, example): the best on top
        self.reservoir: list[Example] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def offer(self, psnrs: list[float], keys: list[str], images: torch.Tensor, recon: torch.Tensor) -> None:
        """Images (B, 3, H, W) and their reconstructions, in [0, 1]; only those kept are copied to the host."""
        first = self.seen
        slots: dict[int, int] = {}  # batch index -> reservoir slot it takes
        filled = len(self.reservoir)
        for i in range(len(psnrs)):
            self.seen += 1
            if filled < RESERVOIR:
                slots[i], filled = filled, filled + 1
            elif (j := self.rng.randrange(self.seen)) < RESERVOIR:
                slots[i] = j
        bar = -self.worst[0][0] if len(self.worst) == EXAMPLES else math.inf
        worse = [i for i in sorted(range(len(psnrs)), key=psnrs.__getitem__)[:EXAMPLES] if psnrs[i] < bar]
        kept = sorted({*slots, *worse})
        if not kept:
            return
        originals, reconstructions = _to_pixels(images[kept]), _to_pixels(recon[kept])
        example = {i: Example(psnrs[i], keys[i], originals[n], reconstructions[n]) for n, i in enumerate(kept)}
        for i, slot in slots.items():
            if slot == len(self.reservoir):
                self.reservoir.append(example[i])
            else:
                self.reservoir[slot] = example[i]
        for i in worse:
            entry = (-psnrs[i], first + i, example[i])
            if len(self.worst) < EXAMPLES:
                heapq.heappush(self.worst, entry)
            elif -psnrs[i] > self.worst[0][0]:  # a lower PSNR than the best of the worst so far
                heapq.heapreplace(self.worst, entry)

    def candidates(self) -> tuple[list[Example], list[Example]]:
        return [e for _, _, e in self.worst], list(self.reservoir)


def _to_pixels(images: torch.Tensor) -> np.ndarray:
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def evaluate(model, loader, *, limit: int | None = None, examples: bool = True, seed: int = 0) -> Report:
    """Run the model over the Batches of `loader` (`vqtok.data.make_loader`, evaluation mode) and report.

    `limit` caps the images this process evaluates. Under torch.distributed every process must call this,
    each with its own part of the data; all of them get the combined report.
    """
    was_training = model.training
    model.eval()
    device = model.device
    K = model.codebook_size
    # float64 sums: squared error, values, images, sum of per-image PSNR, sum of SSIM, errors, then K counts
    totals = torch.zeros(6 + K, dtype=torch.float64, device=device)
    psnrs: list[float] = []
    picked = _Examples(seed)
    encode_seconds = decode_seconds = 0.0
    for batch in loader:
        totals[5] += len(batch.errors)
        images = batch.images
        keys = batch.keys
        if limit is not None:
            room = max(0, limit - len(psnrs))
            images, keys = images[:room], keys[:room]
        if len(images):
            images = images.to(device, non_blocking=True).float().div_(255)  # (B, 3, H, W) in [0, 1]
            images = images.contiguous(memory_format=torch.channels_last)
            started = _now(device)
            codes = model.encode(images)  # (B, h, w)
            encoded = _now(device)
            recon = model.decode(codes)  # (B, 3, H, W) in [0, 1]
            decoded = _now(device)
            encode_seconds += encoded - started
            decode_seconds += decoded - encoded
            squared = (recon.float() - images).pow(2).flatten(1).sum(dim=1, dtype=torch.float64)  # (B,)
            per_image = psnr(squared / images[0].numel())  # (B,)
            totals[0] += squared.sum()
            totals[1] += images.numel()
            totals[2] += len(images)
            totals[3] += per_image.sum()
            totals[4] += ssim(images, recon).sum(dtype=torch.float64)
            totals[6:] += torch.bincount(codes.flatten(), minlength=K)
            values = per_image.tolist()
            psnrs += values
            if examples:
                picked.offer(values, keys, images, recon)
        if limit is not None and len(psnrs) >= limit:
            break
    model.train(was_training)

    worst, sample = picked.candidates()
    speeds = torch.tensor([encode_seconds, decode_seconds], dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(totals)
        dist.all_reduce(speeds, op=dist.ReduceOp.MAX)  # processes run side by side: the slowest sets the pace
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (psnrs, worst, sample) if examples else (psnrs, [], []))
        psnrs = [p for part in gathered for p in part[0]]
        worst = [e for part in gathered for e in part[1]]
        sample = [e for part in gathered for e in part[2]]
    squared_error, values, count, psnr_sum, ssim_sum, errors = totals[:6].tolist()
    counts = totals[6:].cpu().numpy()
    report = Report(images=int(count), errors=int(errors), codebook_size=K)
    if count == 0:
        return report
    report.mse = squared_error / values
    report.psnr = psnr(report.mse)
    report.psnr_image_mean = psnr_sum / count
    report.ssim = ssim_sum / count
    report.codes_used = int((counts > 0).sum())
    report.usage = report.codes_used / K
    p = counts[counts > 0] / counts.sum()
    report.bits_per_code = float(-(p * np.log2(p)).sum())
    report.perplexity = 2**report.bits_per_code
    encode_seconds, decode_seconds = speeds.tolist()
    report.encode_images_per_second = count / encode_seconds if encode_seconds else 0.0
    report.decode_images_per_second = count / decode_seconds if decode_seconds else 0.0
    report.worst = sorted(worst, key=lambda e: e.psnr)[:EXAMPLES]
    median = float(np.median(psnrs))
    report.typical = sorted(sample, key=lambda e: abs(e.psnr - median))[:EXAMPLES]
    return report


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_images(report: Report, where: str) -> Report:
    """DataError when nothing could be evaluated, naming where the images were looked for."""
    if report.images == 0:
        detail = f" ({report.errors} sample(s) could not be decoded)" if report.errors else ""
        raise DataError(f"{where}: no image to evaluate{detail}")
    return report


def evaluate_shards(
    model_dir,
    shards,
    *,
    image_size: int | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    out=None,
    num_workers: int = 2,
    device: str = "auto",
    image_column: str | None = None,
    storage_options: dict | None = None,
) -> Report:
    """`vqtok eval`: the report card of the model in model_dir on the images of `shards` (shards, image
    folders or Parquet files, paths or URLs; see `vqtok.sources`), centre-cropped to image_size (the model's
    training size by default). With `out`, writes report.json and reconstructions.png (the worst images over
    their reconstructions, then typical ones) there.

    Under `accelerate launch` or torchrun, unit i goes to process i mod world size, and `limit` is shared
    out among them.
    """
    urls = expand_inputs(shards, image_column=image_column, storage_options=storage_options).units
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # sums are added up across processes: join the process group the launcher set up
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        rank, world_size = state.process_index, state.num_processes
    else:
        rank = 0
    model = load_tokenizer(model_dir, device=pick_device(device), storage_options=storage_options)
    model.to(memory_format=torch.channels_last)
    image_size = image_size or model.config.image_size
    model.grid_size(image_size)  # a size the model cannot encode is refused before any image is read
    loader = make_loader(
        urls, image_size, batch_size, num_workers=min(num_workers, len(urls)), rank=rank, world_size=world_size
    )
    share = None if limit is None else -(-limit // world_size)
    report = check_images(evaluate(model, loader, limit=share), " ".join(shards))
    if out is not None and rank == 0:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        report.save_picture(out / PICTURE_NAME)
        (out / "report.json").write_text(json.dumps({"model": str(model_dir), **report.metrics()}, indent=2) + "\n")
    return report
