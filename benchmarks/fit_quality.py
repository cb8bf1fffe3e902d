"""Quality at equal budget: `vqtok fit` against the paper's network with
vector-quantize-pytorch's `VectorQuantize`, trained the same way.

Both train on 32x32 crops of some of scikit-image's bundled photographs
(8x8 grid, K = 512, D = 64, 128 hidden channels, 2,000 steps of batch 64)
and are evaluated on crops of other photographs that training never saw.
vqtok is timed as the whole `vqtok fit` command (start-up, shard reading,
checkpoints and evaluation included); the reference as its training loop
over tensors already in memory. Codebook usage is printed twice: on the 500
held-out crops that PSNR is measured on, and on 2,000 other crops of the
same held-out photographs, since the share of codes seen grows with the
number of crops looked at.

    pip install -e '.[bench]' scikit-image
    python benchmarks/fit_quality.py [--steps 2000] [--out runs/fit_quality]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vqtok.demo import photo  # scaled to a shorter side of 160 px: crops then hold objects, not just texture

# chelsea and cat are one photo, and the two stereo_motorcycle views one scene: each stays on one side.
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "camera", "brick", "grass", "gravel", "moon")
HELD_OUT_PHOTOS = ("chelsea", "coins", "hubble_deep_field", "retina", "cell")
SIZE, K, D, HIDDEN, BATCH = 32, 512, 64, 128, 64


def crops(names, per_photo: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        pixels = np.asarray(photo(name))
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


def evaluate(encode_decode, images: torch.Tensor) -> dict:
    squared, codes_seen = 0.0, set()
    with torch.no_grad():
        for start in range(0, len(images), 256):
            batch = images[start : start + 256]
            recon, codes = encode_decode(batch)
            squared += (recon.clamp(0, 1) - batch).pow(2).sum().item()
            codes_seen.update(codes.flatten().tolist())
    mse = squared / images.numel()
    return {"psnr": 10 * math.log10(1 / mse), "usage": len(codes_seen) / K}


def scores(encode_decode, held_out: torch.Tensor, more_held_out: torch.Tensor) -> dict:
    """PSNR and usage on the held-out crops, and usage on four times as many: usage counts the codes seen at
    least once, so it grows with the number of crops looked at."""
    return {**evaluate(encode_decode, held_out), "usage_more": evaluate(encode_decode, more_held_out)["usage"]}


def reference(train: torch.Tensor, held_out: torch.Tensor, more_held_out: torch.Tensor, steps: int, seed: int) -> dict:
    """The paper's network around vector-quantize-pytorch's VectorQuantize, configured well."""
    from vector_quantize_pytorch import VectorQuantize

    from vqtok.config import ModelConfig
    from vqtok.model import Decoder, Encoder

    torch.manual_seed(seed)
    config = ModelConfig(hidden_channels=HIDDEN, codebook_size=K, code_dim=D, image_size=SIZE)
    encoder, decoder = Encoder(config), Decoder(config)
    vq = VectorQuantize(
        dim=D,
        codebook_size=K,
        decay=0.99,
        commitment_weight=0.25,
        kmeans_init=True,
        threshold_ema_dead_code=2,
        accept_image_fmap=True,
    )
    params = [*encoder.parameters(), *decoder.parameters(), *vq.parameters()]
    optimizer = torch.optim.Adam(params, lr=2e-4)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (BATCH,), generator=gen)]
        flip = torch.rand(BATCH, generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
        x = batch * 2 - 1
        quantized, _, commit = vq(encoder(x))
        loss = F.mse_loss(decoder(quantized), x) + commit.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    vq.eval()

    def encode_decode(batch):
        quantized, codes, _ = vq(encoder(batch * 2 - 1))
        return (decoder(quantized) + 1) / 2, codes

    return {**scores(encode_decode, held_out, more_held_out), "seconds": seconds}


def vqtok_fit(
    train_shard: Path,
    val_shard: Path,
    held_out: torch.Tensor,
    more_held_out: torch.Tensor,
    out: Path,
    steps: int,
    seed: int,
    extra: list[str],
) -> dict:
    from vqtok import VQVAE

    command = [sys.executable, "-m", "vqtok", "fit", str(train_shard), "--out", str(out), "--val", str(val_shard)]
    command += ["--steps", str(steps), "--batch-size", str(BATCH), "--image-size", str(SIZE), "--seed", str(seed)]
    command += ["--codebook-size", str(K), "--code-dim", str(D), "--hidden", str(HIDDEN), "--eval-every", "1000000"]
    command += extra
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    model = VQVAE.from_pretrained(out / "model")

    def encode_decode(batch):
        codes = model.encode(batch)
        return model.decode(codes), codes

    result = {**scores(encode_decode, held_out, more_held_out), "seconds": seconds}
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["fit_reported_psnr"] = [m for m in val if m["split"] == "val"][-1]["psnr"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/fit_quality"))
    parser.add_argument("--only", choices=["vqtok", "reference"])
    parser.add_argument("--fit-args", default="", help="More options for vqtok fit, e.g. '--lr 1e-3'.")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    train_pixels, held_pixels = crops(TRAIN_PHOTOS, 400, seed=0), crops(HELD_OUT_PHOTOS, 100, seed=1)
    train_shard, val_shard = args.out / "train.tar", args.out / "held-out.tar"
    write_shard(train_shard, train_pixels, "train")
    write_shard(val_shard, held_pixels, "held")

    def as_tensor(pixels):
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)

    train, held_out = as_tensor(train_pixels), as_tensor(held_pixels)
    more_held_out = as_tensor(crops(HELD_OUT_PHOTOS, 400, seed=2))
    print(
        f"{len(train)} training crops of {len(TRAIN_PHOTOS)} photos, {len(held_out)} held-out crops of "
        f"{len(HELD_OUT_PHOTOS)} other photos; {args.steps} steps of batch {BATCH}, {torch.get_num_threads()} threads"
    )

    rows = {}
    if args.only != "reference":
        run_dir = args.out / f"vqtok-seed{args.seed}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        rows["vqtok fit"] = vqtok_fit(
            train_shard, val_shard, held_out, more_held_out, run_dir, args.steps, args.seed, args.fit_args.split()
        )
    if args.only != "vqtok":
        rows["reference"] = reference(train, held_out, more_held_out, args.steps, args.seed)

    print(f"{'':<12} {'held-out PSNR':>14} {'usage':>7} {f'usage, {len(more_held_out)} crops':>19} {'seconds':>8}")
    for name, row in rows.items():
        print(
            f"{name:<12} {row['psnr']:>11.2f} dB {row['usage']:>7.1%} {row['usage_more']:>19.1%} {row['seconds']:>8.1f}"
        )
    if len(rows) == 2:
        ours, ref = rows["vqtok fit"], rows["reference"]
        print(f"PSNR gain {ours['psnr'] - ref['psnr']:+.2f} dB (target >= +0.30), usage {ours['usage']:.1%} (>= 98%),")
        print(f"time {ours['seconds'] / ref['seconds']:.2f}x the reference's training loop (target <= 1.25x)")


if __name__ == "__main__":
    main()
