"""Tokenizer families behind one interface (`base.Tokenizer`), and `load_tokenizer`, which opens a model
directory of any of them.

    vqvae.py        the paper's network (`VQVAE`), which `vqtok fit` trains by default
    vqgan.py        the taming-transformers network (`VQGAN`) that LlamaGen and diffusers' VQModel reuse
    quantizers.py   the vector quantizer every family uses
    base.py         the interface every command uses: encode, decode, codebook_size, stride, model_id, ...

config.json names a directory's family; one that names none holds a VQ-VAE (saved before families existed).
"""

from __future__ import annotations

import os

import torch

from vqtok.errors import ModelFormatError
from vqtok.pretrained import read_header
from vqtok.storage import Location

from .base import Tokenizer, family_of, pick_device
from .vqgan import VQGAN
from .vqvae import VQVAE

FAMILIES: dict[str, type[Tokenizer]] = {"vqvae": VQVAE, "vqgan": VQGAN}

__all__ = [
    "FAMILIES",
    "VQGAN",
    "VQVAE",
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "pick_device",
    "tokenizer_config",
]


def build_tokenizer(config) -> Tokenizer:
    """A new (untrained) tokenizer of the family whose config class `config` is."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family(config)
    raise TypeError(f"no tokenizer family takes a {type(config).__name__}")


def load_tokenizer(
    directory: str | os.PathLike, device: str | torch.device = "cpu", storage_options: dict | None = None
) -> Tokenizer:
    """The tokenizer in a model directory (a local path or a URL), of whichever family it names, in eval mode."""
    where = Location.of(directory, storage_options)
    header = read_header(where, Tokenizer.KIND)
    return family_class(where, header).from_header(where, header, device)


def tokenizer_config(directory: str | os.PathLike, storage_options: dict | None = None):
    """The config of the tokenizer in a model directory, from its config.json alone, without reading the weights."""
    where = Location.of(directory, storage_options)
    header = read_header(where, Tokenizer.KIND)
    return family_class(where, header).config_from_header(where, header)


def family_class(where: Location, header: dict) -> type[Tokenizer]:
    """The class of the family a tokenizer directory's config.json names."""
    family = family_of(header)
    if family not in FAMILIES:
        raise ModelFormatError(
            f"{where} holds a tokenizer of family {family!r}, which this vqtok does not know "
            f"(it knows {', '.join(FAMILIES)}): upgrade vqtok to load it"
        )
    return FAMILIES[family]
