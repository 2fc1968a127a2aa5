"""Training loops: offline preference optimization and the online (BPO) loop, on the same pieces."""

from .config import TrainConfig
from .offline import train
from .online import online_train
from .online_config import OnlineConfig

__all__ = ["OnlineConfig", "TrainConfig", "online_train", "train"]
