"""Throughput of `vqtok encode` against a plain loop a user would write and against the ideal.

Input: a few thousand JPEGs of 256-512 px cut from scikit-image's bundled photographs, in WebDataset shards,
tokenized at 64 px by the paper's network (128 hidden channels, K = 512, D = 64: a 16x16 grid).

- vqtok: the whole `vqtok encode` command, start-up included.
- plain loop: webdataset + PIL + a DataLoader with 2 workers + the same model + one pyarrow write at the end,
  as a whole script, start-up included.
- ideal: the decoding alone spread over every core (Pool of processes over JPEG bytes in memory, the same
  decoding vqtok does), plus the model alone on tensors in memory, plus the interpreter's start-up.

Also printed: bytes per image of the Parquet files against the order-0 entropy of the codes, and how many
codes `--precision bf16` changes against fp32.

    pip install -e '.[bench]'
    python benchmarks/encode.py [--images 3000] [--model runs/x/model] [--out runs/encode_bench]

Without --model, the network is untrained with its codebook set by k-means on its own encoder's outputs over
these images, so codes spread over the codebook as a trained model's do; speed does not depend on training.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")
SIZE, PER_SHARD = 64, 500


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of 256-512 px on their longer side, random crops and scales of the photos."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = rng.integers(w // 2, w + 1), rng.integers(h // 2, h + 1)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = photo.crop((x, y, x + cw, y + ch))
        longer = int(rng.integers(256, 513))
        scale = longer / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_shards(jpegs: list[bytes], folder: Path, per_shard: int = PER_SHARD) -> list[str]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(jpegs), per_shard):
        path = folder / f"bench-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i, data in enumerate(jpegs[start : start + per_shard], start):
                sink.write({"__key__": f"img{i:07d}", "jpg": data, "cls": str(i % 10)})
        paths.append(str(path))
    return paths


def decode_crop(data: bytes) -> np.ndarray:
    from vqtok.data import center_crop, decode_image, to_tensor

    return to_tensor(center_crop(decode_image(data, SIZE), SIZE)).numpy()


def make_model(jpegs: list[bytes], folder: Path) -> str:
    from vqtok import VQVAE, ModelConfig, QuantizerConfig
    from vqtok.quantize import kmeans

    torch.manual_seed(0)
    quantizer = QuantizerConfig(codebook_size=512, code_dim=64)
    model = VQVAE(ModelConfig(hidden_channels=128, image_size=SIZE, quantizer=quantizer)).eval()
    images = torch.from_numpy(np.stack([decode_crop(d) for d in jpegs[:256]])).float() / 255
    with torch.no_grad():
        z = model.encoder(images * 2 - 1)  # (256, D, 16, 16)
        centers, _ = kmeans(z.permute(0, 2, 3, 1).reshape(-1, 64), 512, iters=10)
        model.quantizer.codebook.copy_(centers)
    return str(model.save_pretrained(folder / "model"))


PLAIN_LOOP = textwrap.dedent(
    """
    import sys, time
    import pyarrow as pa, pyarrow.parquet as pq, torch, webdataset as wds
    from torch.utils.data import DataLoader
    from PIL import Image
    import numpy as np
    from vqtok import VQVAE

    shards, out, model_dir, size = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])

    def preprocess(sample):
        key, image = sample
        w, h = image.size
        s = size / min(w, h)
        image = image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        pixels = np.asarray(image.convert("RGB").crop((left, top, left + size, top + size)))
        return key, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255

    dataset = (
        wds.WebDataset(shards, shardshuffle=False, workersplitter=wds.split_by_worker, empty_check=False)
        .decode("pil").to_tuple("__key__", "jpg").map(preprocess)
    )
    model = VQVAE.from_pretrained(model_dir).eval()
    keys, codes = [], []
    with torch.no_grad():
        for batch_keys, images in DataLoader(dataset, batch_size=256, num_workers=2):
            keys += list(batch_keys)
            codes.append(model.encode(images).numpy().astype(np.uint16))
    grids = np.concatenate(codes)
    n, h, w = grids.shape
    flat = pa.array(grids.reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, w), h)
    pq.write_table(pa.table({"key": keys, "codes": column}), out, compression="zstd")
    """
)


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"{' '.join(command[:4])}... failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return seconds


def ideal_seconds(jpegs: list[bytes], model_dir: str) -> dict:
    from vqtok import VQVAE
    from vqtok.encode import encode_images

    startup = timed([sys.executable, "-c", "import torch, vqtok.encode"])
    started = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        crops = pool.map(decode_crop, jpegs, chunksize=64)
    decode = time.perf_counter() - started
    images = torch.from_numpy(np.stack(crops))  # (N, 3, 64, 64) uint8
    model = VQVAE.from_pretrained(model_dir).eval()
    model.to(memory_format=torch.channels_last)
    encode_images(model, images[:256])  # warm-up: oneDNN picks its kernels on the first call
    started = time.perf_counter()
    for start in range(0, len(images), 256):
        encode_images(model, images[start : start + 256])
    model_seconds = time.perf_counter() - started
    return {"startup": startup, "decode": decode, "model": model_seconds}


def code_entropy_bytes(codes: np.ndarray) -> float:
    from vqtok.usage import CodeUsage

    return CodeUsage.of(np.bincount(codes.ravel(), minlength=512)).bits_per_code * codes[0].size / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--model", help="a model directory; default: an untrained one with a k-means codebook")
    parser.add_argument("--out", type=Path, default=Path("runs/encode_bench"))
    parser.add_argument("--skip-bf16", action="store_true", help="do not measure bf16's code changes")
    args = parser.parse_args()

    from vqtok.tokens import read_codes

    shutil.rmtree(args.out, ignore_errors=True)
    jpegs = make_jpegs(args.images)
    shards = write_shards(jpegs, args.out / "shards")
    model_dir = args.model or make_model(jpegs, args.out)
    n = len(jpegs)
    print(f"{n} JPEGs ({sum(map(len, jpegs)) / n / 1024:.0f} KiB each) in {len(shards)} shards, {os.cpu_count()} cores")

    tokens = args.out / "tokens.parquet"

    def encode(out: Path, *options: str) -> list[str]:
        command = [sys.executable, "-m", "vqtok", "encode", *shards, str(out), "--model", model_dir]
        return [*command, "--image-size", str(SIZE), "--keep", "cls", *options]

    rows = {"vqtok encode": timed(encode(tokens))}
    summary = json.loads((tokens / "_SUCCESS").read_text())
    assert summary["rows"] == n, summary
    plain_out = args.out / "plain.parquet"
    rows["plain loop"] = timed([sys.executable, "-c", PLAIN_LOOP, ",".join(shards), str(plain_out), model_dir, "64"])
    parts = ideal_seconds(jpegs, model_dir)
    rows["ideal"] = sum(parts.values())

    print(f"\n{'':<14} {'seconds':>8} {'images/s':>9}")
    for name, seconds in rows.items():
        print(f"{name:<14} {seconds:8.1f} {n / seconds:9.1f}")
    print(
        f"ideal = start-up {parts['startup']:.1f} s + decoding on {os.cpu_count()} cores {parts['decode']:.1f} s"
        f" + model {parts['model']:.1f} s"
    )
    print(
        f"vqtok encode: {rows['plain loop'] / rows['vqtok encode']:.2f}x the plain loop's images/s (target 1.3), "
        f"{rows['ideal'] / rows['vqtok encode']:.2f} of the ideal (target 0.8)"
    )

    keys, codes = read_codes(tokens)
    part_bytes = sum(p.stat().st_size for p in tokens.glob("part-*.parquet"))
    codes_only = args.out / "codes-only.parquet"
    pq.write_table(pq.read_table(tokens, columns=["codes"]), codes_only, compression="zstd", use_dictionary=True)
    entropy = code_entropy_bytes(codes)
    print(
        f"\nParquet: {part_bytes / n:.0f} bytes per image with keys, shard and cls; the codes column alone "
        f"{codes_only.stat().st_size / n:.0f} bytes; order-0 entropy of the codes {entropy:.0f} bytes "
        f"({codes_only.stat().st_size / n / entropy:.3f}x, target <= 1.15); {codes[0].size} codes of "
        f"{np.log2(512):.0f} bits would be {codes[0].size * 9 / 8:.0f} bytes"
    )

    if not args.skip_bf16:
        bf16 = args.out / "bf16.parquet"
        seconds = timed(encode(bf16, "--precision", "bf16"))
        bf16_keys, bf16_codes = read_codes(bf16)
        assert bf16_keys == keys
        changed = (bf16_codes != codes).mean()
        print(f"--precision bf16: {changed:.2%} of codes differ from fp32 ({n / seconds:.1f} images/s on this machine)")


if __name__ == "__main__":
    main()
