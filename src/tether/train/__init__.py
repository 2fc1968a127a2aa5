"""Training loops: offline preference optimization and the online (BPO) loop, on the same pieces.

Names are imported on first use (PEP 562 `__getattr__`): `tether train --help` needs the config classes, not
torch, so `from tether.train import TrainConfig` stays light and `from tether.train import train` loads the loop.
"""

import importlib

_WHERE = {
    "TrainConfig": ".train_config",
    "OnlineConfig": ".online_config",
    "train": ".offline",
    "online_train": ".online",
}

__all__ = ["OnlineConfig", "TrainConfig", "online_train", "train"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
