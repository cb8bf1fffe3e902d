"""The prior: a decoder-only transformer over (h, w) grids of codes, read in raster order.

The VQ-VAE paper (van den Oord et al., 2017, sections 3.2 and 4.2) fits an autoregressive prior p(z) over the
grids of codes after the tokenizer is trained, and generates images by sampling a grid and decoding it. The
paper's prior is a PixelCNN; this one is a GPT (nanoGPT's `model.py` in shape), class-conditional the way
LlamaGen does it ("Autoregressive Model Beats Diffusion", Sun et al., 2024): the class is the first token, a
learned "no class" token stands in for unconditional rows, and classes are dropped at random in training so
that sampling can use classifier-free guidance (Ho & Salimans, 2022).

A grid of L = h * w codes is one sequence of L slots:

    slot      0        1      2     ...   L-1
    input     class    c_0    c_1   ...   c_{L-2}
    predicts  c_0      c_1    c_2   ...   c_{L-1}

Each slot adds a learned row embedding and a learned column embedding of the code it predicts, so positions
know both row and column. `sample` is a plain loop with a key/value cache: each new code costs one slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.config import PriorConfig
from vqtok.errors import ConfigError
from vqtok.pretrained import Pretrained


class KVCache:
    """One attention layer's keys and values of the slots seen so far, (B, nh, L, hs) each, filled in order."""

    def __init__(self, length: int) -> None:
        self.length = length  # the most slots it will hold
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.filled = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new slots' k and v (B, nh, T, hs); returns all slots' so far (B, nh, filled + T, hs)."""
        B, nh, T, hs = k.shape
        if self.k is None:  # made on first use, in the dtype the layer computes in (autocast or not)
            self.k = k.new_empty(B, nh, self.length, hs)
            self.v = v.new_empty(B, nh, self.length, hs)
        self.k[:, :, self.filled : self.filled + T] = k
        self.v[:, :, self.filled : self.filled + T] = v
        self.filled += T
        return self.k[:, :, : self.filled], self.v[:, :, : self.filled]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.width = config.width
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width, bias=False)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C): T new slots
        q, k, v = self.qkv(x).split(self.width, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            if cache.filled and T > 1:
                raise ValueError("a cache takes several slots only while it is empty")
            k, v = cache.append(k, v)  # (B, nh, S, hs), S = slots so far: this one sees them all
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.width, 4 * config.width, bias=False)
        self.proj = nn.Linear(4 * config.width, config.width, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, C), through (B, T, 4C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)  # (B, T, C)
        return x + self.mlp(self.norm2(x))  # (B, T, C)


class Prior(Pretrained, nn.Module):
    """p(codes | class) over (h, w) grids, one code at a time in raster order; saved and loaded as a model
    directory of kind "prior" (`Pretrained`).

    >>> logits, loss = prior(codes, cls)                # int (B, h, w), int (B,) or None -> (B, L, K), mean NLL
    >>> prior.log_prob(codes, cls)                       # (B,) natural-log likelihood of each grid
    >>> prior.sample(16, cls=3, temperature=1.0, top_k=100, guidance=2.0)   # int64 (16, h, w)
    """

    KIND = "prior"  # what config.json's "kind" says of a prior's directory
    config_class = PriorConfig

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        C, (h, w) = config.width, config.grid
        self.class_emb = nn.Embedding(config.num_classes + 1, C)  # the last one: "no class"
        self.code_emb = nn.Embedding(config.codebook_size, C)
        self.row_emb = nn.Embedding(h, C)
        self.col_emb = nn.Embedding(w, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.codebook_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled down with depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def no_class(self) -> int:
        """The class index of the learned "no class" token."""
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def positions(self) -> torch.Tensor:
        """(L, C): slot j gets the row and column embedding of the code it predicts, (j // w, j % w)."""
        h, w = self.config.grid
        return (self.row_emb.weight[:, None, :] + self.col_emb.weight[None, :, :]).reshape(h * w, -1)  # (L, C)

    def class_index(self, cls, n: int) -> torch.Tensor:
        """cls as given (None, an int, or n of them) -> (n,) int64 class indices, "no class" for None."""
        if cls is None:
            return torch.full((n,), self.no_class, dtype=torch.long, device=self.device)
        if self.config.num_classes == 0:
            raise ConfigError("this prior is unconditional: it takes no classes")
        index = torch.as_tensor(cls, dtype=torch.long, device=self.device).reshape(-1)  # (1,) or (n,)
        if index.numel() == 1:
            index = index.expand(n)
        if index.shape != (n,):
            raise ConfigError(f"cls must be one class or one per grid ({n}), got {index.numel()}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.config.num_classes):
            raise ConfigError(f"classes must lie in [0, {self.config.num_classes})")
        return index

    def _run(self, x: torch.Tensor, start: int, caches: Sequence[KVCache] | None = None) -> torch.Tensor:
        """Slots [start, start + T) of input embeddings x (B, T, C) -> logits (B, T, K)."""
        T = x.shape[1]
        x = self.drop(x + self.positions()[start : start + T])  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)  # (B, T, C)
        return self.head(self.norm(x))  # (B, T, K)

    def _logits(self, codes: torch.Tensor, cls_index: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: codes (B, L) and class indices (B,) -> logits (B, L, K) for every code."""
        x = torch.cat([self.class_emb(cls_index)[:, None], self.code_emb(codes[:, :-1])], dim=1)  # (B, L, C)
        return self._run(x, 0)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.ndim != 3 or tuple(codes.shape[1:]) != self.config.grid or codes.is_floating_point():
            h, w = self.config.grid
            raise ValueError(f"codes must be integers of shape (B, {h}, {w}), got {codes.dtype} {tuple(codes.shape)}")
        return codes.to(self.device, torch.long).reshape(len(codes), -1)  # (B, L)

    def forward(self, codes: torch.Tensor, cls=None) -> tuple[torch.Tensor, torch.Tensor]:
        """codes int (B, h, w), cls int (B,) or None -> (logits (B, L, K), mean cross-entropy in nats per code).

        In training mode a share `cond_dropout` of the rows lose their class to "no class"."""
        targets = self._check_codes(codes)  # (B, L)
        cls_index = self.class_index(cls, len(targets))  # (B,)
        if self.training and cls is not None and self.config.cond_dropout > 0:
            dropped = torch.rand(len(targets), device=self.device) < self.config.cond_dropout  # (B,)
            cls_index = torch.where(dropped, self.no_class, cls_index)
        logits = self._logits(targets, cls_index)  # (B, L, K)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, loss

    def log_prob(self, codes: torch.Tensor, cls=None) -> torch.Tensor:
        """codes int (n, h, w), cls int (n,) or None -> (n,) the natural-log likelihood of each grid."""
        targets = self._check_codes(codes)  # (n, L)
        logits = self._logits(targets, self.class_index(cls, len(targets)))  # (n, L, K)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (n, L)
        return -nll.sum(dim=1)  # (n,)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cls=None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance: float = 0.0,
        generator: torch.Generator | None = None,
        cache: bool = True,
    ) -> torch.Tensor:
        """n grids, int64 (n, h, w), drawn one code at a time.

        cls: None (no class), one class for all, or one per grid. temperature 0 is greedy (the likeliest code
        each time). top_k keeps the k likeliest codes, top_p the fewest whose probabilities add up to p.
        guidance w is classifier-free guidance, logits = cond + w (cond - uncond): 0 is plain conditional
        sampling (no unconditional pass is made), -1 unconditional. The randomness is one uniform number per
        code drawn from `generator` (on the CPU unless it lives elsewhere) at the start, so a seed gives the
        same grids on any device and however the n grids are split into calls. cache=False recomputes every
        prefix from scratch instead of keeping keys and values; it is there to be compared with.
        """
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k:
            raise ConfigError(f"top_k must be a positive integer, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if guidance != 0 and cls is None:
            raise ConfigError("guidance needs classes to guide towards: give cls")
        L, (h, w) = self.config.length, self.config.grid
        was_training = self.training
        self.eval()
        noise = torch.rand(n, L, generator=generator, device=generator.device if generator else "cpu")  # (n, L)
        noise = noise.to(self.device)
        conditions = [self.class_index(cls, n)]  # (n,) each: the rows' classes, then "no class" for guidance
        if guidance != 0:
            conditions.append(self.class_index(None, n))
        caches = [[KVCache(L) for _ in self.blocks] if cache else None for _ in conditions]
        codes = torch.zeros(n, L, dtype=torch.long, device=self.device)  # (n, L), filled in order
        for i in range(L):
            # The conditional and unconditional passes run apart rather than as one batch of 2n, so that
            # guidance -1 gives unconditional sampling's very numbers.
            logits = [self._next_logits(codes, i, c, kv) for c, kv in zip(conditions, caches, strict=True)]
            if guidance != 0:
                cond, uncond = logits  # (n, K) each
                logits = [uncond + (1 + guidance) * (cond - uncond)]  # = cond + w (cond - uncond)
            codes[:, i] = pick(logits[0], noise[:, i], temperature, top_k, top_p)
        self.train(was_training)
        return codes.view(n, h, w)

    def _next_logits(self, codes: torch.Tensor, i: int, cls_index: torch.Tensor, caches) -> torch.Tensor:
        """The logits (n, K) of code i, given codes[:, :i] (n, i) and the class."""
        if caches is not None:  # one new slot: the class at slot 0, else the code before
            new = self.class_emb(cls_index) if i == 0 else self.code_emb(codes[:, i - 1])  # (n, C)
            return self._run(new[:, None], i, caches)[:, -1].float()  # (n, K)
        x = torch.cat([self.class_emb(cls_index)[:, None], self.code_emb(codes[:, :i])], dim=1)  # (n, i + 1, C)
        return self._run(x, 0)[:, -1].float()  # (n, K)


def pick(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """One code per row of logits (n, K), by inverse transform sampling with the uniforms u (n,) in [0, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (n,)
    logits = logits / temperature  # (n, K)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (n, K)
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (n, K): the mass of the likelier codes
        drop = before >= top_p  # (n, K) in sorted order; the likeliest code always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # back in code order
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (n, K)
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)  # (n, 1)
    return index.squeeze(-1).clamp_(max=logits.shape[-1] - 1)  # (n,)
