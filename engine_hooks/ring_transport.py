"""The recorder's side of the shipper process: records go into a shared-memory ring.

``ProcessShipper`` stands where ``shipper.Shipper`` stands for a recorder whose shipper
runs in its own process (the default where ``os.memfd_create`` exists). The engine's
threads copy each record into the ring under one lock and return; nothing of ours runs
in the engine's interpreter between calls, so nothing of ours ever holds the engine's
GIL while it waits on a kernel or a collective.

What stays in the engine process, because only it can do it:

* CUDA events are per process, so a step timed with them waits here (in order, with
  whatever follows it) until its end event has completed; the engine thread checks the
  oldest one (``query()``, never ``synchronize()``) whenever it calls a hook anyway, and
  ``flush``/``close`` check too. A step is never written before an earlier one.
* The shipper process is spawned here, and spawned again (with backoff) if it dies:
  what it had not read is counted as dropped, and the new one is told the hello and
  every live request (ARRIVED with ``replayed=True``) so the sidecar can name them.
* A full ring refuses a record and counts it (the shipper process empties the ring every
  20 ms into its own backlog, which drops the oldest during a sidecar outage as before);
  a refused ARRIVED is announced again with the next record that fits.
"""

from __future__ import annotations

import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

from . import shm_ring, wire
from .constants import EventKind, TimerSource
from .shipper import EVENT, ErrorLog, LiveRequest

log = logging.getLogger("enginetime.engine_hooks")

_ARRIVED = int(EventKind.ARRIVED)
_FRAME = shm_ring.FRAME
_REPEAT = shm_ring.REPEAT
_EVENT = shm_ring.EVENT
_HEAD = shm_ring.RECORD_HEAD
_HEAD_SIZE = shm_ring.RECORD_HEAD_SIZE
_READ_POS = shm_ring.READ_POS
_WRITE_POS = shm_ring.WRITE_POS
_U64 = struct.Struct("<Q")
_DATA = shm_ring.HEADER_SIZE
_CHECK_NS = 1_000_000_000  # how often a hook call looks at whether the shipper process is alive
_RESPAWN_START_S = 1.0
_RESPAWN_MAX_S = 30.0
_MAX_PENDING = 4096  # CUDA steps (and what follows them) waiting for their end event
_CUDA = 0
_READY = 1
_EVENT_ITEM = 2

# Loads the hooks package from its own folder, however the engine imported it, with the
# interpreter's -I -S: the shipper needs the standard library only.
_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "d = sys.argv.pop(1)\n"
    "s = importlib.util.spec_from_file_location('_enginetime_hooks', d + '/__init__.py', "
    "submodule_search_locations=[d])\n"
    "m = importlib.util.module_from_spec(s); sys.modules['_enginetime_hooks'] = m; s.loader.exec_module(m)\n"
    "from _enginetime_hooks.ship_process import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def is_shipper_command(args: Any) -> bool:
    """Is this argv the one ``ProcessShipper`` starts its shipper process with?"""
    return isinstance(args, list) and len(args) > 4 and args[4] == _BOOTSTRAP


def ring_bytes_for(buffer_bytes: int) -> int:
    """The ring's size for a recorder's ``buffer_bytes``: a quarter, 64 KiB to 4 MiB.

    The ring only has to hold what arrives between two passes of the shipper process
    (20 ms: ~170 KB at batch 512 and 1 ms steps), its backlog holds the rest of
    ``buffer_bytes`` during an outage. Small, because a ring that fits the caches is
    cheaper to write: 0.66 µs a 4 KB step in a 2 MiB ring, 0.88 µs in 16 MiB.
    """
    return min(4 << 20, max(shm_ring.MIN_CAPACITY, int(buffer_bytes) // 4))


class ProcessShipper:
    """Spawns and feeds the shipper process; the same surface the recorder uses of ``Shipper``."""

    def __init__(
        self,
        *,
        address: str,
        hello_fields: Any,
        live: Any,
        timer: Any,
        errors: ErrorLog,
        capacity: int,
        backlog_bytes: int,
        heartbeat_interval_s: float,
        tls_ca: str = "",
    ) -> None:
        self.address = address
        self._hello_fields = hello_fields
        self._live = live
        self._timer = timer
        self._errors = errors
        self.capacity = max(1, int(capacity))
        ring_bytes = ring_bytes_for(backlog_bytes)
        self._backlog_bytes = max(1, int(backlog_bytes) - ring_bytes)
        self._heartbeat = heartbeat_interval_s
        self._tls_ca = tls_ca
        self._fd, self.mm = shm_ring.create(ring_bytes)
        self._writer = shm_ring.RingWriter(self.mm)
        self._lock = threading.Lock()
        # In order behind a CUDA step whose events are not done: (_CUDA, dev, body, cpu_ns, rtype),
        # (_READY, rtype, payload) for finished records, (_EVENT_ITEM, info, kind, t, cached, reason, output).
        self._pending: deque[tuple] = deque()
        self._max_pending = min(self.capacity, _MAX_PENDING)
        self._unannounced: list[LiveRequest] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._wake_w = -1
        self._next_check = 0
        self._next_spawn = 0.0
        self._respawn_backoff = _RESPAWN_START_S
        self._mark_id = 0
        self._stopped = False
        self.dropped_steps = 0
        self.dropped_events = 0
        self.resolve_fallbacks = 0
        self.restarts = 0

    # ------------------------------------------------------------------ process

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        with self._lock:
            if self._proc is None and not self._stopped:
                self._spawn()

    def _spawn(self) -> None:
        """Start a shipper process on the ring (lock held). Raises OSError if it cannot."""
        self._next_check = time.perf_counter_ns() + _CHECK_NS
        fields = self._hello_fields()
        rfd, wfd = os.pipe()
        args = [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _BOOTSTRAP,
            os.path.dirname(os.path.abspath(__file__)),
            "--ring-fd",
            str(self._fd),
            "--wake-fd",
            str(rfd),
            "--parent",
            str(os.getpid()),
            "--address",
            self.address,
            "--capacity",
            str(self.capacity),
            "--backlog-bytes",
            str(self._backlog_bytes),
            "--heartbeat",
            repr(float(self._heartbeat)),
            "--log-level",
            str(log.getEffectiveLevel()),
        ]
        if self._tls_ca:
            args += ["--tls-ca", self._tls_ca]
        try:
            self._write_record(shm_ring.HELLO, marshal.dumps(fields))
            self._proc = subprocess.Popen(
                args, pass_fds=(self._fd, rfd), stdin=subprocess.DEVNULL, close_fds=True
            )
        except BaseException:
            os.close(wfd)
            raise
        finally:
            os.close(rfd)
        os.set_blocking(wfd, False)
        if self._wake_w >= 0:
            os.close(self._wake_w)
        self._wake_w = wfd

    def _check(self, now_ns: int) -> None:
        """Respawn a shipper process that died (lock held; at most once per _CHECK_NS)."""
        self._next_check = now_ns + _CHECK_NS
        proc = self._proc
        if proc is None or self._stopped or proc.poll() is None:
            return
        now = time.monotonic()
        if now < self._next_spawn:
            return
        lost = self._writer.unread()
        self._writer.discard_unread()
        steps = sum(1 for t in lost if t == _FRAME or t == _REPEAT)
        events = sum(1 for t in lost if t == _EVENT)
        self._count(steps, events)
        log.warning(
            "enginetime hooks: the shipper process (pid %d) exited with %s; starting another "
            "(%d steps and %d request events it had not read are counted as dropped)",
            proc.pid,
            proc.returncode,
            steps,
            events,
        )
        self.restarts += 1
        self._next_spawn = now + self._respawn_backoff
        self._respawn_backoff = min(self._respawn_backoff * 2, _RESPAWN_MAX_S)
        try:
            self._spawn()
        except Exception as exc:
            self._errors.report("cannot restart the shipper process", exc, level=logging.ERROR)
            return
        for info in self._live():
            self._write_replay(info)

    def update_hello(self, fields: dict[str, Any]) -> None:
        """New hello fields (a device name learnt late): the shipper process's next connections use them."""
        with self._lock:
            self._put_record(shm_ring.HELLO, marshal.dumps(fields))

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\1")
        except OSError:  # a full pipe is already a wake-up; a closed one has no reader to wake
            pass

    # ------------------------------------------------------------------ producers (any thread)

    def _count(self, steps: int = 0, events: int = 0) -> None:
        if steps:
            self.dropped_steps += steps
            shm_ring.put(self.mm, shm_ring.PRODUCER_DROPPED_STEPS, self.dropped_steps)
        if events:
            self.dropped_events += events
            shm_ring.put(self.mm, shm_ring.PRODUCER_DROPPED_EVENTS, self.dropped_events)

    def count_dropped(self, steps: int = 0, events: int = 0) -> None:
        with self._lock:
            self._count(steps, events)

    def _put_record(self, rtype: int, payload: bytes) -> bool:
        """A finished record, in order behind any CUDA step still pending (lock held)."""
        if self._pending:
            self._pending.append((_READY, rtype, payload))
            self._service()
            return True
        return self._write_record(rtype, payload)

    def _write_record(self, rtype: int, payload: bytes) -> bool:
        if self._writer.write(rtype, payload):
            return True
        if rtype == _FRAME or rtype == _REPEAT:
            self._count(steps=1)
        elif rtype == _EVENT:
            self._count(events=1)
        return False

    def put_step(self, dev: Any, payload: bytes, cpu_ns: int, now_ns: int, rtype: int = _FRAME) -> None:
        """One step from the engine thread: a finished frame, or a CUDA body waiting for its events.

        ``rtype`` REPEAT: a repeat body (framed by the shipper process), device time pending
        with a CUDA pair as a step's is.
        """
        with self._lock:
            if now_ns > self._next_check:
                self._check(now_ns)
            if self._unannounced:
                self._announce()
            if not self._pending and dev is None:
                # RingWriter.write inlined for the common case (no wrap): this is the engine thread.
                writer = self._writer
                mm = writer.mm
                cap = writer.capacity
                pos = writer.pos
                size = _HEAD_SIZE + len(payload)
                off = pos % cap
                if off + size > cap:
                    self._write_record(rtype, payload)
                elif pos + size - _U64.unpack_from(mm, _READ_POS)[0] > cap:
                    self._count(steps=1)
                else:
                    at = _DATA + off
                    _HEAD.pack_into(mm, at, size, rtype)
                    mm[at + _HEAD_SIZE : at + size] = payload
                    pos += size
                    writer.pos = pos
                    _U64.pack_into(mm, _WRITE_POS, pos)
                return
            self._pend((_READY, rtype, payload) if dev is None else (_CUDA, dev, payload, cpu_ns, rtype))

    def push(self, item: tuple) -> None:
        """A request event (any thread), as the recorder builds it for ``Shipper.push``."""
        if item[0] != EVENT:
            return
        _, info, kind, t, cached, reason, output = item
        with self._lock:
            if self._unannounced:
                self._announce()
            if kind == _ARRIVED:
                cached = info.cached_tokens
            if self._pending:
                self._pend((_EVENT_ITEM, info, kind, t, cached, reason, output))
            else:
                self._write_event(info, kind, t, cached, reason, output, False)

    def _write_event(
        self, info: LiveRequest, kind: int, t: int, cached: Any, reason: str, output: int, replayed: bool
    ) -> None:
        payload = marshal.dumps(
            (
                int(kind),
                info.handle,
                t,
                info.request_id,
                info.prompt_tokens,
                cached,
                info.session_id,
                info.traceparent,
                info.routed_shard,
                reason,
                output,
                replayed,
            )
        )
        if not self._write_record(_EVENT, payload) and kind == _ARRIVED:
            self._unannounced.append(info)

    def _write_replay(self, info: LiveRequest) -> None:
        """The request's ARRIVED again, as first reported, marked replayed."""
        self._write_event(info, _ARRIVED, info.time_ns, info.cached_tokens, "", 0, True)

    def _announce(self) -> None:
        """ARRIVEDs the ring refused, again (replayed) now that something else is being written."""
        waiting, self._unannounced = self._unannounced, []
        for info in waiting:
            if info.live:
                self._write_replay(info)

    # ------------------------------------------------------------------ CUDA steps

    def _pend(self, entry: tuple) -> None:
        pending = self._pending
        pending.append(entry)
        while len(pending) > self._max_pending:  # a GPU that never gets there: drop the oldest, counted
            self._lost(pending.popleft())
        self._service()

    def _lost(self, entry: tuple) -> None:
        tag = entry[0]
        if tag == _CUDA:
            self._count(steps=1)
            self._release(entry[1])
        elif tag == _EVENT_ITEM:
            self._count(events=1)
            if entry[2] == _ARRIVED and entry[1].live:
                self._unannounced.append(entry[1])
        elif entry[1] == _FRAME or entry[1] == _REPEAT:
            self._count(steps=1)

    def _release(self, dev: Any) -> None:
        try:
            self._timer.release(dev)
        except Exception as exc:
            self._errors.report("release CUDA event pair", exc)

    def service(self) -> None:
        """Write the CUDA steps whose events have completed (engine thread, each step_begin)."""
        if self._pending:
            with self._lock:
                self._service()

    def _service(self, force: bool = False) -> None:
        pending = self._pending
        while pending:
            entry = pending[0]
            tag = entry[0]
            if tag == _READY:
                pending.popleft()
                self._write_record(entry[1], entry[2])
                continue
            if tag == _EVENT_ITEM:
                pending.popleft()
                _, info, kind, t, cached, reason, output = entry
                self._write_event(info, kind, t, cached, reason, output, False)
                continue
            dev = entry[1]
            if not force:
                try:
                    if not self._timer.ready(dev):
                        return
                except Exception as exc:
                    self._errors.report("CUDA event query", exc)
            pending.popleft()
            _, _, body, cpu_ns, rtype = entry
            ns = None
            try:
                ns = self._timer.resolve(dev)
            except Exception as exc:
                self._errors.report("CUDA event elapsed_time", exc)
            self._release(dev)
            if ns is None:
                self.resolve_fallbacks += 1
                duration, source = cpu_ns, TimerSource.MONOTONIC
            else:
                duration, source = ns, TimerSource.CUDA_EVENT
            try:
                if rtype == _REPEAT:
                    frame = wire.fill_device(body, duration, source)
                else:
                    frame = wire.wrap_packed(body, duration, source)
            except Exception as exc:
                self._count(steps=1)
                self._errors.report("invalid step record dropped", exc)
                continue
            self._write_record(rtype, frame)

    # ------------------------------------------------------------------ flush, stop, stats

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything recorded before this call is written to the sidecar's socket."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._lock:
            if self._proc is None or self._stopped:
                return False
            self._mark_id += 1
            mark = self._mark_id
            payload = _U64.pack(mark)
            if not self._put_record(shm_ring.MARK, payload):
                return False
        self._wake()
        pause = 0.0005
        while True:
            if shm_ring.get(self.mm, shm_ring.FLUSH_DONE_ID) >= mark:
                return bool(shm_ring.get(self.mm, shm_ring.FLUSH_DONE_OK))
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.01)
            with self._lock:
                self._service()
                now_ns = time.perf_counter_ns()
                if now_ns > self._next_check:
                    self._check(now_ns)

    def stop(self, timeout_s: float) -> None:
        """Close the wake pipe (the shipper process ships what it holds and exits); reap it."""
        with self._lock:
            self._stopped = True
            self._service(force=True)
            if self._wake_w >= 0:
                os.close(self._wake_w)
                self._wake_w = -1
            proc = self._proc
        if proc is not None:
            try:  # it exits as soon as it has written what it holds, or found no sidecar to take it
                proc.wait(max(0.2, timeout_s))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:
            os.close(self._fd)  # the mapping stays valid for stats(); the memory goes with it
        except OSError:
            pass
        self._fd = -1

    def chain_mark(self) -> int:
        """Moves whenever a step may have been lost before its shipper expanded what follows it.

        Steps refused or dropped here, shipper processes started again (a new one has seen no
        step), and steps the shipper process lost before expanding.
        """
        return self.dropped_steps + self.restarts + shm_ring.get(self.mm, shm_ring.CHAIN_BREAKS)

    @property
    def connected(self) -> bool:
        return self.running and shm_ring.get(self.mm, shm_ring.CONNECTED) == 1

    @property
    def sent_frames(self) -> int:
        return shm_ring.get(self.mm, shm_ring.SENT_FRAMES)

    @property
    def reconnects(self) -> int:
        return shm_ring.get(self.mm, shm_ring.RECONNECTS)

    @property
    def cpu_ns(self) -> int:
        return shm_ring.get(self.mm, shm_ring.CPU_NS)

    @property
    def pending(self) -> int:
        mm = self.mm
        unread = 1 if shm_ring.get(mm, _WRITE_POS) != shm_ring.get(mm, _READ_POS) else 0
        return len(self._pending) + unread + shm_ring.get(mm, shm_ring.PENDING)

    def dropped(self) -> tuple[int, int]:
        """(steps, events) dropped here and in the shipper process."""
        mm = self.mm
        return (
            self.dropped_steps + shm_ring.get(mm, shm_ring.CONSUMER_DROPPED_STEPS),
            self.dropped_events + shm_ring.get(mm, shm_ring.CONSUMER_DROPPED_EVENTS),
        )

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


__all__ = ["ProcessShipper", "is_shipper_command", "ring_bytes_for"]
