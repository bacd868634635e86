"""Shared test helpers: a real ``enginetime sidecar`` subprocess and ingest frames.

Used by several test modules; keep the API small and stable:

- ``start_sidecar(tmpdir, *extra_args) -> SidecarProcess`` launches
  ``python -m enginetime sidecar`` on a fresh Unix socket and a free gRPC port
  (the package's ``enginetime.sidecar.launcher``) and returns once it printed its
  ready line; its log stays in ``tmpdir``.
- ``frame``/``hello``/``arrived``/``event``/``step``/``heartbeat`` build
  length-delimited IngestFrames with the generated protobuf classes (an encoder
  independent of the sidecar's hand-written decoder).
- ``IngestConnection`` is a raw ingest socket; ``wait_until`` polls a condition.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from enginetime.clients.errors import RequestNotFound
from enginetime.engine_hooks import wire
from enginetime.engine_hooks.constants import PROTOCOL_VERSION, parse_address
from enginetime.sidecar import launcher
from enginetime.v1 import ingest_pb2

T = TypeVar("T")


class SidecarProcess(launcher.SidecarProcess):
    """The package's launcher with the test-suite's strictness: a sidecar that ignores SIGTERM
    fails the test, and ``wait_for_log`` waits on its stderr."""

    @property
    def stderr_path(self) -> Path:
        return self.log_path

    def stderr_text(self) -> str:
        return self.log()

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until the sidecar's stderr contains ``text``; return the log."""

        def check() -> str | None:
            log = self.stderr_text()
            return log if text in log else None

        return wait_until(
            check,
            timeout,
            message=lambda: f"sidecar log never contained {text!r}:\n{self.stderr_text()[-4000:]}",
        )

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code. AssertionError (with the log) if it ignored SIGTERM."""
        code = super().stop(timeout)
        if code is None:
            raise AssertionError(
                f"sidecar ignored SIGTERM for {timeout}s; log:\n{self.stderr_text()[-4000:]}"
            )
        return code


def short_socket_dir() -> str:
    """A fresh directory under /tmp (AF_UNIX paths must stay under ~107 bytes)."""
    return tempfile.mkdtemp(prefix="et-", dir="/tmp")


def start_sidecar(
    tmpdir: Path,
    *extra_args: str,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    ingest: str | None = None,
) -> SidecarProcess:
    """``enginetime.sidecar.launcher.start_sidecar`` with its log in ``tmpdir`` (kept for the report).

    Raises AssertionError with the sidecar's stderr when it exits or is not ready
    within ``timeout`` seconds.
    """
    try:
        sp = launcher.start_sidecar(
            *extra_args, ingest=ingest, log_dir=tmpdir, env=env, timeout=timeout, process_class=SidecarProcess
        )
    except launcher.SidecarStartError as exc:
        raise AssertionError(str(exc)) from None
    assert isinstance(sp, SidecarProcess)
    return sp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server the test starts)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1, for one server that listens on several.

    All ``n`` sockets stay bound until every port is chosen: two ``free_port()`` calls in a
    row may be handed the same port (the first socket is closed by then), and a server told
    to listen twice on it serves one protocol where the test expects the other.
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return it. AssertionError on timeout.

    A request the sidecar does not know yet (``RequestNotFound``) counts as "not yet": the
    records a test just wrote to the ingest socket and its API call travel on separate
    connections, and the sidecar serves a waiting call before ingest it has queued, so a
    call right after the write can arrive first. On timeout the last such error is named.
    """
    deadline = time.monotonic() + timeout
    last: RequestNotFound | None = None
    while True:
        try:
            value = predicate()
        except RequestNotFound as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else f"{message} (after {timeout}s)"
            raise AssertionError(text if last is None else f"{text}; last: {last}")
        time.sleep(interval)


async def poll_async(check: Callable[[], object], timeout: float = 10.0, interval: float = 0.005) -> bool:
    """``wait_until`` for a test already running on an event loop: True once ``check()`` is
    truthy (awaiting between tries, so the loop's servers keep running), False on timeout."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


# --------------------------------------------------------------------------- frames


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame(message: ingest_pb2.IngestFrame | bytes) -> bytes:
    """A length-delimited frame as it travels on the ingest socket."""
    body = message if isinstance(message, bytes) else message.SerializeToString()
    return varint(len(body)) + body


def hello(
    engine_id: str = "engine-a",
    shard: int = 0,
    num_shards: int = 1,
    coupling: int = 1,
    protocol_version: int = PROTOCOL_VERSION,
    **kw,
) -> bytes:
    msg = ingest_pb2.EngineHello(
        protocol_version=protocol_version,
        engine_id=engine_id,
        shard=shard,
        num_shards=num_shards,
        coupling=coupling,
        engine_kind=kw.pop("engine_kind", "test"),
        hooks_version=kw.pop("hooks_version", "test"),
        clock=ingest_pb2.ClockInfo(
            wall_time_ns=time.time_ns(), monotonic_ns=time.monotonic_ns(), timer_source=1, device_name="cpu"
        ),
        recorder_epoch=kw.pop("recorder_epoch", time.monotonic_ns()),
        **kw,
    )
    return frame(ingest_pb2.IngestFrame(hello=msg))


def event(handle: int, kind: int, time_ns: int | None = None, **kw) -> bytes:
    msg = ingest_pb2.RequestEvent(
        handle=handle, kind=kind, time_ns=time.time_ns() if time_ns is None else time_ns, **kw
    )
    return frame(ingest_pb2.IngestFrame(request_event=msg))


def arrived(handle: int, request_id: str, prompt_tokens: int = 16, time_ns: int | None = None, **kw) -> bytes:
    return event(handle, 1, time_ns, request_id=request_id, prompt_tokens=prompt_tokens, **kw)


def finished(handle: int, output_tokens: int = 0, time_ns: int | None = None, reason: str = "stop") -> bytes:
    return event(handle, 5, time_ns, finish_reason=reason, output_tokens=output_tokens)


def step(
    seq: int,
    handles: Sequence[int],
    prefill: Sequence[int] | None = None,
    decode: Sequence[int] | None = None,
    context: Sequence[int] | None = None,
    *,
    device_time_ns: int = 5_000_000,
    start_time_ns: int | None = None,
    kind: int | None = None,
    global_step: int | None = None,
    peer_tokens: Sequence[int] = (),
    packed: bool = False,
) -> bytes:
    """One StepRecord (``packed``: as IngestFrame.packed_step, as recorders send it);
    defaults: decode one token per entry, context 100, 5 ms."""
    n = len(handles)
    prefill = list(prefill) if prefill is not None else [0] * n
    decode = list(decode) if decode is not None else [0 if p else 1 for p in prefill]
    context = list(context) if context is not None else [100] * n
    if kind is None:
        has_p, has_d = any(prefill), any(decode)
        kind = 3 if has_p and has_d else 1 if has_p else 2 if has_d else 4
    start = time.time_ns() - device_time_ns if start_time_ns is None else start_time_ns
    if packed:
        return wire.frame_packed_step(
            seq=seq,
            global_step=global_step,
            start_time_ns=start,
            end_time_ns=start + device_time_ns,
            device_time_ns=device_time_ns,
            timer_source=1,
            kind=kind,
            handles=list(handles),
            prefill_tokens=prefill,
            decode_tokens=decode,
            context_tokens=context,
            peer_tokens=list(peer_tokens),
        )
    msg = ingest_pb2.StepRecord(
        seq=seq,
        start_time_ns=start,
        end_time_ns=start + device_time_ns,
        device_time_ns=device_time_ns,
        timer_source=1,
        kind=kind,
        handles=list(handles),
        prefill_tokens=prefill,
        decode_tokens=decode,
        context_tokens=context,
        peer_tokens=list(peer_tokens),
    )
    if global_step is not None:
        msg.global_step = global_step
    return frame(ingest_pb2.IngestFrame(step=msg))


def heartbeat(**kw) -> bytes:
    return frame(ingest_pb2.IngestFrame(heartbeat=ingest_pb2.Heartbeat(time_ns=time.time_ns(), **kw)))


class IngestConnection:
    """A raw connection to a sidecar's ingest address (what a recorder opens)."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        family, target = parse_address(address)
        if family == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(
                socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_STREAM
            )
        self.sock.settimeout(timeout)
        self.sock.connect(target)

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """Wait until the sidecar closes this connection (True) or ``timeout`` passes (False)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IngestConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_ingest_frame(payload: bytes) -> ingest_pb2.IngestFrame:
    """Parse one IngestFrame as a fake sidecar does; a packed step reads as the StepRecord it carries.

    Recorders send steps as ``packed_step`` (a fixed layout, engine_hooks/wire.py); the
    tests that check what a recorder sent look at them as ``frame.step``.
    """
    msg = ingest_pb2.IngestFrame.FromString(payload)
    if msg.WhichOneof("frame") == "packed_step":
        fields = wire.unpack_step(msg.packed_step)
        global_step = fields.pop("global_step")
        msg = ingest_pb2.IngestFrame(step=ingest_pb2.StepRecord(**fields))
        if global_step is not None:
            msg.step.global_step = global_step
    return msg
