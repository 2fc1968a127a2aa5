"""tether: preference optimization that stays tethered (BAPO, BPO) on the Hugging Face stack."""

import os

# OpenMP threads that spin while waiting make torch 10-30x slower as soon as another process shares the
# cores (measured on 2 cores: 4.3 s vs 0.25 s per world-build step); passive waiting costs 20-45% at 2 threads when the
# machine is idle. Set before torch is imported; an explicit OMP_WAIT_POLICY in the environment wins, and
# GOMP_SPINCOUNT=N bounds the spinning instead. Bounded spinning was measured as a default and not adopted
# (BENCHMARKS.md, "OpenMP waiting"; benchmarks/omp_wait.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
