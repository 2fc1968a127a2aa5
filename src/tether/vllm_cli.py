"""`tether vllm-serve --model M [--port P]`: vLLM's OpenAI-compatible server for `tether online --sampler vllm
--vllm_url URL`, started from vLLM's own environment (`make vllm`) with LoRA loading at run time and full-weight
reloading on (docs/scaling.md, "Sampling with vLLM"). The command becomes the server (exec): Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import TetherError, add_dataclass_arguments, load_config, option
from .vllm_server import LORA_RANKS, check_vllm_python, default_vllm_python, server_command, server_environment


@dataclasses.dataclass
class VllmServeOptions:
    """Options of `tether vllm-serve`."""

    model: str = option("", "model to serve: a local Hugging Face directory or a built-in name (required)")
    port: int = option(8000, "TCP port of the server")
    host: str = option("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    vllm_python: str | None = option(
        None, "python of the vLLM environment; null = $TETHER_VLLM_PYTHON, else .venv-vllm/bin/python (make vllm)"
    )
    max_lora_rank: int = option(
        64, "largest LoRA rank the server takes (π_β of an exact ensemble merge has rank n·r)", choices=LORA_RANKS
    )
    max_loras: int = option(2, "LoRA adapters in one batch (2: the old and the new π_β while they are swapped)")
    dtype: str = option(
        "float32",
        "dtype of the served weights; the trainer's torch_dtype keeps the two numerically close",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    vllm_args: str = option(
        "",
        "more of vLLM's own flags, e.g. '--tensor-parallel-size 4 --max-num-seqs 128'; without a GPU tether adds "
        "--no-enable-chunked-prefill and a --max-num-batched-tokens of the longest prompt (seeded batches fail on "
        "vLLM-CPU otherwise), unless these flags set them",
    )

    def validate(self) -> None:
        """Raise TetherError naming the first bad option."""
        if not self.model:
            raise TetherError("option --model is required (a model directory or a built-in name)")
        if not 0 < self.port < 65536:
            raise TetherError(f"option --port ({self.port}) must be a TCP port, 1-65535")
        if self.max_loras < 1:
            raise TetherError(f"option --max_loras ({self.max_loras}) must be at least 1")


def run_vllm_serve(args) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(VllmServeOptions) if hasattr(args, f.name)}
    opts = load_config(VllmServeOptions, None, overrides)
    python = check_vllm_python(opts.vllm_python or default_vllm_python())
    from .models import is_adapter_dir, resolve_model_path

    model_dir = resolve_model_path(opts.model)
    if is_adapter_dir(model_dir):
        raise TetherError(
            f"--model {opts.model}: a PEFT adapter; serve its base model (a run loads adapters into the server "
            f"itself) or merge it first: tether export --merge {opts.model} --out DIR"
        )
    command = server_command(
        python, model_dir, opts.port, opts.host, opts.max_lora_rank, opts.max_loras, opts.dtype, opts.vllm_args
    )
    print(
        f"tether: serving {model_dir} at http://{opts.host}:{opts.port} with vLLM from {python} "
        f"(LoRA up to rank {opts.max_lora_rank} loaded at run time); use it with "
        f"tether online --sampler vllm --vllm_url http://{opts.host}:{opts.port} ...; stop with Ctrl-C",
        flush=True,
    )
    sys.stderr.flush()
    os.execve(python, command, server_environment())
    return 0  # not reached: the process is the server now


def add_vllm_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `vllm-serve` on an argparse subparsers object."""
    text = "start vLLM's OpenAI-compatible server (its own environment: make vllm) for tether online --sampler vllm"
    p = subparsers.add_parser("vllm-serve", help=text, description=text + ". LoRA adapters are loaded at run time.")
    add_dataclass_arguments(p, VllmServeOptions)
    p.set_defaults(func=run_vllm_serve)
    return p
