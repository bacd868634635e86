"""The fan-out's vectorised encoder writes what request_to_proto would, field for field.

Requests in every state a ledger can hold them — queued, running, preempted,
finished, aborted, blamed by a cross-shard storm, renamed, with sessions,
traceparents and routed shards, with huge and zero figures — are encoded by
``accounting_wire.encode`` and parsed back with the generated protobuf classes;
each must equal ``convert.request_to_proto(ledger.get(rid))`` taken at the same
clock reading, and a StreamUpdatesResponse made of the frames must parse to the
same messages.
"""

from __future__ import annotations

import numpy as np
import pytest
from simulator import Sim, warm_model

from enginetime.engine_hooks.constants import Coupling, EventKind
from enginetime.sidecar.api import convert
from enginetime.sidecar.ledger import accounting_wire
from enginetime.sidecar.ledger.ledger import LedgerConfig
from enginetime.v1 import accounting_pb2 as pb

MS = 1_000_000


def _scenario() -> Sim:
    sim = Sim(shards=3, coupling=Coupling.LOCKSTEP, config=LedgerConfig(top_blame=3))
    warm_model(sim, groups=120)
    for k in range(3):
        for h in range(8):
            sim.arrive(
                k,
                h,
                f"v{k}-{h}",
                prompt_tokens=100 + h,
                cached_tokens=16 * (h % 2),
                session_id=f"sess-{h % 3}" if h % 2 else "",
                traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01" if h == 3 else "",
                routed_shard=0 if h == 5 else (k if h == 6 else None),
            )
    sim.arrive(1, 20, "storm", prompt_tokens=9000)
    sim.arrive(2, 21, "queued-only", prompt_tokens=5)  # never stepped
    sim.arrive(0, 22, "")  # nameless: the ledger gives it an id of its own
    decode = [(h, 0, 1, 1500 + 100 * h) for h in range(8)]
    sim.group({k: [(h, 100 + h, 0, 0) for h in range(8)] for k in range(3)})
    for _ in range(3):
        sim.group({k: decode for k in range(3)})
    for chunk in range(4):
        batches = {k: decode for k in range(3)}
        batches[1] = decode + [(20, 2048, 0, 2048 * chunk)]
        sim.group(batches)
    sim.event(0, 1, EventKind.PREEMPTED)
    sim.event(0, 2, EventKind.FINISHED, finish_reason="stop", output_tokens=5)
    sim.event(2, 4, EventKind.ABORTED, finish_reason="abort: client gone")
    sim.group({k: [e for e in decode if e[0] not in (1, 2, 4)] for k in range(3)})
    sim.now += 1_234_567_891  # live requests' wall keeps growing: encoded at this reading
    return sim


def _expected(sim: Sim, rid: str) -> pb.RequestAccounting:
    return convert.request_to_proto(sim.view(rid))


def _encode(sim: Sim, reqs) -> list[bytes]:
    return accounting_wire.encode(sim.ledger, np.array([r.slot for r in reqs]), sim.now)


def _ids(sim: Sim) -> list[str]:
    return [req.request_id for req in sim.ledger._reqs if req is not None and req.slot >= 0]


def test_every_request_encodes_to_what_request_to_proto_gives():
    sim = _scenario()
    ids = _ids(sim)
    assert len(ids) > 30
    reqs = [sim.ledger._by_id[r] for r in ids]
    frames = _encode(sim, reqs)
    kinds = set()
    for rid, frame in zip(ids, frames, strict=True):
        container = pb.StreamUpdatesResponse.FromString(frame)
        assert len(container.updates) == 1
        got = container.updates[0]
        want = _expected(sim, rid)
        assert got == want, f"{rid}:\n got {got}\nwant {want}"
        # Presence is part of the contract (HasField tells "not yet" from 0).
        for name in ("last_step_time", "finish_time", "routed_shard", "arrival_time", "tokens"):
            assert got.HasField(name) == want.HasField(name), (rid, name)
        kinds.add((want.state, bool(want.top_blame), want.HasField("routed_shard"), bool(want.session_id)))
    states = {k[0] for k in kinds}
    assert {pb.REQUEST_STATE_QUEUED, pb.REQUEST_STATE_RUNNING, pb.REQUEST_STATE_PREEMPTED} <= states
    assert {pb.REQUEST_STATE_FINISHED, pb.REQUEST_STATE_ABORTED} <= states
    assert any(k[1] for k in kinds), "no request had blame: the storm did not happen"
    assert any(k[2] for k in kinds) and any(k[3] for k in kinds)
    blamed = pb.StreamUpdatesResponse.FromString(frames[ids.index("v0-0")]).updates[0]
    assert blamed.top_blame[0].request_id == "storm" and not blamed.top_blame[0].same_shard


def test_frames_join_into_one_response_with_its_own_fields():
    sim = _scenario()
    ids = _ids(sim)
    frames = _encode(sim, [sim.ledger._by_id[r] for r in ids])
    tail = pb.StreamUpdatesResponse(time=convert.timestamp(sim.now), coalesced=7).SerializeToString()
    resp = pb.StreamUpdatesResponse.FromString(b"".join(frames) + tail)  # as the service writes a body
    assert [u.request_id for u in resp.updates] == ids
    assert resp.coalesced == 7 and resp.time == convert.timestamp(sim.now)
    assert list(resp.updates) == [_expected(sim, r) for r in ids]


def test_event_fields_are_reencoded_when_an_event_changes_them():
    sim = _scenario()
    req = sim.ledger._by_id["v1-3"]
    before = _encode(sim, [req])[0]
    assert req.wire is not None
    sim.event(1, 3, EventKind.FINISHED, finish_reason="length")  # state, finish time and reason change
    after = pb.StreamUpdatesResponse.FromString(_encode(sim, [req])[0])
    assert after.updates[0] == _expected(sim, "v1-3") and after.updates[0].finish_reason == "length"
    assert pb.StreamUpdatesResponse.FromString(before).updates[0].finish_reason == ""


@pytest.mark.parametrize("scale", [0, 1, 127, 128, 16_383, 16_384, 10**9 - 1, 10**9, 2**40, 2**62])
def test_varints_at_every_byte_boundary(scale: int):
    """Figures of every varint width, written straight into the columns, round-trip exactly."""
    sim = Sim(shards=1)
    sim.arrive(0, 1, "r", prompt_tokens=scale % 2**32)
    sim.step(0, [(1, 16, 0, 0)], d=5 * MS)
    led = sim.ledger
    req = led._by_id["r"]
    cols = led._cols
    cols.decoded[req.slot] = scale
    cols.steps[req.slot] = scale
    cols.excluded[req.slot] = scale
    cols.gpu[req.slot] = float(scale)
    sim.now = req.arrival_ns + scale + 10**12
    got = pb.StreamUpdatesResponse.FromString(_encode(sim, [req])[0]).updates[0]
    assert got == _expected(sim, "r")


def test_encoding_many_rows_matches_one_at_a_time():
    sim = _scenario()
    reqs = [sim.ledger._by_id[r] for r in _ids(sim)]
    together = _encode(sim, reqs)
    alone = [_encode(sim, [r])[0] for r in reqs]
    assert together == alone
    rng = np.random.default_rng(1)
    order = rng.permutation(len(reqs)).tolist()
    shuffled = _encode(sim, [reqs[i] for i in order])
    assert shuffled == [together[i] for i in order]
