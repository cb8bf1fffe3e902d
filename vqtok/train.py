"""`fit`: train a VQ-VAE on WebDataset shards with Hugging Face accelerate.

The loop follows accelerate's own examples: accelerator, trackers, data,
model, optimizer, one `prepare`, then `accumulate` / `backward` steps, with
`save_state` / `load_state` checkpoints. It runs the same on one CPU, one GPU
or many processes under `accelerate launch`.

Layout of OUT:
    checkpoints/step-000500/   accelerate state (model, optimizer, scheduler, RNGs)
    model/                     the exported model (config.json + model.safetensors)
    samples/step-000500.png    originals (top) over reconstructions (bottom)
    metrics.jsonl              one JSON object per log or evaluation
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from vqtok.config import ModelConfig, TrainConfig
from vqtok.data import expand_inputs, make_loader
from vqtok.errors import ConfigError
from vqtok.model import VQVAE
from vqtok.progress import ProgressBar
from vqtok.quantize import perplexity

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


@dataclass
class FitResult:
    model_dir: Path
    steps: int
    resumed_from: int
    images_per_second: float
    metrics: dict  # the last evaluation's metrics (empty without validation shards)
    main_process: bool  # whether this process is the one that reports


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up (at most a tenth of the run), then cosine decay to min_lr_ratio of the peak."""
    warmup = min(config.warmup_steps, config.steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return factor


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    found = [
        (int(m.group(1)), p)
        for p in (out / "checkpoints").glob("step-*")
        if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    if not found:
        return None
    step, path = max(found)
    return path, step


def check_run_settings(path: Path, model_config: ModelConfig, cfg: TrainConfig, resuming: bool) -> None:
    """A resumed run must be the run it resumes: the model's settings and the step count decide that."""
    settings = {"model": model_config.to_dict(), "steps": cfg.steps}
    if resuming and path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in saved["model"] if saved["model"][k] != settings["model"].get(k))
        if saved["steps"] != cfg.steps:
            changed.append("steps")
        if changed:
            raise ConfigError(f"--resume with other settings than {path} records: {', '.join(changed)} changed")
    if int(os.environ.get("RANK", "0")) == 0:  # other processes may be reading it: replace it whole
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(partial, path)


def codebook_digest(model: VQVAE) -> str:
    return hashlib.sha256(model.quantizer.codebook.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def fit(
    shards: list[str],
    out: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    val_shards: list[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    image_column: str | None = None,
    storage_options: dict | None = None,
) -> FitResult:
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, gather_object, set_seed

    out = Path(out)
    cfg = train_config
    # Shards, image folders and Parquet files alike: units of work that the loaders split and draw from.
    sources = {"image_column": image_column, "storage_options": storage_options}
    train_shards = expand_inputs(shards, **sources).units
    val_shards = expand_inputs(val_shards, **sources).units if val_shards else []
    checkpoint = latest_checkpoint(out) if resume else None
    if not resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    if model_config.in_channels != 3:
        raise ConfigError("fit reads RGB images: in_channels must be 3")
    check_run_settings(out / "run.json", model_config, cfg, resuming=checkpoint is not None)

    # Several processes and no GPU (torchrun, or `accelerate launch --multi_gpu` on a CPU machine):
    # accelerate only sets up its gloo process group when told it runs on the CPU.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    mixed_precision = cfg.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Each process reads its own shards (see make_loader), so nothing is dispatched from rank 0.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
        # The quantizer syncs its own buffers; DDP's per-step buffer broadcast would only repeat that.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    if cfg.report_to:
        accelerator.init_trackers("vqtok", config={**model_config.to_dict(), **cfg.to_dict()})
    start_step = checkpoint[1] if checkpoint else 0
    # The same seed on every process gives the same initial weights; load_state restores the RNGs of a resumed run.
    set_seed(cfg.seed)

    rank, world = accelerator.process_index, accelerator.num_processes
    train_loader = make_loader(
        train_shards,
        model_config.image_size,
        cfg.batch_size,
        train=True,
        resample=True,
        num_workers=cfg.num_workers,
        seed=cfg.seed + start_step,  # a resumed run draws new crops rather than replaying the first ones
        rank=rank,
        world_size=world,
    )

    model = VQVAE(model_config).to(accelerator.device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = LambdaLR(optimizer, lr_lambda(cfg))
    # The loader is not prepared: its stream is already split by process and endless on each. Nor
    # is the scheduler, which accelerate would step once per process: it steps once per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if checkpoint:
        accelerator.load_state(str(checkpoint[0]))
    raw_model: VQVAE = accelerator.unwrap_model(model)

    metrics_path = out / "metrics.jsonl"  # out exists: check_run_settings wrote run.json into it

    def record(entry: dict) -> None:
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        scalars = {f"{entry['split']}/{k}": v for k, v in entry.items() if isinstance(v, int | float)}
        accelerator.log(scalars, step=entry["step"])

    def evaluate_and_record(step: int) -> dict:
        if not val_shards:
            return {}
        metrics = evaluate(accelerator, raw_model, val_shards, model_config.image_size, cfg, out, step)
        record({"split": "val", "step": step, **metrics})
        return metrics

    record({"split": "train", "step": start_step, "resumed_from": str(checkpoint[0]) if checkpoint else None})
    progress = ProgressBar("fit", cfg.steps, start_step, enabled=show_progress and accelerator.is_main_process)
    sums = torch.zeros(3, device=accelerator.device)  # recon, vq, loss since the last log, kept on the device
    summed = 0  # micro-batches in sums
    images_seen, started = 0, time.perf_counter()
    last_metrics: dict = {}
    step = start_step
    model.train()
    with progress:
        batches = iter(train_loader)
        while step < cfg.steps:
            batch = next(batches)
            images = batch.images.to(accelerator.device, non_blocking=True)
            images = images.float().div_(255).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
            with accelerator.accumulate(model):
                output = model(images)
                accelerator.backward(output.loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([output.recon_loss.detach(), output.vq_loss.detach(), output.loss.detach()])
            summed += 1
            images_seen += images.shape[0] * world
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1

            if step % cfg.log_every == 0 or step == cfg.steps:
                recon, vq, loss = (sums / summed).tolist()
                sums.zero_()
                summed = 0
                rate = images_seen / (time.perf_counter() - started)
                entry = {
                    "split": "train",
                    "step": step,
                    "loss": loss,
                    "recon_loss": recon,
                    "vq_loss": vq,
                    "usage": raw_model.quantizer.usage(),
                    "perplexity": raw_model.quantizer.recent_perplexity(),
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_second": rate,
                }
                record(entry)
                progress.update(
                    status=f"recon {entry['recon_loss']:.4f}  vq {entry['vq_loss']:.4f}  usage {entry['usage']:.0%}  "
                    f"{entry['images_per_second']:.0f} img/s"
                )
            progress.update(step)

            if step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint(accelerator, out, step, cfg.keep_checkpoints)
            if step % cfg.eval_every == 0 and step < cfg.steps:
                last_metrics = evaluate_and_record(step)

    elapsed = time.perf_counter() - started
    save_checkpoint(accelerator, out, step, cfg.keep_checkpoints)
    last_metrics = evaluate_and_record(step)

    # Every process must hold the same codebook; record the evidence.
    digests = gather_object([codebook_digest(raw_model)])
    record({"split": "train", "step": step, "processes": world, "codebook_digests": digests})
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes ended with different codebooks: {digests}")

    model_dir = out / "model"
    if accelerator.is_main_process:
        raw_model.save_pretrained(model_dir)
        accelerator.print(f"exported model to {model_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    rate = images_seen / max(elapsed, 1e-9)
    return FitResult(model_dir, step, start_step, rate, last_metrics, accelerator.is_main_process)


def save_checkpoint(accelerator, out: Path, step: int, keep: int) -> None:
    """save_state into a temporary folder, renamed when every process is done: resume never sees half of one."""
    final = out / "checkpoints" / f"step-{step:06d}"
    if final.exists():
        return
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:  # every process writes its own RNG state into it
        partial.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial.rename(final)
        if keep:
            found = sorted(
                (int(m.group(1)), p) for p in final.parent.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
            )
            for _, path in found[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate(accelerator, model: VQVAE, shards, image_size, cfg: TrainConfig, out: Path, step: int) -> dict:
    """MSE, PSNR, codebook usage and perplexity over the whole validation set, summed over processes."""
    was_training = model.training
    model.eval()
    loader = make_loader(
        shards,
        image_size,
        cfg.batch_size,
        train=False,
        num_workers=min(cfg.num_workers, len(shards)),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    device = accelerator.device
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    values = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(model.codebook_size, dtype=torch.float64, device=device)
    first = None
    for batch in loader:
        if batch.images.shape[0] == 0:
            continue
        images = batch.images.to(device, non_blocking=True).float().div_(255)
        images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            codes = model.encode(images)
            recon = model.decode(codes)
        squared_error += (recon.float() - images).pow(2).sum(dtype=torch.float64)
        values += images.numel()
        counts += torch.bincount(codes.flatten(), minlength=model.codebook_size)
        if first is None:
            first = (images[:8].cpu(), recon[:8].float().cpu())
    totals = accelerator.reduce(torch.cat([squared_error[None], values[None], counts]), reduction="sum")
    squared_error, values, counts = totals[0], totals[1], totals[2:]
    if accelerator.is_main_process and first is not None:
        save_sample_grid(*first, out / "samples" / f"step-{step:06d}.png")
    model.train(was_training)
    if values == 0:
        return {"images": 0}
    mse = (squared_error / values).item()
    return {
        "images": int(values.item() // (3 * image_size * image_size)),
        "mse": mse,
        "psnr": 10 * math.log10(1 / max(mse, 1e-12)),
        "usage": (counts > 0).double().mean().item(),
        "perplexity": perplexity(counts).item(),
    }


def save_sample_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """Originals in the top row, their reconstructions below, as one PNG."""
    from PIL import Image

    rows = torch.cat([torch.cat(list(originals), dim=2), torch.cat(list(recons.clamp(0, 1)), dim=2)], dim=1)
    pixels = (rows * 255).round().byte().permute(1, 2, 0).numpy()  # (2H, n*W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
