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

from vqtok.store import codes_array, read_row_group, row_groups


class TokenDataset(IterableDataset):
    """Rows {"key", "codes": int64 (h, w), and the carried `columns`} of a token dataset or Parquet file, on
    the local disk or at a URL that fsspec opens (`storage_options` go to it).

    With `shuffle`, row groups and the rows inside each come in a random order drawn from `seed` and the
    epoch; call `set_epoch` before each pass for a new order, as with torch's DistributedSampler. The split
    across processes stays the same, and is by row group: processes may get different numbers of rows, so
    under DDP end each epoch after a fixed number of steps (or use accelerate's `join_uneven_inputs`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        columns: Sequence[str] = (),
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        storage_options: dict | None = None,
    ) -> None:
        self.units = row_groups(path, storage_options)[rank::world_size]
        self.columns = tuple(columns)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"vqtok-tokens:{self.seed}:{self.rank}:{self.epoch}")
        units = list(self.units)
        if self.shuffle:
            rng.shuffle(units)  # same order in every worker, so the split below still covers each unit once
        for file, index in units[worker::num_workers]:
            table = read_row_group(file, index, self.columns)
            codes = torch.from_numpy(codes_array(table.column("codes")))  # (n, h, w) int64
            columns = {name: table.column(name).to_pylist() for name in ("key", *self.columns)}
            order = list(range(table.num_rows))
            if self.shuffle:
                rng.shuffle(order)
            for i in order:
                yield {"codes": codes[i], **{name: values[i] for name, values in columns.items()}}
