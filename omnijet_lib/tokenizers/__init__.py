"""Jet-constituent tokenizers: conditional/unconditional VQ-VAE and a binned grid, one interface.

See :mod:`omnijet_lib.tokenizers.base` for the interface and the GPT vocabulary
(start 0, codes 1…K, stop K+1).
"""

from .base import (
    START_TOKEN,
    TOKENIZER_KINDS,
    TokenizerMixin,
    load_tokenizer,
    reconstruct,
    save_tokenizer,
    tokenize,
)
from .binned import BinnedConfig, BinnedTokenizer
from .quantizer import QuantizerOutput, VectorQuantizer, kmeans, nearest_code
from .vqvae import VQVAE, VQVAEConfig

__all__ = [
    "START_TOKEN", "TOKENIZER_KINDS", "BinnedConfig", "BinnedTokenizer", "QuantizerOutput", "TokenizerMixin",
    "VQVAE", "VQVAEConfig", "VectorQuantizer", "kmeans", "load_tokenizer", "nearest_code", "reconstruct",
    "save_tokenizer", "tokenize",
]
