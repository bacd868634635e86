"""Shared fixtures, and the two lanes of the suite.

* ``pytest -m "not e2e"`` — the fast lane: everything in this process, no sidecar, engine,
  testbed or engine venv started. A test in this lane that starts a process fails with a
  message saying to mark it ``e2e`` (``subprocess.Popen`` is refused), so the lane stays fast
  by construction, not by convention.
  The one process it allows is a recorder's own shipper process (``engine_hooks``'s, on
  the recorder's shared-memory ring): it is part of the hooks under test, not a sidecar.
* ``pytest`` — everything, including the ``e2e`` tests that talk to real processes over real
  sockets.

Fixtures:

* ``sidecar_factory`` — ``start(*args, **kw)`` launches a real sidecar (the package's
  launcher, log kept in the test's tmp dir) and stops every one it started at teardown;
* ``module_sidecar`` — one sidecar shared by a module's tests (tests that can share one:
  they use their own request ids); the module's ``SIDECAR_ARGS`` tuple adds flags;
* ``sim`` — a synthetic engine feeding a real Ledger on a fake clock (tests/simulator.py);
  ``ledger`` — a bare Ledger on the same kind of clock, for tests that feed records by hand.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import SidecarProcess, start_sidecar
from simulator import Clock, Sim, new_ledger

from enginetime.engine_hooks.ring_transport import is_shipper_command
from enginetime.sidecar.ledger.ledger import Ledger


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so a run with another ini file knows it.
    config.addinivalue_line("markers", "e2e: starts processes (sidecar, engine, testbed, engine venvs)")


@pytest.fixture(autouse=True)
def _fast_lane_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("e2e") is not None:
        return
    name = request.node.nodeid
    start = subprocess.Popen.__init__

    def refuse(self, *args, **kwargs):
        if is_shipper_command(args[0] if args else kwargs.get("args")):
            return start(self, *args, **kwargs)
        raise AssertionError(
            f"{name} starts a process ({args[0] if args else kwargs.get('args')!r}) but is not marked e2e: "
            "add @pytest.mark.e2e so `pytest -m 'not e2e'` stays the fast, in-process lane"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def start(*args: str, **kw) -> SidecarProcess:
        sp = start_sidecar(tmp_path, *args, **kw)
        started.append(sp)
        return sp

    yield start
    for sp in reversed(started):
        try:
            if sp.proc.poll() is None:
                sp.stop()
        finally:
            sp.close()


@pytest.fixture(scope="module")
def module_sidecar(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[SidecarProcess]:
    args = tuple(getattr(request.module, "SIDECAR_ARGS", ()))
    with start_sidecar(tmp_path_factory.mktemp(request.module.__name__), *args) as sp:
        yield sp


@pytest.fixture
def sim() -> Sim:
    return Sim()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(clock: Clock) -> Ledger:
    return new_ledger(clock=clock)
