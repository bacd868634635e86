"""The engine-time guard: time a proxied request out on its engine time, not on wall-clock time.

A session server wraps each call it proxies to the engine::

    guard = Guard("127.0.0.1:50151", EngineBudget(engine_time=600, liveness=60, wall=3600),
                  abort="http://engine:30000")            # SGLang / testbed /abort_request
    http = httpx.Client(transport=CancellableTransport(), timeout=None)

    with guard.watch(rid):                                # raises EngineBudgetExceeded
        r = http.post("http://engine:30000/generate", json={"rid": rid, ...})

or, in asyncio (``AsyncGuard``, any ``httpx.AsyncClient``)::

    async with guard.watch(rid):
        r = await http.post(...)

**One stream for all.** A guard follows every request it watches over a single
``StreamUpdates`` stream, however many are in flight. ``follow="all"`` (default)
subscribes to every request of the sidecar (or of ``engine_id``) and drops the
ones it does not watch: registering a request costs nothing on the sidecar, the
right choice when this session server sends the engine's traffic. ``follow="ids"``
subscribes to the watched ids only and restarts the stream (at most every
``restart_interval``) when new ones are added: the right choice when many session
servers share one engine and each should receive only its own requests.

**A fleet.** ``Guard(["a:50151", "b:50151"], ...)`` or ``Guard("dns:///name:50151", ...)``
follows several sidecars (one engine each): one stream per sidecar, a request followed
on whichever reports it, ``abort={engine_id: url}`` to abort on the engine that ran it.
A sidecar that dies costs only its own requests their telemetry.

**Resolution and cost.** The stream sends each watched request's figures at most every
``interval`` seconds (default 0.5 s): engine_time is checked that often, which is plenty
for budgets of minutes. The sidecar's cost grows with the number of requests changing per
second, so a shorter interval for thousands of requests costs the sidecar CPU (see
bench/bench_fanout.py).

**When it fires** (see ``EngineBudget``): engine_time over budget (checked on every
update), no step on the request's shard for ``liveness`` seconds while it is
admitted (confirmed with GetShards before anything is killed), queue time over
budget, or the wall backstop. It then cancels the HTTP call — asyncio: cancels the
task inside ``async with``; threads: shuts down the socket the thread is blocked on,
which needs the client built with ``CancellableTransport`` — and, with ``abort=``,
aborts the request on the engine. The ``with`` block raises ``EngineBudgetExceeded``
with the request's accounting.

**Fail-open.** If the sidecar is unreachable, or dies mid-request, the guard logs it
once, keeps only the wall backstop, reconnects with backoff and resumes when the
sidecar is back (liveness clocks restart then). A request the sidecar never reports
(its engine reports elsewhere, or the rid differs) is logged once and kept under the
wall backstop. Telemetry trouble never kills a request.

**Aborting on the engine.** ``abort="http://host:port"`` POSTs ``{"rid": rid}`` to
``/abort_request`` (SGLang, the testbed). vLLM's OpenAI server has no abort endpoint:
it aborts a request when its client disconnects, which is what cancelling the HTTP
call does; in-process (``AsyncLLM``), pass ``abort=llm.abort``. Any callable taking
the request id works (for ``AsyncGuard`` it may be a coroutine function). SGLang with
several tokenizer workers reports rids as ``<worker>_<rid>``: watch the id the
sidecar knows (``enginetime requests`` lists them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

import grpc

from . import _convert as cv
from . import _fleet
from ._guard_core import Due, Entry, Fire, Tracker, TrackerStats, group_by_source, shard_lookup
from .async_client import AsyncAccountingClient, AsyncStream
from .budget import EngineBudget, EngineBudgetExceeded
from .errors import EnginetimeError
from .sync_client import AccountingClient, Stream
from .types import RequestAccounting, RequestFilter

log = logging.getLogger("enginetime.clients.guard")

Follow = Literal["all", "ids"]
AbortFn = Callable[[str], object]
AbortSpec = str | AbortFn | Mapping[str, str | AbortFn] | None

_local = threading.local()


def current_watch() -> Watch | None:
    """The innermost sync ``Guard.watch`` block this thread is in (used by CancellableTransport)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def sglang_abort(base_url: str, timeout: float = 5.0) -> Callable[[str], bool]:
    """A callable that aborts a request on an SGLang (or testbed) server: POST /abort_request.

    Returns True when the engine aborted it, False when it no longer knew the id (it
    had finished, or the disconnect already aborted it). Uses urllib: no httpx needed.
    """
    if "://" not in base_url:
        raise ValueError(f"abort= wants the engine's base URL, e.g. http://127.0.0.1:30000, got {base_url!r}")
    url = base_url.rstrip("/") + "/abort_request"

    def abort(request_id: str) -> bool:
        body = json.dumps({"rid": request_id}).encode()
        req = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise

    abort.url = url  # type: ignore[attr-defined]
    return abort


_BACK = "enginetime guard: the sidecar at %s is back; engine-time budgets apply again"


def _abort_fn(abort, timeout: float):
    if abort is None or callable(abort):
        return abort
    if isinstance(abort, str):
        return sglang_abort(abort, timeout)
    raise TypeError(
        "abort= must be the engine's base URL, a callable taking the request id, a mapping from engine "
        f"id to either, or None; got {abort!r}"
    )


def _abort_map(abort, timeout: float) -> dict[str, Callable] | None:
    """``{engine_id: URL or callable}`` as callables; None when abort= is not a mapping."""
    if not isinstance(abort, Mapping):
        return None
    out = {}
    for engine_id, spec in abort.items():
        if not isinstance(engine_id, str) or spec is None:
            raise TypeError(
                "abort= as a mapping wants engine id -> engine base URL (or callable), "
                f"got {engine_id!r}: {spec!r}"
            )
        out[engine_id] = _abort_fn(spec, timeout)
    return out


def _targets(sidecar, client_class: type) -> list[str]:
    if isinstance(sidecar, str) or (isinstance(sidecar, Sequence) and not isinstance(sidecar, bytes)):
        return _fleet.split_targets(sidecar)
    raise TypeError(
        "sidecar= must be an address like '127.0.0.1:50151', a list of addresses (or 'dns:///name:port' "
        f"names), or a {client_class.__name__}; got {sidecar!r}"
    )


def _check_follow(follow: str) -> str:
    if follow not in ("all", "ids"):
        raise ValueError(
            f"follow= must be 'all' (every request, local dispatch) or 'ids' (watched ids), got {follow!r}"
        )
    return follow


def _raw(message):
    return message


class _Once:
    """Log a message once per key (outages log once per outage via the tracker's transitions)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, level: int, msg: str, *args) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.log(level, msg, *args)


class _GuardBase:
    """What the threaded and the asyncio guard share: settings, logging, firing."""

    def __init__(
        self,
        budget: EngineBudget | None,
        *,
        abort: AbortSpec,
        follow: Follow,
        engine_id: str,
        interval: float,
        unknown_after: float,
        reconnect: tuple[float, float],
        restart_interval: float,
        abort_timeout: float,
        shard_timeout: float,
    ) -> None:
        self.budget = budget if budget is not None else EngineBudget()
        if not isinstance(self.budget, EngineBudget):
            raise TypeError(f"budget= must be an EngineBudget, got {budget!r}")
        self.follow = _check_follow(follow)
        self.engine_id = engine_id
        cv.duration_from_seconds(interval, "interval")
        self.interval = interval
        self.reconnect = reconnect
        self.restart_interval = restart_interval
        self.shard_timeout = shard_timeout
        #: How long close() lets aborts already sent finish (each is bounded by this too).
        self.abort_timeout = abort_timeout
        self._abort_by_engine = _abort_map(abort, abort_timeout)
        self._abort = None if self._abort_by_engine is not None else _abort_fn(abort, abort_timeout)
        self._tracker = Tracker(self.budget, unknown_after=unknown_after)
        self._once = _Once()
        self._closed = False
        #: StreamUpdates streams this guard opened (one at a time; more only after outages or ids restarts).
        self.streams_opened = 0
        self.aborts_sent = 0
        self.aborts_failed = 0

    #: What the guard was given: addresses and dns:/// names (set by the subclass).
    _specs: list[str]
    _resolver: _fleet.Resolver | None
    resolve_interval: float

    def _resolve(self) -> list[str]:
        addrs, errors = _fleet.expand(self._specs, self._resolver)
        for err in errors:
            self._once(
                f"resolve:{err}",
                logging.WARNING,
                "enginetime guard: cannot resolve %s; retried every %.0f s (logged once)",
                err,
                self.resolve_interval,
            )
        return addrs

    @property
    def stats(self) -> TrackerStats:
        return self._tracker.stats

    @property
    def telemetry_up(self) -> bool:
        """The stream to the sidecar is delivering (False during an outage and before it first did)."""
        return bool(self._tracker.telemetry_up)

    @property
    def watching(self) -> int:
        return len(self._tracker.entries)

    def _stream_request(self, ids: list[str]):
        flt = RequestFilter(engine_id=self.engine_id, request_ids=ids if self.follow == "ids" else ())
        return cv.stream_updates_request(flt, interval=self.interval)

    def _log_down(self, target: str, exc: BaseException) -> None:
        log.warning(
            "enginetime guard: the sidecar at %s is unreachable (%s); only the wall-clock backstop is "
            "enforced until it is back, no request is killed for lack of telemetry",
            target,
            exc,
        )

    def _log_unknown(self, e: Entry, target: str) -> None:
        self._once(
            "unknown",
            logging.WARNING,
            "enginetime guard: the sidecar at %s has not reported request %r %.0f s after it was sent: only "
            "the wall-clock backstop applies to it. Check that the engine's hooks report to this sidecar "
            "(ENGINETIME_INGEST) and that the id matches (SGLang with several tokenizer workers reports "
            "'<worker>_<rid>'; vLLM reports the X-Request-Id). Logged once; later ones at debug level.",
            target,
            e.request_id,
            self._tracker.unknown_after,
        )
        log.debug("enginetime guard: request %r not reported by the sidecar yet", e.request_id)

    def _confirm(self, entries: list[Entry], lookup) -> list[Fire]:
        """Decide liveness suspects from GetShards (lookup None: the sidecar did not answer)."""
        fires = []
        now, wall_ns = time.monotonic(), time.time_ns()
        for e in entries:
            m = e.msg
            status = None if lookup is None or m is None else lookup(m.engine_id, m.shard)
            fire, why = self._tracker.confirm_liveness(e, status, now, wall_ns)
            if fire is not None:
                fires.append(fire)
            elif why == "recorder disconnected":
                assert m is not None  # a status was found for its engine and shard
                self._once(
                    f"disconnected:{m.engine_id}:{m.shard}",
                    logging.WARNING,
                    "enginetime guard: engine %r shard %d's recorder is disconnected from the sidecar: a "
                    "hung engine cannot be told from a telemetry outage there, so liveness is not enforced",
                    m.engine_id,
                    m.shard,
                )
        return fires

    def _abort_for(self, entry: Entry):
        """The abort callable for this request: the guard's, or its engine's from the mapping."""
        if self._abort_by_engine is None:
            return self._abort
        fn = self._abort_by_engine.get(entry.engine_id)
        if fn is None:
            self._once(
                f"noabort:{entry.engine_id}",
                logging.WARNING,
                "enginetime guard: request %r crossed its budget on engine %r, which abort= does not map to "
                "an engine URL: only its HTTP call is cut. Add the engine id to the abort= mapping.",
                entry.request_id,
                entry.engine_id,
            )
        return fn

    def _make_error(self, fire: Fire, aborted: bool) -> EngineBudgetExceeded:
        err = fire.error(time.monotonic(), aborted=aborted)
        self._tracker.stats.fires[fire.reason.value] += 1
        log.info("enginetime guard: %s", err)
        return err


# ============================================================================ threads


class Watch:
    """``with guard.watch(rid):`` — one request followed by a threaded ``Guard``.

    Raises ``EngineBudgetExceeded`` from the ``with`` when the guard fired, whatever
    the block raised meanwhile (the cut connection's httpx error becomes its cause).
    ``accounting`` is the sidecar's latest figures for the request (None until
    reported), handy for logging the engine time of requests that succeeded.
    """

    def __init__(self, guard: Guard, request_id: str, budget: EngineBudget | None) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(
                f"request_id must be a non-empty string (the rid sent to the engine), got {request_id!r}"
            )
        self.guard = guard
        self.request_id = request_id
        self.engine_id = ""  # set by the guard's watch()
        self.budget = budget or guard.budget
        self.error: EngineBudgetExceeded | None = None
        self._entry: Entry | None = None
        self._lock = threading.Lock()
        self._blocked: set = set()
        self._exited = False
        self.interrupted = False

    @property
    def fired(self) -> bool:
        return self.error is not None

    @property
    def accounting(self) -> RequestAccounting | None:
        e = self._entry
        return None if e is None else e.accounting()

    def check(self) -> None:
        """Raise EngineBudgetExceeded now if the guard fired (for code that polls inside the block)."""
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Watch:
        self._entry = self.guard._register(self)
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        with self._lock:
            self._exited = True
            self._blocked.clear()
        stack = getattr(_local, "stack", [])
        if self in stack:
            stack.remove(self)
        if self._entry is not None:
            self.guard._unregister(self._entry)
        err = self.error
        if err is None or exc is err:
            return False
        if exc_type is not None and not issubclass(exc_type, Exception):
            return False  # KeyboardInterrupt, SystemExit: not ours to replace
        raise err from exc

    # -- called by CancellableTransport streams (in this watch's thread) ----------------------

    def _attach(self, stream) -> bool:
        with self._lock:
            if self.error is not None:
                return False
            self._blocked.add(stream)
            return True

    def _detach(self, stream) -> None:
        with self._lock:
            self._blocked.discard(stream)

    # -- called by the guard (its timer or reader thread) -----------------------------------

    def _fire(self, err: EngineBudgetExceeded) -> bool:
        """Record the error and cut the blocked call; False when nothing could be interrupted."""
        with self._lock:
            if self._exited or self.error is not None:
                return True
            self.error = err
            blocked = list(self._blocked)
        for stream in blocked:
            stream.shutdown()
        self.interrupted = bool(blocked)
        return self.interrupted


class Guard(_GuardBase):
    """The engine-time guard for threaded session servers; see the module doc.

    ``sidecar`` is the sidecar's gRPC address, a list of addresses (a fleet: one
    stream per sidecar, a request is followed on whichever sidecar reports it),
    ``dns:///name:port`` names among them (resolved to every address behind the name
    and re-resolved every ``resolve_interval`` seconds; ``resolver`` replaces the
    system's), or an ``AccountingClient`` to share. With addresses, ``token``
    (default $ENGINETIME_API_TOKEN) and ``credentials`` (TLS) are passed to the
    clients it opens. A sidecar that dies costs only the requests it reported their
    telemetry: they keep the wall backstop; the other sidecars' requests stay enforced.
    Daemon threads (one stream reader per sidecar, a timer, a resolver with dns
    names) start with the first watch; ``close()`` stops them. Thread-safe: watch
    from any number of threads.
    """

    def __init__(
        self,
        sidecar: str | Sequence[str] | AccountingClient = cv.DEFAULT_TARGET,
        budget: EngineBudget | None = None,
        *,
        abort: AbortSpec = None,
        follow: Follow = "all",
        engine_id: str = "",
        interval: float = 0.5,
        unknown_after: float = 10.0,
        reconnect: tuple[float, float] = (0.25, 5.0),
        restart_interval: float = 0.2,
        abort_timeout: float = 5.0,
        shard_timeout: float = 2.0,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        resolve_interval: float = 30.0,
        resolver: _fleet.Resolver | None = None,
    ) -> None:
        super().__init__(
            budget,
            abort=abort,
            follow=follow,
            engine_id=engine_id,
            interval=interval,
            unknown_after=unknown_after,
            reconnect=reconnect,
            restart_interval=restart_interval,
            abort_timeout=abort_timeout,
            shard_timeout=shard_timeout,
        )
        self._token, self._credentials = token, credentials
        self._clients: dict[str, AccountingClient] = {}
        self._owned: set[str] = set()
        if isinstance(sidecar, AccountingClient):
            self._specs = [sidecar.target]
            self._clients[sidecar.target] = sidecar
        else:
            self._specs = _targets(sidecar, AccountingClient)
        self.resolve_interval = resolve_interval
        self._resolver = resolver
        self._cond = threading.Condition()
        self._streams: dict[str, Stream] = {}
        self._restart_at: float | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._aborts: concurrent.futures.ThreadPoolExecutor | None = None
        self._abort_futures: set[concurrent.futures.Future] = set()
        if not self._clients:
            self._set_targets(self._resolve())
        #: The first sidecar's client (with one sidecar: its client).
        self.client = next(iter(self._clients.values())) if self._clients else None
        self.target = self._specs[0] if len(self._specs) == 1 else ",".join(self._specs)
        self._owns_client = bool(self._owned)

    @property
    def targets(self) -> list[str]:
        """The sidecar addresses followed now (dns names resolved)."""
        with self._cond:
            return list(self._clients)

    def watch(self, request_id: str, budget: EngineBudget | None = None, *, engine_id: str = "") -> Watch:
        """A context manager following ``request_id``; ``budget`` overrides the guard's for this request.

        ``engine_id``: the engine serving it (default: the guard's). A request is
        (engine_id, request_id); without an engine, a watch follows the first engine
        that reports the id and never fires on figures once a second engine reports it.
        """
        watch = Watch(self, request_id, budget)
        watch.engine_id = engine_id or self.engine_id
        return watch

    # -- the fleet ------------------------------------------------------------------------------

    def _set_targets(self, addrs: list[str]) -> None:
        """Follow exactly ``addrs``: open clients (and readers, once running) for new ones, drop the rest."""
        with self._cond:
            if self._closed:
                return
            for a in addrs:
                if a not in self._clients:
                    self._clients[a] = AccountingClient(
                        a, timeout=self.shard_timeout, token=self._token, credentials=self._credentials
                    )
                    self._owned.add(a)
                    if self._threads:
                        log.info("enginetime guard: following the sidecar at %s", a)
                        self._start_reader(a)
            gone = [a for a in self._clients if a not in addrs and a in self._owned]
            for a in gone:
                log.warning(
                    "enginetime guard: the sidecar at %s left the fleet; its requests keep only the "
                    "wall-clock backstop",
                    a,
                )
                self._tracker.on_down(time.monotonic(), a)
                self._tracker.forget_source(a)
                client = self._clients.pop(a)
                self._owned.discard(a)
                stream = self._streams.pop(a, None)
                if stream is not None:
                    stream._guard_restart = True  # type: ignore[attr-defined]
                    stream.close()
                client.close()
            self._cond.notify_all()

    def _resolve_loop(self) -> None:
        while not self._stop.wait(self.resolve_interval):
            try:
                self._set_targets(self._resolve())
            except Exception:
                log.exception("enginetime guard: re-resolving the sidecars failed")

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop following (watches still open never fire afterwards) and release the threads."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            streams = list(self._streams.values())
            self._cond.notify_all()
        for stream in streams:
            stream.close()
        for t in self._threads:
            t.join(5)
        if self._aborts is not None:
            # A kill decided just before close() still reaches its engine: aborts in flight get
            # their own timeout to finish (an abort lost here leaves the engine running the request).
            concurrent.futures.wait(list(self._abort_futures), timeout=self.abort_timeout)
            self._aborts.shutdown(wait=False, cancel_futures=True)
        for a, client in self._clients.items():
            if a in self._owned:
                client.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- registration ---------------------------------------------------------------------------

    def _register(self, watch: Watch) -> Entry:
        with self._cond:
            if self._closed:
                raise EnginetimeError("this Guard is closed; create a new one")
            now = time.monotonic()
            entry = self._tracker.add(watch.request_id, now, watch.budget, watch, engine_id=watch.engine_id)
            if not self._threads:
                self._start_threads()
            if self.follow == "ids" and self._restart_at is None:
                # Let the current streams run a little (batching new ids), then reopen them with them.
                self._restart_at = now if not self._streams else now + self.restart_interval
            self._cond.notify_all()
        return entry

    def _unregister(self, entry: Entry) -> None:
        with self._cond:
            self._tracker.remove(entry)

    def _start_threads(self) -> None:
        if self._abort is not None or self._abort_by_engine:
            self._aborts = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix="enginetime-guard-abort"
            )
        self._start_thread("timer", self._timer_loop)
        for a in self._clients:
            self._start_reader(a)
        if _fleet.has_dns(self._specs):
            self._start_thread("resolver", self._resolve_loop)

    def _start_thread(self, name: str, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=f"enginetime-guard-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _start_reader(self, source: str) -> None:
        self._start_thread(f"reader-{source}", self._read_loop, source)

    # -- the streams ----------------------------------------------------------------------------

    def _read_loop(self, source: str) -> None:
        """Follow one sidecar's StreamUpdates until the guard closes or the sidecar leaves the fleet."""
        backoff = self.reconnect[0]
        while not self._stop.is_set():
            with self._cond:
                while self.follow == "ids" and not self._tracker.entries and not self._closed:
                    self._cond.wait()
                client = self._clients.get(source)
                if self._closed or client is None:
                    return
                ids = self._tracker.ids()
                self._restart_at = None
                try:
                    stream = self._streams[source] = client._stream(
                        "StreamUpdates", self._stream_request(ids), None, _raw
                    )
                except (EnginetimeError, ValueError) as exc:  # client closed, or a bad argument
                    if source in self._clients:
                        log.error("enginetime guard: cannot open the update stream to %s: %s", source, exc)
                    return
                self.streams_opened += 1
            try:
                first = True
                for batch in stream:
                    now, wall_ns = time.monotonic(), time.time_ns()
                    with self._cond:
                        if first and self._tracker.on_up(now, source):
                            log.warning(_BACK, source)
                        first = False
                        fires = self._tracker.on_batch(
                            batch.updates, cv._ts_ns(batch.time), now, wall_ns, source
                        )
                        self._cond.notify_all()
                    backoff = self.reconnect[0]
                    for fire in fires:
                        self._execute(fire)
                if self._stop.is_set() or getattr(stream, "_guard_restart", False):
                    continue  # closed by us (restart, removal or close): reopen or leave
                raise EnginetimeError("the sidecar ended the update stream")
            except (EnginetimeError, grpc.RpcError) as exc:
                # RpcError is not mapped by the client (should not happen): same as an outage.
                with self._cond:
                    if self._closed or source not in self._clients:
                        return
                    if self._tracker.on_down(time.monotonic(), source):
                        self._log_down(source, exc)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.reconnect[1])
            finally:
                stream.close()

    # -- time -----------------------------------------------------------------------------------

    def _timer_loop(self) -> None:
        tracker = self._tracker
        while True:
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    wake = [t for t in (tracker.next_due(), self._restart_at) if t is not None]
                    if wake and min(wake) <= now:
                        break
                    self._cond.wait(min(wake) - now if wake else None)
                if self._closed:
                    return
                now = time.monotonic()
                due = tracker.due(now)
                restart: list[Stream] = []
                if self._restart_at is not None and self._restart_at <= now:
                    self._restart_at = None
                    restart = list(self._streams.values())
            for stream in restart:
                stream._guard_restart = True  # type: ignore[attr-defined]
                stream.close()  # the reader reopens the stream with the new ids
            try:
                self._handle(due)
            except Exception:  # never let a bug stop the timer: the wall backstop depends on it
                log.exception("enginetime guard: timer failed to handle due items")

    def _handle(self, due: Due) -> None:
        for e in due.unknown:
            self._log_unknown(e, e.source or self.target)
        fires = list(due.fires)
        for (source, engine_id), entries in group_by_source(due.suspects).items():
            with self._cond:
                client = self._clients.get(source)
            try:
                if client is None:
                    raise EnginetimeError(f"the sidecar at {source} left the fleet")
                lookup = shard_lookup(client.get_shards(engine_id, timeout=self.shard_timeout))
            except EnginetimeError as exc:
                log.info("enginetime guard: liveness check skipped, GetShards failed: %s", exc)
                lookup = None
            with self._cond:
                fires += self._confirm(entries, lookup)
                self._cond.notify_all()
        for fire in fires:
            self._execute(fire)

    def _execute(self, fire: Fire) -> None:
        abort = self._abort_for(fire.entry)
        err = self._make_error(fire, abort is not None)
        watch: Watch = fire.entry.owner  # type: ignore[assignment]
        interrupted = watch._fire(err)
        if abort is not None and self._aborts is not None:
            future = self._aborts.submit(self._do_abort, abort, fire.entry.request_id)
            self._abort_futures.add(future)
            future.add_done_callback(self._abort_futures.discard)
        elif not interrupted:
            self._once(
                "uninterruptible",
                logging.WARNING,
                "enginetime guard: request %r crossed its budget but its thread is not blocked in a call "
                "this guard can cut: build the httpx.Client with transport=CancellableTransport(), or "
                "pass abort= so the engine ends the request; the with block raises EngineBudgetExceeded "
                "when the call returns",
                fire.entry.request_id,
            )

    def _do_abort(self, abort: Callable[[str], object], request_id: str) -> None:
        try:
            abort(request_id)
            self.aborts_sent += 1
        except Exception as exc:
            self.aborts_failed += 1
            log.warning("enginetime guard: aborting %r on the engine failed: %s", request_id, exc)


# ============================================================================ asyncio


class AsyncWatch:
    """``async with guard.watch(rid):`` — one request followed by an ``AsyncGuard``.

    When the guard fires it cancels the task running the block (httpx closes the
    connection, which aborts the request on SGLang, vLLM and the testbed) and the
    block raises ``EngineBudgetExceeded``. A cancellation from elsewhere still
    propagates as CancelledError.
    """

    def __init__(self, guard: AsyncGuard, request_id: str, budget: EngineBudget | None) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(
                f"request_id must be a non-empty string (the rid sent to the engine), got {request_id!r}"
            )
        self.guard = guard
        self.request_id = request_id
        self.engine_id = ""  # set by the guard's watch()
        self.budget = budget or guard.budget
        self.error: EngineBudgetExceeded | None = None
        self._entry: Entry | None = None
        self._task: asyncio.Task | None = None
        self._cancelling = 0
        self._cancel_sent = False
        self._exited = False

    @property
    def fired(self) -> bool:
        return self.error is not None

    @property
    def accounting(self) -> RequestAccounting | None:
        e = self._entry
        return None if e is None else e.accounting()

    async def __aenter__(self) -> AsyncWatch:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("AsyncGuard.watch must be used inside an asyncio task")
        self._task = task
        self._cancelling = task.cancelling()
        self._entry = self.guard._register(self)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        self._exited = True
        if self._entry is not None:
            self.guard._unregister(self._entry)
        err = self.error
        if err is None or exc is err:
            return False
        if self._cancel_sent and self._task is not None:
            if self._task.uncancel() > self._cancelling and exc_type is asyncio.CancelledError:
                return False  # also cancelled by someone else: that cancellation wins
        if exc_type is not None and not issubclass(exc_type, Exception | asyncio.CancelledError):
            return False
        raise err from exc

    def _fire(self, err: EngineBudgetExceeded) -> None:
        if self._exited or self.error is not None:
            return
        self.error = err
        if self._task is not None and not self._task.done():
            self._cancel_sent = True
            self._task.cancel(f"engine budget exceeded: {err.reason.value}")


class AsyncGuard(_GuardBase):
    """The engine-time guard for asyncio session servers; same arguments as ``Guard``.

    ``sidecar`` is an address, a list of addresses and ``dns:///name:port`` names (a
    fleet, as in ``Guard``), or an ``AsyncAccountingClient``. Runs one reader task per
    sidecar, a timer (and a resolver with dns names) on the loop of the first watch;
    ``await guard.aclose()`` stops them.
    """

    def __init__(
        self,
        sidecar: str | Sequence[str] | AsyncAccountingClient = cv.DEFAULT_TARGET,
        budget: EngineBudget | None = None,
        *,
        abort: AbortSpec | Callable[[str], Awaitable[object]] = None,
        follow: Follow = "all",
        engine_id: str = "",
        interval: float = 0.5,
        unknown_after: float = 10.0,
        reconnect: tuple[float, float] = (0.25, 5.0),
        restart_interval: float = 0.2,
        abort_timeout: float = 5.0,
        shard_timeout: float = 2.0,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        resolve_interval: float = 30.0,
        resolver: _fleet.Resolver | None = None,
    ) -> None:
        super().__init__(
            budget,
            abort=abort,
            follow=follow,
            engine_id=engine_id,
            interval=interval,
            unknown_after=unknown_after,
            reconnect=reconnect,
            restart_interval=restart_interval,
            abort_timeout=abort_timeout,
            shard_timeout=shard_timeout,
        )
        self._token, self._credentials = token, credentials
        self._clients: dict[str, AsyncAccountingClient] = {}
        self._owned: set[str] = set()
        if isinstance(sidecar, AsyncAccountingClient):
            self._specs = [sidecar.target]
            self._clients[sidecar.target] = sidecar
        else:
            self._specs = _targets(sidecar, AsyncAccountingClient)
        self.resolve_interval = resolve_interval
        self._resolver = resolver
        self._streams: dict[str, AsyncStream] = {}
        self._readers: dict[str, asyncio.Task] = {}
        self._restart_at: float | None = None
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._have_entries: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if not self._clients:
            self._set_targets(self._resolve())
        #: The first sidecar's client (with one sidecar: its client).
        self.client = next(iter(self._clients.values())) if self._clients else None
        self.target = self._specs[0] if len(self._specs) == 1 else ",".join(self._specs)
        self._owns_client = bool(self._owned)

    @property
    def targets(self) -> list[str]:
        """The sidecar addresses followed now (dns names resolved)."""
        return list(self._clients)

    def watch(
        self, request_id: str, budget: EngineBudget | None = None, *, engine_id: str = ""
    ) -> AsyncWatch:
        """An async context manager following ``request_id``; ``budget`` overrides the guard's.

        ``engine_id`` as in ``Guard.watch``.
        """
        watch = AsyncWatch(self, request_id, budget)
        watch.engine_id = engine_id or self.engine_id
        return watch

    # -- the fleet ------------------------------------------------------------------------------

    def _set_targets(self, addrs: list[str]) -> list[AsyncAccountingClient]:
        """Follow exactly ``addrs``. Returns the clients dropped (the caller closes them)."""
        dropped: list[AsyncAccountingClient] = []
        if self._closed:
            return dropped
        for a in addrs:
            if a not in self._clients:
                self._clients[a] = AsyncAccountingClient(
                    a, timeout=self.shard_timeout, token=self._token, credentials=self._credentials
                )
                self._owned.add(a)
                if self._loop is not None:
                    log.info("enginetime guard: following the sidecar at %s", a)
                    self._start_reader(a)
        for a in [a for a in self._clients if a not in addrs and a in self._owned]:
            log.warning(
                "enginetime guard: the sidecar at %s left the fleet; its requests keep only the "
                "wall-clock backstop",
                a,
            )
            self._tracker.on_down(time.monotonic(), a)
            self._tracker.forget_source(a)
            dropped.append(self._clients.pop(a))
            self._owned.discard(a)
            stream = self._streams.pop(a, None)
            if stream is not None:
                stream._guard_restart = True  # type: ignore[attr-defined]
                stream.cancel()
            task = self._readers.pop(a, None)
            if task is not None:
                task.cancel()
        return dropped

    async def _resolve_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.resolve_interval)
            try:
                addrs = await asyncio.to_thread(self._resolve)
                for client in self._set_targets(addrs):
                    await client.close()
            except Exception:
                log.exception("enginetime guard: re-resolving the sidecars failed")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in self._streams.values():
            stream.cancel()
        if self._side_tasks:
            # Aborts already sent get their own timeout to finish: a kill decided just before
            # aclose() must still reach its engine.
            await asyncio.wait(set(self._side_tasks), timeout=self.abort_timeout)
        tasks = (*self._tasks, *self._readers.values(), *self._side_tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for a, client in self._clients.items():
            if a in self._owned:
                await client.close()

    close = aclose

    async def __aenter__(self) -> AsyncGuard:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- registration ---------------------------------------------------------------------------

    def _register(self, watch: AsyncWatch) -> Entry:
        if self._closed:
            raise EnginetimeError("this AsyncGuard is closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._wake = asyncio.Event()
            self._have_entries = asyncio.Event()
            self._tasks = [loop.create_task(self._timer_loop(), name="enginetime-guard-timer")]
            for a in self._clients:
                self._start_reader(a)
            if _fleet.has_dns(self._specs):
                self._tasks.append(loop.create_task(self._resolve_loop(), name="enginetime-guard-resolver"))
        elif loop is not self._loop:
            raise RuntimeError("an AsyncGuard serves one event loop: create one guard per loop")
        now = time.monotonic()
        entry = self._tracker.add(watch.request_id, now, watch.budget, watch, engine_id=watch.engine_id)
        if self.follow == "ids" and self._restart_at is None:
            self._restart_at = now if not self._streams else now + self.restart_interval
        assert self._have_entries is not None and self._wake is not None  # made with the loop, above
        self._have_entries.set()
        self._wake.set()
        return entry

    def _start_reader(self, source: str) -> None:
        assert self._loop is not None
        self._readers[source] = self._loop.create_task(
            self._read_loop(source), name=f"enginetime-guard-reader-{source}"
        )

    def _unregister(self, entry: Entry) -> None:
        self._tracker.remove(entry)
        if not self._tracker.entries and self._have_entries is not None:
            self._have_entries.clear()

    # -- the streams ----------------------------------------------------------------------------

    async def _read_loop(self, source: str) -> None:
        backoff = self.reconnect[0]
        tracker = self._tracker
        wake, have_entries = self._wake, self._have_entries
        assert wake is not None and have_entries is not None  # made before this task (_register)
        while not self._closed:
            if self.follow == "ids":
                await have_entries.wait()
            client = self._clients.get(source)
            if client is None:
                return
            self._restart_at = None
            stream = self._streams[source] = client._stream(
                "StreamUpdates", self._stream_request(tracker.ids()), None, _raw
            )
            self.streams_opened += 1
            try:
                first = True
                async for batch in stream:
                    now, wall_ns = time.monotonic(), time.time_ns()
                    if first and tracker.on_up(now, source):
                        log.warning(_BACK, source)
                    first = False
                    fires = tracker.on_batch(batch.updates, cv._ts_ns(batch.time), now, wall_ns, source)
                    wake.set()
                    backoff = self.reconnect[0]
                    for fire in fires:
                        self._execute(fire)
                if self._closed or getattr(stream, "_guard_restart", False):
                    continue
                raise EnginetimeError("the sidecar ended the update stream")
            except EnginetimeError as exc:
                if self._closed or source not in self._clients:
                    return
                if tracker.on_down(time.monotonic(), source):
                    self._log_down(source, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect[1])
            finally:
                stream.cancel()

    # -- time -----------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        tracker = self._tracker
        woken = self._wake
        assert woken is not None  # made before this task (_register)
        while not self._closed:
            wake = [t for t in (tracker.next_due(), self._restart_at) if t is not None]
            woken.clear()
            delay = min(wake) - time.monotonic() if wake else None
            if delay is None:
                await woken.wait()
            elif delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await woken.wait()
            now = time.monotonic()
            due = tracker.due(now)
            if self._restart_at is not None and self._restart_at <= now:
                self._restart_at = None
                for stream in self._streams.values():
                    stream._guard_restart = True  # type: ignore[attr-defined]
                    stream.cancel()
            try:
                await self._handle(due)
            except Exception:
                log.exception("enginetime guard: timer failed to handle due items")

    async def _handle(self, due: Due) -> None:
        for e in due.unknown:
            self._log_unknown(e, e.source or self.target)
        fires = list(due.fires)
        for (source, engine_id), entries in group_by_source(due.suspects).items():
            client = self._clients.get(source)
            try:
                if client is None:
                    raise EnginetimeError(f"the sidecar at {source} left the fleet")
                lookup = shard_lookup(await client.get_shards(engine_id, timeout=self.shard_timeout))
            except EnginetimeError as exc:
                log.info("enginetime guard: liveness check skipped, GetShards failed: %s", exc)
                lookup = None
            fires += self._confirm(entries, lookup)
        for fire in fires:
            self._execute(fire)

    def _execute(self, fire: Fire) -> None:
        abort = self._abort_for(fire.entry)
        err = self._make_error(fire, abort is not None)
        watch: AsyncWatch = fire.entry.owner  # type: ignore[assignment]
        watch._fire(err)
        if abort is not None:
            task = asyncio.get_running_loop().create_task(self._do_abort(abort, fire.entry.request_id))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _do_abort(self, abort: Callable, request_id: str) -> None:
        try:
            if inspect.iscoroutinefunction(abort):
                await abort(request_id)
            else:
                result = await asyncio.to_thread(abort, request_id)
                if inspect.isawaitable(result):
                    await result
            self.aborts_sent += 1
        except Exception as exc:
            self.aborts_failed += 1
            log.warning("enginetime guard: aborting %r on the engine failed: %s", request_id, exc)


__all__ = ["AsyncGuard", "AsyncWatch", "Guard", "Watch", "current_watch", "sglang_abort"]
