"""Ingest limits and the helpers that keep hostile or broken peers cheap.

Every limit here is a flag of ``enginetime sidecar`` (see docs/SECURITY.md): a peer
that crosses one is refused or closed alone, the refusal is counted in /metrics, and
the log line about it is written at most once a second per kind (a flood of bad
peers must not become a flood of log lines).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

#: Longest id or text field (request, session and engine ids, traceparent, reasons) kept
#: as sent, in UTF-8 bytes. Longer ones are clipped to a prefix plus a hash (clip_text).
MAX_TEXT_BYTES = 512
#: Most characters of any id quoted in an error message or log line.
QUOTE_CHARS = 200
#: Times (wall clock, ns since the epoch) must lie in [0, TIME_MAX_NS): year 2116 and
#: below, so differences and sums of them never overflow int64.
TIME_MAX_NS = 1 << 62
#: Longest step device time accepted: no forward pass takes an hour, and sums of a
#: million such steps still fit in int64.
MAX_DURATION_NS = 3600 * 10**9
#: Largest frame a connection may declare before its EngineHello (a hello is < 2 KiB).
PRE_HELLO_FRAME_BYTES = 16 * 1024

#: Longest stretch of ledger work (attributing frames) per event-loop callback. Ingest
#: shares the loop with the gRPC server: a read of 256 KiB of steps took 4-13 ms to
#: attribute in one callback, and every unary call that arrived meanwhile waited for it
#: (Advise p99 5.4 ms under 300k entries/s). Frames are decoded as they are read, queued
#: in arrival order, and fed to the ledger in slices of this length; between slices the
#: loop serves whatever else is ready. One frame is never split (a lockstep group of
#: 8 x 256 entries is attributed by the frame that completes it, ~1 ms).
DISPATCH_SLICE_S = 0.0005  # the default of SidecarConfig.ingest_slice_s (--ingest-slice)
#: A ready slice waits behind other ready loop work (a gRPC call's next step) for at most
#: this many slices' time, so callers go first without being able to starve ingest.
INGEST_YIELD_SLICES = 4


@dataclass
class IngestLimits:
    """Per-peer limits of the ingest server (``enginetime sidecar`` flags)."""

    #: Open ingest connections; more are closed at once (``too_many_connections``).
    max_connections: int = 1024
    #: Seconds a connection may stay open without a valid EngineHello (``hello_timeout``).
    hello_timeout_s: float = 10.0
    #: Bytes of half-received frames, all connections together (``buffer_limit``). One
    #: connection buffers at most one frame (--max-frame-bytes).
    max_buffered_bytes: int = 256 * 1024 * 1024
    #: Longest id/text field kept as sent (longer: clipped to a prefix plus a hash).
    max_text_bytes: int = MAX_TEXT_BYTES
    #: Live (arrived, not finished) requests per shard (``too_many_live``).
    max_live_per_shard: int = 65536
    #: Distinct engine ids the ledger holds (``too_many_engines``).
    max_engines: int = 256
    #: Largest num_shards a hello may claim (``bad_hello``).
    max_shards: int = 1024


def clip_text(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """``text`` if it fits in ``limit`` UTF-8 bytes, else a prefix + ``…#`` + 16 hex of its sha256.

    Deterministic, so the API applies the same rule to an id it is asked about and a
    client that sends the full long id still finds its request.
    """
    if len(text) * 4 <= limit:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    digest = hashlib.sha256(raw).hexdigest()[:16]
    keep = raw[: max(0, limit - 20)].decode("utf-8", "ignore")
    return f"{keep}…#{digest}"


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """``repr(text)``, cut to about ``limit`` characters for messages and logs."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"…({len(text)} characters)"


class RateLimitedLog:
    """Logs each kind of message at most once per ``interval_s``; counts the rest.

    The next line of a kind says how many were suppressed since the last one.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        if skipped:
            msg += f" [{skipped} more like this in the last {self.interval_s:g}s not logged]"
        self.logger.log(level, msg, *args)
        return True
