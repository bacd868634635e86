"""``enginetime top | get | watch | events | requests`` against a running sidecar.

The data is real: a LOCKSTEP testbed reporting to a real sidecar runs a victim on
shard 0 while a 4K-token prefill storms shard 1. Every command runs as a real
``python -m enginetime`` process; ``--json`` output must parse and agree with the
typed client; an unreachable sidecar gives a clear error naming the address; and
``top`` is drawn in a real terminal (tmux), read back from the screen, and quits on
``q``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from helpers import start_sidecar, wait_until
from otel_helpers import scrape

from enginetime.clients import AccountingClient
from enginetime.testbed.engine import Engine, EngineConfig
from enginetime.testbed.model import ModelConfig

pytestmark = pytest.mark.e2e  # every test here starts processes (see conftest.py)

MODEL = ModelConfig(
    vocab_size=1024, d_model=256, n_layers=2, n_heads=4, head_dim=32, d_ff=512, max_context=16384, seed=5
)
VICTIM, STORM = "cli-victim", "cli-storm"


def et(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "enginetime", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sidecar with a finished victim (blamed on a storm), the storm, and the events stream's output."""
    sc = start_sidecar(tmp_path_factory.mktemp("cli"), "--storm-threshold", "0.05", "--metrics-port", "0")
    eng = Engine(
        EngineConfig(
            num_shards=2,
            coupling="lockstep",
            chunk_size=512,
            model=MODEL,
            ingest=sc.ingest,
            engine_id="cli-tb",
        )
    ).start()
    target = sc.grpc_target
    # A serving engine's cost model has seen prefills before its first storm: warm it with three
    # (two 512-token chunks each, nobody else running, so no storm), as the storm warning's
    # prediction of a 4096-token prefill is otherwise extrapolated from a 64-token one. Their
    # first tokens differ from each other's and the storm's: nothing of the storm is cached.
    # First wait for both shards' shipper processes to connect: their start-up competes with
    # the engine for this machine's two cores, and a model that learnt prefill prices from
    # two chunks slowed by it predicted 5x the storm's real cost (one CI run in ~12). Three
    # warm-ups also let the fit set aside chunks a passing load slowed (two 200 ms stalls in
    # six chunks, injected: 0.8x, was 6.6x with one warm-up).
    wait_until(
        lambda: all(sh["hooks"]["connected"] for sh in eng.info()["shards"]),
        30,
        message="the testbed's hooks never connected to the sidecar",
    )
    for w in range(3):
        prompt = [(3 * i + 1 + w) % 1024 for i in range(1024)]
        eng.generate(prompt, 1, rid=f"cli-warm-{w}", routed_shard=1, timeout=60)
    events = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enginetime",
            "events",
            "--json",
            "--sidecar",
            target,
            "--count",
            "2",
            "--duration",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = AccountingClient(target)
    try:
        # The events process prints nothing until a storm: wait until the sidecar serves its
        # stream (so it sees the storm from its start), not for a guessed second.
        wait_until(
            lambda: (
                events.poll() is not None
                or scrape(sc.metrics).get(("enginetime_stream_subscribers", ()), 0) >= 1
            ),
            30,
            message="the events process never subscribed",
        )
        assert events.poll() is None, events.communicate()
        victim = eng.submit(list(range(64)), 400, rid=VICTIM, routed_shard=0)

        # (wait_until counts RequestNotFound as "not yet")
        wait_until(lambda: client.get_request(VICTIM), 10, message="the sidecar never saw the victim")
        watch = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "enginetime",
                "watch",
                VICTIM,
                "--json",
                "--sidecar",
                target,
                "--interval",
                "0.05",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # 16 decode steps: with the warm-ups, the 16 observations the cost model's full fit needs.
        assert eng.wait_until(lambda: len(victim.output_ids) >= 16, 30)
        eng.generate([(7 * i) % 1024 for i in range(4096)], 1, rid=STORM, routed_shard=1, timeout=60)
        assert victim.wait(60)
        eng.flush_hooks(5)
        wait_until(lambda: client.get_request(VICTIM).terminal and client.get_request(STORM).terminal, 10)
        watch_out, watch_err = watch.communicate(timeout=30)
        events_out, events_err = events.communicate(timeout=60)
        yield {
            "target": target,
            "client": client,
            "engine": eng,
            "watch": (watch.returncode, watch_out, watch_err),
            "events": (events.returncode, events_out, events_err),
        }
    finally:
        for p in (events,):
            if p.poll() is None:
                p.kill()
        client.close()
        eng.close()
        sc.stop()
        sc.close()


def test_get_prints_the_accounting_and_json_agrees_with_the_client(world):
    out = et("get", VICTIM, "--sidecar", world["target"], "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = world["client"].get_request(VICTIM)
    assert got["request_id"] == VICTIM and got["state"] == "finished" and got["shard"] == 0
    assert got["engine_time_ns"] == want.engine_time_ns and got["interference_ns"] == want.interference_ns
    assert got["tokens"]["decoded"] == want.tokens.decoded >= 399  # the first token came from prefill
    assert got["top_blame"][0]["request_id"] == STORM and got["top_blame"][0]["same_shard"] is False
    human = et("get", VICTIM, "--sidecar", world["target"])
    assert human.returncode == 0
    assert VICTIM in human.stdout and "engine_time" in human.stdout and STORM in human.stdout
    assert "cross-shard" in human.stdout


def test_watch_streams_updates_until_the_request_finishes(world):
    rc, out, err = world["watch"]
    assert rc == 0, err
    updates = [json.loads(line) for line in out.splitlines()]
    assert len(updates) >= 3, "several updates while it ran"
    final = world["client"].get_request(VICTIM)
    assert updates[-1]["state"] == "finished" and updates[-1]["tokens"]["decoded"] == final.tokens.decoded
    decoded = [u["tokens"]["decoded"] for u in updates]
    assert decoded == sorted(decoded) and decoded[0] < final.tokens.decoded
    # Human form, on a finished request: its final line, then it ends.
    human = et("watch", VICTIM, "--sidecar", world["target"])
    assert human.returncode == 0 and "FINISHED" in human.stdout and "engine" in human.stdout


def test_events_reports_the_storm(world):
    rc, out, err = world["events"]
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    # Subscribed before the storm: first the warning at its admission, then its start.
    assert [e["phase"] for e in events] == ["predicted", "started"], events
    warn, ev = events
    assert ev["aggressor_request_id"] == STORM and ev["aggressor_shard"] == 1
    assert 0 in ev["victims"]["shards"] and ev["cross_shard"] is True
    assert warn["aggressor_request_id"] == STORM and warn["aggressor_shard"] == 1
    # Admitted while the victim decoded on shard 0; nothing of the 4096-token prompt had run yet.
    assert warn["victims"]["shards"] == [0] and warn["victims"]["request_count"] == 1
    assert warn["prefill_tokens"] == 4096 and warn["chunks"] == 0
    assert warn["victims"]["seconds"] >= 0.05  # the --storm-threshold it crossed
    assert warn["start_time_ns"] <= ev["start_time_ns"]
    # The prediction against what the victim then lost to the storm (measured: blame on it).
    # Seen here: 0.15-0.21 s predicted, 0.26-0.29 s measured; within a factor of 3 either way.
    blame = next(b for b in world["client"].get_request(VICTIM).top_blame if b.request_id == STORM)
    assert blame.seconds / 3 <= warn["victims"]["seconds"] <= 3 * blame.seconds, (
        f"predicted {warn['victims']['seconds']:.3f} s for the victims, measured {blame.seconds:.3f} s "
        f"of blame on {VICTIM}; warning {warn}"
    )


def test_requests_lists_with_filters(world):
    t = world["target"]
    out = et("requests", "--sidecar", t, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {VICTIM, STORM} <= {r["request_id"] for r in rows}
    # Other tests of this module add requests to the shared world (the tmux test runs a storm on
    # shard 1 too) and tests run in random order: check what the filter promises, not a full list.
    only = json.loads(et("requests", "--sidecar", t, "--json", "--shard", "1", "--state", "finished").stdout)
    assert STORM in [r["request_id"] for r in only] and VICTIM not in [r["request_id"] for r in only]
    assert all(r["shard"] == 1 and r["state"] == "finished" for r in only), only
    running = json.loads(et("requests", "--sidecar", t, "--json", "--state", "running").stdout)
    assert all(r["state"] == "running" for r in running) and {VICTIM, STORM}.isdisjoint(
        r["request_id"] for r in running
    )
    # The table lists the newest arrivals first: other tests' requests may come after VICTIM's.
    table = et("requests", "--sidecar", t, "--limit", str(len(rows) + 20))
    assert table.returncode == 0 and "REQUEST" in table.stdout and VICTIM in table.stdout
    newest = et("requests", "--sidecar", t, "--limit", "1")
    assert newest.returncode == 0 and len(newest.stdout.strip().splitlines()) == 2, newest.stdout


def test_top_once_and_json(world):
    out = et("top", "--sidecar", world["target"], "--once")
    assert out.returncode == 0, out.stderr
    assert "DECODE tok/s" in out.stdout and "cli-tb" in out.stdout and "STORMS NOW" in out.stdout
    snap = json.loads(et("top", "--sidecar", world["target"], "--json").stdout)
    assert set(snap) == {"target", "time", "shards", "running"}  # what `top --help` documents
    assert sorted(s["shard"] for s in snap["shards"]) == [0, 1]
    assert all(s["engine_id"] == "cli-tb" and s["connected"] for s in snap["shards"])


def test_every_json_help_documents_the_fields_it_prints():
    """`--help` of each command names every field its --json output carries (no "see elsewhere")."""
    import dataclasses

    from enginetime.clients import types
    from enginetime.clients.cli import JSON_HELP

    def names(cls) -> set[str]:
        return {f.name.removesuffix("_ns") for f in dataclasses.fields(cls)}

    shapes = {
        "get": [types.RequestAccounting, types.TokenCounts, types.Blame],
        "events": [types.InterferenceEvent, types.InterferenceVictims],
        "top": [types.ShardStatus, types.Storm],
    }
    for command, classes in shapes.items():
        for cls in classes:
            missing = {n for n in names(cls) if n not in JSON_HELP[command]}
            assert not missing, (command, cls.__name__, missing)
    for command in ("get", "watch", "events", "requests", "top"):
        out = et(command, "--help")
        assert out.returncode == 0 and "enginetime --help" not in out.stdout
        assert " ".join(JSON_HELP[command].split())[:40] in " ".join(out.stdout.split()), command


def demo_frame_snapshot():
    """What ``top`` holds 4.6 s into the demo's storm (the figures of a real run): 4 shards, one
    storm running, two ended, 7 running requests with long blame strings."""
    from google.protobuf.duration_pb2 import Duration
    from google.protobuf.timestamp_pb2 import Timestamp

    from enginetime.clients import _convert as cv
    from enginetime.clients.top import Snapshot
    from enginetime.v1 import accounting_pb2 as pb
    from enginetime.v1 import ingest_pb2

    now = 1_760_000_000.0

    def ts(t: float) -> Timestamp:
        return Timestamp(seconds=int(t), nanos=int((t % 1) * 1e9))

    def dur(x: float) -> Duration:
        return Duration(seconds=int(x), nanos=int((x % 1) * 1e9))

    shards = []
    for k in range(4):
        m = pb.ShardStatus(
            engine_id="testbed-demo", shard=k, coupling=ingest_pb2.COUPLING_LOCKSTEP,
            decode_tokens_per_second=0.0 if k == 3 else 7.0,
            prefill_tokens_per_second=1792.0 if k == 3 else 0,
            busy_fraction=1.0, active_requests=2, queued_requests=0, last_step_time=ts(now - 0.05), steps=157,
            connected=True, engine_kind="testbed", device_name="cpu",
        )  # fmt: skip
        if k == 3:
            m.current_storm.CopyFrom(
                pb.Storm(
                    request_id="session-long-turn-1",
                    shard=3,
                    prefill_tokens=12800,
                    prompt_tokens=16384,
                    chunks=25,
                    start_time=ts(now - 4.6),
                    stall=dur(30.5),
                )  # fmt: skip
            )
        shards.append(cv.shard_from_pb(m))
    events = []
    for rid, phase, start in (
        ("session-long-turn-1", 2, now - 4.6),
        ("old-storm-a", 3, now - 60),
        ("old-storm-b", 3, now - 30),
    ):
        ev = pb.InterferenceEvent(
            phase=phase, engine_id="testbed-demo", aggressor_request_id=rid, aggressor_shard=3,
            prefill_tokens=10752, chunks=21, start_time=ts(start), cross_shard=True,
            victims=pb.InterferenceVictims(shards=[0, 1, 2, 3], request_count=7, duration=dur(21.7)),
        )  # fmt: skip
        if phase == 3:
            ev.end_time.CopyFrom(ts(start + 4))
        events.append(cv.interference_from_pb(ev))
    running = []
    for i, rid in enumerate(["neighbour"] + [f"victim-{v}" for v in range(6)]):
        m = pb.RequestAccounting(
            request_id=rid, engine_id="testbed-demo", shard=3 if i == 0 else (i - 1) % 3,
            state=pb.REQUEST_STATE_RUNNING, arrival_time=ts(now - 4.87), engine_time_ns=480_000_000,
            interference_ns=4_330_000_000 - i, wall_ns=4_870_000_000, queue_time_ns=10_000_000,
            gpu_time_ns=490_000_000, tokens=pb.TokenCounts(prompt=64, prefilled=64, decoded=150),
            top_blame=[
                pb.Blame(request_id="session-long-turn-1", shard=3, duration=dur(4.3), same_shard=i == 0)
            ],
        )  # fmt: skip
        running.append(cv.request_from_pb(m))
    return Snapshot("127.0.0.1:39627", now, shards=shards, running=running, events=events)


@pytest.mark.parametrize(("width", "height"), [(80, 24), (200, 50)])
def test_top_frame_fits_the_terminal_with_the_columns_that_matter(width, height):
    from enginetime.clients.top import render

    lines = render(demo_frame_snapshot(), width, height)
    text = "\n".join(lines)
    assert len(lines) <= height and all(len(ln) <= width for ln in lines), text
    # Never cut, at any size: throughput, load, link, and each running request's wall, engine time,
    # interference and who caused it.
    for header in ("DECODE tok/s", "PREFILL tok/s", "BUSY", "ACTIVE", "QUEUED", "LINK"):
        assert header in text, (header, text)
    for header in ("WALL", "ENGINE", "INTERF", "TOP BLAME"):
        assert header in text, (header, text)
    shard_rows = [ln.split() for ln in lines if ln.startswith("testbed-demo")]
    assert [r[1] for r in shard_rows] == ["0", "1", "2", "3"] and all(r[-1] == "up" for r in shard_rows)
    victim = next(ln for ln in lines if ln.strip().startswith("victim-0"))
    assert {"4.87", "0.48", "4.33"} <= set(victim.split()), victim  # wall, engine_time, interference
    assert victim.endswith("session-long-turn-1 @3 4.3s x-shard"), victim
    # One storm view: the running storm appears once, live (with its summed stall labelled as a sum);
    # RECENT STORMS holds only the ended ones.
    assert sum("session-long-turn-1  prefill" in ln for ln in lines) == 1
    assert "lost 30.5 s in total" in text and "21.7 s" not in text.split("RECENT STORMS")[0]
    recent = text.split("RECENT STORMS")[1].split("RUNNING REQUESTS")[0]
    assert "session-long-turn-1" not in recent and "old-storm-b" in recent
    if width >= 200:  # wider terminals show more
        for header in ("COUPLING", "STEPS", "LAST STEP", "QUEUE", "OTHER", "GPU", "DECODED", "ENGINE ID"):
            assert header in text, (header, text)
        assert "old-storm-a" in recent and "top 6 of 7" in text


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
@pytest.mark.parametrize(("cols", "rows"), [(80, 24), (200, 50)])
def test_top_draws_in_a_real_terminal_and_q_quits(world, cols, rows):
    sock = f"et-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", sock]
    cmd = f"{sys.executable} -m enginetime top --sidecar {world['target']} --interval 0.3"
    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "top", "-x", str(cols), "-y", str(rows), cmd], check=True, env=env
    )
    try:

        def screen() -> str:
            return subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True
            ).stdout

        def drawn() -> str | None:
            s = screen()
            return s if "cli-tb" in s else None

        text = wait_until(drawn, 20, message=lambda: f"top never drew its table:\n{screen()}")
        lines = text.splitlines()
        assert lines[0].startswith("enginetime top") and world["target"] in lines[0]
        shard_rows = [ln.split() for ln in lines if ln.startswith("cli-tb")]
        assert [r[1] for r in shard_rows] == ["0", "1"] and all(r[-1] == "up" for r in shard_rows)
        assert any("STORMS NOW" in ln for ln in lines)
        for header in ("DECODE tok/s", "PREFILL tok/s", "BUSY", "ACTIVE", "QUEUED", "LINK"):
            assert header in text, (header, text)
        assert ("COUPLING" in text) == (cols >= 200), text  # wider terminals show more columns
        # A storm while top is up: it shows on the screen (live with its progress, then among recent storms).
        eng = world["engine"]
        storm_rid = f"top-storm-{cols}"  # each terminal size gets its own storm
        victim = eng.submit(list(range(64)), 600, rid=f"top-victim-{cols}", routed_shard=0)
        assert eng.wait_until(lambda: len(victim.output_ids) >= 4, 30)
        # A prompt of its own (no prefix-cache hit from the other size's storm).
        eng.submit([(5 * i + cols) % 1024 for i in range(6144)], 1, rid=storm_rid, routed_shard=1)

        def storm_shown() -> str | None:
            s = screen()
            return (
                s
                if any(storm_rid in ln and ("prefill" in ln or "lost" in ln) for ln in s.splitlines())
                else None
            )

        seen = wait_until(storm_shown, 30, message=lambda: f"the storm never showed:\n{screen()}")
        # The running victim's row keeps its wall, engine time, interference and blame on screen.
        assert "TOP BLAME" in seen and "WALL" in seen and "INTERF" in seen, seen
        assert victim.wait(60)
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
        wait_until(
            lambda: subprocess.run([*tmux, "has-session", "-t", "top"], capture_output=True).returncode != 0,
            5,
            message="top did not quit on q",
        )
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.parametrize(
    "args", [["get", "x"], ["watch", "x"], ["events", "--count", "1"], ["requests"], ["top", "--once"]]
)
def test_unreachable_sidecar_gives_a_clear_error(args):
    out = et(*args, "--sidecar", "127.0.0.1:1", timeout=30)
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "127.0.0.1:1" in out.stderr and "enginetime sidecar" in out.stderr and "--sidecar" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_request_is_a_clear_error(world):
    out = et("get", "no-such-request", "--sidecar", world["target"])
    assert out.returncode == 4 and "no-such-request" in out.stderr and "Traceback" not in out.stderr


def test_every_flag_of_every_command_has_help():
    """A newcomer reading `--help` learns what each flag does (no bare `--vocab VOCAB`)."""
    import argparse

    from enginetime.cli import build_parser

    bare: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.option_strings and not action.help and action.dest != "help":
                bare.append(f"{path} {action.option_strings[-1]}")

    walk(build_parser(), "enginetime")
    assert not bare, bare


def test_prefix_cache_hits_reach_the_accounting(world):
    """The testbed reports cache hits when it admits a request (SCHEDULED): the sidecar must count
    them, so prompt = cached + prefilled (a newcomer saw cached 0 for every request)."""
    eng, client = world["engine"], world["client"]
    prompt = list(range(64)) + [(3 * i) % 1024 for i in range(64)]  # the victim's 64 tokens, then new ones
    req = eng.generate(prompt, 2, rid="cli-cached", routed_shard=0, timeout=60)
    eng.flush_hooks(5)
    assert req.cached_tokens > 0, "the testbed's own prefix cache did not hit: nothing to check"
    acct = wait_until(lambda: (a := client.get_request("cli-cached")).terminal and a, 10)
    assert acct.tokens.prompt == len(prompt)
    assert acct.tokens.cached == req.cached_tokens
    assert acct.tokens.prompt == acct.tokens.cached + acct.tokens.prefilled
    out = json.loads(et("get", "cli-cached", "--sidecar", world["target"], "--json").stdout)
    assert out["tokens"]["cached"] == req.cached_tokens


def test_a_lockstep_shard_stepping_idle_is_not_busy(world):
    """Shard 1 has nothing to run while shard 0 decodes: it steps IDLE (waiting for its peer), which
    `top` must not show as busy (it read 97 %)."""
    eng, client = world["engine"], world["client"]
    req = eng.submit([(7 * i) % 1024 for i in range(32)], 16_000, rid="cli-busy", routed_shard=0)
    try:
        assert eng.wait_until(lambda: len(req.output_ids) >= 4, 30)
        time.sleep(2.5)  # the 2 s rate window now holds only this decode and shard 1's IDLE steps

        def both():
            shards = {s.shard: s for s in client.get_shards("cli-tb")}
            return shards if shards[0].busy_fraction > 0 else None

        shards = wait_until(both, 10)
    finally:
        eng.abort("cli-busy")
    assert shards[0].busy_fraction > 0.2 and shards[0].decode_tokens_per_second > 0, shards[0]
    assert shards[1].busy_fraction == 0.0 and shards[1].steps > 0, shards[1]


def test_top_says_when_the_sidecar_sees_part_of_an_engine():
    """One sidecar per node: `top` names the engine whose shards it sees only some of."""
    from enginetime.clients import _convert as cv
    from enginetime.clients.top import Snapshot, render
    from enginetime.v1 import accounting_pb2 as pb
    from enginetime.v1 import ingest_pb2

    def shard(engine: str, k: int, num: int, seen: int):
        m = pb.ShardStatus(
            engine_id=engine, shard=k, coupling=ingest_pb2.COUPLING_LOCKSTEP, connected=True,
            num_shards=num, shards_seen=seen, partial_view=seen < num,
        )  # fmt: skip
        return cv.shard_from_pb(m)

    node1 = [shard("dp16", k, 16, 8) for k in range(8, 16)]
    whole = [shard("dp8", k, 8, 8) for k in range(8)]
    assert node1[0].partial_view and (node1[0].num_shards, node1[0].shards_seen) == (16, 8)
    text = "\n".join(render(Snapshot("node-1:50151", 1_760_000_000.0, shards=node1 + whole), 120))
    assert "engine dp16: partial view, 8 of its 16 shards report here" in text, text
    assert "engine dp8" not in text
    # Following both nodes' sidecars (a fleet), top sees the whole engine: no note.
    node0 = [shard("dp16", k, 16, 8) for k in range(8)]
    text = "\n".join(render(Snapshot("a,b", 1_760_000_000.0, shards=node0 + node1), 120))
    assert "partial view" not in text, text
