"""Recorded vLLM replies for the fast tests of `--sampler vllm` (tests/test_vllm_sampler.py).

`ReplyServer` is a small HTTP server on 127.0.0.1. Recording, it forwards every request to a real vLLM server and
keeps (request, reply); replaying, it answers each request with the reply recorded for it (404 when there is
none). Requests are keyed by path and JSON body, with what differs from run to run taken out: the random run tag
of adapter names, and directories (only their last part is kept). A load_lora_adapter request's adapter directory
is copied into `captured` (the run deletes it at its end), so a test can look at what the server received.

`tests/record_vllm_replies.py` records tests/data/vllm_replies.json from the real server with the runs of
`RECORDED_RUNS` on the toy model of `TOY_MODEL`; the fast tests replay them. The slow tests
(tests/test_vllm_server.py) use the real server itself.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPLIES = Path(__file__).resolve().parent / "data" / "vllm_replies.json"
TOY_MODEL = dict(hidden_size=128, num_layers=2, vocab_size=400)  # head size 32: one vLLM's CPU attention serves
LORA = dict(lora=True, lora_r=4, lora_alpha=8)
RECORDED_RUNS = {  # name -> options over conftest.online_config (4 steps in 2 phases, 4 prompts per step)
    # adam_epsilon 1e-6: AdamW's first steps move a weight with a near-zero gradient by about ±lr whatever its size, so
    # float rounding (1 process against 2) could flip such a step; with a larger ε such steps stay proportional
    "lora": dict(**LORA, adam_epsilon=1e-6),
    "engine_logprobs": dict(**LORA, vllm_logprobs="engine"),
    "exact_ensemble": dict(**LORA, ensemble_size=2, ensemble_merge="exact"),
    "full": dict(lora=False, learning_rate=1e-3),
}
_TAG = re.compile(r"tether-[0-9a-f]{8}-")


def normalized(value):
    """A request body without what changes from run to run (adapter name tags, directories)."""
    if isinstance(value, dict):
        return {k: (Path(v).name if k in ("lora_path", "weights_path") else normalized(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return _TAG.sub("tether-RUN-", value) if isinstance(value, str) else value


def key(method: str, path: str, body) -> str:
    return json.dumps([method, path, normalized(body)], sort_keys=True)


class ReplyServer:
    """Record (`upstream` given) or replay (`replies` given) vLLM's HTTP API; `requests` lists what came in."""

    def __init__(
        self,
        replies: dict | None = None,
        upstream: str | None = None,
        captured: Path | None = None,
        dies_after: int | None = None,
    ):
        """`dies_after`: the server dies (drops the connection, then refuses every one) after answering that many
        completion requests."""
        self.replies = dict(replies or {})
        self.upstream, self.captured, self.dies_after = upstream, captured, dies_after
        self.requests: list[tuple[str, str, object]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop answering: from now on the port refuses connections (a server that died)."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self, path: str) -> list:
        return [body for _, p, body in self.requests if p == path]

    def _answer(self, method: str, path: str, body) -> tuple[int, str]:
        with self.lock:
            if path == "/v1/completions" and self.dies_after is not None:
                if len(self.calls("/v1/completions")) >= self.dies_after:
                    threading.Thread(target=self.stop).start()
                    raise ConnectionAbortedError("the server died")
            self.requests.append((method, path, body))
        if path == "/v1/load_lora_adapter" and self.captured is not None:
            name = normalized(body["lora_name"])
            shutil.copytree(body["lora_path"], self.captured / name, dirs_exist_ok=True)
        k = key(method, path, body)
        if self.upstream is None:
            found = self.replies.get(k)
            if found is None:
                return 404, json.dumps({"error": {"message": f"no recorded reply for {method} {path}", "code": 404}})
            return found["status"], found["body"]
        status, text = _forward(self.upstream, method, path, body)
        if path == "/openapi.json":  # the schema is large: its paths are what a client reads
            text = json.dumps({"paths": {p: {} for p in json.loads(text).get("paths", {})}})
        with self.lock:
            self.replies[k] = {"status": status, "body": text}
        return status, text

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                try:
                    status, text = server._answer(method, self.path, body)
                except ConnectionAbortedError:
                    self.close_connection = True  # no reply at all: the client sees the connection dropped
                    return
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply("GET")

            def do_POST(self):
                self._reply("POST")

            def log_message(self, *args):
                pass

        return Handler


def _forward(upstream: str, method: str, path: str, body) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        upstream + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def load_replies(run: str = "lora") -> dict:
    """The replies recorded during run `run` of RECORDED_RUNS."""
    return json.loads(REPLIES.read_text())["runs"][run]
