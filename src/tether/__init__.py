"""tether: preference optimization that stays tethered (BAPO, BPO) on the Hugging Face stack.

Importing tether changes nothing in the caller's process: no environment variable, no signal handler. The
`tether` command sets its own defaults (tether.cli.COMMAND_DEFAULTS: the OpenMP waiting policy, no hub
traffic); a Python caller who wants the same OpenMP behaviour sets OMP_WAIT_POLICY=PASSIVE and
GOMP_SPINCOUNT=1000 before importing torch (docs/guarantees.md).
"""

__version__ = "0.1.0"
