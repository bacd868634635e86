"""A fleet: one guard following several sidecars, one per engine.

The engines here are recorders played by hand — ingest frames (tests/helpers.py) sent
over each real sidecar's ingest socket, one thread per engine stepping its running
requests — because the point is the guard's view of a fleet, not a model: three real
sidecar processes, one ``Guard`` with the three addresses, and a request found on
whichever sidecar reports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading

import pytest
from helpers import IngestConnection, arrived, finished, hello, step, wait_until

from enginetime.clients import AsyncGuard, BudgetReason, EngineBudget, EngineBudgetExceeded, Guard, _fleet

STEP_NS = 10_000_000  # each step: 10 ms of device time
TICK = 0.015  # one step every 15 ms of wall time


class HandEngine:
    """One engine's recorder: arrivals, a step every TICK for its running requests, finishes.

    ``abort`` ends a request as an engine's /abort_request would. When the sidecar dies the
    engine keeps stepping (hooks never wait on the sidecar); only the frames are lost.
    """

    def __init__(self, ingest: str, engine_id: str) -> None:
        self.engine_id = engine_id
        self.conn = IngestConnection(ingest)
        self.conn.send(hello(engine_id))
        self.lock = threading.Lock()
        self.running: dict[int, list] = {}  # handle -> [rid, steps left]
        self.new: list[tuple[int, str]] = []
        self.ended: list[tuple[int, str]] = []
        self.done: dict[str, threading.Event] = {}
        self.steps: dict[str, int] = {}
        self.aborted: list[str] = []
        self.link_up = True
        self._next = 1
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def submit(self, rid: str, steps: int) -> threading.Event:
        with self.lock:
            h, self._next = self._next, self._next + 1
            self.running[h] = [rid, steps]
            self.new.append((h, rid))
            self.steps[rid] = 0
            ev = self.done[rid] = threading.Event()
        return ev

    def abort(self, rid: str) -> None:
        with self.lock:
            for h, (r, _) in list(self.running.items()):
                if r == rid:
                    del self.running[h]
                    self.ended.append((h, "abort"))
                    self.aborted.append(rid)
                    self.done[rid].set()

    def _loop(self) -> None:
        while not self._stop.wait(TICK):
            with self.lock:
                chunks = [arrived(h, rid) for h, rid in self.new]
                self.new.clear()
                handles = list(self.running)
                if handles:
                    self._seq += 1
                    chunks.append(step(self._seq, handles, device_time_ns=STEP_NS))
                for h in handles:
                    entry = self.running[h]
                    self.steps[entry[0]] += 1
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self.running[h]
                        self.ended.append((h, "stop"))
                        self.done[entry[0]].set()
                chunks += [finished(h, reason=why) for h, why in self.ended]
                self.ended.clear()
            if chunks and self.link_up:
                try:
                    self.conn.send(*chunks)
                except OSError:
                    self.link_up = False  # the sidecar died: the engine carries on

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.close()


def run_watched(guard: Guard, eng: HandEngine, rid: str, steps: int, budget: EngineBudget, out: dict):
    """A session server's call: watch the request, send it to the engine, wait for its answer."""
    try:
        with guard.watch(rid, budget) as w:
            done = eng.submit(rid, steps)
            assert done.wait(30), f"{rid} never ended"
        out[rid] = w
    except EngineBudgetExceeded as exc:
        out[rid] = exc


def in_threads(*calls) -> list[threading.Thread]:
    threads = [threading.Thread(target=run_watched, args=c) for c in calls]
    for t in threads:
        t.start()
    return threads


@pytest.mark.e2e
def test_one_guard_three_sidecars_kills_the_runaway_only_and_a_dead_sidecar_kills_nothing(
    sidecar_factory, caplog
):
    caplog.set_level(logging.INFO, "enginetime.clients.guard")
    sidecars = [sidecar_factory() for _ in range(3)]
    engines = [HandEngine(sc.ingest, f"fleet-{i}") for i, sc in enumerate(sidecars)]
    guard = Guard(
        [sc.grpc_target for sc in sidecars],
        EngineBudget(engine_time=5, liveness=0.3, wall=60),
        abort={e.engine_id: e.abort for e in engines},
        interval=0.05,
        reconnect=(0.05, 0.3),
    )
    runaway = EngineBudget(engine_time=0.3, liveness=5, wall=60)
    try:
        assert sorted(guard.targets) == sorted(sc.grpc_target for sc in sidecars)
        out: dict = {}
        # Phase 1: a runaway on engine 0, ordinary requests on engines 1 and 2 (none names its engine).
        for t in in_threads(
            (guard, engines[0], "runaway", 10_000, runaway, out),
            (guard, engines[1], "ok-1", 30, guard.budget, out),
            (guard, engines[2], "ok-2", 30, guard.budget, out),
        ):
            t.join(40)
        err = out["runaway"]
        assert isinstance(err, EngineBudgetExceeded), err
        assert err.reason is BudgetReason.ENGINE_TIME and err.telemetry and err.aborted
        assert err.accounting is not None and err.accounting.engine_id == "fleet-0"
        assert 0.3 <= err.accounting.engine_time < 1.0
        assert engines[0].aborted == ["runaway"] and not engines[1].aborted and not engines[2].aborted
        for rid, eng in (("ok-1", engines[1]), ("ok-2", engines[2])):
            w = out[rid]
            assert not isinstance(w, EngineBudgetExceeded), w
            assert w.accounting is not None and w.accounting.engine_id == eng.engine_id
            assert eng.steps[rid] == 30

        # Phase 2: sidecar 2 is SIGKILLed while its request runs; engines 0 and 1 stay enforced.
        out.clear()
        threads = in_threads(
            (guard, engines[2], "on-dead", 150, EngineBudget(engine_time=0.5, liveness=0.3, wall=60), out),
            (guard, engines[0], "ok-0", 100, guard.budget, out),
        )
        wait_until(
            lambda: "on-dead" in guard._tracker.entries and guard._tracker.entries["on-dead"].progress > 3,
            10,
            message="the guard never saw on-dead step",
        )
        sidecars[2].kill()
        wait_until(lambda: not engines[2].link_up, 5, message="engine 2 never noticed its sidecar died")
        # A runaway on a live sidecar after the death is still killed on its engine time.
        threads += in_threads((guard, engines[1], "runaway-2", 10_000, runaway, out))
        for t in threads:
            t.join(40)
        # on-dead ran past its 0.5 s engine-time budget and 3x its liveness limit without telemetry:
        # it is not killed (fail-open), and it finishes.
        assert engines[2].steps["on-dead"] == 150 and 150 * STEP_NS / 1e9 > 0.5
        assert not isinstance(out["on-dead"], EngineBudgetExceeded), out["on-dead"]
        assert not isinstance(out["ok-0"], EngineBudgetExceeded), out["ok-0"]
        err = out["runaway-2"]
        assert isinstance(err, EngineBudgetExceeded), err
        assert err.reason is BudgetReason.ENGINE_TIME and err.accounting.engine_id == "fleet-1"
        assert engines[1].aborted == ["runaway-2"] and not engines[2].aborted
        expected = {r.value: (2 if r is BudgetReason.ENGINE_TIME else 0) for r in BudgetReason}
        assert guard.stats.fires == expected
        down = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(down) == 1 and sidecars[2].grpc_target in down[0], down
        assert guard.telemetry_up  # the two others still deliver
    finally:
        guard.close()
        for e in engines:
            e.close()


@pytest.mark.e2e
def test_async_guard_follows_two_sidecars(sidecar_factory):
    sidecars = [sidecar_factory() for _ in range(2)]
    engines = [HandEngine(sc.ingest, f"afleet-{i}") for i, sc in enumerate(sidecars)]

    async def main() -> dict:
        out: dict = {}
        guard = AsyncGuard(
            [sc.grpc_target for sc in sidecars],
            EngineBudget(engine_time=5, wall=60),
            abort={e.engine_id: e.abort for e in engines},
            interval=0.05,
        )

        async def one(eng: HandEngine, rid: str, steps: int, budget: EngineBudget | None = None) -> None:
            try:
                async with guard.watch(rid, budget) as w:
                    done = eng.submit(rid, steps)
                    await asyncio.to_thread(done.wait, 30)
                out[rid] = w
            except EngineBudgetExceeded as exc:
                out[rid] = exc

        async with guard:
            await asyncio.gather(
                one(engines[1], "a-runaway", 10_000, EngineBudget(engine_time=0.3, wall=60)),
                one(engines[0], "a-ok", 30),
            )
            # The abort runs as a task of the guard: let it reach the engine before closing.
            for _ in range(500):
                if guard.aborts_sent or guard.aborts_failed:
                    break
                await asyncio.sleep(0.01)
        return out

    try:
        out = asyncio.run(main())
        err = out["a-runaway"]
        assert isinstance(err, EngineBudgetExceeded) and err.reason is BudgetReason.ENGINE_TIME, err
        assert err.accounting.engine_id == "afleet-1" and engines[1].aborted == ["a-runaway"]
        assert not isinstance(out["a-ok"], EngineBudgetExceeded), out["a-ok"]
        assert out["a-ok"].accounting.engine_id == "afleet-0" and not engines[0].aborted
    finally:
        for e in engines:
            e.close()


# ---------------------------------------------------------------------------- targets and dns (in-process)


def test_targets_lists_strings_and_bad_input():
    assert _fleet.split_targets("a:1, b:2,a:1") == ["a:1", "b:2"]
    assert _fleet.split_targets(["a:1", "b:2"]) == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="no sidecar given"):
        _fleet.split_targets([])
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        _fleet.parse_dns("dns:///no-port")
    with pytest.raises(TypeError, match="engine id -> engine base URL"):
        Guard("127.0.0.1:1", abort={"e": None})


def test_dns_target_expands_to_every_address_and_keeps_plain_ones():
    """A stub resolver stands in for a headless Service's several A/AAAA records."""
    calls = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return ["127.0.0.2", "127.0.0.3", "::1", "127.0.0.2"]

    addrs, errors = _fleet.expand(["dns:///sidecars.ns.svc:50151", "10.0.0.9:1"], resolver)
    assert addrs == ["127.0.0.2:50151", "127.0.0.3:50151", "[::1]:50151", "10.0.0.9:1"] and not errors
    assert calls == [("sidecars.ns.svc", 50151)]

    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(-2, "Name or service not known")

    addrs, errors = _fleet.expand(["dns:///gone.svc:1", "10.0.0.9:1"], failing)
    assert addrs == ["10.0.0.9:1"] and "gone.svc" in errors[0]


def test_dns_localhost_resolves_through_the_system_resolver():
    """Covers the real getaddrinfo path: localhost gives 127.0.0.1 (and [::1] where IPv6 is set up)."""
    addrs, errors = _fleet.expand(["dns:///localhost:50151"])
    assert not errors and "127.0.0.1:50151" in addrs
    assert set(addrs) <= {"127.0.0.1:50151", "[::1]:50151"}


def test_a_guard_follows_the_addresses_a_name_resolves_to_as_they_change():
    """Pods come and go: re-resolution opens a client for a new address and drops a gone one."""
    answer = ["127.0.0.2", "127.0.0.3"]
    guard = Guard("dns:///sidecars.ns.svc:50151", resolver=lambda h, p: list(answer))
    try:
        assert guard.targets == ["127.0.0.2:50151", "127.0.0.3:50151"]
        answer[:] = ["127.0.0.3", "127.0.0.4"]
        guard._set_targets(guard._resolve())
        assert guard.targets == ["127.0.0.3:50151", "127.0.0.4:50151"]
    finally:
        guard.close()


# ---------------------------------------------------------------------------- the CLI over a fleet


def et(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "enginetime", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.e2e
def test_cli_covers_several_sidecars(sidecar_factory):
    sidecars = [sidecar_factory() for _ in range(2)]
    engines = [HandEngine(sc.ingest, f"cli-fleet-{i}") for i, sc in enumerate(sidecars)]
    try:
        for i, eng in enumerate(engines):
            assert eng.submit(f"cli-fleet-req-{i}", 5).wait(10)
        a, b = (sc.grpc_target for sc in sidecars)

        def listed(*extra: str) -> dict[str, str]:
            out = et("requests", "--sidecar", f"{a},{b}", "--json", *extra)
            assert out.returncode == 0, out.stderr
            return {r["request_id"]: r["engine_id"] for r in json.loads(out.stdout)}

        def both() -> dict[str, str] | None:
            rows = listed()
            return rows if len(rows) >= 2 else None

        rows = wait_until(both, 10, message="the two sidecars' requests were never both listed")
        assert rows == {"cli-fleet-req-0": "cli-fleet-0", "cli-fleet-req-1": "cli-fleet-1"}

        got = et("get", "cli-fleet-req-1", "--sidecar", f"{a},{b}", "--json")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["engine_id"] == "cli-fleet-1"
        missing = et("get", "no-such", "--sidecar", f"{a},{b}")
        assert missing.returncode == 4 and "no-such" in missing.stderr

        top = et("top", "--sidecar", f"{a},{b}", "--json")
        assert top.returncode == 0, top.stderr
        shards = {(s["engine_id"], s["shard"]) for s in json.loads(top.stdout)["shards"]}
        assert shards == {("cli-fleet-0", 0), ("cli-fleet-1", 0)}

        # A sidecar of the list that does not answer is named on stderr; the others are still listed.
        partial = et("requests", "--sidecar", f"{a},127.0.0.1:1", "--json")
        assert partial.returncode == 0, partial.stderr
        assert [r["request_id"] for r in json.loads(partial.stdout)] == ["cli-fleet-req-0"]
        assert "127.0.0.1:1" in partial.stderr
        # None answers: exit 3 as with one sidecar.
        assert et("requests", "--sidecar", "127.0.0.1:1,127.0.0.1:2").returncode == 3

        # dns:/// through the system resolver: localhost is 127.0.0.1 (and ::1, skipped if not served).
        port = a.rsplit(":", 1)[1]
        via_dns = et("requests", "--sidecar", f"dns:///localhost:{port}", "--json")
        assert via_dns.returncode == 0, via_dns.stderr
        assert [r["request_id"] for r in json.loads(via_dns.stdout)] == ["cli-fleet-req-0"]
    finally:
        for e in engines:
            e.close()


@pytest.mark.e2e
def test_guard_follows_a_dns_name_over_several_loopback_sidecars_as_they_come_and_go(sidecar_factory, caplog):
    """A stub resolver (no /etc/hosts, no root) answers a name with 127.0.0.2 and 127.0.0.3, as a
    headless Service answers with its pods; real sidecars listen there on one port. Covers the
    guard's re-resolution, streams opened for new addresses and dropped for gone ones; the system
    resolver's path (getaddrinfo) is covered by the CLI test's dns:///localhost."""
    caplog.set_level(logging.INFO, "enginetime.clients.guard")
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    sidecars = [sidecar_factory("--listen", f"127.0.0.{k}:{port}") for k in (2, 3)]
    engines = [HandEngine(sc.ingest, f"dns-{k}") for k, sc in zip((2, 3), sidecars, strict=True)]
    answer = ["127.0.0.2"]
    guard = Guard(
        f"dns:///sidecars.fleet.test:{port}",
        EngineBudget(engine_time=5, wall=60),
        resolver=lambda host, p: list(answer) if host == "sidecars.fleet.test" else [],
        resolve_interval=0.1,
        interval=0.05,
        abort={e.engine_id: e.abort for e in engines},
    )
    try:
        out: dict = {}
        for t in in_threads((guard, engines[0], "dns-ok", 10, guard.budget, out)):
            t.join(30)
        assert out["dns-ok"].accounting.engine_id == "dns-2"
        answer.append("127.0.0.3")  # a pod joins
        wait_until(lambda: len(guard.targets) == 2, 10, message="the guard never followed the new address")
        runaway = EngineBudget(engine_time=0.3, wall=60)
        for t in in_threads((guard, engines[1], "dns-runaway", 10_000, runaway, out)):
            t.join(30)
        err = out["dns-runaway"]
        assert isinstance(err, EngineBudgetExceeded) and err.reason is BudgetReason.ENGINE_TIME, err
        assert engines[1].aborted == ["dns-runaway"]
        answer.remove("127.0.0.2")  # a pod leaves
        wait_until(lambda: guard.targets == [f"127.0.0.3:{port}"], 10, message="the gone address was kept")
        assert any("left the fleet" in r.getMessage() for r in caplog.records)
    finally:
        guard.close()
        for e in engines:
            e.close()
