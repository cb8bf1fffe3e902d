"""Two CPU processes over gloo hold the same codebook, bit for bit: the quantizer alone, and `vqtok fit`."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import image_samples, launch_two_processes, read_metrics

from vqtok import VQVAE
from vqtok.config import QuantizerConfig
from vqtok.quantize import VectorQuantizer

STEPS = 12


def batches(rank):
    """Each rank sees its own data: 8 clusters, so most of 64 codes go dead and restart."""
    gen = torch.Generator().manual_seed(100 + rank)
    means = torch.randn(8, 4, generator=gen) * 3
    for _ in range(STEPS):
        points = means.repeat_interleave(16, 0) + 0.1 * torch.randn(128, 4, generator=gen)
        yield points.t().reshape(1, 4, 8, 16)  # (B, D, h, w)


def make_quantizer(kmeans_init):
    return VectorQuantizer(QuantizerConfig(64, 4, decay=0.9, kmeans_init=kmeans_init, dead_code_window=2))


def run_rank(rank, world_size, store_path, out_dir, kmeans_init):
    torch.manual_seed(rank)  # different initial codebooks and random streams: only syncing can make them agree
    vq = make_quantizer(kmeans_init)  # built before the process group exists
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        for z in batches(rank):
            vq(z)
        np.save(f"{out_dir}/codebook{rank}.npy", vq.codebook.numpy())
        np.save(f"{out_dir}/restarted{rank}.npy", vq.fresh_since.numpy())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kmeans_init", [True, False])
def test_two_processes_hold_identical_codebooks(tmp_path, kmeans_init):
    mp.spawn(run_rank, args=(2, str(tmp_path / "store"), str(tmp_path), kmeans_init), nprocs=2, join=True)
    rank0, rank1 = np.load(tmp_path / "codebook0.npy"), np.load(tmp_path / "codebook1.npy")
    assert rank0.tobytes() == rank1.tobytes()
    assert (np.load(tmp_path / "restarted0.npy") > 0).any(), "no dead code was restarted: the test lost its point"

    torch.manual_seed(0)
    alone = make_quantizer(kmeans_init)
    for z in batches(0):
        alone(z)
    assert not np.array_equal(alone.codebook.numpy(), rank0), "rank 0 alone ends the same: nothing was shared"


RECIPE = """
[model]
hidden_channels = 8
res_channels = 4
image_size = 16
[model.quantizer]
codebook_size = 16
code_dim = 4
dead_code_window = 2  # restarts from the first steps, so that they too must agree
"""


def test_fit_with_a_learned_codebook_ends_with_the_same_codebook_on_both_processes(make_shard, tmp_path):
    """--no-ema: the codebook is a parameter that DDP's averaged gradients move, not a buffer of moving averages."""
    shards = [make_shard(f"train-{i}.tar", image_samples([f"t{i}-{j}" for j in range(6)], seed=i)) for i in range(2)]
    (tmp_path / "recipe.toml").write_text(RECIPE)
    out = tmp_path / "run"
    fit = ["fit", *shards, "--out", out, "--config", tmp_path / "recipe.toml", "--no-ema", "--steps", "4"]
    proc = launch_two_processes(*fit, "--batch-size", "4", "--num-workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]

    final = read_metrics(out)[-1]
    assert final["processes"] == 2
    assert len(final["codebook_digests"]) == 2 and len(set(final["codebook_digests"])) == 1
    model = VQVAE.from_pretrained(out / "model")
    assert model.config.quantizer.decay is None and isinstance(model.quantizer.codebook, torch.nn.Parameter)
    assert (model.quantizer.fresh_since > 0).any(), "no dead code was restarted: the test lost its point"
