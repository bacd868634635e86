"""Start and stop ``python -m enginetime sidecar`` as a child process.

One launcher for everything that needs a real sidecar next to it: the demo, the
test suite and the benchmarks. It starts the sidecar on a private Unix socket (in
a short /tmp directory: AF_UNIX paths must stay under ~107 bytes) and a free gRPC
port, waits for the ready line — event-driven, on a thread reading stdout, so a
sidecar that dies early is reported at once instead of after a timeout — and reads
the addresses it actually bound from that line (the one place they are printed,
parsed with the prefix the server itself writes). stderr goes to a file, never a
pipe, so a chatty sidecar can never block on a full pipe.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from enginetime.engine_hooks.constants import parse_address
from enginetime.sidecar.server import READY_PREFIX


class SidecarStartError(RuntimeError):
    """The sidecar exited or printed no ready line in time; the message carries its log."""


def parse_ready_line(line: str) -> dict[str, str] | None:
    """``{"grpc": ..., "ingest": ..., ["metrics": ...]}`` from a ready line; None for any other line."""
    if not line.startswith(READY_PREFIX):
        return None
    fields = dict(part.split("=", 1) for part in line[len(READY_PREFIX) :].split() if "=" in part)
    return fields if "grpc" in fields and "ingest" in fields else None


class SidecarProcess:
    """A running sidecar child. ``grpc_target``/``ingest`` are the addresses it bound."""

    def __init__(
        self,
        proc: subprocess.Popen,
        fields: Mapping[str, str],
        log_path: Path,
        sockdir: str,
        stdout_lines: list[str],
        command: Sequence[str],
    ) -> None:
        self.proc = proc
        #: Everything the ready line said (grpc, ingest, and metrics when it serves them).
        self.fields = dict(fields)
        self.grpc_target = fields["grpc"]
        self.ingest = fields["ingest"]
        self.metrics: str | None = fields.get("metrics")
        self.log_path = log_path
        self.sockdir = sockdir
        #: Every stdout line so far (the ready line first); filled by the reader thread.
        self.stdout_lines = stdout_lines
        self.command = list(command)

    @property
    def socket_path(self) -> str | None:
        """The ingest socket's path when ingest is a Unix socket, else None."""
        family, target = parse_address(self.ingest)
        return target if family == "unix" and isinstance(target, str) else None

    def log(self) -> str:
        """The sidecar's stderr so far ("" once ``close()`` removed it with its directory)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the sidecar so far (Linux /proc; None elsewhere or once gone)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then wait up to ``timeout`` s for a graceful exit.

        Returns the exit code, or None when the sidecar ignored SIGTERM (it is then killed).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Kill if still running and remove the socket directory (and the log, when it lives there)."""
        self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def __enter__(self) -> SidecarProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.close()


def start_sidecar(
    *extra_args: str,
    ingest: str | None = None,
    listen: str = "127.0.0.1:0",
    log_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    python: str = sys.executable,
    process_class: type[SidecarProcess] = SidecarProcess,
) -> SidecarProcess:
    """Launch the sidecar and return once it printed its ready line.

    ``ingest`` defaults to a Unix socket in a fresh short /tmp directory (removed by
    ``close()``); ``log_dir`` (default: that directory) receives stderr as
    ``sidecar-<pid>-<n>.log``. ``env`` is added to this process's environment.
    Raises SidecarStartError, with the command and the sidecar's log, when it exits
    or is not ready within ``timeout`` seconds. ``process_class`` (a subclass of
    SidecarProcess) is what is returned, for callers that add their own checks.
    """
    sockdir = tempfile.mkdtemp(prefix="et-", dir="/tmp")
    if ingest is None:
        ingest = f"unix:{sockdir}/ingest.sock"
    logs = Path(log_dir) if log_dir is not None else Path(sockdir)
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"sidecar-{os.getpid()}-{time.monotonic_ns()}.log"
    cmd = [python, "-m", "enginetime", "sidecar", "--ingest", ingest, "--listen", listen, *extra_args]
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
    ready = threading.Event()
    lines: list[str] = []
    found: list[dict[str, str]] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if not found:
                    fields = parse_ready_line(line)
                    if fields is not None:
                        found.append(fields)
                        ready.set()
        except (OSError, ValueError):
            pass  # stdout closed by close()
        ready.set()  # EOF: the process is gone

    threading.Thread(target=read_stdout, name="enginetime-sidecar-stdout", daemon=True).start()
    ready.wait(timeout)
    if not found:
        proc.kill()
        proc.wait()
        log = log_path.read_text(errors="replace")
        shutil.rmtree(sockdir, ignore_errors=True)
        raise SidecarStartError(
            f"sidecar not ready within {timeout}s (exit code {proc.returncode}); command: {' '.join(cmd)}\n"
            f"stdout: {lines}\nstderr:\n{log[-4000:]}"
        )
    return process_class(proc, found[0], log_path, sockdir, lines, cmd)


__all__ = ["SidecarProcess", "SidecarStartError", "parse_ready_line", "start_sidecar"]
