"""`python fsdp_engage.py tether-args...` under a 2-process CPU launch: run the tether CLI with accelerate's FSDP2
engine engaged.

accelerate 1.15 switches to FSDP only on accelerator devices: on CPU processes it silently runs plain data
parallel (MULTI_CPU) even with --use_fsdp. torch's FSDP2 (`fully_shard`) itself runs on CPU over gloo, so this
driver sets the accelerator state that `accelerate launch --use_fsdp --fsdp_version 2` sets on GPUs
(distributed type FSDP + an FSDP2 plugin) right after tether creates its Accelerator. Everything after that is
accelerate's own code (`Accelerator.prepare` -> `fsdp2_prepare_model` -> `fully_shard` per decoder layer and on
the root, `get_state_dict`, `no_sync`) and tether's.
"""

import sys

from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType

import tether.train.offline as offline
import tether.train.online as online
from tether.cli import main

_make = offline.make_accelerator


def make_fsdp2_accelerator(cfg, run_dir):
    acc = _make(cfg, run_dir)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    return acc


offline.make_accelerator = online.make_accelerator = make_fsdp2_accelerator
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
