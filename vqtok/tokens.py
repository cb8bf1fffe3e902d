"""Token datasets for training priors in torch: rows of codes streamed a row group at a time.

The torch side of `vqtok.store`, kept out of it so that reading tokens needs no torch. A process holds one
row group per DataLoader worker, whatever the size of the dataset; row groups are split across processes
(rank, world_size) and then workers, so every row is read once per pass.

    from torch.utils.data import DataLoader
    from vqtok.tokens import TokenDataset

    dataset = TokenDataset("tokens.parquet", shuffle=True, columns=["cls"])
    loader = DataLoader(dataset, batch_size=64, num_workers=2)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            batch["codes"]  # int64 (B, h, w), ready for nn.Embedding
            batch["cls"]    # the carried class labels
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vqtok.store import TokenSet, codes_array, read_row_group


def split_units(tokens: TokenSet, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """This process's share of the rows: (unit index, first row, end row) of whole row groups, round robin; a
    token set with fewer row groups than processes has each row group cut into world_size slices instead,
    so that every process gets rows."""
    parts = 1 if len(tokens.units) >= world_size else world_size
    pieces = [
        (i, rows * part // parts, rows * (part + 1) // parts)
        for i, rows in enumerate(tokens.unit_rows)
        for part in range(parts)
    ]
    return pieces[rank::world_size]


class TokenDataset(IterableDataset):
    """Rows {"key", "codes": int64 (h, w), and the carried `columns`} of one or several token datasets or
    Parquet files (paths, local or URLs that fsspec opens with `storage_options`, or a `vqtok.store.TokenSet`
    already opened and checked).

    With `shuffle`, row groups and the rows inside each come in a random order drawn from `seed` and the
    epoch; call `set_epoch` before each pass for a new order, as with torch's DistributedSampler, or ask for
    `repeat`: passes then follow one another without end, epoch after epoch, each in a new order, which suits
    a trainer that stops after a number of steps (and DataLoader workers that persist). The split across
    processes stays the same, and is by row group: processes may get different numbers of rows (`rows`), so
    under DDP end each epoch after a fixed number of steps (or use accelerate's `join_uneven_inputs`).
    """

    def __init__(
        self,
        tokens: TokenSet | str | os.PathLike | Sequence[str | os.PathLike],
        *,
        columns: Sequence[str] = (),
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        repeat: bool = False,
        storage_options: dict | None = None,
    ) -> None:
        self.tokens = tokens if isinstance(tokens, TokenSet) else TokenSet(tokens, columns, storage_options)
        self.pieces = split_units(self.tokens, rank, world_size)
        self.rows = sum(end - start for _, start, end in self.pieces)  # this process's
        self.columns = tuple(columns)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.repeat = repeat
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        while True:
            rng = random.Random(f"vqtok-tokens:{self.seed}:{self.rank}:{epoch}")
            pieces = list(self.pieces)
            if self.shuffle:
                rng.shuffle(pieces)  # same order in every worker, so the split below still covers each piece once
            mine = pieces[worker::num_workers]
            if not mine:  # more workers than pieces: this one has nothing to read
                return
            for unit, start, end in mine:
                file, index = self.tokens.units[unit]
                table = read_row_group(file, index, self.columns).slice(start, end - start)
                codes = torch.from_numpy(codes_array(table.column("codes")))  # (n, h, w) int64
                columns = {name: table.column(name).to_pylist() for name in ("key", *self.columns)}
                order = list(range(table.num_rows))
                if self.shuffle:
                    rng.shuffle(order)
                for i in order:
                    yield {"codes": codes[i], **{name: values[i] for name, values in columns.items()}}
            if not self.repeat:
                return
            epoch += 1
