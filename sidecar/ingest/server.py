"""The ingest server: engine recorders connect here and stream frames.

One asyncio protocol per connection decodes frames (sidecar.frames) and feeds
the ledger synchronously, in the order they arrived. Nothing here waits on a
gRPC client: subscribers are served by the fan-out from ledger snapshots, so
a slow or stuck reader cannot back-pressure an engine.

A connection that breaks the wire contract is closed alone, with one WARNING
line naming the reason, the peer and the engine/shard when known, and a
per-reason counter; every other connection keeps streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from enginetime.engine_hooks.constants import MAX_FRAME_BYTES
from enginetime.sidecar.cli import parse_ingest_address
from enginetime.sidecar.ingest.frames import FrameDecoder, FrameError
from enginetime.sidecar.ingest.records import Beat, Event, Hello, Step
from enginetime.sidecar.ledger.protocols import IngestSink

if TYPE_CHECKING:
    from enginetime.sidecar.ledger.ledger import ShardKey

log = logging.getLogger("enginetime.sidecar.ingest.server")

#: Reason label for a frame the ledger refused (it raised while ingesting it).
LEDGER_ERROR = "ledger_error"


class IngestAddressError(RuntimeError):
    """The ingest address cannot be served (in use, not a socket, no permission...)."""


@dataclass(slots=True)
class IngestCounters:
    """Cumulative ingest figures since the sidecar started."""

    connections: int = 0  # accepted, ever
    active_connections: int = 0
    frames: int = 0
    bytes: int = 0
    steps: int = 0
    events: int = 0
    heartbeats: int = 0
    entries: int = 0  # step entries (requests x steps)
    busy_s: float = 0.0  # seconds spent decoding and feeding the ledger
    rejected: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        rejected = ",".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"connections={self.connections} active={self.active_connections} frames={self.frames} "
            f"bytes={self.bytes} steps={self.steps} entries={self.entries} events={self.events} "
            f"rejected={rejected}"
        )


def _describe_peer(transport: asyncio.BaseTransport, family: str, address: str) -> str:
    """Who is on the other end: the process id for Unix sockets, host:port for TCP."""
    sock = transport.get_extra_info("socket")
    if family == "unix" and sock is not None and hasattr(socket, "SO_PEERCRED"):
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            return f"pid {pid} (uid {uid}) on unix:{address}"
        except OSError:
            return f"unix:{address}"
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"tcp:{peer[0]}:{peer[1]}"
    return f"{family}:{address}"


class _Connection(asyncio.Protocol):
    """One recorder's stream: decode, validate, feed the ledger."""

    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.key: ShardKey | None = None
        self.closed = False

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        self.peer = _describe_peer(transport, srv.family, srv.bound_target)
        srv.counters.connections += 1
        srv.counters.active_connections += 1
        srv._connections.add(self)
        log.debug("connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        counters = self.server.counters
        started = time.perf_counter()
        counters.bytes += len(data)
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self._dispatch(exc.frames)
            self._reject(exc.reason, exc.message)
        else:
            if frames:
                self._dispatch(frames)
        counters.busy_s += time.perf_counter() - started

    def eof_received(self) -> bool:
        try:
            self.decoder.finish()
        except FrameError as exc:
            self._reject(exc.reason, exc.message)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            try:
                self.decoder.finish()
            except FrameError as err:
                # Reset mid-frame (no EOF): still a truncated stream.
                self._count_reject(err.reason, err.message)
            self.closed = True
        srv = self.server
        srv.counters.active_connections -= 1
        srv._connections.discard(self)
        if self.key is not None:
            key, self.key = self.key, None
            try:
                srv.ledger.disconnect(key)
            except Exception:
                log.exception("ledger.disconnect failed for %s", self._who())
            log.info("%s disconnected (%s)", self._who(), self.peer)

    # -- work --------------------------------------------------------------------------

    def _dispatch(self, frames: list) -> None:
        srv = self.server
        ledger = srv.ledger
        counters = srv.counters
        # Not None once records arrive: the decoder lets nothing through before the hello.
        key = cast("ShardKey", self.key)
        for frame in frames:
            if self.closed:
                return
            t = type(frame)
            try:
                if t is Step:
                    ledger.on_step(key, frame)
                    counters.steps += 1
                    counters.entries += len(frame.handles)
                elif t is Event:
                    ledger.on_event(key, frame)
                    counters.events += 1
                elif t is Beat:
                    ledger.on_heartbeat(key, frame)
                    counters.heartbeats += 1
                elif t is Hello:
                    key = self.key = ledger.connect(frame)
                    log.info(
                        "engine %r shard %d/%d (%s %s, hooks %s, %s) connected from %s",
                        frame.engine_id,
                        frame.shard,
                        frame.num_shards,
                        frame.engine_kind or "?",
                        frame.engine_version or "?",
                        frame.hooks_version or "?",
                        frame.device_name or "?",
                        self.peer,
                    )
            except Exception as exc:  # the ledger refused this frame
                if isinstance(exc, ValueError):
                    message = f"the ledger refused a {t.__name__}: {exc}"
                else:
                    log.exception("ledger failed on a %s from %s", t.__name__, self._who())
                    message = (
                        f"the ledger failed on a {t.__name__}: {type(exc).__name__}: {exc} (a sidecar bug)"
                    )
                self._reject(LEDGER_ERROR, message)
                return
            counters.frames += 1

    def _who(self) -> str:
        hello = self.decoder.hello
        if hello is None:
            return "unidentified recorder"
        return f"engine {hello.engine_id!r} shard {hello.shard}"

    def _count_reject(self, reason: str, message: str) -> int:
        rejected = self.server.counters.rejected
        n = rejected.get(reason, 0) + 1
        rejected[reason] = n
        log.warning(
            "closing connection from %s (%s): %s: %s [rejected %s total: %d]",
            self.peer,
            self._who(),
            reason,
            message,
            reason,
            n,
        )
        return n

    def _reject(self, reason: str, message: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._count_reject(reason, message)
        if self.transport is not None:
            self.transport.abort()


class IngestServer:
    """Listens on ``unix:PATH`` or ``tcp:HOST:PORT`` and feeds the ledger.

    ``start()`` returns the bound address (the real port for ``tcp:HOST:0``).
    For Unix sockets the parent directory is created 0700 when missing, a
    stale socket file left by a dead sidecar is replaced, a live sidecar on
    the same path is never displaced, and the socket is 0600 (the engine and
    the sidecar run as the same user; nobody else may inject records).
    """

    def __init__(self, ledger: IngestSink, address: str, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.family, self.target = parse_ingest_address(address)
        self.ledger = ledger
        self.max_frame_bytes = max_frame_bytes
        self.counters = IngestCounters()
        self.bound_target = self.target if isinstance(self.target, str) else ""
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()
        self._socket_id: tuple[int, int] | None = None

    @property
    def address(self) -> str:
        """The bound address in ``--ingest`` syntax."""
        if self.family == "unix":
            return f"unix:{self.bound_target}"
        return f"tcp:{self.bound_target}"

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        if self.family == "unix":
            path = str(self.target)
            prepare_unix_path(path)
            old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
            try:
                self._server = await loop.create_unix_server(lambda: _Connection(self), path)
            except OSError as exc:
                raise IngestAddressError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from exc
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._socket_id = (st.st_dev, st.st_ino)
            self.bound_target = path
        else:
            assert isinstance(self.target, tuple)  # tcp: (host, port)
            host, port = self.target
            try:
                self._server = await loop.create_server(lambda: _Connection(self), host, port)
            except OSError as exc:
                hint = " (another process uses that port?)" if exc.errno == errno.EADDRINUSE else ""
                raise IngestAddressError(
                    f"cannot listen on tcp:{host}:{port}: {exc.strerror or exc}{hint}"
                ) from exc
            sockname = self._server.sockets[0].getsockname()
            shown = f"[{host}]" if ":" in host else host
            self.bound_target = f"{shown}:{sockname[1]}"
        for sock in self._server.sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        return self.address

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting, close every connection (the ledger sees disconnects), remove the socket."""
        self.stop_accepting()
        for conn in list(self._connections):
            conn.closed = True  # our doing: a frame cut short now is not the recorder's fault
            if conn.transport is not None:
                conn.transport.close()
        # Let connection_lost callbacks run so the ledger hears every disconnect.
        for _ in range(10):
            if not self._connections:
                break
            await asyncio.sleep(0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
        self.remove_socket()

    def remove_socket(self) -> None:
        """Unlink our socket file, unless another sidecar has since replaced it."""
        if self.family != "unix" or self._socket_id is None:
            return
        path = self.bound_target
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove socket %s: %s", path, exc)
        self._socket_id = None


def prepare_unix_path(path: str) -> None:
    """Make ``path`` bindable: parent dir 0700 if missing; replace a stale socket; refuse otherwise."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise IngestAddressError(
                f"cannot create the ingest socket's directory {parent}: {exc.strerror or exc}; "
                "create it or choose another --ingest path"
            ) from exc
    if len(os.fsencode(path)) > 107:
        raise IngestAddressError(
            f"ingest socket path is {len(os.fsencode(path))} bytes, over the ~107-byte AF_UNIX limit: "
            f"{path}; "
            "choose a shorter --ingest path"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise IngestAddressError(
            f"{path} exists and is not a socket; refusing to replace it — remove it or choose another "
            "--ingest path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("replaced stale socket %s (its sidecar is gone)", path)
        return
    except OSError as exc:
        raise IngestAddressError(f"cannot check whether {path} is in use: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    raise IngestAddressError(
        f"another sidecar is already listening on unix:{path}; stop it first, or give this one another "
        "--ingest path (and point the engine at it with ENGINETIME_INGEST)"
    )
