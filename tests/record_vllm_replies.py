"""Record tests/data/vllm_replies.json from a real vLLM server (the fast tests of `--sampler vllm` replay it).

    TETHER_VLLM_PYTHON=PATH python tests/record_vllm_replies.py

Starts vLLM on the toy model of vllm_replay.TOY_MODEL (one core: VLLM_CPU_OMP_THREADS_BIND=0 unless set), runs
every run of vllm_replay.RECORDED_RUNS against it through the recording proxy, and writes what the server
answered, run by run. Takes a few minutes (mostly the server's start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import online_config  # noqa: E402
from tether.train.online import OnlineRun  # noqa: E402
from tether.vllm_server import ManagedServer, check_vllm_python, free_port, server_command  # noqa: E402
from tether_lab.demo import toy_model, toy_preferences, write_jsonl  # noqa: E402
from vllm_replay import RECORDED_RUNS, REPLIES, TOY_MODEL, ReplyServer  # noqa: E402


def toy_prompts(directory: Path) -> Path:
    """conftest's prompt_file: 64 toy prompts with a reference answer each."""
    rows = toy_preferences(64, seed=5)
    return write_jsonl([{"prompt": r["prompt"], "reference": r["chosen"]} for r in rows], directory / "prompts.jsonl")


def main() -> None:
    python = check_vllm_python(os.environ.get("TETHER_VLLM_PYTHON"), "TETHER_VLLM_PYTHON")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = Path(tempfile.mkdtemp(prefix="tether-vllm-record-"))
    model = toy_model(work / "toy", **TOY_MODEL)
    prompts = toy_prompts(work)
    port = free_port()
    server = ManagedServer(server_command(python, model, port, max_lora_rank=8), work / "server.log", "127.0.0.1", port)
    try:
        server.wait_ready(900)
        runs = {}
        for name, options in RECORDED_RUNS.items():
            proxy = ReplyServer(upstream=server.url)
            cfg = online_config(model, prompts, work / name, sampler="vllm", vllm_url=proxy.url, **options)
            OnlineRun(cfg, False).run()
            runs[name] = proxy.replies
            print(f"recorded run {name}: {len(proxy.replies)} replies", flush=True)
        proxy = ReplyServer(upstream=server.url)  # what the server says when it refuses (a missing adapter)
        proxy._answer("POST", "/v1/load_lora_adapter", {"lora_name": "missing", "lora_path": str(work / "missing")})
        runs["refused"] = proxy.replies
        version = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
        saved = {"vllm": version.stdout.strip(), "model": TOY_MODEL, "runs": runs}
        REPLIES.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        print(f"written to {REPLIES}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
