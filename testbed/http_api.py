"""SGLang-compatible HTTP subset over the testbed engine (stdlib ThreadingHTTPServer).

Endpoints, shaped like SGLang's so a session server written against SGLang works
unchanged:

* ``POST /generate`` — body ``{"rid", "input_ids", "sampling_params": {"max_new_tokens"},
  "routed_dp_rank" | "data_parallel_rank", "session_id" | "session_params": {"id"}}``,
  optional ``traceparent`` header. Answers ``{"output_ids", "text": "", "meta_info":
  {"id", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason":
  {"type": "length"|"stop"|"abort", ...}, "e2e_latency", "dp_rank"}}``. An aborted
  request still answers 200 with ``finish_reason.type == "abort"``, as SGLang does; a
  request whose client disconnects (a proxy's read timeout) is aborted in the engine.
* ``POST /abort_request`` — ``{"rid"}`` (or ``{"abort_all": true}``); 404 for an id that
  is not running.
* ``GET /health``, ``GET /health_generate``, ``GET /get_server_info``, ``GET /get_model_info``.

Errors are JSON ``{"object": "error", "message", "type", "code"}`` with status 400
(bad request), 404 (unknown rid / path), 503 (shutting down). One handler thread
per connection: a slow request never blocks another.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .engine import Engine, EngineClosed, InvalidRequest
from .scheduler import Request

log = logging.getLogger("enginetime.testbed.http")

MAX_BODY_BYTES = 64 << 20
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def meta_info(req: Request) -> dict[str, Any]:
    reason: dict[str, Any]
    if req.finish_reason == "length":
        reason = {"type": "length", "length": len(req.output_ids)}
    elif req.finish_reason == "abort":
        reason = {"type": "abort", "message": req.finish_message or "aborted"}
    else:
        reason = {"type": req.finish_reason or "stop"}
    end = req.finish_perf if req.finish_perf is not None else time.perf_counter()
    return {
        "id": req.rid,
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "finish_reason": reason,
        "e2e_latency": end - req.arrival_perf,
        "dp_rank": req.shard,
    }


def generate_response(req: Request) -> dict[str, Any]:
    return {"output_ids": list(req.output_ids), "text": "", "meta_info": meta_info(req)}


def _parse_generate(body: dict[str, Any], headers: Any) -> dict[str, Any]:
    """Validate a /generate body into Engine.submit keyword arguments (HttpError 400 otherwise)."""
    bad = HTTPStatus.BAD_REQUEST
    if "text" in body and "input_ids" not in body:
        raise HttpError(bad, "this engine has no tokenizer: send token ids in 'input_ids', not 'text'")
    if "input_ids" not in body:
        raise HttpError(bad, "missing field 'input_ids' (a list of token ids)")
    ids = body["input_ids"]
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        raise HttpError(
            bad, "batched input_ids (a list of lists) is not supported: send one request per call"
        )
    if body.get("stream"):
        raise HttpError(bad, "streaming is not supported by the testbed: send stream=false")
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise HttpError(bad, "'sampling_params' must be an object, e.g. {\"max_new_tokens\": 16}")
    max_new = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    rid = body.get("rid")
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise HttpError(bad, f"'rid' must be a non-empty string, got {rid!r}")
    rank = body.get("routed_dp_rank")
    if rank is None:
        rank = body.get("data_parallel_rank")
    session = body.get("session_id")
    if session is None and isinstance(body.get("session_params"), dict):
        session = body["session_params"].get("id")
    if session is not None and not isinstance(session, str):
        session = str(session)
    return {
        "input_ids": ids,
        "max_new_tokens": max_new,
        "rid": rid,
        "routed_shard": rank,
        "session_id": session or "",
        "traceparent": headers.get("traceparent", "") or "",
    }


class _Handler(BaseHTTPRequestHandler):
    server: EngineHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: httpx reuses connections

    def log_message(self, fmt: str, *args: Any) -> None:  # stderr noise per request: debug only
        log.debug("%s - %s", self.address_string(), fmt % args)

    # ---------------------------------------------------------------- plumbing

    def _send_json(self, status: HTTPStatus, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(
            int(status), "InternalServerError"
        )
        self._send_json(status, {"object": "error", "message": message, "type": kind, "code": int(status)})

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(HTTPStatus.BAD_REQUEST, "missing Content-Length: send a JSON body")
        try:
            n = int(length)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}") from None
        if n < 0 or n > MAX_BODY_BYTES:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"body of {n} bytes is outside 0..{MAX_BODY_BYTES}")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        fn = routes.get(path)
        try:
            if fn is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no endpoint {self.command} {path}")
            fn()
        except HttpError as exc:
            self._send_error(exc.status, exc.message)
        except InvalidRequest as exc:
            self._send_error(HTTPStatus.BAD_REQUEST, str(exc))
        except EngineClosed as exc:
            self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as exc:  # a bug: answer 500, keep serving
            log.exception("testbed HTTP %s %s failed", self.command, path)
            try:
                self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc!r}")
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch(
            {
                "/health": self._health,
                "/health_generate": self._health,
                "/get_server_info": self._server_info,
                "/server_info": self._server_info,
                "/get_model_info": self._model_info,
            }
        )

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/generate": self._generate, "/abort_request": self._abort})

    # ---------------------------------------------------------------- endpoints

    def _health(self) -> None:
        if self.server.engine._stop:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "the engine is shutting down")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _server_info(self) -> None:
        self._send_json(HTTPStatus.OK, self.server.engine.info())

    def _model_info(self) -> None:
        cfg = self.server.engine.config.model
        self._send_json(
            HTTPStatus.OK,
            {"model_path": "enginetime-testbed-random", "is_generation": True, "config": cfg.to_dict()},
        )

    def _generate(self) -> None:
        kwargs = _parse_generate(self._read_json(), self.headers)
        ids = kwargs.pop("input_ids")
        max_new = kwargs.pop("max_new_tokens")
        req = self.server.engine.submit(ids, max_new, **kwargs)
        while not req.wait(0.25):
            if self._client_gone():  # e.g. an httpx ReadTimeout: SGLang aborts such requests too
                self.server.engine.abort(req.rid)
                req.wait(30)
                self.close_connection = True
                return
        self._send_json(HTTPStatus.OK, generate_response(req))

    def _client_gone(self) -> bool:
        """True when the client closed its connection (readable with nothing to read)."""
        try:
            # poll, not select: select() cannot take descriptors above 1024 (a busy server has them).
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            readable = poller.poll(0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _abort(self) -> None:
        body = self._read_json()
        engine = self.server.engine
        if body.get("abort_all"):
            n = engine.abort_all()
            self._send_json(HTTPStatus.OK, {"success": True, "aborted": n})
            return
        rid = body.get("rid")
        if rid is None:
            raise HttpError(HTTPStatus.BAD_REQUEST, "missing field 'rid' (the id of the request to abort)")
        if not isinstance(rid, str):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"'rid' must be a string, got {rid!r}")
        if not engine.abort(rid):
            raise HttpError(
                HTTPStatus.NOT_FOUND,
                f"no running request with rid {rid!r} (it finished, was aborted, or never existed)",
            )
        self._send_json(HTTPStatus.OK, {"success": True, "rid": rid})


class EngineHTTPServer(ThreadingHTTPServer):
    """HTTP server bound to an Engine. ``serve_in_thread()`` for tests and the demo."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine = engine
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # a TCP server's address: (host, port)
        return f"http://{host}:{port}"

    def serve_in_thread(self) -> EngineHTTPServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="testbed-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(5)
