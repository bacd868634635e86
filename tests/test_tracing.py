"""Span export end to end: engine processes -> sidecar -> real OTLP exporter -> a real OTLP receiver.

Two engine shards of one LOCKSTEP engine run in their own processes with real
``Recorder``s and meet at a collective after every step (a socketpair
all-gather, as DP attention's MoE layers do), so a shard's step lasts as long
as the slower one's. Shard 1 decodes: three short victims, one request with
thousands of decode steps, and one that is preempted and resumed. Shard 0 runs
a long prompt in 512-token chunks (the incident's cross-shard storm). Every
request but one carries a W3C traceparent, as a proxy would send it.

The sidecar exports over OTLP/gRPC to a ``TraceService`` server built from the
official opentelemetry-proto stubs; the test then checks what a user looking at
Jaeger/Tempo relies on, against what ``GetRequest`` returns.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

import pytest
from helpers import IngestConnection, arrived, finished, hello, start_sidecar, step, wait_until
from lockstep_shards import start_pair
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otel_helpers import (
    OtlpGrpcReceiver,
    OtlpHttpReceiver,
    ReceivedSpan,
    attributes,
    metrics_address,
    scrape,
)
from phoenix_helpers import Phoenix

from enginetime.clients import AccountingClient, RequestAccounting
from enginetime.sidecar.telemetry.tracing import MAX_SPANS_PER_REQUEST, REQUEST_SPAN_NAME, request_span_ids

ENGINE = "trace-e2e"
CHUNK = 512
STORM = "storm-0"
VICTIMS = ("victim-0", "victim-1", "victim-2")
LONG = "long-0"
LONG_DECODES = 2000
PREEMPTED = "preempt-0"
LINK_THRESHOLD_S = 0.01

# An engine shard's scheduler (prefill-first, chunked) over real Recorder calls, after
# lockstep_shards.PRELUDE: "ready" once connected, waits for "go", "done {json}".
SHARD_LOOP = r"""
class Req:
    def __init__(self, spec):
        self.spec = spec
        self.rid, self.prompt, self.output = spec["rid"], spec["prompt"], spec["output"]
        self.todo = self.prompt  # tokens to prefill (the whole context again after a preemption)
        self.decoded = 0
        self.handle = 0

rec = Recorder(P["engine"], shard=SHARD, num_shards=2, coupling="lockstep", address=ADDRESS,
               engine_kind="e2e")
mine = [Req(s) for s in P["requests"] if s["shard"] == SHARD]
assert rec.flush(10.0), "could not reach the sidecar at " + ADDRESS
print("ready", flush=True)
sys.stdin.readline()

running, preempted, g = [], [], 0
while True:
    for r in mine:
        if r.spec["arrive"] == g:
            r.handle = rec.request_arrived(r.rid, prompt_tokens=r.prompt, session_id="sess-" + r.rid,
                                           traceparent=r.spec.get("traceparent", ""))
            rec.request_scheduled(r.handle)
            running.append(r)
        pre = r.spec.get("preempt")
        if pre and g == pre[0] and r in running:
            rec.request_preempted(r.handle)
            running.remove(r)
            preempted.append(r)
        if pre and g == pre[1] and r in preempted:
            rec.request_resumed(r.handle)
            r.todo = r.prompt + r.decoded  # its KV cache was freed: recompute the context
            preempted.remove(r)
            running.append(r)
    prefilling = [r for r in running if r.todo > 0]
    batch = prefilling or running
    kind = StepKind.PREFILL if prefilling else (StepKind.DECODE if running else StepKind.IDLE)
    pre_tok = [min(P["chunk"], r.todo) if prefilling else 0 for r in batch]
    dec = [0 if prefilling else 1 for _ in batch]
    ctx = [(r.prompt + r.decoded - r.todo) if prefilling else r.prompt + r.decoded for r in batch]
    tokens = sum(pre_tok) + sum(dec)
    finishing = [r for r, d in zip(batch, dec) if d and r.decoded + d >= r.output]
    later = any(r.spec["arrive"] > g for r in mine)
    more = int(later or bool(preempted) or len(running) > len(finishing))
    tok = rec.step_begin()
    forward(tokens)
    peer_tokens, peer_more = all_gather(tokens, more)
    rec.step_end(tok, kind=kind, handles=[r.handle for r in batch], prefill_tokens=pre_tok, decode_tokens=dec,
                 context_tokens=ctx, global_step=g,
                 peer_tokens=[tokens, peer_tokens] if SHARD == 0 else [peer_tokens, tokens])
    for r, p, d in zip(batch, pre_tok, dec):
        r.todo -= p
        r.decoded += d
    for r in finishing:
        rec.request_finished(r.handle, reason="length", output_tokens=r.decoded)
        running.remove(r)
    g += 1
    if not more and not peer_more:
        break
ok = rec.flush(10.0)
stats = rec.stats()
rec.close()
print("done " + json.dumps({"steps": g, "flushed": ok, "dropped": stats.dropped_frames}), flush=True)
"""


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _requests(parents: dict[str, str]) -> list[dict]:
    reqs = [
        {"rid": STORM, "shard": 0, "arrive": 10, "prompt": 12 * CHUNK, "output": 4},
        {"rid": LONG, "shard": 1, "arrive": 0, "prompt": 64, "output": LONG_DECODES},
        {"rid": PREEMPTED, "shard": 1, "arrive": 0, "prompt": 48, "output": 80, "preempt": [40, 50]},
    ]
    reqs += [{"rid": v, "shard": 1, "arrive": 0, "prompt": 32, "output": 60} for v in VICTIMS]
    for r in reqs:
        if r["rid"] in parents:
            r["traceparent"] = parents[r["rid"]]
    return reqs


def _roots(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {
        s.attrs["enginetime.request.id"]: s
        for s in spans
        if s.span.name == REQUEST_SPAN_NAME and "enginetime.request.id" in s.attrs
    }


def _children(spans: list[ReceivedSpan], root: ReceivedSpan) -> list[Span]:
    kids = [
        s.span
        for s in spans
        if s.span.trace_id == root.span.trace_id and s.span.parent_span_id == root.span.span_id
    ]
    return sorted(kids, key=lambda k: k.start_time_unix_nano)


def _expected_attributes(a: RequestAccounting) -> dict[str, object]:
    """The request span's attributes as GetRequest reports the same figures."""
    want: dict[str, object] = {
        "enginetime.request.id": a.request_id,
        "enginetime.engine.id": a.engine_id,
        "enginetime.shard": a.shard,
        "enginetime.state": a.state.name.lower(),
        "session.id": a.session_id,
        "gen_ai.usage.input_tokens": a.tokens.prompt,
        "gen_ai.usage.output_tokens": a.tokens.decoded,
        "gen_ai.usage.cache_read.input_tokens": a.tokens.cached,
        "gen_ai.response.finish_reasons": (a.finish_reason,),
        "enginetime.engine_time": a.engine_time_ns / 1e9,
        "enginetime.gpu_time": a.gpu_time_ns / 1e9,
        "enginetime.queue_time": a.queue_time_ns / 1e9,
        "enginetime.interference": a.interference_ns / 1e9,
        "enginetime.other": a.other_ns / 1e9,
        "enginetime.wall": a.wall_ns / 1e9,
        "enginetime.tokens.prompt": a.tokens.prompt,
        "enginetime.tokens.cached": a.tokens.cached,
        "enginetime.tokens.prefilled": a.tokens.prefilled,
        "enginetime.tokens.decoded": a.tokens.decoded,
        "enginetime.steps": a.steps,
        "enginetime.excluded_steps": a.excluded_steps,
        "enginetime.preemptions": a.preemptions,
        "enginetime.migrated": a.migrated,
        "enginetime.partial": a.partial,
    }
    if a.top_blame:
        top = a.top_blame[0]
        want |= {
            "enginetime.blame.top.request_id": top.request_id,
            "enginetime.blame.top.shard": top.shard,
            "enginetime.blame.top.seconds": top.seconds_ns / 1e9,
            "enginetime.blame.top.same_shard": top.same_shard,
        }
    return want


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_incident_spans_link_victims_to_the_storm(tmp_path: Path) -> None:
    parents = {rid: _traceparent() for rid in (STORM, PREEMPTED, *VICTIMS)}  # LONG has none
    params = {
        "engine": ENGINE,
        "forward": [256, 4, 8],  # hidden size, layers, rows every step reads whatever its batch
        "chunk": CHUNK,
        "requests": _requests({k: v[0] for k, v in parents.items()}),
    }
    with (
        OtlpGrpcReceiver() as receiver,
        start_sidecar(
            tmp_path,
            "--otlp-endpoint",
            receiver.endpoint,
            "--storm-threshold",
            "0.05",
            "--trace-link-threshold",
            str(LINK_THRESHOLD_S),
            env={"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "sidecar-under-test"},
        ) as sidecar,
        AccountingClient(sidecar.grpc_target) as client,
    ):
        shards = start_pair(tmp_path / "shard.py", SHARD_LOOP, sidecar.ingest, params)
        try:
            for s in shards:
                s.expect("ready")
            for s in shards:
                s.go()
            summaries = [json.loads(s.expect("done")) for s in shards]
            for s in shards:
                assert s.proc.wait(30) == 0
        finally:
            for s in shards:
                s.kill()
        assert all(x["flushed"] and x["dropped"] == 0 for x in summaries), summaries
        assert summaries[0]["steps"] > LONG_DECODES

        everyone = (STORM, LONG, PREEMPTED, *VICTIMS)
        spans = receiver.wait_for(
            lambda got: got if set(everyone) <= set(_roots(got)) else None,
            timeout=30,
            message="the sidecar never exported a request span for every request",
        )
        acct = {rid: client.get_request(rid) for rid in everyone}
        roots = _roots(spans)

        # --- resource and scope: the sidecar identifies itself
        any_root = roots[STORM]
        assert any_root.resource["service.name"] == "sidecar-under-test"
        assert any_root.scope == "enginetime.sidecar"

        for rid in everyone:
            root, a_ = roots[rid], acct[rid]
            span = root.span
            # --- one SERVER span per request, from arrival to finish, carrying GetRequest's figures
            assert [r for r in spans if r.attrs.get("enginetime.request.id") == rid] == [root]
            assert span.kind == Span.SPAN_KIND_SERVER
            assert span.start_time_unix_nano == a_.arrival_ns
            assert span.end_time_unix_nano == a_.finish_time_ns == a_.arrival_ns + a_.wall_ns
            got = root.attrs
            want = _expected_attributes(a_)
            assert {k: got.get(k) for k in want} == want, rid
            # --- its parent is the traceparent the proxy sent; without one, the ids are derived
            ids = request_span_ids(ENGINE, rid, a_.arrival_ns, a_.traceparent)
            assert span.span_id.hex() == f"{ids.span_id:016x}"
            if rid in parents:
                _, trace_hex, parent_hex = parents[rid]
                assert (span.trace_id.hex(), span.parent_span_id.hex()) == (trace_hex, parent_hex), rid
            else:
                assert span.parent_span_id == b"" and span.trace_id.hex() == f"{ids.trace_id:032x}"
            # --- phases: children within the request, in order, never overlapping, at most 8 spans
            kids = _children(spans, root)
            assert 1 + len(kids) <= MAX_SPANS_PER_REQUEST
            assert all(k.kind == Span.SPAN_KIND_INTERNAL for k in kids)
            edges = [(k.start_time_unix_nano, k.end_time_unix_nano) for k in kids]
            assert all(s < e for s, e in edges)
            assert all(e1 <= s2 for (_, e1), (s2, _) in zip(edges, edges[1:], strict=False))
            assert edges[0][0] == span.start_time_unix_nano and edges[-1][1] <= span.end_time_unix_nano
            names = [k.name for k in kids]
            if rid == PREEMPTED:
                assert names == ["queue", "prefill", "decode", "preempted", "prefill", "decode"], names
                events = [e.name for e in span.events]
                assert events.count("enginetime.preempted") == 1 and events.count("enginetime.resumed") == 1
                assert a_.preemptions == 1
            else:
                assert names[-2:] == ["prefill", "decode"], (rid, names)
            # queue ends where the first step began: its length is GetRequest's queue time
            if names[0] == "queue":
                assert kids[0].end_time_unix_nano - kids[0].start_time_unix_nano == a_.queue_time_ns
            first_token = [e for e in span.events if e.name == "enginetime.first_token"]
            assert len(first_token) == 1, rid
            prefill_end = next(k for k in kids if k.name == "prefill").end_time_unix_nano
            assert kids[names.index("prefill")].start_time_unix_nano < first_token[0].time_unix_nano
            assert first_token[0].time_unix_nano <= prefill_end

        # --- thousands of decode steps, still a handful of spans
        long_kids = [k.name for k in _children(spans, roots[LONG])]
        assert acct[LONG].steps > LONG_DECODES and acct[LONG].tokens.decoded == LONG_DECODES
        assert long_kids in (["queue", "prefill", "decode"], ["prefill", "decode"]), long_kids

        # --- the storm's span: storm start/end events
        storm_span = roots[STORM].span
        storm_events = {e.name: attributes(e.attributes) for e in storm_span.events}
        assert {"enginetime.storm.start", "enginetime.storm.end"} <= set(storm_events)
        end = storm_events["enginetime.storm.end"]
        assert end["enginetime.storm.cross_shard"] is True and 1 in end["enginetime.storm.victim_shards"]
        # (a FINISHED event can overtake the LOCKSTEP group holding the last chunk: the ledger then
        # ends the storm a chunk early, so only bound the count here)
        assert 0 < end["enginetime.storm.chunks"] <= 12
        assert end["enginetime.storm.prefill_tokens"] == end["enginetime.storm.chunks"] * CHUNK

        # --- every victim links to the storm's span, with the blame GetRequest reports
        for rid in (*VICTIMS, LONG, PREEMPTED):
            a_ = acct[rid]
            blame = {b.request_id: b for b in a_.top_blame if b.request_id}
            # The storm is the request that cost it most. (A shard as cause, request id "", may rank
            # above it for a long decode: tied shards' step jitter is interference, not engine time.)
            assert [b.request_id for b in a_.top_blame if b.request_id][0] == STORM, (rid, a_.top_blame)
            links = {
                attributes(ln.attributes)["enginetime.blame.request_id"]: ln for ln in roots[rid].span.links
            }
            # a link for exactly the request aggressors blamed at least the threshold
            assert set(links) == {r for r, b in blame.items() if b.seconds_ns >= LINK_THRESHOLD_S * 1e9}
            for agg, link in links.items():
                la = attributes(link.attributes)
                assert la["enginetime.blame.seconds"] == blame[agg].seconds_ns / 1e9
                assert la["enginetime.blame.shard"] == blame[agg].shard
                target = roots[agg].span  # the aggressor's own span: another trace
                assert (link.trace_id, link.span_id) == (target.trace_id, target.span_id)
            storm_link = attributes(links[STORM].attributes)
            assert storm_link["enginetime.blame.shard"] == 0
            assert storm_link["enginetime.blame.same_shard"] is False
            assert links[STORM].trace_id != roots[rid].span.trace_id


def _one_request(conn: IngestConnection, handle: int, rid: str, t0: int, **kw) -> None:
    """A request that queues 1 ms, prefills in one 2 ms step, decodes 2 steps: root + 3 phase spans.

    Handles 1, 2, ... in turn: its steps are the shard's seq 3(h-1) .. 3(h-1)+2, no gaps.
    """
    ms = 1_000_000
    seq = 3 * (handle - 1)
    conn.send(
        arrived(handle, rid, 16, time_ns=t0, **kw),
        step(seq, [handle], prefill=[16], start_time_ns=t0 + ms, device_time_ns=2 * ms),
        step(seq + 1, [handle], start_time_ns=t0 + 3 * ms, device_time_ns=ms),
        step(seq + 2, [handle], start_time_ns=t0 + 4 * ms, device_time_ns=ms),
        finished(handle, output_tokens=2, time_ns=t0 + 5 * ms),
    )


@pytest.mark.e2e
def test_http_protobuf_export_configured_by_the_standard_environment(tmp_path: Path) -> None:
    """No flag: OTEL_EXPORTER_OTLP_ENDPOINT + OTEL_EXPORTER_OTLP_PROTOCOL; /v1/traces is the exporter's."""
    with OtlpHttpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        with start_sidecar(tmp_path, env=env) as sidecar, AccountingClient(sidecar.grpc_target) as client:
            with IngestConnection(sidecar.ingest) as conn:
                conn.send(hello(engine_id="http-engine"))
                _one_request(conn, 1, "http-req", time.time_ns() - 10**9, session_id="s-http")
                spans = receiver.wait_for(lambda got: got if "http-req" in _roots(got) else None)
            acct = client.get_request("http-req")
            assert "(http/protobuf, from the environment)" in sidecar.stderr_text()
        root = _roots(spans)["http-req"]
        assert set(receiver.paths) == {"/v1/traces"}
        assert root.attrs["enginetime.engine_time"] == acct.engine_time_ns / 1e9
        assert root.resource["service.name"] == "enginetime-sidecar"
        assert [k.name for k in _children(spans, root)] == ["queue", "prefill", "decode"]


@pytest.mark.e2e
def test_endpoint_down_sidecar_keeps_serving_and_counts_dropped_spans(tmp_path: Path) -> None:
    """Nothing listens at the OTLP endpoint: ingest and gRPC carry on, every span is counted as dropped."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    n = 40
    env = {
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",  # seconds: give up on a batch quickly
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with (
        start_sidecar(
            tmp_path,
            "--otlp-endpoint",
            f"http://127.0.0.1:{dead_port}",
            "--metrics-port",
            "0",
            env=env,
        ) as sidecar,
        AccountingClient(sidecar.grpc_target) as client,
    ):
        address = metrics_address(sidecar.stdout_lines)
        t0 = time.time_ns() - 10**9
        with IngestConnection(sidecar.ingest) as conn:
            conn.send(hello(engine_id="down"))
            for h in range(1, n + 1):
                _one_request(conn, h, f"down-{h}", t0 + h * 10_000_000)
            wait_until(lambda: client.list_requests(engine_id="down").total_size == n)

            def settled():
                m = scrape(address)
                created = m[("enginetime_spans_created_total", ())]
                dropped = {
                    r: m[("enginetime_spans_dropped_total", (("reason", r),))]
                    for r in ("backlog", "queue_full", "export_failed", "shutdown")
                }
                done = created + dropped["queue_full"] + dropped["backlog"] == 4 * n
                return (m, created, dropped) if done and dropped["export_failed"] == created else None

            m, created, dropped = wait_until(settled, timeout=40, message="spans were never all accounted")
            assert m[("enginetime_spans_exported_total", ())] == 0
            assert dropped["export_failed"] > 0
            # Still serving: accounting of every request, and ingest of new ones.
            assert client.get_request(f"down-{n}").tokens.decoded == 2
            _one_request(conn, n + 1, "after-failures", t0 + (n + 1) * 10_000_000)
            wait_until(lambda: client.get_request("after-failures").state.name == "FINISHED")
        assert sidecar.stop() == 0
        log = sidecar.stderr_text()
    assert "they are dropped and counted" in log and "Is the collector up?" in log


# ---------------------------------------------------------------------------------------------
# In-process: the ledger's phase marks, the span plan, export configuration, the export queue.


def _ledger_with(schedule, *, max_requests: int = 1000):
    """A real Ledger fed decoded frames: ``schedule`` yields ("event", Event) / ("step", Step)."""
    from simulator import connect, new_ledger

    ledger = new_ledger(max_requests=max_requests)
    keys: list[int] = []
    ledger.add_terminal_listener(keys.append)
    (key,) = connect(ledger, "unit")
    for kind, record in schedule:
        (ledger.on_event if kind == "event" else ledger.on_step)(key, record)
    return ledger, keys


def _ev(handle: int, kind: str, t: int, **kw):
    from enginetime.engine_hooks.constants import EventKind
    from enginetime.sidecar.ingest.records import Event

    return ("event", Event(handle, int(EventKind[kind]), t, **kw))


def _st(seq: int, t: int, handles, prefill, decode, d: int = 1_000_000):
    import numpy as np

    from enginetime.sidecar.ingest.records import Step

    u32 = np.uint32
    return (
        "step",
        Step(
            seq, t, t + d, d, 1 if any(prefill) else 2,
            handles=np.array(handles, dtype=u32), prefill_tokens=np.array(prefill, dtype=u32),
            decode_tokens=np.array(decode, dtype=u32), context_tokens=np.zeros(len(handles), dtype=u32),
        ),
    )  # fmt: skip


def _preempted_many_times(cycles: int) -> list:
    """One request: prefill, decode, then ``cycles`` x (preempted, resumed, re-prefill, decode)."""
    ms = 1_000_000
    t, seq = 1_000 * ms, 0
    out = [_ev(1, "ARRIVED", t, request_id="r", prompt_tokens=64), _ev(1, "SCHEDULED", t)]

    def run(t: int, seq: int) -> tuple[list, int, int]:
        steps = [_st(seq, t + ms, [1], [64], [0]), _st(seq + 1, t + 3 * ms, [1], [0], [1])]
        return steps, t + 5 * ms, seq + 2

    steps, t, seq = run(t, seq)
    out += steps
    for _ in range(cycles):
        out += [_ev(1, "PREEMPTED", t), _ev(1, "RESUMED", t + 2 * ms)]
        steps, t, seq = run(t + 2 * ms, seq)
        out += steps
    out.append(_ev(1, "FINISHED", t, finish_reason="stop"))
    return out


def test_one_preemption_splits_the_phases_and_many_stay_within_eight_spans() -> None:
    from enginetime.sidecar.ledger.trace import MAX_MARKS
    from enginetime.sidecar.telemetry.tracing import phases, span_count

    ledger, keys = _ledger_with(_preempted_many_times(1))
    trace = ledger.request_trace(keys[0])
    names = [p.name for p in phases(trace)]
    assert names == ["queue", "prefill", "decode", "preempted", "prefill", "decode"]
    ps = phases(trace)
    assert ps[0].start_ns == trace.view.arrival_time_ns and ps[-1].end_ns == trace.view.finish_time_ns
    assert all(a.end_ns == b.start_ns for a, b in zip(ps, ps[1:], strict=False))  # back to back here

    for cycles in (2, 5, MAX_MARKS):  # MAX_MARKS cycles: more preemptions than marks are kept
        ledger, keys = _ledger_with(_preempted_many_times(cycles))
        trace = ledger.request_trace(keys[0])
        assert trace.view.preemptions == cycles
        ps = phases(trace)
        assert span_count(trace) == 1 + len(ps) <= MAX_SPANS_PER_REQUEST
        assert [p.name for p in ps[:3]] == ["queue", "prefill", "decode"]
        assert ps[-1].name == "running" and ps[-1].merged > 0 and ps[-1].end_ns == trace.view.finish_time_ns


def test_evicted_request_has_no_trace_and_ids_are_deterministic() -> None:
    from enginetime.sidecar.telemetry.tracing import parse_traceparent

    ms = 1_000_000
    sched = []
    for h in range(1, 4):  # three short requests; the store keeps two
        t = h * 100 * ms
        sched += [_ev(h, "ARRIVED", t, request_id=f"r{h}"), _st(h, t + ms, [h], [8], [0]),
                  _ev(h, "FINISHED", t + 3 * ms)]  # fmt: skip
    ledger, keys = _ledger_with(sched, max_requests=2)
    assert len(keys) == 3
    assert ledger.request_trace(keys[0]) is None  # evicted: no figures to build a span from
    assert ledger.request_trace(keys[2]).view.request_id == "r3"

    a = request_span_ids("e", "r", 5)
    assert a == request_span_ids("e", "r", 5)  # the same whoever computes it, whenever
    assert a.span_id != request_span_ids("e", "r", 6).span_id  # a retry with the same id: another span
    assert a.trace_id != request_span_ids("e2", "r", 5).trace_id and a.parent is None
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    child = request_span_ids("e", "r", 5, tp)
    assert child.trace_id == 0x0AF7651916CD43DD8448EB211C80319C and child.parent.span_id == 0xB7AD6B7169203331
    assert child.span_id == a.span_id and child.sampled
    assert not request_span_ids("e", "r", 5, tp[:-2] + "00").sampled
    for bad in ("", "junk", "00-" + "0" * 32 + "-b7ad6b7169203331-01", "ff-" + tp[3:], tp + "-extra"):
        assert parse_traceparent(bad) is None, bad
        assert request_span_ids("e", "r", 5, bad).trace_id == a.trace_id


def test_finished_record_carries_what_get_returns() -> None:
    from enginetime.sidecar.ledger.trace import record_to_trace, trace_to_record

    ledger, keys = _ledger_with(_preempted_many_times(1))
    record = ledger.finished_record(keys[0])
    trace = record_to_trace(record)
    assert trace.view == ledger.get("r")  # the same figures, the same clamping as GetRequest
    assert trace_to_record(trace) == record
    import pickle

    assert pickle.loads(pickle.dumps(record)) == record


@pytest.mark.e2e
def test_killed_span_process_counts_exporter_down_and_the_sidecar_carries_on(tmp_path: Path) -> None:
    """The export process dies (OOM killer, a crash): spans are counted as dropped, nothing else changes."""
    with OtlpGrpcReceiver() as receiver, start_sidecar(
        tmp_path, "--otlp-endpoint", receiver.endpoint, "--metrics-port", "0",
        env={"OTEL_BSP_SCHEDULE_DELAY": "50"},
    ) as sidecar, AccountingClient(sidecar.grpc_target) as client:  # fmt: skip
        address = metrics_address(sidecar.stdout_lines)
        children = [
            int(pid)
            for tasks in Path(f"/proc/{sidecar.proc.pid}/task").iterdir()
            for pid in (tasks / "children").read_text().split()
        ]
        (child,) = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(child, 9)
        t0 = time.time_ns() - 10**9
        with IngestConnection(sidecar.ingest) as conn:
            conn.send(hello(engine_id="orphan"))
            _one_request(conn, 1, "after-kill", t0)
            dropped = ("enginetime_spans_dropped_total", (("reason", "exporter_down"),))
            wait_until(lambda: scrape(address)[dropped] == 4, timeout=20)
            assert client.get_request("after-kill").tokens.decoded == 2
        assert sidecar.stop() == 0
        assert "span export process" in sidecar.stderr_text()
    assert not receiver.spans


def test_export_settings_follow_flags_then_the_otel_environment() -> None:
    from enginetime.sidecar.telemetry.tracing import TracingConfig, TracingConfigError, resolve_export

    def target(endpoint: str = "", protocol: str = "", **env: str):
        return resolve_export(TracingConfig(endpoint=endpoint, protocol=protocol), env)

    assert target() == (None, "no --otlp-endpoint and no OTEL_EXPORTER_OTLP_ENDPOINT")
    t, _ = target("collector:4317")
    assert (t.protocol, t.endpoint) == ("grpc", "http://collector:4317")
    t, _ = target("http://collector:4318")
    assert (t.protocol, t.endpoint) == ("http/protobuf", "http://collector:4318/v1/traces")
    t, _ = target("https://collector/otlp/v1/traces")
    assert (t.protocol, t.endpoint) == ("http/protobuf", "https://collector/otlp/v1/traces")
    t, _ = target("http://collector:4318", "grpc")
    assert (t.protocol, t.endpoint) == ("grpc", "http://collector:4318")
    t, _ = target("http://c:9999", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert (t.protocol, t.endpoint) == ("http/protobuf", "http://c:9999/v1/traces")
    # without the flag the exporter reads the endpoint variables itself (signal-specific first)
    t, _ = target(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://t:4317", OTEL_EXPORTER_OTLP_ENDPOINT="http://g:4318"
    )
    assert (t.protocol, t.endpoint) == ("grpc", None) and "http://t:4317" in t.shown
    assert target(OTEL_EXPORTER_OTLP_ENDPOINT="http://g:4317", OTEL_TRACES_EXPORTER="none")[0] is None
    assert target("http://c:4317", OTEL_SDK_DISABLED="true") == (None, "OTEL_SDK_DISABLED=true")
    with pytest.raises(TracingConfigError, match="use grpc or http/protobuf"):
        target("http://c:4317", "http/json")
    with pytest.raises(TracingConfigError, match="not a URL"):
        target("ftp://c:4317")


def test_tracer_counts_a_full_export_queue_and_never_blocks_submit() -> None:
    import threading

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from enginetime.sidecar.telemetry.tracing import RequestTracer, TracingConfig

    class Stuck(SpanExporter):
        """An exporter whose endpoint hangs until released (a collector that stopped reading)."""

        def __init__(self) -> None:
            self.release = threading.Event()
            self.spans: list = []

        def export(self, spans):
            self.release.wait(30)
            self.spans.extend(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            self.release.set()

    ms = 1_000_000
    sched = []
    for h in range(1, 11):  # ten requests of 4 spans: queue, prefill, decode + the request
        t = h * 100 * ms
        sched += [_ev(h, "ARRIVED", t, request_id=f"q{h}"), _st(2 * h, t + ms, [h], [8], [0]),
                  _st(2 * h + 1, t + 2 * ms, [h], [0], [1]), _ev(h, "FINISHED", t + 4 * ms)]  # fmt: skip
    ledger, keys = _ledger_with(sched)
    traces = [ledger.request_trace(k) for k in keys]
    exporter = Stuck()
    tracer = RequestTracer(
        TracingConfig(export_wait_s=0.0), exporter=exporter, environ={"OTEL_BSP_MAX_QUEUE_SIZE": "8"}
    )
    try:
        tracer.submit(traces)  # returns at once although the exporter hangs
        c = tracer.counters
        wait_until(lambda: c.created + c.dropped["queue_full"] == 40)
        assert (c.created, c.dropped["queue_full"], tracer.exported) == (8, 32, 0)
        exporter.release.set()
        wait_until(lambda: tracer.exported == 8)
    finally:
        tracer.shutdown(5.0)
    assert sorted({s.attributes["enginetime.request.id"] for s in exporter.spans if s.parent is None}) == [
        "q1",
        "q2",
    ]
    assert c.dropped["shutdown"] == 0 and c.dropped["export_failed"] == 0


# ---------------------------------------------------------------------------------------------
# A real trace backend installed from PyPI: Arize Phoenix accepts OTLP and answers queries
# (its venv is built once and cached: tests/phoenix_helpers.py).


@pytest.mark.e2e
@pytest.mark.timeout(300)  # includes building Phoenix's venv on a cold cache (~1 min)
def test_spans_can_be_queried_back_from_arize_phoenix(tmp_path: Path) -> None:
    with Phoenix(tmp_path) as phoenix:
        tp, trace_hex, parent_hex = _traceparent()
        sidecar_env = {
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_RESOURCE_ATTRIBUTES": "openinference.project.name=enginetime-e2e",
        }
        with (
            start_sidecar(tmp_path, "--otlp-endpoint", phoenix.otlp, env=sidecar_env) as sidecar,
            AccountingClient(sidecar.grpc_target) as client,
        ):
            with IngestConnection(sidecar.ingest) as conn:
                conn.send(hello(engine_id="phoenix-engine"))
                _one_request(conn, 1, "phoenix-req", time.time_ns() - 10**9, traceparent=tp, session_id="s-p")
            acct = wait_until(lambda: (a := client.get_request("phoenix-req")) and a.terminal and a)

            def spans():
                got = phoenix.spans("enginetime-e2e", limit=100)
                return got if len(got) >= 4 else None

            got = wait_until(spans, timeout=30, interval=0.2, message="phoenix never returned the spans")
    by_name = {s["name"]: s for s in got}
    assert set(by_name) == {REQUEST_SPAN_NAME, "queue", "prefill", "decode"}
    root = by_name[REQUEST_SPAN_NAME]
    assert (root["context"]["trace_id"], root["parent_id"]) == (trace_hex, parent_hex)
    for child in ("queue", "prefill", "decode"):
        assert by_name[child]["parent_id"] == root["context"]["span_id"]
    attrs = root["attributes"]
    assert attrs["enginetime.request.id"] == "phoenix-req" and attrs["session.id"] == "s-p"
    assert attrs["enginetime.engine_time"] == acct.engine_time_ns / 1e9
    assert attrs["enginetime.interference"] == acct.interference_ns / 1e9
    assert attrs["enginetime.wall"] == acct.wall_ns / 1e9
    assert attrs["gen_ai.usage.output_tokens"] == acct.tokens.decoded == 2
    assert [e["name"] for e in root["events"]] == ["enginetime.first_token"]
