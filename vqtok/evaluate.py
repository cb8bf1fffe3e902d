"""The report card of a tokenizer: how well it reconstructs images it is shown, and how it uses its codebook.

One pass of `evaluate` serves both `vqtok fit`'s evaluation on `--val` and `vqtok eval`, so the two always
report the same numbers for the same model and images:

- PSNR, as the mean of each image's PSNR and over all pixels at once (10 log10(1 / MSE) for images in [0, 1]);
- SSIM (Wang et al. 2004: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03), per image;
- codebook usage (the share of the K codes that appear at least once), perplexity (2 ** bits per code) and
  bits per code (the order-0 entropy of the codes);
- encode and decode images per second (the model alone, not reading or decoding files);
- LPIPS (VGG16, the mean over images) and rFID (the Fréchet distance between the Inception features of the
  originals and of their reconstructions), when their pretrained weights files are found
  (`vqtok.tokenizers.perceptual`, `feature_networks`); otherwise the report notes why they were not computed;
- the worst reconstructed images, and typical ones (those nearest the median PSNR), as a picture.

Reconstructions are compared in float32, before any rounding to 8 bits. Under `torch.distributed` each
process evaluates its own part of the data and the sums are added up across processes (for rFID: the count,
sum and sum of outer products of the features).

Several models are compared on the same images (`evaluate_models`, `vqtok eval --compare`): each batch is read
and decoded once and given to every model in turn, and the images shown are chosen by their mean PSNR over
the models, so that the picture sets each model's reconstructions of the same images side by side.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vqtok.data import expand_inputs, make_loader
from vqtok.distributed import in_process_group, launched
from vqtok.errors import MAX_ERROR_RATE, ConfigError, DataError, ErrorTally, ModelFormatError, plural
from vqtok.pictures import BAND, GAP, draw_texts, enlarge, tile_scale
from vqtok.tokenizers import load_tokenizer, pick_device
from vqtok.tokenizers.perceptual import (
    INCEPTION_FEATURES,
    INCEPTION_WEIGHTS,
    LPIPS,
    LPIPS_WEIGHTS,
    VGG16_WEIGHTS,
    FeatureStats,
    InceptionV3,
    frechet_distance,
    load_inception,
    load_lpips,
)
from vqtok.usage import CodeUsage

SSIM_SIGMA, SSIM_WINDOW = 1.5, 11  # Wang et al.'s window: 11 taps, as scikit-image's gaussian_weights=True
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # (K1 * L)^2, (K2 * L)^2 for a data range L of 1
MAX_PSNR = 100.0  # a perfect reconstruction's PSNR, instead of infinity
EXAMPLES = 8  # images in each row of the picture: the worst, and typical ones
PICTURE_NAME = "reconstructions.png"
RESERVOIR = 64  # images kept at random, from which the typical ones are picked once the median is known
FEATURE_BATCH = 32  # images per pass of VGG16 or Inception (at 299 px), which bounds their activations' memory


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
    """What `evaluate` measured; `metrics()` is the flat dict fit logs, `row()` what eval prints of a model."""

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
    lpips: float | None = None  # the mean over images; None when not computed
    rfid: float | None = None
    notes: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed, or what to bear in mind
    worst: list[Example] = field(default_factory=list)
    typical: list[Example] = field(default_factory=list)
    model: str = ""  # the model directory, for `vqtok eval`
    family: str = ""
    grid: tuple[int, int] = (0, 0)  # codes per image at image_size
    image_size: int = 0

    def metrics(self) -> dict:
        names = ["images", "errors", "psnr_image_mean", "psnr", "ssim", "mse", "codebook_size", "codes_used"]
        names += ["usage", "perplexity", "bits_per_code", "encode_images_per_second", "decode_images_per_second"]
        metrics = {name: getattr(self, name) for name in names}
        for name in ("lpips", "rfid"):  # only where they were asked for: measured, or noted why not
            if getattr(self, name) is not None or name in self.notes:
                metrics[name] = getattr(self, name)
        if self.notes:
            metrics["notes"] = dict(self.notes)
        metrics["worst"] = [{"key": e.key, "psnr": e.psnr} for e in self.worst]
        return metrics

    def row(self) -> dict:
        """metrics() with the model that was measured: its directory, family, K, grid and image size."""
        measured = {"model": self.model, "family": self.family, "grid": list(self.grid), "image_size": self.image_size}
        return {**measured, **self.metrics()}

    def picture(self) -> np.ndarray | None:
        """uint8 pixels: the worst originals over their reconstructions, then typical ones likewise (`picture`)."""
        return picture([self])

    def save_picture(self, path: Path) -> bool:
        return save_picture([self], path)


def picture(reports: Sequence[Report]) -> np.ndarray | None:
    """uint8 RGB pixels of the images `reports` show (M reports of the same images): the worst originals, under
    them each model's reconstructions in the order of `reports`, then typical ones likewise; None if none.

    Each image is enlarged by `tile_scale` into a tile of T = scale * H by scale * W pixels, n tiles to a row
    GAP pixels apart (n the most of worst or typical ones; fewer are padded with black). Each row of tiles has
    a text band of BAND pixels above it naming the row ("worst: original", "worst: " and the model directory,
    or "reconstruction" when a report names none) and one below it, under each tile: the image's key under
    an original, the reconstruction's PSNR under a reconstruction. So the picture is (worst and typical
    shown) 2 * (1 + M) * (T + 2 * BAND) pixels high and n * scale * W + (n - 1) * GAP wide. Text is white on
    black; the tiles hold the images' pixels unchanged.
    """
    sections = [(kind, [getattr(report, kind) for report in reports]) for kind in ("worst", "typical")]
    sections = [(kind, shown) for kind, shown in sections if shown[0]]  # the same images in each report
    if not sections:
        return None
    height, width = sections[0][1][0][0].original.shape[:2]
    scale = tile_scale(height, width)
    tile_h, tile_w = scale * height, scale * width
    columns = max(len(shown[0]) for _, shown in sections)
    names = ["original"] + [report.model or "reconstruction" for report in reports]
    full_width = columns * (tile_w + GAP) - GAP
    pixels = np.zeros((len(sections) * len(names) * (tile_h + 2 * BAND), full_width, 3), dtype=np.uint8)
    texts = []  # (x, y, width, text): drawn once the tiles are in place
    y = 0
    for kind, shown in sections:
        for r, name in enumerate(names):
            texts.append((0, y, full_width, f"{kind}: {name}"))
            y += BAND
            for j, example in enumerate(shown[max(r - 1, 0)]):
                image = example.original if r == 0 else example.reconstruction  # (H, W, 3)
                x = j * (tile_w + GAP)
                pixels[y : y + tile_h, x : x + tile_w] = enlarge(image, scale)
                texts.append((x, y + tile_h, tile_w, example.key if r == 0 else f"{example.psnr:.2f} dB"))
            y += tile_h + BAND
    return draw_texts(pixels, texts)


def save_picture(reports: Sequence[Report], path: Path) -> bool:
    from PIL import Image

    pixels = picture(reports)
    if pixels is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return True


@dataclass
class _Shown:
    """An image that may be shown: its score (the mean PSNR over the models), and each model's PSNR and
    reconstruction."""

    score: float
    key: str
    original: np.ndarray  # uint8 (H, W, 3)
    psnrs: list[float]
    reconstructions: list[np.ndarray]

    def example(self, m: int) -> Example:
        return Example(self.psnrs[m], self.key, self.original, self.reconstructions[m])


class _Examples:
    """The `EXAMPLES` images of lowest score seen so far, and a uniform random sample (a reservoir) of
    `RESERVOIR`."""

    def __init__(self, seed: int) -> None:
        self.worst: list[tuple[float, int, _Shown]] = []  # a heap of (-score, order, image): the best on top
        self.reservoir: list[_Shown] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def offer(
        self, scores: list[float], keys: list[str], images: torch.Tensor, psnrs: list[list[float]], recons: list
    ) -> None:
        """Images (B, 3, H, W) in [0, 1] with their scores, and per model their PSNRs and reconstructions
        (B, 3, H, W); only those kept are copied to the host."""
        first = self.seen
        slots: dict[int, int] = {}  # batch index -> reservoir slot it takes
        filled = len(self.reservoir)
        for i in range(len(scores)):
            self.seen += 1
            if filled < RESERVOIR:
                slots[i], filled = filled, filled + 1
            elif (j := self.rng.randrange(self.seen)) < RESERVOIR:
                slots[i] = j
        bar = -self.worst[0][0] if len(self.worst) == EXAMPLES else math.inf
        worse = [i for i in sorted(range(len(scores)), key=scores.__getitem__)[:EXAMPLES] if scores[i] < bar]
        kept = sorted({*slots, *worse})
        if not kept:
            return
        originals = _to_pixels(images[kept])
        reconstructions = [_to_pixels(recon[kept]) for recon in recons]
        shown = {
            i: _Shown(scores[i], keys[i], originals[n], [p[i] for p in psnrs], [r[n] for r in reconstructions])
            for n, i in enumerate(kept)
        }
        for i, slot in slots.items():
            if slot == len(self.reservoir):
                self.reservoir.append(shown[i])
            else:
                self.reservoir[slot] = shown[i]
        for i in worse:
            entry = (-scores[i], first + i, shown[i])
            if len(self.worst) < EXAMPLES:
                heapq.heappush(self.worst, entry)
            elif -scores[i] > self.worst[0][0]:  # a lower score than the best of the worst so far
                heapq.heapreplace(self.worst, entry)

    def candidates(self) -> tuple[list[_Shown], list[_Shown]]:
        return [e for _, _, e in self.worst], list(self.reservoir)


def _to_pixels(images: torch.Tensor) -> np.ndarray:
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)


@dataclass
class FeatureNetworks:
    """The pretrained networks an evaluation measures with (None: not used), and for each metric left out when
    it was not asked to be, why."""

    lpips: LPIPS | None = None
    inception: InceptionV3 | None = None
    notes: dict[str, str] = field(default_factory=dict)


def feature_networks(
    device: str | torch.device = "cpu",
    *,
    lpips: bool | None = None,
    rfid: bool | None = None,
    vgg16_weights: str | os.PathLike | None = None,
    lpips_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
) -> FeatureNetworks:
    """LPIPS (VGG16 and lpips' linear layers) and the Inception network of rFID, each loaded when its weights
    files are found, named or where they usually lie (`vqtok.tokenizers.perceptual`).

    For each metric, True asks for it: ModelFormatError, in one line, when a file is missing. None (the default)
    asks for it only when one of its files is named, and otherwise notes why it is not computed; False leaves
    it out. A named file that is not there, or any file of another layout, is refused whatever was asked.
    """
    networks = FeatureNetworks()
    if lpips is not False:
        files = [(VGG16_WEIGHTS, vgg16_weights), (LPIPS_WEIGHTS, lpips_weights)]
        if (found := _weights_files("LPIPS", lpips, files, networks.notes)) is not None:
            networks.lpips = load_lpips(*found, device=device)
    if rfid is not False:
        files = [(INCEPTION_WEIGHTS, inception_weights)]
        if (found := _weights_files("rFID", rfid, files, networks.notes)) is not None:
            networks.inception = load_inception(*found, device=device)
    return networks


def _weights_files(metric: str, asked: bool | None, files: list, notes: dict[str, str]) -> list[Path] | None:
    """The paths of a metric's (WeightsFile, path named or None) files when all are found. Otherwise
    ModelFormatError if the metric was asked for or one of its files named, else None, with a note in `notes`
    (keyed by the metric's name in lower case) of what is missing."""
    found = [spec.locate(path) for spec, path in files]
    missing = [spec.missing() for (spec, _), path in zip(files, found, strict=True) if path is None]
    if not missing:
        return found
    if asked or any(path is not None for _, path in files):
        raise ModelFormatError(f"{metric}: {missing[0]}")
    notes[metric.lower()] = f"not computed: {'; '.join(missing)}"
    return None


def _features(network, images: torch.Tensor) -> torch.Tensor:
    """Inception features (B, 2048) of images (B, 3, H, W) in [0, 1], FEATURE_BATCH at a time."""
    return torch.cat([network(chunk) for chunk in images.split(FEATURE_BATCH)])


class _Sums:
    """One model's running sums over the images it reconstructs."""

    def __init__(self, model, networks: FeatureNetworks) -> None:
        self.model = model
        self.networks = networks
        # float64 sums: squared error, values, images, sum of per-image PSNR, sum of SSIM, sum of LPIPS, then K
        # code counts
        self.totals = torch.zeros(6 + model.codebook_size, dtype=torch.float64, device=model.device)
        self.seconds = [0.0, 0.0]  # encoding, decoding
        self.features = FeatureStats(INCEPTION_FEATURES, model.device) if networks.inception is not None else None

    def add(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> their reconstructions (B, 3, H, W) and PSNRs (B,)."""
        device = self.model.device
        started = _now(device)
        codes = self.model.encode(images)  # (B, h, w)
        encoded = _now(device)
        recon = self.model.decode(codes)  # (B, 3, H, W) in [0, 1]
        decoded = _now(device)
        self.seconds[0] += encoded - started
        self.seconds[1] += decoded - encoded
        squared = (recon.float() - images).pow(2).flatten(1).sum(dim=1, dtype=torch.float64)  # (B,)
        per_image = psnr(squared / images[0].numel())  # (B,)
        totals = self.totals
        totals[0] += squared.sum()
        totals[1] += images.numel()
        totals[2] += len(images)
        totals[3] += per_image.sum()
        totals[4] += ssim(images, recon).sum(dtype=torch.float64)
        if self.networks.lpips is not None:  # in [-1, 1], as LPIPS takes them
            pairs = zip(images.split(FEATURE_BATCH), recon.split(FEATURE_BATCH), strict=True)
            totals[5] += sum(self.networks.lpips(x * 2 - 1, y * 2 - 1).sum(dtype=torch.float64) for x, y in pairs)
        if self.features is not None:
            self.features.add(_features(self.networks.inception, recon))
        totals[6:] += torch.bincount(codes.flatten(), minlength=self.model.codebook_size)
        return recon, per_image

    def report(self, errors: int, originals: FeatureStats | None) -> Report:
        """The report of this model, its sums added up across processes first; `originals` are the features of
        the images it reconstructed, already added up."""
        speeds = torch.tensor(self.seconds, dtype=torch.float64, device=self.totals.device)
        if in_process_group():
            dist.all_reduce(self.totals)
            dist.all_reduce(speeds, op=dist.ReduceOp.MAX)  # processes run side by side: the slowest sets the pace
        if self.features is not None:
            self.features.all_reduce()
        K = self.model.codebook_size
        squared_error, values, count, psnr_sum, ssim_sum, lpips_sum = self.totals[:6].tolist()
        counts = self.totals[6:].cpu().numpy()
        report = Report(images=int(count), errors=errors, codebook_size=K, notes=dict(self.networks.notes))
        if count == 0:
            return report
        report.mse = squared_error / values
        report.psnr = psnr(report.mse)
        report.psnr_image_mean = psnr_sum / count
        report.ssim = ssim_sum / count
        usage = CodeUsage.of(counts, K)
        report.codes_used, report.usage = usage.codes_used, usage.usage
        report.bits_per_code, report.perplexity = usage.bits_per_code, usage.perplexity
        encode_seconds, decode_seconds = speeds.tolist()
        report.encode_images_per_second = count / encode_seconds if encode_seconds else 0.0
        report.decode_images_per_second = count / decode_seconds if decode_seconds else 0.0
        if self.networks.lpips is not None:
            report.lpips = lpips_sum / count
        if self.features is not None and originals is not None:
            report.rfid, note = _rfid(originals, self.features)
            if note:
                report.notes["rfid"] = note
        return report


def _rfid(originals: FeatureStats, reconstructions: FeatureStats) -> tuple[float | None, str]:
    """The Fréchet distance of the two sets of features, and what to bear in mind about it ("" if nothing)."""
    n = originals.n
    if n < 2:
        return None, "not computed: a covariance needs at least 2 images"
    distance = frechet_distance(*originals.mean_cov(), *reconstructions.mean_cov())
    if n >= INCEPTION_FEATURES:
        return distance, ""
    return distance, (
        f"fewer images than its {INCEPTION_FEATURES:,} features: the covariances cannot be full rank and the "
        "figure depends on the count; compare it only with rFIDs on the same images"
    )


@torch.no_grad()
def evaluate(
    model,
    loader,
    *,
    limit: int | None = None,
    examples: bool = True,
    seed: int = 0,
    networks: FeatureNetworks | None = None,
) -> Report:
    """Run the model over the Batches of `loader` (`vqtok.data.make_loader`, evaluation mode) and report.

    `limit` caps the images this process evaluates. With `networks` (`feature_networks`), LPIPS and rFID are
    measured too. Under torch.distributed every process must call this, each with its own part of the data;
    all of them get the combined report.
    """
    return evaluate_models([model], loader, limit=limit, examples=examples, seed=seed, networks=networks)[0]


@torch.no_grad()
def evaluate_models(
    models: Sequence,
    loader,
    *,
    limit: int | None = None,
    examples: bool = True,
    seed: int = 0,
    tally: ErrorTally | None = None,
    networks: FeatureNetworks | None = None,
) -> list[Report]:
    """`evaluate` for several models on the same images, each batch read once and given to every model in
    turn; one report per model, in order. The images shown (worst and typical) are chosen by their mean PSNR
    over the models, and are the same in every report.

    With `tally`, the samples are counted in it and TooManyErrors stops a lone process that has seen too many
    fail (`ErrorTally.check`); under torch.distributed it ends up holding every process's counts, for the
    caller to judge.
    """
    training = [model.training for model in models]
    for model in models:
        model.eval()
    device = models[0].device
    networks = networks or FeatureNetworks()
    sums = [_Sums(model, networks) for model in models]
    # the originals' Inception features, the same for every model: computed once
    originals = FeatureStats(INCEPTION_FEATURES, device) if networks.inception is not None else None
    errors = 0
    scores: list[float] = []
    picked = _Examples(seed)
    for batch in loader:
        errors += len(batch.errors)
        images = batch.images
        keys = batch.keys
        if limit is not None:
            room = max(0, limit - len(scores))
            images, keys = images[:room], keys[:room]
        if tally is not None:
            tally.add(len(images), [reason for _, _, reason in batch.errors])
            if not in_process_group():  # one process stopping alone would leave the others waiting in all_reduce
                tally.check("evaluated")
        if len(images):
            images = images.to(device, non_blocking=True).float().div_(255)  # (B, 3, H, W) in [0, 1]
            images = images.contiguous(memory_format=torch.channels_last)
            if originals is not None:
                originals.add(_features(networks.inception, images))
            recons, psnrs = zip(*(s.add(images) for s in sums), strict=True)
            per_model = [values.tolist() for values in psnrs]
            values = torch.stack(psnrs).mean(dim=0).tolist()  # (B,) the mean over models
            scores += values
            if examples:
                picked.offer(values, keys, images, per_model, list(recons))
        if limit is not None and len(scores) >= limit:
            break
    for model, was_training in zip(models, training, strict=True):
        model.train(was_training)

    worst, sample = picked.candidates()
    if in_process_group():
        counted = torch.tensor([errors], dtype=torch.float64, device=device)
        dist.all_reduce(counted)
        errors = int(counted.item())
        gathered: list = [None] * dist.get_world_size()
        shown = (worst, sample) if examples else ([], [])
        dist.all_gather_object(gathered, (scores, *shown, tally))
        scores = [p for part in gathered for p in part[0]]
        worst = [e for part in gathered for e in part[1]]
        sample = [e for part in gathered for e in part[2]]
        if tally is not None:
            for other in gathered[: dist.get_rank()] + gathered[dist.get_rank() + 1 :]:
                tally.merge(other[3])
    if originals is not None:
        originals.all_reduce()
    reports = [s.report(errors, originals) for s in sums]
    if not scores:
        return reports
    worst = sorted(worst, key=lambda e: e.score)[:EXAMPLES]
    median = float(np.median(scores))
    typical = sorted(sample, key=lambda e: abs(e.score - median))[:EXAMPLES]
    for m, report in enumerate(reports):
        report.worst = [e.example(m) for e in worst]
        report.typical = [e.example(m) for e in typical]
    return reports


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_images(report: Report, where: str, tally: ErrorTally | None = None) -> Report:
    """DataError when nothing could be evaluated, naming where the images were looked for (and with a tally,
    the commonest reason why)."""
    if report.images == 0:
        samples = plural(report.errors, "sample")
        detail = f" ({report.errors} {samples} could not be decoded)" if report.errors else ""
        reason = f"; {tally.commonest()}" if tally is not None and tally.failed else ""
        raise DataError(f"{where}: no image to evaluate{detail}{reason}")
    return report


def evaluate_shards(model_dir, shards, **options) -> Report:
    """`evaluate_inputs` for one model: its report."""
    return evaluate_inputs([model_dir], shards, **options)[0]


def evaluate_inputs(
    model_dirs: Sequence,
    shards,
    *,
    image_size: int | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    out=None,
    num_workers: int = 2,
    device: str = "auto",
    image_column: str | None = None,
    image_root: str | os.PathLike | None = None,
    max_error_rate: float = MAX_ERROR_RATE,
    storage_options: dict | None = None,
    lpips: bool | None = None,
    rfid: bool | None = None,
    vgg16_weights: str | os.PathLike | None = None,
    lpips_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
) -> list[Report]:
    """`vqtok eval`: the report card of each model in `model_dirs` on the same images of `shards` (shards,
    image folders or Parquet files, paths or URLs; see `vqtok.sources`), read and decoded once for all of
    them. Images are centre-cropped to image_size (by default the first model's training size), which every
    model's stride must divide. With `out`, writes report.json and reconstructions.png there: the worst
    images (by the mean PSNR over the models) over each model's reconstructions, then typical ones.

    LPIPS and rFID are measured when their weights files are found (`feature_networks`, which takes `lpips`,
    `rfid` and the three files' paths), before any image is read.

    TooManyErrors when every sample, or more than `max_error_rate` of them, could not be read or decoded
    (judged once 1,000 were seen when there is one process, and over all processes at the end).

    Under `accelerate launch` or torchrun, unit i goes to process i mod world size, and `limit` is shared
    out among them.
    """
    tally = ErrorTally(max_error_rate)
    urls = expand_inputs(shards, image_column=image_column, image_root=image_root, storage_options=storage_options)
    urls = urls.units
    rank, world_size = 0, 1
    if launched():  # sums are added up across processes: join the process group the launcher set up
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        rank, world_size = state.process_index, state.num_processes
    torch_device = pick_device(device)
    models = []
    for model_dir in model_dirs:
        model = load_tokenizer(model_dir, device=torch_device, storage_options=storage_options)
        model.to(memory_format=torch.channels_last)
        image_size = image_size or model.config.image_size
        try:  # a size a model cannot encode is refused before any image is read
            model.grid_size(image_size)
        except ConfigError as exc:
            if len(model_dirs) == 1:
                raise
            raise ConfigError(f"{model_dir}: {exc}") from None
        models.append(model)
    networks = feature_networks(
        torch_device,
        lpips=lpips,
        rfid=rfid,
        vgg16_weights=vgg16_weights,
        lpips_weights=lpips_weights,
        inception_weights=inception_weights,
    )
    loader = make_loader(
        urls, image_size, batch_size, num_workers=min(num_workers, len(urls)), rank=rank, world_size=world_size
    )
    share = None if limit is None else -(-limit // world_size)
    reports = evaluate_models(models, loader, limit=share, tally=tally, networks=networks)
    check_images(reports[0], " ".join(shards), tally)  # every model saw the same images
    tally.check("evaluated", final=True)
    for model_dir, model, report in zip(model_dirs, models, reports, strict=True):
        report.model, report.family, report.image_size = str(model_dir), model.FAMILY, image_size
        report.grid = model.grid_size(image_size)
    if out is not None and rank == 0:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_picture(reports, out / PICTURE_NAME)
        rows = [report.row() for report in reports]
        (out / "report.json").write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + "\n")
    return reports
