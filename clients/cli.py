"""``enginetime top | get | watch | events | requests``: the sidecar from a terminal or a script.

Registered into the ``enginetime`` command (enginetime/cli.py). Every command talks to
one sidecar (``--sidecar HOST:PORT``, default ``$ENGINETIME_SIDECAR`` or
127.0.0.1:50151) and has ``--json`` for scripts: ``get`` prints one object,
``requests`` one array, ``watch`` and ``events`` one object per line (JSON Lines, so a
script can read them as they come). Field names are those of the client's dataclasses
(``enginetime.clients.types``): seconds as floats plus the exact ``*_ns`` integers,
enums as lower-case names.

Exit codes: 0 fine, 1 other errors, 3 the sidecar did not answer (the message names the
address and what to check), 4 the request is not known to the sidecar.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import shutil
import sys
import time
from collections.abc import Callable

from ._convert import DEFAULT_TARGET
from .errors import EnginetimeError, RequestNotFound, SidecarUnavailable
from .types import InterferenceEvent, InterferencePhase, RequestAccounting, RequestState

SIDECAR_ENV = "ENGINETIME_SIDECAR"

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4


def to_jsonable(obj):
    """Dataclasses, enums, tuples -> plain JSON values (enums as lower-case names)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.name.lower()
    if isinstance(obj, list | tuple):
        return [to_jsonable(x) for x in obj]
    return obj


def _dump(obj) -> str:
    return json.dumps(to_jsonable(obj))


# ---------------------------------------------------------------------------- formatting


def _f(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _clock(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _blame_line(b) -> str:
    who = b.request_id or f"(shard {b.shard}'s batch)"
    return f"{who} @ shard {b.shard}  {b.seconds:.3f} s  {'same shard' if b.same_shard else 'cross-shard'}"


def format_request(r: RequestAccounting) -> str:
    state = r.state.name + (f": {r.finish_reason}" if r.finish_reason else "")
    lines = [
        f"request       {r.request_id}",
        f"engine        {r.engine_id}  shard {r.shard}"
        + (f"  (asked for shard {r.routed_shard})" if r.routed_shard is not None else "")
        + (f"  session {r.session_id}" if r.session_id else ""),
        f"state         {state}",
        f"wall          {r.wall:.3f} s = queue {r.queue_time:.3f} + engine_time {r.engine_time:.3f} "
        f"+ interference {r.interference:.3f} + other {r.other:.3f}",
        f"gpu_time      {r.gpu_time:.3f} s",
        f"tokens        prompt {r.tokens.prompt} (cached {r.tokens.cached}), prefilled {r.tokens.prefilled}, "
        f"decoded {r.tokens.decoded}",
        f"steps         {r.steps} (+{r.excluded_steps} of its shard without it), preemptions {r.preemptions}",
        f"last step     {_clock(r.last_step_time)}",
    ]
    flags = [name for name, on in (("migrated", r.migrated), ("partial", r.partial)) if on]
    if flags:
        lines.append("flags         " + ", ".join(flags))
    if r.top_blame:
        lines.append("top blame     " + _blame_line(r.top_blame[0]))
        lines += ["              " + _blame_line(b) for b in r.top_blame[1:]]
    else:
        lines.append("top blame     -")
    return "\n".join(lines)


def format_update(r: RequestAccounting) -> str:
    blame = r.top_blame[0] if r.top_blame else None
    who = "-" if blame is None else f"{blame.request_id or '(batch)'}@{blame.shard} {blame.seconds:.2f}s"
    return (
        f"{_clock(time.time())}  {r.state.name:<9} wall {r.wall:8.3f}  queue {r.queue_time:7.3f}  "
        f"engine {r.engine_time:8.3f}  interf {r.interference:8.3f}  decoded {r.tokens.decoded:>6}  "
        f"blame {who}"
    )


def format_event(ev: InterferenceEvent) -> str:
    victims = ",".join(str(k) for k in ev.victims.shards) or "-"
    if ev.phase == InterferencePhase.PREDICTED:
        return (
            f"{_clock(ev.start_time)}  {ev.phase.name:<8} storm {ev.aggressor_request_id}"
            + (f" (session {ev.aggressor_session_id})" if ev.aggressor_session_id else "")
            + f" admitted on {ev.engine_id} shard {ev.aggressor_shard}: "
            f"{ev.prefill_tokens} tokens to prefill; {ev.victims.request_count} requests on shards "
            f"{victims} would lose ~{ev.victims.seconds:.3f} s in total (cost model)"
        )
    return (
        f"{_clock(ev.end_time or ev.start_time)}  {ev.phase.name:<8} storm {ev.aggressor_request_id}"
        + (f" (session {ev.aggressor_session_id})" if ev.aggressor_session_id else "")
        + f" on {ev.engine_id} shard {ev.aggressor_shard}: {ev.prefill_tokens} tokens in {ev.chunks} chunks; "
        f"{ev.victims.request_count} victims on shards {victims} lost {ev.victims.seconds:.3f} s in total"
        + (" (cross-shard)" if ev.cross_shard else "")
    )


def format_table(rows: list[RequestAccounting]) -> str:
    out = [
        f"{'REQUEST':<30} {'STATE':<9} {'ENGINE':<14} {'SHARD':>5} {'WALL':>8} {'QUEUE':>7} {'ENGINE_T':>8} "
        f"{'INTERF':>8} {'DECODED':>7}  TOP BLAME"
    ]
    for r in rows:
        b = r.top_blame[0] if r.top_blame else None
        blame = "-" if b is None else f"{b.request_id or '(batch)'}@{b.shard} {b.seconds:.2f}s"
        out.append(
            f"{r.request_id[:30]:<30} {r.state.name:<9} {r.engine_id[:14]:<14} {r.shard:>5} "
            f"{r.wall:>8.2f} {r.queue_time:>7.2f} {r.engine_time:>8.2f} {r.interference:>8.2f} "
            f"{r.tokens.decoded:>7}  {blame}"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------- commands


def _client(args):
    """A client for --sidecar; the API token comes from $ENGINETIME_API_TOKEN (the client's default),
    TLS from $ENGINETIME_API_CA (the CA bundle that signed the sidecar's --tls-cert)."""
    import os

    import grpc

    from .sync_client import AccountingClient

    credentials = None
    ca = os.environ.get("ENGINETIME_API_CA", "")
    if ca:
        with open(ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(f.read())
    return AccountingClient(args.sidecar, timeout=args.timeout, credentials=credentials)


def _fleet_targets(args) -> list[str]:
    """--sidecar as addresses: ``A,B,C`` and ``dns:///name:port`` (every address behind the name)."""
    from . import _fleet

    addrs, errors = _fleet.expand(_fleet.split_targets(args.sidecar))
    for err in errors:
        print(f"enginetime: cannot resolve {err}", file=sys.stderr)
    if not addrs:
        raise SidecarUnavailable(args.sidecar, "no address to reach")
    return addrs


def _fleet_clients(args) -> list:
    """One client per sidecar of --sidecar (one with a plain address)."""
    clients = []
    for target in _fleet_targets(args):
        one = argparse.Namespace(**vars(args))
        one.sidecar = target
        clients.append(_client(one))
    return clients


def _each(clients: list, call: Callable):
    """``call(client)`` on every sidecar; a sidecar that does not answer is reported and skipped.

    With one sidecar its error is raised as before; with several, only when none answered.
    """
    results = []
    down: list[SidecarUnavailable] = []
    for client in clients:
        try:
            results.append(call(client))
        except SidecarUnavailable as exc:
            if len(clients) == 1:
                raise
            down.append(exc)
            print(f"enginetime: skipping the sidecar at {client.target}: it did not answer", file=sys.stderr)
    if down and not results:
        raise down[0]
    return results


def cmd_get(args) -> int:
    clients = _fleet_clients(args)
    try:
        r = None
        for client in clients:
            try:
                found = _each([client], lambda c: c.get_request(args.request_id))
            except (RequestNotFound, SidecarUnavailable):
                if len(clients) == 1:
                    raise
                continue
            r = found[0]
            break
        if r is None:
            raise RequestNotFound(
                args.request_id, f"none of the sidecars {','.join(c.target for c in clients)}"
            )
    finally:
        for c in clients:
            c.close()
    print(_dump(r) if args.json else format_request(r))
    return 0


def cmd_watch(args) -> int:
    with _client(args) as client:
        stream = client.watch_request(args.request_id, min_interval=args.interval)
        for r in stream:
            print(_dump(r) if args.json else format_update(r), flush=True)
        return 0


def cmd_events(args) -> int:
    targets = _fleet_targets(args)
    if len(targets) > 1:
        return _fleet_events(args, targets)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    seen = 0
    with _client(args) as client:
        stream = client.stream_interference(
            engine_id=args.engine_id, shard=args.shard, min_stall=args.min_stall, timeout=args.duration
        )
        try:
            for ev in stream:
                print(_dump(ev) if args.json else format_event(ev), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except EnginetimeError as exc:
            if args.duration is not None and exc.code is not None and exc.code.name == "DEADLINE_EXCEEDED":
                return 0  # --duration elapsed: a normal end
            raise
    return 0


def _fleet_events(args, targets: list[str]) -> int:
    """``events`` over several sidecars: one stream per sidecar, printed as they come."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    clients = []
    for target in targets:
        one = argparse.Namespace(**vars(args))
        one.sidecar = target
        clients.append(_client(one))

    def follow(client) -> None:
        try:
            for ev in client.stream_interference(
                engine_id=args.engine_id, shard=args.shard, min_stall=args.min_stall, timeout=args.duration
            ):
                q.put(ev)
        except EnginetimeError as exc:
            if not (exc.code is not None and exc.code.name == "DEADLINE_EXCEEDED"):
                print(f"enginetime events: the sidecar at {client.target}: {exc}", file=sys.stderr)
        q.put(None)

    threads = [threading.Thread(target=follow, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    deadline = None if args.duration is None else time.monotonic() + args.duration
    seen = ended = 0
    try:
        while ended < len(clients):
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ev = q.get(timeout=wait)
            except queue.Empty:
                break
            if ev is None:
                ended += 1
                continue
            print(_dump(ev) if args.json else format_event(ev), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    finally:
        for c in clients:
            c.close()
    return 0


def cmd_requests(args) -> int:
    rows: list[RequestAccounting] = []
    clients = _fleet_clients(args)
    try:

        def listed(client) -> list[RequestAccounting]:
            got: list[RequestAccounting] = []
            for r in client.iter_requests(
                states=args.state or (),
                shard=args.shard,
                session_id=args.session or "",
                engine_id=args.engine_id,
                page_size=min(max(args.limit, 1), 1000),
            ):
                got.append(r)
                if len(got) >= args.limit:
                    break
            return got

        for got in _each(clients, listed):
            rows.extend(got)
        rows = rows[: args.limit]
    finally:
        for c in clients:
            c.close()
    if args.json:
        print(json.dumps([to_jsonable(r) for r in rows]))
    else:
        print(format_table(rows))
    return 0


def cmd_top(args) -> int:
    from . import top

    clients = _fleet_clients(args)
    client = clients[0]
    try:
        # fail fast, before taking over the terminal
        _each(clients, lambda c: c.get_shards(args.engine_id))
        feed: top.Feed | top.FleetFeed = (
            top.Feed(client, args.engine_id)
            if len(clients) == 1
            else top.FleetFeed([top.Feed(c, args.engine_id) for c in clients])
        )
        if args.once or args.json or not sys.stdout.isatty():
            if args.json:
                snap = feed.snapshot()
                print(
                    json.dumps(
                        {
                            "target": snap.target,
                            "time": snap.time,
                            "shards": to_jsonable(snap.shards),
                            "running": to_jsonable(snap.running),
                        }
                    )
                )
            else:
                top.print_once(feed, shutil.get_terminal_size((160, 40)).columns, sys.stdout)
            return 0
        feed.start()
        try:
            top.run_curses(feed, args.interval)
        finally:
            feed.close()
        return 0
    finally:
        for c in clients:
            c.close()


# ---------------------------------------------------------------------------- wiring


def _guarded(name: str, fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn client errors into one clear line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except SidecarUnavailable as exc:
            detail = f" ({exc.details})" if exc.details else ""
            print(
                f"enginetime {name}: no enginetime sidecar answered at {args.sidecar}{detail}.\n"
                f"  Check that `enginetime sidecar` is running there (its ready line prints grpc=HOST:PORT), "
                f"and pass that address with --sidecar HOST:PORT or ${SIDECAR_ENV}.",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        except RequestNotFound as exc:
            print(f"enginetime {name}: {exc}", file=sys.stderr)
            return EXIT_NOT_FOUND
        except (EnginetimeError, ValueError) as exc:
            print(f"enginetime {name}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # `enginetime events | head`
            return 0

    return run


def _positive(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be > 0")
    return x


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sidecar")
    g.add_argument(
        "--sidecar",
        metavar="HOST:PORT",
        default=os.environ.get(SIDECAR_ENV) or DEFAULT_TARGET,
        help="the sidecar's gRPC address; several, comma-separated (A,B,C), or dns:///NAME:PORT (every "
        f"address behind the name) cover a fleet. Default: ${SIDECAR_ENV} if set, else {DEFAULT_TARGET}",
    )
    g.add_argument("--timeout", type=_positive, default=5.0, help="seconds per call (default 5)")
    return p


#: What each command's --json prints. Field names are those of enginetime.clients.types;
#: durations as float seconds plus exact integer *_ns twins, times as epoch seconds (+ *_ns),
#: enums as lower-case names, absent values as null.
_REQUEST_FIELDS = (
    "a RequestAccounting object: request_id, session_id, engine_id, shard, state, arrival(_ns), "
    "queue_time(_ns), engine_time(_ns), gpu_time(_ns), interference(_ns), wall(_ns), other(_ns), "
    "tokens {prompt, cached, prefilled, decoded}, steps, excluded_steps, preemptions, "
    "top_blame [{request_id, engine_id, shard, seconds(_ns), same_shard, arrival_time(_ns)}], partial, "
    "last_step_time(_ns), "
    "migrated, finish_time(_ns), finish_reason, routed_shard, traceparent"
)
JSON_HELP = {
    "get": f"print one JSON object: {_REQUEST_FIELDS}. Seconds are floats, *_ns exact integers",
    "watch": "print one JSON object per line (JSON Lines) per update, each the same RequestAccounting "
    "object as `get --json`",
    "requests": "print one JSON array of RequestAccounting objects (as `get --json`), newest arrival first",
    "events": "print one JSON object per line (JSON Lines) per event: phase (predicted|started|ongoing|"
    "ended; predicted: a warning at admission, its figures the cost model's), engine_id, "
    "aggressor_request_id, aggressor_shard, aggressor_session_id, prefill_tokens, chunks, "
    "victims {shards, request_count, seconds(_ns): the victims' lost time summed}, start_time(_ns), "
    "end_time(_ns) (null until ended), cross_shard",
    "top": "print one JSON object and exit: target, time (epoch s), shards [ShardStatus: engine_id, shard, "
    "coupling, decode_tokens_per_second, prefill_tokens_per_second, busy_fraction, active_requests, "
    "queued_requests, current_storm {request_id, shard, prefill_tokens, prompt_tokens, chunks, "
    "start_time(_ns), stall(_ns): summed over victims} or null, last_step_time(_ns), steps, connected, "
    "dropped_frames, engine_kind, device_name, timer_source, unattributed(_ns), imbalance(_ns), slowdown, "
    "num_shards, shards_seen, partial_view], "
    "running [RequestAccounting as `get --json`]",
}


def _json_flag(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--json", action="store_true", help=JSON_HELP[command])


def _state(value: str) -> RequestState:
    try:
        return RequestState.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    common = _common()

    top = subparsers.add_parser(
        "top",
        parents=[common],
        help="live per-shard table: throughput, load, storms and who they stall",
        description="Per shard: decode/prefill tok/s, busy, active/queued requests, last step; the storm "
        "running now with its request, prefill progress and the stall it causes; recent storms; the running "
        "requests losing most to interference. Refreshes in place; q quits. Prints one frame when "
        "stdout is not a terminal or with --once.",
    )
    top.add_argument("--interval", type=_positive, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--engine-id", default="", help="only this engine's shards")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    _json_flag(top, "top")
    top.set_defaults(func=_guarded("top", cmd_top))

    get = subparsers.add_parser(
        "get",
        parents=[common],
        help="one request's accounting",
        description="Wall = queue + engine_time + interference + other, GPU time, tokens, steps and the "
        "requests that cost it time (top blame).",
    )
    get.add_argument(
        "request_id", metavar="RID", help="the id the engine knows (SGLang rid, vLLM request id)"
    )
    _json_flag(get, "get")
    get.set_defaults(func=_guarded("get", cmd_get))

    watch = subparsers.add_parser(
        "watch",
        parents=[common],
        help="a request's accounting as it changes, until it finishes",
        description="One line (--json: one JSON object) per update; ends when the request finishes or "
        "is aborted.",
    )
    watch.add_argument("request_id", metavar="RID")
    watch.add_argument("--interval", type=_positive, default=0.5, help="at most one update per this many s")
    _json_flag(watch, "watch")
    watch.set_defaults(func=_guarded("watch", cmd_watch))

    events = subparsers.add_parser(
        "events",
        parents=[common],
        help="the interference stream: storms as they start, grow and end",
        description="One line (--json: one JSON object) per interference event: the aggressor request and "
        "shard, its prefill, the victims' shards, count and summed stall. Runs until Ctrl-C, --count or "
        "--duration.",
    )
    events.add_argument("--engine-id", default="", help="only this engine's storms (default: every engine)")
    events.add_argument("--shard", type=int, default=None, help="storms on, or stalling, this shard")
    events.add_argument(
        "--min-stall",
        type=float,
        default=None,
        help="only storms whose victims lost at least this many seconds "
        "(default: the sidecar's storm threshold)",
    )
    events.add_argument("--count", type=int, default=None, help="exit after this many events")
    events.add_argument("--duration", type=_positive, default=None, help="exit after this many seconds")
    _json_flag(events, "events")
    events.set_defaults(func=_guarded("events", cmd_events))

    reqs = subparsers.add_parser(
        "requests",
        parents=[common],
        help="list requests with filters",
        description="Requests the sidecar holds (live ones and those finished within its retention), "
        "newest arrival first.",
    )
    reqs.add_argument(
        "--state",
        type=_state,
        action="append",
        help="queued, running, preempted, finished or aborted (repeatable)",
    )
    reqs.add_argument("--shard", type=int, default=None, help="only requests on this shard")
    reqs.add_argument("--session", default=None, help="only this session id")
    reqs.add_argument("--engine-id", default="", help="only this engine's requests (default: every engine)")
    reqs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _json_flag(reqs, "requests")
    reqs.set_defaults(func=_guarded("requests", cmd_requests))
