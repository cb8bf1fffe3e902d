"""Token datasets for training priors in torch: rows of codes streamed a row group at a time.

The torch side of `vqtok.tokens`, kept out of its other modules so that reading tokens needs no torch. A
process holds one row group per DataLoader worker, whatever the size of the dataset; row groups are split across
processes (rank, world_size) and then workers, so every row is read once per pass.

    from torch.utils.data import DataLoader
    from vqtok.tokens import TokenDataset

    dataset = TokenDataset("tokens.parquet", shuffle=True, columns=["cls"])
    loader = DataLoader(dataset, batch_size=64, num_workers=2)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            batch["codes"]  # int64 (B, h, w), ready for nn.Embedding
            batch["cls"]    # the carried class labels

With `views=True`, a token dataset encoded with `--augment` gives each row one of its image's grids per epoch:
the plain `codes` or one of the views in `aug_codes`, each equally likely.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vqtok.errors import StoreError

from .format import VIEWS_COLUMN, codes_array, take_views, view_count
from .reader import TokenSet, read_row_group


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
    Parquet files (paths, local or URLs that fsspec opens with `storage_options`, or a `vqtok.tokens.TokenSet`
    already opened and checked). An unfinished token dataset is refused unless `partial`, which reads its
    committed parts (`TokenSet`).

    With `shuffle`, row groups and the rows inside each come in a random order drawn from `seed` and the
    epoch; call `set_epoch` before each pass for a new order, as with torch's DistributedSampler, or ask for
    `repeat`: passes then follow one another without end, epoch after epoch, each in a new order, which suits
    a trainer that stops after a number of steps (and DataLoader workers that persist). The split across
    processes stays the same, and is by row group: processes may get different numbers of rows (`rows`), so
    under DDP end each epoch after a fixed number of steps (or use accelerate's `join_uneven_inputs`).

    With `views`, each row of a file that holds augmented views (`vqtok encode --augment`) yields one of its
    image's grids, the plain `codes` or a view of `aug_codes`, each equally likely, and "view": which one (0 the
    plain grid, i the i-th of `aug_codes`; always 0 in files without views). The draw depends on `seed`, the
    epoch and the row only, not on the order, the workers or the processes: the same epoch gives every row the
    same view, another epoch draws again. Without `views` (the default) rows are the plain grids.
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
        views: bool = False,
        partial: bool = False,
    ) -> None:
        if not isinstance(tokens, TokenSet):
            tokens = TokenSet(tokens, columns, storage_options, partial=partial)
        self.tokens = tokens
        self.pieces = split_units(self.tokens, rank, world_size)
        self.rows = sum(end - start for _, start, end in self.pieces)  # this process's
        self.columns = tuple(columns)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.repeat = repeat
        self.views = views
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
                drawing = self.views and self.tokens.has_views(file)
                wanted = [*self.columns, VIEWS_COLUMN] if drawing else self.columns
                table = read_row_group(file, index, wanted).slice(start, end - start)
                codes = codes_array(table.column("codes"))  # (n, h, w) int64
                columns = {name: table.column(name).to_pylist() for name in ("key", *self.columns)}
                if self.views:
                    chosen = np.zeros(len(codes), dtype=np.int64)
                    if drawing:
                        chosen = self._draw(table.column(VIEWS_COLUMN), unit, epoch)[start:end]
                        codes = self._with_views(codes, table.column(VIEWS_COLUMN), chosen, file)
                    columns["view"] = chosen.tolist()
                codes = torch.from_numpy(codes)
                order = list(range(table.num_rows))
                if self.shuffle:
                    rng.shuffle(order)
                for i in order:
                    yield {"codes": codes[i], **{name: values[i] for name, values in columns.items()}}
            if not self.repeat:
                return
            epoch += 1

    def _draw(self, column, unit: int, epoch: int) -> np.ndarray:
        """A view in [0, V] for every row of a whole row group, drawn from the seed, the epoch and the row group
        alone, so that every split of it across workers and processes draws the same."""
        views = view_count(column) + 1  # the plain grid and the V of aug_codes
        rng = np.random.default_rng(random.Random(f"vqtok-views:{self.seed}:{epoch}:{unit}").getrandbits(64))
        return rng.integers(0, views, self.tokens.unit_rows[unit])

    @staticmethod
    def _with_views(codes: np.ndarray, column, chosen: np.ndarray, file) -> np.ndarray:
        """codes (n, h, w) with row i replaced by its view chosen[i] - 1 of `aug_codes` where chosen[i] > 0."""
        rows = np.flatnonzero(chosen)
        if len(rows):
            picked = take_views(column, rows, chosen[rows] - 1)  # (k, h, w)
            if picked.shape[1:] != codes.shape[1:]:
                raise StoreError(f"{file}: {VIEWS_COLUMN} grids are {picked.shape[1:]}, codes {codes.shape[1:]}")
            codes[rows] = picked
        return codes
