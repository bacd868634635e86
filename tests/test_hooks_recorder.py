"""Recorder + shipper against a real listening socket.

``FrameServer`` is a stand-in sidecar: a stdlib socket server thread that accepts
connections (Unix or TCP), splits the byte stream into length-delimited frames and
decodes each with the generated ``ingest_pb2``. It can be stopped and restarted on
the same address to play a sidecar that dies and comes back.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import tempfile
import threading
import time
from collections.abc import Callable

import pytest
from helpers import read_ingest_frame

from enginetime.engine_hooks import Coupling, EventKind, Recorder, StepKind
from enginetime.engine_hooks.wire import split_frames
from enginetime.v1 import ingest_pb2

pytestmark = pytest.mark.timeout(60)


class FrameServer:
    """Accepts connections on a real socket and decodes every frame with ingest_pb2."""

    def __init__(self, address: str, *, read: bool = True) -> None:
        self.address = address
        self.read = read
        self.frames: list[tuple[int, ingest_pb2.IngestFrame]] = []  # (connection number, frame)
        self.connections = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None

    @classmethod
    def unix(cls, directory: str, **kw) -> FrameServer:
        return cls("unix:" + os.path.join(directory, "ingest.sock"), **kw)

    def start(self) -> FrameServer:
        self._stop.clear()
        if self.address.startswith("unix:"):
            path = self.address[5:]
            if os.path.exists(path):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
        else:
            host, _, port = self.address[4:].rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            self.address = f"tcp:{host}:{sock.getsockname()[1]}"
        sock.listen()
        self._listener = sock
        t = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _accept_loop(self, listener: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        while not self._stop.is_set():
            if not sel.select(0.02):
                continue
            conn, _ = listener.accept()
            with self._cond:
                self.connections += 1
                number = self.connections
                self._conns.append(conn)
                self._cond.notify_all()
            t = threading.Thread(target=self._read_loop, args=(conn, number), daemon=True)
            t.start()
            self._threads.append(t)
        sel.close()
        listener.close()

    def _read_loop(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(0.02)
        buf = b""
        while not self._stop.is_set():
            if not self.read:
                time.sleep(0.02)
                continue
            try:
                data = conn.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            buf += data
            payloads, used = split_frames(buf)
            buf = buf[used:]
            if payloads:
                decoded = [read_ingest_frame(p) for p in payloads]
                with self._cond:
                    self.frames += [(number, f) for f in decoded]
                    self._cond.notify_all()
        conn.close()

    def stop(self) -> None:
        """Kill the 'sidecar': close the listener and every connection."""
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self._threads.clear()
        for c in self._conns:
            c.close()
        self._conns.clear()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # --- views
    def of(self, which: str, conn: int | None = None) -> list:
        with self._cond:
            return [
                getattr(f, which)
                for n, f in self.frames
                if f.WhichOneof("frame") == which and (conn is None or n == conn)
            ]

    def kinds(self, conn: int | None = None) -> list[str]:
        with self._cond:
            return [f.WhichOneof("frame") for n, f in self.frames if conn is None or n == conn]


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(dir="/tmp", prefix="et-")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture
def server(sockdir):
    srv = FrameServer.unix(sockdir).start()
    yield srv
    srv.stop()


def add_step(
    rec: Recorder, handles: list[int], *, kind=StepKind.DECODE, global_step=None, prefill=None, context=None
) -> None:
    tok = rec.step_begin()
    n = len(handles)
    rec.step_end(
        tok,
        kind=kind,
        handles=handles,
        prefill_tokens=prefill or [0] * n,
        decode_tokens=[1] * n if prefill is None else [0] * n,
        context_tokens=context or [100] * n,
        global_step=global_step,
    )


def add_big_steps(rec: Recorder, entries: int, steps: int) -> None:
    """``steps`` decode steps of ``entries`` requests each, columns as lists: more than small buffers hold."""
    handles = list(range(1, entries + 1))
    zeros = [0] * entries
    for _ in range(steps):
        tok = rec.step_begin()
        rec.step_end(
            tok,
            kind=StepKind.DECODE,
            handles=handles,
            prefill_tokens=zeros,
            decode_tokens=[1] * entries,
            context_tokens=handles,
        )


def delivered(rec: Recorder, srv: FrameServer) -> bool:
    """flush() says the bytes are in the socket; wait until the server has decoded them too."""
    if not rec.flush(5):
        return False
    sent = rec.stats().sent_frames
    return srv.wait_for(lambda: len(srv.frames) >= sent)


def wait_stats(rec: Recorder, predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = rec.stats()
        if predicate(st):
            return st
        time.sleep(0.005)
    raise AssertionError(f"stats never satisfied the condition: {rec.stats()}")


def test_frames_arrive_in_order_with_hello_first(server):
    with Recorder(
        "eng-a",
        shard=1,
        num_shards=2,
        coupling="lockstep",
        address=server.address,
        engine_kind="testbed",
        engine_version="9.9",
        timer="cpu",
    ) as rec:
        h1 = rec.request_arrived(
            "req-1",
            prompt_tokens=700,
            cached_tokens=64,
            session_id="sess",
            traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            routed_shard=0,
        )
        h2 = rec.request_arrived("req-2", prompt_tokens=5)
        rec.request_scheduled(h1, cached_tokens=128)
        add_step(rec, [h1], kind=StepKind.PREFILL, prefill=[512], context=[128], global_step=0)
        rec.request_scheduled(h2)
        add_step(rec, [h1, h2], kind=StepKind.MIXED, prefill=[60, 5], context=[640, 0], global_step=1)
        rec.request_preempted(h2)
        rec.request_resumed(h2)
        add_step(rec, [h1, h2], global_step=2, context=[700, 5])
        rec.request_finished(h1, reason="length", output_tokens=2)
        rec.request_aborted(h2, output_tokens=1)
        assert delivered(rec, server)
        st = rec.stats()
    assert st.connected and st.dropped_frames == 0 and st.errors == 0 and st.pending == 0
    kinds = server.kinds()
    assert kinds[0] == "hello"
    hello = server.of("hello")[0]
    assert (hello.engine_id, hello.shard, hello.num_shards) == ("eng-a", 1, 2)
    assert hello.coupling == Coupling.LOCKSTEP
    assert (hello.engine_kind, hello.engine_version, hello.clock.device_name) == ("testbed", "9.9", "cpu")
    assert hello.clock.timer_source == 1 and hello.recorder_epoch != 0
    # Events and steps in exactly the order they were recorded.
    body = [
        (f.WhichOneof("frame"), f.request_event.kind if f.HasField("request_event") else None)
        for _, f in server.frames
        if f.WhichOneof("frame") in ("request_event", "step")
    ]
    ev_ = "request_event"
    assert body == [
        (ev_, EventKind.ARRIVED),
        (ev_, EventKind.ARRIVED),
        (ev_, EventKind.SCHEDULED),
        ("step", None),
        (ev_, EventKind.SCHEDULED),
        ("step", None),
        (ev_, EventKind.PREEMPTED),
        (ev_, EventKind.RESUMED),
        ("step", None),
        (ev_, EventKind.FINISHED),
        (ev_, EventKind.ABORTED),
    ]
    ev = server.of("request_event")
    a1 = ev[0]
    assert (a1.handle, a1.request_id, a1.prompt_tokens, a1.cached_tokens, a1.session_id) == (
        h1,
        "req-1",
        700,
        64,
        "sess",
    )
    assert a1.traceparent.startswith("00-4bf92f") and a1.HasField("routed_shard") and a1.routed_shard == 0
    assert not ev[1].HasField("routed_shard") and not a1.replayed
    assert ev[2].cached_tokens == 128 and ev[2].handle == h1
    assert (ev[-2].finish_reason, ev[-2].output_tokens) == ("length", 2)
    assert (ev[-1].kind, ev[-1].finish_reason, ev[-1].output_tokens) == (EventKind.ABORTED, "abort", 1)
    assert h1 != h2 and {h1, h2} <= {e.handle for e in ev}
    steps = server.of("step")
    assert [s.seq for s in steps] == [0, 1, 2]
    assert [s.global_step for s in steps] == [0, 1, 2] and steps[0].HasField("global_step")
    assert [s.kind for s in steps] == [StepKind.PREFILL, StepKind.MIXED, StepKind.DECODE]
    assert list(steps[1].handles) == [h1, h2]
    assert list(steps[1].prefill_tokens) == [60, 5] and list(steps[1].context_tokens) == [640, 0]
    assert list(steps[2].decode_tokens) == [1, 1]
    for s in steps:
        assert s.timer_source == 1 and 0 < s.device_time_ns <= s.end_time_ns - s.start_time_ns + 1000


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_no_listener_then_listener_starts_later(sockdir, caplog, capfd, shipper):
    caplog.set_level(logging.WARNING, logger="enginetime.engine_hooks")
    srv = FrameServer.unix(sockdir)  # not started: nothing listens on the path
    rec = Recorder(
        "eng-b", address=srv.address, buffer_size=32, timer="cpu", heartbeat_interval_s=0.2, shipper=shipper
    )
    stderr: list[str] = []
    try:
        early = rec.request_arrived(
            "early", prompt_tokens=11, session_id="s-early", routed_shard=3, time_ns=123
        )
        gone = rec.request_arrived("gone")
        rec.request_finished(gone)
        for i in range(500):  # far more than the buffers hold: the oldest are dropped
            add_step(rec, [early], global_step=i)
        late = rec.request_arrived("late", prompt_tokens=22)  # recent: its ARRIVED is still buffered
        add_step(rec, [early, late], global_step=500)
        st = wait_stats(rec, lambda s: s.dropped_frames + s.pending == 501 + 4)
        assert not st.connected and st.sent_frames == 0
        assert st.dropped_steps > 400 and st.dropped_events == 3  # ARRIVED x2 + FINISHED of the oldest

        def warnings() -> list[str]:
            if shipper == "thread":
                return [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
            stderr.extend(
                capfd.readouterr().err.splitlines()
            )  # the shipper process logs to the engine's stderr
            return [line for line in stderr if "cannot connect" in line]

        wait_stats(rec, lambda s: warnings())
        time.sleep(0.4)  # several retries (50, 100, 200 ms backoff)...
        assert len(warnings()) == 1  # ...but one warning per outage, not per retry
        assert srv.address in warnings()[0] and "enginetime sidecar" in warnings()[0]

        srv.start()
        assert srv.wait_for(lambda: len(srv.of("step")) >= 1 and srv.of("heartbeat"))
        assert delivered(rec, srv)
        kinds = srv.kinds()
        assert kinds[0] == "hello"
        ev = srv.of("request_event")
        # The live request whose ARRIVED was dropped is re-announced with its original fields...
        replay = ev[0]
        assert kinds[1] == "request_event" and replay.replayed
        assert (
            replay.handle,
            replay.request_id,
            replay.kind,
            replay.time_ns,
            replay.prompt_tokens,
            replay.session_id,
            replay.routed_shard,
        ) == (early, "early", EventKind.ARRIVED, 123, 11, "s-early", 3)
        # ...then a heartbeat with the drop counts, before anything else.
        assert kinds[2] == "heartbeat"
        beat = srv.of("heartbeat")[0]
        assert beat.dropped_steps == st.dropped_steps and beat.dropped_events == 3
        assert beat.dropped_frames == beat.dropped_steps + beat.dropped_events
        # The finished request is not replayed; the buffered ARRIVED goes out once, not replayed.
        assert "gone" not in {e.request_id for e in ev}
        assert [(e.request_id, e.replayed) for e in ev if e.request_id == "late"] == [("late", False)]
        # What survived is the newest steps, contiguous up to the last one.
        seqs = [s.seq for s in srv.of("step")]
        assert seqs[-1] == 500 and seqs == list(range(seqs[0], 501)) and seqs[0] > 400
        assert rec.stats().connected
    finally:
        rec.close()
        srv.stop()


def test_sidecar_killed_and_restarted_mid_stream(sockdir):
    srv = FrameServer.unix(sockdir).start()
    rec = Recorder("eng-c", address=srv.address, buffer_size=16, timer="cpu", heartbeat_interval_s=0.05)
    try:
        h = rec.request_arrived("long-lived", prompt_tokens=9)
        for i in range(5):
            add_step(rec, [h], global_step=i)
        assert delivered(rec, srv)
        epoch = srv.of("hello")[0].recorder_epoch
        srv.stop()  # the sidecar dies
        wait_stats(rec, lambda s: not s.connected)  # noticed via a heartbeat write or the closed peer
        for i in range(5, 100):  # the outage overflows the buffers
            add_step(rec, [h], global_step=i)
        h2 = rec.request_arrived("during-outage")
        srv.start()  # same address, a fresh sidecar
        assert srv.wait_for(lambda: srv.connections == 2 and any(s.seq == 99 for s in srv.of("step", 2)))
        assert rec.flush(5) and srv.wait_for(lambda: len(srv.of("step", 2)) >= 1)
        st = rec.stats()
        assert st.reconnects == 1 and st.connected and st.dropped_steps > 0
        kinds = srv.kinds(2)
        assert kinds[0] == "hello" and srv.of("hello", 2)[0].recorder_epoch == epoch
        replayed = [e for e in srv.of("request_event", 2) if e.replayed]
        assert [(e.request_id, e.handle, e.prompt_tokens) for e in replayed] == [("long-lived", h, 9)]
        assert kinds[1] == "request_event" and kinds[2] == "heartbeat"
        beat = srv.of("heartbeat", 2)[0]
        assert beat.reconnects == 1 and beat.dropped_steps > 0
        seqs = [s.seq for s in srv.of("step", 2)]
        assert seqs == sorted(seqs) and seqs[-1] == 99 and seqs[0] > 5
        assert [e.request_id for e in srv.of("request_event", 2) if not e.replayed] == ["during-outage"]
        assert h2 != h
        add_step(rec, [h, h2])
        assert rec.flush(5) and srv.wait_for(lambda: srv.of("step", 2)[-1].seq == 100)
    finally:
        rec.close()
        srv.stop()


def test_many_live_requests_are_all_replayed_before_any_step(sockdir):
    srv = FrameServer.unix(sockdir)
    rec = Recorder("eng-k", address=srv.address, buffer_size=8, timer="cpu")
    try:
        handles = {rec.request_arrived(f"live-{i}", prompt_tokens=i): i for i in range(700)}
        for i in range(20):  # pushes every ARRIVED out of the small buffers
            add_step(rec, [1, 2], global_step=i)
        wait_stats(rec, lambda s: s.dropped_events == 700)
        srv.start()
        assert srv.wait_for(lambda: any(s.seq == 19 for s in srv.of("step")))
        frames = [f for _, f in srv.frames]
        first_step = next(i for i, f in enumerate(frames) if f.HasField("step"))
        replayed = [f.request_event for f in frames[:first_step] if f.HasField("request_event")]
        assert len(replayed) == 700 and all(e.replayed for e in replayed)
        assert {e.handle: e.prompt_tokens for e in replayed} == handles
    finally:
        rec.close()
        srv.stop()


def test_tcp_address_works():
    srv = FrameServer("tcp:127.0.0.1:0").start()
    try:
        with Recorder("eng-tcp", address=srv.address, timer="cpu") as rec:
            h = rec.request_arrived("over-tcp")
            add_step(rec, [h])
            assert delivered(rec, srv)
        assert srv.kinds()[0] == "hello"
        assert srv.of("request_event")[0].request_id == "over-tcp"
        assert list(srv.of("step")[0].handles) == [h]
    finally:
        srv.stop()


@pytest.mark.parametrize("address", ["bogus", "tcp:localhost", "unix:", "tcp:host:99999"])
def test_bad_address_constructs_logs_and_never_raises(address, caplog):
    caplog.set_level(logging.ERROR, logger="enginetime.engine_hooks")
    rec = Recorder("eng-bad", address=address)
    h = rec.request_arrived("r")
    add_step(rec, [h])
    rec.request_finished(h)
    assert rec.flush(0.1) is False
    st = rec.stats()
    rec.close()
    assert st.errors == 1 and not st.connected and st.dropped_steps == 1 and st.dropped_events == 2
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "bad ingest address" in messages and "ENGINETIME_INGEST" in messages
    assert "expected " in messages or "e.g. " in messages  # says what a good address looks like


def test_unequal_columns_are_counted_not_raised(server):
    with Recorder("eng-d", address=server.address, timer="cpu") as rec:
        h = rec.request_arrived("r")
        tok = rec.step_begin()
        rec.step_end(
            tok,
            kind=StepKind.DECODE,
            handles=[h, h],
            prefill_tokens=[0],
            decode_tokens=[1, 1],
            context_tokens=[1, 1],
        )
        add_step(rec, [h])
        assert delivered(rec, server)
        st = rec.stats()
    assert st.dropped_steps == 1 and st.errors == 1
    assert [s.seq for s in server.of("step")] == [1]  # the lost step shows as a gap


def test_uniform_columns_as_one_int_send_the_same_step_as_lists(server):
    """A decode batch may pass prefill_tokens=0 and decode_tokens=1 as ints: the sidecar gets
    exactly the columns the lists would have sent; a value outside uint32 is a counted lost
    step, as in a list."""
    with Recorder("eng-u", address=server.address, timer="cpu") as rec:
        hs = [rec.request_arrived(f"r{i}") for i in range(3)]
        ctx = [10, 20, 30]
        for prefill, decode in ((0, 1), ([0, 0, 0], [1, 1, 1]), (0, [2, 2, 2]), (5, 0)):
            tok = rec.step_begin()
            rec.step_end(
                tok,
                kind=StepKind.DECODE,
                handles=hs,
                prefill_tokens=prefill,
                decode_tokens=decode,
                context_tokens=ctx,
            )
        tok = rec.step_begin()
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=hs, prefill_tokens=-1, decode_tokens=1, context_tokens=ctx
        )
        assert delivered(rec, server)
        st = rec.stats()
    steps = server.of("step")
    got = [(list(s.prefill_tokens), list(s.decode_tokens), list(s.context_tokens)) for s in steps]
    assert got == [
        ([0, 0, 0], [1, 1, 1], ctx),
        ([0, 0, 0], [1, 1, 1], ctx),
        ([0, 0, 0], [2, 2, 2], ctx),
        ([5, 5, 5], [0, 0, 0], ctx),
    ]
    assert [list(s.handles) for s in steps] == [hs] * 4
    assert st.dropped_steps == 1 and st.errors == 1 and [s.seq for s in steps] == [0, 1, 2, 3]


def test_record_step_replays_stamps_and_never_raises(server):
    """The replay entry point: wall stamps as given, device time defaulting to end - start;
    bad stamps are a counted lost step (a seq gap), never an exception."""
    with Recorder("eng-r", address=server.address, timer="cpu") as rec:
        h = rec.request_arrived("r")
        t0 = time.time_ns() - 10_000_000_000
        common = dict(
            kind=StepKind.DECODE, handles=[h], prefill_tokens=[0], decode_tokens=[1], context_tokens=[7]
        )
        rec.record_step(start_ns=t0, end_ns=t0 + 5_000_000, global_step=3, **common)
        rec.record_step(start_ns=t0 + 5_000_000, end_ns=t0 + 9_000_000, device_ns=3_000_000, **common)
        rec.record_step(start_ns="soon", end_ns=t0, **common)  # type: ignore[arg-type]
        rec.record_step(start_ns=t0, end_ns=t0 - 1, **common)  # negative duration
        rec.record_step(start_ns=t0 + 9_000_000, end_ns=t0 + 10_000_000, **common)
        assert delivered(rec, server)
        st = rec.stats()
    steps = server.of("step")
    assert [s.seq for s in steps] == [0, 1, 4]
    assert [(s.start_time_ns - t0, s.end_time_ns - t0, s.device_time_ns) for s in steps] == [
        (0, 5_000_000, 5_000_000),
        (5_000_000, 9_000_000, 3_000_000),
        (9_000_000, 10_000_000, 1_000_000),
    ]
    assert steps[0].global_step == 3 and list(steps[0].context_tokens) == [7]
    assert st.dropped_steps == 2 and st.errors == 2


def test_every_public_method_survives_garbage(server):
    class Weird:
        def __int__(self):
            raise RuntimeError("no")

        def __len__(self):
            raise RuntimeError("no len")

    rec = Recorder("eng-e", address=server.address, timer="cpu")
    garbage = [None, "x", -1, 2**70, 1.5, [1], {"a": 1}, Weird(), object()]
    for g in garbage:
        rec.request_arrived(
            g, prompt_tokens=g, cached_tokens=g, session_id=g, traceparent=g, routed_shard=g, time_ns=g
        )
        rec.request_scheduled(g, cached_tokens=g, time_ns=g)
        rec.request_preempted(g, time_ns=g)
        rec.request_resumed(g, time_ns=g)
        rec.request_finished(g, reason=g, output_tokens=g, time_ns=g)
        rec.request_aborted(g, reason=g, output_tokens=g, time_ns=g)
        tok = rec.step_begin(stream=g)
        rec.step_end(
            g,
            kind=g,
            handles=g,
            prefill_tokens=g,
            decode_tokens=g,
            context_tokens=g,
            global_step=g,
            peer_tokens=g,
        )
        rec.step_end(
            tok,
            kind=g,
            handles=[1],
            prefill_tokens=[1],
            decode_tokens=[1],
            context_tokens=[1],
            global_step=g,
            peer_tokens=g,
        )
        rec.step_end(
            tok, kind=StepKind.DECODE, handles=[g], prefill_tokens=[g], decode_tokens=[g], context_tokens=[g]
        )
        rec.step_repeat(g, decode_tokens=g, kind=g, global_step=g, peer_tokens=g)
        add_step(rec, [1])  # a step whole, so a repeat of it is taken and its fields checked
        rec.step_repeat(rec.step_begin(), decode_tokens=1, kind=g, global_step=g, peer_tokens=g)
        add_step(rec, [1])
        rec.step_repeat(g)
        rec.flush(g) if not isinstance(g, int | float) else None
    valid = rec.request_arrived(" valid ", prompt_tokens=3)
    h_ok = rec.request_arrived("ok")
    rec.request_scheduled(h_ok, cached_tokens=-4)  # clamped to 0, counted
    add_step(rec, [valid])
    assert delivered(rec, server)
    st = rec.stats()
    rec.close()
    rec.close("not a number")
    rec.step_end(rec.step_begin(), kind=1, handles=[], prefill_tokens=[], decode_tokens=[], context_tokens=[])
    rec.request_arrived("after-close")
    assert st.errors > 20 and st.connected
    # Everything that did get through is well-formed, and the valid step is the last one.
    assert server.of("step")[-1].handles == [valid]
    # Everything that got through is well-formed: the server parsed it with protobuf, it is a
    # known frame kind, hello first, and every step's columns have one value per entry.
    kinds = server.kinds()
    assert kinds[0] == "hello" and None not in kinds and kinds.count("hello") == 1
    for s in server.of("step"):
        assert len(s.prefill_tokens) == len(s.decode_tokens) == len(s.context_tokens) == len(s.handles)


def test_request_events_from_many_threads(server):
    n_threads, per_thread = 4, 150
    with Recorder("eng-f", address=server.address, timer="cpu") as rec:
        handles: list[list[int]] = [[] for _ in range(n_threads)]

        def http_thread(k: int) -> None:
            for i in range(per_thread):
                h = rec.request_arrived(f"t{k}-r{i}", prompt_tokens=i)
                handles[k].append(h)
                rec.request_finished(h, output_tokens=i)

        threads = [threading.Thread(target=http_thread, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for i in range(300):  # the engine thread keeps stepping meanwhile
            add_step(rec, [], kind=StepKind.IDLE, global_step=i)
        for t in threads:
            t.join()
        assert rec.flush(10) and delivered(rec, server)
        st = rec.stats()
    assert st.errors == 0 and st.dropped_frames == 0 and st.live_requests == 0
    ev = server.of("request_event")
    arrived = {e.request_id: e.handle for e in ev if e.kind == EventKind.ARRIVED}
    assert len(arrived) == n_threads * per_thread
    assert sum(e.kind == EventKind.FINISHED for e in ev) == n_threads * per_thread
    # Each request's FINISHED names the handle its ARRIVED interned, and comes after it.
    order = {}
    for e in ev:
        order.setdefault((e.handle, e.request_id), []).append(e.kind)
    assert all(kinds == [EventKind.ARRIVED, EventKind.FINISHED] for kinds in order.values())
    assert [s.seq for s in server.of("step")] == list(range(300))


def test_handles_are_interned_per_live_request(server):
    with Recorder("eng-g", address=server.address, timer="cpu") as rec:
        h = rec.request_arrived("same")
        assert rec.request_arrived("same") == h  # still live: same handle, nothing re-sent
        rec.request_finished(h)
        h_again = rec.request_arrived("same")
        assert h_again not in (0, h)
        assert delivered(rec, server)
    arrivals = [e.handle for e in server.of("request_event") if e.kind == EventKind.ARRIVED]
    assert arrivals == [h, h_again]


def test_heartbeats_are_periodic_and_cumulative(server):
    with Recorder("eng-h", address=server.address, timer="cpu", heartbeat_interval_s=0.05) as rec:
        add_step(rec, [])
        assert server.wait_for(lambda: len(server.of("heartbeat")) >= 4)
    kinds = server.kinds()
    at = [i for i, k in enumerate(kinds) if k == "heartbeat"]  # where each beat sits in the stream
    beats = server.of("heartbeat")
    assert len(at) == len(beats) >= 4
    for i, b in enumerate(beats):
        # Cumulative: a beat counts every frame written before it was built (never itself or later
        # ones), and the next beat is built only after this one's batch was written.
        assert b.sent_frames <= at[i], (i, b.sent_frames, at[i])
        if i:
            assert b.sent_frames >= at[i - 1] + 1, (i, b.sent_frames, at[i - 1])
    # Periodic: one beat per interval, not a burst (load can only stretch the gaps).
    gaps = [(b.time_ns - a.time_ns) / 1e9 for a, b in zip(beats, beats[1:], strict=False)]
    assert min(gaps) >= 0.05 * 0.5, gaps


def test_sidecar_that_stops_reading_only_fills_the_buffer(sockdir):
    srv = FrameServer.unix(sockdir, read=False).start()  # accepts, never reads
    rec = Recorder("eng-i", address=srv.address, buffer_size=256, timer="cpu")
    try:
        wait_stats(rec, lambda s: s.connected)
        cols = list(range(512))
        slowest = 0.0
        for _ in range(3000):  # ~8 KiB a step: far beyond the socket's buffer
            t0 = time.perf_counter()
            tok = rec.step_begin()
            rec.step_end(
                tok,
                kind=StepKind.DECODE,
                handles=cols,
                prefill_tokens=cols,
                decode_tokens=cols,
                context_tokens=cols,
            )
            slowest = max(slowest, time.perf_counter() - t0)
        # Each call returned on its own: one that waited for the socket would wait forever (nobody
        # reads), so a bound per call — loose for two busy cores — is what "never held up" means.
        assert slowest < 1.0, f"a step_begin/step_end pair took {slowest:.3f} s"
        st = wait_stats(rec, lambda s: s.dropped_steps > 0)
        assert st.connected and st.dropped_steps > 1000 and st.errors == 0
    finally:
        rec.close(0.2)
        srv.stop()


def test_close_without_start_and_stats_shape(sockdir):
    rec = Recorder("eng-j", address="unix:" + os.path.join(sockdir, "nobody.sock"), timer="cpu", start=False)
    h = rec.request_arrived("r")
    assert h == 1
    assert rec.flush(0.05) is False
    st = rec.stats()
    assert st.pending == 1 and st.live_requests == 1 and not st.connected
    rec.close()


def test_the_ring_is_bounded_by_bytes_and_holds_no_gc_tracked_columns(sockdir):
    """Big steps with nobody reading: memory stays under buffer_bytes, and the ring's steps are
    bytes the garbage collector never walks (a ring of lists made full collections stall the engine)."""
    import gc

    rec = Recorder(
        "bytes",
        address=f"unix:{sockdir}/nobody-here.sock",
        timer="cpu",
        buffer_size=1_000_000,
        buffer_bytes=1 << 20,
        start=False,  # no shipper thread: everything stays in the ring
        shipper="thread",
    )
    try:
        entries = 4096
        add_big_steps(rec, entries, 200)
        ring = rec._shipper.ring
        assert rec._shipper.ring_bytes <= 1 << 20
        assert 0 < len(ring) < 200
        assert rec.stats().dropped_steps == 200 - len(ring)  # the oldest went, counted
        actual = sum(len(item[3]) for item in ring)  # each step encoded on the engine thread
        assert actual >= 16 * entries * len(ring)  # the four uint32 columns are in it
        assert actual <= 1 << 20  # the estimate does not undercount the encoded steps
        assert not any(gc.is_tracked(item[3]) for item in ring)
    finally:
        rec.close()
