"""The trust boundary (docs/SECURITY.md), attacked as a hostile peer or a careless operator would.

Every test runs a real ``enginetime sidecar`` process and real sockets, plays the
attack, and then checks that the well-behaved engine lost nothing: its requests are
still the ones the API answers, with their own figures. Tests that need another uid
(squatted directory, foreign peer) run their hostile part in a child process that
drops to ``nobody``; they need root for that and are skipped (visibly) otherwise.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    IngestConnection,
    arrived,
    finished,
    frame,
    hello,
    short_socket_dir,
    start_sidecar,
    step,
    wait_until,
)
from otel_helpers import metrics_address, scrape

from enginetime.clients import AccountingClient
from enginetime.engine_hooks.recorder import Recorder
from enginetime.v1 import accounting_pb2 as pb
from enginetime.v1 import accounting_pb2_grpc as pb_grpc
from enginetime.v1 import ingest_pb2

# Every test here starts processes (a real sidecar, clients, a browser).
pytestmark = pytest.mark.e2e

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


# ----------------------------------------------------------------------------- helpers


def _stub(sp, credentials=None):
    channel = (
        grpc.secure_channel(sp.grpc_target, credentials)
        if credentials is not None
        else grpc.insecure_channel(sp.grpc_target)
    )
    return channel, pb_grpc.AccountingServiceStub(channel)


def _get(stub, rid: str, engine_id: str = "", **kw):
    return stub.GetRequest(pb.GetRequestRequest(request_id=rid, engine_id=engine_id), timeout=5, **kw).request


def _wait_request(stub, rid: str, steps: int, **kw):
    def check():
        try:
            r = _get(stub, rid, **kw)
        except grpc.RpcError:
            return None
        return r if r.steps >= steps else None

    return wait_until(check, timeout=10, message=f"request {rid} never reached {steps} steps")


def _victim(conn: IngestConnection, engine: str = "victim", epoch: int = 1) -> None:
    """A well-behaved engine: one live request, one 5 ms step."""
    conn.send(hello(engine, recorder_epoch=epoch), arrived(1, "r-1"), step(0, [1], prefill=[16]))


def _forgery(engine: str, epoch: int = 2) -> bytes:
    """The three frames of finding 1: announce the victim's id, charge it an hour of device time."""
    return (
        hello(engine, recorder_epoch=epoch)
        + arrived(1, "r-1")
        + step(0, [1], prefill=[16], device_time_ns=3_600_000_000_000)
    )


def _python_for_others() -> str:
    """A Python interpreter another uid may execute: the snippets need only the stdlib.

    The test's own interpreter often lives under a private home directory (pyenv in /root),
    which the hostile uid cannot enter; the system's python3 can be run by anyone.
    """
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        if os.path.exists(candidate) and _executable_by_others(candidate):
            return candidate
    pytest.skip("no Python interpreter that another uid may run (install Debian's python3)")


def _executable_by_others(path: str) -> bool:
    real = os.path.realpath(path)
    probe = Path(real)
    for part in [probe, *probe.parents]:
        mode = part.stat().st_mode
        if not mode & 0o001:
            return False
    return True


def _run_as(uid: int, code: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run a Python snippet as another uid (the hostile local user)."""

    def drop() -> None:
        os.setgid(uid)
        os.setuid(uid)

    return subprocess.run(
        [_python_for_others(), "-c", code],
        preexec_fn=drop,  # noqa: PLW1509 - single-threaded moment right after fork in a test
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


def _rejected(sp, reason: str) -> float:
    samples = scrape(metrics_address(sp.stdout_lines))
    return samples.get(("enginetime_ingest_rejected_connections_total", (("reason", reason),)), 0.0)


def _write_secret(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


# ----------------------------------------------------------------------------- certificates


def _certs(tmp: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("enginetime test CA"))
        .issuer_name(name("enginetime test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage, sans) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_cert, client_key = leaf("session-server", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }
    out = {}
    for label, data in files.items():
        path = tmp / f"{label}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        out[label] = str(path)
    return out


# ----------------------------------------------------------------------------- 1, 2: ownership


def test_a_second_connection_cannot_take_over_a_shard_or_its_requests(tmp_path) -> None:
    """Finding 1 (forged engine) and 2 (duplicate shard): shard_taken; the victim keeps its request."""
    with start_sidecar(tmp_path, "--metrics-port", "0") as sp:
        channel, stub = _stub(sp)
        with channel, IngestConnection(sp.ingest) as victim:
            _victim(victim)
            _wait_request(stub, "r-1", 1)
            with IngestConnection(sp.ingest) as attacker:
                attacker.send(_forgery("victim"))
                assert attacker.closed_by_peer(), "the sidecar kept a second connection for a taken shard"
            victim.send(step(1, [1]))
            r = _wait_request(stub, "r-1", 2)
            assert r.engine_id == "victim" and r.state == pb.REQUEST_STATE_RUNNING
            assert r.gpu_time_ns == 10_000_000, "the forged hour of device time reached the victim"
            assert not r.partial and r.finish_reason == ""  # not aborted as "engine restarted"
            log = sp.stderr_text()
            assert "shard_taken" in log and "already connected from pid" in log
            assert f"this peer is pid {os.getpid()}" in log  # both peers named
            assert _rejected(sp, "shard_taken") == 1

            # The same recorder (same epoch) reconnecting is welcome: its old connection is closed.
            with IngestConnection(sp.ingest) as again:
                again.send(hello("victim", recorder_epoch=1), step(2, [1]), finished(1, output_tokens=3))
                assert victim.closed_by_peer(), "the superseded connection stayed open"
                r = wait_until(
                    lambda: (x := _get(stub, "r-1")).state == pb.REQUEST_STATE_FINISHED and x,
                    message="the reconnected recorder's FINISHED never arrived",
                )
                assert r.steps == 3 and r.gpu_time_ns == 15_000_000 and r.tokens.decoded >= 0


def test_a_forged_engine_with_its_own_id_cannot_answer_for_the_victims_request(tmp_path) -> None:
    """Finding 1 with another engine id: the forger may announce the same request id on its own
    engine, but a bare lookup is then ambiguous (never a silent pick of the forgery), the victim's
    engine still answers with its own figures, and a guard following the bare id does not kill."""
    from enginetime.clients import AmbiguousRequest, EngineBudget, Guard

    with start_sidecar(tmp_path) as sp:
        channel, stub = _stub(sp)
        with (
            channel,
            AccountingClient(sp.grpc_target) as client,
            IngestConnection(sp.ingest) as victim,
            IngestConnection(sp.ingest) as forger,
        ):
            _victim(victim)
            _wait_request(stub, "r-1", 1)
            guard = Guard(client, EngineBudget(engine_time=30.0, liveness=None), interval=0.05)
            try:
                watch = guard.watch("r-1")
                watch.__enter__()
                wait_until(lambda: watch.accounting is not None, 10.0, message="the guard never saw r-1")
                forger.send(
                    hello("intruder", recorder_epoch=7)
                    + arrived(1, "r-1")
                    + step(0, [1], prefill=[16], device_time_ns=3_000_000_000_000)
                )
                wait_until(lambda: _known(stub, "intruder"), message="the forged request never arrived")
                with pytest.raises(grpc.RpcError) as err:
                    _get(stub, "r-1")
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "victim" in err.value.details() and "intruder" in err.value.details()
                mine = _get(stub, "r-1", engine_id="victim")
                assert mine.engine_id == "victim" and mine.gpu_time_ns == 5_000_000
                with pytest.raises(AmbiguousRequest):
                    client.get_request("r-1")
                # The guard saw the second engine's claim and holds its fire: a 30 s budget, an
                # hour of forged device time, and nothing is killed.
                wait_until(
                    lambda: guard.stats.ambiguous >= 1, 10.0, message="the guard never saw the forgery"
                )
                time.sleep(0.5)  # several stream intervals with the forged figures on the wire
                assert not watch.fired, watch.error
                watch.__exit__(None, None, None)
            finally:
                guard.close()


def _known(stub, engine: str) -> bool:
    try:
        _get(stub, "r-1", engine_id=engine)
    except grpc.RpcError:
        return False
    return True


def test_a_shard_of_the_same_engine_with_another_layout_is_refused(tmp_path) -> None:
    with start_sidecar(tmp_path) as sp:
        channel, stub = _stub(sp)
        with channel, IngestConnection(sp.ingest) as victim:
            victim.send(hello("e", shard=0, num_shards=2, coupling=2), arrived(1, "r-1"), step(0, [1]))
            _wait_request(stub, "r-1", 1)
            with IngestConnection(sp.ingest) as other:
                other.send(hello("e", shard=1, num_shards=8, coupling=1))
                assert other.closed_by_peer()
            assert "engine_mismatch" in sp.stderr_text()
            shards = stub.GetShards(pb.GetShardsRequest(engine_id="e"), timeout=5).shards
            assert [s.shard for s in shards] == [0]


# ----------------------------------------------------------------------------- 3: Unix socket


@as_root
def test_a_squatted_socket_directory_is_refused(tmp_path) -> None:
    base = short_socket_dir()
    try:
        squat = Path(base) / "squat"
        squat.mkdir()
        os.chown(squat, NOBODY, NOBODY)  # pre-created by another user
        for mode, owner, why in ((0o700, NOBODY, "owned by uid 65534"), (0o777, 0, "writable by group")):
            os.chown(squat, owner, owner)
            squat.chmod(mode)
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "enginetime",
                    "sidecar",
                    "--ingest",
                    f"unix:{squat}/ingest.sock",
                    "--listen",
                    "127.0.0.1:0",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 1 and result.stdout == ""
            assert str(squat) in result.stderr and why in result.stderr, result.stderr
            assert "chmod 700" in result.stderr  # says how to fix it
            assert not (squat / "ingest.sock").exists()
    finally:
        subprocess.run(["rm", "-rf", base], check=False)


@as_root
def test_a_peer_of_another_uid_is_closed_unless_allowed(tmp_path) -> None:
    connect = (
        "import socket\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "s.connect({path!r})\n"
        "s.settimeout(10)\n"
        "try:\n"
        f"    s.sendall({_forgery('intruder')!r})\n"
        "    print('closed' if s.recv(1)==b'' else 'open')\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    print('closed')\n"
    )
    for allow in ((), ("--ingest-allow-uid", str(NOBODY))):
        with start_sidecar(tmp_path, "--metrics-port", "0", *allow) as sp:
            # Open the way to the socket for the test (a careless chmod): the uid check still holds.
            os.chmod(sp.sockdir, 0o711)
            os.chmod(sp.socket_path, 0o666)
            channel, stub = _stub(sp)
            with channel:
                if not allow:
                    result = _run_as(NOBODY, connect.format(path=sp.socket_path))
                    assert result.stdout.strip() == "closed", result.stderr
                    assert _rejected(sp, "peer_uid") == 1
                    assert "uid 65534" in sp.stderr_text()
                    with pytest.raises(grpc.RpcError) as err:
                        _get(stub, "r-1")
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                else:
                    # An allowed uid keeps its connection (the read times out instead of seeing EOF).
                    code = connect.format(path=sp.socket_path).replace("s.settimeout(10)", "s.settimeout(1)")
                    result = _run_as(NOBODY, code, timeout=30)
                    assert "TimeoutError" in result.stderr, (result.stdout, result.stderr)
                    assert _get(stub, "r-1").engine_id == "intruder"


def test_default_socket_path_is_per_user() -> None:
    from enginetime.engine_hooks import constants

    env = {k: v for k, v in os.environ.items() if k != "ENGINETIME_INGEST"}
    code = "from enginetime.engine_hooks.constants import ingest_address; print(ingest_address())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"unix:/tmp/enginetime-{os.getuid()}/ingest.sock"
    assert constants.default_ingest_address() == out.stdout.strip()


# ----------------------------------------------------------------------------- 4: limits


def test_an_idle_connection_flood_is_bounded_and_the_engine_still_gets_in(tmp_path) -> None:
    with start_sidecar(
        tmp_path, "--metrics-port", "0", "--max-ingest-connections", "40", "--ingest-hello-timeout", "0.5"
    ) as sp:
        started = time.monotonic()
        flood = []
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sp.socket_path)
            flood.append(s)
        # Every idle connection is closed: beyond the cap at once, the others at the hello timeout.
        for s in flood:
            s.settimeout(10)
            assert s.recv(1) == b""
        assert time.monotonic() - started < 10
        channel, stub = _stub(sp)
        with channel, IngestConnection(sp.ingest) as engine:
            _victim(engine, engine="well-behaved")
            r = _wait_request(stub, "r-1", 1)
            assert r.engine_id == "well-behaved"
        too_many = _rejected(sp, "too_many_connections")
        timed_out = _rejected(sp, "hello_timeout")
        assert too_many >= 200 and too_many + timed_out == 300
        for s in flood:
            s.close()
        log = sp.stderr_text()
        # Logged at most once a second per kind, not once per connection.
        assert log.count("too_many_connections") < 20 and log.count("hello_timeout") < 20


def test_giant_ids_are_clipped_and_never_echoed_whole(tmp_path) -> None:
    giant = "g" * (1 << 20)
    with start_sidecar(tmp_path, "--metrics-port", "0") as sp:
        channel, stub = _stub(sp)
        with channel, IngestConnection(sp.ingest) as conn:
            conn.send(hello("e"), arrived(1, giant, session_id="s" * 100_000), step(0, [1]))
            # The client asks with the full id and finds it: the API applies the same clip rule.
            r = _wait_request(stub, giant, 1)
            assert len(r.request_id.encode()) <= 512 and r.request_id.startswith("g" * 100)
            assert len(r.session_id.encode()) <= 512
            # Filters and subscriptions take the same rule: the full id finds the request.
            flt = pb.RequestFilter(request_ids=[giant], session_id="s" * 100_000)
            listed = stub.ListRequests(pb.ListRequestsRequest(filter=flt), timeout=5).requests
            assert [x.request_id for x in listed] == [r.request_id]
            stream = stub.StreamUpdates(pb.StreamUpdatesRequest(filter=flt), timeout=10)
            first = next(iter(stream))
            assert [u.request_id for u in first.updates] == [r.request_id]
            stream.cancel()
            with pytest.raises(grpc.RpcError) as err:
                _get(stub, "x" * (1 << 14))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED
            assert len(err.value.details()) < 1000
        samples = scrape(metrics_address(sp.stdout_lines))
        assert samples[("enginetime_ingest_clipped_fields_total", ())] == 2


def test_an_out_of_range_time_is_refused_and_listing_still_works(tmp_path) -> None:
    with start_sidecar(tmp_path, "--metrics-port", "0") as sp:
        channel, stub = _stub(sp)
        with channel, IngestConnection(sp.ingest) as victim:
            _victim(victim)
            _wait_request(stub, "r-1", 1)
            with IngestConnection(sp.ingest) as poison:
                poison.send(hello("poison"), arrived(1, "p-1", time_ns=-(2**63)))
                assert poison.closed_by_peer()
            assert _rejected(sp, "bad_value") == 1
            listed = stub.ListRequests(pb.ListRequestsRequest(), timeout=5).requests
            assert [x.request_id for x in listed] == ["r-1"]
            with pytest.raises(grpc.RpcError) as err:
                _get(stub, "p-1")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_garbage_request_bodies_are_invalid_argument_without_tracebacks(tmp_path) -> None:
    with start_sidecar(tmp_path) as sp:
        with grpc.insecure_channel(sp.grpc_target) as channel:
            call = channel.unary_unary("/enginetime.v1.AccountingService/GetRequest")
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as err:
                    call(b"\xff\xff\xff garbage", timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        log = sp.stderr_text()
        assert "Traceback" not in log and log.count("undecodable request body") <= 2


def test_streams_per_peer_are_limited(tmp_path) -> None:
    with start_sidecar(tmp_path, "--max-streams-per-peer", "2") as sp:
        channel, stub = _stub(sp)
        with channel:
            open_streams = [stub.StreamUpdates(pb.StreamUpdatesRequest()) for _ in range(2)]
            for s in open_streams:
                next(s)  # the initial batch: the stream is established
            third = stub.StreamUpdates(pb.StreamUpdatesRequest())
            with pytest.raises(grpc.RpcError) as err:
                next(third)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-streams-per-peer" in err.value.details()
            open_streams[0].cancel()
            wait_until(
                lambda: _stream_ok(stub), message="a stream slot was not given back when a stream ended"
            )
            open_streams[1].cancel()


def _stream_ok(stub) -> bool:
    s = stub.StreamUpdates(pb.StreamUpdatesRequest())
    try:
        next(s)
        return True
    except grpc.RpcError:
        return False
    finally:
        s.cancel()


# ----------------------------------------------------------------------------- 2: TCP ingest


def test_tcp_ingest_refuses_to_start_without_token_or_tls(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "enginetime",
            "sidecar",
            "--ingest",
            "tcp:127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "--ingest-token-file" in result.stderr and "--allow-insecure-ingest" in result.stderr
    with start_sidecar(tmp_path, "--allow-insecure-ingest", ingest="tcp:127.0.0.1:0") as sp:
        assert "has no token and no TLS" in sp.stderr_text()


def test_tcp_ingest_token(tmp_path, monkeypatch) -> None:
    token = _write_secret(tmp_path / "ingest-token", "correct horse battery staple")
    with start_sidecar(
        tmp_path, "--metrics-port", "0", "--ingest-token-file", token, ingest="tcp:127.0.0.1:0"
    ) as sp:
        channel, stub = _stub(sp)
        with channel:
            for attempt in (_forgery("victim"), _token_hello("wrong") + arrived(1, "r-1")):
                with IngestConnection(sp.ingest) as attacker:
                    attacker.send(attempt)
                    assert attacker.closed_by_peer()
            assert _rejected(sp, "bad_token") == 2
            assert "correct horse" not in sp.stderr_text()
            # The engine's hooks read the token from ENGINETIME_TOKEN_FILE.
            monkeypatch.setenv("ENGINETIME_TOKEN_FILE", token)
            rec = Recorder("victim", address=sp.ingest, timer="cpu")
            try:
                h = rec.request_arrived("r-1", prompt_tokens=4)
                tok = rec.step_begin()
                rec.step_end(
                    tok, kind=1, handles=[h], prefill_tokens=[4], decode_tokens=[0], context_tokens=[4]
                )
                assert rec.flush(10)
                r = _wait_request(stub, "r-1", 1)
                assert r.engine_id == "victim"
            finally:
                rec.close()


def _token_hello(token: str) -> bytes:
    msg = ingest_pb2.EngineHello(
        protocol_version=1, engine_id="victim", num_shards=1, coupling=1, token=token
    )
    return frame(ingest_pb2.IngestFrame(hello=msg))


def test_tcp_ingest_over_tls(tmp_path) -> None:
    certs = _certs(tmp_path)
    with start_sidecar(
        tmp_path,
        "--ingest-tls-cert",
        certs["server_cert"],
        "--ingest-tls-key",
        certs["server_key"],
        ingest="tcp:127.0.0.1:0",
    ) as sp:
        channel, stub = _stub(sp)
        with channel:
            # A plaintext peer gets nowhere.
            with IngestConnection(sp.ingest) as plain:
                plain.send(_forgery("victim"))
                assert plain.closed_by_peer()
            rec = Recorder("victim", address=sp.ingest, timer="cpu", tls_ca=certs["ca"])
            try:
                h = rec.request_arrived("r-1")
                tok = rec.step_begin()
                rec.step_end(
                    tok, kind=2, handles=[h], prefill_tokens=[0], decode_tokens=[1], context_tokens=[9]
                )
                assert rec.flush(10) and rec.stats().connected
                assert _wait_request(stub, "r-1", 1).engine_id == "victim"
            finally:
                rec.close()
            # A recorder that does not trust the sidecar's certificate never sends.
            (tmp_path / "other").mkdir()
            other = _certs(tmp_path / "other")
            rec = Recorder("impostor-check", address=sp.ingest, timer="cpu", tls_ca=other["ca"])
            try:
                assert not rec.flush(1.0)
                assert rec.stats().connected is False
            finally:
                rec.close()


# ----------------------------------------------------------------------------- 6: the API


def test_non_loopback_listen_needs_tls_or_token(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "enginetime",
            "sidecar",
            "--ingest",
            f"unix:{short_socket_dir()}/i.sock",
            "--listen",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "--api-token-file" in result.stderr and "--allow-insecure-listen" in result.stderr


def test_api_token(tmp_path, monkeypatch) -> None:
    token = _write_secret(tmp_path / "api-token", "api-secret-123")
    with start_sidecar(tmp_path, "--api-token-file", token, "--metrics-port", "0") as sp:
        with IngestConnection(sp.ingest) as conn:
            _victim(conn)
            channel, stub = _stub(sp)
            with channel:
                for metadata in ((), (("authorization", "Bearer wrong"),)):
                    with pytest.raises(grpc.RpcError) as err:
                        _get(stub, "r-1", metadata=metadata)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "ENGINETIME_API_TOKEN" in err.value.details()
                with pytest.raises(grpc.RpcError) as err:
                    next(stub.StreamUpdates(pb.StreamUpdatesRequest(), metadata=metadata))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # Probes need no token.
                health = health_pb2_grpc.HealthStub(channel)
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            with AccountingClient(sp.grpc_target, token="api-secret-123") as client:
                assert wait_until(lambda: client.get_request("r-1").steps == 1)
            monkeypatch.setenv("ENGINETIME_API_TOKEN", "api-secret-123")
            with AccountingClient(sp.grpc_target) as client:
                assert client.get_request("r-1").engine_id == "victim"
            cli = subprocess.run(
                [sys.executable, "-m", "enginetime", "get", "r-1", "--sidecar", sp.grpc_target, "--json"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "ENGINETIME_API_TOKEN": "api-secret-123"},
            )
            assert cli.returncode == 0 and '"victim"' in cli.stdout, cli.stderr
            conn.send(finished(1))
        samples = scrape(metrics_address(sp.stdout_lines))
        assert samples[("enginetime_api_rejected_calls_total", (("reason", "unauthenticated"),))] == 3
        # /metrics carries no request or session ids.
        import urllib.request

        with urllib.request.urlopen(f"http://{metrics_address(sp.stdout_lines)}/metrics", timeout=10) as resp:
            assert b"r-1" not in resp.read()


def test_api_tls_and_mtls(tmp_path) -> None:
    certs = _certs(tmp_path)
    read = lambda label: Path(certs[label]).read_bytes()  # noqa: E731
    with start_sidecar(
        tmp_path,
        "--tls-cert",
        certs["server_cert"],
        "--tls-key",
        certs["server_key"],
        "--tls-client-ca",
        certs["ca"],
    ) as sp:
        with IngestConnection(sp.ingest) as conn:
            _victim(conn)
            target = sp.grpc_target.replace("127.0.0.1", "localhost")
            # Plaintext is refused by the TLS port.
            with grpc.insecure_channel(sp.grpc_target) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    _get(pb_grpc.AccountingServiceStub(channel), "r-1")
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # TLS without a client certificate: the handshake fails (mTLS).
            no_cert = grpc.ssl_channel_credentials(read("ca"))
            with grpc.secure_channel(target, no_cert) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    _get(pb_grpc.AccountingServiceStub(channel), "r-1")
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            mtls = grpc.ssl_channel_credentials(read("ca"), read("client_key"), read("client_cert"))
            with AccountingClient(target, credentials=mtls) as client:
                r = wait_until(lambda: (x := client.get_request("r-1")).steps == 1 and x)
                assert r.engine_id == "victim"
