"""The shipper process: reads a recorder's shared-memory ring and ships it to the sidecar.

Spawned by ``Recorder`` (one per recorder) so that no thread of ours runs in the engine's
interpreter: the engine's threads only copy records into the ring (``shm_ring.py``).
Here, on its own GIL, the shipper of ``shipper.py`` does what it did as a thread —
socket, reconnect with backoff, hello, replay of live requests, heartbeats with drop
counts, a backlog bounded in bytes that drops the oldest during an outage — fed from
the ring instead of an in-process deque. It keeps its own table of live requests from
the ARRIVED/FINISHED/ABORTED records it forwards, which is what it replays after a
reconnect.

It exits when the recorder closes the wake pipe (``Recorder.close``, or the engine
process dying: the kernel closes the pipe then) after shipping what is left, and also
when its parent process is gone. Command line (built by the recorder)::

    python -c <bootstrap> --ring-fd N --wake-fd M --address unix:/path [--tls-ca PATH] ...
"""

from __future__ import annotations

import argparse
import logging
import marshal
import os
import sys
import threading
import time
from typing import Any

from . import shm_ring, wire
from .constants import EventKind
from .shipper import EVENT, MARK, REPEAT, STEP, FlushMarker, LiveRequest, Shipper
from .timers import CpuTimer

log = logging.getLogger("enginetime.engine_hooks")

_PARENT_CHECK_S = 0.5
_TERMINAL = (int(EventKind.FINISHED), int(EventKind.ABORTED))
_ARRIVED = int(EventKind.ARRIVED)


class RingFlushMarker(FlushMarker):
    """A recorder's flush() waiting in the other process: acknowledged through the ring header."""

    __slots__ = ("shipper", "mark_id")

    def __init__(self, shipper: RingShipper, mark_id: int) -> None:
        super().__init__()
        self.shipper = shipper
        self.mark_id = mark_id

    def done(self, ok: bool) -> None:
        super().done(ok)
        sh = self.shipper
        sh._publish()  # the recorder reads its stats right after a flush: make them current first
        shm_ring.put(sh._mm, shm_ring.FLUSH_DONE_OK, 1 if ok else 0)
        shm_ring.put(sh._mm, shm_ring.FLUSH_DONE_ID, self.mark_id)


class RingShipper(Shipper):
    """A Shipper whose producer is the ring: every pass pulls new records first."""

    def __init__(self, mm: Any, **kwargs: Any) -> None:
        self._mm = mm
        self._reader = shm_ring.RingReader(mm)
        self._hello_fields: dict[str, Any] | None = None
        self._live_by_handle: dict[int, LiveRequest] = {}
        self._producer_steps = 0
        self._producer_events = 0
        self._passes = 0
        super().__init__(hello=self._hello_now, live=self._live_now, timer=CpuTimer(), **kwargs)
        shm_ring.put(mm, shm_ring.CONSUMER_PID, os.getpid())

    # ------------------------------------------------------------------ the producer's side

    def _hello_now(self) -> bytes:
        fields = dict(self._hello_fields or {})
        fields["wall_time_ns"] = time.time_ns()
        fields["monotonic_ns"] = time.monotonic_ns()
        return wire.frame_hello(**fields)

    def _live_now(self) -> list[LiveRequest]:
        return list(self._live_by_handle.values())

    def _drain(self, force: bool = False) -> tuple[bool, bool]:
        self._pull()
        result = super()._drain(force)
        self._publish()
        return result

    def _connect(self, now: float) -> None:
        if self._hello_fields is None:  # nothing to say who we are yet: wait for the recorder's HELLO
            self._next_attempt = now + 0.01
            return
        super()._connect(now)

    def _pull(self) -> None:
        mm = self._mm
        steps = shm_ring.get(mm, shm_ring.PRODUCER_DROPPED_STEPS)
        events = shm_ring.get(mm, shm_ring.PRODUCER_DROPPED_EVENTS)
        if steps != self._producer_steps or events != self._producer_events:
            self.count_dropped(steps=steps - self._producer_steps, events=events - self._producer_events)
            self._producer_steps, self._producer_events = steps, events
        while True:
            try:
                records = self._reader.records()
            except ValueError as exc:
                self._errors.report("corrupt shared-memory ring", exc, level=logging.ERROR)
                self._reader.pos = shm_ring.get(mm, shm_ring.WRITE_POS)
                self._reader.release()
                return
            if not records:
                return
            for rtype, payload in records:
                try:
                    self._record(rtype, payload)
                except Exception as exc:
                    self._errors.report("bad ring record", exc)
            self._reader.release()

    def _record(self, rtype: int, payload: bytes) -> None:
        if rtype == shm_ring.FRAME:
            self.push((STEP, 0, None, payload, 0))
        elif rtype == shm_ring.REPEAT:
            self.push((REPEAT, 0, None, payload, 0))
        elif rtype == shm_ring.EVENT:
            kind, handle, t, rid, prompt, cached, session, trace, routed, reason, output, replayed = (
                marshal.loads(payload)
            )
            info = self._live_by_handle.get(handle)
            if kind == _ARRIVED:
                info = LiveRequest(handle, rid, t, prompt, cached, session, trace, routed)
                self._live_by_handle[handle] = info
                if replayed:  # a new shipper process learning what is live: only the replay is due
                    info.queued = False
                    self._needs_announce.append(info)
                    return
            elif info is None or info.request_id != rid:  # its ARRIVED never reached us
                info = LiveRequest(handle, rid, t, 0, 0, "", "", None)
                info.queued = False
            if kind in _TERMINAL:
                info.live = False
                if self._live_by_handle.get(handle) is info:
                    del self._live_by_handle[handle]
            self.push((EVENT, info, kind, t, cached, reason, output))
        elif rtype == shm_ring.HELLO:
            fields = marshal.loads(payload)
            if not isinstance(fields, dict):
                raise ValueError("HELLO record is not a dict")
            self._hello_fields = fields  # written first; again when the recorder learns more (device name)
        elif rtype == shm_ring.MARK:
            self.push((MARK, RingFlushMarker(self, int.from_bytes(payload, "little"))))

    def _publish(self) -> None:
        mm = self._mm
        put = shm_ring.put
        self._passes += 1
        put(mm, shm_ring.CONNECTED, 1 if self._sock is not None else 0)
        put(mm, shm_ring.SENT_FRAMES, self.sent_frames)
        put(mm, shm_ring.RECONNECTS, self.reconnects)
        put(mm, shm_ring.PENDING, self.pending)
        put(mm, shm_ring.CPU_NS, time.process_time_ns())
        put(mm, shm_ring.CONSUMER_DROPPED_STEPS, self.dropped_steps - self._producer_steps)
        put(mm, shm_ring.CONSUMER_DROPPED_EVENTS, self.dropped_events - self._producer_events)
        put(mm, shm_ring.CONSUMER_PASSES, self._passes)
        put(mm, shm_ring.CHAIN_BREAKS, self.chain_breaks)


def _watch(wake_fd: int, shipper: RingShipper, parent: int) -> None:
    """Wake the shipper for each byte the recorder writes; stop it at EOF or when the parent is gone."""
    import select

    while True:
        try:
            ready, _, _ = select.select([wake_fd], [], [], _PARENT_CHECK_S)
            if ready:
                data = os.read(wake_fd, 4096)
                if not data:
                    break
                shipper._wake.set()
            elif os.getppid() != parent:
                break
        except InterruptedError:
            continue
        except OSError:
            break
    shipper.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enginetime-shipper", description=__doc__)
    parser.add_argument("--ring-fd", type=int, required=True)
    parser.add_argument("--wake-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--tls-ca", default="")
    parser.add_argument("--capacity", type=int, default=65536)
    parser.add_argument("--backlog-bytes", type=int, default=64 << 20)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--log-level", type=int, default=logging.WARNING, help="the engine's, as a number")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(levelname)s enginetime shipper (pid {os.getpid()}, engine pid {args.parent}): %(message)s",
    )
    from .constants import parse_address
    from .shipper import ErrorLog

    try:
        mm = shm_ring.attach(args.ring_fd)
    except (OSError, ValueError) as exc:
        log.error("cannot map the recorder's ring: %s", exc)
        return 2
    target = parse_address(args.address)
    tls = None
    if args.tls_ca and target[0] == "tcp":
        import ssl

        tls = ssl.create_default_context(cafile=args.tls_ca)
    shipper = RingShipper(
        mm,
        address=args.address,
        target=target,
        errors=ErrorLog(),
        capacity=args.capacity,
        backlog_bytes=args.backlog_bytes,
        heartbeat_interval_s=args.heartbeat,
        tls=tls,
    )
    watcher = threading.Thread(target=_watch, args=(args.wake_fd, shipper, args.parent), daemon=True)
    watcher.start()
    shipper._thread = threading.current_thread()  # run the loop here, not in another thread
    shipper._run()
    shipper._publish()
    return 0


if __name__ == "__main__":  # pragma: no cover - run through the recorder's bootstrap
    sys.exit(main())
