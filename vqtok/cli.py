"""The `vqtok` command line: thin click commands over the library.

Each command parses its options, calls one library function and prints with
rich. Library errors (`VQTokError`) become one-line messages with exit code 1.
torch is imported inside command bodies so that `vqtok --help` answers at once.
"""

from __future__ import annotations

import functools
import json

import click

from vqtok import __version__
from vqtok.errors import VQTokError


def user_errors(command):
    """Turn the library's user-facing errors into click's one-line messages."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VQTokError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vqtok")
def cli():
    """VQ-VAE image tokenizers: images in WebDataset shards <-> grids of codebook indices."""


@cli.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
@user_errors
def info(path, as_json):
    """What a model directory holds: its settings, size, code grid and model id.

    \b
    Example:
        vqtok info runs/x/model
    """
    from vqtok.model import VQVAE

    model = VQVAE.from_pretrained(path)
    config = model.config
    grid = model.grid_size(config.image_size)
    summary = {
        "path": path,
        "model_id": model.model_id,
        "parameters": sum(p.numel() for p in model.parameters()),
        "codebook_size": config.codebook_size,
        "code_dim": config.code_dim,
        "image_size": config.image_size,
        "grid": list(grid),
        "config": config.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model {path}", show_header=False)
    table.add_row("model id", summary["model_id"])
    table.add_row("parameters", f"{summary['parameters']:,}")
    table.add_row("codebook", f"K = {config.codebook_size}, D = {config.code_dim}")
    for size in sorted({config.image_size, 64, 128, 256}):
        h, w = model.grid_size(size)
        table.add_row(f"grid at {size}x{size}", f"{h}x{w} codes")
    for name, value in config.to_dict().items():
        table.add_row(name, str(value))
    Console().print(table)


def main():
    cli()
