"""The discriminator a tokenizer's model directory may hold beside the model, so that a fine-tune starts its
adversarial loss from the discriminator that was trained with the model rather than from a new one:

    DIR/discriminator.safetensors   a PatchGAN's state dict (`losses.NLayerDiscriminator`, taming's and LlamaGen's)
    DIR/config.json                 "discriminator": {"in_channels", "filters", "layers", "weights_id"}

It is no part of what encodes or decodes: model.safetensors, the model_id and the codes_id are the same with it
and without it. The file is written whole before config.json names it, and read with no pickle. `vqtok import`
keeps the one a taming or LlamaGen training checkpoint holds; a training run saves its own into the model
directory it has exported, and a fine-tune of that directory reads it back:

    save_discriminator(model_dir, discriminator)     # after model.save_pretrained(model_dir)
    shape, state = read_discriminator(model_dir)     # or None, for a directory without one
    NLayerDiscriminator(**shape).load_state_dict(state)
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from vqtok.errors import ModelFormatError, plural
from vqtok.pretrained import (
    CONFIG_NAME,
    read_header,
    read_safetensors,
    state_mismatch,
    weights_hash,
    write_header,
    write_tensors,
)
from vqtok.storage import Location

from .base import Tokenizer
from .losses import NLayerDiscriminator

DISCRIMINATOR_NAME = "discriminator.safetensors"
SHAPE = ("in_channels", "filters", "layers")  # NLayerDiscriminator's arguments, as config.json records them


def describe(shape: dict[str, int]) -> str:
    layers, filters, channels = shape["layers"], shape["filters"], shape["in_channels"]
    return (
        f"a PatchGAN of {layers} {plural(layers, 'layer')}, {filters} {plural(filters, 'filter')} and {channels} "
        f"input {plural(channels, 'channel')} (BatchNorm between its convolutions)"
    )


def shape_mismatch(state: dict, shape: dict[str, int], prefix: str = "") -> str | None:
    """The first key of `state` that does not fit NLayerDiscriminator(**shape), in words; None where all fit."""
    with torch.device("meta"):  # the shapes alone: nothing is allocated or drawn
        expected = NLayerDiscriminator(**shape).state_dict()
    return state_mismatch(state, expected, prefix=prefix, expected_by="not")


def discriminator_shape(state: dict, what: str, prefix: str = "") -> dict[str, int]:
    """in_channels, filters and layers of a PatchGAN's state dict, read from its first convolution's weight
    (filters, in_channels, 4, 4) and the index of its last convolution (main.{3 * layers + 2}); ModelFormatError
    naming the first key that does not fit NLayerDiscriminator of that shape. `what` and `prefix` say where the
    state dict came from in the messages."""
    first = state.get("main.0.weight")
    if not isinstance(first, torch.Tensor) or first.ndim != 4:
        raise ModelFormatError(f"{what} is not a PatchGAN discriminator: it has no 4-d {prefix}main.0.weight")
    last = max(int(m[1]) for name in state if (m := re.match(r"main\.(\d+)\.", name)))
    shape = {"in_channels": first.shape[1], "filters": first.shape[0], "layers": max(1, (last - 2) // 3)}
    problem = shape_mismatch(state, shape, prefix)
    if problem:
        raise ModelFormatError(f"{what} is not {describe(shape)}, the discriminator vqtok trains: {problem}")
    return shape


def save_discriminator(
    directory: str | os.PathLike, discriminator: nn.Module, storage_options: dict | None = None
) -> dict:
    """Write `discriminator` (an NLayerDiscriminator, not wrapped for distributed training) into the tokenizer's
    model directory DIR, a path or a URL where the model is saved already: DIR/discriminator.safetensors, then
    config.json with its entry, which this returns. The model's files and ids are left as they are."""
    where = Location.of(directory, storage_options)
    read_header(where, Tokenizer.KIND)
    state = {name: t.detach().cpu().contiguous() for name, t in discriminator.state_dict().items()}
    shape = discriminator_shape(state, f"the discriminator to save into {where}")
    entry = {**shape, "weights_id": weights_hash(state)}
    write_tensors(where.join(DISCRIMINATOR_NAME), state)
    # config.json as it was written, without what read_header fills in for older directories
    header = json.loads(where.join(CONFIG_NAME).read_text())
    write_header(where, {**header, "discriminator": entry})
    return entry


def read_discriminator(
    directory: str | os.PathLike | Location, storage_options: dict | None = None
) -> tuple[dict[str, int], dict[str, torch.Tensor]] | None:
    """The discriminator a tokenizer's model directory holds: (its shape, {"in_channels", "filters", "layers"},
    and its state dict), or None where config.json names none (every directory written before discriminators
    were kept). ModelFormatError where the file is missing, does not fit the recorded shape (naming the first
    key) or is not the one config.json records."""
    where = Location.of(directory, storage_options)
    entry = read_header(where, Tokenizer.KIND).get("discriminator")
    if entry is None:
        return None
    config_file = where.join(CONFIG_NAME)
    if (
        not isinstance(entry, dict)
        or set(entry) != {*SHAPE, "weights_id"}
        or not all(type(entry[name]) is int and entry[name] > 0 for name in SHAPE)
        or not isinstance(entry["weights_id"], str)
    ):
        raise ModelFormatError(
            f"{config_file}: 'discriminator' must hold positive integers {', '.join(SHAPE)} and a weights_id"
        )
    file = where.join(DISCRIMINATOR_NAME)
    if not file.isfile():
        raise ModelFormatError(f"{config_file} names a discriminator, but {file} is not there")
    state = read_safetensors(file)
    shape = {name: entry[name] for name in SHAPE}
    problem = shape_mismatch(state, shape)
    if problem:
        raise ModelFormatError(f"{file} is not {describe(shape)}, as config.json records: {problem}")
    if weights_hash(state) != entry["weights_id"]:
        raise ModelFormatError(
            f"{file} is not the discriminator config.json describes (weights_id differs): the directory was "
            "changed or mixed with another model's files"
        )
    return shape, state
