"""The testbed's SGLang-compatible HTTP subset, driven by httpx against a real server.

What a session server written against SGLang relies on: /generate's body and
answer shape, routed_dp_rank pinning, /abort_request on a running request (and a
disconnecting client aborting its request), clear 400s for bad requests after
which the engine keeps serving, and the TITO driver's sticky vs migrating turns.
The last two tests run ``enginetime testbed serve`` as a real process.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import httpx
import pytest

from enginetime.testbed.engine import Engine, EngineConfig
from enginetime.testbed.http_api import EngineHTTPServer
from enginetime.testbed.model import ModelConfig
from enginetime.testbed.sessions import SessionDriver

pytestmark = pytest.mark.e2e  # every test here starts processes (see conftest.py)

SMALL = ModelConfig(
    vocab_size=512, d_model=128, n_layers=2, n_heads=4, head_dim=16, d_ff=256, max_context=8192, seed=1
)


def ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


@pytest.fixture(scope="module")
def server():
    engine = Engine(
        EngineConfig(num_shards=2, coupling="lockstep", model=SMALL, hooks=False, chunk_size=256)
    ).start()
    srv = EngineHTTPServer(engine).serve_in_thread()
    yield srv
    srv.stop()
    engine.close()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def generate(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/generate", json=body)


def test_generate_returns_sglang_shape(client):
    # Seed 1001: a prompt no other test of this module shares a prefix with (the engine and its
    # prefix cache are shared, tests run in random order; ids(20, 1) is ids(300, 1)'s start).
    r = generate(client, rid="g-1", input_ids=ids(300, 1001), sampling_params={"max_new_tokens": 12})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["output_ids"]) == 12 and all(isinstance(t, int) for t in out["output_ids"])
    assert out["text"] == ""
    meta = out["meta_info"]
    assert meta["id"] == "g-1"
    assert meta["prompt_tokens"] == 300 and meta["completion_tokens"] == 12
    assert meta["cached_tokens"] == 0
    assert meta["finish_reason"]["type"] == "length"
    assert 0 < meta["e2e_latency"] < 60
    assert meta["dp_rank"] in (0, 1)
    # Same prompt again on the same shard: served from the prefix cache, same greedy tokens.
    again = generate(
        client,
        rid="g-2",
        input_ids=ids(300, 1001),
        sampling_params={"max_new_tokens": 12},
        routed_dp_rank=meta["dp_rank"],
    ).json()
    assert again["output_ids"] == out["output_ids"]
    assert again["meta_info"]["cached_tokens"] == 299


def test_routed_dp_rank_is_honoured(client):
    for rank in (0, 1, 1, 0):
        meta = generate(
            client, input_ids=ids(20, rank), sampling_params={"max_new_tokens": 2}, routed_dp_rank=rank
        ).json()["meta_info"]
        assert meta["dp_rank"] == rank
    meta = generate(
        client, input_ids=ids(20, 9), sampling_params={"max_new_tokens": 2}, data_parallel_rank=1
    ).json()["meta_info"]
    assert meta["dp_rank"] == 1, "the older field name data_parallel_rank pins too"
    assert len(meta["id"]) >= 16, "a request without rid gets a generated id"


def test_unpinned_requests_spread_over_shards(server, client):
    results: list[int] = []

    def one(i: int) -> None:
        r = generate(client, input_ids=ids(30, 100 + i), sampling_params={"max_new_tokens": 30})
        results.append(r.json()["meta_info"]["dp_rank"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(results)) == [0, 1]


def test_abort_of_a_running_request(server, client):
    engine = server.engine
    box: dict = {}

    def run() -> None:
        box["resp"] = generate(
            client, rid="to-abort", input_ids=ids(50, 2), sampling_params={"max_new_tokens": 6000}
        )

    t = threading.Thread(target=run)
    t.start()
    assert engine.wait_until(lambda: (r := engine.get("to-abort")) is not None and len(r.output_ids) > 3, 30)
    ack = client.post("/abort_request", json={"rid": "to-abort"})
    assert ack.status_code == 200 and ack.json()["success"] is True
    t.join(30)
    resp = box["resp"]
    assert resp.status_code == 200
    meta = resp.json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert 3 < meta["completion_tokens"] < 6000
    # It is gone: aborting again is a 404 that says so.
    again = client.post("/abort_request", json={"rid": "to-abort"})
    assert again.status_code == 404 and "to-abort" in again.json()["message"]


def test_client_disconnect_aborts_the_request(server):
    engine = server.engine
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            generate(c, rid="impatient", input_ids=ids(40, 3), sampling_params={"max_new_tokens": 6000})
    assert engine.wait_until(lambda: engine.get("impatient") is None, 10), "request still running"


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"rid": "b1", "sampling_params": {"max_new_tokens": 4}}, "input_ids"),
        ({"input_ids": [1, "x", 3]}, "integers"),
        ({"input_ids": [1, 2.5]}, "integers"),
        ({"input_ids": "1 2 3"}, "list of token ids"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "ten"}}, "max_new_tokens"),
        ({"input_ids": [1, 2], "routed_dp_rank": 7}, "routed_dp_rank"),
        ({"input_ids": []}, "empty"),
        ({"input_ids": [1, 100000]}, "vocabulary"),
        ({"text": "hello"}, "no tokenizer"),
        ({"input_ids": [[1, 2], [3]]}, "batched"),
        ({"input_ids": [1], "rid": 5}, "rid"),
    ],
)
def test_bad_generate_requests_get_400_with_a_message(client, body, needle):
    r = client.post("/generate", json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert needle in err["message"] and err["code"] == 400 and err["object"] == "error"
    ok = generate(client, input_ids=ids(10, 4), sampling_params={"max_new_tokens": 2})
    assert ok.status_code == 200, "the engine keeps serving after a bad request"


def test_malformed_bodies_and_paths(client):
    r = client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    r = client.post("/generate", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "object" in r.json()["message"]
    r = client.post("/abort_request", json={})
    assert r.status_code == 400 and "rid" in r.json()["message"]
    r = client.post("/abort_request", json={"rid": "never-existed"})
    assert r.status_code == 404 and "never-existed" in r.json()["message"]
    r = client.get("/nope")
    assert r.status_code == 404
    assert client.get("/health").status_code == 200
    info = client.get("/get_server_info").json()
    assert info["dp_size"] == 2 and info["coupling"] == "lockstep" and info["chunked_prefill_size"] == 256


def test_duplicate_live_rid_is_rejected(server, client):
    box: dict = {}
    t = threading.Thread(
        target=lambda: box.setdefault(
            "r", generate(client, rid="dup", input_ids=ids(20, 5), sampling_params={"max_new_tokens": 6000})
        )
    )
    t.start()
    assert server.engine.wait_until(lambda: server.engine.get("dup") is not None, 10)
    with httpx.Client(base_url=server.url, timeout=30) as other:
        r = generate(other, rid="dup", input_ids=ids(20, 5), sampling_params={"max_new_tokens": 2})
        assert r.status_code == 400 and "already running" in r.json()["message"]
        assert other.post("/abort_request", json={"rid": "dup"}).status_code == 200
    t.join(30)
    assert box["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"


@pytest.mark.parametrize("routing", ["sticky", "round-robin"])
def test_tito_sessions_sticky_reuse_prefix_round_robin_migrates(server, routing):
    # One seed per routing: the module's engine (and its prefix cache) is shared, and tests run in
    # random order; the same prompts from the other variant would be cache hits here.
    seed = {"sticky": 7, "round-robin": 8}[routing]
    with SessionDriver(server.url, routing=routing, seed=seed) as driver:
        assert driver.num_shards == 2 and driver.vocab_size == 512
        sessions = driver.run(2, 3, prompt_tokens=400, turn_tokens=30, max_new_tokens=5)
    for s in sessions:
        shards = [t.shard for t in s.turns]
        assert [t.completion_tokens for t in s.turns] == [5, 5, 5]
        # Every turn sends the whole history: prompt grows by previous output + new tokens.
        assert [t.prompt_tokens for t in s.turns] == [400, 435, 470]
        if routing == "sticky":
            assert len(set(shards)) == 1
            assert [t.prefilled_tokens for t in s.turns[1:]] == [31, 31]
        else:
            assert shards[0] != shards[1] != shards[2]
            assert [t.cached_tokens for t in s.turns[1:2]] == [0]


def _serve(shards: int) -> tuple[subprocess.Popen, str]:
    """``enginetime testbed serve`` with a tiny model and no hooks, as a process; and its address."""
    cmd = [sys.executable, "-m", "enginetime", "testbed", "serve", "--port", "0", "--shards", str(shards)]
    cmd += ["--no-hooks", "--d-model", "64", "--d-ff", "128", "--vocab", "256", "--layers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("enginetime testbed ready http="):
        proc.kill()
        raise AssertionError(line + proc.communicate()[1])
    return proc, line.split("http=", 1)[1].split()[0]


def test_serve_command_runs_as_a_process():
    proc, addr = _serve(shards=2)
    try:
        with httpx.Client(base_url=f"http://{addr}", timeout=30) as c:
            assert c.get("/health").status_code == 200
            out = c.post(
                "/generate",
                json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 3}, "routed_dp_rank": 1},
            ).json()
            assert out["meta_info"]["dp_rank"] == 1 and len(out["output_ids"]) == 3
    finally:
        proc.terminate()
        try:
            assert proc.wait(20) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError("testbed serve did not stop within 20 s of SIGTERM") from None
        finally:
            if proc.poll() is None:  # never leave it running for the rest of the suite
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()


@pytest.mark.skipif(sys.platform != "linux", reason="tgkill (a signal to one thread) is Linux-only")
def test_serve_stops_on_sigterm_delivered_to_a_thread_other_than_main():
    # The kernel hands a process-directed signal to any thread that can take it: SIGTERM sent
    # right after SIGCONT (the main thread still waking) lands on an engine or HTTP thread.
    # Sending it to such a thread directly is that case made certain.
    import ctypes
    import signal

    proc, _ = _serve(shards=1)
    try:
        threads = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
        assert threads, "the testbed runs its shards and HTTP server in threads"
        libc = ctypes.CDLL(None, use_errno=True)
        # tgkill's syscall number: x86_64's table and the generic one (aarch64) differ.
        SYS_tgkill = 131 if os.uname().machine in ("aarch64", "arm64") else 234
        assert libc.syscall(SYS_tgkill, proc.pid, threads[-1], signal.SIGTERM) == 0, ctypes.get_errno()
        try:
            assert proc.wait(20) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError("testbed serve ignored a SIGTERM that a non-main thread received") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
