"""`vqtok prior fit`: train a prior over token grids with Hugging Face accelerate.

The same loop as `vqtok fit` (see `vqtok.train`), on the same run conventions (`vqtok.runs`): accelerator, data,
model, optimizer, one `prepare`, then `accumulate` / `backward` steps, checkpoints and `--resume`.
Everything about the tokens is checked before the first step: that one tokenizer made every file (model id,
K, grid), that every code lies in [0, K), and that the `--cond` column holds a class in [0, classes) on
every row.

TOKENS, --val, --tokenizer and OUT may be URLs that fsspec opens (`storage_options` go to every one). A token
dataset whose run did not finish is refused (`vqtok.tokens.UnfinishedDataset`) unless `partial`: then the
committed parts alone are read, and metrics.jsonl records how many grids the prior trains on.

Tokens encoded with augmented views (`vqtok encode --augment`) train on one of each image's grids per epoch,
the plain one or a view, each equally likely (`TokenDataset(views=True)`), unless `plain_only`; held-out
tokens are always scored on their plain grids.

Layout of OUT (run.json, checkpoints/ and metrics.jsonl as every trainer's):
    model/                     the exported prior (config.json of kind "prior" + model.safetensors)
    samples/step-000500.png    with a tokenizer: grids sampled at each evaluation and decoded, a row per class,
                               laid out as `vqtok eval`'s picture (`vqtok.pictures`)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vqtok.config import PriorConfig, PriorTrainConfig
from vqtok.errors import ConfigError
from vqtok.pictures import BAND, GAP, draw_texts, enlarge, tile_scale
from vqtok.progress import ProgressBar
from vqtok.runs import Run
from vqtok.tokens import TokenDataset, TokenSet
from vqtok.tokens.reader import gives_codes

from .model import Prior

PICTURE_CLASSES, PICTURE_SAMPLES = 8, 8  # the evaluation picture: up to 8 classes (rows), 8 samples each


@dataclass
class PriorFitResult:
    model_dir: Path | str  # a URL when OUT is in a store
    steps: int
    resumed_from: int
    codes_per_second: float
    metrics: dict  # the last evaluation's (empty without --val)
    main_process: bool  # whether this process is the one that reports
    grids: int = 0  # training grids
    unfinished: dict[str, str] = dataclasses.field(default_factory=dict)  # token dataset read in part -> how far


@dataclass
class PriorData:
    """The checked token sets and what they say the prior is over."""

    train: TokenSet
    val: TokenSet | None
    config: PriorConfig  # the recipe's config with K, grid, tokenizer, image size and classes filled in
    columns: list[str]  # [cond] or []

    @property
    def unfinished(self) -> dict[str, str]:
        """The token datasets read in part (`partial`), each with how far its run got."""
        sets = [self.train] if self.val is None else [self.train, self.val]
        return {path: done.describe() for token_set in sets for path, done in token_set.unfinished.items()}

    @property
    def has_views(self) -> bool:
        """Whether any training file holds augmented views."""
        return any(self.train.has_views(file) for file in self.train.schemas)


def open_tokens(
    tokens: list[str],
    val: list[str] | None,
    config: PriorConfig,
    cond: str | None = None,
    storage_options: dict | None = None,
    partial: bool = False,
) -> PriorData:
    """Open and check the training and held-out token sets; StoreError or ConfigError for what would spoil a run,
    UnfinishedDataset for a dataset whose run did not finish unless `partial` (its committed parts are read)."""
    columns = [cond] if cond else []
    train = TokenSet(tokens, columns, storage_options, partial=partial)
    meta = train.tokenizer()
    held_out = TokenSet(val, columns, storage_options, partial=partial) if val else None
    if held_out is not None:
        theirs = held_out.tokenizer()
        changed = [name for name in ("model_id", "codebook_size", "grid") if theirs.get(name) != meta.get(name)]
        if changed:
            raise ConfigError(
                f"--val tokens were made by another tokenizer than the training tokens ({', '.join(changed)}: "
                f"{', '.join(f'{theirs.get(n)} vs {meta.get(n)}' for n in changed)})"
            )
    K = int(meta["codebook_size"])
    for token_set in (train, held_out):
        if token_set is not None:
            token_set.check_codes(K)
    if cond:
        classes = train.class_count(cond, config.num_classes or None)
        if held_out is not None:
            held_out.class_count(cond, classes)
    elif config.num_classes:
        raise ConfigError("num_classes is set but no --cond column says which class each grid is")
    else:
        classes = 0
    config = dataclasses.replace(
        config,
        codebook_size=K,
        grid=tuple(meta["grid"]),
        tokenizer=meta.get("model_id"),
        codes_id=meta.get("codes_id"),
        image_size=meta.get("image_size"),
        num_classes=classes,
    )
    return PriorData(train, held_out, config, columns)


def configure_optimizer(model: Prior, train: PriorTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the linear layers' matrices only: not on embeddings, norms or biases."""
    decayed = [p for name, p in model.named_parameters() if p.dim() >= 2 and "emb" not in name]
    others = [p for name, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in name)]
    groups = [{"params": decayed, "weight_decay": train.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas)


def fit_prior(
    tokens: list[str],
    out: str | Path,
    config: PriorConfig,
    train_config: PriorTrainConfig,
    val: list[str] | None = None,
    cond: str | None = None,
    tokenizer: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    plain_only: bool = False,
    storage_options: dict | None = None,
    partial: bool = False,
) -> PriorFitResult:
    from accelerate.utils import set_seed

    cfg = train_config
    data = open_tokens(tokens, val, config, cond, storage_options, partial)
    config = data.config
    decoder = tokenizer_of_tokens(tokenizer, config, storage_options) if tokenizer else None
    settings = {"prior": config.to_dict(), "steps": cfg.steps, "cond": cond}
    draw_views = data.has_views and not plain_only
    if data.has_views:  # recorded only then, so that runs on plain tokens keep the run.json of before
        settings["views"] = "drawn" if draw_views else "plain"
    run = Run(out, settings, cfg, resume=resume, storage_options=storage_options)
    accelerator = run.accelerator
    start_step = run.start_step
    set_seed(cfg.seed)  # the same initial weights on every process; restore sets a resumed run's random states

    rank, world = accelerator.process_index, accelerator.num_processes
    for r in range(world):  # every process can tell, so all of them refuse together rather than wait
        if TokenDataset(data.train, rank=r, world_size=world).rows == 0:
            raise ConfigError(f"{data.train.rows} training grids cannot be shared among {world} processes")
    # Endless, epoch after epoch, so every process makes the same number of steps; a resumed run draws a new
    # order rather than replaying the first batches.
    dataset = TokenDataset(
        data.train,
        columns=data.columns,
        shuffle=True,
        seed=cfg.seed + start_step,
        rank=rank,
        world_size=world,
        repeat=True,
        views=draw_views,
    )
    train_loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )

    model = Prior(config).to(accelerator.device)
    optimizer = configure_optimizer(model, cfg)
    # The loader is not prepared: it is already split by process and endless on each. Nor is the schedule,
    # which accelerate would step once per process: it steps once per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    run.track(model=model, optimizer=optimizer)
    run.restore()
    scheduler = run.schedule(optimizer)
    # The grids this leg trains on: fewer than the datasets will hold where some are read in part (--partial).
    held_out = {"val_grids": data.val.rows} if data.val is not None else {}
    run.record(
        {"split": "train", "step": start_step, "grids": data.train.rows, **held_out, "unfinished": data.unfinished}
    )
    raw_model: Prior = accelerator.unwrap_model(model)

    def evaluate_and_record(step: int) -> dict:
        """Held-out bits per code with --val, a picture of samples with --tokenizer: either, both or neither."""
        metrics: dict = {}
        if data.val is not None:
            held_out = TokenDataset(data.val, columns=data.columns, rank=rank, world_size=world)
            loader = DataLoader(held_out, batch_size=cfg.batch_size, num_workers=min(cfg.num_workers, 1))
            with accelerator.autocast():
                nats, grids = held_out_nll(raw_model, loader, cond, accelerator.device)
            sums = accelerator.reduce(torch.tensor([nats, grids], dtype=torch.float64, device=accelerator.device))
            nats, grids = sums.tolist()
            codes = grids * config.length
            metrics = {"grids": int(grids), "nll": nats / codes, "bits_per_code": nats / codes / math.log(2)}
        if decoder is not None and accelerator.is_main_process:
            with accelerator.autocast():
                picture = f"samples/step-{step:06d}.png"
                run.save(picture, lambda path: save_sample_picture(raw_model, decoder, path, step, seed=cfg.seed))
        if metrics:
            run.record({"split": "val", "step": step, **metrics})
        return metrics

    progress = ProgressBar("prior fit", cfg.steps, start_step, enabled=show_progress and accelerator.is_main_process)
    loss_sum = torch.zeros((), device=accelerator.device)  # since the last log, kept on the device
    summed = 0
    codes_seen, started = 0, time.perf_counter()
    views_drawn: Counter[int] = Counter()  # this process's grids per view since it started
    last_metrics: dict = {}
    step = start_step
    model.train()
    with progress:
        batches = iter(train_loader)
        while step < cfg.steps:
            batch = next(batches)
            codes = batch["codes"].to(accelerator.device, non_blocking=True)  # (B, h, w)
            labels = batch[cond].to(accelerator.device) if cond else None  # (B,)
            if draw_views:
                views_drawn.update(batch["view"].tolist())
            with accelerator.accumulate(model):
                _, loss = model(codes, labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            summed += 1
            codes_seen += codes.numel() * world
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1

            if step % cfg.log_every == 0 or step == cfg.steps:
                nats = (loss_sum / summed).item()
                loss_sum.zero_()
                summed = 0
                rate = codes_seen / (time.perf_counter() - started)
                entry = {
                    "split": "train",
                    "step": step,
                    "loss": nats,
                    "bits_per_code": nats / math.log(2),
                    "lr": scheduler.get_last_lr()[0],
                    "codes_per_second": rate,
                }
                if draw_views:
                    entry["views_drawn"] = [views_drawn[i] for i in range(max(views_drawn) + 1)]
                run.record(entry)
                progress.update(status=f"{entry['bits_per_code']:.3f} bits/code  {rate:,.0f} codes/s")
            progress.update(step)

            last_metrics = run.periodic(step, evaluate_and_record) or last_metrics

    elapsed = time.perf_counter() - started
    # Every process must hold the same weights: the run records the evidence.
    last_metrics = run.finish(step, evaluate_and_record, "weights_digests", raw_model.model_id)
    model_dir = run.export(raw_model, "prior")
    rate = codes_seen / max(elapsed, 1e-9)
    return PriorFitResult(
        model_dir, step, start_step, rate, last_metrics, accelerator.is_main_process, data.train.rows, data.unfinished
    )


@torch.no_grad()
def held_out_nll(prior: Prior, loader, cond: str | None, device: torch.device) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, grids) of a loader's grids."""
    was_training = prior.training
    prior.eval()
    nats, grids = 0.0, 0
    for batch in loader:
        codes = batch["codes"].to(device)  # (B, h, w)
        labels = batch[cond].to(device) if cond else None
        nats -= prior.log_prob(codes, labels).double().sum().item()
        grids += len(codes)
    prior.train(was_training)
    return nats, grids


def tokenizer_of_tokens(path: str | Path, config: PriorConfig, storage_options: dict | None = None):
    """The tokenizer that made the tokens (or one that gives their codes), to decode samples with; ConfigError for
    another one."""
    from vqtok.tokenizers import load_tokenizer

    model = load_tokenizer(path, storage_options=storage_options)
    if not gives_codes({"model_id": config.tokenizer, "codes_id": config.codes_id}, model.model_id, model.codes_id):
        raise ConfigError(
            f"--tokenizer {path} is model {model.model_id}, but the tokens were made by model {config.tokenizer}"
        )
    return model


def sample_classes(classes: int) -> list[int | None]:
    """The classes the evaluation picture shows, one per row: up to PICTURE_CLASSES spread over all, or None."""
    if not classes:
        return [None]
    return sorted({round(i * (classes - 1) / max(1, PICTURE_CLASSES - 1)) for i in range(PICTURE_CLASSES)})


def sample_picture(rows: list[tuple[int | None, np.ndarray]], title: str) -> np.ndarray:
    """uint8 RGB pixels of sampled images, a row per class: rows are (class or None, uint8 (n, H, W, 3) images).

    Laid out as `vqtok eval`'s picture: each image enlarged by `tile_scale` into a tile of T = scale * H by
    scale * W pixels, n tiles to a row GAP pixels apart, a text band of BAND pixels above each row naming its
    class ("class 3", or "no class" for grids sampled without one), and a band at the top holding the title.
    So R rows make a picture BAND + R * (BAND + T) pixels high and n * scale * W + (n - 1) * GAP wide.
    """
    n, height, width = rows[0][1].shape[:3]
    scale = tile_scale(height, width)
    tile_h, tile_w = scale * height, scale * width
    full_width = n * (tile_w + GAP) - GAP
    pixels = np.zeros((BAND + len(rows) * (BAND + tile_h), full_width, 3), dtype=np.uint8)
    texts = [(0, 0, full_width, title)]  # (x, y, width, text): drawn once the tiles are in place
    y = BAND
    for label, images in rows:
        texts.append((0, y, full_width, "no class" if label is None else f"class {label}"))
        y += BAND
        for j, image in enumerate(images):
            x = j * (tile_w + GAP)
            pixels[y : y + tile_h, x : x + tile_w] = enlarge(image, scale)
        y += tile_h
    return draw_texts(pixels, texts)


def save_sample_picture(prior: Prior, tokenizer, path: Path, step: int, seed: int = 0) -> None:
    """Grids sampled from the prior at training step `step` (a row per class, PICTURE_SAMPLES each), decoded
    by the tokenizer, as a PNG (`sample_picture`)."""
    from PIL import Image

    rows = []
    generator = torch.Generator().manual_seed(seed)
    for label in sample_classes(prior.config.num_classes):
        codes = prior.sample(PICTURE_SAMPLES, cls=label, generator=generator)  # (n, h, w)
        images = tokenizer.decode(codes.to(tokenizer.device))  # (n, 3, H, W) in [0, 1]
        rows.append((label, images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample_picture(rows, f"samples at step {step:,}")).save(path)
