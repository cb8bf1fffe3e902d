"""Other toolkits' checkpoints -> vqtok model directories (`vqtok import FORMAT SOURCE OUT`).

Every format is a function registered in FORMATS under its name: it reads SOURCE and returns a `Converted`, the
vqtok config and the weights under vqtok's names (the VQGAN network's names are taming-transformers' own, so a
converter is mostly a table of key renames). `import_model` does the rest the same way for all formats:

    converted = FORMATS[name](source, options)    # config + state dict in vqtok's names + the file they came from
    model = build_tokenizer(converted.config)     # refuses a state dict that does not fit it, key by key
    model.source = {"format", "file", "sha256"}   # provenance, saved in config.json
    model.save_pretrained(out)

A format adds itself with `@register("name")`. Checkpoints are read by `read_checkpoint`, with torch.load's
weights_only=True: a file that holds anything besides tensors and plain containers (a Lightning checkpoint's
hyper-parameters, say) would run code to load, and is refused unless the user says they trust it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from vqtok.config import VQGANConfig
from vqtok.errors import ConfigError, ModelFormatError
from vqtok.storage import Location

from . import build_tokenizer
from .base import Tokenizer


@dataclass(frozen=True)
class ImportOptions:
    """What the user tells an import besides FORMAT and SOURCE."""

    config: Location | None = None  # a separate config file, for formats whose checkpoints lack one (taming's YAML)
    trust_pickle: bool = False  # load checkpoints that need pickle's arbitrary code to load
    normalize_codes: bool | None = None  # l2-normalized lookup, where the checkpoint cannot tell; None: the format's


@dataclass(frozen=True)
class Converted:
    """What a format's converter returns: the model's config, its weights under vqtok's names, and the file those
    weights were read from (its name and SHA-256 are the model's provenance)."""

    config: VQGANConfig
    state: dict[str, torch.Tensor]
    file: Location


Converter = Callable[[Location, ImportOptions], Converted]
FORMATS: dict[str, Converter] = {}


def register(name: str) -> Callable[[Converter], Converter]:
    """Add a converter to FORMATS under `name`, the FORMAT of `vqtok import`."""

    def add(converter: Converter) -> Converter:
        FORMATS[name] = converter
        return converter

    return add


# -- the import --------------------------------------------------------------------------------------------------


def import_model(
    format: str,
    source: str | os.PathLike,
    out: str | os.PathLike,
    options: ImportOptions = ImportOptions(),
    storage_options: dict | None = None,
) -> Tokenizer:
    """Convert SOURCE, a checkpoint of `format`, into a vqtok model directory at `out`; returns the model."""
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}: vqtok imports {', '.join(sorted(FORMATS))}")
    where = Location.of(source, storage_options)
    if not where.exists():
        raise ModelFormatError(f"{where}: no such file or folder")
    converted = FORMATS[format](where, options)
    config = converted.config
    if options.normalize_codes is not None:
        config = replace(config, normalize_codes=options.normalize_codes)
    model = build_tokenizer(config)
    model.load_state_dict(complete_state(model, converted.state, where))
    model.source = {"format": format, "file": converted.file.name, "sha256": sha256(converted.file)}
    model.save_pretrained(out, storage_options)
    return model.eval()


def complete_state(model: Tokenizer, state: dict[str, torch.Tensor], where: Location) -> dict[str, torch.Tensor]:
    """`state` with the quantizer's training statistics (which no other toolkit keeps) taken from the new model;
    a state dict that does not fit the model is refused, naming the first key that is missing, unexpected or of
    another shape."""
    expected = model.state_dict()
    statistics = {f"quantizer.{name}" for name, _ in model.quantizer.named_buffers() if name != "codebook"}
    problems = (
        [
            f"key {name} holds a {type(value).__name__}, not a tensor"
            for name, value in state.items()
            if not isinstance(value, torch.Tensor)
        ]
        + [f"missing key {name}" for name in expected if name not in state and name not in statistics]
        + [f"unexpected key {name}" for name in state if name not in expected]
        + [
            f"key {name} has shape {tuple(state[name].shape)}, the config gives {tuple(expected[name].shape)}"
            for name in expected
            if isinstance(state.get(name), torch.Tensor) and state[name].shape != expected[name].shape
        ]
    )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ModelFormatError(f"{where} does not match its config: {problems[0]}{more}")
    return {**{name: expected[name] for name in statistics if name not in state}, **state}


# -- helpers for converters --------------------------------------------------------------------------------------


def sha256(where: Location) -> str:
    digest = hashlib.sha256()
    with where.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(where: Location, trust_pickle: bool = False):
    """A torch.save file's contents, loaded with weights_only=True unless the user trusts the file."""
    import pickle

    data = where.path if where.local else io.BytesIO(where.read_bytes())
    try:
        return torch.load(data, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ModelFormatError(f"{where} cannot be read as a PyTorch checkpoint: {first_line(str(e))}") from None
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n|$)", str(e))
        reason = found.group(1).strip() if found else first_line(str(e))
        raise ModelFormatError(
            f"{where} holds more than tensors ({reason}), and loading it would run code from the file: "
            "pass --trust-pickle if you trust where it came from"
        ) from None
    except (RuntimeError, EOFError, OSError, AttributeError, ModuleNotFoundError) as e:
        raise ModelFormatError(f"{where} cannot be read as a PyTorch checkpoint: {first_line(str(e))}") from None


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "no reason given"


def read_yaml(where: Location) -> dict:
    import yaml

    try:
        values = yaml.safe_load(where.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {first_line(str(e))}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where} is not a YAML mapping")
    return values


def rename(state: dict[str, torch.Tensor], renames: dict[str, str], drop: tuple[str, ...] = ()) -> dict:
    """Keys renamed by their longest matching prefix in `renames` (others kept as they are); keys under a prefix
    in `drop` left out."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(drop):
            continue
        prefix = max((p for p in renames if name.startswith(p)), key=len, default=None)
        out[name if prefix is None else renames[prefix] + name[len(prefix) :]] = tensor
    return out


def imported_config(**fields) -> VQGANConfig:
    """A VQGANConfig for a trained model: its codebook is learned (no moving averages), and never re-initialised
    or restarted, so that `vqtok fit` could fine-tune it as it was trained."""
    try:
        return VQGANConfig(decay=None, kmeans_init=False, dead_code_window=0, **fields)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"the checkpoint's settings do not make a VQGAN vqtok can build: {e}") from None


# -- taming-transformers -----------------------------------------------------------------------------------------


@register("taming")
def taming(source: Location, options: ImportOptions) -> Converted:
    """taming-transformers' VQModel: SOURCE is its checkpoint (last.ckpt: the weights under "state_dict"), and
    --config its YAML (model.params: ddconfig, n_embed, embed_dim). The training losses (loss.*: the
    discriminator, LPIPS) are left out."""
    if options.config is None:
        raise ConfigError("taming: a checkpoint does not record its network's shape: pass its YAML with --config")
    params = read_yaml(options.config).get("model", {}).get("params")
    if not isinstance(params, dict) or not {"ddconfig", "n_embed", "embed_dim"} <= set(params):
        raise ConfigError(f"{options.config}: expected model.params with ddconfig, n_embed and embed_dim")
    dd = params["ddconfig"]
    if dd.get("double_z", True):
        raise ConfigError(f"{options.config}: double_z is true, a KL autoencoder's setting, not a VQGAN's")
    if params.get("remap") is not None:
        raise ConfigError(f"{options.config}: remap (codes renumbered to a subset) is not supported")
    if dd.get("out_ch", 3) != dd.get("in_channels", 3) or not dd.get("resamp_with_conv", True):
        raise ConfigError(f"{options.config}: out_ch differs from in_channels or resamp_with_conv is false")
    resolution = dd["resolution"]
    levels = len(dd["ch_mult"])
    config = imported_config(
        in_channels=dd.get("in_channels", 3),
        base_channels=dd["ch"],
        channel_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        attn_levels=tuple(i for i in range(levels) if resolution // 2**i in dd.get("attn_resolutions", [])),
        z_channels=dd["z_channels"],
        dropout=dd.get("dropout", 0.0),
        codebook_size=params["n_embed"],
        code_dim=params["embed_dim"],
        image_size=resolution,
    )
    checkpoint = read_checkpoint(source, options.trust_pickle)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelFormatError(f"{source} is not a taming checkpoint: it has no 'state_dict'")
    state = rename(state, {"quantize.embedding.weight": "quantizer.codebook"}, drop=("loss.",))
    return Converted(config, state, source)
