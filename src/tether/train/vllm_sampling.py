"""`tether online --sampler vllm`: π_β's responses come from a vLLM server (docs/scaling.md, "Sampling with vLLM").

`VllmSampler` stands where tether's own `sample_responses` stands (the loop's sampler seam: the same arguments,
the same `Samples`), plus what an engine with its own copy of π_β needs:

- `start()`: the run's server — the one at `vllm_url`, or one started for the run from `vllm_python` (by the
  main process, under a watchdog: stopped on every exit, kill -9 of the trainer included) — checked for what the
  run asks of it;
- `sync(model, version)`: π_β's weights, whenever its version changed (at each behavior refresh, and once after
  a start or a resume). LoRA: π_β's adapter (the merged ensemble: rank n·r with the exact merge) is written to
  `RUN/vllm/`, loaded into the server under a new name and the old one unloaded. Full fine-tuning: π_β is written
  as a Hugging Face model and the server reloads its weights from it (vLLM's development mode, which
  `tether vllm-serve` and tether's own servers turn on; any other server is refused up front when a run has a
  refresh);
- `__call__`: every process sends its own prompts to the one server (one request per prompt, seeded per
  sample); log π_β of the responses are re-scored by the trainer's model (`vllm_logprobs: trainer`, exact, as
  TRL does) or taken from the engine (`engine`; then the first call after each sync re-scores too and
  `metrics` holds the largest and mean gap);
- `close()`: unloads the run's adapter (a shared server) or stops the run's own server.

Any failure of the server is an `EngineError` on every process at once (the processes agree before anyone
annotates, so no oracle answer is lost); the loop then saves a checkpoint and stops with one line.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import torch

from ..config import TetherError
from ..files import new_private_dir
from ..generation import cut_at_eos
from ..logprobs import grouped_completion_logps
from ..models import is_adapter_dir, resolve_model_path
from ..sampling import Samples
from ..vllm_client import BASE_MODEL, EngineError, VllmClient
from ..vllm_server import ManagedServer, free_port, lora_rank_limit, server_command, write_server_info
from .checkpoint import whole_tensors
from .engine import from_every, from_main

log = logging.getLogger("tether")


def served_model_dir(cfg) -> Path:
    """The model directory the server serves: the run's model (π_sft; the base of its LoRA adapters)."""
    path = resolve_model_path(cfg.model)
    if is_adapter_dir(path):
        raise TetherError(
            f"option 'model' ({cfg.model}) is a PEFT adapter: a vLLM server serves a whole model; merge it first "
            f"(tether export --merge {cfg.model} --out DIR) and train from DIR"
        )
    return path


def server_lora_rank(cfg) -> int:
    """The rank of π_β's adapter (n·r with the exact merge of n adapters), as --max-lora-rank must hold it."""
    n = cfg.ensemble_size if cfg.ensemble_merge == "exact" else 1
    return lora_rank_limit(cfg.lora_r * n)


class VllmSampler:
    """The sampler seam on a vLLM server (see the module docstring); `metrics` goes into every metrics row."""

    def __init__(self, cfg, accelerator, run_dir: Path):
        self.cfg, self.acc = cfg, accelerator
        self.main = accelerator.is_main_process
        self.work_dir = Path(run_dir) / "vllm"
        self.model_dir = served_model_dir(cfg)
        self.server: ManagedServer | None = None
        self.client = VllmClient(cfg.vllm_url, cfg.vllm_timeout) if cfg.vllm_url else None
        self.version: int | None = None  # the π_β version the server holds (None: not sent yet)
        self.adapter: str | None = None  # the name π_β has on the server
        self.run_tag = self._from_main(secrets.token_hex(4))  # adapter names of this run (a server may be shared)
        self.measure_gap = False
        self.metrics: dict[str, float] = {"sync_s": 0.0, "syncs": 0}
        self.reloads = False  # whether the server takes full weights (known on every process after a check)
        if self.client is not None:  # a given server is checked before the run directory is claimed
            self._check()

    # ------------------------------------------------------------------------------------------ the server

    def start(self) -> None:
        """Start the run's own server (main process; `vllm_python`), wait for it, check it. Idempotent."""
        if self.client is not None:
            return
        url = None
        if self.main:
            port = free_port()
            command = server_command(
                self.cfg.vllm_python,
                self.model_dir,
                port,
                max_lora_rank=server_lora_rank(self.cfg) if self.cfg.lora else 16,
                dtype=self.cfg.torch_dtype,
                extra=self.cfg.vllm_args,
            )
            self.server = ManagedServer(command, self.work_dir / "server.log", "127.0.0.1", port)
            url = self.server.url
        self.client = VllmClient(self._from_main(url), self.cfg.vllm_timeout)

        def ready():
            self.server.wait_ready(self.cfg.vllm_timeout)
            write_server_info(self.work_dir / "server.json", self.server)

        self._agree(ready)
        self._check()

    def _check(self) -> None:
        self._agree(self._check_server)
        self.reloads = self._from_main(self.reloads)

    def _check_server(self) -> None:
        """The server answers, serves the run's model (a warning otherwise) and can take π_β's weights."""
        served = self.client.served_model()
        if served.get("root") and Path(served["root"]).resolve() != self.model_dir.resolve():
            log.warning(
                "the vLLM server at %s serves %s, the run trains %s: the samples are off-policy (π_β's log-probs are "
                "still the trainer's)",
                self.client.url,
                served["root"],
                self.model_dir,
            )
        self.reloads = "/collective_rpc" in self.client.routes()  # full weights can be sent
        if not self.cfg.lora and self.cfg.phases > 1 and not self.reloads:
            raise TetherError(
                f"the vLLM server at {self.client.url} cannot reload full weights (not in vLLM's development mode), "
                "which full fine-tuning needs at every behavior refresh; supported: lora: true (π_β as a LoRA "
                "adapter), phases: 1 (π_β stays the served model), or a server from `tether vllm-serve` or "
                "--vllm_python (development mode on)"
            )

    def close(self) -> None:
        """The end of the run, whatever ended it: the run's adapter unloaded from a shared server, or the run's own
        server stopped; π_β's files removed."""
        if self.server is not None:
            self.server.stop()
        elif self.main and self.client is not None and self.adapter not in (None, BASE_MODEL):
            try:
                self.client.unload_adapter(self.adapter)
            except EngineError as e:
                log.warning("%s", e)
        if self.main:
            for path in self.work_dir.glob("behavior-*"):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ weight sync

    def sync(self, model, version: int) -> None:
        """π_β's weights (the model in `policy.behavior()`) to the server, when `version` is not what it holds.
        Every process calls this (gathering sharded weights is a collective); the main process writes and sends."""
        if version == self.version:
            return
        t = time.perf_counter()
        if self.cfg.lora:
            name = self._send_adapter(model, version)
        else:
            name = self._send_model(model, version)
        self.version, self.adapter = version, name
        self.measure_gap = self.cfg.vllm_logprobs == "engine"
        self.metrics["sync_s"] += time.perf_counter() - t
        self.metrics["syncs"] += 1

    def _send_adapter(self, model, version: int) -> str:
        from peft.utils import get_peft_model_state_dict

        active = model.active_adapter
        state = get_peft_model_state_dict(model, adapter_name=active, save_embedding_layers=False)
        state = whole_tensors(state.items(), keep=self.main)
        name = f"tether-{self.run_tag}-pi_beta-v{version}"

        def send():
            path = self._write(version, lambda d: _save_adapter(d, model.peft_config[active], state))
            self.client.load_adapter(name, str(path.resolve()))
            if self.adapter not in (None, BASE_MODEL):
                self.client.unload_adapter(self.adapter)
            log.info("vLLM: π_β version %d loaded as adapter %s", version, name)

        self._agree(send)
        return name

    def _send_model(self, model, version: int) -> str:
        """Full fine-tuning: π_β as a model directory the server reloads its weights from. At version 0 π_β is
        the run's model: a server started for the run already holds it; another server reloads it from the
        model's own directory, when it can (else it is taken to serve that model: see _check_server)."""
        if version == 0 and (self.cfg.vllm_python or not self.reloads):
            return BASE_MODEL
        if version == 0:
            self._agree(lambda: self.client.reload_weights(str(self.model_dir.resolve())))
            return BASE_MODEL
        sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
        state = whole_tensors(model.state_dict().items(), keep=self.main) if sharded else None

        def send():
            path = self._write(version, lambda d: model.save_pretrained(d, state_dict=state))
            self.client.reload_weights(str(path.resolve()))
            log.info("vLLM: π_β version %d loaded as full weights from %s", version, path)

        self._agree(send)
        return BASE_MODEL

    def _write(self, version: int, save) -> Path:
        """`save(directory)` into RUN/vllm/behavior-vVERSION (complete or absent), older versions removed."""
        final = self.work_dir / f"behavior-v{version}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = new_private_dir(self.work_dir, ".behavior-tmp-")
        try:
            save(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.work_dir.glob("behavior-v*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(self, model, prompts, seeds, *, n, max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id):
        """`sample_responses`' contract on the server: n completions of every prompt (sample j of prompt i seeded
        seeds[i] · 1000 + j) and their log-probs under π_β (`model`, in `policy.behavior()`)."""
        if self.version is None:
            raise TetherError("VllmSampler: sync(model, version) must send π_β before the first sampling call")
        sampling = dict(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_token_ids=list(eos_ids),
        )
        engine = self.cfg.vllm_logprobs == "engine"
        replies = []

        def ask():
            replies.extend(
                self.client.complete_all(
                    self.adapter,
                    [list(p) for p in prompts],
                    [int(s) * 1000 for s in seeds],
                    n,
                    sampling,
                    engine_logps=engine,
                )
            )

        self._agree(ask, everywhere=True)
        eos = set(eos_ids)
        ids = [[cut_at_eos(c.ids, eos) for c in row] for row in replies]
        if not engine or self.measure_gap:
            rescored = grouped_completion_logps(
                model, [list(p) for p in prompts], ids, pad_id, self.cfg.eval_batch_size
            )
        if engine and self.measure_gap:
            self._record_gap([[c.logp for c in row] for row in replies], rescored)
        logps = [[c.logp for c in row] for row in replies] if engine else rescored
        return Samples(ids=ids, logps=logps)

    def _record_gap(self, engine: list[list[float]], trainer: list[list[float]]) -> None:
        """|engine − trainer| of log π_β(y) over this call's responses (every process's), into `metrics`."""
        local = [abs(a - b) for row_a, row_b in zip(engine, trainer) for a, b in zip(row_a, row_b)]
        gaps = [g for part in from_every(self.acc, local) for g in part]
        if gaps:
            self.metrics.update(engine_logp_gap_max=max(gaps), engine_logp_gap_mean=sum(gaps) / len(gaps))
            log.info("vLLM log-probs vs the trainer's: largest gap %.4g, mean %.4g", max(gaps), sum(gaps) / len(gaps))
        self.measure_gap = False

    # ------------------------------------------------------------------------------------------ processes

    def _from_main(self, value):
        """The main process's `value`, on every process."""
        return from_main(self.acc, value)

    def _agree(self, work, everywhere: bool = False) -> None:
        """Run `work` on the main process (every process with `everywhere`); a TetherError on any process is
        raised on all of them (the first one's message), so they stop together."""
        error = None
        if everywhere or self.main:
            try:
                work()
            except TetherError as e:
                error = (str(e), getattr(e, "unreachable", None))
        errors = from_every(self.acc, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            message, unreachable = first
            raise TetherError(message) if unreachable is None else EngineError(message, unreachable)


def _save_adapter(directory: Path, config, state: dict[str, torch.Tensor]) -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) from whole tensors."""
    from safetensors.torch import save_file

    config.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "adapter_model.safetensors"))
