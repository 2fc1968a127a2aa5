"""A server that dies with the process that started it: `python watchdog.py PARENT_PID GRACE_S -- COMMAND ...`.

tether starts a vLLM server for `tether online --vllm_python PATH` through this small program (run as a file by the
trainer's own interpreter; it imports nothing but the standard library). It starts COMMAND in a new session, so
the server and every process it spawns (vLLM's engine core, its workers) share one process group that nothing
else belongs to, then waits. The group is stopped — SIGTERM, then SIGKILL after GRACE_S seconds — when

- the trainer (PARENT_PID) is gone, whatever killed it (kill -9 included: this process is re-parented and sees
  its parent change within POLL_S; on Linux the kernel also sends it SIGTERM at once, PR_SET_PDEATHSIG);
- this watchdog receives SIGTERM or SIGINT (the trainer's normal stop);

and the watchdog exits with the server's exit code when the server ends by itself. A Ctrl-C in the terminal
reaches the trainer and this watchdog, never the server directly (another session): the trainer decides.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2
PR_SET_PDEATHSIG = 1


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM to the process group `pgid`, SIGKILL to what is left of it after `grace_s` seconds."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(POLL_S)


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still exists (zombies of this process are reaped first)."""
    try:
        os.waitpid(-pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux; elsewhere the polling alone notices)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    parent, grace_s, command = int(argv[0]), float(argv[1]), argv[3:]
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the request above took effect
        return 1
    server = subprocess.Popen(command, start_new_session=True)
    while not stopping and os.getppid() == parent:
        code = server.poll()
        if code is not None:
            stop_group(server.pid, grace_s)  # what the server left behind, if anything
            return code
        time.sleep(POLL_S)
    stop_group(server.pid, grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
