"""Ctrl-C and SIGTERM during training: the run stops at the end of the step it is in, saves a checkpoint there
and ends with one line (`RunInterrupted`, exit code 128 + the signal's number); `--resume` continues it as if
it had not stopped. A second signal stops at once, without that checkpoint (the previous ones are kept).

The handlers are installed only for the steps of a run (`StopRequests` is a context) and only in the main
thread; the caller's own handlers are put back afterwards. With several processes, every process learns at each
step end whether any of them was signalled (one all-reduce), so all of them checkpoint the same step.
"""

from __future__ import annotations

import logging
import signal
import threading

from ..config import TetherError
from ..models import any_process

log = logging.getLogger("tether")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(TetherError):
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """Records SIGINT/SIGTERM while the block runs (see the module docstring); `requested(accelerator)` says,
    identically on every process, whether the run should stop now."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise KeyboardInterrupt(name)  # a second signal: stop now
        self.signum = signum
        log.warning("%s: the run stops after this step, with a checkpoint (send it again to stop at once)", name)

    def requested(self, accelerator) -> bool:
        flag = self.signum is not None
        if accelerator.num_processes > 1:
            flag = any_process(flag, accelerator.device)
            if flag and self.signum is None:
                self.signum = signal.SIGTERM  # another process was signalled
        return flag

    def interrupted(self, step: int, checkpoint) -> RunInterrupted:
        name = signal.Signals(self.signum).name
        return RunInterrupted(
            f"stopped by {name} after step {step}; checkpoint {checkpoint} saved: continue the run with --resume",
            self.signum,
        )
