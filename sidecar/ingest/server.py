"""The ingest server: engine recorders connect here and stream frames.

One asyncio protocol per connection queues what it reads; a pump decodes it
(sidecar.ingest.frames) and feeds the ledger in the order it arrived, in slices
of at most ``slice_s`` per loop callback so gRPC calls are served between them
(``DISPATCH_SLICE_S`` says why); a slice ends sooner, between frames or between the
parts of a lockstep group's attribution, when a call waits (``call_waiting``). Nothing here waits on a
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
import hmac
import logging
import os
import selectors
import socket
import ssl
import stat
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, cast

from enginetime.engine_hooks.constants import MAX_FRAME_BYTES
from enginetime.sidecar.cli import parse_ingest_address
from enginetime.sidecar.ingest.frames import FrameDecoder, FrameError
from enginetime.sidecar.ingest.limits import (
    DISPATCH_SLICE_S,
    INGEST_YIELD_SLICES,
    IngestLimits,
    RateLimitedLog,
    quote,
)
from enginetime.sidecar.ingest.records import Beat, Event, Hello, Step
from enginetime.sidecar.ledger.protocols import IngestSink

if TYPE_CHECKING:
    from enginetime.sidecar.ledger.ledger import ShardKey

log = logging.getLogger("enginetime.sidecar.ingest.server")

#: Reason label for a frame the ledger refused (it raised while ingesting it).
LEDGER_ERROR = "ledger_error"
#: Reasons the ingest server itself closes a connection for (beside the frame errors).
SHARD_TAKEN = "shard_taken"  # another live connection speaks for this (engine, shard)
ENGINE_MISMATCH = "engine_mismatch"  # num_shards/coupling differ from the engine's live shards
BAD_TOKEN = "bad_token"  # --ingest-token-file is set and the hello's token is missing or wrong
PEER_UID = "peer_uid"  # a Unix peer of a uid that --ingest-allow-uid does not allow
HELLO_TIMEOUT = "hello_timeout"
TOO_MANY_CONNECTIONS = "too_many_connections"
BUFFER_LIMIT = "buffer_limit"
TOO_MANY_ENGINES = "too_many_engines"
TOO_MANY_LIVE = "too_many_live"
SERVER_REASONS: tuple[str, ...] = (
    LEDGER_ERROR,
    SHARD_TAKEN,
    ENGINE_MISMATCH,
    BAD_TOKEN,
    PEER_UID,
    HELLO_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    BUFFER_LIMIT,
    TOO_MANY_ENGINES,
    TOO_MANY_LIVE,
)


#: Received bytes queued for decoding and the ledger beyond which connections stop being
#: read (the kernel buffers, then the recorders' own bounded buffers, hold the rest), and
#: below which reading resumes.
#: 1 MiB is ~30 ms of ledger work at 1.4 M entries/s: far under the lockstep wait (0.2 s).
QUEUE_HIGH_BYTES = 1024 * 1024
QUEUE_LOW_BYTES = 256 * 1024
#: Bytes decoded at a time (a read may bring 256 KiB: decoding it whole took ~2.5 ms).
DECODE_BYTES = 32 * 1024


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
    slices: int = 0  # loop callbacks that fed the ledger (at most --ingest-slice each)
    deferred: int = 0  # times a ready slice waited for a unary gRPC call being served
    cut_short: int = 0  # slices that stopped early because a gRPC call (or other loop work) waited
    buffered_bytes: int = 0  # bytes of half-received frames, all connections
    clipped_fields: int = 0  # id/text fields longer than --max-text-bytes, kept clipped
    rejected: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        rejected = ",".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"connections={self.connections} active={self.active_connections} frames={self.frames} "
            f"bytes={self.bytes} steps={self.steps} entries={self.entries} events={self.events} "
            f"rejected={rejected}"
        )


def peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, int] | None:
    """(pid, uid) of a Unix socket's peer from SO_PEERCRED; None where unavailable."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def _describe_peer(
    transport: asyncio.BaseTransport, family: str, address: str, creds: tuple[int, int] | None
) -> str:
    """Who is on the other end: the process id for Unix sockets, host:port for TCP."""
    if family == "unix":
        if creds is not None:
            return f"pid {creds[0]} (uid {creds[1]}) on unix:{address}"
        return f"unix:{address}"
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"tcp:{peer[0]}:{peer[1]}"
    return f"{family}:{address}"


def _node_of(peer: str) -> str:
    """The node a recorder connects from: the host of a TCP peer; this host for a Unix socket."""
    if peer.startswith("tcp:"):
        return peer[4:].rsplit(":", 1)[0]
    return "local"


def group_summary(engine_id: str, num_shards: int, peers: dict[int, str]) -> str:
    """Which nodes and shards of one engine have joined, e.g. ``12/16 shards from 2 nodes: ...``.

    A multi-node engine ships every node's shards to one sidecar: this line, logged on
    each join, tells the operator which node is still missing.
    """
    nodes: dict[str, list[int]] = {}
    for shard, peer in sorted(peers.items()):
        nodes.setdefault(_node_of(peer), []).append(shard)
    where = "; ".join(f"{node} shards {_ranges(shards)}" for node, shards in nodes.items())
    missing = sorted(set(range(num_shards)) - set(peers))
    tail = f"; waiting for shards {_ranges(missing)}" if missing else "; all joined"
    return (
        f"engine {quote(engine_id)}: {len(peers)}/{num_shards} shards joined from "
        f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {where}{tail}"
    )


def _ranges(values: list[int]) -> str:
    out: list[str] = []
    for v in values:
        if out and out[-1].endswith(f"-{v - 1}"):
            out[-1] = out[-1].rsplit("-", 1)[0] + f"-{v}"
        elif out and out[-1] == str(v - 1):
            out[-1] = f"{v - 1}-{v}"
        else:
            out.append(str(v))
    return ",".join(out)


class _Connection(asyncio.Protocol):
    """One recorder's stream: decode, validate, feed the ledger."""

    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.max_frame_bytes, max_text_bytes=server.limits.max_text_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.pid: int | None = None
        self.key: ShardKey | None = None
        self.epoch = 0
        self.closed = False  # we closed it, or it was lost and what it sent was fed
        self.failed = False  # a wire error: nothing after it is decoded (the rejection follows)
        self.pending_reject: tuple[str, str] | None = None
        self._ended = False  # the decoder was told the stream ended
        self._buffered = 0  # this connection's share of counters.buffered_bytes
        self._hello_timer: asyncio.TimerHandle | None = None
        self._fd = -1  # its socket's descriptor, in the server's own_fds while connected

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        creds = peer_credentials(transport) if srv.family == "unix" else None
        self.pid = creds[0] if creds is not None else None
        self.peer = _describe_peer(transport, srv.family, srv.bound_target, creds)
        srv.counters.connections += 1
        srv.counters.active_connections += 1
        srv._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            srv.own_fds.add(self._fd)
        log.debug("connection from %s", self.peer)
        if srv.counters.active_connections > srv.limits.max_connections:
            self._reject(
                TOO_MANY_CONNECTIONS,
                f"{srv.limits.max_connections} ingest connections are open already "
                "(--max-ingest-connections); is something opening connections in a loop?",
            )
            return
        if srv.family == "unix" and srv.allowed_uids is not None:
            if creds is None or creds[1] not in srv.allowed_uids:
                self._reject(
                    PEER_UID,
                    f"the peer runs as uid {creds[1] if creds else '?'}; only uids "
                    f"{sorted(srv.allowed_uids)} may send records (run the engine as the sidecar's user, "
                    "or allow its uid with --ingest-allow-uid)",
                )
                return
        self._hello_timer = asyncio.get_running_loop().call_later(
            srv.limits.hello_timeout_s, self._hello_timed_out
        )

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        if self.key is None and not self.closed:
            self._reject(
                HELLO_TIMEOUT,
                f"no valid EngineHello within {self.server.limits.hello_timeout_s:g} s "
                "(--ingest-hello-timeout)",
            )

    def data_received(self, data: bytes) -> None:
        if self.closed or self.failed:
            return
        self.server.counters.bytes += len(data)
        # Decoded and fed to the ledger later, in bounded slices and in arrival order (IngestServer._pump).
        self.server.enqueue(self, data)

    def eof_received(self) -> bool:
        self.server.enqueue(self, b"", partial(self._finish, False))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self.server
        srv.counters.active_connections -= 1
        srv._connections.discard(self)
        srv.own_fds.discard(self._fd)
        srv._paused.discard(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        # The disconnect waits behind what this connection (and others) sent before it.
        srv.enqueue(self, b"", self._lost)

    def _finish(self, reset: bool) -> None:
        """The stream ended: a frame cut short is a wire error (counted; closed unless already gone)."""
        if self.closed or self.failed or self._ended:
            return
        self._ended = True
        try:
            self.decoder.finish()
        except FrameError as exc:
            if reset:  # reset mid-frame (no EOF): still a truncated stream
                self._count_reject(exc.reason, exc.message)
            else:
                self._reject(exc.reason, exc.message)

    def _lost(self) -> None:
        self._finish(True)
        self.closed = True
        srv = self.server
        srv.counters.buffered_bytes -= self._buffered
        self._buffered = 0
        if self.key is not None:
            key, self.key = self.key, None
            srv.release(key, self)
            try:
                srv.ledger.disconnect(key)
            except Exception:
                log.exception("ledger.disconnect failed for %s", self._who())
            log.info("%s disconnected (%s)", self._who(), self.peer)

    def _decode(self, data: bytes | memoryview) -> list:
        """Frames completed by ``data``; a wire error marks the connection failed and leaves the
        frames before it to be fed, then the rejection (``pending_reject``)."""
        srv = self.server
        counters = srv.counters
        decoder = self.decoder
        try:
            frames = decoder.feed(data)
        except FrameError as exc:
            self.failed = True
            self.pending_reject = (exc.reason, exc.message)
            frames = exc.frames
        else:
            buffered = decoder.buffered
            if buffered != self._buffered:
                counters.buffered_bytes += buffered - self._buffered
                self._buffered = buffered
                if buffered and counters.buffered_bytes > srv.limits.max_buffered_bytes:
                    self.failed = True
                    self.pending_reject = (
                        BUFFER_LIMIT,
                        f"half-received frames hold {counters.buffered_bytes} bytes over all connections, "
                        f"more than --max-ingest-buffer {srv.limits.max_buffered_bytes}",
                    )
        if decoder.clipped:
            counters.clipped_fields += decoder.clipped
            decoder.clipped = 0
        return frames

    # -- work --------------------------------------------------------------------------

    def _dispatch(self, frames: list, pos: int) -> int:
        """Feed ``frames[pos:]`` to the ledger until the slice is over (``slice_over``); return the
        position of the first frame not fed (``len(frames)`` when all were, or the connection
        closed). A step whose group the ledger parked between parts counts as fed."""
        srv = self.server
        ledger = srv.ledger
        counters = srv.counters
        stop = srv.slice_over
        n = len(frames)
        # Not None once records arrive: the decoder lets nothing through before the hello.
        key = cast("ShardKey", self.key)
        while pos < n:
            if self.closed:
                return n
            if stop():
                return pos
            frame = frames[pos]
            pos += 1
            t = type(frame)
            try:
                if t is Step:
                    ledger.on_step(key, frame, srv.call_waiting)
                    counters.steps += 1
                    counters.entries += len(frame.handles)
                    if ledger.live_requests(key) > srv.limits.max_live_per_shard:
                        self._too_many_live()
                        return n
                    if ledger.parked:
                        counters.frames += 1
                        return pos
                elif t is Event:
                    ledger.on_event(key, frame)
                    counters.events += 1
                    if frame.kind == 1 and ledger.live_requests(key) > srv.limits.max_live_per_shard:
                        self._too_many_live()
                        return n
                elif t is Beat:
                    ledger.on_heartbeat(key, frame)
                    counters.heartbeats += 1
                elif t is Hello:
                    refusal = srv.admit(self, frame)
                    if refusal is not None:
                        self._reject(*refusal)
                        return n
                    key = self.key = ledger.connect(frame)
                    self.epoch = frame.recorder_epoch
                    srv.claim(key, self)
                    if self._hello_timer is not None:
                        self._hello_timer.cancel()
                        self._hello_timer = None
                    log.info(
                        "engine %s shard %d/%d (%s %s, hooks %s, %s) connected from %s",
                        quote(frame.engine_id),
                        frame.shard,
                        frame.num_shards,
                        frame.engine_kind or "?",
                        frame.engine_version or "?",
                        frame.hooks_version or "?",
                        frame.device_name or "?",
                        self.peer,
                    )
                    if frame.num_shards > 1:
                        log.info("%s", srv.group_summary(frame.engine_id, frame.num_shards))
            except Exception as exc:  # the ledger refused this frame
                if isinstance(exc, ValueError):
                    message = f"the ledger refused a {t.__name__}: {exc}"
                else:
                    log.exception("ledger failed on a %s from %s", t.__name__, self._who())
                    message = (
                        f"the ledger failed on a {t.__name__}: {type(exc).__name__}: {exc} (a sidecar bug)"
                    )
                self._reject(LEDGER_ERROR, message)
                return n
            counters.frames += 1
        return n

    def _too_many_live(self) -> None:
        self._reject(
            TOO_MANY_LIVE,
            f"{self._who()} has more than {self.server.limits.max_live_per_shard} live requests "
            "(--max-live-per-shard); is the adapter reporting FINISHED/ABORTED?",
        )

    def _who(self) -> str:
        hello = self.decoder.hello
        if hello is None:
            return "unidentified recorder"
        return f"engine {quote(hello.engine_id)} shard {hello.shard}"

    def _count_reject(self, reason: str, message: str) -> int:
        rejected = self.server.counters.rejected
        n = rejected.get(reason, 0) + 1
        rejected[reason] = n
        self.server.ratelog.log(
            logging.WARNING,
            reason,
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

    def drop(self) -> None:
        """Close without counting a rejection (superseded by a reconnect of the same recorder)."""
        self.key = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Work:
    """Bytes one read brought, decoded and fed piece by piece, then what to do after them."""

    __slots__ = ("conn", "data", "off", "frames", "pos", "after", "arrived_ns")

    def __init__(self, conn: _Connection, data: bytes, after: Callable[[], None] | None) -> None:
        self.arrived_ns = time.time_ns()
        self.conn = conn
        self.data = memoryview(data)
        self.off = 0  # bytes decoded so far
        self.frames: list = []  # decoded, not yet all fed
        self.pos = 0  # frames fed so far
        self.after = after


#: How often a slice waiting for unary calls in flight looks again.
CALL_POLL_S = 0.0001
#: Ledger work between two looks, within a slice, for a gRPC call (or other loop work) waiting.
LOOK_EVERY_S = 0.00005


class IngestServer:
    """Listens on ``unix:PATH`` or ``tcp:HOST:PORT`` and feeds the ledger.

    ``start()`` returns the bound address (the real port for ``tcp:HOST:0``).
    For Unix sockets the parent directory is created 0700 when missing, a
    stale socket file left by a dead sidecar is replaced, a live sidecar on
    the same path is never displaced, and the socket is 0600 (the engine and
    the sidecar run as the same user; nobody else may inject records).
    """

    def __init__(
        self,
        ledger: IngestSink,
        address: str,
        *,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        limits: IngestLimits | None = None,
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
        allow_uids: tuple[int, ...] = (),
        allow_insecure: bool = False,
        slice_s: float = DISPATCH_SLICE_S,
        calls_in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.family, self.target = parse_ingest_address(address)
        self.ledger = ledger
        self.max_frame_bytes = max_frame_bytes
        self.limits = limits or IngestLimits()
        self.counters = IngestCounters()
        self.ratelog = RateLimitedLog(log)
        self.token = token.encode("utf-8")
        self.ssl_context = ssl_context
        self.allow_insecure = allow_insecure
        #: Unix peers allowed to connect: our own uid plus --ingest-allow-uid (None: no check).
        self.allowed_uids: frozenset[int] | None = (
            frozenset((os.getuid(), *allow_uids)) if hasattr(os, "getuid") else None
        )
        self.bound_target = self.target if isinstance(self.target, str) else ""
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()
        self._owners: dict[tuple[str, int], _Connection] = {}
        self._socket_id: tuple[int, int] | None = None
        #: Decoded frames of every connection, in arrival order, waiting for the ledger.
        self._queue: deque[_Work] = deque()
        self._queued_bytes = 0
        self._pump_handle: asyncio.Handle | None = None
        self._paused: set[_Connection] = set()  # reading paused while the queue is over QUEUE_HIGH_BYTES
        #: Longest stretch of ledger work per loop callback (``DISPATCH_SLICE_S``); 0: feed each
        #: read whole in its own callback, as it arrives.
        self.slice_s = slice_s
        #: How long a slice may wait behind other ready loop work (``INGEST_YIELD_SLICES``).
        self.yield_s = slice_s * INGEST_YIELD_SLICES
        #: Unary gRPC calls being served now (the API guard's count): a slice waits for them,
        #: within ``yield_s``, so a call that started is not interrupted between its awaits.
        self.calls_in_flight = calls_in_flight
        self._wants_since: float | None = None  # when the next slice became ready
        self._deadline = 0.0  # the running slice's end (perf_counter)
        self._look = False  # the running slice may end early for waiting loop work
        self._over = False  # the running slice found its end (kept until the next slice)
        self._next_look = 0.0
        #: Descriptors of our own sockets (connections, listeners): data waiting on them is
        #: more ingest, not a reason to end a slice early.
        self.own_fds: set[int] = set()
        self._selector: selectors.BaseSelector | None = None

    # -- feeding the ledger in bounded slices ----------------------------------------------

    def enqueue(self, conn: _Connection, data: bytes, after: Callable[[], None] | None = None) -> None:
        """Queue bytes ``conn`` sent (then ``after()``) for decoding and the ledger, in arrival order."""
        self._queue.append(_Work(conn, data, after))
        self._queued_bytes += len(data)
        if self._queued_bytes > QUEUE_HIGH_BYTES:
            # Every connection waits (in the kernel's buffers) until the ledger caught up: a
            # lockstep group's first step fed while its peers' steps sit queued here would
            # start the group's bounded wait (--lockstep-wait) without them.
            for other in self._connections:
                if other not in self._paused and not other.closed and other.transport is not None:
                    other.transport.pause_reading()
                    self._paused.add(other)
        if self.slice_s <= 0:  # no slicing: all of it now, in this callback
            self.drain()
        elif self._pump_handle is None:
            self._pump_handle = asyncio.get_running_loop().call_soon(self._pump)

    def fed_until_ns(self) -> int | None:
        """When the oldest bytes still queued for the ledger arrived (None: nothing queued).

        The ledger's timers (a lockstep group's bounded wait for its stragglers) must not
        count time whose records are still in this queue: the stragglers may be among them.
        """
        return self._queue[0].arrived_ns if self._queue else None

    def _pump(self) -> None:
        """Decode and feed queued bytes for about ``slice_s``, then let the loop serve others.

        A slice goes after any other callback already waiting in the loop, and after any
        unary gRPC call being served, for up to ``yield_s``. A unary call crosses the loop
        five or six times between its arrival and its reply (the completion-queue event, the
        server's accept task, the handler's task, each await of a message or of its send);
        when a slice ran at every crossing, the call waited for several slices. Between
        crossings the call's next step is in gRPC's threads, not in the loop's run queue, so
        the guard's count of calls in flight says to wait as well. The bound keeps a flood of
        calls from starving ingest (a slice at least every ``yield_s``); a count that never
        drops (a lost done callback) expires after ``STALE_CALL_S`` in the guard.
        """
        self._pump_handle = None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if self._wants_since is None:
            self._wants_since = started
        polite = started - self._wants_since < self.yield_s
        if polite:
            if getattr(loop, "_ready", None):  # asyncio's run queue (absent in other loops)
                self._pump_handle = loop.call_soon(self._pump)
                return
            if self.calls_in_flight is not None and self.calls_in_flight() > 0:
                self.counters.deferred += 1
                self._pump_handle = loop.call_later(CALL_POLL_S, self._pump)
                return
        self._wants_since = None
        self.counters.slices += 1
        # A slice that waited its full yield_s runs its whole slice_s: a flood of calls
        # must not starve ingest.
        self._feed(started + self.slice_s, look=polite)
        self.counters.busy_s += time.perf_counter() - started
        if self._queue or self.ledger.parked:
            self._pump_handle = loop.call_soon(self._pump)

    def slice_over(self) -> bool:
        """The running slice should end now, before the next frame: its time is up, or a call
        waits (``call_waiting``)."""
        return self._over or time.perf_counter() >= self._deadline or self.call_waiting()

    def call_waiting(self, boundary: bool = True) -> bool:
        """A unary call is being served or some other loop work waits, looked at every
        ``LOOK_EVERY_S`` of work: a readable socket that is not ours, such as gRPC's
        completion queue waking the loop for a call that just arrived.

        This is the ledger's ``pause`` (``Ledger.on_step``): a lockstep group's attribution
        (~0.7 ms at 8 x 256 entries) stops after its current part for a waiting call, which
        then waits ~0.1 ms (the per-request accounting: ~0.25 ms), not for the slice. Only
        for a call: a slice whose time is up finishes its group, as ticks and disconnects
        would otherwise finish it in one go. The ledger also asks inside the accounting
        (``boundary`` False), where it cannot stop: the answer is kept for the next stop,
        and the look's yield of the CPU (below) still helps.

        Each look first yields the CPU (``sched_yield``): the call only reaches the loop once
        gRPC's own threads have read it, and where they share a core with this thread (a
        sidecar pinned to one CPU) the kernel lets this thread run on for up to its time
        slice (~1 ms) before they get to; measured, a call's arrival waited 1.0-1.5 ms for
        that at p99 without the yield. With nothing else to run it returns at once (<1 us).
        """
        if self._over:
            return True
        if not self._look:
            return False
        now = time.perf_counter()
        if now < self._next_look:
            return False
        self._next_look = now + LOOK_EVERY_S
        os.sched_yield()
        if self.calls_in_flight is not None and self.calls_in_flight() > 0:
            self._over = True
        else:
            selector = self._selector
            if selector is not None:
                own = self.own_fds
                self._over = any(key.fd not in own for key, _ in selector.select(0))
        if self._over:
            self.counters.cut_short += 1
        return self._over

    def _feed(self, deadline: float, look: bool = False) -> None:
        self._deadline = deadline
        self._look = look
        self._over = False
        self._next_look = time.perf_counter() + LOOK_EVERY_S
        stop = self.slice_over
        ledger = self.ledger
        if ledger.parked and not ledger.resume(self.call_waiting):
            return
        queue = self._queue
        while queue:
            work = queue[0]
            conn = work.conn
            while True:
                if work.pos < len(work.frames):
                    work.pos = conn._dispatch(work.frames, work.pos)
                    if work.pos < len(work.frames) or ledger.parked:
                        return  # out of time: the rest in the next slice
                if conn.pending_reject is not None:
                    reason, message = conn.pending_reject
                    conn.pending_reject = None
                    conn._reject(reason, message)
                if work.off >= len(work.data) or conn.closed or conn.failed:
                    break
                if stop():
                    return
                piece = work.data[work.off : work.off + DECODE_BYTES]
                work.off += len(piece)
                self._queued_bytes -= len(piece)
                work.frames = conn._decode(piece)
                work.pos = 0
            queue.popleft()
            self._queued_bytes -= len(work.data) - work.off
            if work.after is not None:
                try:
                    work.after()
                except Exception:
                    log.exception("ingest follow-up failed for %s", conn._who())
            if self._paused and self._queued_bytes < QUEUE_LOW_BYTES:
                self._resume_reading()
            if stop():
                return

    def _resume_reading(self) -> None:
        for conn in self._paused:
            if not (conn.closed or conn.failed) and conn.transport is not None:
                conn.transport.resume_reading()
        self._paused.clear()

    def drain(self) -> None:
        """Feed everything queued now, however long it takes (shutdown, tests)."""
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        started = time.perf_counter()
        self._feed(float("inf"))
        self.counters.busy_s += time.perf_counter() - started

    # -- ownership of (engine, shard) ----------------------------------------------------

    def admit(self, conn: _Connection, hello: Hello) -> tuple[str, str] | None:
        """May ``conn`` speak for the hello's (engine, shard)? None, or (reason, message)."""
        if self.token and not hmac.compare_digest(hello.token.encode("utf-8"), self.token):
            what = "carries no token" if not hello.token else "carries a wrong token"
            return BAD_TOKEN, (
                f"the EngineHello {what}; give the hooks the sidecar's --ingest-token-file through "
                "ENGINETIME_TOKEN_FILE (or ENGINETIME_TOKEN)"
            )
        key = (hello.engine_id, int(hello.shard))
        owner = self._owners.get(key)
        if owner is not None and owner is not conn and not owner.closed:
            if owner.epoch == hello.recorder_epoch:
                # The same recorder reconnected before we saw its old connection end: the new one wins.
                log.info(
                    "engine %s shard %d reconnected from %s; closing its previous connection (%s)",
                    quote(hello.engine_id),
                    hello.shard,
                    conn.peer,
                    owner.peer,
                )
                del self._owners[key]
                owner.drop()
                return None
            return SHARD_TAKEN, (
                f"engine {quote(hello.engine_id)} shard {hello.shard} is already connected from "
                f"{owner.peer} (pid {owner.pid if owner.pid is not None else 'unknown'}) with another "
                f"recorder epoch; this peer is pid {conn.pid if conn.pid is not None else 'unknown'}. "
                "Two engines share an engine id: give each its own (ENGINETIME_ENGINE_ID, or the "
                "adapter's engine_id), or stop the old engine"
            )
        for (engine_id, _shard), other in self._owners.items():
            if engine_id != hello.engine_id or other.closed:
                continue
            theirs = other.decoder.hello
            if theirs is not None and (
                theirs.num_shards != hello.num_shards or (theirs.coupling or 1) != (hello.coupling or 1)
            ):
                return ENGINE_MISMATCH, (
                    f"engine {quote(hello.engine_id)} is connected with num_shards={theirs.num_shards} "
                    f"coupling={theirs.coupling} (from {other.peer}); this hello says "
                    f"num_shards={hello.num_shards} coupling={hello.coupling}. Two engines share an "
                    "engine id: give each its own"
                )
            break
        limits = self.limits
        if hello.num_shards > limits.max_shards:
            return TOO_MANY_ENGINES, (
                f"num_shards={hello.num_shards} is more than --max-shards {limits.max_shards}"
            )
        while True:
            engines, shards, engine_known, shard_known = self.ledger.census(hello.engine_id, int(hello.shard))
            full_engines = not engine_known and engines >= limits.max_engines
            full_shards = not shard_known and shards >= limits.max_shards
            if not (full_engines or full_shards):
                return None
            # Room for a newcomer comes from an engine that left (none of its shards connected).
            forgotten = self.ledger.forget_idle_engine(keep=hello.engine_id)
            if forgotten is None:
                break
            log.info(
                "forgot engine %s and the %d requests it still held (no shard connected) to admit "
                "engine %s: --max-engines %d / --max-shards %d reached",
                quote(forgotten[0]),
                forgotten[1],
                quote(hello.engine_id),
                limits.max_engines,
                limits.max_shards,
            )
        if full_engines:
            return TOO_MANY_ENGINES, (
                f"the sidecar already holds {engines} engine ids, each with a shard connected "
                f"(--max-engines {limits.max_engines}); one sidecar serves one engine: are engines "
                "starting with a fresh engine id each time, or is one sidecar shared by too many?"
            )
        return TOO_MANY_ENGINES, (
            f"the sidecar already holds {shards} shards of engines with a shard connected (--max-shards)"
        )

    def claim(self, key: tuple[str, int], conn: _Connection) -> None:
        self._owners[key] = conn

    def group_summary(self, engine_id: str, num_shards: int) -> str:
        """The joined shards of ``engine_id`` and the nodes they connect from (see ``group_summary``)."""
        peers = {shard: c.peer for (eid, shard), c in self._owners.items() if eid == engine_id}
        return group_summary(engine_id, num_shards, peers)

    def release(self, key: tuple[str, int], conn: _Connection) -> None:
        if self._owners.get(key) is conn:
            del self._owners[key]

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
            if not self.token and self.ssl_context is None:
                if not self.allow_insecure:
                    raise IngestAddressError(
                        f"refusing TCP ingest on {host}:{port} without authentication: anyone who can reach "
                        "it could forge records and make guards kill real requests. Give a shared secret "
                        "with --ingest-token-file PATH (the hooks read ENGINETIME_TOKEN_FILE) and/or TLS "
                        "with --ingest-tls-cert/--ingest-tls-key, or pass --allow-insecure-ingest if the "
                        "network is private"
                    )
                log.warning(
                    "TCP ingest on %s:%s has no token and no TLS (--allow-insecure-ingest): every peer "
                    "that can reach it can forge engine records",
                    host,
                    port,
                )
            try:
                self._server = await loop.create_server(
                    lambda: _Connection(self), host, port, ssl=self.ssl_context
                )
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
            self.own_fds.add(sock.fileno())
        # The selector loop's own (uvloop has none: slices then look only at calls in flight).
        self._selector = getattr(loop, "_selector", None)
        return self.address

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting, feed what was received, close every connection (the ledger sees
        disconnects), remove the socket."""
        self.stop_accepting()
        self.drain()
        for conn in list(self._connections):
            conn.closed = True  # our doing: a frame cut short now is not the recorder's fault
            if conn.transport is not None:
                conn.transport.close()
        # Let connection_lost callbacks run so the ledger hears every disconnect.
        for _ in range(10):
            if not self._connections:
                break
            await asyncio.sleep(0)
        self.drain()  # the disconnects queued by connection_lost
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


def check_socket_dir(parent: str) -> None:
    """Refuse a socket directory that another user could tamper with.

    Whoever can write to the directory can replace the socket with their own and
    receive the engine's request and session ids, or feed it forged records. So the
    directory must belong to the sidecar's uid and be writable by nobody else (a
    directory the sidecar created itself is both).
    """
    if not hasattr(os, "getuid"):
        return
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise IngestAddressError(f"cannot check the ingest socket's directory {parent}: {exc}") from exc
    uid = os.getuid()
    problems = []
    if st.st_uid != uid:
        problems.append(f"it is owned by uid {st.st_uid}, not by this sidecar's uid {uid}")
    if st.st_mode & 0o022:
        problems.append(f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
    if problems:
        raise IngestAddressError(
            f"refusing the ingest socket's directory {parent}: {' and '.join(problems)}, so another user "
            "could replace the socket and read the engine's request ids or forge its records. Point "
            "--ingest at a path in a directory that does not exist yet (the sidecar creates it 0700), "
            f"or fix this one: chown {uid} {parent} && chmod 700 {parent}"
        )


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
    check_socket_dir(parent)
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
