"""What every command asks of a tokenizer, whatever its family: `Tokenizer`.

A family (the paper's VQ-VAE in `vqvae.py`, the VQGAN network in `vqgan.py`) is an encoder to a latent grid,
vqtok's vector quantizer, and a decoder back; it says how its own networks map pixels in its range to
latents and back (`encode_latent`, `decode_latent`), and this class does the rest the same way for all:

    codes = tok.encode(images)   # float (B, 3, H, W) in [0, 1] -> int64 (B, h, w)
    images = tok.decode(codes)   # int (B, h, w) in [0, K) -> float (B, 3, H, W) in [0, 1]
    tok(images)                  # the training forward: reconstruction, codes and losses
    tok.last_layer()             # the decoder's last weight, for the adaptive weight of a GAN objective
    tok.codebook_size, tok.stride, tok.grid_size(256), tok.model_id, tok.codes_id, tok.config
    tok.save_pretrained(dir), Family.from_pretrained(dir), vqtok.load_tokenizer(dir)

The encode side (the encoder, the codebook and the lookup's input projection) alone decides which code an image
gets: `codes_id` is a hash of it, so models that share it share their codes, and `freeze_encode_side` keeps it
as it is while the decoder alone trains (`vqtok fit --init --train decoder`).

Every family here works in [-1, 1] inside (taming, LlamaGen and diffusers alike), so the [0, 1] contract of
the commands is kept at the boundary, in `encode`, `decode` and `forward` alone.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.errors import ConfigError, ModelFormatError
from vqtok.pretrained import CONFIG_NAME, Pretrained, weights_hash

from .quantizers import VectorQuantizer, squared_distances


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, H, W), in image space [0, 1] but not clamped
    codes: torch.Tensor  # (B, h, w) int64
    recon_loss: torch.Tensor  # MSE in the model's [-1, 1] input space
    vq_loss: torch.Tensor  # codebook (without EMA) + beta * commitment
    loss: torch.Tensor  # recon_loss + vq_loss, vqtok's loss before `vqtok.tokenizers.losses.Objective`
    decoded: torch.Tensor  # (B, C, H, W), the decoder's output in its [-1, 1] space, which the objective compares
    distances: torch.Tensor | None = None  # (B*h*w, K) squared distances to the codes, when asked for


class Tokenizer(Pretrained, nn.Module):
    """Images <-> (h, w) grids of codebook indices; saved and loaded as a model directory (`Pretrained`)
    whose config.json names the family. A subclass sets FAMILY and config_class, builds `self.quantizer`,
    names the modules before it in ENCODER_MODULES, and implements encode_latent and decode_latent. `source` is
    where an imported model came from, `parent` the model a fine-tune started from."""

    KIND = "tokenizer"  # what config.json's "kind" says of every tokenizer's directory
    FAMILY: str
    ENCODER_MODULES: tuple[str, ...] = ("encoder",)  # the modules encode_latent runs, by attribute name
    quantizer: VectorQuantizer

    source: dict | None = None  # {"format", "file", "sha256"} for a model converted by `vqtok import`
    parent: dict | None = None  # {"path", "model_id", "codes_id", "trained", ...} for a fine-tune (`vqtok.train`)
    encode_side_frozen = False  # set by freeze_encode_side

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> latents z_e (B, D, h, w) for the quantizer."""
        raise NotImplementedError

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, D, h, w) -> images (B, C, H, W) in about [-1, 1]."""
        raise NotImplementedError

    def last_layer(self) -> torch.Tensor:
        """The weight of the decoder's last layer, where taming's adaptive weight compares the gradients of the
        reconstruction and adversarial losses (`vqtok.tokenizers.losses.adaptive_weight`)."""
        raise NotImplementedError

    # -- what the commands use -------------------------------------------------

    @property
    def codebook_size(self) -> int:
        """K, what every command that reads or writes codes asks of a tokenizer."""
        return self.config.quantizer.codebook_size

    @property
    def stride(self) -> int:
        """Image pixels per code along each side."""
        return self.config.stride

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebook.device

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the code grid for images of this size (an int for square images)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        stride = self.stride
        if height % stride or width % stride or height < stride or width < stride:
            raise ConfigError(f"image size {height}x{width} is not a positive multiple of the model's stride {stride}")
        return height // stride, width // stride

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got {images.dtype}")
        self.grid_size(tuple(images.shape[2:]))

    def forward(self, images: torch.Tensor, distances: bool = False) -> TokenizerOutput:
        """A training step's forward: images (B, C, H, W) in [0, 1]. With `distances`, also each latent vector's
        squared distances to every code, with their gradients, for the codebook-usage entropy loss; that loss
        trains the encode side, so a frozen one has none to give. Whatever a loss needs comes out of here, so
        that a model wrapped in DistributedDataParallel computes it inside its forward and syncs its gradients."""
        x = images * 2 - 1  # (B, C, H, W) in [-1, 1]
        to_codes = None
        if self.encode_side_frozen:
            if distances:
                raise ValueError("the encode side is frozen: distances to its codes would train nothing")
            with torch.no_grad():  # the quantizer is in eval mode: codes and loss, and nothing updated
                _, codes, vq_loss = self.quantizer(self.encode_latent(x))
            z_q = self.quantizer.lookup(codes)  # as decode feeds the decoder; the output projection learns
        else:
            z_e = self.encode_latent(x)  # (B, D, h, w)
            z_q, codes, vq_loss = self.quantizer(z_e)
            if distances:
                to_codes = self.code_distances(z_e)
        out = self.decode_latent(z_q)  # (B, C, H, W)
        recon_loss = F.mse_loss(out.float(), x.float())
        return TokenizerOutput((out + 1) / 2, codes, recon_loss, vq_loss, recon_loss + vq_loss, out, to_codes)

    def code_distances(self, z_e: torch.Tensor) -> torch.Tensor:
        """Squared distances (B*h*w, K), in full precision, from latents (B, D, h, w) to the codes, in the space
        the lookup compares them (after the quantizer's projection and normalisation). Taken after the
        quantizer's forward, whose moving-average update changes the codebook in place: distances taken before
        it would hold the codebook autograd needs, changed before the backward."""
        D = z_e.shape[1]
        with torch.autocast(z_e.device.type, enabled=False):  # entropy_loss divides them by 0.01
            flat = self.quantizer._to_lookup(z_e.float().permute(0, 2, 3, 1).reshape(-1, D))  # (B*h*w, d)
            return squared_distances(flat, self.quantizer.table())  # (B*h*w, K)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float (B, C, H, W) in [0, 1] -> codes int64 (B, H/s, W/s)."""
        self._check_images(images)
        images = images.to(self.device, non_blocking=True)
        return self.quantizer.nearest(self.encode_latent(images * 2 - 1))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes int (B, h, w) in [0, K) -> images float (B, C, h*s, w*s) in [0, 1]."""
        if codes.ndim != 3 or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integers of shape (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        codes = codes.to(self.device, torch.long, non_blocking=True)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        out = self.decode_latent(self.quantizer.lookup(codes))  # (B, C, H, W)
        return ((out.float() + 1) / 2).clamp_(0, 1)

    # -- the encode side -------------------------------------------------------

    def encode_side(self) -> dict[str, torch.Tensor]:
        """The tensors that decide which code an image gets, by state dict name: the ENCODER_MODULES', the
        codebook's and the lookup's input projection's (where lookup_dim is set). The quantizer's statistics
        (moving averages, usage counters) only shape later training, and the decoder side (the output
        projection, the decoder) only what codes become."""
        prefixes = tuple(f"{name}." for name in (*self.ENCODER_MODULES, "quantizer.project_in"))
        return {
            name: tensor
            for name, tensor in self.state_dict().items()
            if name == "quantizer.codebook" or name.startswith(prefixes)
        }

    @property
    def codes_id(self) -> str:
        """A hash of the encode side and of the lookup's settings, as model_id is of all weights: models with the
        same codes_id give every image the same codes, so one's token datasets decode with the other."""
        quantizer = self.config.quantizer
        lookup = {
            "family": self.FAMILY,
            "normalize_codes": quantizer.normalize_codes,
            # with normalize_codes, a learned codebook is normalized at each lookup, an EMA one as it is updated
            "learned_codebook": quantizer.decay is None,
        }
        return weights_hash(self.encode_side(), lookup)

    def freeze_encode_side(self) -> None:
        """Keep the encode side as it is while the rest trains (TiTok's second stage): its parameters get no
        gradient, and its modules and the quantizer stay in eval mode whatever `train` is asked, so that no
        moving average, dead-code restart, usage count or k-means initialisation touches the codebook or its
        buffers, and dropout never changes a code."""
        frozen = self.encode_side()
        for name, parameter in self.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)
        self.encode_side_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encode_side_frozen:
            for name in (*self.ENCODER_MODULES, "quantizer"):
                getattr(self, name).eval()
        return self

    # -- the model directory ---------------------------------------------------

    def header_extras(self) -> dict:
        extras = {"family": self.FAMILY, "codes_id": self.codes_id}
        if self.source:
            extras["source"] = self.source
        if self.parent:
            extras["parent"] = self.parent
        return extras

    @classmethod
    def from_header(cls, where, header: dict, device: str | torch.device = "cpu"):
        found = family_of(header)
        if found != cls.FAMILY:
            raise ModelFormatError(
                f"{where} holds a {found} tokenizer, not a {cls.FAMILY}: load it with vqtok.load_tokenizer"
            )
        model = super().from_header(where, header, device)
        recorded = header.get("codes_id")  # directories written before codes ids were recorded have none
        if recorded is not None and recorded != model.codes_id:
            raise ModelFormatError(
                f"{where.join(CONFIG_NAME)} records codes_id {recorded}, but the weights' is {model.codes_id}: "
                "the file was edited after it was saved"
            )
        model.source = header.get("source")
        model.parent = header.get("parent")
        return model


def family_of(header: dict) -> str:
    """The family a tokenizer directory's config.json names; directories saved before families were recorded
    hold the paper's VQ-VAE."""
    return header.get("family", "vqvae")


def pick_device(name: str) -> torch.device:
    """auto: this process's GPU (LOCAL_RANK under a launcher) when there is one, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
