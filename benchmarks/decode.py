"""Throughput of `vqtok decode` against the model's decoder alone on tensors in memory.

Tokens: the JPEGs of benchmarks/encode.py (cut from scikit-image's photographs), encoded at 64 px by the
paper's network (128 hidden channels, K = 512, D = 64: 16x16 grids), so the decoded images and their PNGs
look like real ones. Timed:

- `vqtok decode` as a whole command (start-up, reading Parquet, checks, PNG writing included), and the
  library function `vqtok.decode.decode` in this process (no start-up);
- `model.decode` alone over the same codes already in memory as tensors, batch 256.

    pip install -e '.[bench]'
    python benchmarks/decode.py [--images 3000] [--model runs/x/model] [--out runs/decode_bench]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from encode import SIZE, make_jpegs, make_model, timed, write_shards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--model", help="a model directory; default: an untrained one with a k-means codebook")
    parser.add_argument("--out", type=Path, default=Path("runs/decode_bench"))
    args = parser.parse_args()

    from vqtok import VQVAE
    from vqtok.decode import decode
    from vqtok.tokens import read_codes

    shutil.rmtree(args.out, ignore_errors=True)
    jpegs = make_jpegs(args.images)
    shards = write_shards(jpegs, args.out / "shards")
    model_dir = args.model or make_model(jpegs, args.out)
    tokens = args.out / "tokens.parquet"
    encode = [sys.executable, "-m", "vqtok", "encode", *shards, str(tokens), "--model", model_dir]
    subprocess.run([*encode, "--image-size", str(SIZE)], check=True, capture_output=True)
    _, codes = read_codes(tokens)
    n = len(codes)

    command = timed([sys.executable, "-m", "vqtok", "decode", str(tokens), str(args.out / "png"), "--model", model_dir])
    started = time.perf_counter()
    decode(tokens, args.out / "png-in-process", model_dir, show_progress=False)
    in_process = time.perf_counter() - started

    model = VQVAE.from_pretrained(model_dir)
    model.to(memory_format=torch.channels_last)
    grids = torch.from_numpy(codes)
    model.decode(grids[:256])  # warm-up: oneDNN picks its kernels on the first call
    started = time.perf_counter()
    for start in range(0, n, 256):
        images = model.decode(grids[start : start + 256])
        images.mul(255).round_().to(torch.uint8)
    alone = time.perf_counter() - started

    print(f"{n} grids of 16x16 codes -> {SIZE}x{SIZE} PNGs, {torch.get_num_threads()} threads\n")
    print(f"{'':<34} {'seconds':>8} {'images/s':>9} {'of model alone':>15}")
    for name, seconds in (
        ("vqtok decode (whole command)", command),
        ("vqtok.decode.decode (in process)", in_process),
        ("model.decode alone, in memory", alone),
    ):
        print(f"{name:<34} {seconds:8.1f} {n / seconds:9.1f} {alone / seconds:15.2f}")
    print("target: vqtok decode at least 0.7 of model.decode alone")


if __name__ == "__main__":
    main()
