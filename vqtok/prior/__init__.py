"""The prior over token grids: a transformer that models codes in raster order, how it is trained, and how grids
are sampled from it.

    model.py    Prior: the transformer, its loss and its sampling loop (a key/value cache)
    fit.py      `vqtok prior fit`: training on token datasets with accelerate
    sample.py   `vqtok prior sample`: grids drawn into a token dataset that `vqtok decode` turns into images
"""

from .model import Prior

__all__ = ["Prior"]
