"""The shipper: a daemon thread that owns the ingest socket.

The engine thread encodes each step itself and appends a tuple holding it to
``Shipper.ring`` (a bounded deque: when it is full the producer drops the OLDEST item
and counts it). Everything else happens here, off the engine thread — but not off its
GIL: whenever this thread runs Python, an engine thread returning from a kernel launch
or a collective waits for it. So it is given as little Python as possible per step,
wakes on a steady cadence rather than polling, and works in short slices:

1. drain the ring in order; a step timed with CUDA events waits until its end event
   has completed (``query()``, never ``synchronize()``; the GPU runs a stream in
   order, so waiting on the head is enough), then its device time is read and the
   event pair goes back to the pool;
2. append each frame to the backlog (a CUDA step gets its device time appended first;
   request events are encoded here, they are rare), which is
   bounded by count and by bytes (oldest dropped and counted when the sidecar is
   gone, so an outage costs bounded memory, never engine time);
3. connect (``unix:PATH`` / ``tcp:HOST:PORT``) with exponential backoff, 50 ms
   doubling to 2 s; on every (re)connection write EngineHello first, then re-announce
   every live request (ARRIVED, ``replayed=True``) so a restarted sidecar can name
   them, then a Heartbeat carrying the drop counts, then the backlog;
4. write the backlog as one batch per wake-up (every 20 ms, or at once for ``flush``)
   on a non-blocking socket; a batch the
   kernel cannot take at once is continued on the next wake-up (never a half frame
   followed by another frame), a sidecar that reads slowly only makes the buffers
   fill, and one that reads nothing for ``stall_timeout_s`` (the write timeout) is
   disconnected and reconnected.

The thread's own CPU time (``time.thread_time_ns``) is exported so the cost of the
hooks outside the engine thread is visible too.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import wire
from .constants import EventKind, TimerSource

log = logging.getLogger("enginetime.engine_hooks")

# Ring item codes (first element of every ring tuple).
STEP = 0
EVENT = 1
MARK = 2
REPEAT = 3

# Step item: (STEP, seq, device_handle, payload, cpu_ns). The engine thread encodes the step
#   itself as a packed step (wire.py's fixed layout, one struct.pack and one array): with
#   device_handle None, payload is the finished frame; with a CUDA event pair, the packed body
#   with its device time pending, which this thread fills in and frames (wire.wrap_packed)
#   once the pair has resolved. Either way one ``bytes``, which the
#   garbage collector does not track, and this thread's Python per step is a few list operations.
# Repeat item: (REPEAT, seq, device_handle, body, cpu_ns): a step whose batch is the previous
#   step's (wire.py, "repeat steps"); body is a packed header (device time pending with a CUDA
#   pair) and the peer column, expanded here into the full step against the previous one.
# Event item: (EVENT, LiveRequest, kind, time_ns, cached_tokens|None, finish_reason, output_tokens)
# Mark item: (MARK, FlushMarker)

_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 2.0
_MAX_BATCH_BYTES = 1 << 20
_MAX_BATCH_FRAMES = 1024
_MAX_REPLAYS_PER_BATCH = 256
# GIL manners. Torch releases the GIL inside every op, so whenever this thread is
# runnable it gets the GIL at the engine's next op, and a long stretch of Python work
# here would keep the engine thread waiting (up to the 5 ms switch interval per op).
# Work therefore comes in slices of at most _SLICE_NS, with a real sleep in between
# that hands the GIL back.
_SLICE_NS = 50_000
_YIELD_S = 0.0001
_CADENCE_S = 0.02  # steps reach the sidecar within this (flush() wakes the thread at once)
_RETRY_S = 0.01  # a CUDA event not yet reached by the GPU, a full socket
_STABLE_CONNECTION_S = 1.0
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


#: Memory a step item holds beside its payload (tuple, ints, deque slot).
STEP_OVERHEAD = 200


def item_bytes(item: tuple) -> int:
    """Approximate memory a ring item holds (the ring is bounded by it as well as by count)."""
    code = item[0]
    if code == STEP or code == REPEAT:
        return STEP_OVERHEAD + len(item[3])
    if code == EVENT:
        return 300 + len(item[5] or "")
    return 200


class LiveRequest:
    """What the recorder remembers about a request until FINISHED/ABORTED.

    The ARRIVED fields are kept as they were first reported, so a replay after a
    reconnect says exactly what the original said. ``queued`` is True while the
    original ARRIVED frame is still waiting in the ring/backlog (then a replay would
    only duplicate it); ``live`` turns False at FINISHED/ABORTED.
    """

    __slots__ = (
        "handle",
        "request_id",
        "time_ns",
        "prompt_tokens",
        "cached_tokens",
        "session_id",
        "traceparent",
        "routed_shard",
        "queued",
        "live",
    )

    def __init__(
        self,
        handle: int,
        request_id: str,
        time_ns: int,
        prompt_tokens: int,
        cached_tokens: int,
        session_id: str,
        traceparent: str,
        routed_shard: int | None,
    ) -> None:
        self.handle = handle
        self.request_id = request_id
        self.time_ns = time_ns
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.session_id = session_id
        self.traceparent = traceparent
        self.routed_shard = routed_shard
        self.queued = True
        self.live = True

    def arrived_frame(self, replayed: bool) -> bytes:
        return wire.frame_event(
            handle=self.handle,
            kind=EventKind.ARRIVED,
            time_ns=self.time_ns,
            request_id=self.request_id,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            session_id=self.session_id,
            traceparent=self.traceparent,
            routed_shard=self.routed_shard,
            replayed=replayed,
        )


class FlushMarker:
    """Put in the ring by ``flush()``; set once everything before it is written (or lost)."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False

    def done(self, ok: bool) -> None:
        self.ok = ok
        self.event.set()


class ErrorLog:
    """Counts errors from any thread; logs the first of each kind, then stays quiet.

    Hooks run in the engine's hot loop: a bug that repeats every step must not turn
    into a log line per step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.count = 0

    def report(self, kind: str, detail: object, *, level: int = logging.WARNING) -> None:
        try:
            with self._lock:
                self.count += 1
                first = kind not in self._seen
                self._seen.add(kind)
            if first:
                exc = detail if isinstance(detail, BaseException) else None
                log.log(
                    level,
                    "enginetime hooks: %s: %s (counted in stats().errors; logged once)",
                    kind,
                    detail,
                    exc_info=exc,
                )
        except Exception:  # pragma: no cover - logging itself failed
            pass


class Shipper:
    """Owns the ring, the backlog, the socket and the background thread."""

    def __init__(
        self,
        *,
        address: str,
        target: tuple[str, Any] | None,
        hello: Callable[[], bytes],
        live: Callable[[], list[LiveRequest]],
        timer: Any,
        errors: ErrorLog,
        capacity: int = 65536,
        backlog_bytes: int = 64 << 20,
        heartbeat_interval_s: float = 1.0,
        connect_timeout_s: float = 1.0,
        stall_timeout_s: float = 10.0,
        tls: Any = None,
    ) -> None:
        self.address = address
        self._target = target
        self._hello = hello
        self._live = live
        self._timer = timer
        self._errors = errors
        self.capacity = max(1, int(capacity))
        # ``backlog_bytes`` bounds the ring and the backlog together, half each: the engine
        # process's memory for records in flight stays under it even while the sidecar is away.
        self._backlog_bytes_cap = max(1, int(backlog_bytes) // 2)
        self._heartbeat_interval = max(0.01, float(heartbeat_interval_s))
        self._connect_timeout = connect_timeout_s
        self._stall_timeout = stall_timeout_s

        #: Producers append here (engine thread, request threads). Unbounded deque with
        #: an explicit check so a drop can be counted by kind and its CUDA pair reused.
        self.ring: deque[tuple] = deque()
        #: Approximate memory the ring holds (item_bytes of each item), bounded by half of backlog_bytes
        #: like the backlog: many big steps must not grow the engine process without bound.
        self.ring_bytes = 0
        self.ring_bytes_cap = max(1, int(backlog_bytes) - self._backlog_bytes_cap)
        self._bytes_lock = threading.Lock()
        self._tls = tls  # ssl.SSLContext for tcp: ingest over TLS
        # A write to a Unix socket whose peer has gone fails at once (EPIPE); a TCP write
        # vanishes silently, so only TCP peeks for the peer's close before each batch.
        self._tcp = target is not None and target[0] == "tcp"
        self._drop_lock = threading.Lock()
        self.dropped_steps = 0
        self.dropped_events = 0
        #: Steps lost before they were expanded (a repeat after one cannot be): the recorder
        #: sends a full step once this moves.
        self.chain_breaks = 0

        # Shipper-thread state.
        self._base: bytes | None = None  # the last step frame, what a repeat expands against
        self._held: tuple | None = None  # ring head whose CUDA end event has not completed
        self._backlog: deque[tuple[int, bytes, Any]] = deque()  # (code, frame, ref)
        self._backlog_size = 0
        self._needs_announce: deque[LiveRequest] = deque()  # live requests whose ARRIVED was dropped
        self._replays: deque[LiveRequest] = deque()  # replayed ARRIVEDs still to write
        self._sock: socket.socket | None = None
        self._conn_id = 0
        self._connected_at = 0.0
        self._send_hello = False
        self._announce_all = False
        self._next_heartbeat = 0.0
        self._next_attempt = 0.0
        self._backoff = _BACKOFF_START_S
        self._outage_since: float | None = None
        self._outage_logged = False
        self._out: memoryview | None = None  # the batch being written
        self._out_meta: tuple[int, int, int, list[FlushMarker], list[LiveRequest]] | None = None
        self._last_progress = 0.0
        self._stall_logged = False

        self.sent_frames = 0
        self.reconnects = 0
        self.connections = 0
        self.resolve_fallbacks = 0
        self.cpu_ns = 0

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ producers

    def push(self, item: tuple) -> None:
        """Append an item, dropping the oldest when the ring is full (any thread)."""
        size = item_bytes(item)
        ring = self.ring
        while ring and (len(ring) >= self.capacity or self.ring_bytes + size > self.ring_bytes_cap):
            self.overflow()
        self.add_ring_bytes(size)
        ring.append(item)

    def add_ring_bytes(self, size: int) -> None:
        with self._bytes_lock:
            self.ring_bytes += size

    def overflow(self) -> None:
        """Drop the oldest ring item and count it (called by a producer when full)."""
        try:
            old = self.ring.popleft()
        except IndexError:  # the shipper emptied it meanwhile
            return
        self.add_ring_bytes(-item_bytes(old))
        self._lost_item(old)

    def chain_mark(self) -> int:
        """Moves whenever a step was lost before this shipper expanded what follows it."""
        return self.chain_breaks

    def count_dropped(self, steps: int = 0, events: int = 0) -> None:
        with self._drop_lock:
            self.dropped_steps += steps
            self.dropped_events += events

    def _lost_item(self, item: tuple) -> None:
        code = item[0]
        if code == STEP or code == REPEAT:
            self.chain_breaks += 1
            self.count_dropped(steps=1)
            dev = item[2]
            if dev is not None:
                try:
                    self._timer.release(dev)
                except Exception as exc:
                    self._errors.report("release CUDA event pair", exc)
        elif code == EVENT:
            self.count_dropped(events=1)
            info: LiveRequest = item[1]
            if item[2] == EventKind.ARRIVED:
                self._arrived_lost(info)
        elif code == MARK:
            item[1].done(False)

    def _arrived_lost(self, info: LiveRequest) -> None:
        info.queued = False
        if info.live:
            self._needs_announce.append(info)

    # ------------------------------------------------------------------ control

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def pending(self) -> int:
        out = self._out_meta[0] if self._out_meta is not None else 0
        return len(self.ring) + len(self._backlog) + (1 if self._held is not None else 0) + out

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="enginetime-shipper", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every item queued before this call is written to the socket."""
        if not self.running:
            return False
        marker = FlushMarker()
        self.push((MARK, marker))
        self._wake.set()
        marker.event.wait(max(0.0, timeout_s))
        return marker.ok

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, timeout_s))

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self._wake.clear()
            try:
                waiting_on_gpu, more = self._drain(force=stopping)
                now = time.monotonic()
                if self._sock is None and self._target is not None and now >= self._next_attempt:
                    self._connect(now)
                if self._sock is not None:
                    more = self._write(time.monotonic()) or more
            except Exception as exc:  # a bug here must not kill the thread: count, back off
                self._errors.report("shipper loop", exc)
                waiting_on_gpu, more = False, False
                self._stop.wait(0.05)
            self.cpu_ns = time.thread_time_ns()
            if stopping:
                break
            if more:
                time.sleep(_YIELD_S)  # let the engine thread have the GIL between slices
                continue
            self._wake.wait(self._sleep_time(waiting_on_gpu))
        self._close_socket()
        self._fail_leftover_markers()
        self.cpu_ns = time.thread_time_ns()

    def _sleep_time(self, waiting_on_gpu: bool) -> float:
        """How long to idle: short while the GPU or the socket owes us, longer when quiet."""
        # Every wake-up takes the GIL at least once, and when the engine thread is running
        # Python then, it waits for the next switch interval and then for this thread: so
        # this thread wakes at a steady cadence and does everything in one go, never polls.
        if waiting_on_gpu or self._out is not None:  # the GPU or the socket owes us: come back soon
            return _RETRY_S
        now = time.monotonic()
        timeout = _CADENCE_S
        if self._sock is not None:
            timeout = min(timeout, self._next_heartbeat - now)
        elif self._target is not None:
            timeout = min(timeout, self._next_attempt - now)
        return max(0.0005, timeout)

    def _fail_leftover_markers(self) -> None:
        for entry in self._backlog:
            if entry[0] == MARK:
                entry[2].done(False)
        for item in self.ring:
            if item[0] == MARK:
                item[1].done(False)

    # ------------------------------------------------------------------ ring -> backlog

    def _drain(self, force: bool = False) -> tuple[bool, bool]:
        """Move ring items to the backlog as frames, for at most one slice of time.

        Returns (the head waits on the GPU, items are left for the next slice).
        ``force`` (shutdown) drains everything and reads no CUDA event that is not done.
        """
        ring = self.ring
        deadline = time.perf_counter_ns() + _SLICE_NS
        while True:
            if not force and time.perf_counter_ns() > deadline:
                return False, bool(ring) or self._held is not None
            item = self._held
            if item is None:
                try:
                    item = ring.popleft()
                except IndexError:
                    return False, False
                self.add_ring_bytes(-item_bytes(item))
            code = item[0]
            if code == STEP or code == REPEAT:
                dev = item[2]
                if dev is None:  # encoded whole on the engine thread
                    self._held = None
                    if code == STEP:
                        self._base = item[3]
                        self._append(STEP, item[3], None)
                    else:
                        self._repeat_to_backlog(item[3])
                    continue
                if not force:
                    try:
                        ready = self._timer.ready(dev)
                    except Exception as exc:
                        self._errors.report("CUDA event query", exc)
                        ready = True  # resolve() fails too and the step falls back to CPU time
                    if not ready:
                        self._held = item
                        return True, False
                self._held = None
                self._step_to_backlog(item)
            elif code == EVENT:
                self._held = None
                self._event_to_backlog(item)
            else:
                self._held = None
                self._append(MARK, b"", item[1])

    def _step_to_backlog(self, item: tuple) -> None:
        """Finish a step timed with CUDA events: its device time (or the CPU fallback) goes last."""
        code, _seq, dev, body, cpu_ns = item
        duration = cpu_ns
        source = TimerSource.MONOTONIC
        ns = None
        try:
            ns = self._timer.resolve(dev)
        except Exception as exc:
            self._errors.report("CUDA event elapsed_time", exc)
        try:
            self._timer.release(dev)
        except Exception as exc:
            self._errors.report("release CUDA event pair", exc)
        if ns is None:
            self.resolve_fallbacks += 1
        else:
            duration = ns
            source = TimerSource.CUDA_EVENT
        try:
            if code == REPEAT:
                body = wire.fill_device(body, duration, source)
            else:
                frame = wire.wrap_packed(body, duration, source)
        except Exception as exc:
            self.chain_breaks += 1
            self.count_dropped(steps=1)
            self._errors.report("invalid step record dropped", exc)
            return
        if code == REPEAT:
            self._repeat_to_backlog(body)
        else:
            self._base = frame
            self._append(STEP, frame, None)

    def _repeat_to_backlog(self, body: bytes) -> None:
        """Expand a repeat against the step before it; without that step it is lost, counted."""
        base = self._base
        try:
            if base is None:
                raise ValueError(f"repeat step seq {wire.repeat_seq(body)} has no step before it here")
            frame = wire.expand_repeat(base, body)
        except Exception as exc:
            self._base = None
            self.chain_breaks += 1
            self.count_dropped(steps=1)
            self._errors.report("repeat step dropped (the step before it was lost)", exc)
            return
        self._base = frame
        self._append(STEP, frame, None)

    def _event_to_backlog(self, item: tuple) -> None:
        _, info, kind, time_ns, cached, reason, output = item
        try:
            if kind == EventKind.ARRIVED:
                frame = info.arrived_frame(replayed=False)
                ref = info
            else:
                frame = wire.frame_event(
                    handle=info.handle,
                    kind=kind,
                    time_ns=time_ns,
                    request_id=info.request_id,
                    cached_tokens=cached or 0,
                    finish_reason=reason,
                    output_tokens=output,
                )
                ref = None
        except Exception as exc:
            self.count_dropped(events=1)
            if kind == EventKind.ARRIVED:
                info.queued = False
            self._errors.report("invalid request event dropped", exc)
            return
        self._append(EVENT, frame, ref)

    def _append(self, code: int, frame: bytes, ref: Any) -> None:
        backlog = self._backlog
        backlog.append((code, frame, ref))
        self._backlog_size += len(frame)
        while len(backlog) > self.capacity or self._backlog_size > self._backlog_bytes_cap:
            old_code, old_frame, old_ref = backlog.popleft()
            self._backlog_size -= len(old_frame)
            self._lost_frame(old_code, old_ref)

    def _lost_frame(self, code: int, ref: Any) -> None:
        if code == STEP:
            self.count_dropped(steps=1)
        elif code == EVENT:
            self.count_dropped(events=1)
            if ref is not None:
                self._arrived_lost(ref)
        elif code == MARK:
            ref.done(False)

    # ------------------------------------------------------------------ socket

    def _connect(self, now: float) -> None:
        family, target = self._target  # type: ignore[misc]
        sock: socket.socket | None = None
        try:
            if family == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._connect_timeout)
                sock.connect(target)
            else:
                host, port = target
                sock = socket.create_connection((host, port), timeout=self._connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._tls is not None:  # handshake now, still blocking (bounded by the timeout)
                    sock = self._tls.wrap_socket(sock, server_hostname=host)
            # Non-blocking from here on: a sidecar that reads slowly must not hold up this
            # thread (it still has CUDA events to resolve); unwritten bytes wait for the next pass.
            sock.setblocking(False)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._outage(now, f"cannot connect: {exc}")
            self._next_attempt = now + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
            return
        self._sock = sock
        self.connections += 1
        if self.connections > 1:
            self.reconnects += 1
        self._conn_id += 1
        self._connected_at = now
        self._last_progress = now
        self._send_hello = True
        self._announce_all = True
        self._next_heartbeat = now  # first heartbeat right after hello + replay: the drop counts
        if self._outage_logged:
            log.warning(
                "enginetime hooks: connected to the sidecar at %s after %.1f s; %d steps and %d request "
                "events dropped so far",
                self.address,
                now - (self._outage_since or now),
                self.dropped_steps,
                self.dropped_events,
            )
        self._outage_since = None
        self._outage_logged = False
        self._stall_logged = False

    def _outage(self, now: float, why: str) -> None:
        if self._outage_since is None:
            self._outage_since = now
        if not self._outage_logged:
            self._outage_logged = True
            log.warning(
                "enginetime hooks: %s (sidecar at %s). Buffering up to %d records and dropping the oldest "
                "(counted) until it is reachable; retrying with backoff up to %.0f s. Is `enginetime "
                "sidecar` running with --ingest %s (or ENGINETIME_INGEST set to the same address)?",
                why,
                self.address,
                self.capacity,
                _BACKOFF_MAX_S,
                self.address,
            )

    def _disconnect(self, now: float, why: str) -> None:
        """Drop the connection; the in-flight batch is lost (the peer is gone) and counted."""
        self._close_socket()
        if self._out_meta is not None:
            _frames, steps, events, markers, arrivals = self._out_meta
            self.count_dropped(steps=steps, events=events)
            for marker in markers:
                marker.done(False)
            for info in arrivals:
                self._arrived_lost(info)
        self._out = None
        self._out_meta = None
        self._replays.clear()  # the next connection re-announces every live request anyway
        if now - self._connected_at >= _STABLE_CONNECTION_S:
            self._backoff = _BACKOFF_START_S
            self._next_attempt = now
        else:  # connections that die at once (sidecar refusing us) must not become a tight loop
            self._next_attempt = now + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
        self._outage(now, why)

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _peer_closed(self) -> bool:
        """Has the sidecar closed its end? (A TCP write after that would vanish silently.)"""
        try:
            if self._tls is not None:  # TLS sockets cannot peek; the sidecar never sends data
                return self._sock.recv(1) == b""  # type: ignore[union-attr]
            return self._sock.recv(1, _PEEK_FLAGS) == b""  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:
            return True

    def _build_batch(self, now: float) -> None:
        parts: list[bytes] = []
        frames = steps = events = 0
        markers: list[FlushMarker] = []
        arrivals: list[LiveRequest] = []
        if self._send_hello:
            parts.append(self._hello())
            frames += 1
            self._send_hello = False
        if self._announce_all:
            self._announce_all = False
            self._needs_announce.clear()
            self._replays = deque(info for info in self._live() if not info.queued)
        while self._needs_announce:
            self._replays.append(self._needs_announce.popleft())
        replays = self._replays
        for _ in range(min(len(replays), _MAX_REPLAYS_PER_BATCH)):
            info = replays.popleft()
            if not info.live or info.queued:
                continue
            try:
                parts.append(info.arrived_frame(replayed=True))
                frames += 1
            except Exception as exc:
                self._errors.report("replayed ARRIVED not encodable", exc)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self._heartbeat_interval
            parts.append(self._heartbeat_frame())
            frames += 1
        size = sum(len(p) for p in parts)
        backlog = self._backlog
        # Replays go before anything that may name their handles: the backlog waits for them.
        while backlog and not replays and size < _MAX_BATCH_BYTES and frames < _MAX_BATCH_FRAMES:
            code, frame, ref = backlog.popleft()
            self._backlog_size -= len(frame)
            if code == MARK:
                markers.append(ref)
                continue
            parts.append(frame)
            size += len(frame)
            frames += 1
            if code == STEP:
                steps += 1
            else:
                events += 1
                if ref is not None:
                    arrivals.append(ref)
        if parts or markers:
            self._out = memoryview(b"".join(parts))
            self._out_meta = (frames, steps, events, markers, arrivals)
            self._last_progress = now  # the stall clock runs from the start of each batch

    def _heartbeat_frame(self) -> bytes:
        with self._drop_lock:
            steps, events = self.dropped_steps, self.dropped_events
        return wire.frame_heartbeat(
            time_ns=time.time_ns(),
            dropped_frames=steps + events,
            dropped_steps=steps,
            dropped_events=events,
            sent_frames=self.sent_frames,
            reconnects=self.reconnects,
        )

    def _write(self, now: float) -> bool:
        """Write (part of) one batch; True when more is ready to go at once."""
        if self._out is None:
            if not (
                self._backlog
                or self._send_hello
                or self._announce_all
                or self._needs_announce
                or self._replays
                or now >= self._next_heartbeat
            ):
                return False  # nothing to write: no syscall either
            if self._tcp and self._peer_closed():
                self._disconnect(now, "the sidecar closed the connection")
                return False
            self._build_batch(now)
            if self._out is None:
                return False
        sock = self._sock
        out = self._out
        while out:
            try:
                if self._tls is not None:
                    n = sock.send(out)  # type: ignore[union-attr]
                else:
                    n = sock.send(out, _MSG_NOSIGNAL)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._out = out
                if now - self._last_progress > self._stall_timeout:
                    self._disconnect(now, f"the sidecar has not read for {self._stall_timeout:.0f} s")
                elif not self._stall_logged and now - self._last_progress > 1.0:
                    self._stall_logged = True
                    log.warning(
                        "enginetime hooks: the sidecar at %s is reading slowly; records are "
                        "buffering and the oldest will be dropped (counted)",
                        self.address,
                    )
                return False
            except OSError as exc:
                self._disconnect(now, f"lost the connection: {exc}")
                return False
            out = out[n:]
            now = time.monotonic()
            self._last_progress = now
        frames, _steps, _events, markers, arrivals = self._out_meta  # type: ignore[misc]
        self._out = None
        self._out_meta = None
        self.sent_frames += frames
        for info in arrivals:
            info.queued = False
        for marker in markers:
            marker.done(True)
        return bool(self._backlog or self._needs_announce or self._replays)
