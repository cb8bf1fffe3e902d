"""The smallest end-to-end run until `vqtok fit` and `vqtok demo` exist: train a
tiny VQ-VAE on synthetic smooth images, save it, load it back, and tokenize and
reconstruct images it never saw.

    python pipelines/smoke.py --out runs/smoke
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vqtok import VQVAE, ModelConfig


def smooth_images(n, size, generator):
    """Colour fields with soft edges: learnable, unlike noise."""
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/smoke"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train, held_out = smooth_images(512, 32, gen), smooth_images(64, 32, gen)
    model = VQVAE(ModelConfig(hidden_channels=64, codebook_size=64, code_dim=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (32,), generator=gen)]
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  recon {out.recon_loss.item():.4f}  usage {model.quantizer.usage():.0%}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s")

    directory = model.save_pretrained(args.out / "model")
    loaded = VQVAE.from_pretrained(directory)
    codes = loaded.encode(held_out)
    mse = F.mse_loss(loaded.decode(codes), held_out).item()
    print(f"saved {directory} (model id {loaded.model_id})")
    print(
        f"held-out images: codes {tuple(codes.shape)}, {codes.unique().numel()} distinct codes, "
        f"PSNR {10 * math.log10(1 / mse):.1f} dB"
    )


if __name__ == "__main__":
    main()
