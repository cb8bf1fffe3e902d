"""The `vqtok` command line: thin click commands over the library.

Each command parses its options, calls one library function and prints with
rich. Library errors (`VQTokError`) become one-line messages with exit code 1,
usage errors one line with exit code 2, Ctrl-C one line with exit code 130.
torch is imported inside command bodies so that `vqtok --help` answers at once.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import os
import sys

import click

from vqtok import __version__
from vqtok.config import (
    TRAIN_PARTS,
    ModelConfig,
    ObjectiveConfig,
    PriorConfig,
    PriorTrainConfig,
    QuantizerConfig,
    TrainConfig,
)
from vqtok.errors import VQTokError, plural

# How to go on after Ctrl-C, by command: what a rerun keeps of the interrupted run. The others start over.
RESUME = "run the same command with --resume to continue from the last checkpoint"
RERUN = "run the same command again to go on: the parts committed so far are kept"
AFTER_INTERRUPT = {"fit": RESUME, "prior fit": RESUME, "encode": RERUN, "prior sample": RERUN}
INTERRUPTED = 130  # 128 + SIGINT, the exit code a shell gives a process that Ctrl-C ended


def user_errors(command):
    """Turn the library's user-facing errors into click's one-line messages, and Ctrl-C into one line that says
    how to go on (in place of click's bare "Aborted!"), with exit code 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VQTokError as e:
            raise click.ClickException(one_line(str(e))) from e
        except KeyboardInterrupt:
            name = command_name(click.get_current_context())
            advice = AFTER_INTERRUPT.get(name, "run the same command again to start over")
            click.echo(f"Interrupted: vqtok {name} stopped; {advice}.", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None

    return wrapper


def command_name(ctx: click.Context) -> str:
    """The command as typed after the program's name: "encode", "prior fit"."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names))


# What INPUTS are, in every command that reads images (fit, eval, encode); `{INPUTS}` in a docstring becomes this.
INPUTS_HELP = """INPUTS are any mix of: WebDataset tar files (.tar, or .tar.gz, .tgz,
.tar.bz2, .tar.xz) or folders of them; folders of
image files (jpg, png, webp...), searched recursively in sorted order, each
file's key its path in the folder without the extension; Parquet files with
an image column as Hugging Face datasets writes them (a file, a glob, or a
folder such as a dataset's data/), each row's key its key, __key__ or id
column, else FILE-STEM/ROW. Globs and brace patterns expand first. A folder
is read as shards if it holds tar files, else as images if it holds image
files, else as Parquet. Any of them may be a URL fsspec opens (s3://, gs://,
az://, hf://; the s3, gcs and azure extras install the back ends)."""


def inputs_help(command):
    indented = INPUTS_HELP.replace("\n", "\n    ")  # the docstring's own indentation, which click removes
    command.__doc__ = command.__doc__.replace("{INPUTS}", indented)
    return command


def storage_options_option(command):
    """--storage-options: fsspec options for every URL the command opens (credentials and endpoints otherwise
    come the back end's usual way: AWS variables and files for S3)."""
    return click.option(
        "--storage-options",
        "storage_options",
        metavar="JSON",
        envvar="VQTOK_STORAGE_OPTIONS",
        show_envvar=True,
        help='fsspec options for URLs, as JSON, e.g. \'{"anon": true}\' or \'{"endpoint_url": "http://minio:9000"}\'.',
    )(command)


def image_root_option(command):
    """--image-root: the folder under which Parquet rows that hold a path and no image bytes are read."""
    return click.option(
        "--image-root",
        type=click.Path(file_okay=False),
        help="Read Parquet rows that hold only a path (no image bytes) from this local folder: relative paths "
        "resolve under it, absolute ones must lie inside it; others are refused.  [default: such rows are errors]",
    )(command)


def max_error_rate_option(command):
    """--max-error-rate: the share of failed samples above which encode and eval fail."""
    from vqtok.errors import ERROR_RATE_AFTER, MAX_ERROR_RATE

    return click.option(
        "--max-error-rate",
        default=MAX_ERROR_RATE,
        show_default=True,
        type=click.FloatRange(0, 1),
        help=f"Fail when more than this share of samples cannot be read or decoded, judged after {ERROR_RATE_AFTER:,} "
        "samples and at the end (a run in which all fail always fails).",
    )(command)


def lpips_weights_options(command):
    """--vgg16-weights and --lpips-weights: the two files LPIPS reads (`vqtok.tokenizers.perceptual`), for every
    command that measures or trains with it."""
    command = click.option(
        "--lpips-weights",
        type=click.Path(exists=True, dir_okay=False),
        envvar="VQTOK_LPIPS_WEIGHTS",
        show_envvar=True,
        help="LPIPS's linear layers, the vgg.pth the lpips package ships (lpips/weights/v0.1/vgg.pth).  [default: "
        "the installed lpips package's]",
    )(command)
    return click.option(
        "--vgg16-weights",
        type=click.Path(exists=True, dir_okay=False),
        envvar="VQTOK_VGG16_WEIGHTS",
        show_envvar=True,
        help="torchvision's VGG16 weights for LPIPS (vgg16-397923af.pth, or its features.* alone).  [default: "
        "torch hub's cache, $TORCH_HOME/hub/checkpoints]",
    )(command)


# Columns of a table printed to a pipe or a log, where rich would otherwise cut it at 80: as wide as it needs.
UNBOUNDED_WIDTH = 10_000


def console():
    """rich's console: the terminal's width in a terminal (or COLUMNS'), else as wide as a table needs."""
    from rich.console import Console

    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return Console()
    return Console(width=UNBOUNDED_WIDTH)


def count(n: int, word: str) -> str:
    """ "1 shard", "1,000 images": a count and its word."""
    return f"{n:,} {plural(n, word)}"


def one_line(message: str) -> str:
    """A DataLoader worker's error arrives as "Caught X in DataLoader worker ... Original Traceback ...";
    its last line holds the message."""
    if message.startswith("Caught "):
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


class UsageLine(click.ClickException):
    """A usage error as one line, like every other error; its exit code stays click's (and argparse's), 2."""

    exit_code = 2


class Commands(click.Group):
    """vqtok's group: a mistyped option or choice, a missing argument or an unknown command is one line,
    `Error: ... (vqtok decode --help)`, in place of click's usage, hint and error on three lines. Its own
    options' errors arise as its context is made, its commands' (and `prior`'s) as it invokes them."""

    def make_context(self, *args, **kwargs):
        with one_line_usage():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with one_line_usage():
            return super().invoke(ctx)


@contextlib.contextmanager
def one_line_usage():
    try:
        yield
    except click.UsageError as e:
        if type(e).show is not click.UsageError.show:  # it shows something else (NoArgsIsHelpError: the help)
            raise
        help = f" ({e.ctx.command_path} --help)" if e.ctx else ""
        raise UsageLine(f"{e.format_message()}{help}") from e


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vqtok")
def cli():
    """VQ-VAE image tokenizers: images in shards, folders or Parquet files <-> grids of codebook indices."""


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
@storage_options_option
@user_errors
def info(path, as_json, storage_options):
    """What a model directory, a prior or a token dataset holds.

    A model: its family, settings, parameter count, K, D, grid size per image
    size, model id and codes id (shared by the models that give the same
    codes), for one made by `vqtok import` where it came from (format, file
    name, SHA-256), and for one made by `vqtok fit --init` its parent (path,
    model id, codes id, what was trained, the parent's own provenance), and
    the discriminator kept beside it, if any (its shape). A prior: its size,
    the tokens it models (K, grid, classes, the tokenizer's model id and
    codes id) and its model id. Tokens (a folder written by
    `vqtok encode` or `vqtok prior sample`, or one Parquet file): rows,
    shards, errors, grid, K, model id, codes id, codebook usage and perplexity, bits per
    code and bytes on disk per image, whether the run finished, and the class
    names that cls numbers. PATH may be a URL (s3://...).

    \b
    Examples:
        vqtok info runs/x/model
        vqtok info runs/p/model
        vqtok info tokens.parquet --json
    """
    from vqtok.info import describe
    from vqtok.storage import parse_options

    summary = describe(path, parse_options(storage_options))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return

    from rich.table import Table

    rows = {"tokenizer": tokenizer_rows, "prior": prior_rows, "tokens": token_rows}[summary["kind"]](summary)
    table = Table(title=path, show_header=False)
    for name, value in rows:
        table.add_row(name, value)
    console().print(table)


def tokenizer_rows(s: dict) -> list[tuple[str, str]]:
    rows = [
        ("family", s["family"]),
        ("model id", s["model_id"]),
        ("codes id", s["codes_id"]),
        ("parameters", f"{s['parameters']:,}"),
        ("codebook", f"K = {s['codebook_size']}, D = {s['code_dim']}"),
    ]
    if s["source"]:
        rows += source_rows(s["source"])
    if s["parent"]:
        rows += parent_rows(s["parent"])
    rows.append(("discriminator", discriminator_row(s["discriminator"])))
    rows += [(f"grid at {size}x{size}", f"{h}x{w} codes") for size, (h, w) in s["grids"].items()]
    network = {name: value for name, value in s["config"].items() if name != "quantizer"}
    rows += [(name, str(value)) for name, value in network.items()]
    return rows + [(f"quantizer.{name}", str(value)) for name, value in s["config"]["quantizer"].items()]


def discriminator_row(d: dict | None) -> str:
    """The PatchGAN kept beside a tokenizer, which a fine-tune of it can start from; none for most models."""
    if d is None:
        return "none"
    return (
        f"PatchGAN, {count(d['layers'], 'layer')}, {count(d['filters'], 'filter')}, "
        f"{count(d['in_channels'], 'input channel')}, {d['parameters']:,} parameters (weights id {d['weights_id']})"
    )


def source_rows(source: dict, prefix: str = "") -> list[tuple[str, str]]:
    return [
        (f"{prefix}imported from", f"{source['file']} ({source['format']})"),
        (f"{prefix}source sha256", source["sha256"]),
    ]


# What a fine-tune trained of its parent, as `vqtok info` says it.
TRAINED = {"all": "every weight", "decoder": "the decoder alone: its codes are the parent's"}


def parent_rows(parent: dict) -> list[tuple[str, str]]:
    """A fine-tune's parent, and that parent's own provenance: where it was imported from, or its parent's id."""
    rows = [
        ("fine-tuned from", parent["path"]),
        ("parent model id", parent["model_id"]),
        ("parent codes id", parent["codes_id"]),
        ("trained", TRAINED.get(parent["trained"], parent["trained"])),
    ]
    if parent.get("source"):
        rows += source_rows(parent["source"], "parent ")
    if parent.get("parent"):
        grandparent = parent["parent"]
        rows.append(("parent fine-tuned from", f"{grandparent['path']} (model id {grandparent['model_id']})"))
    return rows


def prior_rows(s: dict) -> list[tuple[str, str]]:
    config = s["config"]
    h, w = s["grid"]
    rows = [
        ("kind", "prior over token grids"),
        ("model id", s["model_id"]),
        ("parameters", f"{s['parameters']:,}"),
        (
            "transformer",
            f"{count(config['layers'], 'layer')}, width {config['width']}, {count(config['heads'], 'head')}",
        ),
        ("tokens", f"{h}x{w} grids of codes from a codebook of K = {s['codebook_size']}"),
        ("classes", f"{s['num_classes']}" if s["num_classes"] else "none (unconditional)"),
        ("tokenizer", f"{s['tokenizer']} ({s['image_size']}x{s['image_size']} images)"),
        ("tokenizer codes id", s["codes_id"] or "not recorded"),
    ]
    return rows + [(name, str(value)) for name, value in config.items()]


def token_rows(s: dict) -> list[tuple[str, str]]:
    def known(name: str, render) -> str:
        return "unknown" if s[name] is None else render(s[name])

    rows = [
        ("rows", f"{s['rows']:,} in {count(s['files'], 'file')}"),
        ("shards", known("shards", str)),
        ("errors", known("errors", lambda n: f"{n:,}")),
        ("grid", known("grid", lambda g: f"{g[0]}x{g[1]}")),
        ("image size", known("image_size", str)),
        ("codebook", f"K = {s['codebook_size']}"),
        ("model id", known("model_id", str)),
        ("codes id", known("codes_id", str)),
        ("codebook usage", known("usage", lambda u: f"{count(s['codes_used'], 'code')}, {u:.1%}")),
        ("perplexity", f"{s['perplexity']:.1f}"),
        ("bits per code", f"{s['bits_per_code']:.3f} (entropy)"),
        ("bytes per image", known("bytes_per_image", lambda b: f"{b:,.1f} on disk")),
        (
            "complete",
            known(
                "complete",
                lambda done: "yes" if done else f"no: {s['progress']}; run the command that wrote it again to finish",
            ),
        ),
    ]
    if s["classes"]:
        names = s["classes"]
        shown = ", ".join(f"{i} {name}" for i, name in enumerate(names[:20]))
        rows.append(("classes", f"{len(names)}: {shown}{', ...' if len(names) > 20 else ''}"))
    if s["failed_shards"]:
        rows.append(("failed shards", ", ".join(s["failed_shards"])))
    return rows


def override(name: str, config_class, *flags, **kwargs):
    """An option that overrides a config field: no click default, so the TOML file's value stands when absent."""
    default = {f.name: f.default for f in dataclasses.fields(config_class)}[name]
    show_default = kwargs.pop("show_default", default)  # what the default is, where a value cannot say it
    return click.option(*flags, name, default=None, show_default=f"{show_default} or the config file's", **kwargs)


def training_options(train_class, examples: str, workers: str):
    """The options every trainer takes (`vqtok fit`, `vqtok prior fit`), overriding train_class's fields."""
    options = [
        override(
            "steps",
            train_class,
            "--steps",
            type=click.IntRange(min=1),
            help="Optimizer steps; with --resume, more than the run had trains it further.",
        ),
        override(
            "batch_size", train_class, "--batch-size", type=click.IntRange(min=1), help=f"{examples} per process."
        ),
        override("lr", train_class, "--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate."),
        override(
            "warmup_steps",
            train_class,
            "--warmup-steps",
            type=click.IntRange(min=0),
            show_default=f"a tenth of --steps, at most {train_class.default_warmup_limit},",
            help="Linear warm-up steps, as given (at or beyond --steps, the rate rises all run long).",
        ),
        override("seed", train_class, "--seed", type=click.IntRange(min=0), help="Random seed."),
        override("eval_every", train_class, "--eval-every", type=click.IntRange(min=1), help="Steps between evals."),
        override("save_every", train_class, "--save-every", type=click.IntRange(min=1), help="Steps between saves."),
        override("num_workers", train_class, "--num-workers", type=click.IntRange(min=0), help=workers),
        override(
            "mixed_precision",
            train_class,
            "--mixed-precision",
            type=click.Choice(["auto", "no", "fp16", "bf16"]),
            help="Autocast precision; auto: bf16 on a GPU that has it.",
        ),
        click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out."),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def load_recipe(config_path, overrides: dict, model_class, train_class):
    """The TOML recipe's [model] and [train] tables, with the command line's overrides of either."""
    from vqtok.config import load_config

    model, train = split_overrides(overrides, model_class)
    return load_config(config_path, model=model, train=train, model_class=model_class, train_class=train_class)


def split_overrides(overrides: dict, model_class) -> tuple[dict, dict]:
    """A command's overrides as (the model's, the training recipe's)."""
    from vqtok.config import QUANTIZER_FIELDS

    model_fields = {f.name for f in dataclasses.fields(model_class)}
    if "quantizer" in model_fields:  # a tokenizer's: its quantizer's settings are options of their own
        model_fields |= set(QUANTIZER_FIELDS)
    model = {k: v for k, v in overrides.items() if k in model_fields}
    return model, {k: v for k, v in overrides.items() if k not in model_fields}


# fit's options that set the VQ-VAE's network, which no other family has: field -> flag
VQVAE_ONLY = {"hidden_channels": "--hidden", "res_channels": "--res-channels", "num_res_blocks": "--res-blocks"}
OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(ObjectiveConfig))


def objective_options(command):
    """fit's options over the main settings of a recipe's [objective] table (`vqtok.config.ObjectiveConfig`)."""
    options = [
        override(
            "pixel_loss",
            ObjectiveConfig,
            "--pixel-loss",
            type=click.Choice(ObjectiveConfig.LOSS_KINDS["pixel_loss"]),
            help="The pixel loss: l1 (taming) or l2 (LlamaGen), on images in [-1, 1].",
        ),
        override(
            "perceptual_weight",
            ObjectiveConfig,
            "--perceptual-weight",
            type=click.FloatRange(min=0),
            help="Weight of the LPIPS distance (taming and LlamaGen: 1); above 0, LPIPS's two weights files are "
            "needed.",
        ),
        override(
            "disc_weight",
            ObjectiveConfig,
            "--disc-weight",
            type=click.FloatRange(min=0),
            help="Weight of the PatchGAN's adversarial loss (taming: 0.8, LlamaGen: 0.5); 0: no discriminator.",
        ),
        override(
            "disc_start",
            ObjectiveConfig,
            "--disc-start",
            type=click.IntRange(min=0),
            help="The step from which the discriminator plays (taming's disc_start).",
        ),
        override(
            "entropy_weight",
            ObjectiveConfig,
            "--entropy-weight",
            type=click.FloatRange(min=0),
            help="Weight of the codebook-usage entropy loss (LlamaGen's entropy_loss_ratio).",
        ),
        override(
            "adaptive_weight",
            ObjectiveConfig,
            "--adaptive-weight/--no-adaptive-weight",
            help="Scale the adversarial loss by taming's adaptive weight (LlamaGen trains without).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pop_objective(overrides: dict) -> dict:
    """The objective's settings among a command's overrides, taken out of them."""
    return {name: overrides.pop(name) for name in OBJECTIVE_FIELDS if name in overrides}


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, help="Run folder (a path or a URL): checkpoints, model, samples.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="A TOML recipe.")
@click.option(
    "--family",
    type=click.Choice(["vqvae", "vqgan"]),
    show_default="the config file's, else vqvae",
    help="The network: the paper's VQ-VAE, or taming-transformers' VQGAN (its shape from the config file).",
)
@override("image_size", ModelConfig, "--image-size", type=click.IntRange(min=1), help="Training crop size.")
@override("codebook_size", QuantizerConfig, "--codebook-size", type=click.IntRange(min=2), help="K, codebook entries.")
@override("code_dim", QuantizerConfig, "--code-dim", type=click.IntRange(min=1), help="D, code vector size.")
@override("hidden_channels", ModelConfig, "--hidden", type=click.IntRange(min=1), help="Hidden channels.")
@override(
    "res_channels", ModelConfig, "--res-channels", type=click.IntRange(min=1), help="Channels inside residual blocks."
)
@override("num_res_blocks", ModelConfig, "--res-blocks", type=click.IntRange(min=1), help="Residual blocks per side.")
@override(
    "lookup_dim",
    QuantizerConfig,
    "--lookup-dim",
    type=click.IntRange(min=1),
    help="Look codes up in this many dimensions, after a linear projection of the D-vectors.",
)
@override(
    "normalize_codes",
    QuantizerConfig,
    "--normalize-codes/--no-normalize-codes",
    help="l2-normalize vectors and codes before the lookup.",
)
@override(
    "rare_code_share",
    QuantizerConfig,
    "--rare-code-share",
    type=click.FloatRange(0, 1, max_open=True),
    help="Also restart codes used less than this share of an even share of the data.",
)
@override("beta", QuantizerConfig, "--beta", type=click.FloatRange(min=0), help="Commitment loss weight.")
@override(
    "decay", QuantizerConfig, "--decay", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="EMA decay."
)
@click.option("--no-ema", is_flag=True, help="Learn the codebook by the paper's codebook loss instead of EMA.")
@click.option(
    "--init",
    metavar="MODEL",
    help="Fine-tune this tokenizer (a model directory, fitted or imported; a path or a URL) instead of a new one: "
    "its family, shape and weights. Options that would change its shape are refused.",
)
@click.option(
    "--train",
    "train_part",
    type=click.Choice(TRAIN_PARTS),
    default="all",
    show_default=True,
    help="What trains: every weight, or (with --init) the decoder side alone, so every image keeps the codes "
    "MODEL gives it and MODEL's token datasets decode with the result.",
)
@click.option("--val", multiple=True, help="Validation inputs (repeatable), evaluated every --eval-every steps.")
@objective_options
@lpips_weights_options
@training_options(TrainConfig, "Images", "Image decoding workers per process.")
@click.option(
    "--exact-resume",
    is_flag=True,
    help="With --resume, end with the very weights of an uninterrupted run: the data stream is drawn again from its "
    "start and the batches already trained on are discarded, which costs decoding them once more.",
)
@click.option("--image-column", help="The image column of Parquet inputs; found when there is only one.")
@image_root_option
@storage_options_option
@user_errors
@inputs_help
def fit(
    inputs,
    out,
    config_path,
    family,
    no_ema,
    init,
    train_part,
    val,
    vgg16_weights,
    lpips_weights,
    resume,
    exact_resume,
    image_column,
    image_root,
    storage_options,
    **overrides,
):
    """Train a tokenizer on images in shards, folders or Parquet files.

    The paper's VQ-VAE by default; the VQGAN network with --family vqgan or
    `family = "vqgan"` in the config file's [model] table, where its shape is
    set (base_channels, channel_mult, ...; the VQ-VAE's --hidden, --res-channels
    and --res-blocks do not apply). By default both train with the pixel MSE
    and the quantizer's loss; a recipe's [objective] table and the --pixel-loss,
    --perceptual-weight, --disc-weight, --disc-start, --entropy-weight and
    --adaptive-weight options add LPIPS, taming's PatchGAN discriminator and the
    codebook-usage entropy loss, as taming and LlamaGen train
    (pipelines/llamagen-vq16.toml, pipelines/taming-*.toml; docs/training.md).
    Runs on one CPU or GPU, or on many under `accelerate launch`.

    With --init MODEL it fine-tunes MODEL on INPUTS: a tokenizer vqtok fitted
    or imported, of either family, its weights and codebook as they are. Its
    shape stays: of the model's settings, options and a --config [model]
    table may change only the crop size, --beta, the EMA --decay and the
    dead-code settings, and any other change is refused ([train] and
    [objective] are as for any run). --train decoder freezes the encoder, the codebook and their
    buffers, and trains the decoder alone: codes stay the same, and token
    datasets MODEL made decode with the new model without --force. run.json
    and the model's config.json record MODEL as its parent.

    {INPUTS}

    \b
    Examples:
        vqtok fit shards/train-{000000..000099}.tar --out runs/x --val shards/val.tar
        vqtok fit imagenet/train/ --out runs/imagenet --val imagenet/val/
        vqtok fit shards/ --out runs/cifar --config pipelines/cifar10.toml --steps 250000
        vqtok fit shards/ --out runs/vqgan --config pipelines/vqgan-cpu-small.toml
        vqtok fit my-photos/ --out runs/ft --init runs/llamagen/model --train decoder --steps 2000
        vqtok fit shards/ --out runs/gan --config pipelines/vqgan-cpu-small-gan.toml
        accelerate launch --multi_gpu --num_processes 8 -m vqtok fit shards/ --out runs/x
    """
    from vqtok.config import TOKENIZER_CONFIGS, family_name, load_objective_config, tokenizer_family
    from vqtok.storage import parse_options
    from vqtok.train import fit as fit_model

    options = parse_options(storage_options)
    if overrides["decay"] is not None and no_ema:
        raise click.UsageError("--decay and --no-ema exclude each other")
    objective = load_objective_config(config_path, pop_objective(overrides))
    parent_config = fine_tuned(init, family, options)
    family = family_name(parent_config) if init else tokenizer_family(config_path, family)
    not_for_family = [flag for name, flag in VQVAE_ONLY.items() if overrides[name] is not None]
    if family != "vqvae" and not_for_family:
        raise click.UsageError(
            f"{', '.join(not_for_family)}: VQ-VAE options; the {family} network's shape is set in the --config file"
        )
    if init:
        model_config, train_config = fine_tune_recipe(parent_config, config_path, no_ema, overrides)
    else:
        model_config, train_config = load_recipe(config_path, overrides, TOKENIZER_CONFIGS[family], TrainConfig)
        if no_ema:
            model_config = dataclasses.replace(
                model_config, quantizer=dataclasses.replace(model_config.quantizer, decay=None)
            )
    result = fit_model(
        list(inputs),
        out,
        model_config,
        train_config,
        val_shards=list(val),
        resume=resume,
        image_column=image_column,
        image_root=image_root,
        storage_options=options,
        init=init,
        train=train_part,
        objective=objective,
        vgg16_weights=vgg16_weights,
        lpips_weights=lpips_weights,
        exact_resume=exact_resume,
    )
    if result.main_process and "psnr" in result.metrics:
        m = result.metrics
        click.echo(
            f"held-out PSNR {m['psnr']:.2f} dB over all pixels, codebook usage {m['usage']:.1%}, "
            f"perplexity {m['perplexity']:.0f}"
        )


def fine_tuned(init, family, storage_options):
    """The config of the tokenizer --init names (None without --init), whose family a --family must be."""
    if not init:
        return None
    from vqtok.config import family_name
    from vqtok.errors import ConfigError
    from vqtok.tokenizers import tokenizer_config

    config = tokenizer_config(init, storage_options)
    if family is not None and family != family_name(config):
        raise ConfigError(
            f"--family {family}: --init {init} is a {family_name(config)} tokenizer, and a fine-tune keeps its family"
        )
    return config


def fine_tune_recipe(parent_config, config_path, no_ema, overrides):
    """(model config, train config) of a fine-tune: the parent's config with what the options and the --config
    recipe may change (`vqtok.config.fine_tune_config`, whose refusals name the option), and the recipe's [train]."""
    from vqtok.config import fine_tune_config, fine_tune_refusal, load_train_config
    from vqtok.errors import ConfigError

    if no_ema and (reason := fine_tune_refusal(parent_config, "decay", None)):
        raise ConfigError(f"--no-ema: {reason}")
    model, train = split_overrides(overrides, type(parent_config))
    command = click.get_current_context().command
    flags = {p.name: "/".join([*p.opts, *p.secondary_opts]) for p in command.params if isinstance(p, click.Option)}
    return fine_tune_config(parent_config, config_path, model, flags), load_train_config(config_path, train)


@cli.command("eval")
@click.argument("model_dir", metavar="MODEL")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--compare",
    multiple=True,
    metavar="MODEL",
    help="Another model to evaluate on the same images (repeatable): one row per model.",
)
@click.option(
    "--image-size", type=click.IntRange(min=1), help="Crop size for every model; MODEL's training size if not given."
)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most N images.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Folder for report.json and reconstructions.png (the worst and typical images over each model's "
    "reconstructions).",
)
@click.option("--num-workers", default=2, show_default=True, type=click.IntRange(min=0), help="Decoding workers.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
@click.option(
    "--lpips/--no-lpips",
    default=None,
    help="Measure LPIPS, refusing to go on without its two files; or leave it out.  [default: measured when "
    "both files are found or one is named, else noted as not computed]",
)
@click.option(
    "--rfid/--no-rfid",
    default=None,
    help="Measure rFID, refusing to go on without its file; or leave it out.  [default: measured when the file "
    "is found or named, else noted as not computed]",
)
@lpips_weights_options
@click.option(
    "--inception-weights",
    type=click.Path(exists=True, dir_okay=False),
    envvar="VQTOK_INCEPTION_WEIGHTS",
    show_envvar=True,
    help="pytorch-fid's Inception-v3 weights for rFID (pt_inception-2015-12-05-6726825d.pth).  [default: "
    "torch hub's cache, $TORCH_HOME/hub/checkpoints]",
)
@click.option("--image-column", help="The image column of Parquet inputs; found when there is only one.")
@image_root_option
@max_error_rate_option
@storage_options_option
@user_errors
@inputs_help
def eval_(model_dir, inputs, compare, as_json, storage_options, **options):
    """How well a tokenizer (MODEL, a path or a URL) reconstructs the images
    of INPUTS: its report card, or with --compare, several tokenizers' side by
    side.

    The same numbers `vqtok fit` reports on --val: PSNR (the mean of each
    image's, and over all pixels), SSIM, codebook usage, perplexity, bits per
    code, and encode and decode images/s. Images are centre-cropped to
    --image-size, as `vqtok encode` does.

    Also LPIPS (VGG16, the mean over images) and rFID (the Frechet distance
    between the Inception features of the crops and of their reconstructions)
    when their pretrained weights files are found: vqtok never downloads them
    (see docs/perceptual.md). Without them the report says which file is
    missing. rFID on fewer than 2,048 images is noted as such.

    With --compare, every model sees the same images, read and decoded once:
    one row per model (family, K, grid and the numbers above), --json a list
    of them. The crop size is one for all, so each model's stride must divide
    it. The images the picture shows are the worst and typical ones by their
    mean PSNR over the models.

    {INPUTS}

    \b
    Examples:
        vqtok eval runs/x/model shards/val-{000000..000009}.tar
        vqtok eval runs/x/model shards/val.tar --limit 2000 --out report/ --json
        vqtok eval runs/x/model imagenet/val/ --limit 2000
        vqtok eval runs/x/model shards/val.tar --compare runs/y/model --out compare/
        vqtok eval runs/x/model shards/val.tar --vgg16-weights vgg16-397923af.pth --no-rfid
    """
    from vqtok.evaluate import evaluate_inputs
    from vqtok.storage import parse_options

    options["storage_options"] = parse_options(storage_options)
    models = [model_dir, *compare]
    reports = evaluate_inputs(models, list(inputs), **options)
    if as_json:
        rows = [report.row() for report in reports]
        click.echo(json.dumps(rows if compare else rows[0], indent=2))
        return

    notes = []
    if reports[0].errors:
        notes.append(("errors", f"{count(reports[0].errors, 'sample')} could not be decoded"))
    if options["out"]:
        written = (os.path.join(options["out"], name) for name in ("report.json", "reconstructions.png"))
        notes.append(("written", ", ".join(written)))
    console().print(compare_table(reports, notes) if compare else report_table(reports[0], notes))


def report_table(report, notes: list[tuple[str, str]]):
    from rich.table import Table

    table = Table(title=f"{report.model} on {count(report.images, 'image')}", show_header=False)
    table.add_row("PSNR", f"{report.psnr_image_mean:.2f} dB mean over images, {report.psnr:.2f} dB over all pixels")
    table.add_row("SSIM", f"{report.ssim:.4f}")
    table.add_row("codebook usage", f"{report.codes_used:,} of {report.codebook_size:,} codes, {report.usage:.1%}")
    table.add_row("perplexity", f"{report.perplexity:,.1f} ({report.bits_per_code:.3f} bits per code)")
    speed = f"encode {report.encode_images_per_second:,.1f}, decode {report.decode_images_per_second:,.1f}"
    table.add_row("images/s (model)", speed)
    for name, card, _, note in feature_metrics(report):
        table.add_row(name, "; ".join(text for text in (card, note) if text))
    table.add_row("worst", ", ".join(f"{e.key} ({e.psnr:.1f} dB)" for e in report.worst[:3]))
    for name, note in notes:
        table.add_row(name, note)
    return table


# LPIPS and rFID: (name, key in the report, how a value is shown in the report card, and in --compare's column)
FEATURE_METRICS = (
    ("LPIPS", "lpips", "{:.4f} (VGG16, mean over images)", "{:.4f}"),
    ("rFID", "rfid", "{:.3f} on {images:,} images", "{:.3f}"),
)


def feature_metrics(report):
    """(name, the value as the report card shows it, as --compare's column does, the report's note) of each of
    LPIPS and rFID that the report measured or notes why it did not; "" and "-" for a value not measured."""
    for name, key, card, column in FEATURE_METRICS:
        value, note = getattr(report, key), report.notes.get(key, "")
        if value is None and not note:
            continue
        if value is None:
            yield name, "", "-", note
        else:
            yield name, card.format(value, images=report.images), column.format(value), note


def compare_table(reports, notes: list[tuple[str, str]]):
    from rich import box
    from rich.table import Table

    title = f"{len(reports)} tokenizers on the same {count(reports[0].images, 'image')}"
    features = [list(feature_metrics(r)) for r in reports]  # every model was measured with the same networks
    explained = [f"{name}: {note}" for name, _, _, note in features[0] if note]
    caption = "; ".join(["PSNR image mean: the mean of each image's PSNR, in dB", *explained, *(n for _, n in notes)])
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", overflow="fold", min_width=10)
    table.add_column("family")
    names = ["K", "grid", "PSNR\nimage mean", "SSIM", "usage", "perplexity", "bits/\ncode"]
    for name in [*names, *(name for name, *_ in features[0]), "images/s\nenc/dec"]:
        table.add_column(name, justify="right")
    for r, measured in zip(reports, features, strict=True):
        table.add_row(
            r.model,
            r.family,
            f"{r.codebook_size:,}",
            f"{r.grid[0]}x{r.grid[1]}",
            f"{r.psnr_image_mean:.2f}",
            f"{r.ssim:.3f}",
            f"{r.usage:.1%}",
            f"{r.perplexity:,.1f}",
            f"{r.bits_per_code:.2f}",
            *(column for _, _, column, _ in measured),
            f"{r.encode_images_per_second:,.0f}/{r.decode_images_per_second:,.0f}",
        )
    return table


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.argument("out")
@click.option("--model", "model_dir", required=True, help="Model directory (a path or a URL).")
@click.option("--image-size", type=click.IntRange(min=1), help="Crop size; the model's training size if not given.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--num-workers", default=2, show_default=True, type=click.IntRange(min=0), help="Decoding workers.")
@click.option(
    "--keep",
    default="",
    show_default=True,
    help="Fields to carry into columns: a shard's (cls,txt,json) or a Parquet file's columns (label,caption).",
)
@click.option(
    "--class-from-folder", is_flag=True, help="An image folder's first level is the class: an integer column cls."
)
@click.option("--image-column", help="The image column of Parquet inputs; found when there is only one.")
@click.option(
    "--files-per-part",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Files of an image folder per part file, the unit that is committed and resumed.",
)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option(
    "--augment",
    default="none",
    show_default=True,
    type=click.Choice(["none", "flip", "ten-crop"]),
    help="Also store each image's extra views in a column aug_codes, as LlamaGen does: the image mirrored, or "
    "ten crops (corners, centre, mirrored) of a centre square 1.1 times larger.",
)
@click.option("--overwrite", is_flag=True, help="Replace a token dataset made with other settings or listings.")
@image_root_option
@max_error_rate_option
@storage_options_option
@user_errors
@inputs_help
def encode(inputs, out, model_dir, keep, storage_options, **options):
    """Tokenize images into a Parquet token dataset OUT (a path or a URL).

    One part file per shard, per Parquet file, or per --files-per-part files
    of an image folder; running the same command again skips the parts
    already done, so an interrupted run picks up where it stopped. A folder
    whose listing changed since is refused unless --overwrite. Under
    `accelerate launch` or torchrun, part i goes to process i mod world size.

    {INPUTS}

    \b
    Examples:
        vqtok encode shards/ tokens.parquet --model runs/x/model
        vqtok encode shards/train-{000000..000099}.tar tokens.parquet --model runs/x/model --keep cls,txt
        vqtok encode imagenet/train/ imagenet.parquet --model runs/x/model --class-from-folder
        vqtok encode cifar10/plain_text/ cifar.parquet --model runs/x/model --keep label
        vqtok encode imagenet/train/ imagenet.parquet --model runs/x/model --class-from-folder --augment flip
        vqtok encode s3://bucket/shards/ s3://bucket/tokens.parquet --model s3://bucket/runs/x/model
        accelerate launch --multi_gpu --num_processes 8 -m vqtok encode shards/ tokens.parquet --model runs/x/model
    """
    from vqtok.encode import encode as encode_inputs
    from vqtok.storage import parse_options

    fields = [name.strip() for name in keep.split(",") if name.strip()]
    options["storage_options"] = parse_options(storage_options)
    result = encode_inputs(list(inputs), out, model_dir, keep=fields, **options)
    if result.rank == 0:
        print_encode_summary(result)
    if result.failed:
        named = "; ".join(f"{shard} ({reason})" for shard, reason in result.failed)
        raise click.ClickException(
            f"{count(len(result.failed), 'shard')} could not be read to the end: {named}. The samples before a break "
            "are kept; run the same command again to retry."
        )


def print_encode_summary(result) -> None:
    from rich.table import Table

    who = f" (process {result.rank} of {result.world_size})" if result.world_size > 1 else ""
    table = Table(title=f"encoded into {result.out}{who}", show_header=False)
    table.add_row("parts", f"{result.encoded} encoded, {result.skipped} already done, {len(result.failed)} failed")
    table.add_row("images", f"{result.images:,} encoded, {count(result.errors, 'error')}")
    table.add_row("speed", f"{result.images_per_second:,.1f} images/s over {result.seconds:.1f} s")
    table.add_row(
        "time",
        f"waiting for images {result.wait_seconds:.1f} s, encoding {result.encode_seconds:.1f} s, "
        f"writing {result.write_seconds:.1f} s; workers decoding {result.decode_seconds:.1f} s",
    )
    if result.totals:
        totals = result.totals
        held = f"{count(totals['rows'], 'row')}, {count(totals['errors'], 'error')}"
        table.add_row("dataset", f"{held} in {count(totals['shards'], 'part')}")
    console().print(table)


@cli.command()
@click.argument("tokens")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--model", "model_dir", required=True, help="Model directory (a path or a URL).")
@click.option(
    "--format",
    "format_",
    default="png",
    show_default=True,
    type=click.Choice(["png", "wds"]),
    help="One PNG per row named after its key, or WebDataset shards of KEY.png and the carried fields.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Decode only the first N rows.")
@click.option("--keys", help="Decode only these keys, comma-separated.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Grids per batch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--force", is_flag=True, help="Decode codes made by another model with the same K and grid.")
@storage_options_option
@user_errors
def decode(tokens, out, model_dir, format_, keys, storage_options, **options):
    """Turn code grids back into images.

    TOKENS is a token dataset written by `vqtok encode`, one of its Parquet
    files, or any Parquet file with `key` and `codes` columns of (h, w) grids,
    such as a prior's samples; a path or a URL. Keys become file names inside
    the local folder OUT, never outside it.

    --format wds writes OUT/decoded-NNNNNN.tar, 10,000 samples a shard, each
    renamed into place only when whole: a decode that fails leaves the shards
    it had finished and removes the one it was writing.

    Under `accelerate launch` or torchrun, batch i goes to process i mod world
    size and every image is written once, under the name one process would
    give it; with --format wds, process R writes OUT/decoded-rRRR-NNNNNN.tar.

    \b
    Examples:
        vqtok decode tokens.parquet decoded/ --model runs/x/model --limit 100
        vqtok decode samples.parquet decoded/ --model runs/x/model --format wds
    """
    from vqtok.decode import decode as decode_tokens
    from vqtok.storage import parse_options

    wanted = [k for k in keys.split(",") if k] if keys else None
    options["storage_options"] = parse_options(storage_options)
    result = decode_tokens(tokens, out, model_dir, format=format_, keys=wanted, **options)
    what = plural(result.files, "PNG file") if format_ == "png" else plural(result.files, "WebDataset shard")
    what = f"{result.files} {what}"
    who = f" (process {result.rank} of {result.world_size})" if result.world_size > 1 else ""
    click.echo(
        f"decoded {result.images:,} images into {what} under {result.out}{who} in {result.seconds:.1f} s "
        f"({result.images_per_second:,.1f} images/s)"
    )
    if result.rank != 0:  # the notes are about the whole selection, which every process read alike
        return
    if result.renamed:
        keys = plural(result.renamed, "key")
        click.echo(f"{result.renamed} {keys} mapped to a name another key had taken; written with a ~hash suffix")
    for path, progress in result.unfinished.items():
        click.echo(f"note: {path} is unfinished ({progress}): decoded its committed parts only")


@cli.command()
@click.option("--out", default="vqtok-demo", show_default=True, type=click.Path(file_okay=False), help="Folder.")
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(min=1), help="Training steps.")
@click.option("--prior", is_flag=True, help="Also fit a prior on the training crops' codes and decode its samples.")
@click.option("--prior-steps", default=1000, show_default=True, type=click.IntRange(min=1), help="The prior's steps.")
@user_errors
def demo(out, steps, prior, prior_steps):
    """The whole loop on photographs bundled with scikit-image, no download.

    Cuts shards of crops from some photographs, fits a small model on them,
    encodes photographs it never saw, decodes them, and prints how close the
    reconstructions are. With --prior it also encodes the training crops,
    fits a prior on their codes (the photograph as the class), samples crops
    of each photograph from it and decodes them. Needs the `demo` extra: pip
    install 'vqtok[demo]'. A few minutes on a laptop CPU (a few more with
    --prior); uses a GPU when there is one.

    \b
    Examples:
        vqtok demo --out vqtok-demo
        vqtok demo --out vqtok-demo --prior
    """
    from rich.table import Table

    from vqtok.demo import run_demo

    result = run_demo(out, steps, prior_steps=prior_steps if prior else None)
    table = Table(title="vqtok demo")
    table.add_column("stage")
    table.add_column("images", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("images/s", justify="right")
    for stage, images in result.images.items():
        seconds = result.seconds[stage]
        table.add_row(stage, f"{images:,}", f"{seconds:.1f}", f"{images / seconds:,.1f}")
    out = console()
    out.print(table)
    out.print(
        f"held-out photographs at 128x128: PSNR {result.psnr:.2f} dB over all pixels, codebook usage {result.usage:.1%}"
    )
    for what, where in result.paths.items():
        out.print(f"{what}: {where}")


@cli.command("import")
@click.argument("format_", metavar="FORMAT")
@click.argument("source")
@click.argument("out")
@click.option("--config", "config_path", help="The checkpoint's config file, where FORMAT needs one (taming: YAML).")
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Load a checkpoint that holds more than tensors, which runs code from the file: only for files you trust.",
)
@click.option(
    "--normalize-codes/--no-normalize-codes",
    default=None,
    show_default="the format's",
    help="l2-normalized code lookup, where the checkpoint cannot tell.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    show_default="the checkpoint's training size",
    help="The crop size commands use by default (a multiple of the model's stride).",
)
@click.option("--overwrite", is_flag=True, help="Replace a model already at OUT.")
@storage_options_option
@user_errors
def import_(format_, source, out, config_path, trust_pickle, normalize_codes, image_size, overwrite, storage_options):
    """Convert another toolkit's checkpoint (SOURCE) into a vqtok model
    directory (OUT), which every vqtok command then takes.

    \b
    FORMAT is one of:
        taming     taming-transformers: SOURCE its last.ckpt, --config its YAML
        llamagen   LlamaGen: SOURCE its vq_ds8_c2i.pt or vq_ds16_c2i.pt
        diffusers  a diffusers VQModel folder (config.json and weights),
                   local or hf://ORG/REPO/vqvae

    Checkpoints are loaded with torch.load(weights_only=True); one that
    holds more than tensors is refused unless --trust-pickle. config.json
    records the format, SOURCE's file name and its SHA-256. SOURCE and OUT
    may be URLs.

    \b
    Examples:
        vqtok import taming logs/vqgan/checkpoints/last.ckpt runs/taming/model --config model.yaml
        vqtok import llamagen vq_ds16_c2i.pt runs/llamagen/model
        vqtok import diffusers hf://amused/amused-256/vqvae runs/amused/model
        vqtok info runs/taming/model
    """
    from vqtok.storage import Location, parse_options
    from vqtok.tokenizers.importers import ImportOptions, import_model

    options = parse_options(storage_options)
    settings = ImportOptions(
        config=Location.of(config_path, options) if config_path else None,
        trust_pickle=trust_pickle,
        normalize_codes=normalize_codes,
        image_size=image_size,
        overwrite=overwrite,
    )
    model = import_model(format_, source, out, settings, options)
    h, w = model.grid_size(model.config.image_size)
    click.echo(
        f"imported {source} ({format_}) into {out}: a {model.FAMILY} tokenizer, K = {model.codebook_size}, "
        f"{h}x{w} codes at {model.config.image_size}x{model.config.image_size}, model id {model.model_id}"
    )


@cli.group()
def prior():
    """Train a prior over token grids, and sample grids from it.

    \b
    The loop, from images to sampled images:
        vqtok fit shards/ --out runs/x
        vqtok encode shards/ tokens.parquet --model runs/x/model --keep cls
        vqtok prior fit tokens.parquet --out runs/p --cond cls
        vqtok prior sample runs/p/model samples.parquet --per-class 8
        vqtok decode samples.parquet images/ --model runs/x/model
    """


@prior.command("fit")
@click.argument("tokens", nargs=-1, required=True)
@click.option("--out", required=True, help="Run folder (a path or a URL): checkpoints, model, samples.")
@click.option("--val", multiple=True, help="Held-out tokens (repeatable; a path or a URL).")
@click.option("--cond", help="The column of class labels to condition on, e.g. cls.")
@click.option(
    "--classes", "num_classes", type=click.IntRange(min=1), help="Classes in --cond.  [default: the largest + 1]"
)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="A TOML recipe.")
@override("layers", PriorConfig, "--layers", type=click.IntRange(min=1), help="Transformer blocks.")
@override("width", PriorConfig, "--width", type=click.IntRange(min=1), help="Embedding width.")
@override("heads", PriorConfig, "--heads", type=click.IntRange(min=1), help="Attention heads.")
@override("dropout", PriorConfig, "--dropout", type=click.FloatRange(0, 1, max_open=True), help="Dropout.")
@training_options(PriorTrainConfig, "Grids", "Token reading workers per process.")
@click.option(
    "--tokenizer",
    help="The tokenizer that made the tokens (a path or a URL): each evaluation then decodes sampled grids into "
    "a picture in samples/, with or without --val.",
)
@click.option(
    "--plain-only",
    is_flag=True,
    help="Train on each image's plain grid only, not on the augmented views of tokens encoded with --augment.",
)
@click.option(
    "--partial",
    is_flag=True,
    help="Read token datasets whose encode did not finish (TOKENS and --val alike): only their committed parts, "
    "the shards done so far; metrics.jsonl records the grids read. Without it such a dataset is refused.",
)
@storage_options_option
@user_errors
def prior_fit(
    tokens, out, val, cond, config_path, resume, tokenizer, plain_only, partial, storage_options, **overrides
):
    """Train a prior (a transformer over the codes in raster order) on token grids.

    TOKENS are token datasets written by `vqtok encode`, Parquet files of
    them, or several of either, all from one tokenizer. A dataset whose
    encode has not finished is refused unless --partial. With --cond the
    prior is class-conditional (the class is its first token) and can be
    sampled with classifier-free guidance. Held-out --val tokens are scored
    in bits per code at each evaluation; with --tokenizer each evaluation
    also decodes sampled grids into samples/step-NNNNNN.png, a labelled row
    per class. TOKENS, --val, --tokenizer and --out may be URLs (s3://...).
    Runs on one CPU or GPU, or on many under `accelerate launch`. Tokens
    encoded with --augment give each image one of its grids per epoch, the
    plain one or a view, each equally likely, unless --plain-only; held-out
    tokens are scored on their plain grids.

    \b
    Examples:
        vqtok prior fit tokens.parquet --out runs/p --val val.parquet --cond cls
        vqtok prior fit tokens.parquet --out runs/p --config pipelines/prior-cpu-small.toml
        vqtok prior fit s3://bucket/tokens.parquet --out s3://bucket/runs/p --tokenizer s3://bucket/runs/x/model
        accelerate launch --multi_gpu --num_processes 8 -m vqtok prior fit tokens.parquet --out runs/p
    """
    from vqtok.prior.fit import fit_prior
    from vqtok.storage import parse_options

    config, train_config = load_recipe(config_path, overrides, PriorConfig, PriorTrainConfig)
    result = fit_prior(
        list(tokens),
        out,
        config,
        train_config,
        val=list(val),
        cond=cond,
        tokenizer=tokenizer,
        resume=resume,
        plain_only=plain_only,
        storage_options=parse_options(storage_options),
        partial=partial,
    )
    if not result.main_process:
        return
    for path, progress in result.unfinished.items():
        click.echo(f"note: {path} is unfinished ({progress}): read its committed parts only")
    if result.unfinished:
        click.echo(f"trained on {result.grids:,} grids")
    if "bits_per_code" in result.metrics:
        click.echo(f"held-out {result.metrics['bits_per_code']:.4f} bits per code")


def class_list(ctx, param, value):
    if value is None:
        return None
    try:
        labels = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("classes are integers, one or comma-separated: 3 or 0,1,2") from None
    return labels[0] if len(labels) == 1 else labels


@prior.command("sample")
@click.argument("prior_dir", metavar="PRIOR")
@click.argument("out")
@click.option("--n", type=click.IntRange(min=1), help="Grids to sample.  [default: 64]")
@click.option("--cls", callback=class_list, help="A class for every grid (3), or classes to cycle through (0,1,2).")
@click.option("--per-class", type=click.IntRange(min=1), help="N grids of each class of the prior.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0), help="0: greedy.")
@click.option("--top-k", type=click.IntRange(min=1), help="Draw from the k likeliest codes only.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Draw from the likeliest codes up to p.")
@click.option("--guidance", default=0.0, show_default=True, type=float, help="Classifier-free guidance w.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Random seed.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Grids per batch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--overwrite", is_flag=True, help="Replace samples drawn with other settings.")
@storage_options_option
@user_errors
def prior_sample(prior_dir, out, storage_options, **options):
    """Sample grids from a prior into a token dataset OUT for `vqtok decode`.

    PRIOR is a prior's directory (runs/p/model) or its run folder (runs/p).
    PRIOR and OUT may be URLs (s3://...). OUT names the tokenizer the prior's codes came from, so `vqtok decode`
    takes that tokenizer and refuses others. Guidance w mixes the conditional
    and unconditional logits, cond + w (cond - uncond): 0 is plain
    conditional sampling, larger w sticks closer to the class. The same seed
    gives the same grids; the same command again finishes what an interrupted
    run left.

    \b
    Examples:
        vqtok prior sample runs/p/model samples.parquet --n 64
        vqtok prior sample runs/p/model samples.parquet --per-class 8 --guidance 2 --top-k 100
        vqtok prior sample s3://bucket/runs/p s3://bucket/samples.parquet --n 1024
        vqtok decode samples.parquet images/ --model runs/x/model
    """
    from vqtok.prior.sample import sample
    from vqtok.storage import parse_options

    result = sample(prior_dir, out, storage_options=parse_options(storage_options), **options)
    if result.rank == 0:
        who = f" (process {result.rank} of {result.world_size})" if result.world_size > 1 else ""
        click.echo(
            f"sampled {result.grids:,} grids into {result.out}{who} in {result.seconds:.1f} s "
            f"({result.codes_per_second:,.0f} codes/s); {result.skipped} {plural(result.skipped, 'shard')} "
            "already done; "
            f"decode them with the tokenizer whose model id is {result.tokenizer}"
        )


def main():
    """`vqtok`. A process that `accelerate launch` or torchrun started leaves without the interpreter's shutdown,
    once its exit handlers have run and its output is flushed. One of torch's gloo threads can still be freeing a
    finished collective as a run ends; if the interpreter is shutting down by then, the process aborts
    ("terminate called without an active exception") and a run that had finished fails. The threads cannot be
    stopped first: with torch 2.13 the process group outlives `destroy_process_group` once DDP has imported
    torch._dynamo, and freeing it while Python holds the GIL can deadlock."""
    from vqtok.distributed import launched

    if not launched():
        cli()
        return
    try:
        cli()
        code = 0
    except SystemExit as stop:  # how click ends every command, with its exit code
        code = stop.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, exit code 1, as the interpreter does
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
