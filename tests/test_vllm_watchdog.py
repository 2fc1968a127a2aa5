"""The watchdog that keeps a server tether started from outliving it (src/tether/watchdog.py), checked by pid with
a stand-in server: a process that spawns a child of its own (as vLLM spawns its engine core) and sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tether.vllm_server import ManagedServer, group_pids

# a "server": writes its pid and its child's pid, then sleeps; ignores SIGTERM when told (a server stuck in teardown)
SERVER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    if sys.argv[2] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
    time.sleep(600)
    """
)

# a "trainer": starts the stand-in server through ManagedServer, prints the watchdog's pid, then waits to be killed
TRAINER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tether.vllm_server import ManagedServer
    server = ManagedServer([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]], Path(sys.argv[4]), "127.0.0.1", 1)
    print(server.process.pid, flush=True)
    time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def server_pids(pid_file: Path) -> list[int]:
    assert wait_until(lambda: pid_file.is_file() and len(pid_file.read_text().split()) == 2)
    return [int(x) for x in pid_file.read_text().split()]


def test_kill_9_of_the_trainer_stops_the_server_and_its_children(tmp_path):
    script, pid_file = tmp_path / "server.py", tmp_path / "pids"
    script.write_text(SERVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(script), str(pid_file), "stubborn", str(tmp_path / "log")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = int(trainer.stdout.readline())
    server, child = server_pids(pid_file)
    assert os.getpgid(server) == server and os.getpgid(child) == server  # their own group, not the trainer's
    assert os.getpgid(server) != os.getpgid(trainer.pid)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    # the stubborn server ignores SIGTERM: SIGKILL follows after the grace period (10 s)
    assert wait_until(lambda: not any(alive(p) for p in (server, child, watchdog)), timeout=40)
    assert group_pids(server) == []


def test_stop_ends_the_group_and_a_server_that_exits_ends_the_watchdog(tmp_path):
    script, pid_file = tmp_path / "server.py", tmp_path / "pids"
    script.write_text(SERVER)
    managed = ManagedServer([sys.executable, str(script), str(pid_file), "polite"], tmp_path / "log", "127.0.0.1", 1)
    server, child = server_pids(pid_file)
    assert managed.server_pid() == server and sorted(managed.server_pids()) == sorted([server, child])
    started = time.monotonic()
    managed.stop()
    assert time.monotonic() - started < 8  # SIGTERM was enough: no grace period waited out
    assert not alive(server) and wait_until(lambda: not alive(child))
    managed.stop()  # idempotent

    quick = ManagedServer([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log2", "127.0.0.1", 1)
    assert quick.process.wait(timeout=30) == 3  # the server's exit code, and no watchdog left behind
