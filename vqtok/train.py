"""`fit`: train a tokenizer (the VQ-VAE, or the VQGAN network) on images with Hugging Face accelerate.

The loop follows accelerate's own examples: accelerator, trackers, data,
model, optimizer, one `prepare`, then `accumulate` / `backward` steps; its
checkpoints are vqtok's own (`vqtok.checkpoints`, which says why not
accelerate's `save_state`). It runs the same on one CPU, one GPU or many
processes under `accelerate launch`.

With `init`, the run fine-tunes a tokenizer directory (fitted by vqtok or imported) instead of a new model: its
family, its config (less what `vqtok.config.FINE_TUNABLE` lets a fine-tune change), its weights and its
quantizer's state as they are. The quantizer's `initialized` flag is part of that state: true in a fitted model
(its k-means ran) and in an imported one (kmeans_init false), so k-means does not run again. `train="decoder"`
trains the decoder side alone (`Tokenizer.freeze_encode_side`): the child gives every image the parent's codes,
and has its codes id. run.json and the exported config.json record the parent.

Layout of OUT (run.json, checkpoints/ and metrics.jsonl as every trainer's, see `vqtok.runs`):
    model/                     the exported model (config.json + model.safetensors)
    samples/step-000500.png    the worst reconstructed validation images and typical ones, each over
                               its reconstruction and its PSNR (`vqtok.evaluate.picture`)
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vqtok.config import TRAIN_PARTS, ModelConfig, TrainConfig, VQGANConfig, fine_tune_config
from vqtok.data import expand_inputs, make_loader
from vqtok.errors import ConfigError
from vqtok.evaluate import evaluate
from vqtok.progress import ProgressBar
from vqtok.runs import Run
from vqtok.tokenizers import Tokenizer, build_tokenizer, load_tokenizer


@dataclass
class FitResult:
    model_dir: Path | str  # a URL when OUT is in a store
    steps: int
    resumed_from: int
    images_per_second: float
    metrics: dict  # the last evaluation's metrics (empty without validation shards)
    main_process: bool  # whether this process is the one that reports


def codebook_digest(model: Tokenizer) -> str:
    return hashlib.sha256(model.quantizer.codebook.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def parent_record(parent: Tokenizer, init: str, train: str) -> dict:
    """What a fine-tune records of the model it started from: where it was (`init` as given), its identity, what
    the run trains of it, and the parent's own provenance (an imported model's source, a fine-tune's parent)."""
    record = {"path": init, "model_id": parent.model_id, "codes_id": parent.codes_id, "trained": train}
    if parent.source:
        record["source"] = parent.source
    if parent.parent:
        record["parent"] = parent.parent
    return record


def fit(
    shards: list[str],
    out: str | Path,
    model_config: ModelConfig | VQGANConfig | None,  # its class is the family trained; None with init: the parent's
    train_config: TrainConfig,
    val_shards: list[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    image_column: str | None = None,
    image_root: str | None = None,
    storage_options: dict | None = None,
    init: str | None = None,
    train: str = "all",
) -> FitResult:
    """Train a tokenizer on `shards` into the run folder `out`. With `init` (a model directory, a path or a URL) the
    run fine-tunes it: `model_config` is then None (the parent's) or the parent's with what FINE_TUNABLE allows
    changed. `train` ("all" or "decoder") says which weights train."""
    from accelerate.utils import set_seed

    cfg = train_config
    if train not in TRAIN_PARTS:
        raise ConfigError(f"train must be one of {', '.join(TRAIN_PARTS)}, not {train!r}")
    if train != "all" and init is None:
        raise ConfigError(f"--train {train} fine-tunes a model: give the one to start from with --init")
    parent = None
    if init is not None:
        parent = load_tokenizer(init, storage_options=storage_options)
        if model_config is None:
            model_config = parent.config
        elif not isinstance(model_config, parent.config_class):
            raise ConfigError(
                f"--init {init} is a {parent.FAMILY} tokenizer, not one a {type(model_config).__name__} describes"
            )
        else:  # the same checks as the command line's, naming the fields
            fields = {**model_config.to_dict(), **dataclasses.asdict(model_config.quantizer)}
            fields.pop("quantizer")
            model_config = fine_tune_config(parent.config, overrides=fields)
    # Shards, image folders and Parquet files alike: units of work that the loaders split and draw from.
    sources = {"image_column": image_column, "image_root": image_root, "storage_options": storage_options}
    train_shards = expand_inputs(shards, **sources).units
    val_shards = expand_inputs(val_shards, **sources).units if val_shards else []
    if model_config.in_channels != 3:
        raise ConfigError("fit reads RGB images: in_channels must be 3")
    record_of_parent = parent_record(parent, str(init), train) if parent is not None else None
    # "parent" is None for a new model, so resuming a fine-tune without its --init (or the other way round) is refused
    settings = {"model": model_config.to_dict(), "steps": cfg.steps, "parent": record_of_parent}
    run = Run(out, settings, cfg, resume=resume, storage_options=storage_options)
    accelerator = run.accelerator
    start_step = run.start_step
    # The same seed on every process gives the same initial weights; restore sets a resumed run's random states.
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

    model = build_tokenizer(model_config)
    if parent is not None:
        model.load_state_dict(parent.state_dict())
        model.parent = record_of_parent
        del parent  # its weights are the model's now: one copy in memory is enough
        if train == "decoder":
            model.freeze_encode_side()  # before prepare: DDP then leaves the frozen parameters out
    model = model.to(accelerator.device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    # The loader is not prepared: its stream is already split by process and endless on each. Nor is the
    # schedule, which accelerate would step once per process: it steps once per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    run.track(model=model, optimizer=optimizer)
    run.restore()
    scheduler = run.schedule(optimizer)
    raw_model: Tokenizer = accelerator.unwrap_model(model)
    record = run.record

    def evaluate_and_record(step: int) -> dict:
        if not val_shards:
            return {}
        loader = make_loader(
            val_shards,
            model_config.image_size,
            cfg.batch_size,
            num_workers=min(cfg.num_workers, len(val_shards)),
            rank=rank,
            world_size=world,
        )
        report = evaluate(raw_model, loader)
        if accelerator.is_main_process:
            run.save(f"samples/step-{step:06d}.png", report.save_picture)
        metrics = report.metrics()
        record({"split": "val", "step": step, **metrics})
        return metrics

    progress = ProgressBar("fit", cfg.steps, start_step, enabled=show_progress and accelerator.is_main_process)
    sums = torch.zeros(3, device=accelerator.device)  # recon, vq, loss since the last log, kept on the device
    summed = 0  # micro-batches in sums
    images_seen, started = 0, time.perf_counter()
    # The loop's time waiting for the loader since the last log: a share near 1 says the decoding workers, not
    # the model, set the pace (on a GPU, time the model's queued work has not caught up on counts as model time).
    waited, window_started = 0.0, started
    last_metrics: dict = {}
    step = start_step
    model.train()
    with progress:
        batches = iter(train_loader)
        while step < cfg.steps:
            fetching = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - fetching
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
                now = time.perf_counter()
                rate = images_seen / (now - started)
                data_wait = waited / (now - window_started)
                waited, window_started = 0.0, now
                entry = {
                    "split": "train",
                    "step": step,
                    "loss": loss,
                    "recon_loss": recon,
                    "vq_loss": vq,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_second": rate,
                    "data_wait": data_wait,
                }
                # The quantizer's usage over its last batches, not the held-out usage fit reports at its end. A
                # frozen quantizer counts nothing: its counters are still the parent's.
                usage = ""
                if not raw_model.encode_side_frozen:
                    entry["usage"] = raw_model.quantizer.usage()
                    entry["perplexity"] = raw_model.quantizer.recent_perplexity()
                    usage = f"train usage (last {raw_model.quantizer.usage_window} batches) {entry['usage']:.0%}  "
                record(entry)
                progress.update(
                    status=f"recon {entry['recon_loss']:.4f}  vq {entry['vq_loss']:.4f}  "
                    f"{usage}{entry['images_per_second']:.0f} img/s"
                )
            progress.update(step)

            last_metrics = run.periodic(step, evaluate_and_record) or last_metrics

    elapsed = time.perf_counter() - started
    # Every process must hold the same codebook: the run records the evidence.
    last_metrics = run.finish(step, evaluate_and_record, "codebook_digests", codebook_digest(raw_model))
    model_dir = run.export(raw_model)
    rate = images_seen / max(elapsed, 1e-9)
    return FitResult(model_dir, step, start_step, rate, last_metrics, accelerator.is_main_process)
