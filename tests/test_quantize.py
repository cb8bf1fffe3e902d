import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

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


def test_lookup_dim_looks_codes_up_in_a_projection_and_projects_them_back():
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(16, 8, lookup_dim=3, kmeans_init=False)).eval()  # no codebook updates
    assert vq.codebook.shape == (16, 3)  # the codes live in lookup_dim, not in D
    assert (vq.project_in.in_features, vq.project_in.out_features) == (8, 3)
    assert (vq.project_out.in_features, vq.project_out.out_features) == (3, 8)
    z = torch.randn(2, 8, 4, 5, requires_grad=True)  # (B, D, h, w)
    z_q, codes, loss = vq(z)
    assert z_q.shape == (2, 8, 4, 5) and codes.shape == (2, 4, 5)

    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)  # (B*h*w, D)
    with torch.no_grad():
        projected = vq.project_in(flat)  # (B*h*w, 3)
        assert torch.equal(codes.flatten(), brute_force_codes(projected, vq.codebook))
        back = vq.project_out(vq.codebook[codes])  # (B, h, w, D)
    assert torch.equal(vq.nearest(z), codes)
    torch.testing.assert_close(vq.lookup(codes), back.permute(0, 3, 1, 2))
    torch.testing.assert_close(z_q, back.permute(0, 3, 1, 2))  # the decoder gets the code, projected back

    (z_q.sum() + loss).backward()  # the projections learn: out from the decoder's side, in from the losses
    assert vq.project_in.weight.grad.abs().sum() > 0 and vq.project_out.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0


def test_rare_codes_are_restarted_and_the_others_kept():
    """Four 1-D codes at 0, 10, 20 and 30; every step ten points sit at each of the first three and one at the
    last: every code is used every step, so none is dead, but code 3 has under half an even share."""
    points = torch.tensor([0.0] * 10 + [10.0] * 10 + [20.0] * 10 + [30.0])
    window = 8

    def train(rare_code_share):
        torch.manual_seed(0)
        config = QuantizerConfig(4, 1, decay=None, kmeans_init=False, dead_code_window=window)
        vq = VectorQuantizer(dataclasses.replace(config, rare_code_share=rare_code_share))
        vq.codebook.data.copy_(torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
        for _ in range(window):
            _, codes, _ = vq(as_grid(points[:, None]))
        assert torch.bincount(codes.flatten(), minlength=4).tolist() == [10, 10, 10, 1]
        return vq

    kept = train(0.0)
    assert kept.fresh_since.tolist() == [0, 0, 0, 0]  # without the share, a code in use is never restarted
    restarted = train(0.5)
    assert restarted.fresh_since.tolist() == [0, 0, 0, window]  # code 3 alone, once it had its window
    assert restarted.codebook[:3].flatten().tolist() == [0.0, 10.0, 20.0]
    assert restarted.codebook[3].item() in points.tolist()  # restarted from an encoder output of the batch


def test_normalized_codes_stay_unit_vectors_through_ema_updates_and_restarts():
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(16, 4, decay=0.9, kmeans_init=False, dead_code_window=2, normalize_codes=True))
    _, points = clustered_data(4, 32, 4)  # 4 directions for 16 random codes: most go dead and restart
    for _ in range(12):
        vq(as_grid(points * 3))  # vectors far from unit length
        torch.testing.assert_close(vq.codebook.norm(dim=1), torch.ones(16))
    assert (vq.fresh_since > 0).sum() >= 4, "no code was restarted: the test lost its point"


@pytest.mark.parametrize("decay", [0.9, None])
def test_normalized_lookup_picks_the_smallest_angle(decay):
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(32, 4, decay=decay, kmeans_init=False, normalize_codes=True)).eval()
    z = torch.randn(2, 4, 5, 5) * torch.rand(2, 1, 5, 5) * 10  # (B, D, h, w), of every length
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    cosine = F.normalize(flat, dim=1) @ F.normalize(vq.codebook.detach(), dim=1).t()  # (N, K)
    assert torch.equal(vq.nearest(z).flatten(), cosine.argmax(dim=1))

    # A learned codebook is normalized only as it is looked up: a long code loses to a short one at a smaller angle
    # that plain L2 distance would not pick.
    if decay is None:
        vq.codebook.data[:2] = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0]])
        vq.codebook.data[2:] = -10.0  # far from the vector, in angle and in distance
        vector = torch.tensor([1.0, 0.3, 0.0, 0.0])  # 17 degrees from code 0, 36 from code 1
        assert brute_force_codes(vector[None], vq.codebook.detach()).item() == 1
        assert vq.nearest(vector.view(1, 4, 1, 1)).item() == 0
