"""Quality at equal budget, cross-validated: `vqtok fit` against the paper's network with
vector-quantize-pytorch's `VectorQuantize`, on photographs held out from training.

Twenty photographs (eighteen from scikit-image, two from scikit-learn) are split into four groups. Fold f
trains on 32x32 crops of the fifteen photographs outside group f (400 per photograph) and is evaluated on
2,000 crops of group f's five (400 per photograph), so every photograph is held out once. Both sides train
for the same steps and batch at the same width: an 8x8 grid, K = 512 (`--codebook-size`), D = 64, 128
hidden channels, 2,000 steps of batch 64.

vqtok is timed as the whole `vqtok fit` command (start-up, shard reading, checkpoints and its evaluation
included), and its figures are the ones that command reports for `--val` (`vqtok.evaluate`). The reference
is timed as its training loop over tensors already in memory, and evaluated by the same `vqtok.evaluate` on
the same crops.

Each run appends a line to OUT/results.jsonl; the table compares each vqtok run with the reference run of
the same fold, seed, K and steps, made now or by an earlier invocation, so the parts can be run apart:

    pip install -e '.[bench]'
    python benchmarks/fit_quality.py                                   # every fold, vqtok and the reference
    python benchmarks/fit_quality.py --folds 0 --only vqtok --fit-args "--lr 1e-3"
    python benchmarks/fit_quality.py --codebook-size 8192 --seeds 0,1
    python benchmarks/fit_quality.py --table-only --fit-args "--lr 1e-3"   # the table of runs made before
"""

from __future__ import annotations

import argparse
import io
import json
import os
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

# chelsea and cat are one photograph, and so are the two stereo_motorcycle views: each appears once.
GROUPS = (
    ("astronaut", "hubble_deep_field", "flower", "camera", "gravel"),
    ("chelsea", "immunohistochemistry", "stereo_motorcycle", "clock", "grass"),
    ("coffee", "retina", "coins", "page", "brick"),
    ("rocket", "china", "cell", "moon", "text"),
)
SIZE, D, HIDDEN, BATCH = 32, 64, 128, 64
TRAIN_CROPS, HELD_OUT_CROPS = 400, 400  # per photograph


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

    def __init__(self, index: int, folder: Path) -> None:
        self.index = index
        self.held_out_photos = GROUPS[index]
        self.train_photos = [name for i, group in enumerate(GROUPS) if i != index for name in group]
        folder.mkdir(parents=True, exist_ok=True)
        self.train_shard, self.held_out_shard = folder / "train.tar", folder / "held-out.tar"
        self.train_pixels = crops(self.train_photos, TRAIN_CROPS, seed=0)
        self.held_out_pixels = crops(self.held_out_photos, HELD_OUT_CROPS, seed=1)
        write_shard(self.train_shard, self.train_pixels, "train")
        write_shard(self.held_out_shard, self.held_out_pixels, "held")

    def held_out_batches(self) -> list[Batch]:
        pixels = torch.from_numpy(self.held_out_pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
        return [
            Batch(chunk, [f"held{start + i:06d}" for i in range(len(chunk))], ["held-out"] * len(chunk), [])
            for start, chunk in ((s, pixels[s : s + 256]) for s in range(0, len(pixels), 256))
        ]


class Reference(torch.nn.Module):
    """The paper's network around vector-quantize-pytorch's VectorQuantize, configured well."""

    def __init__(self, codebook_size: int, network: dict) -> None:
        from vector_quantize_pytorch import VectorQuantize

        from vqtok.config import ModelConfig
        from vqtok.model import Decoder, Encoder

        super().__init__()
        config = ModelConfig(hidden_channels=HIDDEN, codebook_size=codebook_size, code_dim=D, **network)
        self.encoder, self.decoder = Encoder(config), Decoder(config)
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        quantized, _, commit = self.vq(self.encoder(x))
        return F.mse_loss(self.decoder(quantized), x) + commit.sum()

    # what vqtok.evaluate calls
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq(self.encoder(images * 2 - 1))[1]  # (B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        quantized = self.vq.get_output_from_indices(codes)  # (B, D, h, w)
        return ((self.decoder(quantized) + 1) / 2).clamp(0, 1)


def run_reference(fold: Fold, codebook_size: int, steps: int, seed: int, network: dict) -> dict:
    torch.manual_seed(seed)
    model = Reference(codebook_size, network)
    train = torch.from_numpy(fold.train_pixels).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
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
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "vqtok", "fit", str(fold.train_shard), "--out", str(out)]
    command += ["--val", str(fold.held_out_shard), "--steps", str(steps), "--batch-size", str(BATCH)]
    command += ["--image-size", str(SIZE), "--seed", str(seed), "--codebook-size", str(codebook_size)]
    command += ["--code-dim", str(D), "--hidden", str(HIDDEN), "--eval-every", str(10**9), *fit_args]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**[m for m in entries if m["split"] == "val"][-1], "seconds": seconds}


def print_table(rows: list[dict], references: dict) -> None:
    header = f"{'fold':<5}{'seed':>5} | {'PSNR':>6} {'usage':>6} {'perpl.':>6} {'SSIM':>6} {'sec.':>6} |"
    header += f" {'ref PSNR':>8} {'usage':>6} {'perpl.':>6} {'sec.':>6} | {'gain':>6} {'time':>6}"
    print(header)
    gains, ratios = [], []
    for row in rows:
        ref = references.get((row["fold"], row["seed"]))
        line = f"{row['fold']:<5}{row['seed']:>5} | {row['psnr']:>6.2f} {row['usage']:>6.1%} {row['perplexity']:>6.0f}"
        line += f" {row['ssim']:>6.3f} {row['seconds']:>6.0f} |"
        if ref:
            gains.append(row["psnr"] - ref["psnr"])
            ratios.append(row["seconds"] / ref["seconds"])
            line += f" {ref['psnr']:>8.2f} {ref['usage']:>6.1%} {ref['perplexity']:>6.0f} {ref['seconds']:>6.0f} |"
            line += f" {gains[-1]:>+6.2f} {ratios[-1]:>5.2f}x"
        print(line)
    if rows:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "usage", "perplexity", "ssim", "seconds")}
        line = f"{'mean':<10} | {mean['psnr']:>6.2f} {mean['usage']:>6.1%} {mean['perplexity']:>6.0f}"
        line += f" {mean['ssim']:>6.3f} {mean['seconds']:>6.0f} |"
        matched = [references[(r["fold"], r["seed"])] for r in rows if (r["fold"], r["seed"]) in references]
        if len(matched) == len(rows):
            ref_mean = {k: float(np.mean([r[k] for r in matched])) for k in ("psnr", "usage", "perplexity", "seconds")}
            line += f" {ref_mean['psnr']:>8.2f} {ref_mean['usage']:>6.1%} {ref_mean['perplexity']:>6.0f}"
            line += f" {ref_mean['seconds']:>6.0f} | {np.mean(gains):>+6.2f} {np.mean(ratios):>5.2f}x"
        print(line)
        print(f"worst fold's usage {min(r['usage'] for r in rows):.1%}", end="")
        if gains:
            print(f"; worst fold's gain {min(gains):+.2f} dB; time ratio at most {max(ratios):.2f}x", end="")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="0,1,2,3", help="Comma-separated fold numbers (0-3).")
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    parser.add_argument("--only", choices=["vqtok", "reference"])
    parser.add_argument("--fit-args", default="", help="More options for vqtok fit, e.g. '--lr 1e-3'.")
    parser.add_argument(
        "--reference-network",
        default="",
        help="ModelConfig fields for the reference's encoder and decoder, e.g. 'res_channels=32' (default: "
        "the paper's network).",
    )
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's choice).")
    parser.add_argument("--out", type=Path, default=Path("runs/fit_quality"))
    parser.add_argument(
        "--table-only", action="store_true", help="Print the table of the runs made before, training nothing."
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the vqtok fit subprocess
    network = {k: int(v) for k, v in (item.split("=") for item in args.reference_network.split(",") if item)}
    folds = [int(f) for f in args.folds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    K = args.codebook_size
    label = args.fit_args or "defaults"
    reference_label = args.reference_network or "paper"
    print(
        f"{len(folds)} fold(s), seeds {seeds}: {TRAIN_CROPS} crops of each of 15 photographs for training, "
        f"{HELD_OUT_CROPS} of each of 5 held out; K = {K}, {args.steps} steps of batch {BATCH}; "
        f"vqtok fit {label}; reference network {reference_label}; {torch.get_num_threads()} threads"
    )

    results = args.out / "results.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    common = {"codebook_size": K, "steps": args.steps, "threads": torch.get_num_threads()}
    rows = []
    for f in [] if args.table_only else folds:  # --table-only trains nothing
        fold = Fold(f, args.out / f"fold{f}")
        for seed in seeds:
            for who in ("vqtok", "reference"):
                if args.only and who != args.only:
                    continue
                if who == "vqtok":
                    run_dir = args.out / f"run-f{f}-s{seed}"
                    metrics = run_vqtok(fold, K, args.steps, seed, args.fit_args.split(), run_dir)
                else:
                    metrics = run_reference(fold, K, args.steps, seed, network)
                entry = {"who": who, "label": label if who == "vqtok" else reference_label, "fold": f, "seed": seed}
                entry.update(common, **{k: v for k, v in metrics.items() if k != "worst"})
                with results.open("a") as file:
                    file.write(json.dumps(entry) + "\n")
                print(
                    f"fold {f} seed {seed} {who}: PSNR {entry['psnr']:.2f} dB, usage {entry['usage']:.1%}, "
                    f"perplexity {entry['perplexity']:.0f}, {entry['seconds']:.0f} s",
                    flush=True,
                )
                if who == "vqtok":
                    rows.append(entry)

    stored = [json.loads(line) for line in results.read_text().splitlines()]

    def latest(who: str, run_label: str) -> dict:
        """The latest stored run of each (fold, seed) with this label, K and steps, on any thread count."""
        return {
            (r["fold"], r["seed"]): r
            for r in stored
            if r["who"] == who
            and r["label"] == run_label
            and all(r.get(k) == common[k] for k in common if k != "threads")
        }

    references = latest("reference", reference_label)
    if args.table_only:
        earlier = latest("vqtok", label)
        rows = [earlier[key] for key in sorted(earlier) if key[0] in folds and key[1] in seeds]
    if args.only == "reference":
        rows = [r for r in references.values() if r["fold"] in folds and r["seed"] in seeds]
        references = {}
    print_table(rows, references)


if __name__ == "__main__":
    main()
