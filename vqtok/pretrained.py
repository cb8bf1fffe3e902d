"""The model directory every vqtok model is saved as (the tokenizer and the prior alike).

    DIR/config.json          {"format_version", "vqtok_version", "kind", "model_id", "config": {...}}
    DIR/model.safetensors    the weights; safetensors holds tensors only, so loading runs no code (no pickle)

The model id is a hash of the weights: token files carry their tokenizer's id, so codes are never decoded
by another model, and a directory whose weights do not match its config.json is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from vqtok import __version__
from vqtok.errors import ConfigError, ModelFormatError
from vqtok.files import write_atomically

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in name order; 16 hex digits."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_directory(directory: str | os.PathLike, module: torch.nn.Module, kind: str, config: dict) -> Path:
    """Write module's weights and config.json into directory (created if needed); returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    header = {
        "format_version": FORMAT_VERSION,
        "vqtok_version": __version__,
        "kind": kind,
        "model_id": weights_hash(state),
        "config": config,
    }
    # Written under temporary names and renamed, so a crash never leaves half a model.
    write_atomically(directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, lambda path: Path(path).write_text(json.dumps(header, indent=2) + "\n"))
    return directory


def read_header(directory: str | os.PathLike, kind: str | None = None) -> dict:
    """config.json of a model directory, checked: format version, model id and config are there, and with
    `kind` the directory holds that kind of model (directories saved before kinds were recorded are
    tokenizers)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFormatError(f"{directory} is not a model directory (expected a folder with {CONFIG_NAME})")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise ModelFormatError(f"{directory} is not a vqtok model directory: {name} is missing")
    try:
        header = json.loads((directory / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{directory / CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(header, dict) or not {"format_version", "model_id", "config"} <= set(header):
        raise ModelFormatError(f"{directory / CONFIG_NAME} is not a vqtok model config")
    version = header["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{directory} was written by a newer vqtok (model format {version}, this vqtok "
            f"{__version__} reads format {FORMAT_VERSION}): upgrade vqtok to load it"
        )
    if not isinstance(header["config"], dict):
        raise ModelFormatError(f"{directory / CONFIG_NAME}: 'config' must be an object")
    found = header.setdefault("kind", "tokenizer")
    if kind is not None and found != kind:
        raise ModelFormatError(f"{directory} holds a {found}, not a {kind}")
    return header


def load_weights(directory: str | os.PathLike, module: torch.nn.Module, header: dict) -> None:
    """Load DIR/model.safetensors into module, refusing weights that do not fit it or its model id."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        state = load_file(directory / WEIGHTS_NAME)
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"{directory / WEIGHTS_NAME} cannot be read: {e}") from None
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
        raise ModelFormatError(f"{directory / WEIGHTS_NAME} does not match its config.json ({'; '.join(problems)})")
    if weights_hash(state) != header["model_id"]:
        raise ModelFormatError(
            f"{directory / WEIGHTS_NAME} is not the weights config.json describes (model_id differs): "
            "the directory was changed or mixed with another model's files"
        )
    module.load_state_dict(state)


class Pretrained:
    """model_id, save_pretrained and from_pretrained for an nn.Module built from one config dataclass (which
    `config_class.from_dict` reads back) and saved as a directory of kind KIND."""

    KIND: str
    config_class: type

    @property
    def model_id(self) -> str:
        """A hash of the weights: token files and priors carry it, so codes never meet another model."""
        return weights_hash(self.state_dict())

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into directory (created if needed)."""
        return save_directory(directory, self, self.KIND, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"):
        """Load a directory written by save_pretrained, in eval mode. Reads no pickle."""
        header = read_header(directory, cls.KIND)
        try:
            config = cls.config_class.from_dict(header["config"])
        except (ConfigError, TypeError) as e:
            raise ModelFormatError(f"{Path(directory) / CONFIG_NAME}: {e}") from None
        model = cls(config)
        load_weights(directory, model, header)
        return model.to(device).eval()
