"""Training loops: offline preference optimization (and, built on the same pieces, the online loop)."""

from .config import TrainConfig
from .offline import train

__all__ = ["TrainConfig", "train"]
