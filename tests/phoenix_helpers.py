"""Arize Phoenix (an OTLP trace backend with a web UI, from PyPI) as a real process for tests.

Phoenix lives in its own venv, built on first use and cached like the engines'
(``engine_envs.ensure("phoenix")``: ~1 min and ~850 MB once, well under a second after);
``ENGINETIME_PHOENIX_VENV`` points at another install. ``Phoenix`` starts ``phoenix serve``
on free loopback ports with a fresh working directory and stops it on exit.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from helpers import free_ports, wait_until


def phoenix_executable() -> Path:
    """Phoenix's ``phoenix`` command, building its cached venv if needed (fails with the build log)."""
    import engine_envs

    override = os.environ.get("ENGINETIME_PHOENIX_VENV")
    if override:
        return Path(override) / "bin" / "phoenix"
    try:
        return engine_envs.ensure("phoenix").path / "bin" / "phoenix"
    except engine_envs.EngineEnvError as exc:
        pytest.fail(f"cannot build the Arize Phoenix environment: {exc}")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


class _PortClash(AssertionError):
    """Something other than Phoenix's web server answers on the port chosen for it."""


class Phoenix:
    """``phoenix serve`` on loopback: ``base`` is its web UI and REST API, ``otlp`` its OTLP/gRPC."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "phoenix.log"
        self._start()

    def _start(self) -> None:
        self.http_port, self.grpc_port = free_ports(2)
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.otlp = f"http://127.0.0.1:{self.grpc_port}"
        env = dict(
            os.environ,
            PHOENIX_WORKING_DIR=str(self.workdir / "phoenix"),
            PHOENIX_PORT=str(self.http_port),
            PHOENIX_GRPC_PORT=str(self.grpc_port),
            PHOENIX_HOST="127.0.0.1",
        )
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(phoenix_executable()), "serve"], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def __enter__(self) -> Phoenix:
        """Wait for Phoenix's API; start it again on other ports if a stranger answers on its port.

        The ports are free when chosen, but another process may bind one before Phoenix does
        (a whole suite of servers starts around it): then an HTTP/2 or other non-HTTP/1 server
        answers, which is a clash of the test's making, not a Phoenix failure.
        """

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"phoenix exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                return get_json(f"{self.base}/v1/projects")
            except OSError:
                return None
            except http.client.HTTPException as exc:
                raise _PortClash(
                    f"port {self.http_port} answered, but not as Phoenix's HTTP API: {exc!r}"
                ) from exc

        def wait() -> None:
            wait_until(up, timeout=90, interval=0.2, message=lambda: f"phoenix never came up:\n{self.tail()}")

        try:
            for _ in range(2):
                try:
                    wait()
                    return self
                except _PortClash:
                    self.stop()
                    self._start()
            wait()  # a third clash fails the test, with what answered
            return self
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def project_id(self, name: str) -> str | None:
        """The UI's id of a project (what its URLs carry), None while it does not exist."""
        for p in get_json(f"{self.base}/v1/projects")["data"]:
            if p["name"] == name:
                return p["id"]
        return None

    def spans(self, project: str, limit: int = 1000) -> list[dict]:
        try:
            return get_json(f"{self.base}/v1/projects/{project}/spans?limit={limit}")["data"]
        except OSError:
            return []
