"""The ingest side of a real sidecar process: sockets, broken recorders, lifecycle, CLI.

One sidecar serves most tests (module fixture); each test uses its own engine
id so they cannot see each other's requests. A broken stream must cost only
its own connection: every test here keeps a well-behaved engine streaming
beside the broken one and checks it is still ingested afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import grpc
import pytest
from helpers import (
    IngestConnection,
    arrived,
    finished,
    frame,
    hello,
    poll_async,
    short_socket_dir,
    start_sidecar,
    step,
    varint,
    wait_until,
)

from enginetime.engine_hooks.constants import MAX_FRAME_BYTES, PROTOCOL_VERSION
from enginetime.sidecar.api.auth import ApiGuard
from enginetime.sidecar.ingest.limits import IngestLimits
from enginetime.sidecar.ingest.server import IngestServer
from enginetime.sidecar.ledger.ledger import Ledger, LedgerConfig
from enginetime.sidecar.ledger.views import RequestQuery, RequestState
from enginetime.v1 import accounting_pb2 as pb
from enginetime.v1 import accounting_pb2_grpc as pb_grpc
from enginetime.v1 import ingest_pb2


@pytest.fixture(scope="module")
def sidecar(module_sidecar):
    return module_sidecar


@pytest.fixture(scope="module")
def stub(sidecar):
    with grpc.insecure_channel(sidecar.grpc_target) as channel:
        yield pb_grpc.AccountingServiceStub(channel)


def shard_steps(stub, engine_id: str) -> dict[int, tuple[int, bool]]:
    """shard -> (steps, connected) for one engine, from GetShards."""
    resp = stub.GetShards(pb.GetShardsRequest(engine_id=engine_id), timeout=5)
    return {s.shard: (s.steps, s.connected) for s in resp.shards if s.engine_id == engine_id}


def wait_steps(stub, engine_id: str, shard: int, steps: int, connected: bool = True) -> None:
    wait_until(
        lambda: shard_steps(stub, engine_id).get(shard) == (steps, connected),
        timeout=10,
        message=lambda: (
            f"{engine_id} shard {shard}: wanted ({steps}, {connected}), "
            f"GetShards says {shard_steps(stub, engine_id)}"
        ),
    )


def _mismatched_step() -> bytes:
    return frame(
        ingest_pb2.IngestFrame(
            step=ingest_pb2.StepRecord(
                seq=1,
                handles=[1, 2],
                prefill_tokens=[0, 0],
                decode_tokens=[1],
                context_tokens=[5, 5],
            )
        )
    )


def _bad_stream(reason: str, engine_id: str) -> tuple[bytes, bool]:
    """(bytes a broken recorder sends, whether it then half-closes) for each rejection reason."""
    ok = hello(engine_id)
    return {
        "malformed": (ok + frame(b"\x1f"), False),  # field 3 with wire type 7
        "truncated": (ok + step(1, [1, 2, 3])[:-7], True),
        "oversized": (ok + varint(MAX_FRAME_BYTES + 1), False),
        "bad_version": (hello(engine_id, protocol_version=PROTOCOL_VERSION + 1), False),
        "no_hello": (arrived(1, f"{engine_id}-r1"), False),
        "duplicate_hello": (ok + hello(engine_id), False),
        "bad_hello": (hello(engine_id, shard=3, num_shards=2), False),
        "column_mismatch": (ok + _mismatched_step(), False),
    }[reason]


#: Whether the log line can name the engine (the hello was accepted before the error).
_KNOWS_ENGINE = {"malformed", "truncated", "oversized", "duplicate_hello", "column_mismatch"}


@pytest.mark.parametrize(
    "reason",
    sorted(
        [
            "malformed",
            "truncated",
            "oversized",
            "bad_version",
            "no_hello",
            "duplicate_hello",
            "bad_hello",
            "column_mismatch",
        ]
    ),
)
@pytest.mark.e2e
def test_a_broken_stream_closes_only_its_own_connection(sidecar, stub, reason: str) -> None:
    good_id, bad_id = f"good-{reason}", f"bad-{reason}"
    with IngestConnection(sidecar.ingest) as good, IngestConnection(sidecar.ingest) as bad:
        good.send(hello(good_id), arrived(1, f"{good_id}-r1"), step(1, [1]), step(2, [1]))
        wait_steps(stub, good_id, 0, 2)

        payload, half_close = _bad_stream(reason, bad_id)
        bad.send(payload)
        if half_close:
            bad.sock.shutdown(socket.SHUT_WR)
        assert bad.closed_by_peer(timeout=10), f"the sidecar kept a {reason} connection open"

        log = sidecar.wait_for_log(f"rejected {reason} total: 1]")
        line = next(ln for ln in log.splitlines() if f"rejected {reason} total" in ln)
        assert "WARNING" in line and f": {reason}: " in line
        assert f"pid {os.getpid()}" in line  # the peer, named by its process
        if reason in _KNOWS_ENGINE:
            assert f"engine '{bad_id}' shard 0" in line

        # The other engine's connection was never touched: it keeps being ingested.
        good.send(step(3, [1]), step(4, [1]), step(5, [1]))
        wait_steps(stub, good_id, 0, 5)
        assert stub.GetRequest(pb.GetRequestRequest(request_id=f"{good_id}-r1"), timeout=5).request.steps == 5


@pytest.mark.e2e
def test_disconnect_is_seen_and_a_reconnect_resumes(sidecar, stub) -> None:
    engine = "reconnecting"
    with IngestConnection(sidecar.ingest) as conn:
        conn.send(hello(engine, recorder_epoch=1), arrived(1, "rc-1"), step(1, [1]))
        wait_steps(stub, engine, 0, 1)
    wait_steps(stub, engine, 0, 1, connected=False)
    with IngestConnection(sidecar.ingest) as conn:
        conn.send(hello(engine, recorder_epoch=1), step(2, [1]))
        wait_steps(stub, engine, 0, 2)


@pytest.mark.e2e
def test_ingest_socket_is_private(sidecar) -> None:
    path = sidecar.socket_path
    assert path is not None
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.e2e
def test_lifecycle_new_dir_stale_socket_live_refusal_and_sigterm(tmp_path) -> None:
    base = short_socket_dir()
    path = f"{base}/new/dir/ingest.sock"
    # A stale socket file from a dead sidecar: bound, never unlinked, nobody listening.
    os.makedirs(os.path.dirname(path), mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    with start_sidecar(tmp_path, ingest=f"unix:{path}") as sp:
        assert "replaced stale socket" in sp.stderr_text()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        # A second sidecar on the same path must not take it over.
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "enginetime",
                "sidecar",
                "--ingest",
                f"unix:{path}",
                "--listen",
                "127.0.0.1:0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "another sidecar is already listening" in second.stderr and path in second.stderr
        assert second.stdout == ""  # no ready line

        with grpc.insecure_channel(sp.grpc_target) as channel:
            stub = pb_grpc.AccountingServiceStub(channel)
            with IngestConnection(sp.ingest) as conn:
                conn.send(hello("lifecycle"), arrived(1, "lc-1"), step(1, [1]))
                wait_steps(stub, "lifecycle", 0, 1)
                code = sp.stop()
        assert code == 0, sp.stderr_text()
        assert not os.path.exists(path), "the sidecar left its socket behind"
        log = sp.stderr_text()
        assert "SIGTERM received" in log and "stopped" in log
        assert "steps=1 entries=1 events=1 rejected=none" in log  # the shutdown summary of the counters
    # The directory the sidecar created for its socket is private.
    fresh = f"{base}/made/by/sidecar/ingest.sock"
    with start_sidecar(tmp_path, ingest=f"unix:{fresh}") as sp:
        assert stat.S_IMODE(os.stat(os.path.dirname(fresh)).st_mode) == 0o700
        assert sp.stop() == 0
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.e2e
def test_refuses_a_path_that_is_not_a_socket(tmp_path) -> None:
    base = short_socket_dir()
    path = f"{base}/ingest.sock"
    with open(path, "w") as f:
        f.write("precious")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "enginetime",
            "sidecar",
            "--ingest",
            f"unix:{path}",
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "is not a socket; refusing to replace it" in result.stderr
    with open(path) as f:
        assert f.read() == "precious"
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.e2e
def test_tcp_ingest(sidecar_factory) -> None:
    sp = sidecar_factory("--allow-insecure-ingest", ingest="tcp:127.0.0.1:0")  # stopped by the fixture
    assert sp.ingest.startswith("tcp:127.0.0.1:") and not sp.ingest.endswith(":0")
    with grpc.insecure_channel(sp.grpc_target) as channel:
        stub = pb_grpc.AccountingServiceStub(channel)
        with IngestConnection(sp.ingest) as conn:
            conn.send(hello("over-tcp"), arrived(1, "tcp-1"), step(1, [1]))
            wait_steps(stub, "over-tcp", 0, 1)
        assert "tcp:127.0.0.1:" in sp.stderr_text()  # the peer is named by address


def test_in_process_counters() -> None:
    """IngestServer's counters: connections, frames, bytes, steps and rejections by reason."""

    async def scenario() -> None:
        ledger = Ledger(LedgerConfig())
        sockdir = short_socket_dir()
        server = IngestServer(ledger, f"unix:{sockdir}/i.sock")
        await server.start()
        try:
            good = hello("counted") + arrived(1, "c-1") + step(1, [1]) + step(2, [1])
            _, writer = await asyncio.open_unix_connection(f"{sockdir}/i.sock")
            writer.write(good)
            await writer.drain()
            r2, w2 = await asyncio.open_unix_connection(f"{sockdir}/i.sock")
            w2.write(hello("counted-bad") + frame(b"\x1f"))
            await w2.drain()
            assert await asyncio.wait_for(r2.read(), 10) == b""  # closed by the sidecar
            deadline = time.monotonic() + 10
            while server.counters.steps < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            c = server.counters
            assert c.connections == 2 and c.active_connections == 1
            assert (c.steps, c.events, c.entries) == (2, 1, 2)
            assert c.frames == 5  # 4 good + the bad connection's hello
            assert c.bytes == len(good) + len(hello("counted-bad") + frame(b"\x1f"))
            assert c.rejected == {"malformed": 1}
            writer.close()
            deadline = time.monotonic() + 10
            while server.counters.active_connections and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert server.counters.active_connections == 0
        finally:
            await server.close()
            os.rmdir(sockdir)

    asyncio.run(scenario())


@pytest.mark.e2e
def test_help_explains_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "enginetime", "sidecar", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    text = result.stdout
    for flag in (
        "--ingest",
        "--listen",
        "--max-requests",
        "--retention",
        "--lockstep-wait",
        "--storm-threshold",
        "--max-frame-bytes",
        "--subscriber-queue",
        "--lag-limit",
        "--otlp-endpoint",
        "--log-level",
        "--shutdown-grace",
    ):
        assert flag in text, flag
    assert "Default: 100000" in text and "Default: 600" in text and "ENGINETIME_INGEST" in text


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--retention", "-5"], "must be > 0"),
        (["--max-requests", "lots"], "is not a whole number"),
        (["--ingest", "/tmp/x.sock"], "expected unix:PATH or tcp:HOST:PORT"),
        (["--listen", "localhost"], "expected HOST:PORT"),
        (["--lag-limit", "nan"], "not a finite number"),
        (["--max-frame-bytes", "10"], "must be >= 1024"),
    ],
)
@pytest.mark.e2e
def test_bad_flag_values_are_argparse_errors(args: list[str], complaint: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "enginetime", "sidecar", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert complaint in result.stderr and args[0] in result.stderr


GROUPS = 200


def _lockstep_burst(shards: int, groups: int, batch: int) -> list[tuple[bytes, bytes]]:
    """Per shard: (hello + arrivals, ``groups`` lockstep decode steps + finishes)."""
    t0 = time.time_ns() - 10 * 10**9
    out = []
    for k in range(shards):
        setup = [hello("sliced", k, shards, coupling=2)]
        setup += [arrived(h, f"s{k}-{h}", 100, time_ns=t0) for h in range(1, batch + 1)]
        steps = []
        for g in range(groups):
            d = 2_000_000 + 1000 * ((g * 7 + k) % 13)
            start = t0 + g * 3_000_000
            steps.append(
                step(g, list(range(1, batch + 1)), device_time_ns=d, start_time_ns=start, global_step=g)
            )
        steps += [finished(h, groups, time_ns=t0 + groups * 3_000_000) for h in range(1, batch + 1)]
        out.append((b"".join(setup), b"".join(steps)))
    return out


async def _send_burst(ledger: Ledger, sockdir: str, groups: int, batch: int) -> list:
    """Connect 4 lockstep shards and announce their requests; once every arrival is in the
    ledger (each group then waits for all four shards), write ``groups`` steps on each.
    Returns the writers, still open."""
    burst = _lockstep_burst(shards=4, groups=groups, batch=batch)
    writers = []
    for setup, _ in burst:
        _, w = await asyncio.open_unix_connection(f"{sockdir}/i.sock")
        w.write(setup)
        writers.append(w)
    deadline = time.monotonic() + 30
    while ledger.counters.events < 4 * batch and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    for w, (_, steps) in zip(writers, burst, strict=True):
        w.write(steps)
    return writers


def test_sliced_ingest_attributes_exactly_what_unsliced_ingest_does() -> None:
    """Feeding the ledger in slices of a few microseconds (the loop serves others between them)
    changes nothing in the accounting: the same groups, no lockstep timeout although ticks run
    between slices while peers' steps still wait in the queue, and the same figures per request.
    Each connection closes right after its last frame: its disconnect comes after them."""

    async def scenario(slice_s: float) -> tuple[dict, dict]:
        ledger = Ledger(LedgerConfig(lockstep_wait_s=0.02))  # a wait that queued peers would outlast
        sockdir = short_socket_dir()
        server = IngestServer(ledger, f"unix:{sockdir}/i.sock", slice_s=slice_s)
        await server.start()
        stop = asyncio.Event()

        async def ticker() -> None:  # as the sidecar's: time only as late as the oldest queued record
            while not stop.is_set():
                fed = server.fed_until_ns()
                ledger.tick(None if fed is None else min(fed, time.time_ns()))
                await asyncio.sleep(0.0005)

        ticking = asyncio.create_task(ticker())
        try:
            writers = await _send_burst(ledger, sockdir, groups=GROUPS, batch=16)
            for w in writers:
                await w.drain()
                w.close()
            deadline = time.monotonic() + 30
            while (server.counters.active_connections or server._queue) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            ledger.flush()
        finally:
            stop.set()
            await ticking
            await server.close()
            shutil.rmtree(sockdir, ignore_errors=True)
        c = ledger.counters
        figures = {
            v.request_id: (v.state, v.engine_time_ns, v.gpu_time_ns, v.interference_ns, v.steps)
            for v in ledger.query(RequestQuery())
        }
        return {"groups": c.lockstep_groups, "timeouts": c.lockstep_timeouts, "steps": c.steps}, figures

    whole, whole_figures = asyncio.run(scenario(0.0))
    sliced, sliced_figures = asyncio.run(scenario(0.000_005))
    assert whole == {"groups": GROUPS, "timeouts": 0, "steps": 4 * GROUPS}, whole
    assert sliced == whole
    assert len(sliced_figures) == 64
    assert all(f[0] == RequestState.FINISHED and f[4] == GROUPS for f in sliced_figures.values())
    assert sliced_figures == whole_figures


async def _queued_burst(server: IngestServer, ledger: Ledger, sockdir: str, groups: int) -> list:
    """``_send_burst`` of batch 64; returns once ingest has a backlog."""
    writers = await _send_burst(ledger, sockdir, groups=groups, batch=64)
    deadline = time.monotonic() + 30
    while not server._queue and time.monotonic() < deadline:
        await asyncio.sleep(0)
    assert server._queue, "the burst never queued up in ingest"
    return writers


def test_a_callers_chain_of_loop_steps_runs_between_two_ingest_slices() -> None:
    """A unary gRPC call crosses the event loop several times (each await is a new callback).
    With ingest backlogged, the call's chain must run straight through rather than wait for a
    slice of ledger work at every step; and a caller that never stops queueing callbacks must
    not stop ingest: slices still run at least every few slice lengths and the backlog drains."""

    async def scenario() -> tuple[int, int, int, int]:
        ledger = Ledger(LedgerConfig(lockstep_wait_s=5.0))
        sockdir = short_socket_dir()
        server = IngestServer(ledger, f"unix:{sockdir}/i.sock", slice_s=0.000_2)
        await server.start()
        loop = asyncio.get_running_loop()
        try:
            writers = await _queued_burst(server, ledger, sockdir, groups=300)
            # A chain of 40 steps, each scheduling the next, as a call's awaits do.
            done = loop.create_future()
            before = server.counters.slices
            left = [40]

            def chain_step() -> None:
                left[0] -= 1
                if left[0]:
                    loop.call_soon(chain_step)
                else:
                    done.set_result(server.counters.slices - before)

            loop.call_soon(chain_step)
            slices_in_chain = await done
            queued_after_chain = len(server._queue)
            # A flood: a callback always waiting in the loop, until the backlog is gone.
            flooding = [True]
            flood_steps = [0]

            def flood() -> None:
                flood_steps[0] += 1
                if flooding[0]:
                    loop.call_soon(flood)

            loop.call_soon(flood)
            deadline = time.monotonic() + 60
            while (server._queue or ledger.counters.steps < 4 * 300) and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            flooding[0] = False
            for w in writers:
                w.close()
            return slices_in_chain, queued_after_chain, ledger.counters.steps, flood_steps[0]
        finally:
            await server.close()
            shutil.rmtree(sockdir, ignore_errors=True)

    slices_in_chain, queued_after_chain, steps, flood_steps = asyncio.run(scenario())
    assert queued_after_chain > 0  # the chain ran while ingest still had work
    # Without yielding, a slice runs between every two of the 40 steps; with it, only when a
    # step waited past the yield bound (a slow moment of this machine), never most of them.
    assert slices_in_chain <= 8, slices_in_chain
    assert steps == 4 * 300  # the flood did not stop ingest: every step attributed
    assert flood_steps > 100  # and the flood itself kept running meanwhile


async def _probe_server(guard: ApiGuard, method: str, handler) -> tuple[grpc.aio.Server, int]:  # type: ignore[no-untyped-def]
    """A started grpc.aio server on this loop with the API guard and one unary method
    ``/probe.Probe/<method>``; returns it and its port."""
    api = grpc.aio.server(interceptors=[guard])
    api.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "probe.Probe", {method: grpc.unary_unary_rpc_method_handler(handler)}
            )
        ]
    )
    port = api.add_insecure_port("127.0.0.1:0")
    await api.start()
    return api, port


def test_a_unary_call_being_served_holds_ingest_between_its_awaits() -> None:
    """Between two steps of a call the loop's run queue can be empty (the call waits on gRPC's
    threads), so yielding to ready callbacks does not protect it: the API guard's count of
    calls in flight does. A real grpc.aio server with the guard shares the loop with a
    backlogged ingest; a handler awaits ten waits on another thread. With the count wired in,
    ingest runs at most once per yield bound during the call; without it, slice after slice
    whenever the call waits. And the backlog still drains completely either way."""

    gaps = 10

    async def scenario(wired: bool) -> tuple[int, float, float, int]:
        ledger = Ledger(LedgerConfig(lockstep_wait_s=5.0))
        sockdir = short_socket_dir()
        server = IngestServer(ledger, f"unix:{sockdir}/i.sock", slice_s=0.000_2)
        guard = ApiGuard()
        if wired:
            server.calls_in_flight = guard.unary_in_flight
        await server.start()
        during: list[int] = []

        async def handler(request: bytes, context) -> bytes:
            before = server.counters.slices
            began = time.perf_counter()
            loop = asyncio.get_running_loop()
            for _ in range(gaps):  # waits on another thread, as a call's steps wait on gRPC's
                await loop.run_in_executor(None, time.sleep, 0.000_3)
            during.append(server.counters.slices - before)
            return str(time.perf_counter() - began).encode()

        api, port = await _probe_server(guard, "Hold", handler)
        try:
            writers = await _queued_burst(server, ledger, sockdir, groups=300)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                elapsed = float(await channel.unary_unary("/probe.Probe/Hold")(b"", timeout=30))
            deadline = time.monotonic() + 60
            while (server._queue or ledger.counters.steps < 4 * 300) and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            for w in writers:
                w.close()
            return during[0], elapsed, server.yield_s, ledger.counters.steps
        finally:
            await api.stop(0)
            await server.close()
            shutil.rmtree(sockdir, ignore_errors=True)

    held, elapsed, yield_s, steps = asyncio.run(scenario(wired=True))
    assert steps == 4 * 300
    # A slice needs a full yield bound of waiting since the last one: never more than this.
    assert held <= elapsed / yield_s + 1, (held, elapsed, yield_s)
    loose, _, _, steps = asyncio.run(scenario(wired=False))
    assert steps == 4 * 300
    assert loose >= gaps, loose  # unwired, slices ran during every wait


_MID_SLICE_CLIENT = """
import os, sys, time, grpc
target, go_fd, ready_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with grpc.insecure_channel(target) as channel:
    call = channel.unary_unary("/probe.Probe/Look")
    call(b"warm-up", timeout=30)  # connected before the backlog: the timed call only travels
    os.write(ready_fd, b"r")
    os.read(go_fd, 1)
    t = time.perf_counter()
    call(b"timed", timeout=30)
    print(time.perf_counter() - t)
"""


@pytest.mark.e2e
def test_a_call_arriving_mid_slice_is_served_before_the_slice_ends() -> None:
    """A slice of ledger work can be long (a large --ingest-slice, a big group, a backlog); a
    call that arrives while one runs must not wait for all of it. The slice looks between
    frames and between the phases of a lockstep group's attribution for a call waiting (gRPC's
    completion queue waking the loop) and stops there. Here one slice may run 10 s over a
    backlog of 200 lockstep groups; a client in its own process sends its call when the 10th
    group is attributed: the handler runs with most of the backlog still to do, and the rest
    is then attributed in full."""

    groups = 200

    async def scenario() -> tuple[int, bool, int, int, float]:
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()

        class Signalling(Ledger):
            def on_step(self, key, step, pause=None) -> None:  # type: ignore[no-untyped-def]
                super().on_step(key, step, pause)
                if self.counters.lockstep_groups == 10 and not fired:
                    fired.append(True)
                    os.write(go_w, b"g")  # the client sends now, mid-slice

        fired: list[bool] = []
        ledger = Signalling(LedgerConfig(lockstep_wait_s=5.0))
        sockdir = short_socket_dir()
        server = IngestServer(ledger, f"unix:{sockdir}/i.sock", slice_s=10.0)
        guard = ApiGuard()
        server.calls_in_flight = guard.unary_in_flight
        await server.start()
        seen: list[tuple[int, bool]] = []

        async def look(request: bytes, context) -> bytes:
            if request == b"timed":
                seen.append((ledger.counters.lockstep_groups, bool(server._queue) or ledger.parked))
            return b""

        api, port = await _probe_server(guard, "Look", look)
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _MID_SLICE_CLIENT,
            f"127.0.0.1:{port}",
            str(go_r),
            str(ready_w),
            pass_fds=(go_r, ready_w),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, os.read, ready_r, 1) == b"r"
            burst = _lockstep_burst(shards=4, groups=groups, batch=64)
            writers = []
            for setup, _ in burst:
                _, w = await asyncio.open_unix_connection(f"{sockdir}/i.sock")
                w.write(setup)
                writers.append(w)
            assert await poll_async(lambda: ledger.counters.events >= 4 * 64, 30)
            # The whole backlog in the kernel's buffers first, so that one slice can take it all.
            for conn in server._connections:
                conn.transport.pause_reading()
            for w, (_, steps) in zip(writers, burst, strict=True):
                w.write(steps)
                await w.drain()
            await asyncio.sleep(0.2)
            for conn in server._connections:
                conn.transport.resume_reading()
            out, _ = await asyncio.wait_for(client.communicate(), 60)
            assert await poll_async(lambda: ledger.counters.steps >= 4 * groups and not server._queue, 60)
            for w in writers:
                w.close()
            at, work_left = seen[0]
            return at, work_left, server.counters.cut_short, ledger.counters.steps, float(out)
        finally:
            if client.returncode is None:
                client.kill()
            await api.stop(0)
            await server.close()
            for fd in (go_r, go_w, ready_r, ready_w):
                os.close(fd)
            shutil.rmtree(sockdir, ignore_errors=True)

    at, work_left, cut_short, steps, latency = asyncio.run(scenario())
    assert work_left and at < groups // 2, (at, work_left, latency)
    assert cut_short >= 1
    assert steps == 4 * groups  # and nothing was lost by stopping


def test_an_engine_that_left_makes_room_for_a_new_engine_id() -> None:
    """At --max-engines a new engine id is admitted by forgetting the engine that left longest
    ago (no shard connected), with the requests it still held; an engine with a shard
    connected is never forgotten, and when every engine has one the newcomer is refused
    (too_many_engines) while the connected engines keep streaming."""

    async def wait(check, what: str) -> None:
        assert await poll_async(check, 10), f"timed out waiting for {what}"

    async def scenario() -> dict:
        ledger = Ledger(LedgerConfig())
        sockdir = short_socket_dir()
        server = IngestServer(ledger, f"unix:{sockdir}/i.sock", limits=IngestLimits(max_engines=2))
        await server.start()
        path = f"{sockdir}/i.sock"
        out: dict = {}
        try:
            # "old" runs a request to the end and leaves; "older" leaves earlier, with a live one.
            _, older = await asyncio.open_unix_connection(path)
            older.write(hello("older") + arrived(1, "older-1") + step(1, [1]))
            await wait(lambda: ledger.get("older-1") is not None, "older-1")
            older.close()
            await wait(lambda: server.counters.active_connections == 0, "older to leave")
            _, old = await asyncio.open_unix_connection(path)
            old.write(hello("old") + arrived(1, "old-1") + step(1, [1]) + finished(1, 1))
            await wait(lambda: (v := ledger.get("old-1")) is not None and v.state.name == "FINISHED", "old-1")
            old.close()
            await wait(lambda: server.counters.active_connections == 0, "old to leave")
            # A new id: "older" (left first) goes, with its request; "old" stays.
            _, stay = await asyncio.open_unix_connection(path)
            stay.write(hello("stay") + arrived(1, "stay-1") + step(1, [1]))
            await wait(lambda: ledger.get("stay-1") is not None, "stay-1")
            out["after_first"] = sorted(s.engine_id for s in ledger.shards())
            out["older_1"] = ledger.get("older-1")
            out["old_1"] = ledger.get("old-1") is not None
            # Another: "old" goes (the only engine left with no shard connected).
            _, also = await asyncio.open_unix_connection(path)
            also.write(hello("also") + arrived(1, "also-1") + step(1, [1]))
            await wait(lambda: ledger.get("also-1") is not None, "also-1")
            out["after_second"] = sorted(s.engine_id for s in ledger.shards())
            # Both held engines are connected now: a third id is refused, and they keep going.
            refused_r, refused_w = await asyncio.open_unix_connection(path)
            refused_w.write(hello("refused"))
            out["refused_eof"] = await asyncio.wait_for(refused_r.read(), 10)
            stay.write(arrived(2, "stay-2") + step(2, [1, 2]))
            await wait(lambda: ledger.get("stay-2") is not None, "stay-2 after the refusal")
            out["rejected"] = dict(server.counters.rejected)
            out["forgotten"] = (ledger.counters.engines_forgotten, ledger.counters.forgotten_requests)
            out["final"] = sorted(s.engine_id for s in ledger.shards())
            for w in (stay, also, refused_w):
                w.close()
        finally:
            await server.close()
            shutil.rmtree(sockdir, ignore_errors=True)
        return out

    out = asyncio.run(scenario())
    assert out["after_first"] == ["old", "stay"]
    assert out["older_1"] is None and out["old_1"]  # forgotten with its engine; the other kept
    assert out["after_second"] == ["also", "stay"]
    assert out["refused_eof"] == b"" and out["rejected"] == {"too_many_engines": 1}
    assert out["forgotten"] == (2, 2)
    assert out["final"] == ["also", "stay"]
