"""The testbed is a real engine: its numbers and its step records must be right.

Covers what a user of the testbed relies on: chunked prefill computes the same
logits as unchunked (it is real attention over the cached KV), greedy decoding is
a function of the seed, the prefix cache makes a sticky turn cheap and a migrated
one expensive — counted from the step records the engine_hooks adapter actually
sent — and the LOCKSTEP / INDEPENDENT / policy mechanics the incident depends on.
Step records are captured by a real Unix socket server decoding the frames with
the generated protobuf stubs.
"""

from __future__ import annotations

import random
import shutil
import socket
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch
from helpers import read_ingest_frame

from enginetime.engine_hooks import StepKind
from enginetime.testbed.engine import Engine, EngineConfig, InvalidRequest
from enginetime.testbed.model import ForwardItem, ModelConfig, TinyTransformer
from enginetime.v1 import ingest_pb2

pytestmark = pytest.mark.e2e  # every test here runs the testbed engine (see conftest.py)

SMALL = ModelConfig(
    vocab_size=512, d_model=128, n_layers=2, n_heads=4, head_dim=16, d_ff=256, max_context=8192, seed=3
)


def ids(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


# ---------------------------------------------------------------------------- frame capture


def _read_varint(buf: bytearray, pos: int) -> tuple[int, int] | None:
    shift = value = 0
    while pos < len(buf):
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return None


@dataclass
class Capture:
    """Frames of one recorder connection, decoded with the generated stubs."""

    hello: ingest_pb2.EngineHello | None = None
    events: list[ingest_pb2.RequestEvent] = field(default_factory=list)
    steps: list[ingest_pb2.StepRecord] = field(default_factory=list)


class FrameSink:
    """A listening ingest socket that records every frame, per shard."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tb-", dir="/tmp")
        self.path = f"{self.dir}/ingest.sock"
        self.address = f"unix:{self.path}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.lock = threading.Lock()
        self.by_shard: dict[int, Capture] = defaultdict(Capture)
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = bytearray()
        cap: Capture | None = None
        while True:
            try:
                data = conn.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            buf += data
            while True:
                head = _read_varint(buf, 0)
                if head is None or head[1] + head[0] > len(buf):
                    break
                size, start = head
                frame = read_ingest_frame(bytes(buf[start : start + size]))
                del buf[: start + size]
                with self.lock:
                    which = frame.WhichOneof("frame")
                    if which == "hello":
                        cap = self.by_shard[frame.hello.shard]
                        cap.hello = frame.hello
                    elif cap is not None and which == "request_event":
                        cap.events.append(frame.request_event)
                    elif cap is not None and which == "step":
                        cap.steps.append(frame.step)

    def wait_finished(self, shard: int, rid: str, timeout_s: float = 10.0) -> None:
        """Frames of one shard arrive in order, so once a request's FINISHED is read, every step
        record before it has been read too (Recorder.flush only says they were written)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                handles = {
                    e.handle
                    for e in self.by_shard[shard].events
                    if e.kind == ingest_pb2.REQUEST_EVENT_KIND_ARRIVED and e.request_id == rid
                }
                if any(
                    e.handle in handles and e.kind == ingest_pb2.REQUEST_EVENT_KIND_FINISHED
                    for e in self.by_shard[shard].events
                ):
                    return
            time.sleep(0.01)
        raise AssertionError(f"no FINISHED event for {rid} on shard {shard} within {timeout_s} s")

    def handle_of(self, shard: int, rid: str) -> int:
        with self.lock:
            for ev in self.by_shard[shard].events:
                if ev.kind == ingest_pb2.REQUEST_EVENT_KIND_ARRIVED and ev.request_id == rid:
                    return ev.handle
        raise AssertionError(f"no ARRIVED event for {rid} on shard {shard}")

    def event(self, shard: int, handle: int, kind: int) -> ingest_pb2.RequestEvent:
        with self.lock:
            for ev in self.by_shard[shard].events:
                if ev.handle == handle and ev.kind == kind:
                    return ev
        raise AssertionError(f"no event kind {kind} for handle {handle} on shard {shard}")

    def prefilled(self, shard: int, handle: int) -> int:
        """Prompt tokens the engine computed for a request, summed over its step records."""
        total = 0
        with self.lock:
            for st in self.by_shard[shard].steps:
                for h, p in zip(st.handles, st.prefill_tokens, strict=True):
                    if h == handle:
                        total += p
        return total

    def steps(self, shard: int) -> list[ingest_pb2.StepRecord]:
        with self.lock:
            return list(self.by_shard[shard].steps)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_until(pred, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def sink():
    s = FrameSink()
    yield s
    s.close()


def make_engine(**kw) -> Engine:
    kw.setdefault("model", SMALL)
    kw.setdefault("hooks", False)
    return Engine(EngineConfig(**kw)).start()


# ---------------------------------------------------------------------------- model


def test_chunked_prefill_matches_unchunked_logits():
    model = TinyTransformer(SMALL)
    prompt = ids(1300, seed=1)
    whole = model.forward([ForwardItem(model.new_cache(16), prompt)], all_logits=True)[0]
    for chunks in ([512, 512, 276], [97] * 13 + [39], [1] * 5 + [1295]):
        kv = model.new_cache(16)
        parts, pos = [], 0
        for n in chunks:
            parts.append(model.forward([ForwardItem(kv, prompt[pos : pos + n])], all_logits=True)[0])
            pos += n
        chunked = torch.cat(parts)
        assert chunked.shape == whole.shape
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    # The logits are not degenerate: different positions predict different tokens.
    assert len(set(whole.argmax(-1).tolist())) > 50


def test_batching_does_not_change_a_requests_logits():
    """A chunk batched with other requests' decodes (a MIXED step) computes what it computes alone."""
    model = TinyTransformer(SMALL)
    a, b = ids(300, 2), ids(40, 3)
    kv_a = model.new_cache(16)
    alone = model.forward([ForwardItem(kv_a, a)])[0]
    kv_a2, kv_b = model.new_cache(16), model.new_cache(16)
    model.forward([ForwardItem(kv_b, b)])
    batched = model.forward([ForwardItem(kv_b, [7]), ForwardItem(kv_a2, a)])[1]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)


def test_greedy_decoding_is_deterministic_for_a_seed():
    prompt = ids(700, 4)
    outs = []
    for seed, chunk in ((3, 512), (3, 129), (4, 512)):
        model = SMALL.__class__(**{**SMALL.to_dict(), "seed": seed})
        with make_engine(num_shards=1, chunk_size=chunk, model=model) as eng:
            outs.append(eng.generate(prompt, 24, timeout=60).output_ids)
    assert len(outs[0]) == 24
    assert outs[0] == outs[1], "same seed, different chunk size: greedy tokens must not change"
    assert outs[0] != outs[2], "a different seed is a different model"
    assert len(set(outs[0])) > 5, f"greedy output is degenerate: {outs[0]}"


# ---------------------------------------------------------------------------- prefix cache, step records


def test_sticky_turn_prefills_only_new_tokens_migrated_turn_prefills_all(sink):
    with make_engine(num_shards=2, coupling="lockstep", hooks=True, ingest=sink.address) as eng:
        first = ids(900, 5)
        t1 = eng.generate(first, 8, rid="s-turn-1", routed_shard=0, session_id="s", timeout=60)
        history = first + t1.output_ids
        new = ids(60, 6)
        sticky = eng.generate(history + new, 8, rid="s-turn-2", routed_shard=0, session_id="s", timeout=60)
        history2 = history + new + sticky.output_ids
        migrated = eng.generate(history2 + new, 8, rid="s-turn-3", routed_shard=1, session_id="s", timeout=60)
        assert eng.flush_hooks(10)
    for shard, rid in ((0, "s-turn-1"), (0, "s-turn-2"), (1, "s-turn-3")):
        sink.wait_finished(shard, rid)

    h1, h2, h3 = sink.handle_of(0, "s-turn-1"), sink.handle_of(0, "s-turn-2"), sink.handle_of(1, "s-turn-3")
    # Turn 1: nothing cached, the whole prompt prefilled, in two chunks of ≤ 512.
    assert sink.prefilled(0, h1) == 900
    # Sticky turn: the KV of turn 1 (prompt + all outputs but the last, which was never fed back)
    # is reused; only the last output token and the new tokens are computed.
    cached = len(first) + len(t1.output_ids) - 1
    assert sticky.cached_tokens == cached
    assert sink.event(0, h2, ingest_pb2.REQUEST_EVENT_KIND_SCHEDULED).cached_tokens == cached
    assert sink.prefilled(0, h2) == len(history) + len(new) - cached == 61
    # Migrated turn: shard 1 never saw the session: everything is prefilled again.
    assert migrated.cached_tokens == 0
    assert sink.prefilled(1, h3) == len(history2) + len(new)
    arrived = sink.event(1, h3, ingest_pb2.REQUEST_EVENT_KIND_ARRIVED)
    assert arrived.session_id == "s" and arrived.HasField("routed_shard") and arrived.routed_shard == 1
    assert arrived.prompt_tokens == len(history2) + len(new)
    finished = sink.event(1, h3, ingest_pb2.REQUEST_EVENT_KIND_FINISHED)
    assert finished.output_tokens == 8 and finished.finish_reason == "length"
    hello = sink.by_shard[1].hello
    assert hello.engine_kind == "testbed" and hello.num_shards == 2
    assert hello.coupling == ingest_pb2.COUPLING_LOCKSTEP


def test_lockstep_records_global_step_peer_tokens_and_idle_steps(sink):
    with make_engine(
        num_shards=2, coupling="lockstep", hooks=True, ingest=sink.address, chunk_size=256
    ) as eng:
        busy = eng.submit(ids(2048, 7), 4, routed_shard=0)  # 8 chunks on shard 0, shard 1 has nothing
        assert busy.wait(60)
        assert eng.flush_hooks(10)
    sink.wait_finished(0, busy.rid)
    _wait_until(lambda: len(sink.steps(1)) >= len(sink.steps(0)))
    s0, s1 = sink.steps(0), sink.steps(1)
    assert len(s0) == len(s1), "lockstep shards run the same number of steps"
    assert [s.global_step for s in s0] == [s.global_step for s in s1] == list(range(len(s0)))
    assert all(s.HasField("global_step") for s in s0 + s1)
    prefill = [s for s in s0 if s.kind == ingest_pb2.STEP_KIND_PREFILL]
    assert [sum(s.prefill_tokens) for s in prefill] == [256] * 8
    # Shard 1 ran an IDLE step (no entries) alongside every step of shard 0.
    assert all(s.kind == ingest_pb2.STEP_KIND_IDLE and len(s.handles) == 0 for s in s1)
    for a, b in zip(s0, s1, strict=True):
        mine = sum(a.prefill_tokens) + sum(a.decode_tokens)
        assert list(a.peer_tokens) == list(b.peer_tokens) == [mine, 0]
        # The barrier: both shards' records of one global step cover the same stretch of time.
        assert max(a.start_time_ns, b.start_time_ns) < min(a.end_time_ns, b.end_time_ns)
    chunk_steps = [(a, b) for a, b in zip(s0, s1, strict=True) if a.kind == ingest_pb2.STEP_KIND_PREFILL]
    # (Summed: a shard woken a little late by the OS has one shorter idle step.)
    assert sum(b.device_time_ns for _, b in chunk_steps) > 0.8 * sum(a.device_time_ns for a, _ in chunk_steps)
    # Context column: KV length before each chunk.
    assert [s.context_tokens[0] for s in prefill] == [256 * i for i in range(8)]


def test_every_step_the_sidecar_gets_is_the_engines_plan_repeats_included(sink, monkeypatch):
    """Steady decode steps go as repeats (the shipper expands them): the columns of every
    step record equal the engine's own plan for that step, entry by entry, including the
    steps after a request joins or leaves the batch and the first decode after a prefill."""
    from enginetime.testbed.adapter import ShardHooks

    plans: dict[int, list[list[tuple[int, int, int, int]]]] = defaultdict(list)
    original = ShardHooks.step_end

    def capture(self, token, plan, **kw):
        plans[self.recorder.shard].append(
            [(e.req.handle, e.prefill_tokens, e.decode_tokens, e.context_tokens) for e in plan.entries]
        )
        original(self, token, plan, **kw)

    monkeypatch.setattr(ShardHooks, "step_end", capture)
    with make_engine(hooks=True, ingest=sink.address, chunk_size=64) as eng:
        first = eng.submit(ids(100, 11), 24)
        time.sleep(0.05)  # joins while the first decodes
        second = eng.submit(ids(30, 12), 6)
        assert first.wait(60) and second.wait(60)
        repeats = eng.shards[0].hooks.repeats
        assert eng.flush_hooks(10)
    sink.wait_finished(0, first.rid)
    got = [
        list(zip(s.handles, s.prefill_tokens, s.decode_tokens, s.context_tokens, strict=True))
        for s in sink.steps(0)
    ]
    assert got == plans[0]
    assert repeats >= 10, repeats  # most of the 24 + 6 decode steps


def test_independent_shards_record_no_idle_steps_and_no_global_step(sink):
    with make_engine(num_shards=2, coupling="independent", hooks=True, ingest=sink.address) as eng:
        assert eng.generate(ids(600, 8), 4, rid="solo", routed_shard=0, timeout=60).finished
        assert eng.flush_hooks(10)
    sink.wait_finished(0, "solo")
    assert sink.steps(1) == []
    assert sink.steps(0) and all(
        not s.HasField("global_step") and len(s.peer_tokens) == 0 for s in sink.steps(0)
    )


def _decode_steps_of(eng: Engine, shard: int, rid: str, t0: float, t1: float) -> list:
    return [s for s in eng.step_log(shard) if t0 <= s.start and s.end <= t1 and rid in s.rids]


@pytest.mark.parametrize("policy", ["prefill-first", "mixed"])
def test_policy_decides_whether_decodes_wait_for_a_long_prefill(policy):
    with make_engine(num_shards=1, policy=policy, chunk_size=128) as eng:
        victim = eng.submit(ids(32, 9), 400, rid="victim")
        assert eng.wait_until(lambda: len(victim.output_ids) >= 3, 30)
        storm = eng.submit(ids(1280, 10), 1, rid="storm")  # 10 chunks
        assert storm.wait(60)
        chunk_steps = [s for s in eng.step_log(0) if "storm" in s.rids and s.prefilled > 0]
        eng.abort("victim")
        assert victim.wait(30)
    if policy == "prefill-first":
        assert len(chunk_steps) == 10
        assert all(s.kind is StepKind.PREFILL and "victim" not in s.rids for s in chunk_steps)
    else:
        # The decode takes one token of each step's 128-token budget: 11 chunks of ≤ 127.
        assert len(chunk_steps) == 11
        assert all(s.kind is StepKind.MIXED and "victim" in s.rids for s in chunk_steps)
        assert [s.prefilled for s in chunk_steps] == [127] * 10 + [10]


# ---------------------------------------------------------------------------- lifecycle


def test_idle_engine_sleeps_instead_of_spinning():
    with make_engine(num_shards=2, coupling="lockstep") as eng:
        eng.generate(ids(50, 11), 3, timeout=30)

        def asleep() -> bool:  # the group decided to sleep and every shard finished that step
            g = eng._group
            return g.sleep and all(sh.seq == g.step + 1 for sh in eng.shards)

        deadline = time.monotonic() + 10
        while not asleep():
            assert time.monotonic() < deadline, "the idle engine never went to sleep"
            time.sleep(0.01)
        before = [sh.seq for sh in eng.shards]
        time.sleep(0.3)
        assert [sh.seq for sh in eng.shards] == before, "shards stepped with no work"
        # ...and wake up for the next request.
        assert eng.generate(ids(50, 12), 3, timeout=30).output_ids


def test_abort_and_shutdown_release_waiting_clients():
    eng = make_engine(num_shards=2, coupling="lockstep")
    running = eng.submit(ids(40, 13), 5000, rid="long")
    assert eng.wait_until(lambda: len(running.output_ids) > 0, 30)
    assert eng.abort("long")
    assert running.wait(30) and running.finish_reason == "abort"
    assert 0 < len(running.output_ids) < 5000
    assert not eng.abort("long"), "an aborted request is no longer live"
    pending = eng.submit(ids(40, 14), 5000)
    eng.close()
    assert pending.wait(5) and pending.finish_reason == "abort"


def test_invalid_requests_are_rejected_with_a_reason():
    with make_engine(num_shards=2) as eng:
        cases = [
            (dict(input_ids=[]), "empty"),
            (dict(input_ids=[1, "a"]), "integers"),
            (dict(input_ids=[1, 99999]), "vocabulary"),
            (dict(input_ids=[1], max_new_tokens=-1), "max_new_tokens"),
            (dict(input_ids=[1], routed_shard=2), "routed_dp_rank"),
            (dict(input_ids=[1] * 8000, max_new_tokens=500), "context"),
        ]
        for kwargs, needle in cases:
            with pytest.raises(InvalidRequest, match=needle):
                eng.submit(kwargs.pop("input_ids"), kwargs.pop("max_new_tokens", 4), **kwargs)
        eng.submit(ids(10, 1), 2000, rid="dup")
        with pytest.raises(InvalidRequest, match="already running"):
            eng.submit(ids(10, 1), 4, rid="dup")
        eng.abort("dup")


def test_prefix_cache_hands_over_extends_copies_and_evicts():
    from enginetime.testbed.scheduler import PrefixCache

    model = TinyTransformer(SMALL)

    def cached(tokens: list[int]):
        kv = model.new_cache(len(tokens))
        model.forward([ForwardItem(kv, tokens)])
        return kv

    cache = PrefixCache(max_tokens=1000)
    a = ids(300, 20)
    cache.insert(a, cached(a))
    # A longer turn of the same session replaces its own prefix entry.
    a2 = a + ids(100, 21)
    cache.insert(a2, cached(a2))
    assert len(cache) == 1 and cache.tokens == 400
    # Partial match (a diverging request): a copy, the entry stays for the session.
    kv, n = cache.take(a[:250] + ids(10, 22), 400)
    assert n == 250 and kv.length == 250 and len(cache) == 1
    # Whole entry is a prefix of the input: handed over (no copy), removed from the cache.
    kv, n = cache.take(a2 + ids(5, 23), 600)
    assert n == 400 and kv.capacity >= 600 and len(cache) == 0 and cache.tokens == 0
    # Least recently used entries go first when the token budget is exceeded.
    for seed in range(4):
        t = ids(300, 30 + seed)
        cache.insert(t, cached(t))
    assert cache.tokens <= 1000 and len(cache) == 3
    assert cache.take(ids(300, 30) + [1], 400) == (None, 0), "the oldest entry was evicted"
