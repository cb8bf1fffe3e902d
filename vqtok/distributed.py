"""Which process this is, found once: the launcher's environment, and the process group once one is running.

torchrun and `accelerate launch` start every process with RANK, WORLD_SIZE and LOCAL_RANK set. The commands
whose processes never talk (encode, decode, prior sample) split their work by `process_rank()` alone; those that
add up statistics (fit, eval, prior fit) also join the process group, after which `in_process_group()` is true.
torch is imported only when asked about the process group, so that the token format stays readable without it.
"""

from __future__ import annotations

import os

from vqtok.errors import ConfigError


def process_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun and accelerate launch set them; (0, 1) for a lone process."""
    try:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as exc:
        raise ConfigError(f"RANK and WORLD_SIZE must be integers: {exc}") from None
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    return rank, world_size


def launched() -> bool:
    """Whether a launcher started several processes (WORLD_SIZE > 1), whether or not they have joined a group yet."""
    return process_rank()[1] > 1


def is_main_process() -> bool:
    return process_rank()[0] == 0


def in_process_group() -> bool:
    """Whether this process is one of several in a running torch.distributed group. Asked at call time, so that a
    module built before the group started still adds up its statistics across processes."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
