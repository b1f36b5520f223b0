"""Training-free dense CLIP: plain CLIP ViT with an edited last block (docs/dense.md)."""

from segclip.dense.attention import MODES, gaussian_bias, last_block
from segclip.dense.model import DenseCLIP, DenseConfig, load_dense

__all__ = ["MODES", "DenseCLIP", "DenseConfig", "gaussian_bias", "last_block", "load_dense"]
