"""Span export in a process of its own, so the OpenTelemetry SDK never competes with ingest.

Building spans with the SDK and encoding them for OTLP costs a few hundred
microseconds of Python per request; in the sidecar's process that time would be
taken from the event loop (one GIL), and at a few thousand finished requests
per second ingest would slow down by half. So the sidecar process does only
what needs the ledger — the settled record of each finished request
(``Ledger.finished_record``: plain tuples, ~10 us to build, ~2 us to pickle) —
and hands batches of them to a child process over a pipe. The child
runs ``RequestTracer`` (SDK tracer, BatchSpanProcessor, OTLP exporter) on
another core.

Nothing here can block the event loop: ``submit`` appends to a bounded deque; a
sender thread pickles and writes to the pipe (a full pipe blocks that thread
only). The child publishes its counters in shared memory, which /metrics reads
without asking it. When the child is gone (crashed, killed) spans are dropped
and counted as ``exporter_down`` and it is started again at most once every
``RESTART_INTERVAL_S``; on shutdown the pipe is closed and the child exports
what it has within ``flush_s``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from enginetime.sidecar.ledger.trace import record_to_trace
from enginetime.sidecar.telemetry.tracing import (
    DROP_BACKLOG,
    DROP_EXPORTER_DOWN,
    DROP_REASONS,
    DROP_SHUTDOWN,
    ExportTarget,
    RequestTracer,
    SpanCounters,
    TracingConfig,
    make_exporter,
    span_count,
)

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import SpawnProcess

log = logging.getLogger("enginetime.sidecar.spans")

#: Shared counters, written by the child (int64 each).
_FIELDS = (
    "requests",
    "created",
    "unsampled",
    "links",
    "exported",
    *(f"dropped_{r}" for r in DROP_REASONS),
    "ready",  # 1 once the child has its tracer and reads the pipe
)
_INDEX = {name: i for i, name in enumerate(_FIELDS)}
#: Finished requests per pipe message.
_MESSAGE = 512
RESTART_INTERVAL_S = 30.0


def _publish(shared, tracer: RequestTracer) -> None:
    c = tracer.counters
    shared[_INDEX["requests"]] = c.requests
    shared[_INDEX["created"]] = c.created
    shared[_INDEX["unsampled"]] = c.unsampled
    shared[_INDEX["links"]] = c.links
    shared[_INDEX["exported"]] = tracer.exported
    for reason, n in c.dropped.items():
        shared[_INDEX[f"dropped_{reason}"]] = n


def _child_main(
    conn, shared, config: TracingConfig, target: ExportTarget, log_level: str, flush_s: float
) -> None:
    """The span export process: pipe -> RequestTracer -> OTLP, until the pipe closes."""
    # Signals are for the sidecar: it closes the pipe when it stops, and then we flush.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Span export yields to ingest when the cores are busy: it may fall behind, ingest may not.
    with contextlib.suppress(OSError):
        os.nice(19)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    tracer = RequestTracer(config, target)
    shared[_INDEX["ready"]] = 1
    done = threading.Event()

    def publisher() -> None:
        while not done.wait(0.1):
            _publish(shared, tracer)

    threading.Thread(target=publisher, name="enginetime-span-counters", daemon=True).start()
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            break
        tracer.submit([record_to_trace(r) for r in pickle.loads(data)])
    tracer.shutdown(flush_s)
    done.set()
    _publish(shared, tracer)


class SpanExportProcess:
    """The sidecar's side of the span export process; same surface as ``RequestTracer``.

    ``submit`` runs on the event loop; ``counters``/``exported`` may be read from
    any thread.
    """

    def __init__(
        self, config: TracingConfig, target: ExportTarget, *, log_level: str = "INFO", flush_s: float = 5.0
    ) -> None:
        # Build (and discard) the exporter here, so a bad setting fails the sidecar's start
        # with the SDK's own message instead of a child that dies alone.
        make_exporter(target).shutdown()
        self.config = config
        self.target = target
        self._log_level = log_level
        self._flush_s = flush_s
        self._ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self._shared = self._ctx.Array("q", len(_FIELDS), lock=False)
        self._base = dict.fromkeys(_FIELDS, 0)  # counts of children that already exited
        self._dropped = dict.fromkeys(DROP_REASONS, 0)  # this side's drops
        #: (pipe message, the records in it: counted when the message cannot be delivered)
        self._pending: deque[tuple[bytes, list[tuple]]] = deque()
        self._pending_n = 0
        self._cv = threading.Condition()
        self._closing = False
        self._conn: Connection | None = None
        self._proc: SpawnProcess | None = None
        self._started_at = 0.0
        self._spawn()
        self._sender = threading.Thread(target=self._send_loop, name="enginetime-span-sender", daemon=True)
        self._sender.start()

    # -- the child ---------------------------------------------------------------------------

    def _spawn(self) -> None:
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_child_main,
            args=(recv, self._shared, self.config, self.target, self._log_level, self._flush_s),
            name="enginetime-span-export",
            daemon=True,
        )
        proc.start()
        recv.close()
        self._conn, self._proc = send, proc
        self._started_at = time.monotonic()

    def _retire_child(self) -> None:
        """The child is gone: fold its counters into the base, zero the shared ones."""
        for name in _FIELDS:
            if name != "ready":
                self._base[name] += int(self._shared[_INDEX[name]])
            self._shared[_INDEX[name]] = 0
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until the export process has started (imports and exporter built): benchmarks."""
        deadline = time.monotonic() + timeout_s
        while not self._shared[_INDEX["ready"]]:
            if not self.alive or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- figures ----------------------------------------------------------------------------------

    def _value(self, name: str) -> int:
        return self._base[name] + int(self._shared[_INDEX[name]])

    @property
    def counters(self) -> SpanCounters:
        dropped = {r: self._value(f"dropped_{r}") + self._dropped[r] for r in DROP_REASONS}
        return SpanCounters(
            requests=self._value("requests"),
            created=self._value("created"),
            unsampled=self._value("unsampled"),
            links=self._value("links"),
            dropped=dropped,
        )

    @property
    def exported(self) -> int:
        return self._value("exported")

    # -- event loop side -------------------------------------------------------------------------

    def submit(self, traces: list[tuple]) -> None:
        """Queue finished records (``Ledger.finished_record``) for the export process; never blocks.

        Pickling happens here, on the event loop, within the finished feed's time
        budget: a sender thread pickling big batches would hold the GIL in long
        stretches that ingest would wait out.
        """
        with self._cv:
            if self._closing:
                self._drop(DROP_SHUTDOWN, traces)
                return
            room = self.config.backlog - self._pending_n
        if room < len(traces):
            self._drop(DROP_BACKLOG, traces[max(room, 0) :])
            traces = traces[: max(room, 0)]
        if not traces:
            return
        parts = [traces[i : i + _MESSAGE] for i in range(0, len(traces), _MESSAGE)]
        messages = [(pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL), part) for part in parts]
        with self._cv:
            self._pending.extend(messages)
            self._pending_n += len(traces)
            self._cv.notify()

    def _drop(self, reason: str, records: list[tuple]) -> None:
        self._dropped[reason] += sum(span_count(record_to_trace(r)) for r in records)

    # -- sender thread ------------------------------------------------------------------------

    def _send_loop(self) -> None:
        warned = False
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending:
                    return
                data, part = self._pending.popleft()
                self._pending_n -= len(part)
            if not self._ensure_child():
                self._drop(DROP_EXPORTER_DOWN, part)
                continue
            conn = self._conn
            assert conn is not None  # _ensure_child() said the child is up
            try:
                conn.send_bytes(data)  # blocks (GIL released) while the child is behind
            except (OSError, EOFError, ValueError):
                self._drop(DROP_EXPORTER_DOWN, part)
                if not warned:
                    warned = True
                    log.error(
                        "the span export process (pid %s) is gone; spans are dropped and counted "
                        '(enginetime_spans_dropped_total{reason="exporter_down"}) until it is restarted',
                        self._proc.pid if self._proc else "?",
                    )
            else:
                warned = False

    def _ensure_child(self) -> bool:
        """True when the child runs (started again if it died long enough ago)."""
        if self.alive:
            return True
        proc = self._proc
        if proc is not None:
            proc.join(0)
            if self._conn is not None:  # first sight of this death
                self._retire_child()
                log.error(
                    "the span export process (pid %s) exited with code %s; spans are dropped and counted "
                    '(enginetime_spans_dropped_total{reason="exporter_down"}); it is started again '
                    "for spans that arrive %gs or more after its last start",
                    proc.pid,
                    proc.exitcode,
                    RESTART_INTERVAL_S,
                )
            if time.monotonic() - self._started_at < RESTART_INTERVAL_S:
                return False
            log.warning("restarting the span export process")
        self._spawn()
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, let the child export within ``timeout_s``, count what is lost."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._sender.join(max(0.1, deadline - time.monotonic()))
        if self._conn is not None:
            self._conn.close()  # EOF: the child flushes and exits
            self._conn = None
        proc = self._proc
        if proc is None:
            return
        # The child needs flush_s for the collector plus a moment to start and stop.
        proc.join(max(0.5, deadline - time.monotonic()) + 2.0)
        if proc.is_alive():
            log.warning("the span export process did not stop in time; killing it")
            proc.kill()
            proc.join(2.0)
            lost = self._value("created") - self._value("exported") - self._value("dropped_export_failed")
            lost -= self._value("dropped_shutdown")
            if lost > 0:
                self._dropped[DROP_SHUTDOWN] += lost
        with self._cv:
            left = [t for _, part in self._pending for t in part]
            self._pending.clear()
        self._drop(DROP_SHUTDOWN, left)


__all__ = ["RESTART_INTERVAL_S", "SpanExportProcess"]
