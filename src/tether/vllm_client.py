"""The HTTP client of a vLLM server (its OpenAI-compatible API plus the LoRA and weight-reload routes), standard
library only: what `tether online --sampler vllm` asks of the server, one method per request.

Token ids go both ways: prompts are sent as ids (the trainer's own tokenization and chat template, nothing
re-tokenized by the server) and completions come back as ids (`return_token_ids`, a vLLM extension). Every sample
has its own seed: one request per prompt with `n` samples and seed s gives sample j the seed s + j (vLLM's rule
for a seeded request with n > 1), so a response depends on the weights, the prompt and its seed only.

Every failure is an `EngineError` with one line: the server is unreachable (connection refused or reset, a
timeout) or it refused the request (its own error message).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .config import TetherError, brief

BASE_MODEL = "base"  # the name `tether vllm-serve` and tether's own servers give the served model


class EngineError(TetherError):
    """A vLLM request failed: `unreachable` (no answer at all) or refused (an error reply)."""

    def __init__(self, message: str, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass
class Completion:
    ids: list[int]  # completion token ids, the stop token included when it ended the completion
    logp: float | None  # Σ log π(y_t | …) as the engine computed it (raw: untempered, unfiltered), if asked


class VllmClient:
    """Requests to the vLLM server at `url` (e.g. http://127.0.0.1:8000), each allowed `timeout` seconds."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def request(self, path: str, body: dict | None = None, timeout: float | None = None):
        """GET (no body) or POST `body` as JSON to `path`; the reply as JSON (or text when it is not JSON)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as reply:
                text = reply.read().decode()
        except urllib.error.HTTPError as e:
            raise EngineError(f"the vLLM server at {self.url} refused {path}: {_error_text(e)}", False) from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut off mid-reply
            reason = getattr(e, "reason", e)
            raise EngineError(
                f"the vLLM server at {self.url} is unreachable ({brief(str(reason), 120)}); start one "
                f"(tether vllm-serve --model M) or pass the right --vllm_url",
                True,
            ) from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def served_model(self) -> dict:
        """The base model the server serves (`id`, `root`: its path on the server)."""
        models = self.request("/v1/models").get("data", [])
        base = [m for m in models if m.get("parent") is None]
        if not base:
            raise EngineError(f"the vLLM server at {self.url} serves no model", False)
        return base[0]

    def routes(self) -> set[str]:
        """The paths the server answers (from its OpenAPI schema)."""
        return set(self.request("/openapi.json").get("paths", {}))

    def complete(
        self,
        model: str,
        prompt: Sequence[int],
        seed: int,
        n: int,
        sampling: dict,
        engine_logps: bool = False,
    ) -> list[Completion]:
        """`n` completions of one prompt; `sampling` holds max_tokens, temperature, top_k, top_p, stop_token_ids."""
        body = {
            "model": model,
            "prompt": list(prompt),
            "n": n,
            "seed": seed,
            "return_token_ids": True,
            "logprobs": 0 if engine_logps else None,
            **sampling,
        }
        reply = self.request("/v1/completions", body)
        out = []
        for choice in sorted(reply["choices"], key=lambda c: c["index"]):
            logps = (choice.get("logprobs") or {}).get("token_logprobs")
            out.append(Completion(list(choice["token_ids"]), sum(logps) if engine_logps and logps else None))
        return out

    def complete_all(
        self, model: str, prompts: Sequence[Sequence[int]], seeds: Sequence[int], n: int, sampling: dict, **kw
    ) -> list[list[Completion]]:
        """`complete` for every prompt, the requests in flight together (the server batches them)."""
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(len(prompts), 64)) as pool:
            futures = [pool.submit(self.complete, model, p, s, n, sampling, **kw) for p, s in zip(prompts, seeds)]
            return [f.result() for f in futures]

    def load_adapter(self, name: str, path: str) -> None:
        self.request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_adapter(self, name: str) -> None:
        self.request("/v1/unload_lora_adapter", {"lora_name": name})

    def adapters(self) -> list[str]:
        """The LoRA adapters the server holds now."""
        return [m["id"] for m in self.request("/v1/models").get("data", []) if m.get("parent") is not None]

    def reload_weights(self, path: str) -> None:
        """Full weights from the Hugging Face model directory `path` (development mode), then a clean prefix
        cache (cached keys and values of the old weights must not be reused)."""
        self.request("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        self.request("/reset_prefix_cache", {})


def _error_text(e: urllib.error.HTTPError) -> str:
    """The message of an error reply (vLLM's JSON `error.message`, FastAPI's `detail`, or the raw text)."""
    try:
        text = e.read().decode(errors="replace")
    except OSError:
        text = ""
    try:
        body = json.loads(text)
        err = body.get("error", body.get("detail", body))
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    text = " ".join((text or str(e.reason)).split())  # one line, whole up to 800 characters: vLLM puts the
    return f"HTTP {e.code}: {text if len(text) <= 800 else text[:799] + '…'}"  # reason mid-message
