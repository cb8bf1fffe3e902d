"""The token dataset's reader and writer under their first import path: the code lives in `vqtok.tokens`; this
module keeps users' `from vqtok.store import read_codes` (and the other names below) working."""

from vqtok.tokens import (  # noqa: F401
    TokenSet,
    TokenSettings,
    TokenStore,
    UnfinishedDataset,
    read_codes,
    read_errors,
    read_metadata,
    summarize,
)
