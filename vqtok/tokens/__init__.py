"""The token dataset: grids of code indices in Parquet, one part file per input shard, that pandas, polars,
DuckDB and Hugging Face `datasets` read as they are.

    format.py    the names, the settings, the schema, grids to and from Arrow
    writer.py    the commit protocol: writing shards whole, and what counts as committed and finished
    reader.py    TokenSet (the one reader every command uses) and read_codes
    summary.py   what `vqtok info` reports of a dataset
    dataset.py   TokenDataset, the torch dataset a prior trains on

Only dataset.py needs torch, and it is imported on first use of `TokenDataset`, so that the rest reads tokens
without it.
"""

from .format import TokenSettings
from .reader import TokenSet, UnfinishedDataset, read_codes, read_metadata
from .summary import summarize
from .writer import TokenStore, read_errors

__all__ = [
    "TokenDataset",
    "TokenSet",
    "TokenSettings",
    "TokenStore",
    "UnfinishedDataset",
    "read_codes",
    "read_errors",
    "read_metadata",
    "summarize",
]


def __getattr__(name):
    if name == "TokenDataset":
        from .dataset import TokenDataset

        return TokenDataset
    raise AttributeError(f"module 'vqtok.tokens' has no attribute {name!r}")
