"""Two session servers for the demo: the same proxy with a wall-clock timeout or the engine-time guard.

A session server (an RL rollout proxy, a router) forwards each ``/generate`` to the
engine and must give up on requests that take too long. ``SessionServer`` is that
proxy, stdlib HTTP in front of httpx, with one of two policies:

* ``WallClockPolicy`` — what the incident ran: an httpx read timeout. The engine
  sees the connection drop and aborts the request.
* ``EngineTimePolicy`` — the engine-time guard with the same number of seconds as
  an engine-time budget (``enginetime.clients.Guard``): the whole policy is the
  ``with guard.watch(rid):`` around the forward.

Either way a killed request is answered with HTTP 504 and a JSON body saying which
policy killed it and why; ``SessionServer.killed`` keeps the list.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from enginetime.clients import CancellableTransport, EngineBudget, EngineBudgetExceeded, Guard


@dataclass
class Kill:
    request_id: str
    policy: str
    reason: str
    detail: str


class WallClockPolicy:
    """Forward with an httpx read timeout of ``seconds``: the wall clock decides."""

    name = "wall_clock"

    def __init__(self, engine_url: str, seconds: float) -> None:
        self.seconds = seconds
        self.http = httpx.Client(
            base_url=engine_url,
            timeout=httpx.Timeout(10.0, read=seconds),
            limits=httpx.Limits(max_connections=256),
        )

    def describe(self) -> str:
        return f"httpx read timeout of {self.seconds:.2f} s"

    def forward(self, rid: str, payload: bytes) -> tuple[int, bytes, Kill | None]:
        try:
            r = self.http.post("/generate", content=payload, headers={"Content-Type": "application/json"})
        except httpx.ReadTimeout:
            kill = Kill(rid, self.name, "read_timeout", f"no answer within {self.seconds:.2f} s of wall time")
            return 504, json.dumps({"error": kill.detail, "policy": self.name}).encode(), kill
        return r.status_code, r.content, None

    def close(self) -> None:
        self.http.close()


class EngineTimePolicy:
    """Forward under the engine-time guard: the request's own engine time decides."""

    name = "engine_time"

    def __init__(self, engine_url: str, sidecar: str, seconds: float) -> None:
        self.seconds = seconds
        # The session-server code the guard asks for: a guard, a cuttable client, a with block.
        budget = EngineBudget(engine_time=seconds, liveness=30.0, wall=max(60.0, 20 * seconds))
        # Budgets here are seconds (the demo's scale), so follow the engine at 0.1 s rather than 0.5 s.
        self.guard = Guard(sidecar, budget, abort=engine_url, interval=0.1)
        self.http = httpx.Client(
            base_url=engine_url,
            transport=CancellableTransport(),
            timeout=None,
            limits=httpx.Limits(max_connections=256),
        )

    def describe(self) -> str:
        return f"engine-time guard, engine_time budget {self.seconds:.2f} s"

    def forward(self, rid: str, payload: bytes) -> tuple[int, bytes, Kill | None]:
        try:
            with self.guard.watch(rid):
                r = self.http.post("/generate", content=payload, headers={"Content-Type": "application/json"})
        except EngineBudgetExceeded as exc:
            kill = Kill(rid, self.name, exc.reason.value, str(exc))
            body = {
                "error": str(exc),
                "policy": self.name,
                "reason": exc.reason.value,
                "engine_time_s": exc.engine_time,
                "interference_s": exc.interference,
            }
            return 504, json.dumps(body).encode(), kill
        return r.status_code, r.content, None

    def close(self) -> None:
        self.http.close()
        self.guard.close()


class _Handler(BaseHTTPRequestHandler):
    server: SessionServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/generate":
            self._reply(404, json.dumps({"error": f"no endpoint {self.path}"}).encode())
            return
        payload = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            rid = json.loads(payload)["rid"]
        except (ValueError, KeyError, TypeError):
            self._reply(400, json.dumps({"error": "send a JSON body with a 'rid'"}).encode())
            return
        status, body, kill = self.server.policy.forward(rid, payload)
        if kill is not None:
            with self.server.lock:
                self.server.killed.append(kill)
        self._reply(status, body)

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(HTTPStatus(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class SessionServer(ThreadingHTTPServer):
    """A proxy for ``/generate`` with one timeout policy; ``start()`` serves it in a thread."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, policy: WallClockPolicy | EngineTimePolicy, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.policy = policy
        self.lock = threading.Lock()
        self.killed: list[Kill] = []
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # a TCP server's address: (host, port)
        return f"http://{host}:{port}"

    def start(self) -> SessionServer:
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"session-server-{self.policy.name}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.policy.close()
        if self._thread is not None:
            self._thread.join(5)


@dataclass
class Trajectory:
    """One request sent through one session server, and what became of it."""

    request_id: str
    policy: str
    shard: int
    max_new_tokens: int
    status: int = 0
    output_tokens: int = 0
    killed: bool = False
    reason: str = ""
    extra: dict = field(default_factory=dict)


__all__ = ["EngineTimePolicy", "Kill", "SessionServer", "Trajectory", "WallClockPolicy"]
