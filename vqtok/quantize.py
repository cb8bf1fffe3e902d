"""The vector quantizer under its first import path: the code lives in `vqtok.tokenizers.quantizers`; this
module is that same module object, so users' `from vqtok.quantize import VectorQuantizer` keeps working."""

import sys

from vqtok.tokenizers import quantizers

sys.modules[__name__] = quantizers
