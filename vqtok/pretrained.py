"""The model directory every vqtok model is saved as (the tokenizer and the prior alike).

    DIR/config.json          {"format_version", "vqtok_version", "kind", "model_id", "config": {...}}
    DIR/model.safetensors    the weights; safetensors holds tensors only, so loading runs no code (no pickle)

(A tokenizer's directory may also hold the discriminator it was trained against: `tokenizers.discriminator_file`.)

The model id is a hash of the weights: token files carry their tokenizer's id, so codes are never decoded
by another model, and a directory whose weights do not match its config.json is refused. DIR may be a local
path or a URL that fsspec opens (`vqtok.storage`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from pathlib import Path

import torch

from vqtok import __version__
from vqtok.errors import ConfigError, ModelFormatError
from vqtok.storage import Location

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RUN_MODEL_NAME = "model"  # the model directory inside a run folder, where `vqtok.runs` exports a run's model


def weights_hash(state: dict[str, torch.Tensor], settings: dict | None = None) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in name order, after `settings` (as JSON with
    sorted keys) where given; 16 hex digits."""
    digest = hashlib.sha256()
    if settings is not None:
        digest.update(json.dumps(settings, sort_keys=True).encode() + b"|")
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_directory(
    directory: str | os.PathLike,
    module: torch.nn.Module,
    kind: str,
    config: dict,
    storage_options: dict | None = None,
    extra: dict | None = None,
) -> Path | str:
    """Write module's weights and config.json into directory (created if needed), a local path or a URL;
    returns the directory (a Path, or the URL). `extra` adds entries to config.json beside the config."""
    where = Location.of(directory, storage_options)
    where.makedirs()
    state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    header = {
        "format_version": FORMAT_VERSION,
        "vqtok_version": __version__,
        "kind": kind,
        "model_id": weights_hash(state),
        "config": config,
        **(extra or {}),
    }
    # Each file whole or not at all (renamed into place, or uploaded in one piece), the weights before the
    # config.json that names them, so a crash never leaves half a model.
    write_tensors(where.join(WEIGHTS_NAME), state)
    write_header(where, header)
    return Path(where.path) if where.local else where.url


def write_tensors(file: Location, state: dict[str, torch.Tensor]) -> None:
    """A safetensors file of `state`, written whole (`Location.write_with`)."""
    from safetensors.torch import save_file

    file.write_with(lambda path: save_file(state, path, metadata={"format": "pt"}))


def write_header(directory: Location, header: dict) -> None:
    """DIR/config.json, written whole: last, after every file it names."""
    directory.join(CONFIG_NAME).write_bytes((json.dumps(header, indent=2) + "\n").encode())


def read_header(directory: str | os.PathLike | Location, kind: str | None = None) -> dict:
    """config.json of a model directory, checked: format version, model id and config are there, and with
    `kind` the directory holds that kind of model (directories saved before kinds were recorded are
    tokenizers)."""
    directory = Location.of(directory)
    config_file = directory.join(CONFIG_NAME)
    text = config_file.read_text(missing_ok=True)
    if text is None:
        raise not_a_model(directory)
    if not directory.join(WEIGHTS_NAME).isfile():
        raise ModelFormatError(f"{directory} is not a model directory: it holds no {WEIGHTS_NAME}")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(header, dict) or not {"format_version", "model_id", "config"} <= set(header):
        raise ModelFormatError(f"{config_file} is not a vqtok model config")
    version = header["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{directory} was written by a newer vqtok (model format {version}, this vqtok "
            f"{__version__} reads format {FORMAT_VERSION}): upgrade vqtok to load it"
        )
    if not isinstance(header["config"], dict):
        raise ModelFormatError(f"{config_file}: 'config' must be an object")
    found = header.setdefault("kind", "tokenizer")
    if kind is not None and found != kind:
        raise ModelFormatError(f"{directory} holds a {found}, not a {kind}")
    return header


def not_a_model(directory: Location) -> ModelFormatError:
    """What every command says of a path without config.json. A run folder is the commonest such path, given
    where the model directory inside it was meant: the message names that directory."""
    found = directory.kind()
    if found is None:
        return ModelFormatError(f"{directory} is not a model directory: nothing is there")
    if found == "file":
        return ModelFormatError(f"{directory} is not a model directory: it is a file")
    model = run_model(directory)
    hint = f"; did you mean {model}?" if model else ""
    return ModelFormatError(f"{directory} is not a model directory: it holds no {CONFIG_NAME}{hint}")


def run_model(folder: Location) -> Location | None:
    """The model directory inside `folder` when it is a run folder that exported one, else None."""
    model = folder.join(RUN_MODEL_NAME)
    return model if model.join(CONFIG_NAME).exists() else None


def read_safetensors(weights: Location) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, a local path or a URL; ModelFormatError if it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        # A local file is mapped, not read; from a store the bytes come whole.
        return load_file(weights.path) if weights.local else load(weights.read_bytes())
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"{weights} cannot be read: {e}") from None


def state_mismatch(
    state: dict,
    expected: dict[str, torch.Tensor],
    optional: Collection[str] = (),
    prefix: str = "",
    expected_by: str = "the config gives",
) -> str | None:
    """The first way `state` does not fit `expected` (a module's state dict), in words, with how many more there
    are; None where it fits. Keys in `optional` may be missing; `prefix` goes before every key named (the name
    the user's file gives it); `expected_by` comes between a key's shape and the expected one."""
    problems = (
        [
            f"key {prefix}{name} holds a {type(value).__name__}, not a tensor"
            for name, value in state.items()
            if not isinstance(value, torch.Tensor)
        ]
        + [f"missing key {prefix}{name}" for name in expected if name not in state and name not in optional]
        + [f"unexpected key {prefix}{name}" for name in state if name not in expected]
        + [
            f"key {prefix}{name} has shape {tuple(state[name].shape)}, {expected_by} {tuple(expected[name].shape)}"
            for name in expected
            if isinstance(state.get(name), torch.Tensor) and state[name].shape != expected[name].shape
        ]
    )
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")


def load_weights(directory: str | os.PathLike | Location, module: torch.nn.Module, header: dict) -> None:
    """Load DIR/model.safetensors into module, refusing weights that do not fit it or its model id."""
    weights = Location.of(directory).join(WEIGHTS_NAME)
    state = read_safetensors(weights)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(n for n in set(expected) & set(state) if expected[n].shape != state[n].shape)
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if names
        ]
        raise ModelFormatError(f"{weights} does not match its config.json ({'; '.join(problems)})")
    if weights_hash(state) != header["model_id"]:
        raise ModelFormatError(
            f"{weights} is not the weights config.json describes (model_id differs): "
            "the directory was changed or mixed with another model's files"
        )
    module.load_state_dict(state)


class Pretrained:
    """model_id, save_pretrained and from_pretrained for an nn.Module built from one config dataclass (which
    `config_class.from_dict` reads back) and saved as a directory of kind KIND."""

    KIND: str
    config_class: type

    def header_extras(self) -> dict:
        """Entries of config.json beside the config that a subclass records (a tokenizer's family, say)."""
        return {}

    @property
    def model_id(self) -> str:
        """A hash of the weights: token files and priors carry it, so codes never meet another model."""
        return weights_hash(self.state_dict())

    def save_pretrained(self, directory: str | os.PathLike, storage_options: dict | None = None) -> Path | str:
        """Write config.json and model.safetensors into directory (created if needed), a local path or a URL
        that fsspec opens; returns the directory (a Path, or the URL)."""
        return save_directory(
            directory, self, self.KIND, self.config.to_dict(), storage_options, extra=self.header_extras()
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", storage_options: dict | None = None
    ):
        """Load a directory written by save_pretrained (a local path or a URL), in eval mode. Reads no pickle."""
        where = Location.of(directory, storage_options)
        return cls.from_header(where, read_header(where, cls.KIND), device)

    @classmethod
    def config_from_header(cls, where: Location, header: dict):
        """The config in a directory's config.json (`read_header`), checked."""
        try:
            return cls.config_class.from_dict(header["config"])
        except (ConfigError, TypeError) as e:
            raise ModelFormatError(f"{where.join(CONFIG_NAME)}: {e}") from None

    @classmethod
    def from_header(cls, where: Location, header: dict, device: str | torch.device = "cpu"):
        """The model of a directory whose config.json (`read_header`) has been read already."""
        model = cls(cls.config_from_header(where, header))
        load_weights(where, model, header)
        return model.to(device).eval()
