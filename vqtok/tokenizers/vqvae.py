"""The VQ-VAE image model ("Neural Discrete Representation Learning", van den
Oord et al., 2017, section 4.1): an encoder of strided 4x4 convolutions and
residual blocks, the vector quantizer, and a decoder that mirrors the encoder
with transposed convolutions. What every tokenizer shares (encode, decode, the
training forward, the model directory) is `vqtok.tokenizers.base.Tokenizer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.config import ModelConfig

from .base import Tokenizer, TokenizerOutput, pick_device
from .quantizers import VectorQuantizer

# vqtok.model is this module (vqtok/model.py): these are the names scripts imported from it before tokenizers/.
__all__ = ["VQVAE", "VQVAEOutput", "Encoder", "Decoder", "ResidualBlock", "ResidualStack", "pick_device"]
VQVAEOutput = TokenizerOutput


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
        self.to_code = nn.Conv2d(hidden, config.quantizer.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.down(x))  # (B, hidden, h, w)
        h = F.relu(self.res(h))
        return self.to_code(h)  # (B, D, h, w)


class Decoder(nn.Module):
    """z_q (B, D, h, w) -> images (B, C, h*s, w*s) in about [-1, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_channels
        self.from_code = nn.Conv2d(config.quantizer.code_dim, hidden, 3, padding=1)
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


class VQVAE(Tokenizer):
    """The paper's tokenizer: images <-> (h, w) grids of codebook indices (see `Tokenizer` for the contract).

    >>> codes = model.encode(images)     # float (B, 3, H, W) in [0, 1] -> int64 (B, h, w)
    >>> images = model.decode(codes)     # -> float (B, 3, H, W) in [0, 1]
    """

    FAMILY = "vqvae"
    config_class = ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config.quantizer)
        self.decoder = Decoder(config)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, D, h, w)

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)  # (B, C, H, W)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.up[-1].weight  # the last transposed convolution's
