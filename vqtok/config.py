"""Settings as dataclasses: what a model is, so that `config.json` describes it whole.

A `ModelConfig` is everything needed to rebuild a model's modules; it is the
`config` object of a model directory's `config.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vqtok.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """The VQ-VAE's shape and its quantizer's settings (paper section 4.1 defaults)."""

    in_channels: int = 3
    hidden_channels: int = 256
    res_channels: int | None = None  # None: as wide as hidden_channels, as in the paper
    num_res_blocks: int = 2
    num_downsamples: int = 2  # each halves the grid: 2 turns 32x32 images into 8x8 codes
    codebook_size: int = 512
    code_dim: int = 64
    beta: float = 0.25
    decay: float | None = 0.99  # None: the paper's codebook loss instead of the EMA update
    kmeans_init: bool = True
    dead_code_window: int = 100  # steps a code may go unused before it is restarted; 0: never
    image_size: int = 32  # the size the model was trained at; it encodes any multiple of its stride

    def __post_init__(self) -> None:
        positive = [
            "in_channels",
            "hidden_channels",
            "num_res_blocks",
            "num_downsamples",
            "codebook_size",
            "code_dim",
            "image_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.res_channels is not None and (not isinstance(self.res_channels, int) or self.res_channels < 1):
            raise ConfigError(f"res_channels must be a positive integer, got {self.res_channels!r}")
        if self.codebook_size < 2:
            raise ConfigError("codebook_size must be at least 2")
        if not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta!r}")
        if self.decay is not None and not 0 < self.decay < 1:
            raise ConfigError(f"decay must be in (0, 1) or None, got {self.decay!r}")
        if not isinstance(self.dead_code_window, int) or self.dead_code_window < 0:
            raise ConfigError(f"dead_code_window must be a non-negative integer, got {self.dead_code_window!r}")
        if self.image_size % self.stride:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of the model's stride {self.stride}")

    @property
    def stride(self) -> int:
        """Image pixels per code along each side."""
        return 2**self.num_downsamples

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model setting(s): {', '.join(unknown)}")
        return cls(**values)
