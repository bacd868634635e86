"""What the SGLang and vLLM adapters share: settings from the environment, guards.

Both adapters run inside the engine's processes, where a hook that raises would take
the engine down and a hook that logs every step would flood it. ``Guard`` wraps
every hook body: the first failure of each kind is logged with its traceback, later
ones are only counted, and the engine's own call always proceeds.

Settings come from environment variables because the engines start their scheduler
processes themselves (spawned, with their own argument parsing): an environment
variable is the one thing every engine process inherits.

=========================  ====================================================
``ENGINETIME_INGEST``      sidecar address, ``unix:PATH`` or ``tcp:HOST:PORT``
                           (default ``unix:/tmp/enginetime-<uid>/ingest.sock``)
``ENGINETIME_ENGINE_ID``   engine id shown by the sidecar (default
                           ``<engine>-<hostname>:<server port>``, unique per
                           engine instance on a host; a multi-node engine
                           defaults to ``<engine>-<rendezvous address>``,
                           the same on every node: SGLang's
                           ``--dist-init-addr``, vLLM's DP address and port)
``ENGINETIME_TIMER``       ``auto`` (CUDA events when a GPU is visible), ``cpu``,
                           ``cuda``
``ENGINETIME_COUPLING``    ``independent`` / ``lockstep``: overrides what the
                           adapter infers (DP attention / MoE DP = lockstep)
``ENGINETIME_DISABLE``     ``1`` turns every hook into a no-op without
                           uninstalling anything
=========================  ====================================================
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .shipper import ErrorLog

log = logging.getLogger("enginetime.engine_hooks")

F = TypeVar("F", bound=Callable[..., Any])

ENGINE_ID_ENV = "ENGINETIME_ENGINE_ID"
TIMER_ENV = "ENGINETIME_TIMER"
COUPLING_ENV = "ENGINETIME_COUPLING"
DISABLE_ENV = "ENGINETIME_DISABLE"

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter's knobs, read once per process from the environment."""

    engine_id: str
    address: str | None
    timer: str
    coupling: str | None  # None: infer from the engine's configuration
    disabled: bool
    engine_id_given: bool = False  # ENGINETIME_ENGINE_ID was set

    def for_instance(self, instance: object) -> AdapterSettings:
        """Settings whose default engine id names this engine instance (e.g. its server port).

        Two engines on one host would otherwise share ``<engine>-<hostname>`` and the
        sidecar would refuse the second (``shard_taken``). An explicit id is kept.
        """
        if self.engine_id_given or instance in (None, ""):
            return self
        return dataclasses.replace(self, engine_id=f"{self.engine_id}:{instance}")

    def for_group(self, rendezvous: str | None) -> AdapterSettings:
        """Settings whose default engine id names a multi-node engine by its rendezvous address.

        Every node of one engine is started with the same rendezvous address (SGLang's
        ``--dist-init-addr``, vLLM's ``--data-parallel-address``/``--data-parallel-rpc-port``),
        and no two running engines share one, so ``<engine>-<address>`` names the engine
        identically on all its nodes without configuration. An explicit id is kept.
        """
        if self.engine_id_given or not rendezvous:
            return self
        kind = self.engine_id.split("-", 1)[0]
        return dataclasses.replace(self, engine_id=f"{kind}-{rendezvous}")

    @classmethod
    def from_env(cls, engine_kind: str, env: Mapping[str, str] | None = None) -> AdapterSettings:
        env = os.environ if env is None else env
        given = env.get(ENGINE_ID_ENV, "").strip()
        engine_id = given or f"{engine_kind}-{_hostname()}"
        coupling = env.get(COUPLING_ENV, "").strip().lower() or None
        if coupling not in (None, "independent", "lockstep"):
            log.error(
                "enginetime: %s=%r is not 'independent' or 'lockstep'; inferring it instead",
                COUPLING_ENV,
                coupling,
            )
            coupling = None
        return cls(
            engine_id=engine_id,
            address=env.get("ENGINETIME_INGEST") or None,
            timer=env.get(TIMER_ENV, "").strip().lower() or "auto",
            coupling=coupling,
            disabled=env.get(DISABLE_ENV, "").strip().lower() in _TRUE,
            engine_id_given=bool(given),
        )


def _hostname() -> str:
    try:
        return socket.gethostname() or "localhost"
    except Exception:
        return "localhost"


class Guard:
    """Runs hook bodies so that nothing they do can raise into the engine.

    ``errors`` counts every failure; each distinct ``what`` is logged once (with the
    traceback) so a bug that repeats every step stays one log line.
    """

    def __init__(self, errors: ErrorLog | None = None) -> None:
        self.errors = errors or ErrorLog()

    def report(self, what: str, exc: BaseException | str) -> None:
        self.errors.report(what, exc)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None (counted, logged once) if it raised."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.errors.report(what, exc)
            return None

    def protect(self, what: str) -> Callable[[F], F]:
        """Decorator form of ``call``."""

        def deco(fn: F) -> F:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    self.errors.report(what, exc)
                    return None

            return wrapper  # type: ignore[return-value]

        return deco


def traceparent_of(headers: Any) -> str:
    """The W3C ``traceparent`` from a header mapping (any case), else ''."""
    if not headers:
        return ""
    try:
        value = headers.get("traceparent")
        if value is None:
            for key, val in headers.items():
                if str(key).lower() == "traceparent":
                    value = val
                    break
        return str(value) if value else ""
    except Exception:
        return ""


def as_int(value: Any, default: int = 0) -> int:
    """``int(value)`` for ints, numpy/torch scalars and CPU tensors; ``default`` otherwise.

    Never touches a CUDA tensor (``int()`` of one would synchronize the GPU).
    """
    if type(value) is int:
        return value
    if value is None:
        return default
    device = getattr(value, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        return default
    try:
        return int(value)
    except Exception:
        return default


def int_list(values: Any) -> list[int] | None:
    """A list of ints from a list/tuple/array/CPU tensor; None for CUDA tensors or junk."""
    if values is None:
        return None
    if type(values) is list and all(type(v) is int for v in values):
        return values
    device = getattr(values, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        return None  # reading it would synchronize the GPU
    try:
        tolist = getattr(values, "tolist", None)
        seq = tolist() if callable(tolist) else list(values)
        return [int(v) for v in seq]
    except Exception:
        return None


class HeldBatch:
    """A batch an adapter read: its request ids and handles, what a repeat of it reuses.

    ``inflight`` counts its steps begun and not yet recorded that hold its requests as a
    whole (a repeat; a decode batch read in C) rather than one by one.
    """

    __slots__ = ("ids", "handles", "inflight", "_id_set")

    def __init__(self, ids: list[str], handles: list[int]) -> None:
        self.ids = ids
        self.handles = handles
        self.inflight = 0
        self._id_set: set[str] | None = None

    def holds(self, rid: str) -> bool:
        if self._id_set is None:
            self._id_set = set(self.ids)
        return rid in self._id_set


class InFlight:
    """Which requests the steps begun and not yet recorded hold, and the ends waiting for them.

    The sidecar must never see a step of a request that already ended, so a FINISHED or
    ABORTED for a request a step in flight still holds waits (``end``) until that step is
    recorded or forgotten. A step holds its requests one by one (``hold_ids``: the general
    path, per request) or as its whole batch (``hold_batch``: no per-request work).
    ``send(rid, event)`` reports an end that no longer waits.
    """

    def __init__(self, send: Callable[[str, Any], None]) -> None:
        self.counts: dict[str, int] = {}
        self.batches: list[HeldBatch] = []
        self.deferred: dict[str, Any] = {}
        self._send = send

    def held(self, rid: str) -> bool:
        if self.counts.get(rid, 0) > 0:
            return True
        return any(b.holds(rid) for b in self.batches)

    def end(self, rid: str, event: Any) -> None:
        """A request ended: report it now, or once no step in flight holds it."""
        if self.held(rid):
            self.deferred[rid] = event
        else:
            self._send(rid, event)

    def hold_id(self, rid: str) -> None:
        self.counts[rid] = self.counts.get(rid, 0) + 1

    def release_ids(self, rids: Any) -> None:
        """Steps holding these requests one by one were recorded or forgotten."""
        counts = self.counts
        deferred = self.deferred
        for rid in rids:
            left = counts.get(rid, 1) - 1
            if left > 0:
                counts[rid] = left
                continue
            counts.pop(rid, None)
            if rid in deferred and not self.held(rid):
                self._send(rid, deferred.pop(rid))

    def hold_batch(self, b: HeldBatch) -> None:
        if b.inflight == 0:
            self.batches.append(b)
        b.inflight += 1

    def release_batch(self, b: HeldBatch) -> None:
        """A step holding ``b`` whole was recorded or forgotten: report what waited only for it."""
        b.inflight -= 1
        if b.inflight <= 0:
            b.inflight = 0
            if b in self.batches:
                self.batches.remove(b)
        if self.deferred:
            for rid in [r for r in self.deferred if not self.held(r)]:
                self._send(rid, self.deferred.pop(rid))
