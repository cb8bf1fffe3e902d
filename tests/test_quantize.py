import math

import pytest
import torch

from vqtok.config import QuantizerConfig
from vqtok.quantize import VectorQuantizer, _argmin_rows, kmeans, nearest_codes
from vqtok.usage import CodeUsage


def brute_force_codes(flat, codebook):
    distances = torch.cdist(flat.double(), codebook.double())  # (N, K) in float64
    return distances.argmin(dim=1)


@pytest.mark.parametrize("K", [100, 256, 4096])  # 100: plain argmin; the others: grouped argmin
def test_nearest_codes_equal_float64_brute_force(K):
    gen = torch.Generator().manual_seed(K)
    flat = torch.randn(3000, 16, generator=gen)
    codebook = torch.randn(K, 16, generator=gen)
    assert torch.equal(nearest_codes(flat, codebook), brute_force_codes(flat, codebook))


def test_chunked_search_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(1001, 8, generator=gen)
    codebook = torch.randn(512, 8, generator=gen)
    whole = nearest_codes(flat, codebook, block_bytes=2**30)
    seven_rows_at_a_time = nearest_codes(flat, codebook, block_bytes=7 * 512 * 4)
    assert torch.equal(whole, seven_rows_at_a_time)


def test_grouped_argmin_breaks_ties_like_argmin():
    gen = torch.Generator().manual_seed(1)
    block = torch.randint(0, 3, (200, 1024), generator=gen).float()  # many ties per row
    assert torch.equal(_argmin_rows(block), block.argmin(dim=1))


def test_lookup_inverts_codes():
    vq = VectorQuantizer(QuantizerConfig(32, 4, kmeans_init=False))
    codes = torch.randint(0, 32, (2, 3, 5))
    looked_up = vq.lookup(codes)  # (B, D, h, w)
    assert looked_up.shape == (2, 4, 3, 5)
    assert torch.equal(vq.nearest(looked_up), codes)


def test_straight_through_passes_decoder_gradient_unchanged():
    vq = VectorQuantizer(QuantizerConfig(16, 4, decay=None, kmeans_init=False))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    z_q, _, _ = vq(z)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert vq.codebook.grad is None


def test_codebook_loss_moves_only_the_codebook():
    vq = VectorQuantizer(QuantizerConfig(16, 4, beta=0.0, decay=None, kmeans_init=False))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, _, loss = vq(z)
    loss.backward()
    assert torch.count_nonzero(z.grad) == 0
    assert vq.codebook.grad.abs().sum() > 0


def test_commitment_loss_moves_only_the_encoder():
    vq = VectorQuantizer(QuantizerConfig(16, 4, beta=0.25, decay=0.99, kmeans_init=False, dead_code_window=0))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    codebook_before = vq.codebook.clone()
    z_q, _, loss = vq.eval()(z)
    loss.backward()
    assert not vq.codebook.requires_grad and torch.equal(vq.codebook, codebook_before)
    expected = 0.25 * 2 * (z - z_q).detach() / z.numel()  # d/dz of beta * mean((z - sg[e])^2)
    torch.testing.assert_close(z.grad, expected)


def test_plain_loss_is_codebook_plus_beta_commitment():
    vq = VectorQuantizer(QuantizerConfig(16, 4, beta=0.25, decay=None, kmeans_init=False))
    z = torch.randn(2, 4, 3, 3)
    z_q, _, loss = vq(z)
    torch.testing.assert_close(loss, 1.25 * torch.mean((z - z_q) ** 2))


def test_ema_update_matches_hand_computation():
    vq = VectorQuantizer(QuantizerConfig(2, 1, decay=0.5, kmeans_init=False, dead_code_window=0), eps=0.0)
    vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    vq.ema_sum.copy_(vq.codebook)  # counts start at one, so sums equal the codes
    z = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3)  # codes 0, 0, 1
    _, codes, _ = vq(z)
    assert codes.flatten().tolist() == [0, 0, 1]
    # N = 0.5 * 1 + 0.5 * n = [1.5, 1.0]; m = 0.5 * e + 0.5 * sum(z) = [1.5, 9.5]
    torch.testing.assert_close(vq.ema_count, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(vq.ema_sum, torch.tensor([[1.5], [9.5]]))
    torch.testing.assert_close(vq.codebook, torch.tensor([[1.0], [9.5]]))


def test_ema_laplace_smoothing():
    vq = VectorQuantizer(QuantizerConfig(2, 1, decay=0.5, kmeans_init=False, dead_code_window=0), eps=0.1)
    vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    vq.ema_sum.copy_(vq.codebook)
    vq(torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3))
    count = torch.tensor([1.5, 1.0])
    smoothed = (count + 0.1) / (count.sum() + 2 * 0.1) * count.sum()
    torch.testing.assert_close(vq.codebook, torch.tensor([[1.5], [9.5]]) / smoothed[:, None])


def clustered_data(num_clusters, per_cluster, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_clusters, dim, generator=gen) * 5
    points = means.repeat_interleave(per_cluster, 0) + 0.1 * torch.randn(num_clusters * per_cluster, dim, generator=gen)
    return means, points


def as_grid(flat):  # (N, D) -> (1, D, 1, N)
    return flat.t().reshape(1, flat.shape[1], 1, -1)


def test_kmeans_finds_clusters():
    torch.manual_seed(0)
    means, points = clustered_data(4, 50, 3)
    centers, sizes = kmeans(points, 4, iters=20)
    assert sorted(sizes.tolist()) == [50, 50, 50, 50]
    matched = torch.cdist(means, centers).min(dim=1).values
    assert matched.max() < 0.1


def test_kmeans_init_starts_codes_on_the_data():
    torch.manual_seed(0)
    _, points = clustered_data(8, 64, 4)
    vq = VectorQuantizer(QuantizerConfig(8, 4, kmeans_init=True, dead_code_window=0))
    vq.codebook.fill_(100.0)  # far from every point
    vq(as_grid(points))
    assert bool(vq.initialized)
    assert vq.usage() == 1.0
    assert torch.unique(vq.nearest(as_grid(points))).numel() == 8


@pytest.mark.parametrize("decay", [0.9, None])
def test_dead_codes_restart_from_encoder_outputs(decay):
    def train(dead_code_window):
        torch.manual_seed(0)
        vq = VectorQuantizer(QuantizerConfig(16, 4, decay=decay, kmeans_init=False, dead_code_window=dead_code_window))
        vq.codebook.data.fill_(100.0)  # every code far from the data: one wins everything
        if decay is not None:
            vq.ema_sum.fill_(100.0)
        _, points = clustered_data(16, 32, 4)
        for _ in range(40):
            vq(as_grid(points))
        return vq, torch.unique(vq.nearest(as_grid(points))).numel()

    collapsed, used_without_restarts = train(dead_code_window=0)
    restarted, used_with_restarts = train(dead_code_window=8)
    assert used_without_restarts == 1 and collapsed.usage() == 1 / 16
    assert used_with_restarts >= 14 and restarted.usage() >= 14 / 16


def test_usage_counts_only_recent_steps():
    vq = VectorQuantizer(QuantizerConfig(4, 2, kmeans_init=False, dead_code_window=0))
    vq.usage_window = 3
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    vq(as_grid(torch.tensor([[0.0, 0.0], [10.0, 0.0]])))  # codes 0 and 1
    for _ in range(3):
        vq(as_grid(torch.tensor([[10.0, 10.0]])))  # code 3 only
    assert vq.usage() == 0.25  # codes 0 and 1 fell out of the three-step window


def test_perplexity():
    assert math.isclose(CodeUsage.of(torch.ones(512).numpy()).perplexity, 512, rel_tol=1e-9)
    assert math.isclose(CodeUsage.of([5.0, 0.0, 0.0]).perplexity, 1.0)
    usage = CodeUsage.of([1.0, 1.0, 0.0, 0.0])
    assert (usage.perplexity, usage.bits_per_code, usage.codes_used, usage.usage) == (2.0, 1.0, 2, 0.5)


def test_autocast_input_is_quantized_in_float32():
    vq = VectorQuantizer(QuantizerConfig(16, 4, kmeans_init=False)).eval()
    z = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, codes, _ = vq(z.bfloat16())
    assert z_q.dtype == torch.float32
    assert torch.equal(codes, vq.nearest(z.bfloat16().float()))
