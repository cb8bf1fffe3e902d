"""The paper's VQ-VAE under its first import path: the code lives in `vqtok.tokenizers.vqvae` (the network)
and `vqtok.tokenizers.base` (what every tokenizer shares); this module is that same module object, so users'
`from vqtok.model import VQVAE` keeps working."""

import sys

from vqtok.tokenizers import vqvae

sys.modules[__name__] = vqvae
