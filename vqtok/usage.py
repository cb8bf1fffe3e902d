"""How a histogram of codes uses a codebook: codes used, their share of K, bits per code and perplexity.

The one helper behind what `vqtok info` says of a token dataset, what `vqtok eval` reports of a tokenizer and
the quantizer's training statistics, so that the three never disagree on a definition. numpy only: the token
format is read without torch (a tensor of counts goes in as `tensor.cpu().numpy()`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CodeUsage:
    codes_used: int  # codes counted at least once
    usage: float | None  # codes_used / K; None when K is not known
    bits_per_code: float  # the order-0 entropy of the codes
    perplexity: float  # 2 ** bits_per_code: K when all codes are equally used, 1 for one code

    @classmethod
    def of(cls, counts, codebook_size: int | None = None) -> CodeUsage:
        """From counts (K,) of each code (or weights: a decayed count is fine); K is len(counts) unless given."""
        counts = np.asarray(counts, dtype=np.float64)
        K = len(counts) if codebook_size is None else codebook_size
        counts = counts[:K]
        used = int((counts > 0).sum())
        p = counts[counts > 0] / counts.sum() if used else counts[:0]
        bits = float(-(p * np.log2(p)).sum()) if used else 0.0
        return cls(used, used / K if K else None, bits, float(2**bits))
