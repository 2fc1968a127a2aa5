"""tether: preference optimization that stays tethered (BAPO, BPO) on the Hugging Face stack."""

import os

# OpenMP waiting (BENCHMARKS.md, "OpenMP waiting"; benchmarks/omp_wait.py). Threads that spin until work arrives
# make torch 10-30x slower as soon as another process shares the cores (2 cores: 4.3 s vs 0.25 s per world-build
# step); threads that sleep at once cost up to ~50% on an idle machine when operations are small (the world build:
# 215 s vs 153 s). Default, unless the environment sets either variable: passive waiting after a bounded spin of
# 1,000 iterations (GOMP_SPINCOUNT wins over the policy in libgomp) — within a few % of ACTIVE when idle and of
# PASSIVE when one busy process shares the cores. Set before torch is imported; an explicit setting of
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. The policy stays PASSIVE in the environment, which is what
# tether.sampling's one-thread decoding rule reads, so results do not depend on this choice.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
