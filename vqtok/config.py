"""Settings as dataclasses: what a model is, and how to train it.

A `ModelConfig` (the VQ-VAE tokenizer), a `VQGANConfig` (the VQGAN tokenizer)
or a `PriorConfig` (a prior over codes) is everything needed to rebuild a
model's modules; it is the `config` object of a model directory's
`config.json`. Both tokenizers' configs hold their vector quantizer's settings
as one `QuantizerConfig`, `config.quantizer`. A `TrainConfig` holds the
training recipe, a `PriorTrainConfig` the prior's, an `ObjectiveConfig` what a
tokenizer is trained to minimise. A TOML file has a `[model]` and a `[train]`
table with these fields (and `family = "vqgan"` in [model] for a VQGAN), and a
tokenizer's recipe an `[objective]` table (`load_objective_config`); a
tokenizer's quantizer settings may stand in [model] beside the network's
(`codebook_size = 512`) or in a `[model.quantizer]` table of their own, and
command-line options override either (`load_config`). TOML has no
null, so `false` stands for None where a setting may be None: `decay = false`
is the paper's codebook loss instead of moving averages.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from vqtok.errors import ConfigError


@dataclass(frozen=True)
class QuantizerConfig:
    """The vector quantizer's settings (`vqtok.tokenizers.quantizers.VectorQuantizer`), the same for every tokenizer
    family: the paper's (section 3) except where held-out photographs measured better (docs/performance.md),
    k-means initialisation and dead-code restarts. An imported model sets decay None, kmeans_init false and
    dead_code_window 0, as its codebook is learned."""

    codebook_size: int = 512  # K
    code_dim: int = 64  # D, the encoder's output channels
    beta: float = 0.25
    decay: float | None = 0.99  # None: the paper's codebook loss instead of the EMA update
    kmeans_init: bool = True
    dead_code_window: int = 100  # steps a code may go unused before it is restarted; 0: never
    lookup_dim: int | None = None  # codes looked up in this many dimensions after a projection; None: in code_dim
    normalize_codes: bool = False  # l2-normalize vectors and codes before the lookup: codes are directions (LlamaGen)
    rare_code_share: float = 0.0  # also restart codes used less than this share of an even share over the window

    def __post_init__(self) -> None:
        _check_positive(self, ("codebook_size", "code_dim"))
        if self.lookup_dim is not None:
            _check_positive(self, ("lookup_dim",), "or None")
        for name in ("kmeans_init", "normalize_codes"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.codebook_size < 2:
            raise ConfigError("codebook_size must be at least 2")
        if not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta!r}")
        if not 0 <= self.rare_code_share < 1:
            raise ConfigError(f"rare_code_share must be in [0, 1), got {self.rare_code_share!r}")
        if self.decay is not None and not 0 < self.decay < 1:
            raise ConfigError(f"decay must be in (0, 1) or None, got {self.decay!r}")
        if not isinstance(self.dead_code_window, int) or self.dead_code_window < 0:
            raise ConfigError(f"dead_code_window must be a non-negative integer, got {self.dead_code_window!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The VQ-VAE's shape and its quantizer: the paper's (section 4.1) except where held-out photographs
    measured better (docs/performance.md): residual blocks 32 wide inside, not as wide as the hidden channels."""

    in_channels: int = 3
    hidden_channels: int = 256
    res_channels: int | None = 32  # None: as wide as hidden_channels, as in the paper
    num_res_blocks: int = 2
    num_downsamples: int = 2  # each halves the grid: 2 turns 32x32 images into 8x8 codes
    image_size: int = 32  # the size the model was trained at; it encodes any multiple of its stride
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        _check_positive(self, ("in_channels", "hidden_channels", "num_res_blocks", "num_downsamples"))
        if self.res_channels is not None:
            _check_positive(self, ("res_channels",), "or None")
        _check_quantizer_and_size(self)

    @property
    def stride(self) -> int:
        """Image pixels per code along each side."""
        return 2**self.num_downsamples

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        return _tokenizer_from_dict(cls, values)


@dataclass(frozen=True)
class VQGANConfig:
    """The VQGAN network's shape (`vqtok.tokenizers.vqgan`; taming-transformers' ddconfig under vqtok's names)
    and its quantizer. The defaults are a small network for 32 px images, stride 4 and about as many
    parameters (3.2M) as the VQ-VAE's default: two levels of 64 channels, then 128 at the grid, one residual block
    per level and attention at the grid (pipelines/vqgan-cpu-small.toml has a quarter of that; taming's f16 ImageNet is
    base_channels 128, channel_mult (1, 1, 2, 2, 4), two blocks per level, attention at the last level, z 256,
    K 1024 of 256 dimensions). The quantizer is the VQ-VAE's, with the same defaults."""

    in_channels: int = 3
    base_channels: int = 64  # taming's ch; every level's width base_channels * mult is a multiple of 32 (GroupNorm)
    channel_mult: tuple[int, ...] = (1, 1, 2)  # one level per entry; each level after the first halves the grid
    num_res_blocks: int = 1  # per encoder level; the decoder has one more per level, as taming's
    attn_levels: tuple[int, ...] = (2,)  # levels whose blocks have self-attention (taming's attn_resolutions)
    mid_attention: bool = True  # self-attention in the middle block (aMUSEd's VQGAN has none)
    z_channels: int = 64  # the encoder's output and the decoder's input, around the 1x1 convolutions
    dropout: float = 0.0
    image_size: int = 32
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attn_levels"):  # JSON and TOML give lists
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        _check_positive(self, ("in_channels", "base_channels", "num_res_blocks", "z_channels"))
        if not self.channel_mult or not all(isinstance(m, int) and not isinstance(m, bool) for m in self.channel_mult):
            raise ConfigError(f"channel_mult must be a non-empty list of integers, got {list(self.channel_mult)!r}")
        widths = [self.base_channels * m for m in self.channel_mult]
        if any(w < 32 or w % 32 for w in widths):
            raise ConfigError(
                f"base_channels * channel_mult gives widths {widths}: each must be a positive multiple of 32 "
                "(GroupNorm's 32 groups)"
            )
        levels = len(self.channel_mult)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < levels for i in self.attn_levels):
            raise ConfigError(f"attn_levels must be level numbers in [0, {levels}), got {list(self.attn_levels)!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.mid_attention, bool):
            raise ConfigError(f"mid_attention must be true or false, got {self.mid_attention!r}")
        _check_quantizer_and_size(self)

    @property
    def stride(self) -> int:
        """Image pixels per code along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "channel_mult": list(self.channel_mult),
            "attn_levels": list(self.attn_levels),
        }

    @classmethod
    def from_dict(cls, values: dict) -> VQGANConfig:
        return _tokenizer_from_dict(cls, values)


# The tokenizer families `vqtok fit` trains, by the name a TOML file's [model] table gives as `family`.
TOKENIZER_CONFIGS = {"vqvae": ModelConfig, "vqgan": VQGANConfig}

# What `vqtok fit --train` trains: every weight, or the decoder side alone (the encode side frozen, `Tokenizer.
# freeze_encode_side`), which needs a model to start from (--init).
TRAIN_PARTS = ("all", "decoder")

# The settings a fine-tune (`vqtok fit --init`) may change: none changes the state dict's names or shapes, nor how
# the parent's codes are looked up. decay only from one rate to another: between a rate and None (a codebook
# learned by the codebook loss) the moving averages' buffers come or go.
FINE_TUNABLE = ("image_size", "dropout", "beta", "decay", "kmeans_init", "dead_code_window", "rare_code_share")

# The settings that may be None, which a TOML file writes as false.
NULLABLE = ("res_channels", "decay", "lookup_dim", "warmup_steps", "ema_decay")

# The quantizer's settings, which a tokenizer's table may give flat, beside the network's (`_split_quantizer`).
QUANTIZER_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizerConfig))

# Settings added to the quantizer after models were first saved, with the value that means "as before they
# existed". A model directory lacking one was written before it and loads with that value.
ADDED_SETTINGS = {"lookup_dim": None, "normalize_codes": False, "rare_code_share": 0.0}


def _check_positive(config, names, alternative: str = "") -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(
                f"{name} must be a positive integer{' ' + alternative if alternative else ''}, got {value!r}"
            )


def _check_quantizer_and_size(config) -> None:
    """What every tokenizer family's config holds besides its network: a QuantizerConfig, and an image_size that
    the network's stride divides."""
    if not isinstance(config.quantizer, QuantizerConfig):
        raise ConfigError(f"quantizer must be a QuantizerConfig, got {type(config.quantizer).__name__}")
    _check_positive(config, ("image_size",))
    if config.image_size % config.stride:
        raise ConfigError(f"image_size {config.image_size} is not a multiple of the model's stride {config.stride}")


def _split_quantizer(table: dict, where: str) -> tuple[dict, dict]:
    """A tokenizer's table of settings as (the network's, the quantizer's). The quantizer's may be a table of their
    own under `quantizer` (config.json now, a recipe's [model.quantizer]) or lie flat beside the network's
    (config.json before QuantizerConfig, the recipes' [model], the command line's options); one setting given both
    ways is refused, as neither would be plainly the one meant."""
    nested = table.get("quantizer", {})
    if not isinstance(nested, dict):
        raise ConfigError(f"{where}: quantizer must be a table of settings, got {nested!r}")
    flat = {name: table[name] for name in QUANTIZER_FIELDS if name in table}
    twice = sorted(flat.keys() & nested.keys())
    if twice:
        raise ConfigError(f"{where}: {', '.join(twice)} given both in the quantizer's table and beside it")
    network = {name: value for name, value in table.items() if name != "quantizer" and name not in flat}
    return network, {**nested, **flat}


def _tokenizer_config(cls, network: dict, quantizer: dict, where: str):
    return _from_table(
        cls, {**network, "quantizer": _from_table(QuantizerConfig, quantizer, f"{where}: quantizer")}, where
    )


def _tokenizer_from_dict(cls, values: dict):
    """A tokenizer's config from config.json's config, in either form `_split_quantizer` reads. Quantizer settings
    it lacks were added after it was written: they take the value that reproduces the model it describes, not
    today's default."""
    network, quantizer = _split_quantizer(values, "model config")
    return _tokenizer_config(cls, network, {**ADDED_SETTINGS, **quantizer}, "model config")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe: Adam with a warm-up and a cosine decay. The peak learning rate is 5x the paper's
    2e-4: on held-out photographs it was worth about 0.6 dB at equal steps, one seed on one fold
    (docs/performance.md). Adam's betas and the gradient clipping are every trainer's (a discriminator's too,
    as in taming and LlamaGen); the defaults are PyTorch's betas and no clipping, what vqtok fit always used."""

    steps: int = 10_000
    batch_size: int = 64  # per process
    lr: float = 1e-3
    # Linear warm-up steps, honoured as given (one at or beyond `steps` makes the rate rise all run long). None:
    # a tenth of the run, at most default_warmup_limit steps, the measured default (docs/performance.md).
    warmup_steps: int | None = None
    default_warmup_limit: ClassVar[int] = 500
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_accum_steps: int = 1
    seed: int = 0
    eval_every: int = 1000
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    num_workers: int = 2
    mixed_precision: str = "auto"  # auto: bf16 autocast on a GPU that has it, else full precision
    report_to: str | None = None  # an accelerate tracker name (tensorboard, wandb, ...) or "all"
    beta1: float = 0.9  # Adam's (taming: 0.5)
    beta2: float = 0.999  # (taming: 0.9, LlamaGen: 0.95)
    grad_clip: float = 0.0  # the gradients' largest norm, each optimizer's own; 0: no clipping (LlamaGen: 1.0)
    # An exponential moving average of the weights, which evaluations and the exported model use; None: none.
    # Open-MAGVIT2 exports one of decay 0.999.
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum_steps", "eval_every", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "num_workers", "keep_checkpoints", "seed"):
            value = getattr(self, name)
            if name == "warmup_steps" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        if not 0 <= self.beta1 < 1:
            raise ConfigError(f"beta1 must be in [0, 1), got {self.beta1!r}")
        if not 0 < self.beta2 < 1:
            raise ConfigError(f"beta2 must be in (0, 1), got {self.beta2!r}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")

    @property
    def betas(self) -> tuple[float, float]:
        return self.beta1, self.beta2

    @property
    def warmup(self) -> int:
        """The warm-up in steps: warmup_steps, or by default a tenth of the run and at most default_warmup_limit."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(self.default_warmup_limit, self.steps // 10)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PriorConfig:
    """A prior over (h, w) grids of codes (`vqtok.prior.Prior`): the transformer's shape, and what its tokens
    are. `vqtok prior fit` takes the last five from the tokens it trains on, and the class count from --cond."""

    layers: int = 4
    width: int = 128
    heads: int = 4
    dropout: float = 0.0  # on attention weights, residual branches and embeddings
    cond_dropout: float = 0.1  # share of training rows whose class is replaced by "no class", for guidance
    num_classes: int = 0  # 0: unconditional
    codebook_size: int = 512  # K
    grid: tuple[int, int] = (16, 16)  # (h, w)
    tokenizer: str | None = None  # the model id of the tokenizer whose codes these are
    codes_id: str | None = None  # that tokenizer's codes id, where the tokens record it
    image_size: int | None = None  # the size of the images that tokenizer turned into these grids

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))  # JSON and TOML give lists
        for name in ("layers", "width", "heads", "codebook_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not a multiple of heads {self.heads}")
        if len(self.grid) != 2 or not all(isinstance(n, int) and n >= 1 for n in self.grid):
            raise ConfigError(f"grid must be two positive integers (h, w), got {self.grid!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative integer, got {self.num_classes!r}")
        for name in ("dropout", "cond_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ConfigError(f"image_size must be a positive integer or None, got {self.image_size!r}")

    @property
    def length(self) -> int:
        """Codes per grid, h * w."""
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, values: dict) -> PriorConfig:
        return _from_table(cls, values, "prior config")


@dataclass(frozen=True)
class PriorTrainConfig(TrainConfig):
    """The prior's training recipe: TrainConfig's fields with the defaults measured best on 2 CPU cores
    (benchmarks/prior.py), and AdamW's weight decay."""

    steps: int = 5000
    batch_size: int = 16
    lr: float = 2e-3
    default_warmup_limit: ClassVar[int] = 100
    min_lr_ratio: float = 0.1
    eval_every: int = 1000
    save_every: int = 1000
    log_every: int = 50
    num_workers: int = 1
    weight_decay: float = 0.1  # AdamW's, on matrices only (not on embeddings, norms or biases)
    beta2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.ema_decay is not None:
            raise ConfigError("ema_decay: vqtok prior fit keeps no moving average of the weights")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What a tokenizer is trained to minimise (`vqtok.tokenizers.losses.Objective`; a recipe's [objective] table),
    in the terms of taming-transformers and LlamaGen, whose losses are computed on images in [-1, 1] as these are,
    so that their published weights carry over. The defaults are vqtok's objective before these terms: the pixel
    MSE plus the quantizer's loss, no perceptual or adversarial term. The published settings:

        taming, configs/imagenet_vqgan.yaml   pixel_loss l1, perceptual_weight 1, disc_weight 0.8,
                                              disc_start 250001, adaptive_weight true, hinge for both sides
        LlamaGen, vq_train.py's defaults      pixel_loss l2, perceptual_weight 1, disc_weight 0.5,
                                              disc_start 20000, adaptive_weight false, hinge for both sides
        Open-MAGVIT2, imagenet_lfqgan_256_L   disc_weight 0.1 (its gen_loss_weight) without the adaptive weight,
                                              disc_start 0, lecam_weight 0.05; its non-saturating generator
                                              loss is taken on each image's mean logit, vqtok's on each patch's
    """

    pixel_loss: str = "l2"  # l1 (taming) or l2 (LlamaGen), a mean over pixels
    pixel_weight: float = 1.0
    perceptual_weight: float = 0.0  # on the LPIPS distance the training loop passes in
    codebook_weight: float = 1.0  # on the quantizer's loss (codebook + beta * commitment)
    disc_weight: float = 0.0  # on the generator's adversarial term; 0: no discriminator at all
    disc_start: int = 0  # training step from which the discriminator plays (taming's disc_start)
    disc_loss: str = "hinge"  # the discriminator's: hinge or non-saturating (taming's "vanilla")
    gen_loss: str = "hinge"  # the generator's: hinge (-mean logits) or non-saturating
    disc_layers: int = 3  # the PatchGAN's strided layers (taming's n_layers)
    disc_filters: int = 64  # its first layer's width (taming's ndf)
    adaptive_weight: bool = True  # scale the adversarial term by taming's gradient-norm ratio at the last layer
    lecam_weight: float = 0.0  # LeCAM regularisation of the discriminator (Open-MAGVIT2); 0: off
    lecam_decay: float = 0.999  # of the moving averages of its mean outputs that LeCAM pulls towards
    entropy_weight: float = 0.0  # codebook-usage entropy loss (LlamaGen's entropy_loss_ratio); 0: off
    entropy_temperature: float = 0.01  # of the softmax over negative distances (LlamaGen's and MAGVIT's)

    WEIGHTS: ClassVar[tuple[str, ...]] = (
        "pixel_weight",
        "perceptual_weight",
        "codebook_weight",
        "disc_weight",
        "lecam_weight",
        "entropy_weight",
    )
    LOSS_KINDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "pixel_loss": ("l1", "l2"),
        "disc_loss": ("hinge", "non-saturating"),
        "gen_loss": ("hinge", "non-saturating"),
    }

    def __post_init__(self) -> None:
        for name, kinds in self.LOSS_KINDS.items():
            if getattr(self, name) not in kinds:
                raise ConfigError(f"{name} must be {' or '.join(kinds)}, got {getattr(self, name)!r}")
        for name in self.WEIGHTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        _check_positive(self, ("disc_layers", "disc_filters"))
        if not isinstance(self.disc_start, int) or isinstance(self.disc_start, bool) or self.disc_start < 0:
            raise ConfigError(f"disc_start must be a non-negative integer, got {self.disc_start!r}")
        if not isinstance(self.adaptive_weight, bool):
            raise ConfigError(f"adaptive_weight must be true or false, got {self.adaptive_weight!r}")
        if not 0 < self.lecam_decay < 1:
            raise ConfigError(f"lecam_decay must be in (0, 1), got {self.lecam_decay!r}")
        if not 0 < self.entropy_temperature < float("inf"):
            raise ConfigError(f"entropy_temperature must be positive, got {self.entropy_temperature!r}")
        if self.pixel_weight == 0 and self.perceptual_weight == 0:
            raise ConfigError("pixel_weight and perceptual_weight are both 0: nothing would ask for reconstructions")
        if self.lecam_weight > 0 and self.disc_weight == 0:
            raise ConfigError("lecam_weight regularises the discriminator, but disc_weight 0 has none")

    @property
    def adversarial(self) -> bool:
        """Whether there is a discriminator to train."""
        return self.disc_weight > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _from_table(cls, table: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        if "quantizer" in known:  # a tokenizer's table may also name the quantizer's settings
            known |= set(QUANTIZER_FIELDS)
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**table)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_tables(path: str | Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        tables = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(tables) - {"model", "train", "objective"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}; expected [model], [train] and [objective]")
    return tables


def _known_family(family: str, where: str) -> str:
    if family not in TOKENIZER_CONFIGS:
        raise ConfigError(f"{where}: unknown family {family!r}; known: {', '.join(TOKENIZER_CONFIGS)}")
    return family


def tokenizer_family(path: str | Path | None = None, family: str | None = None) -> str:
    """The tokenizer family a training recipe is for: `family` where the command line names one, else the TOML
    file's [model] table's `family`, else vqvae. A command line that contradicts the file is refused."""
    in_file = _read_tables(path).get("model", {}).get("family") if path is not None else None
    if family is not None and in_file is not None and family != in_file:
        raise ConfigError(f"--family {family}, but {path} says family = {in_file!r} in its [model] table")
    return _known_family(family or in_file or "vqvae", str(path) if path else "--family")


def load_config(
    path: str | Path | None = None,
    model: dict | None = None,
    train: dict | None = None,
    model_class: type = ModelConfig,
    train_class: type = TrainConfig,
):
    """Settings from a TOML file (or the defaults), then overrides; a None override leaves the value alone.
    Returns (model_class, train_class) instances: a tokenizer's by default (VQGANConfig for a VQGAN, whose [model]
    table says family = "vqgan"), a prior's with PriorConfig and PriorTrainConfig."""
    tables = _read_tables(path) if path is not None else {}
    where = str(path) if path else "settings"
    if "objective" in tables and model_class not in TOKENIZER_CONFIGS.values():
        raise ConfigError(f"{where}: [objective] is what a tokenizer is trained to minimise; a prior has none")
    model_file = _none_for_false(tables.get("model", {}))
    family = model_file.pop("family", None)
    if family is not None and TOKENIZER_CONFIGS[_known_family(family, where)] is not model_class:
        raise ConfigError(f"{where}: family = {family!r} in [model], but these are {model_class.__name__} settings")
    model_over = {k: v for k, v in (model or {}).items() if v is not None}
    if model_class in TOKENIZER_CONFIGS.values():  # the file's quantizer settings, flat or nested, then the options'
        network, quantizer = _split_quantizer(model_file, where)
        network_over, quantizer_over = _split_quantizer(model_over, "overrides")
        model_config = _tokenizer_config(
            model_class, {**network, **network_over}, {**quantizer, **quantizer_over}, where
        )
    else:
        model_config = _from_table(model_class, {**model_file, **model_over}, where)
    return model_config, _train_config(tables, train, train_class, where)


def load_train_config(path: str | Path | None = None, train: dict | None = None, train_class: type = TrainConfig):
    """The training recipe alone, from a TOML file's [train] table (or the defaults), then overrides: for a
    fine-tune, whose model is the one it starts from (`fine_tune_config`)."""
    tables = _read_tables(path) if path is not None else {}
    return _train_config(tables, train, train_class, str(path) if path else "settings")


def load_objective_config(path: str | Path | None = None, overrides: dict | None = None) -> ObjectiveConfig:
    """The training objective from a TOML file's [objective] table (or the defaults: vqtok's pixel MSE and
    quantizer loss), then overrides; a None override leaves the value alone."""
    table = _read_tables(path).get("objective", {}) if path is not None else {}
    table = {**table, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return _from_table(ObjectiveConfig, table, f"{path}: [objective]" if path else "objective")


def _train_config(tables: dict, train: dict | None, train_class: type, where: str):
    train_file = _none_for_false(tables.get("train", {}))
    train_table = {**train_file, **{k: v for k, v in (train or {}).items() if v is not None}}
    return _from_table(train_class, train_table, where)


def family_name(config) -> str:
    """The family a tokenizer config is of: vqvae for a ModelConfig, vqgan for a VQGANConfig."""
    return next(name for name, cls in TOKENIZER_CONFIGS.items() if isinstance(config, cls))


def fine_tune_refusal(parent, name: str, value) -> str | None:
    """Why a fine-tune of a model whose config is `parent` cannot set `name` to `value`; None when it can."""
    decay = parent.quantizer.decay
    if name == "decay" and (value is None) != (decay is None):
        learned = "by the codebook loss" if decay is None else f"as a moving average (decay {decay})"
        return f"the model's codebook is learned {learned}, and a fine-tune keeps it so (its state dict would change)"
    if name in FINE_TUNABLE:
        return None
    current = getattr(parent.quantizer if name in QUANTIZER_FIELDS else parent, name)
    what = "the lookup its codebook was learned in" if name == "normalize_codes" else "the model's shape"
    return f"a fine-tune keeps {what} ({name} = {current!r}); train a new model without --init to change it"


def fine_tune_config(parent, path: str | Path | None = None, overrides: dict | None = None, flags: dict | None = None):
    """The config a fine-tune of a model whose config is `parent` trains under: the parent's, with what a TOML
    recipe's [model] table (at `path`) and then the overrides (field -> value; None: not given) change.
    ConfigError for a change `fine_tune_refusal` refuses, naming the option (its flag in `flags`, field -> flag)
    or the recipe's entry; a value equal to the parent's changes nothing and passes."""
    family = family_name(parent)
    given: dict[str, tuple[object, str]] = {}  # field -> (value, where it was given)
    if path is not None:
        table = _none_for_false(_read_tables(path).get("model", {}))
        in_file = table.pop("family", None)
        if in_file is not None and in_file != family:
            raise ConfigError(f"{path} says family = {in_file!r} in [model]; the model fine-tuned is a {family}")
        network, quantizer = _split_quantizer(table, str(path))
        given |= {name: (value, f"{path}: [model] {name}") for name, value in {**network, **quantizer}.items()}
    flags = flags or {}
    given |= {name: (value, flags.get(name, name)) for name, value in (overrides or {}).items() if value is not None}
    network = {name: value for name, value in parent.to_dict().items() if name != "quantizer"}
    quantizer = dataclasses.asdict(parent.quantizer)
    for name, (value, where) in given.items():
        settings = quantizer if name in QUANTIZER_FIELDS else network
        if name not in settings:
            raise ConfigError(f"{where}: a {family} model has no setting {name}")
        if value == settings[name]:
            continue
        reason = fine_tune_refusal(parent, name, value)
        if reason is not None:
            raise ConfigError(f"{where}: {reason}")
        settings[name] = value
    return _tokenizer_config(type(parent), network, quantizer, "fine-tune")


def _none_for_false(table: dict) -> dict:
    """A copy of a TOML table, and of its quantizer table, with None for false where a setting may be None: TOML has
    no null, so `decay = false` says decay = None (no EMA), and so on."""
    table = {name: None if name in NULLABLE and value is False else value for name, value in table.items()}
    if isinstance(table.get("quantizer"), dict):
        table["quantizer"] = _none_for_false(table["quantizer"])
    return table
