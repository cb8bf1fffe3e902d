"""The vector quantizer of VQ-VAE ("Neural Discrete Representation Learning",
van den Oord et al., 2017): section 3.1 for nearest-code lookup, the
straight-through estimator and the codebook and commitment losses, appendix
A.1 for the exponential-moving-average codebook update.

Beyond the paper, the standard remedies for codebook collapse: k-means
initialisation from the first batch of encoder outputs, and restarting codes
left unused for a window of steps from recent encoder outputs. Optionally,
codes looked up in a lower dimension after a linear projection, with both
sides l2-normalized (ViT-VQGAN, Yu et al. 2022, section 3.2). Under
`torch.distributed` every process ends each step with the same codebook, bit
for bit: statistics are summed across processes and random choices are made
once, on rank 0, and broadcast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vqtok.config import QuantizerConfig
from vqtok.distributed import in_process_group
from vqtok.usage import CodeUsage

# Bytes of one block of the (rows, K) distance matrix. Small enough to stay
# near the CPU's cache between the product and the argmin that reads it back,
# large enough that each product is a big, efficient one.
CPU_BLOCK_BYTES = 16 * 2**20
CUDA_BLOCK_BYTES = 256 * 2**20


def _argmin_rows(dist_block: torch.Tensor) -> torch.Tensor:
    """argmin along dim 1, first index on ties, in two cheap passes instead of one slow one.

    torch's CPU argmin is many times slower than amin, so find each row's best
    group of G entries with amin (fast) and argmin over the groups, then argmin
    inside the winning group: argmin work drops from K to K/G + G per row.
    """
    rows, K = dist_block.shape
    group = 32 if K <= 2048 else 64 if K <= 16384 else 128  # near sqrt(K): measured best on 2 cores
    if K % group or K < 4 * group or dist_block.is_cuda:  # CUDA's argmin is already one fast pass
        return dist_block.argmin(dim=1)
    groups = dist_block.view(rows, K // group, group)  # (rows, K/G, G)
    best_group = groups.amin(dim=2).argmin(dim=1)  # (rows,)
    index = best_group.view(rows, 1, 1).expand(rows, 1, group)
    within = groups.gather(1, index).view(rows, group).argmin(dim=1)  # (rows,)
    return best_group * group + within


@torch.no_grad()
def nearest_codes(flat: torch.Tensor, codebook: torch.Tensor, block_bytes: int | None = None) -> torch.Tensor:
    """Index of the nearest codebook row (L2) for each row of `flat`: (N, D), (K, D) -> (N,) int64.

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, and ||z||^2 does not change the
    argmin, so each block is one matrix product plus a bias: rows of `flat`
    are taken a block at a time so memory stays bounded whatever N and K.
    """
    N, K = flat.shape[0], codebook.shape[0]
    if block_bytes is None:
        block_bytes = CUDA_BLOCK_BYTES if flat.is_cuda else CPU_BLOCK_BYTES
    rows = max(1, block_bytes // (4 * K))
    flat = flat.to(codebook.dtype)
    codebook_sq = codebook.pow(2).sum(dim=1)  # (K,)
    codes = torch.empty(N, dtype=torch.long, device=flat.device)
    block = torch.empty(min(rows, N), K, dtype=codebook.dtype, device=flat.device)
    for start in range(0, N, rows):
        chunk = flat[start : start + rows]  # (n, D)
        out = block[: chunk.shape[0]]
        torch.addmm(codebook_sq, chunk, codebook.t(), alpha=-2, out=out)  # (n, K)
        codes[start : start + chunk.shape[0]] = _argmin_rows(out)
    return codes


def squared_distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """||z - e||^2 from each row of `flat` to each codebook row, with gradients: (N, d), (K, d) -> (N, K).

    For losses over the whole distribution of codes (the codebook-usage entropy, `losses.entropy_loss`), which
    need every distance and its gradient; `nearest_codes` keeps only the argmin, in bounded memory. Give it
    vectors and codes in the space codes are looked up in (after the quantizer's projection and normalisation,
    and its `table()`), so that these are the distances the lookup minimises.
    """
    return flat.pow(2).sum(dim=1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(dim=1)  # (N, K)


# k-means++ seeding takes one pass over the data per code; above this many
# codes that costs more than it gains over random seeds.
KMEANS_PLUS_PLUS_MAX_K = 2048


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, spherical: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows of x (N, D): (centers (k, D), cluster sizes (k,)).

    Seeds by k-means++ for small k and by random rows otherwise (with
    replacement when N < k); an empty cluster keeps its center, and dead-code
    restarts deal with it later. `spherical`: rows of x are unit vectors, and
    so is every center (each cluster's mean direction).
    """
    n = x.shape[0]
    if n < k:
        centers = x[torch.randint(n, (k,), device=x.device)].clone()
    elif k <= KMEANS_PLUS_PLUS_MAX_K:
        centers = _kmeans_plus_plus_seeds(x, k)
    else:
        centers = x[torch.randperm(n, device=x.device)[:k]].clone()
    sizes = torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        codes = nearest_codes(x, centers)
        sizes = torch.bincount(codes, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, codes, x)
        means = F.normalize(sums, dim=1) if spherical else sums / sizes.clamp(min=1)[:, None]
        centers = torch.where(sizes[:, None] > 0, means, centers)
    return centers, sizes


def _kmeans_plus_plus_seeds(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each next seed drawn with probability proportional to its squared distance to the nearest seed so far."""
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centers[0] = x[torch.randint(x.shape[0], (1,), device=x.device)]
    sq_dist = (x - centers[0]).pow(2).sum(dim=1)  # (N,)
    for i in range(1, k):
        # the epsilon keeps multinomial valid once every point sits on a seed
        centers[i] = x[torch.multinomial(sq_dist + 1e-12, 1)]
        sq_dist = torch.minimum(sq_dist, (x - centers[i]).pow(2).sum(dim=1))
    return centers


class VectorQuantizer(nn.Module):
    """Replaces each D-vector of an encoder's (B, D, h, w) output by its nearest of K codes, as its
    `QuantizerConfig` says.

    forward(z) -> (z_q, codes, loss): z_q (B, D, h, w) passes the decoder's
    gradient straight through to z; codes (B, h, w) int64; loss is the
    codebook loss (only when decay is None) plus beta times the commitment loss. With `decay`, the codebook follows an
    exponential moving average of the encoder outputs assigned to each code,
    with Laplace-smoothed counts (`eps`).

    With `lookup_dim`, each D-vector is first projected linearly to
    lookup_dim dimensions, looked up there among codes of that size, and the
    code projected back to D for the decoder. With `normalize_codes`, vectors and
    codes are l2-normalized before the lookup, so codes are directions: the
    nearest code is the one at the smallest angle.

    In training mode, each forward also updates usage statistics and, when
    enabled, initialises the codebook by k-means on the first call (then
    shares rank 0's codebook with every process) and
    restarts codes unused for `dead_code_window` steps.
    """

    def __init__(self, config: QuantizerConfig, eps: float = 1e-5) -> None:
        super().__init__()
        self.config = config
        self.eps = eps
        K, D = config.codebook_size, config.code_dim
        self.lookup_dim = config.lookup_dim or D  # d, the size of the codes
        # The factorized lookup's projections; None (no weights at all) otherwise, so older models still load.
        self.project_in = nn.Linear(D, config.lookup_dim) if config.lookup_dim is not None else None
        self.project_out = nn.Linear(config.lookup_dim, D) if config.lookup_dim is not None else None
        # usage and perplexity look at the same window; without restarts, a default one
        self.usage_window = config.dead_code_window or 100

        codebook = torch.empty(K, self.lookup_dim).uniform_(-1 / K, 1 / K)
        if config.normalize_codes:
            codebook = F.normalize(codebook, dim=1)
        if config.decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            # a count of one per code keeps an unused code where it is instead of dividing by ~0
            self.register_buffer("ema_count", torch.ones(K))
            self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # step each code was last chosen (-1: never), and since when it has had a fair chance
        self.register_buffer("last_used", torch.full((K,), -1, dtype=torch.long))
        self.register_buffer("fresh_since", torch.zeros(K, dtype=torch.long))
        self.register_buffer("usage_count", torch.zeros(K))
        self._initialized_seen = False  # host flag: the first training step's set-up (k-means, sync) is done
        self._updates_seen = 0  # host copy of `step`, to pace dead-code checks without syncing

    # -- inference -------------------------------------------------------------

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest entries: (B, D, h, w) -> (B, h, w) int64, no gradient."""
        B, D, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # bf16 distances would pick other codes on near ties
            flat = self._to_lookup(z.detach().float().permute(0, 2, 3, 1).reshape(-1, D))  # (B*h*w, d)
            return nearest_codes(flat, self.table()).view(B, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for codes, as the decoder takes them: (B, h, w) -> (B, D, h, w)."""
        return self._from_lookup(F.embedding(codes, self.table())).permute(0, 3, 1, 2)  # (B, D, h, w)

    def table(self) -> torch.Tensor:
        """The codes as looked up: (K, d). A learned codebook is normalized on the fly; an EMA one stays so."""
        if self.config.normalize_codes and self.config.decay is None:
            return F.normalize(self.codebook, dim=1)
        return self.codebook

    def _to_lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) encoder vectors -> (N, d) vectors in the space codes are looked up in."""
        if self.project_in is not None:
            flat = self.project_in(flat)
        return F.normalize(flat, dim=1) if self.config.normalize_codes else flat

    def _from_lookup(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., d) codes -> (..., D) decoder inputs."""
        return self.project_out(vectors) if self.project_out is not None else vectors

    # -- training --------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, D, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA need float32
            flat = self._to_lookup(z.float().permute(0, 2, 3, 1).reshape(-1, D))  # (B*h*w, d)
            if self.training and not self._initialized_seen:
                self._initialize(flat.detach())
            table = self.table()  # (K, d)
            codes = nearest_codes(flat.detach(), table)  # (B*h*w,)
            quantized = F.embedding(codes, table)  # (B*h*w, d)

            commitment = F.mse_loss(flat, quantized.detach())
            if self.config.decay is None:
                loss = F.mse_loss(quantized, flat.detach()) + self.config.beta * commitment
            else:
                loss = self.config.beta * commitment
            if self.training:
                self._update(flat.detach(), codes)

            z_q = flat + (quantized - flat).detach()  # straight-through: forward z_q, backward identity
            z_q = self._from_lookup(z_q)  # (B*h*w, D)
        z_q = z_q.view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return z_q, codes.view(B, h, w), loss

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        """On the first training step: k-means init if asked, then every process takes rank 0's codebook."""
        self._initialized_seen = True
        # Dead-code checks are paced by the step, which a resumed run (or a fine-tune) continues from: a count
        # that started again at 0 would check at other steps than the uninterrupted run does.
        self._updates_seen = int(self.step)
        distributed = in_process_group()
        if not bool(self.initialized):  # one host sync, on the first training step only
            if not distributed or dist.get_rank() == 0:  # rank 0's batch decides; the broadcast below shares it
                centers, sizes = kmeans(flat, self.config.codebook_size, spherical=self.config.normalize_codes)
                self.codebook.data.copy_(centers)
                if self.config.decay is not None:
                    # later EMA updates add counts summed over processes: start on the same scale
                    world = dist.get_world_size() if distributed else 1
                    self.ema_count.copy_(sizes.clamp(min=1) * world)
                    self.ema_sum.copy_(centers * self.ema_count[:, None])
            self.initialized.fill_(True)
        if distributed:  # also covers models built apart on each process, with different random codebooks
            for state in self._codebook_state():
                dist.broadcast(state, src=0)

    def _codebook_state(self) -> list[torch.Tensor]:
        return [self.codebook.data] if self.config.decay is None else [self.codebook, self.ema_count, self.ema_sum]

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """One step of statistics, the EMA codebook update, and dead-code restarts."""
        K, decay = self.config.codebook_size, self.config.decay
        counts = torch.bincount(codes, minlength=K).to(flat.dtype)  # (K,)
        if decay is not None:
            sums = torch.zeros_like(self.codebook).index_add_(0, codes, flat)  # (K, D)
            if in_process_group():
                stats = torch.cat([counts[:, None], sums], dim=1)  # one all-reduce for both
                dist.all_reduce(stats)
                counts, sums = stats[:, 0], stats[:, 1:]
            self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (total + K * self.eps) * total
            means = self.ema_sum / smoothed[:, None]  # (K, d)
            self.codebook.copy_(F.normalize(means, dim=1) if self.config.normalize_codes else means)
        elif in_process_group():
            dist.all_reduce(counts)

        self.step += 1
        self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))
        self.usage_count.mul_(1 - 1 / self.usage_window).add_(counts)

        # Checking for dead codes needs the host to look at a tensor; do it a
        # few times per window rather than every step.
        self._updates_seen += 1
        window = self.config.dead_code_window
        if window and self._updates_seen % max(1, window // 8) == 0:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        window, rare_share = self.config.dead_code_window, self.config.rare_code_share
        idle = self.step - torch.maximum(self.last_used, self.fresh_since)  # (K,), the same on every rank
        dead = idle >= window
        if rare_share:
            # Also codes chosen far less often than an even share over the window: alive in training, yet
            # too rare to be met on other images.
            settled = self.step - self.fresh_since >= window
            even = self.usage_count.sum() / self.config.codebook_size
            dead |= settled & (self.usage_count < rare_share * even)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        picks = torch.randint(flat.shape[0], (num_dead,), device=flat.device)
        replacements = flat[picks]  # (num_dead, D)
        if in_process_group():
            dist.broadcast(replacements, src=0)
        self.codebook.data[dead] = replacements
        if self.config.decay is not None:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = replacements
        self.fresh_since[dead] = self.step  # a full window to prove themselves

    # -- statistics ------------------------------------------------------------

    def usage(self) -> float:
        """Fraction of codes used at least once in the last `usage_window` training steps."""
        if int(self.step) == 0:
            return 0.0
        recent = (self.last_used >= 0) & (self.step - self.last_used < self.usage_window)
        return recent.float().mean().item()

    def recent_perplexity(self) -> float:
        """Perplexity of code use over roughly the last `usage_window` training steps."""
        if int(self.step) == 0:
            return 0.0
        return CodeUsage.of(self.usage_count.cpu().numpy()).perplexity

    def extra_repr(self) -> str:
        c = self.config
        mode = "codebook loss" if c.decay is None else f"ema decay={c.decay}"
        lookup = f", lookup in {c.lookup_dim}" if c.lookup_dim is not None else ""
        lookup += ", normalized" if c.normalize_codes else ""
        return f"K={c.codebook_size}, D={c.code_dim}{lookup}, beta={c.beta}, {mode}"
