"""`vqtok encode` with a VQGAN-family tokenizer shaped like LlamaGen's VQ-16, against LlamaGen's own way of
extracting codes and against the model alone.

The model: LlamaGen's VQ-16 shape (channels 128 x (1, 1, 2, 2, 4), z 256, K = 16,384 codes of 8 l2-normalized
dimensions), random weights (speed does not depend on training), at 256 px: a 16x16 grid. The images: JPEGs of
256-512 px cut from scikit-image's photographs (benchmarks/encode.py's), in WebDataset shards for vqtok and in a
folder of files for the LlamaGen-style loop, which is how each reads them.

- vqtok encode: the whole command, start-up included, at --batch-size.
- LlamaGen-style loop: a whole script written like LlamaGen's `autoregressive/train/extract_codes_c2i.py`: a
  DataLoader over the image files with batch 1 (centre crop, then the model), one `.npy` file per image. The same
  network, so only the pipeline differs.
- model alone: the same network on tensors already in memory, batches of --batch-size, after a warm-up batch.

Also printed: the peak resident memory of the `vqtok encode` process (its decoding workers not counted), and on a
GPU the peak GPU memory of the model alone at that batch size.

    pip install -e '.[bench]'
    python benchmarks/tokenizers.py [--images 128] [--batch-size 32] [--out runs/tokenizers_bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from encode import make_jpegs, write_shards  # noqa: E402

SIZE = 256
# LlamaGen's VQ-16 as its config.json would hold it (`VQGANConfig.from_dict`)
LLAMAGEN_VQ16 = dict(
    base_channels=128,
    channel_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    attn_levels=(4,),
    z_channels=256,
    image_size=SIZE,
    quantizer=dict(codebook_size=16384, code_dim=8, normalize_codes=True, decay=None, kmeans_init=False),
)

LLAMAGEN_LOOP = textwrap.dedent(
    """
    import os, sys
    import numpy as np, torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from vqtok import load_tokenizer

    folder, out, model_dir, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def center_crop_arr(image, size):  # LlamaGen's (from ADM): halve while large, resize, crop the centre
        while min(*image.size) >= 2 * size:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
        scale = size / min(*image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
        arr = np.array(image)
        top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
        return arr[top : top + size, left : left + size]

    class Files(Dataset):
        def __init__(self, folder):
            self.paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
        def __len__(self):
            return len(self.paths)
        def __getitem__(self, i):
            pixels = center_crop_arr(Image.open(self.paths[i]).convert("RGB"), size)
            return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, i

    model = load_tokenizer(model_dir)
    os.makedirs(out, exist_ok=True)
    with torch.no_grad():
        for x, index in DataLoader(Files(folder), batch_size=1, num_workers=2, shuffle=False):
            codes = model.encode(x)  # (1, h, w)
            np.save(f"{out}/{int(index)}.npy", codes.numpy())
    """
)


def run_measured(command: list[str]) -> tuple[float, float]:
    """Seconds and peak resident MiB of a command (its own process, not its children)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    output = proc.stdout.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(command[:4])}... failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def make_model(folder: Path) -> str:
    from vqtok.config import VQGANConfig
    from vqtok.tokenizers import build_tokenizer

    torch.manual_seed(0)
    return str(build_tokenizer(VQGANConfig.from_dict(LLAMAGEN_VQ16)).save_pretrained(folder / "model"))


def model_alone(jpegs: list[bytes], model_dir: str, batch_size: int) -> tuple[float, float | None]:
    """Seconds for the model alone over every image, and its peak GPU memory in MiB on a GPU."""
    from vqtok.data import center_crop, decode_image, to_tensor
    from vqtok.encode import encode_images
    from vqtok.tokenizers import load_tokenizer, pick_device

    device = pick_device("auto")
    model = load_tokenizer(model_dir, device=device).to(memory_format=torch.channels_last)
    images = torch.stack([to_tensor(center_crop(decode_image(data, SIZE), SIZE)) for data in jpegs]).to(device)
    encode_images(model, images[:batch_size])  # warm-up: kernels are picked on the first call
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        encode_images(model, images[start : start + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**20
    return time.perf_counter() - started, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/tokenizers_bench"))
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    jpegs = make_jpegs(args.images)
    shards = write_shards(jpegs, args.out / "shards")
    files = args.out / "files"
    files.mkdir()
    for i, data in enumerate(jpegs):
        (files / f"img{i:07d}.jpg").write_bytes(data)
    model_dir = make_model(args.out)
    n = len(jpegs)
    print(f"{n} JPEGs at {SIZE} px, LlamaGen VQ-16-shaped VQGAN (random weights), {os.cpu_count()} cores")

    tokens = args.out / "tokens.parquet"
    vqtok_command = [sys.executable, "-m", "vqtok", "encode", *shards, str(tokens), "--model", model_dir]
    vqtok_command += ["--image-size", str(SIZE), "--batch-size", str(args.batch_size)]
    vqtok_seconds, vqtok_rss = run_measured(vqtok_command)
    llamagen_seconds, _ = run_measured(
        [sys.executable, "-c", LLAMAGEN_LOOP, str(files), str(args.out / "npy"), model_dir, str(SIZE)]
    )
    alone_seconds, gpu_mib = model_alone(jpegs, model_dir, args.batch_size)

    print(f"\n{'':<22} {'seconds':>8} {'images/s':>9}")
    for name, seconds in (
        ("vqtok encode", vqtok_seconds),
        ("LlamaGen-style loop", llamagen_seconds),
        ("model alone", alone_seconds),
    ):
        print(f"{name:<22} {seconds:8.1f} {n / seconds:9.2f}")
    print(
        f"vqtok encode: {llamagen_seconds / vqtok_seconds:.2f}x the LlamaGen-style loop's images/s, "
        f"{alone_seconds / vqtok_seconds:.2f} of the model alone's (target 0.9)"
    )
    print(f"peak memory at batch {args.batch_size}: vqtok encode process {vqtok_rss:.0f} MiB resident", end="")
    print(f", model alone {gpu_mib:.0f} MiB of GPU memory" if gpu_mib is not None else "")


if __name__ == "__main__":
    main()
