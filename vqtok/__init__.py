"""vqtok: VQ-VAE image tokenizers, from WebDataset shards to Parquet tokens and back.

`import vqtok` stays light (no torch) so that the command line answers
`--help` at once; `vqtok.VQVAE` (or `vqtok.VQGAN`) imports the model on first use.
"""

__version__ = "0.1.0"

__all__ = ["VQGAN", "VQVAE", "ModelConfig", "QuantizerConfig", "VQGANConfig", "load_tokenizer", "__version__"]


def __getattr__(name):
    if name in ("VQVAE", "VQGAN", "load_tokenizer"):
        from vqtok import tokenizers

        return getattr(tokenizers, name)
    if name in ("ModelConfig", "QuantizerConfig", "VQGANConfig"):
        from vqtok import config

        return getattr(config, name)
    raise AttributeError(f"module 'vqtok' has no attribute {name!r}")
