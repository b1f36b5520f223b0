"""Training (paper §3.2; docs/official-implementation.md §3): configs and recipes, optimizer groups
and schedules,
step-indexed data order, resumable state, DDP through torchrun, and the loop."""

from segclip.training.config import RECIPES, Recipe, TrainConfig, get_recipe
from segclip.training.trainer import TrainResult, train

__all__ = ["RECIPES", "Recipe", "TrainConfig", "TrainResult", "get_recipe", "train"]
