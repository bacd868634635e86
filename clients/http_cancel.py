"""CancellableTransport: an httpx transport whose blocking calls the engine-time guard can cut.

A thread blocked in ``httpx.Client.post`` sits in ``recv()`` on a socket until the
engine answers; nothing in httpx lets another thread interrupt it. This transport is
``httpx.HTTPTransport`` with its network streams wrapped: whenever a thread inside
``with guard.watch(rid):`` reads or writes, the stream registers with that watch, and
when the guard fires it shuts the socket down (``shutdown(SHUT_RDWR)``), which wakes
the blocked ``recv()`` at once. httpx then raises a transport error, which the watch
turns into ``EngineBudgetExceeded``. Closing the connection is also what tells the
engine to stop: SGLang (and the testbed) abort a request whose client disconnected,
and vLLM's OpenAI server does the same.

    client = httpx.Client(transport=CancellableTransport(), timeout=None)
    with guard.watch(rid):
        client.post(f"{engine}/generate", json={"rid": rid, ...})

Connections are pooled as usual; a connection that was cut is closed and never
reused. Threads outside a watch are not affected. Needs httpx (and its httpcore).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import httpcore
import httpx

from .guard import current_watch

log = logging.getLogger("enginetime.clients.guard")


class _CutStream(httpcore.NetworkStream):
    """A network stream that a guard watch can shut down from another thread."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.cut = False

    def _enter(self, what: str):
        """Register with the calling thread's watch for the duration of one blocking operation.

        Only operations in progress are registered: a pooled connection that another
        thread picks up later is never cut on behalf of a watch it does not belong to.
        """
        watch = current_watch()
        if watch is None:
            return None
        if not watch._attach(self):
            self.shutdown()
            raise httpcore.ReadError(f"cancelled by the engine-time guard before {what}")
        return watch

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        watch = self._enter("reading")
        try:
            return self._inner.read(max_bytes, timeout)
        finally:
            if watch is not None:
                watch._detach(self)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        watch = self._enter("writing")
        try:
            self._inner.write(buffer, timeout)
        finally:
            if watch is not None:
                watch._detach(self)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        return _CutStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def shutdown(self) -> None:
        """Wake any thread blocked on this socket; the connection is dead afterwards."""
        with self._lock:
            if self.cut:
                return
            self.cut = True
        sock = self._inner.get_extra_info("socket")
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by its owner


class _CutBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _CutStream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _CutStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class CancellableTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` (same arguments) whose calls inside ``guard.watch`` can be cut.

    Wraps the connection pool's network backend; if a future httpx/httpcore stops
    exposing it, the transport still works as a plain HTTPTransport and says once
    that the guard falls back to aborting requests on the engine.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        pool = getattr(self, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if pool is None or backend is None:
            self.cancellable = False
            log.warning(
                "CancellableTransport: this httpx/httpcore (%s/%s) has no network backend to wrap; guarded "
                "calls cannot be cut from another thread (pass abort= to the guard so the engine ends them)",
                httpx.__version__,
                httpcore.__version__,
            )
        else:
            pool._network_backend = _CutBackend(backend)
            self.cancellable = True


__all__ = ["CancellableTransport"]
