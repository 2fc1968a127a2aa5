"""`python fsdp_engage.py tether-args...` under a 2-process CPU launch: run the tether CLI with accelerate's FSDP2
engine engaged.

accelerate 1.15 switches to FSDP only on accelerator devices: on CPU processes it silently runs plain data
parallel (MULTI_CPU) even with --use_fsdp. torch's FSDP2 (`fully_shard`) itself runs on CPU over gloo, so this
driver sets the accelerator state that `accelerate launch --use_fsdp --fsdp_version 2` sets on GPUs
(distributed type FSDP + an FSDP2 plugin) right after tether creates its Accelerator. Everything after that is
accelerate's own code (`fsdp2_prepare_model` -> `fully_shard` per decoder layer and on the root) and tether's.

Memory-efficient loading is read from the environment as a launch with `fsdp_cpu_ram_efficient_loading: true`
sets it (ACCELERATE_USE_FSDP=true, FSDP_CPU_RAM_EFFICIENT_LOADING=true): transformers then builds the model empty
(meta) on every process but the first. TETHER_TEST_MEMORY=DIR writes DIR/rank_R.json at the end of the run:
the process's resident memory at start and at its peak (kB), and the bytes of real (not meta) parameters the
process held right after loading the policy.
"""

import json
import os
import resource
import sys
from pathlib import Path

from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType

import tether.train.bookkeeping as bookkeeping
import tether.train.offline as offline
import tether.train.online as online
import tether.train.online_policy as online_policy
from tether.cli import main

_make = offline.make_accelerator


def make_fsdp2_accelerator(cfg, run_dir):
    acc = _make(cfg, run_dir)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=None,  # from FSDP_CPU_RAM_EFFICIENT_LOADING, as the launcher sets it
    )
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    return acc


offline.make_accelerator = online.make_accelerator = make_fsdp2_accelerator

MEMORY = os.environ.get("TETHER_TEST_MEMORY")
if MEMORY:
    _start_kb = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    _loaded = {}
    _load_policy, _end_run = offline.load_policy, bookkeeping.end_run

    def load_policy(cfg, model=None, empty=False, device="cpu"):
        model = _load_policy(cfg, model, empty, device)
        _loaded["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
        return model

    def end_run(accelerator, *keep):
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        record = {"start_kb": _start_kb, "peak_kb": peak_kb, "loaded_bytes": _loaded.get("bytes")}
        Path(MEMORY, f"rank_{accelerator.process_index}.json").write_text(json.dumps(record))
        _end_run(accelerator, *keep)

    offline.load_policy = online_policy.load_policy = load_policy
    bookkeeping.end_run = end_run

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
