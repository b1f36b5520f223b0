"""The SegCLIP model: open_clip towers plus the semantic group module (paper §2)."""

from segclip.model.grouping import SemanticGroup
from segclip.model.segclip import ImageOutput, LossWeights, SegCLIP

__all__ = ["ImageOutput", "LossWeights", "SegCLIP", "SemanticGroup"]
