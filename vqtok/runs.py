"""The conventions every vqtok trainer follows, in one place: `vqtok fit` and `vqtok prior fit` both use them.

A run folder OUT holds:
    run.json                   the settings that make the run what it is; `--resume` with others is refused
    checkpoints/step-000500/   the training state (`vqtok.checkpoints`: safetensors and JSON), the last few kept
    metrics.jsonl              one JSON object per log or evaluation

A `Run` makes the accelerator the way accelerate's examples do (one CPU, one GPU, or many processes under
`accelerate launch`), checks OUT before anything is trained, restores the latest checkpoint on `--resume`,
saves checkpoints so that a resumed run never sees half of one, and records metrics from the main process.
What a checkpoint holds is what the trainer tracks by name (`Run.track`); the learning rate schedule is not
among it, since it is a function of the step (`Run.schedule`). A run may be resumed with another --steps: a
larger one trains a finished run further, and the schedule is then that of a run planned that long.

OUT may be a URL that fsspec opens (`s3://bucket/runs/x`). Checkpoints are written into a local folder, so the
run is staged in a local temporary folder (under TMPDIR, one per process: machines need not share a disk,
removed when the run ends) and each file uploaded once written: a checkpoint's files by the process that wrote
them, then, when every process is done, `checkpoints/step-N/_COMPLETE` by the main process. A checkpoint without
that object is half-uploaded and never resumed from; `--resume` downloads the latest complete one into the stage.
metrics.jsonl is kept in the stage and uploaded whole after each record (an object cannot be appended to).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from vqtok import checkpoints
from vqtok.checkpoints import COMPLETE_NAME
from vqtok.config import TrainConfig
from vqtok.distributed import is_main_process, launched
from vqtok.errors import ConfigError
from vqtok.pretrained import RUN_MODEL_NAME
from vqtok.storage import Location

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
# The settings tables of the model a run trains, whose fields options set by the fields' own names (--code-dim sets
# quantizer.code_dim): a change is named so. Another table's is named after it (a fine-tune's parent.model_id).
MODEL_TABLES = ("model", "prior")


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up over `config.warmup` steps, then cosine decay to min_lr_ratio of the peak at config.steps."""
    warmup = config.warmup

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


def latest_complete_checkpoint(out: Location) -> tuple[Location, int] | None:
    """The latest checkpoint of a run in a store that has its _COMPLETE marker."""
    checkpoints = out.join("checkpoints")
    steps = sorted(
        ((int(m.group(1)), name) for name in checkpoints.names() if (m := CHECKPOINT_PATTERN.match(name))),
        reverse=True,
    )
    for step, name in steps:
        if checkpoints.join(name, COMPLETE_NAME).exists():
            return checkpoints.join(name), step
    return None


def changed_settings(ours: dict, theirs: dict) -> list[str]:
    """The names of the settings whose values differ, a nested table's as `quantizer.code_dim`, sorted."""
    changed = []
    for name in sorted(ours.keys() | theirs.keys()):
        mine, other = ours.get(name), theirs.get(name)
        if isinstance(mine, dict) and isinstance(other, dict):
            changed += [f"{name}.{inner}" for inner in changed_settings(mine, other)]
        elif mine != other:
            changed.append(name)
    return changed


def check_run_settings(
    path: Path | Location, settings: dict, resumed_step: int | None, added: dict | None = None
) -> None:
    """A resumed run (from the checkpoint of `resumed_step`; None for a new run) must be the run it resumes:
    `settings` ({"model": {...}, "steps": N, "parent": {...} or None, ...}) decide that, except for its length.
    "steps" may change, to any number not below the step resumed from; run.json then records the new one.
    `added` holds the settings that run.json files written before they were recorded lack, each with the value
    such a run was trained with."""
    path = Location.of(path)
    saved_text = path.read_text(missing_ok=True) if resumed_step is not None else None
    if saved_text is not None:
        saved = {**(added or {}), **json.loads(saved_text)}
        changed = []
        for name, value in settings.items():
            if name == "steps":
                continue
            other = saved.get(name)
            if isinstance(value, dict) and isinstance(other, dict):
                prefix = "" if name in MODEL_TABLES else f"{name}."
                changed += [prefix + inner for inner in changed_settings(value, other)]
            elif other != value:
                changed.append(name)
        if changed:
            raise ConfigError(f"--resume with other settings than {path} records: {', '.join(changed)} changed")
    if resumed_step is not None and settings["steps"] < resumed_step:
        raise ConfigError(
            f"--steps {settings['steps']} is below step {resumed_step}, the checkpoint --resume continues from: "
            f"pass --steps {resumed_step} or more"
        )
    if is_main_process():  # other processes may be reading it: replace it whole
        path.write_bytes((json.dumps(settings, indent=2) + "\n").encode())


class Run:
    """One training run in OUT: its accelerator, where it starts, its checkpoints and its metrics."""

    def __init__(
        self,
        out: str | Path,
        settings: dict,
        train: TrainConfig,
        resume: bool = False,
        storage_options: dict | None = None,
        added: dict | None = None,
    ) -> None:
        """`added`: the settings that older run.json files lack, with the value they meant (`check_run_settings`)."""
        from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
        from accelerate.utils import ProjectConfiguration

        self.location = Location.of(out, storage_options)
        self.remote = not self.location.local
        self.train = train
        if self.remote:
            self.checkpoint = latest_complete_checkpoint(self.location) if resume else None
            started = bool(self.location.join("checkpoints").names())
        else:
            self.checkpoint = latest_checkpoint(Path(self.location.path)) if resume else None
            checkpoints = Path(self.location.path) / "checkpoints"
            started = checkpoints.is_dir() and any(checkpoints.iterdir())
        if not resume and started:
            raise ConfigError(
                f"{self.location} already holds checkpoints: pass --resume to continue, or choose another --out"
            )
        self.start_step = self.checkpoint[1] if self.checkpoint else 0
        resumed_step = self.start_step if self.checkpoint else None
        check_run_settings(self.location.join("run.json"), settings, resumed_step, added)
        self.tracked: dict = {}  # what a checkpoint holds, by name (`track`)
        # Where checkpoints are written: OUT itself on a local disk, a local stage for a run in a store. The stage is
        # made only once the run is accepted, and is removed by `end`, or at exit when the run fails before it.
        self.stage = None
        if self.remote:
            self.stage = tempfile.TemporaryDirectory(prefix="vqtok-run-", ignore_cleanup_errors=True)
        self.out = Path(self.stage.name) if self.stage else Path(self.location.path)

        # Several processes and no GPU (torchrun, or `accelerate launch --multi_gpu` on a CPU machine):
        # accelerate only sets up its gloo process group when told it runs on the CPU.
        cpu_processes = not torch.cuda.is_available() and launched()
        mixed_precision = train.mixed_precision
        if mixed_precision == "auto":
            mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(
            cpu=cpu_processes,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=train.grad_accum_steps,
            log_with=train.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            # Each process reads its own part of the data, so nothing is dispatched from rank 0.
            dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
            # Models that need their buffers synced do it themselves (the quantizer); DDP's per-step buffer
            # broadcast would only repeat that.
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        if train.report_to:
            self.accelerator.init_trackers("vqtok", config={**settings, **train.to_dict()})
        self.metrics_path = self.out / "metrics.jsonl"  # out exists: check_run_settings wrote run.json into it
        if self.remote and self.is_main_process:  # records are appended to what the run's earlier legs wrote
            earlier = self.location.join("metrics.jsonl").read_bytes(missing_ok=True)
            if earlier is not None:
                self.metrics_path.write_bytes(earlier)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def track(self, **objects) -> None:
        """After `prepare`: what every checkpoint holds and `restore` restores, by name (model=..., optimizer=...).
        Modules are saved unwrapped; anything else needs state_dict and load_state_dict, with a state of
        tensors and plain values. fp16 mixed precision's gradient scaler is tracked too, as "scaler"."""
        for name, obj in objects.items():
            self.tracked[name] = self.accelerator.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj
        if self.accelerator.scaler is not None:
            self.tracked["scaler"] = self.accelerator.scaler

    def restore(self) -> None:
        """After `track`: load the checkpoint resumed from, refusing one that is not vqtok's (`vqtok.checkpoints`).
        In a store it is downloaded into the stage first, which never writes outside it (`Location.download`)."""
        if self.checkpoint:
            accelerator = self.accelerator
            source, step = self.checkpoint
            folder = self.out / "checkpoints" / source.name if self.remote else source
            try:
                if self.remote:
                    source.download(folder)
                exact = checkpoints.load(
                    folder, step, self.tracked, accelerator.process_index, accelerator.num_processes, str(source)
                )
            finally:
                if self.remote:
                    shutil.rmtree(folder, ignore_errors=True)
            if not exact:
                accelerator.print(
                    f"{source} was written by another number of processes than {accelerator.num_processes}: "
                    "its random states are not restored"
                )
        self.record({"split": "train", "step": self.start_step, "resumed_from": self.resumed_from})

    def schedule(self, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """After `restore`: optimizer's learning rate schedule (`lr_lambda`), stepped once per optimizer step. It
        is not checkpointed: given the peak (each param group's initial_lr, which the optimizer's state keeps)
        it is a function of the step, so it is built at the step the run starts from, for this run's --steps. A
        run resumed with a longer --steps thus has, from there on, the learning rate of a run planned that long."""
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, lr_lambda(self.train), last_epoch=self.start_step - 1)

    @property
    def resumed_from(self) -> str | None:
        return str(self.checkpoint[0]) if self.checkpoint else None

    def record(self, entry: dict) -> None:
        """Append entry ({"split", "step", ...}) to metrics.jsonl and send its numbers to the trackers."""
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.remote:
                self.location.join("metrics.jsonl").upload(self.metrics_path)
        scalars = {f"{entry['split']}/{k}": v for k, v in entry.items() if isinstance(v, int | float)}
        self.accelerator.log(scalars, step=entry["step"])

    def save(self, name: str, write: Callable[[Path], object]) -> None:
        """A file of the run (`samples/step-000500.png`) that write(path) makes, in OUT; from the main process."""
        path = self.out.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        if self.remote and path.exists():
            self.location.join(name).upload(path)
            path.unlink()

    def _write_checkpoint(self, folder: Path, step: int) -> None:
        """The main process's shared state and every process's own random states into folder."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            checkpoints.save_shared(folder, step, self.tracked, accelerator.num_processes)
        checkpoints.save_random_state(folder, accelerator.process_index)

    def save_checkpoint(self, step: int) -> None:
        """The tracked state into a temporary folder, renamed when every process is done: resume never sees half
        of one. In a store: uploaded, then marked complete by the main process once every process has uploaded."""
        if self.remote:
            self._save_remote_checkpoint(step)
            return
        accelerator = self.accelerator
        final = self.out / "checkpoints" / f"step-{step:06d}"
        if final.exists():
            return
        partial = final.with_name(final.name + ".partial")
        if accelerator.is_main_process:  # every process writes its own random states into it
            partial.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        self._write_checkpoint(partial, step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            partial.rename(final)
            keep = self.train.keep_checkpoints
            if keep:
                found = sorted(
                    (int(m.group(1)), p) for p in final.parent.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
                )
                for _, path in found[:-keep]:
                    shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()

    def periodic(self, step: int, evaluate: Callable[[int], dict]) -> dict | None:
        """After optimizer step `step`: a checkpoint every save_every steps and an evaluation every eval_every,
        except at the last step, which `finish` saves and evaluates. Returns the evaluation's metrics, if any."""
        if step >= self.train.steps:
            return None
        if step % self.train.save_every == 0:
            self.save_checkpoint(step)
        return evaluate(step) if step % self.train.eval_every == 0 else None

    def finish(self, step: int, evaluate: Callable[[int], dict], name: str, digest: str) -> dict:
        """The last checkpoint and evaluation, then the evidence that every process ends with the same model:
        each one's `digest` (a hash of what must agree) recorded under `name`; RuntimeError if they differ.
        Returns the evaluation's metrics."""
        from accelerate.utils import gather_object

        self.save_checkpoint(step)
        metrics = evaluate(step)
        digests = gather_object([digest])
        self.record({"split": "train", "step": step, "processes": self.accelerator.num_processes, name: digests})
        if len(set(digests)) != 1:
            raise RuntimeError(f"processes ended with different {name}: {digests}")
        return metrics

    def export(self, model, what: str = "model", then: Callable[[Location], object] | None = None) -> Path | str:
        """The main process saves model (save_pretrained) into OUT/model, and calls `then` with that directory to
        add what goes with the model; then the run ends. Returns the model directory: a Path, or the URL for a run
        in a store."""
        directory = self.location.join(RUN_MODEL_NAME)
        if self.accelerator.is_main_process:
            model.save_pretrained(directory)
            if then is not None:
                then(directory)
            self.accelerator.print(f"exported {what} to {directory}")
        self.end()
        return Path(directory.path) if directory.local else directory.url

    def _save_remote_checkpoint(self, step: int) -> None:
        accelerator = self.accelerator
        checkpoints = self.location.join("checkpoints")
        final = checkpoints.join(f"step-{step:06d}")
        if final.join(COMPLETE_NAME).exists():
            return
        staged = self.out / "checkpoints" / final.name
        staged.mkdir(parents=True, exist_ok=True)  # on every process: each stages its own random states
        accelerator.wait_for_everyone()
        self._write_checkpoint(staged, step)
        for file in sorted(p for p in staged.rglob("*") if p.is_file()):  # what this process wrote
            final.join(*file.relative_to(staged).parts).upload(file)
        shutil.rmtree(staged, ignore_errors=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final.join(COMPLETE_NAME).write_bytes(json.dumps({"step": step}).encode())
            keep = self.train.keep_checkpoints
            if keep:
                found = sorted(
                    (int(m.group(1)), name) for name in checkpoints.names() if (m := CHECKPOINT_PATTERN.match(name))
                )
                for _, name in found[:-keep]:
                    checkpoints.join(name, COMPLETE_NAME).remove()  # no longer resumed from, then removed
                    checkpoints.join(name).remove_tree()
        accelerator.wait_for_everyone()

    def end(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.stage:  # everything in it has been uploaded
            self.stage.cleanup()
