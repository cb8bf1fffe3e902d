"""Other toolkits' checkpoints -> vqtok model directories (`vqtok import FORMAT SOURCE OUT`).

Every format is a function registered in FORMATS under its name: it reads SOURCE and returns a `Converted`, the
vqtok config and the weights under vqtok's names (the VQGAN network's names are taming-transformers' own, so a
converter is mostly a table of key renames). `import_model` does the rest the same way for all formats:

    converted = FORMATS[name](source, options)    # config + state dict in vqtok's names + the file they came from
    model = build_tokenizer(converted.config)     # refuses a state dict that does not fit it, key by key
    model.source = {"format", "file", "sha256"}   # provenance, saved in config.json
    model.save_pretrained(out)
    save_discriminator(out, converted.discriminator)   # where the checkpoint holds one (`discriminator_file`)

A format adds itself with `@register("name")`. Checkpoints are read by `read_checkpoint`, with torch.load's
weights_only=True: a file that holds anything besides tensors and plain containers (a Lightning checkpoint's
hyper-parameters, say) would run code to load, and is refused unless the user says they trust it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from vqtok.config import QuantizerConfig, VQGANConfig
from vqtok.errors import ConfigError, ModelFormatError
from vqtok.pretrained import CONFIG_NAME, read_safetensors, state_mismatch
from vqtok.storage import Location

from . import build_tokenizer
from .base import Tokenizer
from .discriminator_file import discriminator_shape, save_discriminator
from .losses import NLayerDiscriminator


@dataclass(frozen=True)
class ImportOptions:
    """What the user tells an import besides FORMAT and SOURCE."""

    config: Location | None = None  # a separate config file, for formats whose checkpoints lack one (taming's YAML)
    trust_pickle: bool = False  # load checkpoints that need pickle's arbitrary code to load
    normalize_codes: bool | None = None  # l2-normalized lookup, where the checkpoint cannot tell; None: the format's
    image_size: int | None = None  # the size commands crop to by default; None: the format's (its training size)
    overwrite: bool = False  # replace a model already at OUT


@dataclass(frozen=True)
class Converted:
    """What a format's converter returns: the model's config, its weights under vqtok's names, the file those
    weights were read from (its name and SHA-256 are the model's provenance), and the discriminator trained with
    them where the checkpoint holds one (`imported_discriminator`)."""

    config: VQGANConfig
    state: dict[str, torch.Tensor]
    file: Location
    discriminator: NLayerDiscriminator | None = None


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
    target = Location.of(out, storage_options)
    if not options.overwrite and target.join(CONFIG_NAME).exists():
        raise ConfigError(f"{target} already holds a model: pass --overwrite to replace it")
    where = Location.of(source, storage_options)
    if not where.exists():
        raise ModelFormatError(f"{where}: no such file or folder")
    converted = FORMATS[format](where, options)
    config = converted.config
    if options.normalize_codes is not None:
        config = replace(config, quantizer=replace(config.quantizer, normalize_codes=options.normalize_codes))
    if options.image_size is not None:
        config = replace(config, image_size=options.image_size)
    model = build_tokenizer(config)
    model.load_state_dict(complete_state(model, converted.state, where))
    model.source = {"format": format, "file": converted.file.name, "sha256": sha256(converted.file)}
    model.save_pretrained(out, storage_options)
    if converted.discriminator is not None:
        save_discriminator(out, converted.discriminator, storage_options)
    return model.eval()


def complete_state(model: Tokenizer, state: dict[str, torch.Tensor], where: Location) -> dict[str, torch.Tensor]:
    """`state` with the quantizer's training statistics (which no other toolkit keeps) taken from the new model;
    a state dict that does not fit the model is refused, naming the first key that is missing, unexpected or of
    another shape."""
    expected = model.state_dict()
    statistics = {f"quantizer.{name}" for name, _ in model.quantizer.named_buffers() if name != "codebook"}
    problem = state_mismatch(state, expected, optional=statistics)
    if problem:
        raise ModelFormatError(f"{where} does not match its config: {problem}")
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
        # weights_only refuses what only pickle's code could rebuild: say so, and how to load it anyway
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n|$)", str(e))
        if refused is None or trust_pickle:
            raise ModelFormatError(f"{where} cannot be read as a PyTorch checkpoint: {first_line(str(e))}") from None
        raise ModelFormatError(
            f"{where} holds more than tensors ({refused.group(1).strip()}), and loading it would run code from the "
            "file: pass --trust-pickle if you trust where it came from"
        ) from None
    except Exception as e:  # noqa: BLE001 (bytes that are no checkpoint fail in many ways inside the unpickler)
        raise ModelFormatError(
            f"{where} cannot be read as a PyTorch checkpoint: {first_line(str(e)) or type(e).__name__}"
        ) from None


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "no reason given"


def read_yaml(where: Location) -> dict:
    import yaml

    try:
        values = yaml.safe_load(where.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not a YAML file (it is not text)") from None
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


def imported_discriminator(state: dict, what: str, prefix: str = "") -> NLayerDiscriminator:
    """The PatchGAN a checkpoint's discriminator state dict (under NLayerDiscriminator's names, `main.N.*`) is,
    its shape read from the weights; ModelFormatError naming the first key that does not fit, before anything
    is written. `what` and `prefix` name it as the checkpoint does, for the messages."""
    discriminator = NLayerDiscriminator(**discriminator_shape(state, what, prefix))
    discriminator.load_state_dict(state)
    return discriminator


def imported_config(codebook_size: int, code_dim: int, normalize_codes: bool = False, **network) -> VQGANConfig:
    """A VQGANConfig for a trained model: its codebook is learned (no moving averages), and never re-initialised
    or restarted, so that `vqtok fit` could fine-tune it as it was trained."""
    try:
        quantizer = QuantizerConfig(
            codebook_size=codebook_size,
            code_dim=code_dim,
            decay=None,
            kmeans_init=False,
            dead_code_window=0,
            normalize_codes=normalize_codes,
        )
        return VQGANConfig(quantizer=quantizer, **network)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"the checkpoint's settings do not make a VQGAN vqtok can build: {e}") from None


# -- taming-transformers -----------------------------------------------------------------------------------------

TAMING_DISCRIMINATOR = "loss.discriminator."  # VQLPIPSWithDiscriminator's NLayerDiscriminator, in VQModel's state


@register("taming")
def taming(source: Location, options: ImportOptions) -> Converted:
    """taming-transformers' VQModel: SOURCE is its checkpoint (last.ckpt: the weights under "state_dict"), and
    --config its YAML (model.params: ddconfig, n_embed, embed_dim). The discriminator its loss trained
    (loss.discriminator.*) is kept where the checkpoint holds it; the rest of loss.* (LPIPS, which vqtok reads
    from lpips' own file) is left out."""
    if options.config is None:
        raise ConfigError("taming: a checkpoint does not record its network's shape: pass its YAML with --config")
    params = read_yaml(options.config).get("model", {}).get("params")
    if not isinstance(params, dict) or not {"ddconfig", "n_embed", "embed_dim"} <= set(params):
        raise ConfigError(f"{options.config}: expected model.params with ddconfig, n_embed and embed_dim")
    dd = params["ddconfig"]
    required = ("resolution", "ch", "ch_mult", "num_res_blocks", "z_channels")
    if not isinstance(dd, dict) or not set(required) <= set(dd):
        raise ConfigError(f"{options.config}: model.params.ddconfig must hold {', '.join(required)}")
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
    found = {
        name[len(TAMING_DISCRIMINATOR) :]: tensor
        for name, tensor in state.items()
        if name.startswith(TAMING_DISCRIMINATOR)
    }
    what = f"{source}: its discriminator ({TAMING_DISCRIMINATOR}*)"
    discriminator = imported_discriminator(found, what, TAMING_DISCRIMINATOR) if found else None
    state = rename(state, {"quantize.embedding.weight": "quantizer.codebook"}, drop=("loss.",))
    return Converted(config, state, source, discriminator)


# -- diffusers ---------------------------------------------------------------------------------------------------

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# VQModel's defaults (diffusers/models/autoencoders/vq_model.py), for the settings an older config.json leaves out
VQMODEL_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "norm_type": "group",
    "mid_block_add_attention": True,
}
# the block types that are this network's levels, and whether each attends
DOWN_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
UP_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
# diffusers' attention names (today's, and the deprecated ones older checkpoints keep) -> taming's
ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}


@register("diffusers")
def diffusers(source: Location, options: ImportOptions) -> Converted:
    """A diffusers `VQModel` directory (latent-diffusion's VQ-f4 in CompVis/ldm-celebahq-256, aMUSEd's VQGAN):
    config.json and diffusion_pytorch_model.safetensors (or .bin), local or at a URL such as
    hf://amused/amused-256/vqvae. A setting vqtok's network does not implement is refused, never imported
    approximately."""
    config_file = source.join("config.json")
    values = read_json(config_file)
    if values is None:
        inside = [folder for folder in map(source.join, source.names()) if is_vqmodel(folder)]
        hint = f"; did you mean {' or '.join(map(str, inside))}?" if inside else ""
        raise ModelFormatError(f"{source} is not a VQModel folder: it holds no config.json{hint}")
    config = diffusers_config(values, config_file)
    weights = next((file for file in map(source.join, DIFFUSERS_WEIGHTS) if file.exists()), None)
    if weights is None:
        raise ModelFormatError(f"{source} holds no {' or '.join(DIFFUSERS_WEIGHTS)}")
    if weights.name.endswith(".safetensors"):
        state = read_safetensors(weights)
    else:
        state = read_checkpoint(weights, options.trust_pickle)
    if not isinstance(state, dict):
        raise ModelFormatError(f"{weights} holds a {type(state).__name__}, not a state dict")
    levels, blocks = len(config.channel_mult), config.num_res_blocks
    state = as_convolutions(rename(state, diffusers_renames(levels, blocks)))
    return Converted(config, state, weights)


def read_json(file: Location) -> dict | None:
    """A JSON object's file; None when there is no such file."""
    text = file.read_text(missing_ok=True)
    if text is None:
        return None
    try:
        values = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{file} is not JSON: {e}") from None
    if not isinstance(values, dict):
        raise ModelFormatError(f"{file} is not a JSON object")
    return values


def is_vqmodel(folder: Location) -> bool:
    """Whether folder holds a diffusers VQModel's config.json: a pipeline's download keeps it in vqvae/, beside
    the other models' folders."""
    try:
        values = read_json(folder.join("config.json"))
    except ModelFormatError:
        return False
    return values is not None and values.get("_class_name") == "VQModel"


def diffusers_config(values: dict, where: Location) -> VQGANConfig:
    """A VQModel's config.json as a VQGANConfig; ConfigError naming the first setting vqtok's network lacks."""
    if values.get("_class_name", "VQModel") != "VQModel":
        raise ConfigError(f"{where} describes a diffusers {values['_class_name']}, not a VQModel")
    c = {**VQMODEL_DEFAULTS, **values}

    def unsupported(setting: str, what: str) -> ConfigError:
        return ConfigError(f"{where}: {setting} {c[setting]!r} means {what}, which vqtok's VQGAN network does not have")

    widths = c["block_out_channels"]
    if not isinstance(widths, list) or not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ConfigError(f"{where}: block_out_channels must be a list of positive integers, got {widths!r}")
    if c["norm_type"] != "group":
        raise unsupported("norm_type", "a decoder normalized by the quantized latents (MoVQ's spatial norm)")
    if c["act_fn"] != "silu":
        raise unsupported("act_fn", "another activation than swish")
    if c["norm_num_groups"] != 32:
        raise unsupported("norm_num_groups", "GroupNorm with other than 32 groups")
    if c["out_channels"] != c["in_channels"]:
        raise unsupported("out_channels", f"images of other than the input's {c['in_channels']} channels")
    for setting, known in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        if any(kind not in known for kind in c[setting]):
            raise unsupported(setting, f"{next(k for k in c[setting] if k not in known)} blocks")
        if len(c[setting]) != len(widths):
            raise unsupported(setting, f"other than one block per width of block_out_channels {widths}")
    if any(width % widths[0] for width in widths):
        raise unsupported("block_out_channels", f"widths that are not multiples of the first, {widths[0]}")
    attends = [DOWN_BLOCKS[kind] for kind in c["down_block_types"]]
    if attends != [UP_BLOCKS[kind] for kind in reversed(c["up_block_types"])]:  # the decoder's run last level first
        raise unsupported("up_block_types", "attention at other levels of the decoder than of the encoder")
    return imported_config(
        in_channels=c["in_channels"],
        base_channels=widths[0],
        channel_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=c["layers_per_block"],
        attn_levels=tuple(level for level, attention in enumerate(attends) if attention),
        mid_attention=c["mid_block_add_attention"],
        z_channels=c["latent_channels"],
        codebook_size=c["num_vq_embeddings"],
        code_dim=c["vq_embed_dim"] or c["latent_channels"],
        # config.json's sample_size is often VQModel's default (32, aMUSEd's): the published models take 256 px
        image_size=256,
    )


def diffusers_renames(levels: int, blocks: int) -> dict[str, str]:
    """diffusers' VQModel prefixes -> taming's. The decoder's `up_blocks` run lowest resolution first, so
    `up_blocks.0` is taming's `up.{levels - 1}`; each of its levels has one residual block more than the
    encoder's."""
    renames = {"quantize.embedding.weight": "quantizer.codebook"}
    for part in ("encoder", "decoder"):
        renames[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        renames[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        renames[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        renames |= attention_renames(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")
    for i in range(levels):
        up = levels - 1 - i
        renames[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        renames[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{up}.upsample."
        for theirs, ours, count in (
            (f"encoder.down_blocks.{i}", f"encoder.down.{i}", blocks),
            (f"decoder.up_blocks.{i}", f"decoder.up.{up}", blocks + 1),
        ):
            for j in range(count):
                renames[f"{theirs}.resnets.{j}."] = f"{ours}.block.{j}."
                renames[f"{theirs}.resnets.{j}.conv_shortcut."] = f"{ours}.block.{j}.nin_shortcut."
                renames |= attention_renames(f"{theirs}.attentions.{j}.", f"{ours}.attn.{j}.")
    return renames


def attention_renames(theirs: str, ours: str) -> dict[str, str]:
    return {f"{theirs}{name}.": f"{ours}{taming}." for name, taming in ATTENTION_NAMES.items()}


def as_convolutions(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' attention projections are Linear layers: their (C, C) weights become the (C, C, 1, 1) of the
    1x1 convolutions taming uses, the same map."""
    projection = re.compile(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$")
    return {
        name: tensor[:, :, None, None] if tensor.ndim == 2 and projection.search(name) else tensor
        for name, tensor in state.items()
    }


# -- LlamaGen ----------------------------------------------------------------------------------------------------


@register("llamagen")
def llamagen(source: Location, options: ImportOptions) -> Converted:
    """LlamaGen's VQ tokenizers (tokenizer/tokenizer_image/vq_model.py): vq_ds8_c2i.pt (VQ-8) or vq_ds16_c2i.pt
    (VQ-16), a dict whose "model" entry is the state dict. Everything but the l2-normalized lookup is read from
    the weights; that is on, as in LlamaGen, unless --no-normalize-codes. The checkpoints vq_train.py saves also
    hold the discriminator its loss trained ("discriminator": discriminator_patchgan.py's NLayerDiscriminator,
    taming's, with BatchNorm), which is kept; the released files hold "model" alone."""
    checkpoint = read_checkpoint(source, options.trust_pickle)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "encoder.conv_in.weight" not in state:
        raise ModelFormatError(f"{source} is not a LlamaGen VQ checkpoint: no 'model' holds an encoder's weights")
    config = llamagen_config(state, source)
    state = rename(state, llamagen_renames(len(config.channel_mult)), drop=("quantize.codebook_used",))
    discriminator = checkpoint.get("discriminator")
    if discriminator is not None:
        what = f"{source}: its 'discriminator'"
        if not isinstance(discriminator, dict):
            raise ModelFormatError(f"{what} holds a {type(discriminator).__name__}, not a state dict")
        discriminator = imported_discriminator(discriminator, what)
    return Converted(config, state, source, discriminator)


def llamagen_config(state: dict[str, torch.Tensor], where: Location) -> VQGANConfig:
    """What a LlamaGen state dict tells of its network: its levels (4: VQ-8, 5: VQ-16), their widths and blocks,
    the levels that attend (LlamaGen's last), z channels, K and the code dimension (the codebook's shape)."""

    def shape(name: str) -> torch.Size:
        if not isinstance(state.get(name), torch.Tensor):
            raise ModelFormatError(f"{where} is not a LlamaGen VQ checkpoint: it has no {name}")
        return state[name].shape

    def count(pattern: str) -> int:
        return 1 + max((int(m[1]) for name in state if (m := re.match(pattern, name))), default=-1)

    levels, blocks = count(r"encoder\.conv_blocks\.(\d+)\."), count(r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
    base = shape("encoder.conv_in.weight")[0]
    widths = [shape(f"encoder.conv_blocks.{level}.res.0.conv1.weight")[0] for level in range(levels)]
    if any(width % base for width in widths):
        raise ModelFormatError(f"{where}: level widths {widths} are not multiples of conv_in's {base} channels")
    codebook_size, code_dim = shape("quantize.embedding.weight")
    return imported_config(
        base_channels=base,
        channel_mult=tuple(width // base for width in widths),
        num_res_blocks=blocks,
        attn_levels=tuple(i for i in range(levels) if f"encoder.conv_blocks.{i}.attn.0.q.weight" in state),
        z_channels=shape("encoder.conv_out.weight")[0],
        codebook_size=codebook_size,
        code_dim=code_dim,
        normalize_codes=True,
        image_size=256,  # the c2i tokenizers' training size
    )


def llamagen_renames(levels: int) -> dict[str, str]:
    """LlamaGen's prefixes -> taming's. Its levels are `conv_blocks` with `res` and `attn` lists, its middle
    block a list (block, attention, block), and its decoder's levels run lowest resolution first."""
    renames = {"quantize.embedding.weight": "quantizer.codebook"}
    for part in ("encoder", "decoder"):
        renames |= {f"{part}.mid.0.": f"{part}.mid.block_1.", f"{part}.mid.1.": f"{part}.mid.attn_1."}
        renames[f"{part}.mid.2."] = f"{part}.mid.block_2."
    for i in range(levels):
        renames[f"encoder.conv_blocks.{i}.res."] = f"encoder.down.{i}.block."
        renames[f"encoder.conv_blocks.{i}."] = f"encoder.down.{i}."  # attn, downsample
        renames[f"decoder.conv_blocks.{i}.res."] = f"decoder.up.{levels - 1 - i}.block."
        renames[f"decoder.conv_blocks.{i}."] = f"decoder.up.{levels - 1 - i}."  # attn, upsample
    return renames
