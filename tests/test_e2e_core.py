"""End to end across processes: engine shards -> sidecar -> typed clients.

Three OS processes besides pytest: a real ``enginetime sidecar`` and two engine
shards of one LOCKSTEP engine ("e2e"), each a Python process with its own
``Recorder``. The shards do real work sized by their batch (numpy matmuls through
a small stack of layers) and meet at a real collective after every step (a
socketpair all-gather of their token counts, like DP attention's gather in an MoE
layer), so a shard's step lasts as long as the slower shard's, as on the GPU.

Shard 1 serves three decode requests. Shard 0 is idle until a long prompt arrives
and is prefilled in 512-token chunks (prefill-first): the incident in miniature.
While that runs, the clients (sync and asyncio, in this process) follow the
requests through every RPC, and the test checks what a session server relies on:
each victim's top blame names the prefill request on the other shard, the storm
shows up on StreamInterference, and every request's figures obey
``wall = queue + engine_time + interference + other`` with every term >= 0.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from helpers import start_sidecar, wait_until
from lockstep_shards import start_pair

from enginetime.clients import (
    AccountingClient,
    AsyncAccountingClient,
    Coupling,
    InterferencePhase,
    RequestAccounting,
    RequestState,
)

pytestmark = pytest.mark.e2e  # every test here starts processes (see conftest.py)

VICTIMS = ("decode-0", "decode-1", "decode-2")
STORM = "storm-0"
ENGINE = "e2e"
DECODE_PROMPT = 32
DECODE_OUTPUT = 48
STORM_CHUNKS = 12
STORM_AT = 10  # global step at which the long prompt arrives on shard 0
CHUNK = 512
STORM_DECODE = 4
#: Stall summed over victims that makes a prefill a storm. The test's storm costs
#: three victims ~12 chunk-steps each (~1 s summed on 2 CPU cores); the default
#: threshold (1 s) is scaled down so slower machines still cross it.
STORM_THRESHOLD_S = "0.1"

# The engine shard's scheduler (after lockstep_shards.PRELUDE). It prints "ready" once its
# requests are announced, waits for "go", runs the schedule, prints "done {json}".
SHARD_LOOP = r"""
class Req:
    def __init__(self, rid, prompt, output):
        self.rid, self.prompt, self.output = rid, prompt, output
        self.prefilled, self.decoded = 0, 0
        self.handle = rec.request_arrived(rid, prompt_tokens=prompt, session_id="sess-" + rid)


rec = Recorder(P["engine"], shard=SHARD, num_shards=2, coupling="lockstep", address=ADDRESS,
               engine_kind="e2e")
waiting = []
if SHARD == 1:
    waiting = [Req(rid, P["decode_prompt"], P["decode_output"]) for rid in P["victims"]]
assert rec.flush(10.0), "could not reach the sidecar at " + ADDRESS
print("ready", flush=True)
sys.stdin.readline()

running, g, storm_steps_ns = [], 0, []
while True:
    if SHARD == 0 and g == P["storm_at"]:
        waiting.append(Req(P["storm"], P["storm_chunks"] * P["chunk"], P["storm_decode"]))
    for r in waiting:
        rec.request_scheduled(r.handle)
        running.append(r)
    waiting = []
    # Prefill-first: a step with prefill work runs only prefill (the decodes wait).
    prefilling = [r for r in running if r.prefilled < r.prompt]
    batch = prefilling or running
    kind = StepKind.PREFILL if prefilling else (StepKind.DECODE if running else StepKind.IDLE)
    pre = [min(P["chunk"], r.prompt - r.prefilled) if prefilling else 0 for r in batch]
    dec = [0 if prefilling else 1 for _ in batch]
    ctx = [r.prefilled + r.decoded for r in batch]
    tokens = sum(pre) + sum(dec)
    finishing = [r for r, d in zip(batch, dec) if r.decoded + d >= r.output]
    more = int(len(running) > len(finishing) or (SHARD == 0 and g < P["storm_at"]))
    t0 = time.perf_counter_ns()
    tok = rec.step_begin()
    forward(tokens)
    peer_tokens, peer_more = all_gather(tokens, more)
    peers = [tokens, peer_tokens] if SHARD == 0 else [peer_tokens, tokens]
    rec.step_end(tok, kind=kind, handles=[r.handle for r in batch], prefill_tokens=pre, decode_tokens=dec,
                 context_tokens=ctx, global_step=g, peer_tokens=peers)
    if kind == StepKind.PREFILL and SHARD == 0:
        storm_steps_ns.append(time.perf_counter_ns() - t0)
    for r, p, d in zip(batch, pre, dec):
        r.prefilled += p
        r.decoded += d
    for r in finishing:
        rec.request_finished(r.handle, reason="length", output_tokens=r.decoded)
        running.remove(r)
    g += 1
    if not more and not peer_more:  # both shards saw the same pair: they stop together
        break

ok = rec.flush(10.0)
stats = rec.stats()
rec.close()
print("done " + json.dumps({"steps": g, "flushed": ok, "dropped": stats.dropped_frames,
                            "storm_steps_ns": storm_steps_ns}), flush=True)
"""


PARAMS = {
    "engine": ENGINE,
    "forward": [512, 8, 16],  # hidden size, layers, rows every step reads whatever its batch
    "victims": list(VICTIMS),
    "storm": STORM,
    "decode_prompt": DECODE_PROMPT,
    "decode_output": DECODE_OUTPUT,
    "storm_at": STORM_AT,
    "storm_chunks": STORM_CHUNKS,
    "chunk": CHUNK,
    "storm_decode": STORM_DECODE,
}


def _check_identity(r: RequestAccounting) -> None:
    terms = {
        "queue_time": r.queue_time_ns,
        "engine_time": r.engine_time_ns,
        "interference": r.interference_ns,
        "other": r.other_ns,
        "gpu_time": r.gpu_time_ns,
    }
    assert all(v >= 0 for v in terms.values()), f"{r.request_id}: negative term in {terms}"
    assert r.wall_ns >= r.queue_time_ns + r.engine_time_ns + r.interference_ns, r
    assert r.wall_ns == r.queue_time_ns + r.engine_time_ns + r.interference_ns + r.other_ns, r


class AsyncFollower:
    """The asyncio client on its own thread/loop: StreamUpdates for the engine and a WatchRequest."""

    def __init__(self, target: str, watch_id: str) -> None:
        self.target, self.watch_id = target, watch_id
        self.batches = []
        self.watched: list[RequestAccounting] = []
        self.final: dict[str, RequestAccounting] = {}
        self.watching = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="async-client", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._main(), 40))
        except BaseException as exc:  # reported by the test thread
            self.error = exc
            self.watching.set()

    async def _main(self) -> None:
        async with AsyncAccountingClient(self.target) as client:
            updates = client.stream_updates(engine_id=ENGINE, interval=0.05)
            seen_final: set[str] = set()

            async def follow_updates() -> None:
                async with updates:
                    async for batch in updates:
                        self.batches.append(batch)
                        seen_final.update(u.request_id for u in batch.updates if u.terminal)
                        if seen_final >= {*VICTIMS, STORM}:
                            return

            task = asyncio.ensure_future(follow_updates())
            async for acct in client.watch_request(self.watch_id, min_interval=0.02):
                self.watched.append(acct)
                self.watching.set()
            await task
            for rid in (*VICTIMS, STORM):
                self.final[rid] = await client.get_request(rid)


@pytest.mark.timeout(120)
def test_core_end_to_end_across_processes(tmp_path: Path) -> None:
    started = time.monotonic()
    with (
        start_sidecar(tmp_path, "--storm-threshold", STORM_THRESHOLD_S) as sidecar,
        AccountingClient(sidecar.grpc_target) as client,
    ):
        shards = start_pair(tmp_path / "shard.py", SHARD_LOOP, sidecar.ingest, PARAMS)
        try:
            for s in shards:
                s.expect("ready")
            # The victims are known as soon as the sidecar has read their arrival, before any step.
            wait_until(
                lambda: client.list_requests(engine_id=ENGINE).total_size == len(VICTIMS),
                message="the sidecar never listed the three announced requests",
            )
            queued = client.get_request("decode-0")
            assert queued.state is RequestState.QUEUED and queued.shard == 1
            assert queued.tokens.prompt == DECODE_PROMPT and queued.session_id == "sess-decode-0"

            # Subscribe before the engine runs (streams first, then the watches,
            # whose first answer says the connection is up).
            storms = client.stream_interference(engine_id=ENGINE)
            events: list = []
            storm_reader = threading.Thread(target=lambda: _read_storms(storms, events), daemon=True)
            storm_reader.start()
            follower = AsyncFollower(sidecar.grpc_target, "decode-1")
            follower.thread.start()
            # A deadline, so a watch that never ends fails the test instead of hanging it.
            watch = client.watch_request("decode-0", min_interval=0.02, timeout=60)
            watched = [next(watch)]
            assert follower.watching.wait(10) and follower.error is None, follower.error

            for s in shards:
                s.go()
            watched.extend(watch)  # ends by itself when decode-0 finishes
            summaries = [s.finish(30) for s in shards]
        finally:
            for s in shards:
                s.kill()

        follower.thread.join(30)
        assert not follower.thread.is_alive() and follower.error is None, follower.error
        storm_reader.join(10)
        storms.close()

        # --- the run itself went as planned: both shards stepped in lockstep, nothing lost
        assert summaries[0]["steps"] == summaries[1]["steps"] > STORM_CHUNKS
        assert all(s["flushed"] and s["dropped"] == 0 for s in summaries), summaries
        storm_ns = sum(summaries[0]["storm_steps_ns"])

        # --- WatchRequest (sync): followed decode-0 from queued/running to finished, then ended
        assert watched[-1].state is RequestState.FINISHED and watched[-1].terminal
        assert len(watched) >= 3 and any(w.state is RequestState.RUNNING for w in watched)
        decoded = [w.tokens.decoded for w in watched]
        assert decoded == sorted(decoded) and decoded[-1] == DECODE_OUTPUT

        # --- WatchRequest + StreamUpdates (async): saw the requests change
        assert follower.watched[-1].state is RequestState.FINISHED and len(follower.watched) >= 3
        by_id: dict[str, list[RequestAccounting]] = {}
        for batch in follower.batches:
            for u in batch.updates:
                by_id.setdefault(u.request_id, []).append(u)
        assert set(by_id) == {*VICTIMS, STORM}
        for rid, history in by_id.items():
            assert history[-1].terminal, rid
            assert len({h.engine_time_ns for h in history}) >= 2, f"{rid}: no change seen in {history}"
        assert any(u.state is RequestState.RUNNING for u in by_id[STORM])

        # --- GetShards: both shards of the lockstep engine stepped
        shards_status = {s.shard: s for s in client.get_shards(ENGINE)}
        assert sorted(shards_status) == [0, 1]
        steps = summaries[0]["steps"]
        for s in shards_status.values():
            assert s.engine_id == ENGINE and s.engine_kind == "e2e" and s.coupling is Coupling.LOCKSTEP
            assert 0 < s.steps <= steps, (s, steps)
        assert shards_status[1].steps == steps  # shard 1 was never idle

        # --- GetRequest / ListRequests: final accounting, sync equals async
        final = {rid: client.get_request(rid) for rid in (*VICTIMS, STORM)}
        assert final == follower.final
        listed = list(client.iter_requests(engine_id=ENGINE, states=["finished"], page_size=2))
        assert sorted(r.request_id for r in listed) == sorted(final)
        for r in final.values():
            _check_identity(r)
            assert r.state is RequestState.FINISHED and r.finish_reason == "length"
            assert r.finish_time is not None and r.last_step_time is not None
            assert r.engine_id == ENGINE and not r.partial

        storm = final[STORM]
        assert storm.shard == 0 and storm.tokens.prefilled == STORM_CHUNKS * CHUNK
        assert storm.tokens.decoded == STORM_DECODE

        # --- the victims: cross-shard blame names the storm, and it is most of their lost time
        for rid in VICTIMS:
            v = final[rid]
            assert v.shard == 1 and v.tokens.prefilled == DECODE_PROMPT and v.tokens.decoded == DECODE_OUTPUT
            assert v.top_blame, f"{rid} has no blame: {v}"
            top = v.top_blame[0]
            assert (top.request_id, top.shard, top.same_shard, top.engine_id) == (STORM, 0, False, ENGINE), v
            # The storm's chunk steps lasted storm_ns on its shard; the victims waited
            # through them. Its blame must be a large part of that, and of the
            # victim's whole interference.
            assert top.seconds_ns >= 0.5 * storm_ns, (top, storm_ns)
            assert top.seconds_ns >= 0.5 * v.interference_ns, v
            # None of the storm's time is the victim's own: its engine_time leaves at least half
            # of the storm out of its wall. (Not "interference > engine_time": on loaded cores the
            # victims' own decode steps slow down too, and that ratio is the machine's, not ours.)
            assert v.engine_time_ns <= v.wall_ns - 0.5 * storm_ns, (v, storm_ns)

        # --- StreamInterference: the prefill was a cross-shard storm with shard 1 as victim
        mine = [e for e in events if e.aggressor_request_id == STORM]
        assert mine, f"no interference event for {STORM}: {events}"
        # A warning at admission first (the victims were running on shard 1), then the storm itself.
        assert [e.phase for e in mine[:2]] == [InterferencePhase.PREDICTED, InterferencePhase.STARTED], mine
        assert mine[0].victims.shards == (1,) and mine[0].chunks == 0
        assert mine[-1].phase is InterferencePhase.ENDED
        assert all(e.aggressor_shard == 0 and e.cross_shard for e in mine)
        assert 1 in mine[-1].victims.shards and mine[-1].victims.request_count == len(VICTIMS)
        assert mine[-1].victims.seconds_ns >= 0.5 * len(VICTIMS) * storm_ns
    assert time.monotonic() - started < 60


def _read_storms(stream, events: list) -> None:
    """Collect interference events until the storm ends (or the stream is closed)."""
    for e in stream:
        events.append(e)
        if e.aggressor_request_id == STORM and e.phase is InterferencePhase.ENDED:
            return
