"""What `vqtok info` reports of a path, as a plain dict: a tokenizer's model directory, a prior's, or a token
dataset (`vqtok.tokens.summarize`). The command line only renders it; `--json` prints it as it is."""

from __future__ import annotations

import os

from vqtok.pretrained import CONFIG_NAME, not_a_model, read_header, run_model
from vqtok.storage import Location
from vqtok.tokens import summarize

GRID_SIZES = (64, 128, 256)  # image sizes whose grids are shown beside the training size's


def describe(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """{"kind": "tokenizer" | "prior" | "tokens", ...}: what the model or the token dataset at `path` holds."""
    where = Location.of(path, storage_options)
    if where.join(CONFIG_NAME).exists():
        kind = read_header(where)["kind"]
        return describe_prior(where) if kind == "prior" else describe_tokenizer(where)
    if run_model(where):
        raise not_a_model(where)  # a run folder: which model to describe is a guess, so say where it is
    return {"kind": "tokens", **summarize(where)}


def describe_tokenizer(where: Location) -> dict:
    """Family, provenance (an import's source, a fine-tune's parent), model id and codes id, size, K and D, the
    grid at several image sizes, the whole config, and the discriminator the directory holds beside the model."""
    from vqtok.tokenizers import load_tokenizer

    model = load_tokenizer(where)
    config = model.config
    return {
        "kind": "tokenizer",
        "path": str(where),
        "family": model.FAMILY,
        "source": model.source,
        "parent": model.parent,
        "model_id": model.model_id,
        "codes_id": model.codes_id,
        "parameters": sum(p.numel() for p in model.parameters()),
        "codebook_size": model.codebook_size,
        "code_dim": config.quantizer.code_dim,
        "image_size": config.image_size,
        "grid": list(model.grid_size(config.image_size)),
        "grids": {size: list(model.grid_size(size)) for size in sorted({config.image_size, *GRID_SIZES})},
        "config": config.to_dict(),
        "discriminator": describe_discriminator(where),
    }


def describe_discriminator(where: Location) -> dict | None:
    """The shape, parameter count and weights id of the discriminator in a tokenizer's directory, read and
    checked whole (`read_discriminator`); None where it holds none."""
    import torch

    from vqtok.pretrained import weights_hash
    from vqtok.tokenizers.discriminator_file import read_discriminator
    from vqtok.tokenizers.losses import NLayerDiscriminator

    found = read_discriminator(where)
    if found is None:
        return None
    shape, state = found
    with torch.device("meta"):  # its parameters' shapes, without allocating them
        parameters = sum(p.numel() for p in NLayerDiscriminator(**shape).parameters())
    return {**shape, "parameters": parameters, "weights_id": weights_hash(state)}


def describe_prior(where: Location) -> dict:
    """Size, the transformer's shape, the tokens it models (K, grid, classes, the tokenizer's model id and codes
    id)."""
    from vqtok.prior import Prior

    prior = Prior.from_pretrained(where)
    config = prior.config
    return {
        "kind": "prior",
        "path": str(where),
        "model_id": prior.model_id,
        "parameters": sum(p.numel() for p in prior.parameters()),
        "codebook_size": config.codebook_size,
        "grid": list(config.grid),
        "num_classes": config.num_classes,
        "tokenizer": config.tokenizer,
        "codes_id": config.codes_id,
        "image_size": config.image_size,
        "config": config.to_dict(),
    }
