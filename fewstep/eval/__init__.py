"""Evaluation: distances between sample sets."""
from .sliced import sliced_wasserstein2

__all__ = ["sliced_wasserstein2"]
