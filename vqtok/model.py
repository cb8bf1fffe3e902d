"""The VQ-VAE image model ("Neural Discrete Representation Learning", van den
Oord et al., 2017, section 4.1): an encoder of strided 4x4 convolutions and
residual blocks, the vector quantizer, and a decoder that mirrors the encoder
with transposed convolutions; and the model directory format
(`config.json` + `model.safetensors`, no pickle anywhere; see `vqtok.pretrained`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.config import ModelConfig
from vqtok.errors import ConfigError
from vqtok.pretrained import Pretrained
from vqtok.quantize import VectorQuantizer


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the paper's residual block."""

    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.conv1 = nn.Conv2d(res_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class ResidualStack(nn.Sequential):
    def __init__(self, config: ModelConfig) -> None:
        res_channels = config.res_channels or config.hidden_channels
        super().__init__(*[ResidualBlock(config.hidden_channels, res_channels) for _ in range(config.num_res_blocks)])


class Encoder(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> z_e (B, D, H/s, W/s), s = 2**num_downsamples."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_channels
        layers: list[nn.Module] = []
        channels = config.in_channels
        for _ in range(config.num_downsamples):
            layers += [nn.Conv2d(channels, hidden, 4, stride=2, padding=1), nn.ReLU()]
            channels = hidden
        self.down = nn.Sequential(*layers)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.res = ResidualStack(config)
        self.to_code = nn.Conv2d(hidden, config.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.down(x))  # (B, hidden, h, w)
        h = F.relu(self.res(h))
        return self.to_code(h)  # (B, D, h, w)


class Decoder(nn.Module):
    """z_q (B, D, h, w) -> images (B, C, h*s, w*s) in about [-1, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_channels
        self.from_code = nn.Conv2d(config.code_dim, hidden, 3, padding=1)
        self.res = ResidualStack(config)
        layers: list[nn.Module] = []
        for i in range(config.num_downsamples):
            last = i == config.num_downsamples - 1
            out = config.in_channels if last else hidden
            layers.append(nn.ConvTranspose2d(hidden, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
        self.up = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.res(self.from_code(z)))  # (B, hidden, h, w)
        return self.up(h)  # (B, C, H, W)


class VQVAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, H, W), in image space [0, 1] but not clamped
    codes: torch.Tensor  # (B, h, w) int64
    recon_loss: torch.Tensor  # MSE in the model's [-1, 1] input space
    vq_loss: torch.Tensor  # codebook (without EMA) + beta * commitment
    loss: torch.Tensor  # recon_loss + vq_loss, what training minimises


class VQVAE(Pretrained, nn.Module):
    """Images <-> (h, w) grids of codebook indices; saved and loaded as a model directory (`Pretrained`).

    >>> codes = model.encode(images)     # float (B, 3, H, W) in [0, 1] -> int64 (B, h, w)
    >>> images = model.decode(codes)     # -> float (B, 3, H, W) in [0, 1]
    """

    KIND = "tokenizer"  # what config.json's "kind" says of a VQ-VAE's directory
    config_class = ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(
            config.codebook_size,
            config.code_dim,
            beta=config.beta,
            decay=config.decay,
            kmeans_init=config.kmeans_init,
            dead_code_window=config.dead_code_window,
            lookup_dim=config.lookup_dim,
            normalize=config.normalize_codes,
            rare_code_share=config.rare_code_share,
        )
        self.decoder = Decoder(config)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebook.device

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the code grid for images of this size (an int for square images)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        stride = self.config.stride
        if height % stride or width % stride or height < stride or width < stride:
            raise ConfigError(f"image size {height}x{width} is not a positive multiple of the model's stride {stride}")
        return height // stride, width // stride

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got {images.dtype}")
        self.grid_size(tuple(images.shape[2:]))

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """A training step's forward: images (B, C, H, W) in [0, 1]."""
        x = images * 2 - 1  # (B, C, H, W) in [-1, 1]
        z_e = self.encoder(x)  # (B, D, h, w)
        z_q, codes, vq_loss = self.quantizer(z_e)
        out = self.decoder(z_q)  # (B, C, H, W)
        recon_loss = F.mse_loss(out.float(), x.float())
        return VQVAEOutput((out + 1) / 2, codes, recon_loss, vq_loss, recon_loss + vq_loss)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float (B, C, H, W) in [0, 1] -> codes int64 (B, H/s, W/s)."""
        self._check_images(images)
        images = images.to(self.device, non_blocking=True)
        return self.quantizer.nearest(self.encoder(images * 2 - 1))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes int (B, h, w) in [0, K) -> images float (B, C, h*s, w*s) in [0, 1]."""
        if codes.ndim != 3 or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integers of shape (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        codes = codes.to(self.device, torch.long, non_blocking=True)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        out = self.decoder(self.quantizer.lookup(codes))  # (B, C, H, W)
        return ((out.float() + 1) / 2).clamp_(0, 1)


def pick_device(name: str) -> torch.device:
    """auto: this process's GPU (LOCAL_RANK under a launcher) when there is one, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
