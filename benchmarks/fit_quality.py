"""Quality at equal budget, cross-validated over folds and seeds: `vqtok fit` against vector-quantize-pytorch's
quantizers in two networks, on photographs held out from training.

Twenty photographs (eighteen from scikit-image, two from scikit-learn) are split into four groups. Fold f
trains on 32x32 crops of the fifteen photographs outside group f (400 per photograph) and is evaluated on
2,000 crops of group f's five (400 per photograph), so every photograph is held out once. Every side trains
for the same steps and batch at the same width: an 8x8 grid, K = 512 (`--codebook-size`), D = 64, 128
hidden channels, 2,000 steps of batch 64; each fold is run with each of `--seeds`.

The references (`--references`), each vector-quantize-pytorch around vqtok's encoder and decoder:
- paper: `VectorQuantize` (EMA, k-means start, dead codes restarted) in the paper's network (residual blocks
  as wide as the hidden channels), Adam 2e-4;
- light: the same in residual blocks 32 wide, Adam 2e-4: the stronger peer;
- fsq: `FSQ` in the light network, Adam 1e-3, levels [8, 5, 5, 5] (1,000 codes) for K up to 1,024 and
  [8, 8, 8, 6, 5] (15,360 codes) above (`--fsq-levels`); its K is the product of its levels.

vqtok is timed as the whole `vqtok fit` command (start-up, shard reading, checkpoints and its evaluation
included), and its figures are the ones that command reports for `--val` (`vqtok.evaluate`). A reference is
timed as its training loop over tensors already in memory, and evaluated by the same `vqtok.evaluate` on the
same crops (usage: the share of its K codes, FSQ's implicit ones included, seen on the held-out crops).
`--seconds N` gives vqtok a wall-time budget instead of `--steps`: a short probe fit measures the seconds per
step and the fixed cost of the command, and the fit runs the steps that fill N (the learning-rate schedule
needs its length in advance, so the budget is spent as steps, and the record keeps both). `--equal-time`
compares settings at equal wall time: the first `--fit-args` runs `--steps`, every other the steps that take
as long, by a probe fit of each setting. The probes are kept in `--results` and reused on the same machine
and thread count, so every fold and seed gets the same steps; make them on a quiet machine.

Each run appends a line to `--results` (benchmarks/results/fit_quality.jsonl, kept in the repository, so runs
made in other sessions and on other machines add up); the table matches vqtok's runs with the references' of
the same fold, seed, K, steps and crops, the latest of each, so the parts can be run apart:

    pip install -e '.[bench]'
    python benchmarks/fit_quality.py                                       # 4 folds x 2 seeds, every side
    python benchmarks/fit_quality.py --folds 0 --seeds 1 --runs vqtok --fit-args "--decay 0.95"
    python benchmarks/fit_quality.py --runs light,fsq --folds 2,3
    python benchmarks/fit_quality.py --runs vqtok --seconds 500 --fit-args "--res-channels 128"
    python benchmarks/fit_quality.py --runs vqtok --equal-time --fit-args "" --fit-args "--res-channels 128"
    python benchmarks/fit_quality.py --codebook-size 8192 --folds 0,2 --seeds 0
    python benchmarks/fit_quality.py --table-only                          # the table of runs made before
    python benchmarks/fit_quality.py --table-only --fit-args "" --fit-args "--res-channels 64"   # side by side
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vqtok.data import Batch
from vqtok.demo import photo, scaled
from vqtok.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent
# chelsea and cat are one photograph, and so are the two stereo_motorcycle views: each appears once.
GROUPS = (
    ("astronaut", "hubble_deep_field", "flower", "camera", "gravel"),
    ("chelsea", "immunohistochemistry", "stereo_motorcycle", "clock", "grass"),
    ("coffee", "retina", "coins", "page", "brick"),
    ("rocket", "china", "cell", "moon", "text"),
)
SIZE, D, HIDDEN, BATCH = 32, 64, 128, 64
TIME_LIMIT = 1.25  # the whole `vqtok fit` command against a reference's training loop, at most


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8, shorter side 160 px (as `vqtok demo`'s photographs)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(scaled(Image.fromarray(load_sample_image(f"{name}.jpg"))))
    if name == "stereo_motorcycle":
        import skimage.data

        return np.asarray(scaled(Image.fromarray(skimage.data.stereo_motorcycle()[0])))  # the left view
    return np.asarray(photo(name))


def crops(names, per_photo: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        pixels = load_photo(name)
        for _ in range(per_photo):
            y = rng.integers(0, pixels.shape[0] - SIZE + 1)
            x = rng.integers(0, pixels.shape[1] - SIZE + 1)
            out.append(pixels[y : y + SIZE, x : x + SIZE])
    return np.stack(out)  # (N, 32, 32, 3) uint8


def write_shard(path: Path, images: np.ndarray, prefix: str) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i, pixels in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            sink.write({"__key__": f"{prefix}{i:06d}", "png": buffer.getvalue()})


class Fold:
    """Fold f's crops: training crops of the other groups, held-out crops of group f, as shards and tensors."""

    def __init__(self, index: int, folder: Path, train_crops: int, held_out_crops: int) -> None:
        self.index = index
        self.held_out_photos = GROUPS[index]
        self.train_photos = [name for i, group in enumerate(GROUPS) if i != index for name in group]
        folder.mkdir(parents=True, exist_ok=True)
        self.train_shard, self.held_out_shard = folder / "train.tar", folder / "held-out.tar"
        self.train_pixels = crops(self.train_photos, train_crops, seed=0)
        self.held_out_pixels = crops(self.held_out_photos, held_out_crops, seed=1)
        write_shard(self.train_shard, self.train_pixels, "train")
        write_shard(self.held_out_shard, self.held_out_pixels, "held")

    def held_out_batches(self) -> list[Batch]:
        pixels = torch.from_numpy(self.held_out_pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
        return [
            Batch(chunk, [f"held{start + i:06d}" for i in range(len(chunk))], ["held-out"] * len(chunk), [])
            for start, chunk in ((s, pixels[s : s + 256]) for s in range(0, len(pixels), 256))
        ]


@dataclasses.dataclass(frozen=True)
class Peer:
    """A reference: vector-quantize-pytorch's quantizer in vqtok's encoder and decoder, with its own optimizer."""

    quantizer: str  # "VectorQuantize" or "FSQ"
    res_channels: int | None  # the width inside the residual blocks; None: as wide as the hidden channels
    lr: float

    @property
    def network(self) -> dict:
        """The ModelConfig fields beside the shared width, stated even where they are vqtok's defaults: the
        defaults move (res_channels became 32), a reference must not move with them."""
        return {"res_channels": self.res_channels}

    def label(self, levels: list[int]) -> str:
        """What a stored run must match: a change to the peer's recipe starts a new series."""
        name = self.quantizer + (f" levels={','.join(map(str, levels))}" if self.quantizer == "FSQ" else "")
        return f"{name}, residual blocks {self.res_channels or HIDDEN} wide, Adam {self.lr:g}"


PEERS = {
    "paper": Peer("VectorQuantize", None, 2e-4),
    "light": Peer("VectorQuantize", 32, 2e-4),
    "fsq": Peer("FSQ", 32, 1e-3),
}


def default_levels(codebook_size: int) -> list[int]:
    """FSQ's levels for about 2^10 codes, or 2^14 for a large codebook (the FSQ paper's recommended sets)."""
    return [8, 5, 5, 5] if codebook_size <= 1024 else [8, 8, 8, 6, 5]


class Reference(torch.nn.Module):
    """vqtok's encoder and decoder around vector-quantize-pytorch's VectorQuantize (configured well) or FSQ."""

    def __init__(self, peer: Peer, codebook_size: int, levels: list[int]) -> None:
        from vector_quantize_pytorch import FSQ, VectorQuantize

        from vqtok.config import ModelConfig, QuantizerConfig
        from vqtok.model import Decoder, Encoder

        super().__init__()
        self.peer = peer
        quantizer = QuantizerConfig(codebook_size=codebook_size, code_dim=D)
        config = ModelConfig(hidden_channels=HIDDEN, quantizer=quantizer, **peer.network)
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        if peer.quantizer == "FSQ":
            self.fsq = FSQ(levels, dim=D)  # projects the D channels to len(levels) bounded scalars and back
            self.codebook_size = self.fsq.codebook_size
        else:
            self.vq = VectorQuantize(
                dim=D,
                codebook_size=codebook_size,
                decay=0.99,
                commitment_weight=0.25,
                kmeans_init=True,
                threshold_ema_dead_code=2,
                accept_image_fmap=True,
            )
            self.codebook_size = codebook_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D, h, w) -> the quantized (B, D, h, w), the codes (B, h, w) and the quantizer's own loss."""
        if self.peer.quantizer == "FSQ":
            quantized, codes = self.fsq(z)
            return quantized, codes.long(), z.new_zeros(())  # FSQ has no codebook to pull and nothing to commit to
        quantized, codes, commit = self.vq(z)
        return quantized, codes, commit.sum()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        quantized, _, loss = self.quantize(self.encoder(x))
        return F.mse_loss(self.decoder(quantized), x) + loss

    # what vqtok.evaluate calls
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.encoder(images * 2 - 1))[1]  # (B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.peer.quantizer == "FSQ":
            quantized = self.fsq.indices_to_codes(codes)  # (B, D, h, w)
        else:
            quantized = self.vq.get_output_from_indices(codes)  # (B, D, h, w)
        return ((self.decoder(quantized) + 1) / 2).clamp(0, 1)


def run_reference(fold: Fold, peer: Peer, codebook_size: int, levels: list[int], steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Reference(peer, codebook_size, levels)
    train = torch.from_numpy(fold.train_pixels).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=peer.lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (BATCH,), generator=gen)]
        flip = torch.rand(BATCH, generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
        loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    report = evaluate(model, fold.held_out_batches(), examples=False)
    return {**report.metrics(), "seconds": seconds}


def run_vqtok(fold: Fold, codebook_size: int, steps: int, seed: int, fit_args: list[str], out: Path) -> dict:
    """The whole `vqtok fit` command, timed; its last held-out evaluation, and its run.json as `settings`."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "vqtok", "fit", str(fold.train_shard), "--out", str(out)]
    command += ["--val", str(fold.held_out_shard), "--steps", str(steps), "--batch-size", str(BATCH)]
    command += ["--image-size", str(SIZE), "--seed", str(seed), "--codebook-size", str(codebook_size)]
    # The width is the VQ-VAE's; another --family sets its network's shape in its own config.
    width = [] if "--family" in fit_args else ["--hidden", str(HIDDEN)]
    command += ["--code-dim", str(D), *width, "--eval-every", str(10**9), *fit_args]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    settings = json.loads((out / "run.json").read_text())
    return {
        **[m for m in entries if m["split"] == "val"][-1],
        "seconds": seconds,
        "settings": settings,
        "train_log": [(m["step"], m["images_per_second"]) for m in entries if "images_per_second" in m],
    }


def steps_for_budget(budget: float, probe: dict) -> int:
    """The steps whose fit fills `budget` seconds, by the probe's seconds per step and fixed cost."""
    return max(1, int((budget - probe["fixed_seconds"]) / probe["seconds_per_step"]))


def probe(fold: Fold, codebook_size: int, steps: int, seed: int, fit_args: list[str], out: Path) -> dict:
    """A short fit of the same settings: the seconds one step takes once the loader runs (between its first
    and last logged steps), and what the rest of the command costs (start-up, the first batch, the final
    checkpoint and evaluation)."""
    metrics = run_vqtok(fold, codebook_size, steps, seed, fit_args, out)
    log = metrics["train_log"]
    if len(log) < 2:
        raise SystemExit(f"--probe-steps {steps} logs fewer than two training steps: give more")
    (first, first_rate), (last, last_rate) = log[0], log[-1]
    per_step = (last * BATCH / last_rate - first * BATCH / first_rate) / (last - first)
    return {
        "steps": steps,
        "seconds": metrics["seconds"],
        "seconds_per_step": per_step,
        "fixed_seconds": metrics["seconds"] - steps * per_step,
    }


def stored_probe(stored: list[dict], label: str, codebook_size: int, probe_steps: int, facts: dict) -> dict | None:
    """The latest probe of `label` kept in the results, made on this machine with as many threads."""
    same_place = ("cores", "cpu", "threads", "gpu", "torch")
    probes = [
        r["probe"]
        for r in stored
        if r["who"] == "probe"
        and r["label"] == label
        and r["codebook_size"] == codebook_size
        and r["batch"] == BATCH
        and r["probe"]["steps"] == probe_steps
        and all(r["machine"][k] == facts[k] for k in same_place)
    ]
    return probes[-1] if probes else None


def equal_time_steps(steps: int, baseline: dict, probe_of_setting: dict) -> int:
    """The steps of a setting that take as long as `steps` of the baseline, both measured by their probes."""
    return steps_for_budget(baseline["fixed_seconds"] + steps * baseline["seconds_per_step"], probe_of_setting)


def vqtok_defaults() -> dict:
    """This checkout's defaults, which a run's `--fit-args` only partly override: when they move, runs labelled
    alike were trained alike only where these agree."""
    from vqtok.config import ModelConfig, TrainConfig

    model = dataclasses.asdict(ModelConfig())
    quantizer = model.pop("quantizer")  # flat, as the stored runs recorded the defaults before QuantizerConfig
    return {"model": {**model, **quantizer}, "train": dataclasses.asdict(TrainConfig())}


def moved_defaults(runs: list[dict], now: dict) -> list[str]:
    """The defaults, as "model.decay 0.95 -> 0.99", that some of `runs` were made with and this checkout lacks."""
    moved = set()
    for run in runs:
        for part, fields in run["vqtok_defaults"].items():
            moved |= {f"{part}.{k} {v!r} -> {now[part].get(k)!r}" for k, v in fields.items() if now[part].get(k) != v}
    return sorted(moved)


def machine() -> dict:
    """Where a run was made: what the table needs to tell machines apart."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        # vqtok fit takes a GPU where there is one (and bf16 there); the references always train on the CPU
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.platform(),
        "commit": commit,
    }


# The table. Records are matched by (fold, seed); the spread over seeds is half their range (mean ± half-range).


def half_range(values: list[float]) -> float | None:
    return (max(values) - min(values)) / 2 if len(values) > 1 else None


def compare(ours: dict, theirs: dict, folds: list[int], seeds: list[int], time_limit: float = TIME_LIMIT) -> dict:
    """ours and theirs map (fold, seed) to a run. Per fold and on the mean: PSNR as mean and half-range over
    seeds on each side, usage, seconds, the gain (ours - theirs, paired by fold and seed) and the time ratio;
    on the mean also the gain's standard error over the fold-seed pairs; and the issue's verdicts, each
    (status, detail) with status "met", "not met" or "not enough runs"."""
    wanted = [(f, s) for f in folds for s in seeds]
    pairs = [key for key in wanted if key in ours and key in theirs]

    def summary(keys: list[tuple[int, int]]) -> dict:
        by_seed = {s: [k for k in keys if k[1] == s] for s in seeds}
        row = {"runs": len(keys)}
        for side, runs in (("", ours), ("ref_", theirs)):
            seed_means = [float(np.mean([runs[k]["psnr"] for k in ks])) for ks in by_seed.values() if ks]
            row[side + "psnr"] = float(np.mean([runs[k]["psnr"] for k in keys]))
            row[side + "spread"] = half_range(seed_means)
            for name in ("usage", "perplexity", "seconds"):
                row[side + name] = float(np.mean([runs[k][name] for k in keys]))
        gains = [ours[k]["psnr"] - theirs[k]["psnr"] for k in keys]
        row["gain"] = float(np.mean(gains))
        row["se"] = float(np.std(gains, ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else None
        row["ratio"] = float(np.mean([ours[k]["seconds"] / theirs[k]["seconds"] for k in keys]))
        return row

    rows = [{"fold": f, **summary([k for k in pairs if k[0] == f])} for f in folds if any(k[0] == f for k in pairs)]
    mean = {"fold": "mean", **summary(pairs)} if pairs else None
    short = f"{len(pairs)} of {len(wanted)} fold-seed pairs"
    complete = len(pairs) == len(wanted)
    verdicts = {}
    if complete and len(pairs) > 1:
        met = mean["gain"] > 2 * mean["se"]
        detail = f"{mean['gain']:+.2f} dB, standard error {mean['se']:.2f} dB over {len(pairs)} fold-seed pairs"
        verdicts["gain"] = ("met" if met else "not met", detail)
    else:
        verdicts["gain"] = ("not enough runs", short if not complete else "one fold-seed pair: no standard error")
    if complete and len(seeds) > 1:
        worst = min(rows, key=lambda r: r["gain"])
        allowed = max(worst["spread"], worst["ref_spread"])
        detail = f"fold {worst['fold']}: {worst['gain']:+.2f} dB, seed spread {allowed:.2f} dB"
        verdicts["worst_fold"] = ("met" if worst["gain"] >= -allowed else "not met", detail)
    else:
        verdicts["worst_fold"] = ("not enough runs", short if not complete else "one seed: no spread")
    if complete:
        ratios = [ours[k]["seconds"] / theirs[k]["seconds"] for k in pairs]
        detail = f"at most {max(ratios):.2f}x, {mean['ratio']:.2f}x on the mean"
        verdicts["time"] = ("met" if max(ratios) <= time_limit else "not met", detail)
        detail = f"{mean['psnr']:.2f} against {mean['ref_psnr']:.2f} dB"
        verdicts["psnr"] = ("met" if mean["psnr"] > mean["ref_psnr"] else "not met", detail)
        detail = f"{mean['usage']:.1%} against {mean['ref_usage']:.1%}"
        verdicts["usage"] = ("met" if mean["usage"] >= mean["ref_usage"] else "not met", detail)
    else:
        for name in ("time", "psnr", "usage"):
            verdicts[name] = ("not enough runs", short)
    return {"rows": rows, "mean": mean, "verdicts": verdicts}


VERDICTS = {
    "gain": "mean gain above twice its standard error",
    "worst_fold": "worst fold not below by more than its seed spread",
    "time": f"whole `vqtok fit` at most {TIME_LIMIT}x the reference's training loop",
    "psnr": "mean held-out PSNR above",
    "usage": "mean held-out usage at or above",
}


def psnr_text(mean: float, spread: float | None) -> str:
    return f"{mean:6.2f} ± {spread:4.2f}" if spread is not None else f"{mean:6.2f}       "


def print_comparison(title: str, comparison: dict, verdicts: tuple[str, ...]) -> None:
    print(f"\n{title}")
    print(
        f"{'fold':<5}{'runs':>4} | {'PSNR':>13} {'usage':>6} {'sec.':>5} | {'ref PSNR':>13} {'usage':>6} {'sec.':>5} |",
        end="",
    )
    print(f" {'gain':>14} {'time':>6}")
    for row in [*comparison["rows"], *([comparison["mean"]] if comparison["mean"] else [])]:
        line = f"{row['fold']:<5}{row['runs']:>4} | {psnr_text(row['psnr'], row['spread'])} {row['usage']:>6.1%}"
        line += f" {row['seconds']:>5.0f} | {psnr_text(row['ref_psnr'], row['ref_spread'])} {row['ref_usage']:>6.1%}"
        line += f" {row['ref_seconds']:>5.0f} | {row['gain']:>+6.2f}"
        line += f" ± {row['se']:4.2f}" if row["fold"] == "mean" and row["se"] is not None else " " * 7
        print(f"{line} {row['ratio']:>5.2f}x")
    for name in verdicts:
        status, detail = comparison["verdicts"][name]
        print(f"{VERDICTS[name]}: {status} ({detail})")


def print_runs(label: str, ours: dict, references: dict, folds: list[int], seeds: list[int]) -> None:
    """One line per fold and seed: vqtok's run and each reference's PSNR."""
    print(f"\nvqtok fit {label}, each run")
    header = f"{'fold':<5}{'seed':>4} | {'PSNR':>6} {'usage':>6} {'perpl.':>6} {'SSIM':>6} {'steps':>5} {'sec.':>5} |"
    print(header + "".join(f" {name:>6}" for name in references))
    for key in [(f, s) for f in folds for s in seeds]:
        if key not in ours and not any(key in runs for runs in references.values()):
            continue
        line = f"{key[0]:<5}{key[1]:>4} |"
        if key in ours:
            run = ours[key]
            line += f" {run['psnr']:>6.2f} {run['usage']:>6.1%} {run['perplexity']:>6.0f} {run['ssim']:>6.3f}"
            line += f" {run['steps']:>5} {run['seconds']:>5.0f} |"
        else:
            line += " " * 41 + "|"
        print(line + "".join(f" {runs[key]['psnr']:>6.2f}" if key in runs else " " * 7 for runs in references.values()))


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def latest(stored: list[dict], **match) -> dict:
    """The latest stored run of each (fold, seed) whose fields equal `match`, on any machine."""
    return {(r["fold"], r["seed"]): r for r in stored if all(r.get(k) == v for k, v in match.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", default="0,1,2,3", help="Comma-separated fold numbers (0-3).")
    parser.add_argument("--seeds", default="0,1", help="Comma-separated seeds: each fold is run with each.")
    parser.add_argument(
        "--runs", default="vqtok,paper,light,fsq", help="What to train, comma-separated: vqtok and references."
    )
    parser.add_argument("--references", default="paper,light,fsq", help="The references the table compares vqtok with.")
    parser.add_argument(
        "--fit-args",
        action="append",
        help="More options for vqtok fit, e.g. '--decay 0.95'; repeat to run and compare several (default: '').",
    )
    parser.add_argument("--codebook-size", type=int, default=512, help="K of vqtok and the VectorQuantize peers.")
    parser.add_argument("--fsq-levels", help="FSQ's levels, e.g. 8,8,8,6,5 (default: 8,5,5,5 up to K = 1,024).")
    parser.add_argument("--steps", type=int, default=2000, help="Steps of every side (vqtok's unless --seconds).")
    parser.add_argument("--seconds", type=float, help="vqtok's wall-time budget, spent as steps after a probe.")
    parser.add_argument(
        "--equal-time",
        action="store_true",
        help="Run each --fit-args after the first for the steps that take as long as the first's --steps.",
    )
    parser.add_argument(
        "--probe-steps", type=int, default=150, help="Steps of the probe fit that --seconds and --equal-time make."
    )
    parser.add_argument("--train-crops", type=int, default=400, help="Training crops per photograph.")
    parser.add_argument("--held-out-crops", type=int, default=400, help="Held-out crops per photograph.")
    parser.add_argument("--threads", type=int, help="torch threads for every side (default: torch's choice).")
    parser.add_argument("--out", type=Path, default=Path("runs/fit_quality"), help="Shards and vqtok's run folders.")
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "fit_quality.jsonl",
        help="The runs, one JSON line each, appended to and read by the table (kept in the repository).",
    )
    parser.add_argument(
        "--table-only", action="store_true", help="Print the table of the runs made before, training nothing."
    )
    parser.add_argument(
        "--missing-only",
        action="store_true",
        help="Train only the runs --results lacks, e.g. to finish a table made in parts.",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the vqtok fit subprocess
    folds = [int(f) for f in args.folds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    train = [name for name in args.runs.split(",") if name]
    references = [name for name in args.references.split(",") if name]
    unknown = sorted(set(train + references) - {"vqtok", *PEERS})
    if unknown:
        parser.error(f"unknown run {', '.join(unknown)}: choose from vqtok, {', '.join(PEERS)}")
    fit_args = args.fit_args or [""]
    if args.equal_time and (args.seconds or len(fit_args) < 2):
        parser.error("--equal-time compares two or more --fit-args, the first at --steps; it replaces --seconds")
    K = args.codebook_size
    levels = [int(n) for n in args.fsq_levels.split(",")] if args.fsq_levels else default_levels(K)
    peer_size = {name: math.prod(levels) if peer.quantizer == "FSQ" else K for name, peer in PEERS.items()}
    budget = f"a {args.seconds:.0f} s budget" if args.seconds else f"{args.steps} steps"
    print(
        f"{len(folds)} fold(s) x seeds {seeds}: {args.train_crops} crops of each of 15 photographs for training, "
        f"{args.held_out_crops} of each of 5 held out; K = {K}, batch {BATCH}; vqtok {budget}, references "
        f"{args.steps} steps; {torch.get_num_threads()} threads"
    )
    for name in references:
        print(f"  {name}: {PEERS[name].label(levels)}, K = {peer_size[name]}")

    # Fields every record carries and the table matches on; vqtok's steps are matched unless it had a budget.
    common = {"batch": BATCH, "train_crops": args.train_crops, "held_out_crops": args.held_out_crops}
    vqtok_match = {"codebook_size": K, "budget_seconds": args.seconds, "equal_time_to": None}
    if not args.seconds:
        vqtok_match["steps"] = args.steps
    labels = [extra or "defaults" for extra in fit_args]

    def record_match(who: str, extra: str | None) -> dict:
        """The fields the table matches a run of `who` (with vqtok's `extra` --fit-args) on."""
        if who != "vqtok":
            return {"label": PEERS[who].label(levels), "codebook_size": peer_size[who], "steps": args.steps}
        label = extra or "defaults"
        if args.equal_time and label != labels[0]:  # matched by the time it was given, not by its steps
            timed = {k: v for k, v in vqtok_match.items() if k != "steps"}
            return {"label": label, **timed, "equal_time_to": {"label": labels[0], "steps": args.steps}}
        return {"label": label, **vqtok_match}

    facts, defaults = machine(), vqtok_defaults()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    stored = read_results(args.results)
    probes: dict[str, dict] = {}  # one probe fit per --fit-args: a step costs the same on every fold and seed

    def kept_probe(fold: Fold, seed: int, extra: str, label: str, run_dir: Path) -> dict:
        """--equal-time's probe of a setting: the one kept in --results, or a new one, kept there."""
        found = stored_probe(stored, label, K, args.probe_steps, facts)
        if found is None:
            found = probe(fold, K, args.probe_steps, seed, extra.split(), run_dir)
            record = {"who": "probe", "label": label, "fit_args": extra, "codebook_size": K, "batch": BATCH}
            record.update(probe=found, machine=facts)
            stored.append(record)
            with args.results.open("a") as file:
                file.write(json.dumps(record) + "\n")
            print(f"probe {label}: {found['seconds_per_step']:.3f} s a step, {found['fixed_seconds']:.0f} s fixed")
        return found

    for f in [] if args.table_only else folds:  # --table-only trains nothing
        fold = Fold(f, args.out / f"fold{f}", args.train_crops, args.held_out_crops)
        for seed in seeds:
            for who in train:
                for extra in fit_args if who == "vqtok" else [None]:
                    entry = {"who": who, "fold": f, "seed": seed, **common}
                    if args.missing_only and (f, seed) in latest(stored, **entry, **record_match(who, extra)):
                        continue
                    if who == "vqtok":
                        run_dir = args.out / f"run-f{f}-s{seed}"
                        label = extra or "defaults"
                        steps = args.steps
                        if args.seconds:
                            if extra not in probes:
                                probes[extra] = probe(fold, K, args.probe_steps, seed, extra.split(), run_dir)
                            entry["probe"] = probes[extra]
                            steps = steps_for_budget(args.seconds, entry["probe"])
                        elif args.equal_time and label != labels[0]:
                            baseline = kept_probe(fold, seed, fit_args[0], labels[0], run_dir)
                            entry["probe"] = kept_probe(fold, seed, extra, label, run_dir)
                            steps = equal_time_steps(args.steps, baseline, entry["probe"])
                        metrics = run_vqtok(fold, K, steps, seed, extra.split(), run_dir)
                        del metrics["train_log"]
                        entry.update(fit_args=extra, **record_match(who, extra))
                        entry["vqtok_defaults"] = defaults
                        entry["steps"] = steps
                    else:
                        peer = PEERS[who]
                        metrics = run_reference(fold, peer, K, levels, args.steps, seed)
                        entry.update(label=peer.label(levels), codebook_size=peer_size[who], steps=args.steps)
                        entry["reference"] = {"quantizer": peer.quantizer, "network": peer.network, "lr": peer.lr}
                        if peer.quantizer == "FSQ":
                            entry["reference"]["levels"] = levels
                    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                    entry.update({k: v for k, v in metrics.items() if k not in ("worst", "split", "step")})
                    entry.update(machine=facts, date=now)
                    with args.results.open("a") as file:
                        file.write(json.dumps(entry) + "\n")
                    print(
                        f"fold {f} seed {seed} {who} {entry['label']}: PSNR {entry['psnr']:.2f} dB, usage "
                        f"{entry['usage']:.1%}, perplexity {entry['perplexity']:.0f}, {entry['steps']} steps, "
                        f"{entry['seconds']:.0f} s",
                        flush=True,
                    )

    stored = read_results(args.results)  # again: runs another process made meanwhile count too
    peers = {name: latest(stored, who=name, **record_match(name, None), **common) for name in references}
    ours = {
        label: latest(stored, who="vqtok", **record_match("vqtok", extra), **common)
        for extra, label in zip(fit_args, labels, strict=True)
    }
    used = [run for runs in [*ours.values(), *peers.values()] for run in runs.values()]
    for place in sorted({json.dumps({k: v for k, v in r["machine"].items() if k != "commit"}) for r in used}):
        where = json.loads(place)
        print(
            f"runs from: {where['cores']} cores ({where['cpu']}), {where['threads']} threads, "
            f"{where['gpu'] or 'no GPU'}, torch {where['torch']}"
        )
    for label in labels:
        moved = moved_defaults(list(ours[label].values()), defaults)
        if moved:
            print(f"\nvqtok fit {label}: some runs were made with other defaults than now: {'; '.join(moved)}")
        print_runs(label, ours[label], peers, folds, seeds)
        for name in references:
            title = f"vqtok fit {label} against {name} ({PEERS[name].label(levels)}); PSNR as mean ± half-range"
            title += " over seeds, gain ± its standard error over the fold-seed pairs"
            print_comparison(title, compare(ours[label], peers[name], folds, seeds), tuple(VERDICTS))
    for label in labels[1:]:
        title = f"vqtok fit {label} against vqtok fit {labels[0]}"
        if args.equal_time:
            title += f" at equal time (the time of {args.steps} steps of {labels[0]})"
        print_comparison(title, compare(ours[label], ours[labels[0]], folds, seeds), ("gain", "worst_fold", "psnr"))


if __name__ == "__main__":
    main()
