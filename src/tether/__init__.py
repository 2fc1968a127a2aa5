"""tether: preference optimization that stays tethered (BAPO, BPO) on the Hugging Face stack.

Importing tether changes nothing in the caller's process: no environment variable, no signal handler. The
`tether` command sets its own defaults (tether.cli.COMMAND_DEFAULTS: the OpenMP waiting policy, no hub
traffic); a Python caller who wants the same OpenMP behaviour sets OMP_WAIT_POLICY=PASSIVE and
GOMP_SPINCOUNT=1000 before importing torch (docs/guarantees.md).
"""

__version__ = "0.1.0"

_WHERE = {
    "DPOTrainer": "tether.trainers",
    "OnlineDPOTrainer": "tether.trainers",
    "TrainOutput": "tether.trainers",
    "TrainConfig": "tether.train.train_config",
    "OnlineConfig": "tether.train.online_config",
    "TetherError": "tether.config",
}

__all__ = ["DPOTrainer", "OnlineConfig", "OnlineDPOTrainer", "TetherError", "TrainConfig", "TrainOutput"]


def __getattr__(name: str):
    """`from tether import DPOTrainer` loads the trainers on first use (PEP 562): `import tether` stays light."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
