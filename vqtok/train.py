"""`fit`: train a tokenizer (the VQ-VAE, or the VQGAN network) on images with Hugging Face accelerate.

The loop follows accelerate's own examples: accelerator, trackers, data,
model, optimizer, one `prepare`, then `accumulate` / `backward` steps; its
checkpoints are vqtok's own (`vqtok.checkpoints`, which says why not
accelerate's `save_state`). It runs the same on one CPU, one GPU or many
processes under `accelerate launch`.

What the run minimises is an `ObjectiveConfig` (`vqtok.tokenizers.losses.Objective`): by default vqtok's pixel MSE
and quantizer loss; a recipe's [objective] adds LPIPS (`vqtok.tokenizers.perceptual.load_lpips`, frozen, in
neither checkpoints nor the exported model), taming's PatchGAN discriminator with its own Adam (the generator's
learning rate, betas, clipping and schedule, as taming's and LlamaGen's), and the codebook-usage entropy loss.
Each step, inside `accelerator.accumulate`: the tokenizer's forward gives what the objective needs (the
decoder's output, and the distances to the codes for the entropy loss) so that DDP syncs every gradient;
the generator loss, backward, clip, step; then the discriminator's loss on the detached reconstructions,
backward, its gradients averaged over processes, clip, step. With [train] ema_decay, a moving average of
the weights (`WeightsEMA`) is what evaluations and the export see.

Resuming restores every tracked state (model, optimizer, the objective's discriminator and LeCAM averages, the
discriminator's optimizer, the EMA, the random states). By default a resumed run draws new crops (the data
stream is seeded by the step it resumes from); with `exact_resume` it draws the run's own stream again and
discards the batches already trained on, so that it ends with the weights of the run it continues, bit for
bit (on the CPU, with as many processes and --num-workers), at the cost of decoding those images once more.

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

import contextlib
import copy
import dataclasses
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from vqtok.checkpoints import random_state, set_random_state
from vqtok.config import TRAIN_PARTS, ModelConfig, ObjectiveConfig, TrainConfig, VQGANConfig, fine_tune_config
from vqtok.data import expand_inputs, make_loader
from vqtok.errors import ConfigError, plural
from vqtok.evaluate import evaluate
from vqtok.pretrained import weights_hash
from vqtok.progress import ProgressBar
from vqtok.runs import Run
from vqtok.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from vqtok.tokenizers.discriminator_file import read_discriminator, save_discriminator
from vqtok.tokenizers.losses import Objective
from vqtok.tokenizers.perceptual import load_lpips

# The objective's terms the progress bar shows, beside the reconstruction and quantizer losses: log name -> label.
TERMS_SHOWN = {"perceptual": "lpips", "g_loss": "g", "d_loss": "d"}
# What run.json files written before the objective and the EMA were recorded were trained with: the pixel MSE and
# quantizer loss, today's defaults, and no EMA.
ADDED_RUN_SETTINGS = {"objective": ObjectiveConfig().to_dict(), "ema_decay": None}


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


def status_line(entry: dict, usage_window: int) -> str:
    """The progress bar's status from a training log entry: the reconstruction and quantizer losses, the codebook
    usage over the quantizer's last batches, the pace. Where the objective has LPIPS or a discriminator, their
    terms take the quantizer loss's place and usage is said in short, so that the bar still fits 80 columns
    (metrics.jsonl holds every term)."""
    extra = [f"{label} {entry[name]:.3f}" for name, label in TERMS_SHOWN.items() if name in entry]
    parts = [f"recon {entry['recon_loss']:.4f}", *(extra or [f"vq {entry['vq_loss']:.4f}"])]
    if "usage" in entry:
        usage = f"{entry['usage']:.0%}"
        parts.append(f"usage {usage}" if extra else f"train usage (last {usage_window} batches) {usage}")
    return "  ".join([*parts, f"{entry['images_per_second']:.0f} img/s"])


def parent_record(parent: Tokenizer, init: str, train: str) -> dict:
    """What a fine-tune records of the model it started from: where it was (`init` as given), its identity, what
    the run trains of it, and the parent's own provenance (an imported model's source, a fine-tune's parent)."""
    record = {"path": init, "model_id": parent.model_id, "codes_id": parent.codes_id, "trained": train}
    if parent.source:
        record["source"] = parent.source
    if parent.parent:
        record["parent"] = parent.parent
    return record


def parent_discriminator(
    init: str, objective: ObjectiveConfig, in_channels: int, storage_options: dict | None
) -> dict[str, torch.Tensor] | None:
    """The state dict of the discriminator that --init's directory keeps (`read_discriminator`), to warm-start the
    run's with; None where it keeps none. ConfigError where it is not the PatchGAN the objective asks for."""
    found = read_discriminator(init, storage_options)
    if found is None:
        return None
    shape, state = found
    wanted = {"in_channels": in_channels, "filters": objective.disc_filters, "layers": objective.disc_layers}
    if shape != wanted:
        raise ConfigError(
            f"--init {init} keeps a discriminator of {shape['layers']} {plural(shape['layers'], 'layer')} and "
            f"{shape['filters']} filters, the objective's has {wanted['layers']} and {wanted['filters']}: set "
            f"disc_layers = {shape['layers']} and disc_filters = {shape['filters']} in [objective] to start from it"
        )
    return state


class WeightsEMA:
    """An exponential moving average of a tokenizer's weights, as Open-MAGVIT2 keeps and exports one: after each
    optimizer step every trainable parameter's average moves towards it by 1 - d, where d is LitEma's
    (taming's `LitEma`, which Open-MAGVIT2 uses) warm-up of the decay, min(decay, (1 + n) / (10 + n)) at the n-th
    update, so that the first averages are not held at the initial weights for thousands of steps. Buffers (a
    moving-average codebook, which is an average already, and the quantizer's counters) and frozen parameters
    are copied. `model` is a whole tokenizer in eval mode, which evaluations and the export take as it is."""

    def __init__(self, model: Tokenizer, decay: float) -> None:
        # Copied before accelerate prepares the model: under mixed precision prepare replaces its forward by one
        # bound to the model itself, which a later copy would call.
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: Tokenizer) -> None:
        """After an optimizer step of `model` (unwrapped)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        averages, targets = [], []
        for name, average in self.model.named_parameters():
            if params[name].requires_grad:
                averages.append(average)
                targets.append(params[name])
            else:
                average.copy_(params[name])
        torch._foreach_lerp_(averages, targets, 1 - decay)  # average += (1 - d) * (param - average), all at once
        for name, buffer in self.model.named_buffers():
            buffer.copy_(buffers[name])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


@contextlib.contextmanager
def frozen(module: torch.nn.Module | None):
    """module's parameters out of the graph while the block runs. The generator's loss goes through the
    discriminator, and would leave gradients in its parameters: zeroing them before its own backward, as taming
    and LlamaGen do, would also zero what earlier micro-batches of a gradient accumulation left there."""
    if module is None:
        yield
        return
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def average_gradients(module: torch.nn.Module, accelerator) -> None:
    """Average module's gradients over the processes, in one all-reduce, as DDP would. The discriminator is not
    wrapped in DDP: it runs three times before its backward (on the reconstructions for the generator's loss,
    then on real and on fake images for its own), and DDP allows one forward per backward. One forward over real
    and fake images together would let DDP wrap it, but BatchNorm would then normalise the two as one batch,
    where taming normalises each apart."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for grad, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(averaged.view_as(grad))


def clip_gradients(accelerator, optimizer, parameters, max_norm: float) -> None:
    """Clip the gradients of `optimizer`'s parameters. Not accelerator.clip_grad_norm_, which under fp16 unscales
    the gradients of every prepared optimizer: the generator's clipping would unscale the discriminator's before
    its backward, and the discriminator's clipping would then be refused by the gradient scaler."""
    accelerator.unscale_gradients(optimizer)  # a no-op without fp16's gradient scaler
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@contextlib.contextmanager
def random_states_kept():
    """Every random state (Python's, NumPy's, torch's) as it was before the block: an evaluation draws from them
    (a DataLoader takes its workers' seed from torch's), and a run resumed from a step's checkpoint, which does
    not repeat that step's evaluation, must draw as the run it continues does."""
    state = random_state()
    try:
        yield
    finally:
        set_random_state(state)


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
    objective: ObjectiveConfig | None = None,
    vgg16_weights: str | os.PathLike | None = None,
    lpips_weights: str | os.PathLike | None = None,
    exact_resume: bool = False,
) -> FitResult:
    """Train a tokenizer on `shards` into the run folder `out`. With `init` (a model directory, a path or a URL) the
    run fine-tunes it: `model_config` is then None (the parent's) or the parent's with what FINE_TUNABLE allows
    changed. `train` ("all" or "decoder") says which weights train. `objective` is what it minimises (None: the
    default ObjectiveConfig); LPIPS's two weights files are found where they usually lie unless named.
    `exact_resume` (with `resume`) replays the data stream so that the run ends as if never interrupted."""
    from accelerate.utils import set_seed

    cfg = train_config
    objective_config = objective or ObjectiveConfig()
    if train not in TRAIN_PARTS:
        raise ConfigError(f"train must be one of {', '.join(TRAIN_PARTS)}, not {train!r}")
    if train != "all" and init is None:
        raise ConfigError(f"--train {train} fine-tunes a model: give the one to start from with --init")
    if train == "decoder" and objective_config.entropy_weight > 0:
        raise ConfigError(
            "--train decoder freezes the encoder and the codebook, which the entropy loss trains: set "
            "entropy_weight to 0"
        )
    if exact_resume and not resume:
        raise ConfigError("--exact-resume says how to resume: pass --resume with it")
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
    # Each strided layer halves the crop, and the two 4x4 layers after them need 3 pixels left to give a logit.
    smallest = 3 * 2**objective_config.disc_layers
    if objective_config.adversarial and model_config.image_size < smallest:
        raise ConfigError(
            f"disc_layers {objective_config.disc_layers} make a PatchGAN for crops of {smallest} px or more, not "
            f"{model_config.image_size}: lower disc_layers or raise --image-size"
        )
    record_of_parent = parent_record(parent, str(init), train) if parent is not None else None
    warm_discriminator = None
    if parent is not None and objective_config.adversarial:
        warm_discriminator = parent_discriminator(init, objective_config, model_config.in_channels, storage_options)
        if warm_discriminator is not None:
            record_of_parent["discriminator_id"] = weights_hash(warm_discriminator)
    # Read before the run folder is touched: a missing weights file is refused before anything is trained.
    perceptual = load_lpips(vgg16_weights, lpips_weights) if objective_config.perceptual_weight > 0 else None
    # "parent" is None for a new model, so resuming a fine-tune without its --init (or the other way round) is refused
    settings = {
        "model": model_config.to_dict(),
        "steps": cfg.steps,
        "parent": record_of_parent,
        "objective": objective_config.to_dict(),
        "ema_decay": cfg.ema_decay,
    }
    run = Run(out, settings, cfg, resume=resume, storage_options=storage_options, added=ADDED_RUN_SETTINGS)
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
        # a resumed run draws new crops rather than replaying the first ones, unless it replays them exactly
        seed=cfg.seed if exact_resume else cfg.seed + start_step,
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
    objective_module = Objective(objective_config, model_config.in_channels).to(accelerator.device)
    discriminator = objective_module.discriminator
    if warm_discriminator is not None:  # before its optimizer is made; a resumed run's checkpoint then replaces it
        discriminator.load_state_dict(warm_discriminator)
        del warm_discriminator
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    ema = WeightsEMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas)
    # The loader is not prepared: its stream is already split by process and endless on each. Nor are the
    # schedules, which accelerate would step once per process: each steps once per optimizer step. Nor is the
    # discriminator (`average_gradients` says why); its optimizer is, for mixed precision's gradient scaler.
    tracked = {}
    if discriminator is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=cfg.betas)
        model, optimizer, disc_optimizer = accelerator.prepare(model, optimizer, disc_optimizer)
        tracked.update(objective=objective_module, disc_optimizer=disc_optimizer)  # its state: D and LeCAM's
    if ema is not None:
        tracked["ema"] = ema
    run.track(model=model, optimizer=optimizer, **tracked)
    # The loader's iterator draws its workers' seed from torch's generator as it is made: made before restore, so
    # that a resumed run's generator is the checkpoint's from here on, as the uninterrupted run's was.
    batches = iter(train_loader)
    run.restore()
    schedulers = [run.schedule(optimizer)]
    if discriminator is not None:
        schedulers.append(run.schedule(disc_optimizer))
    raw_model: Tokenizer = accelerator.unwrap_model(model)
    exported = ema.model if ema is not None else raw_model  # what evaluations measure and the run exports
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
        with random_states_kept():
            report = evaluate(exported, loader)
        if accelerator.is_main_process:
            run.save(f"samples/step-{step:06d}.png", report.save_picture)
        metrics = report.metrics()
        record({"split": "val", "step": step, **metrics})
        return metrics

    progress = ProgressBar("fit", cfg.steps, start_step, enabled=show_progress and accelerator.is_main_process)
    # Each logged term's sum since the last log, kept on the device, and how many micro-batches gave it (the
    # adversarial terms only from disc_start on). Under l2 the objective's pixel term is recon_loss itself.
    sums: dict[str, torch.Tensor] = {}
    counts: Counter[str] = Counter()
    unlogged = {"quantizer", "loss"} | ({"pixel"} if objective_config.pixel_loss == "l2" else set())
    images_seen, started = 0, time.perf_counter()
    # The loop's time waiting for the loader since the last log: a share near 1 says the decoding workers, not
    # the model, set the pace (on a GPU, time the model's queued work has not caught up on counts as model time).
    waited, window_started = 0.0, started
    last_metrics: dict = {}
    step = start_step
    needs_distances = objective_config.entropy_weight > 0
    model.train()
    objective_module.train()
    with progress:
        if exact_resume and start_step:
            # The stream cannot be sought: draw again, and discard, the batches the run has trained on. Their
            # images are decoded and cropped once more (the cost: as long as the loader took to give them); the
            # model does nothing with them.
            replayed, replay_started = start_step * cfg.grad_accum_steps, time.perf_counter()
            progress.update(status=f"replaying the {replayed:,} batches steps 1-{start_step:,} trained on")
            for _ in range(replayed):
                next(batches)
            seconds = time.perf_counter() - replay_started
            record({"split": "train", "step": start_step, "replayed_batches": replayed, "replay_seconds": seconds})
            started = window_started = time.perf_counter()
        while step < cfg.steps:
            fetching = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - fetching
            images = batch.images.to(accelerator.device, non_blocking=True)
            images = images.float().div_(255).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
            x = images * 2 - 1  # in [-1, 1], as the objective compares them
            with accelerator.accumulate(model):
                output = model(images, distances=needs_distances)
                # step: the optimizer steps taken before this one, taming's global_step, which disc_start counts
                with accelerator.autocast(), frozen(discriminator):
                    loss, logs = objective_module.generator_loss(
                        x, output.decoded, output.vq_loss, output.distances, raw_model.last_layer(), step, perceptual
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip:
                    clip_gradients(accelerator, optimizer, model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if discriminator is not None:
                    with accelerator.autocast():
                        d_loss, d_logs = objective_module.discriminator_loss(x, output.decoded.detach(), step)
                    accelerator.backward(d_loss)
                    if accelerator.sync_gradients:
                        average_gradients(discriminator, accelerator)
                        if cfg.grad_clip:
                            clip_gradients(accelerator, disc_optimizer, discriminator.parameters(), cfg.grad_clip)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
                    logs.update(d_logs)
            terms = {"loss": logs["loss"], "recon_loss": output.recon_loss.detach(), "vq_loss": logs["quantizer"]}
            terms.update((name, value) for name, value in logs.items() if name not in unlogged)
            for name, value in terms.items():
                sums[name] = sums[name] + value if name in sums else value
                counts[name] += 1
            images_seen += images.shape[0] * world
            if not accelerator.sync_gradients:
                continue
            for scheduler in schedulers:
                scheduler.step()
            step += 1
            if ema is not None:
                ema.update(raw_model)

            if step % cfg.log_every == 0 or step == cfg.steps:
                names = list(sums)
                device = accelerator.device  # d_weight is a number without the adaptive weight
                means = torch.stack(
                    [torch.as_tensor(sums[n], dtype=torch.float32, device=device) / counts[n] for n in names]
                )
                entry = {"split": "train", "step": step, **dict(zip(names, means.tolist(), strict=True))}
                sums.clear()
                counts.clear()
                now = time.perf_counter()
                data_wait = waited / (now - window_started)
                waited, window_started = 0.0, now
                entry.update(
                    lr=schedulers[0].get_last_lr()[0],
                    images_per_second=images_seen / (now - started),
                    data_wait=data_wait,
                )
                # The quantizer's usage over its last batches, not the held-out usage fit reports at its end. A
                # frozen quantizer counts nothing: its counters are still the parent's.
                if not raw_model.encode_side_frozen:
                    entry["usage"] = raw_model.quantizer.usage()
                    entry["perplexity"] = raw_model.quantizer.recent_perplexity()
                record(entry)
                progress.update(status=status_line(entry, raw_model.quantizer.usage_window))
            progress.update(step)

            last_metrics = run.periodic(step, evaluate_and_record) or last_metrics

    elapsed = time.perf_counter() - started
    # Every process must hold the same codebook: the run records the evidence.
    last_metrics = run.finish(step, evaluate_and_record, "codebook_digests", codebook_digest(exported))

    # The discriminator goes with the model, so that a fine-tune of it starts the adversarial game where this one
    # left it.
    def keep_discriminator(directory) -> None:
        if discriminator is not None:
            save_discriminator(directory, discriminator)

    model_dir = run.export(exported, then=keep_discriminator)
    rate = images_seen / max(elapsed, 1e-9)
    return FitResult(model_dir, step, start_step, rate, last_metrics, accelerator.is_main_process)
