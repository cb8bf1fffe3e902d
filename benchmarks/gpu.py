"""The prepared GPU check: every CUDA path of vqtok, run the way a user runs it, in one table.

GPU time comes rarely and for minutes, so this script exists before the GPU does: one command that runs on
whatever CUDA device appears, within 10 minutes on one H100, and prints one table (stage, what, figure, unit,
notes), also written to OUT/gpu-check.json so a leased machine can bring it back. `--smoke` runs the same
code paths on the CPU at tiny sizes in under a minute; tests/test_gpu_check.py runs it, so the script cannot
rot while no GPU is at hand.

Input: JPEGs of 256-512 px cut from scikit-image's photographs (benchmarks/encode.py's), in WebDataset shards
made on the spot. Stages:

- shards: making them (CPU).
- fit: the default VQ-VAE at 256 px, and a VQGAN of LlamaGen's VQ-16 shape (16x16 grids), through
  `vqtok.train.fit` (what `vqtok fit` runs), bf16 autocast on a GPU that has it: images/s between the first
  and the last log (the first steps' set-up left out), peak GPU memory, and the share of the loop spent
  waiting for the decoding workers; with vqtok's 2 workers and with one per core.
- objective: the same VQGAN trained with the full objective (LPIPS on random weights in its files' layout,
  which cost what the real ones do; taming's PatchGAN from step 0 with the adaptive weight; the EMA of the
  weights): images/s against the pixel loss alone, and peak GPU memory.
- encode: the model alone on uint8 tensors already in device memory (the ideal; fp32 and bf16), then
  `vqtok.encode.encode` with 2 workers and with one per core (the share of the run the main process waited
  for decoded images says whether JPEG decoding on the CPU limits it), and the whole `vqtok encode` command,
  start-up included. Also: JPEG decoding and cropping on one core, and torchvision's decode_jpeg on the device
  where torchvision is installed.
- decode, eval: `vqtok.decode.decode` (PNGs written) and `vqtok.evaluate.evaluate_shards`, images/s.
- prior: the photographs encoded at 64 px (16x16 grids, as benchmarks/prior.py), `vqtok.prior.fit.fit_prior`
  steps/s, and sampling codes/s with the key/value cache and recomputing every prefix (`Prior.sample`), and
  `vqtok.prior.sample.sample` (Parquet written).
- search: nearest-code search at K = 8,192 and 65,536 against the device's matrix-product rate, measured as
  benchmarks/quantizer.py measures it.
- agreement: codes of the fitted VQ-VAE on the same images, the device in bf16 (and in fp32) against the CPU
  in fp32: the share of codes that differ. In --smoke the device is the CPU: bf16 autocast on the CPU
  against fp32.
- multi: with two or more GPUs (or --multi; the smoke run takes it on the CPU, over gloo), fit and encode under
  `accelerate launch --multi_gpu --num_processes 2`, and their scaling over one process.

    pip install -e '.[bench]'
    python benchmarks/gpu.py --out runs/gpu-check           # one CUDA device: at most 10 minutes on an H100
    python benchmarks/gpu.py --smoke --out runs/gpu-smoke   # the CPU, tiny sizes: figures not to compare
    VQTOK_TORCH=torch tox -e gpu -- --out runs/gpu-check    # the same in a fresh environment
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import quantizer  # noqa: E402
from encode import make_jpegs, write_shards  # noqa: E402
from prior import sampling_speed  # noqa: E402

from vqtok.config import (  # noqa: E402
    ModelConfig,
    PriorConfig,
    PriorTrainConfig,
    QuantizerConfig,
    TrainConfig,
    VQGANConfig,
)

COLUMNS = ("stage", "what", "figure", "unit", "notes")
STAGES = ("shards", "fit", "objective", "encode", "decode", "eval", "prior", "search", "agreement", "multi")
REPORT_NAME = "gpu-check.json"
DEFAULT_WORKERS = TrainConfig.num_workers  # what `vqtok fit` and `vqtok encode` use unless told otherwise


@dataclass(frozen=True)
class Sizes:
    image_size: int
    images: int  # JPEGs in the shards
    per_shard: int
    vqvae: ModelConfig
    fit_steps: int
    fit_batch: int
    log_every: int
    vqgan: VQGANConfig
    vqgan_steps: int
    vqgan_batch: int
    alone_images: int  # the model alone: images held in device memory
    decode_images: int
    eval_images: int
    prior_image_size: int
    prior_steps: int
    prior_samples: int  # grids sampled
    search_n: int
    search_sizes: tuple[int, ...]
    agreement_images: int
    multi_steps: int


GPU = Sizes(
    image_size=256,
    images=4096,
    per_shard=256,
    vqvae=ModelConfig(image_size=256),  # the default network: 256 hidden channels, K = 512, D = 64; 64x64 grids
    fit_steps=300,
    fit_batch=64,
    log_every=50,
    # LlamaGen's VQ-16 shape: 128 channels, multipliers (1, 1, 2, 2, 4), attention at the lowest level,
    # K = 16,384 codes looked up l2-normalized in 8 dimensions; 16x16 grids at 256 px.
    vqgan=VQGANConfig(
        base_channels=128,
        channel_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        attn_levels=(4,),
        z_channels=256,
        image_size=256,
        quantizer=QuantizerConfig(codebook_size=16384, code_dim=8, normalize_codes=True),
    ),
    vqgan_steps=100,
    vqgan_batch=16,
    alone_images=1024,
    decode_images=1024,
    eval_images=2048,
    prior_image_size=64,
    prior_steps=300,
    prior_samples=64,
    search_n=65536,
    search_sizes=(8192, 65536),
    agreement_images=64,
    multi_steps=150,
)

SMOKE = Sizes(
    image_size=32,
    images=96,
    per_shard=32,
    vqvae=ModelConfig(
        hidden_channels=32, res_channels=8, image_size=32, quantizer=QuantizerConfig(codebook_size=64, code_dim=16)
    ),
    fit_steps=6,
    fit_batch=8,
    log_every=2,
    vqgan=VQGANConfig(
        base_channels=32,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        attn_levels=(2,),
        z_channels=32,
        image_size=32,
        quantizer=QuantizerConfig(codebook_size=64, code_dim=8, normalize_codes=True),
    ),
    vqgan_steps=4,
    vqgan_batch=4,
    alone_images=32,
    decode_images=32,
    eval_images=64,
    prior_image_size=16,
    prior_steps=6,
    prior_samples=4,
    search_n=4096,
    search_sizes=(512, 2048),
    agreement_images=16,
    multi_steps=4,
)


@dataclass
class Row:
    stage: str
    what: str
    figure: float | None
    unit: str
    notes: str = ""


@dataclass
class Check:
    """What the stages share: the sizes, the device, OUT, the rows so far and what earlier stages made."""

    sizes: Sizes
    device: torch.device
    out: Path
    multi: bool  # run the multi stage: 2 processes under accelerate launch
    compile: bool = False  # also time the model alone under torch.compile
    rows: list[Row] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    jpegs: list[bytes] = field(default_factory=list)
    model_dir: Path | None = None  # the VQ-VAE the later stages use: fitted, or untrained if fit failed
    fit_rate: float | None = None  # one process, vqtok's workers: the multi stage's baseline
    vqgan_rate: float | None = None  # the VQGAN with the pixel loss alone: the objective stage's baseline
    command_seconds: float | None = None  # the whole `vqtok encode` command, one process

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def add(self, stage: str, what: str, figure: float | None, unit: str, notes: str = "") -> None:
        row = Row(stage, what, figure, unit, notes)
        self.rows.append(row)
        print(format_row(row), flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------ helpers


def format_row(row: Row) -> str:
    figure = "-" if row.figure is None else f"{row.figure:,.4g}" if abs(row.figure) < 100 else f"{row.figure:,.0f}"
    return f"{row.stage:<10} {row.what:<46} {figure:>12} {row.unit:<10} {row.notes}"


def table(rows: list[Row]) -> str:
    header = f"{'stage':<10} {'what':<46} {'figure':>12} {'unit':<10} notes"
    return "\n".join([header, "-" * len(header), *map(format_row, rows)])


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_logs(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def steady_rate(metrics: Path, key: str) -> tuple[float, float]:
    """From a run's metrics.jsonl: the rate `key` between the first and the last log, which leaves out the first
    steps' set-up (k-means, kernel selection), and the mean data_wait over those logs (nan where none)."""
    logs = [e for e in read_logs(metrics) if key in e]
    if len(logs) < 2:
        raise RuntimeError(f"{metrics}: fewer than two logs of {key}")
    # A log's rate is counted from the start: step / rate is its time since the start, in seconds per unit of
    # work a step does, which the difference of two logs turns back into units per second.
    first, last = logs[0], logs[-1]
    rate = (last["step"] - first["step"]) / (last["step"] / last[key] - first["step"] / first[key])
    waits = [e["data_wait"] for e in logs[1:] if "data_wait" in e]
    return rate, float(np.mean(waits)) if waits else math.nan


def peak_memory(check: Check) -> float | None:
    return torch.cuda.max_memory_allocated(check.device) / 2**30 if check.cuda else None


def reset_peak(check: Check) -> None:
    if check.cuda:
        gc.collect()  # an earlier run's tensors, once unreachable, must not count in this one's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(check.device)


def crops(check: Check, count: int, size: int) -> torch.Tensor:
    """The first `count` JPEGs decoded and centre-cropped as vqtok does: uint8 (N, 3, S, S)."""
    from vqtok.data import center_crop, decode_image, to_tensor

    return torch.stack([to_tensor(center_crop(decode_image(data, size), size)) for data in check.jpegs[:count]])


def vqtok_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vqtok", *args]


def launch(processes: int, *args: str) -> list[str]:
    """`accelerate launch --multi_gpu` (torchrun underneath; gloo on a CPU machine, as DESIGN.md says)."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
    return [*accelerate, "--num_processes", str(processes), "-m", "vqtok", *args]


def run_timed(command: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return time.perf_counter() - started


def toml_recipe(path: Path, model: ModelConfig, train: TrainConfig) -> str:
    """A --config file for `vqtok fit` holding exactly these settings (TOML writes None as false)."""

    def table_lines(name: str, values: dict) -> list[str]:
        lines = [f"[{name}]"]
        for key, value in values.items():
            if value is None:
                value = False
            lines.append(f"{key} = {json.dumps(value)}")
        return lines

    model_values = model.to_dict()
    quantizer_values = model_values.pop("quantizer")
    train_values = {k: v for k, v in train.to_dict().items() if not (k == "report_to" and v is None)}
    lines = table_lines("model", model_values) + table_lines("model.quantizer", quantizer_values)
    path.write_text("\n".join(lines + table_lines("train", train_values)) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------ stages


def stage_shards(check: Check) -> None:
    s = check.sizes
    started = time.perf_counter()
    # benchmarks/encode.py's JPEGs, made in parts on every core: a part per seed.
    parts = max(1, min(cores(), s.images // 64))
    counts = [len(part) for part in np.array_split(np.arange(s.images), parts)]
    with Pool(parts) as pool:
        made = pool.starmap(make_jpegs, zip(counts, range(parts), strict=True))
    check.jpegs = [jpeg for part in made for jpeg in part]
    check.shards = write_shards(check.jpegs, check.out / "shards", s.per_shard)
    seconds = time.perf_counter() - started
    kib = sum(map(len, check.jpegs)) / len(check.jpegs) / 1024
    notes = f"{len(check.shards)} shards, {kib:.0f} KiB each, 256-512 px, {parts} processes"
    check.add("shards", f"{s.images} JPEGs written", s.images / seconds, "images/s", notes)


def fit_once(
    check: Check, name: str, config, steps: int, batch: int, workers: int, stage: str = "fit", **objective
) -> tuple[float, Path]:
    """`vqtok.train.fit` timed; `objective`: what it takes beside the settings (objective, ema_decay, the LPIPS
    files)."""
    from vqtok.train import fit

    s = check.sizes
    ema_decay = objective.pop("ema_decay", None)
    train = TrainConfig(
        steps=steps,
        batch_size=batch,
        log_every=max(1, min(s.log_every, steps // 3)),
        eval_every=steps,
        save_every=steps,
        num_workers=workers,
        ema_decay=ema_decay,
    )
    out = check.out / f"{stage}-{name}-{workers}w"
    reset_peak(check)
    result = fit(check.shards, out, config, train, show_progress=False, **objective)
    memory = peak_memory(check)
    rate, wait = steady_rate(out / "metrics.jsonl", "images_per_second")
    precision = "bf16 autocast" if check.cuda and torch.cuda.is_bf16_supported() else "fp32"
    grid = config.image_size // config.stride
    what = f"{name}, batch {batch}, {workers} workers"
    notes = (
        f"{precision}, {config.image_size} px -> {grid}x{grid}, K = {config.quantizer.codebook_size}; waiting for data "
    )
    notes += f"{wait:.0%} of the loop"
    if check.vqgan_rate and stage == "objective":
        notes += f"; {rate / check.vqgan_rate:.2f}x the pixel loss alone"
    check.add(stage, what, rate, "images/s", notes)
    if memory is not None and workers == DEFAULT_WORKERS:  # the workers do not change what the GPU holds
        check.add(stage, f"{name}, batch {batch}: peak GPU memory", memory, "GiB", "torch.cuda.max_memory_allocated")
    return rate, Path(result.model_dir)


def stage_fit(check: Check) -> None:
    s = check.sizes
    for workers in sorted({DEFAULT_WORKERS, cores()}):
        rate, model_dir = fit_once(check, "VQ-VAE", s.vqvae, s.fit_steps, s.fit_batch, workers)
        if workers == DEFAULT_WORKERS:
            check.fit_rate, check.model_dir = rate, model_dir


def stage_fit_vqgan(check: Check) -> None:
    s = check.sizes
    check.vqgan_rate, _ = fit_once(check, "VQGAN", s.vqgan, s.vqgan_steps, s.vqgan_batch, DEFAULT_WORKERS)


def random_lpips_files(folder: Path) -> tuple[Path, Path]:
    """LPIPS's two files in their published layout, with random weights: its cost, not its judgement."""
    from vqtok.tokenizers.perceptual import lpips_layout

    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "vgg16-397923af.pth", folder / "vgg.pth"
    generator = torch.Generator().manual_seed(0)
    for path, layout in zip(paths, lpips_layout(), strict=True):
        torch.save({key: torch.randn(shape, generator=generator) * 0.01 for key, shape in layout.items()}, path)
    return paths


def stage_objective(check: Check) -> None:
    from vqtok.config import ObjectiveConfig

    s = check.sizes
    vgg16, linear = random_lpips_files(check.out / "lpips-random")
    # LlamaGen's terms (L2, LPIPS 1, a hinge PatchGAN of 3 layers) playing from the first step, with taming's
    # adaptive weight, which costs a second backward through the decoder's last layer, and Open-MAGVIT2's EMA.
    objective = ObjectiveConfig(perceptual_weight=1.0, disc_weight=0.5, disc_start=0, adaptive_weight=True)
    fit_once(
        check,
        "VQGAN, full objective",
        s.vqgan,
        s.vqgan_steps,
        s.vqgan_batch,
        DEFAULT_WORKERS,
        stage="objective",
        objective=objective,
        vgg16_weights=vgg16,
        lpips_weights=linear,
        ema_decay=0.999,
    )


def alone_rate(check: Check, model, images: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Images per second of encode_images over uint8 images already on the model's device, batch 256."""
    from vqtok.encode import encode_images

    encode_images(model, images[:256], dtype)  # warm-up: kernels are chosen (or compiled) on the first call
    check.sync()
    started = time.perf_counter()
    for start in range(0, len(images), 256):
        encode_images(model, images[start : start + 256], dtype)  # codes come back to the CPU: it waits
    return len(images) / (time.perf_counter() - started)


def jpeg_on_device(check: Check, per_core: float) -> None:
    """torchvision's decode_jpeg on the device, batch 256, where torchvision is installed (vqtok does not need
    it): whether decoding there would outrun the CPU's cores."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        check.add("encode", "JPEG decoding, torchvision on the device", None, "", "not run: torchvision not installed")
        return
    data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in check.jpegs[: check.sizes.alone_images]]
    decode_jpeg(data[:8], ImageReadMode.RGB, check.device)  # warm-up: the decoder's state is made on the first call
    check.sync()
    started = time.perf_counter()
    for start in range(0, len(data), 256):
        decode_jpeg(data[start : start + 256], ImageReadMode.RGB, check.device)
    check.sync()
    rate = len(data) / (time.perf_counter() - started)
    notes = f"decoding only, no resize or crop; {rate / (per_core * cores()):.2f}x the CPU's {cores()} cores"
    check.add("encode", "JPEG decoding, torchvision on the device", rate, "images/s", notes)


def stage_encode(check: Check) -> None:
    from vqtok.encode import encode
    from vqtok.tokenizers import load_tokenizer

    s = check.sizes
    # JPEG decoding and cropping as the workers do it, on one core; then the model alone on those images
    # already in device memory: the ideal the command is measured against.
    started = time.perf_counter()
    images = crops(check, s.alone_images, s.image_size)  # (N, 3, S, S) uint8
    per_core = len(images) / (time.perf_counter() - started)
    images = images.to(check.device)
    model = load_tokenizer(check.model_dir, device=check.device)
    model.to(memory_format=torch.channels_last)
    ideal = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        ideal[name] = alone_rate(check, model, images, dtype)
        check.add("encode", f"model alone, {name}, tensors in device memory", ideal[name], "images/s", "batch 256")
    if check.compile:
        model.encode = torch.compile(model.encode)  # the instance's own: encode_images calls it
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            rate = alone_rate(check, model, images, dtype)
            notes = f"batch 256; {rate / ideal[name]:.2f}x without torch.compile, compiling not counted"
            check.add("encode", f"model alone, {name}, torch.compile", rate, "images/s", notes)
    notes = f"{cores()} cores: at most {per_core * cores():,.0f} images/s, {per_core * cores() / ideal['fp32']:.2f}"
    check.add("encode", "JPEG decoding and crop, one core", per_core, "images/s", notes + " of the model alone")

    for workers in sorted({DEFAULT_WORKERS, cores()}):
        out = check.out / f"tokens-{workers}w.parquet"
        result = encode(check.shards, out, check.model_dir, num_workers=workers, show_progress=False)
        used = min(workers, len(check.shards))
        wait = result.wait_seconds / result.seconds
        limits = "JPEG decoding on the CPU limits it" if wait > 0.5 else "the CPU's decoding keeps up"
        notes = f"{used} workers used; waited for decoded images {wait:.0%} of the run: {limits}; "
        notes += f"{result.images_per_second / ideal['fp32']:.2f} of the model alone"
        check.add(
            "encode", f"vqtok.encode.encode, {workers} workers, fp32", result.images_per_second, "images/s", notes
        )

    jpeg_on_device(check, per_core)

    tokens = check.out / "tokens.parquet"
    check.command_seconds = run_timed(
        vqtok_command("encode", *check.shards, str(tokens), "--model", str(check.model_dir))
    )
    rate = s.images / check.command_seconds
    notes = (
        f"defaults ({DEFAULT_WORKERS} workers, fp32), start-up included; {rate / ideal['fp32']:.2f} of the model alone"
    )
    check.add("encode", "vqtok encode, the whole command", rate, "images/s", notes)


def stage_decode(check: Check) -> None:
    from vqtok.decode import decode

    s = check.sizes
    result = decode(
        check.out / "tokens.parquet", check.out / "decoded", check.model_dir, limit=s.decode_images, show_progress=False
    )
    notes = f"{result.images} PNGs of {s.image_size} px written"
    check.add("decode", "vqtok.decode.decode", result.images_per_second, "images/s", notes)
    check.add("decode", "its model part (codes in, pixels out)", result.images / result.decode_seconds, "images/s")


def stage_eval(check: Check) -> None:
    from vqtok.evaluate import evaluate_shards

    s = check.sizes
    started = time.perf_counter()
    report = evaluate_shards(check.model_dir, check.shards, limit=s.eval_images)
    seconds = time.perf_counter() - started
    notes = f"{report.images} images, PSNR {report.psnr:.2f} dB; the model's encode "
    notes += f"{report.encode_images_per_second:,.0f} and decode {report.decode_images_per_second:,.0f} images/s"
    check.add("eval", "vqtok.evaluate.evaluate_shards", report.images / seconds, "images/s", notes)


def stage_prior(check: Check) -> None:
    from vqtok.encode import encode
    from vqtok.prior import Prior
    from vqtok.prior.fit import fit_prior
    from vqtok.prior.sample import sample

    s = check.sizes
    tokens = check.out / "prior-tokens.parquet"
    encode(check.shards, tokens, check.model_dir, image_size=s.prior_image_size, keep=["cls"], show_progress=False)
    train = PriorTrainConfig(
        steps=s.prior_steps,
        log_every=max(1, min(s.log_every, s.prior_steps // 3)),
        eval_every=s.prior_steps,
        save_every=s.prior_steps,
    )
    out = check.out / "prior"
    fitted = fit_prior([str(tokens)], out, PriorConfig(), train, cond="cls", show_progress=False)
    codes_per_second, _ = steady_rate(out / "metrics.jsonl", "codes_per_second")
    prior = Prior.from_pretrained(fitted.model_dir, device=check.device)
    h, w = prior.config.grid
    steps_per_second = codes_per_second / (train.batch_size * h * w)
    precision = "bf16 autocast" if check.cuda and torch.cuda.is_bf16_supported() else "fp32"
    notes = f"batch {train.batch_size} grids of {h}x{w}, {precision}, {prior.config.layers} layers of width "
    check.add("prior", "fit", steps_per_second, "steps/s", notes + f"{prior.config.width}")

    classes = torch.arange(s.prior_samples) % prior.config.num_classes
    prior.sample(2, cls=classes[:2], generator=torch.Generator().manual_seed(0)).cpu()  # warm-up
    speeds = sampling_speed(prior, classes)
    notes = f"{s.prior_samples} grids of {h}x{w} in one batch"
    check.add("prior", "sampling, key/value cache", speeds["cached"], "codes/s", notes)
    ratio = speeds["cached"] / speeds["recomputed"]
    check.add("prior", "sampling, every prefix recomputed", speeds["recomputed"], "codes/s", f"cache: {ratio:.1f}x")
    result = sample(fitted.model_dir, check.out / "sampled.parquet", n=s.prior_samples, show_progress=False)
    notes = f"{result.grids} grids, Parquet written, on {check.device.type}"
    check.add("prior", "vqtok.prior.sample.sample", result.codes_per_second, "codes/s", notes)


def stage_search(check: Check) -> None:
    s = check.sizes
    device = check.device.type
    rate = quantizer.square_matmul_rate(device)
    check.add("search", "2048x2048 matrix product, fp32", rate / 1e9, "GFLOP/s", "benchmarks/quantizer.py's")
    for K in s.search_sizes:
        ours = quantizer.measure("vqtok", K, device, 5, s.search_n)
        product = quantizer.measure("matmul", K, device, 5, s.search_n)
        flops = 2 * s.search_n * K * quantizer.D
        notes = f"N = {s.search_n:,}, D = {quantizer.D}: {product['seconds'] / ours['seconds']:.0%} of the "
        notes += f"(N, D) x (D, K) product's rate; {ours['agree']:.1%} agree with fp64"
        check.add("search", f"nearest code, K = {K:,}", flops / ours["seconds"] / 1e9, "GFLOP/s", notes)


def stage_agreement(check: Check) -> None:
    from vqtok.encode import encode_images
    from vqtok.tokenizers import load_tokenizer

    s = check.sizes
    images = crops(check, s.agreement_images, s.image_size)
    cpu = load_tokenizer(check.model_dir, device="cpu")
    reference = encode_images(cpu, images)  # fp32 on the CPU
    model = load_tokenizer(check.model_dir, device=check.device)
    model.to(memory_format=torch.channels_last)  # as vqtok encode runs it
    where = check.device.type
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        if dtype is None and not check.cuda:
            continue  # fp32 on the CPU against itself
        codes = encode_images(model, images, dtype)
        differ = float((codes != reference).mean())
        notes = f"{reference.size:,} codes of {len(images)} images, the fitted VQ-VAE"
        if check.cuda and dtype is None:
            notes += f"; TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'} (PyTorch's default: on)"
        check.add("agreement", f"{name} on {where} vs fp32 on the CPU", differ * 100, "% differ", notes)


def stage_multi(check: Check) -> None:
    from vqtok.tokens.writer import read_markers

    s = check.sizes
    n = 2
    if not check.multi:
        would = " ".join(launch(n, "fit", "SHARDS", "--out", "OUT", "--config", "RECIPE")[2:])
        notes = f"not run: {torch.cuda.device_count()} GPU(s), needs 2 (or --multi); would run {would}"
        check.add("multi", f"fit and encode, {n} processes", None, "", notes)
        return
    train = TrainConfig(
        steps=s.multi_steps,
        batch_size=s.fit_batch,
        log_every=max(1, min(s.log_every, s.multi_steps // 3)),
        eval_every=s.multi_steps,
        save_every=s.multi_steps,
    )
    recipe = toml_recipe(check.out / "multi-recipe.toml", s.vqvae, train)
    out = check.out / f"fit-{n}p"
    run_timed(launch(n, "fit", *check.shards, "--out", str(out), "--config", recipe))
    processes = [
        e["processes"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "processes" in e
    ]
    rate, wait = steady_rate(out / "metrics.jsonl", "images_per_second")  # every process's images
    notes = f"{processes[-1]} processes ran; {rate / check.fit_rate:.2f}x one process; waiting for data {wait:.0%}"
    check.add("multi", f"fit VQ-VAE, {n} processes, batch {s.fit_batch} each", rate, "images/s", notes)

    tokens = check.out / f"tokens-{n}p.parquet"
    seconds = run_timed(launch(n, "encode", *check.shards, str(tokens), "--model", str(check.model_dir)))
    ranks = {marker["process"] for marker in read_markers(tokens).values()}
    notes = f"{len(ranks)} processes wrote shards; {check.command_seconds / seconds:.2f}x one process "
    notes += "(whole commands, start-up included)"
    check.add("multi", f"vqtok encode, {n} processes", s.images / seconds, "images/s", notes)


# ------------------------------------------------------------------------------------------ main


def run_check(out: Path, smoke: bool = False, multi: bool | None = None, compile: bool = False) -> list[Row]:
    """Every stage in turn; a stage that fails is a row saying so, and the others still run. `multi`: run the
    multi stage (default: in the smoke run, and with two GPUs or more). OUT/gpu-check.json is written after
    every stage, so a run cut short (a lease running out) still leaves the stages it finished."""
    sizes = SMOKE if smoke else GPU
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if multi is None:  # the smoke run takes it on gloo, so that its code is run too
        multi = smoke or torch.cuda.device_count() >= 2
    report_path = out / REPORT_NAME
    if out.exists() and any(out.iterdir()) and not report_path.exists():
        raise SystemExit(f"{out} is not empty and holds no {REPORT_NAME}: choose another --out")
    shutil.rmtree(out, ignore_errors=True)  # an earlier check's folder
    out.mkdir(parents=True)
    check = Check(sizes, device, out, multi, compile)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "gpus": torch.cuda.device_count(),
        "cores": cores(),
        "torch": torch.__version__,
        "smoke": smoke,
        "seconds": 0.0,
        "stage_seconds": {},
        "columns": list(COLUMNS),
        "rows": [],
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    started = time.perf_counter()
    stages: list[tuple[str, Callable[[Check], None]]] = [
        ("shards", stage_shards),
        ("fit", stage_fit),
        ("fit", stage_fit_vqgan),
        ("objective", stage_objective),
        ("encode", stage_encode),
        ("decode", stage_decode),
        ("eval", stage_eval),
        ("prior", stage_prior),
        ("search", stage_search),
        ("agreement", stage_agreement),
        ("multi", stage_multi),
    ]
    print(table([]), flush=True)
    spent = report["stage_seconds"]
    for name, stage in stages:
        stage_started = time.perf_counter()
        if check.model_dir is None and name not in ("shards", "fit"):
            # fit failed: later stages run on the default network untrained, so they still measure speed
            from vqtok.tokenizers import build_tokenizer

            check.model_dir = Path(build_tokenizer(sizes.vqvae).save_pretrained(out / "untrained"))
            check.add(name, "fit failed: an untrained VQ-VAE stands in", None, "")
        try:
            stage(check)
        except Exception as exc:  # the other stages' figures are worth having: record it and go on
            traceback.print_exc()
            check.add(name, f"{stage.__name__} FAILED", None, "", f"{type(exc).__name__}: {str(exc)[:300]}")
        spent[name] = round(spent.get(name, 0.0) + time.perf_counter() - stage_started, 1)
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["rows"] = [dataclasses.asdict(r) for r in check.rows]
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    stage_times = ", ".join(f"{name} {t:.0f}" for name, t in spent.items())
    print(f"\n{report['device']}, {report['cores']} cores, torch {report['torch']}: {report['seconds']:.0f} s")
    print(f"seconds by stage: {stage_times}\n")
    print(table(check.rows))
    return check.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help=f"emptied first; {REPORT_NAME}")
    parser.add_argument("--smoke", action="store_true", help="the CPU, tiny sizes: checks the code paths only")
    parser.add_argument(
        "--multi",
        action=argparse.BooleanOptionalAction,
        help="fit and encode with 2 processes under accelerate launch (gloo on a CPU); default: with 2 GPUs or more",
    )
    parser.add_argument("--compile", action="store_true", help="also time the model alone under torch.compile")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: the check is sized for a GPU; --smoke runs its code paths on the CPU")
    rows = run_check(args.out, args.smoke, args.multi, args.compile)
    if any("FAILED" in r.what for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
