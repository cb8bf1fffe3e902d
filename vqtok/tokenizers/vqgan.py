"""The VQGAN network ("Taming Transformers for High-Resolution Image Synthesis", Esser et al. 2021, section
3.1): residual blocks of GroupNorm, swish and 3x3 convolutions at each of several levels (channels
base_channels * channel_mult[level]), strided convolutions between levels going down and nearest-neighbour
upsampling coming back, single-head self-attention in the middle block and at the levels that ask for it,
and 1x1 convolutions into and out of vqtok's vector quantizer. LlamaGen's VQ tokenizer and diffusers'
`VQModel` reuse this network; LlamaGen looks codes up in 8 l2-normalized dimensions (`normalize_codes`).

Module and parameter names are taming-transformers' own (`taming.modules.diffusionmodules.model`), so a
checkpoint of any of the three maps onto this file by renaming prefixes only (`importers.py`). The
adversarial and perceptual losses the paper trains it with are in `losses.py`, which `vqtok fit` adds to the
pixel and quantizer losses as a recipe's [objective] asks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.config import VQGANConfig

from .base import Tokenizer
from .quantizers import VectorQuantizer


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 convolution on x when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """x + single-head self-attention over the H*W positions, with 1x1 convolutions as projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose tokens are the positions
        q, k, v = (proj(h).reshape(B, 1, C, H * W).transpose(2, 3) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scaled by C**-0.5 as taming's
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 convolution, padded on the right and bottom only (taming's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution's residual blocks, each followed by attention where the level has it, then the resampling
    to the next level (the encoder's `downsample` or the decoder's `upsample`; none at the last level), named as
    taming's `down[i]` and `up[i]`."""

    def __init__(
        self,
        widths: list[tuple[int, int]],
        attention: bool,
        dropout: float,
        downsample: Downsample | None = None,
        upsample: Upsample | None = None,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in, c_out, dropout) for c_in, c_out in widths)
        self.attn = nn.ModuleList(AttnBlock(c_out) for _, c_out in widths) if attention else nn.ModuleList()
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)  # (B, C_out, H, W)
            if self.attn:
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)  # (B, C_out, H/2, W/2)
        if self.upsample is not None:
            h = self.upsample(h)  # (B, C_out, 2H, 2W)
        return h


class Middle(nn.Module):
    """Residual block, self-attention (unless the config leaves it out), residual block at the lowest resolution
    (taming's `mid`)."""

    def __init__(self, channels: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> (B, z_channels, H/s, W/s), s = 2 ** (levels - 1)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = config.base_channels
        for i, c_out in enumerate(widths):
            blocks = [(c_in if b == 0 else c_out, c_out) for b in range(config.num_res_blocks)]
            downsample = Downsample(c_out) if i != levels - 1 else None
            self.down.append(Level(blocks, i in config.attn_levels, config.dropout, downsample=downsample))
            c_in = c_out
        self.mid = Middle(c_in, config.dropout, config.mid_attention)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch * mult, H/2, W/2)
        h = self.mid(h)  # (B, ch * mult[-1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> images (B, C, h*s, w*s) in about [-1, 1]; the encoder's levels in reverse, each
    with one residual block more (taming's). `up[i]` is level i, as in taming, though it runs last-first."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, c_in, 3, padding=1)
        self.mid = Middle(c_in, config.dropout, config.mid_attention)
        up = []
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            blocks = [(c_in if b == 0 else c_out, c_out) for b in range(config.num_res_blocks + 1)]
            upsample = Upsample(c_out) if i != 0 else None
            up.insert(0, Level(blocks, i in config.attn_levels, config.dropout, upsample=upsample))
            c_in = c_out
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, ch * mult, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


class VQGAN(Tokenizer):
    """The VQGAN tokenizer: images <-> (h, w) grids of codebook indices (see `Tokenizer` for the contract).

    >>> codes = model.encode(images)     # float (B, 3, H, W) in [0, 1] -> int64 (B, h, w)
    >>> images = model.decode(codes)     # -> float (B, 3, H, W) in [0, 1]
    """

    FAMILY = "vqgan"
    ENCODER_MODULES = ("encoder", "quant_conv")
    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        code_dim = config.quantizer.code_dim
        self.quant_conv = nn.Conv2d(config.z_channels, code_dim, 1)
        self.quantizer = VectorQuantizer(config.quantizer)
        self.post_quant_conv = nn.Conv2d(code_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, D, h, w)

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))  # (B, C, H, W)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight  # taming's and LlamaGen's `last_layer`
