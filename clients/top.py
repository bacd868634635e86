"""``enginetime top``: a live per-shard table of one sidecar, refreshed in place.

What an operator watching an incident needs on one screen: each shard's decode and
prefill throughput, how busy it is, its active/queued requests and how fresh its last
step is; the storm running on a shard now (its request, prefill progress and the
seconds of stall it has cost the others); the storms of the last minutes (from
``StreamInterference``); and the running requests losing most time to interference.

The frame is built by ``render`` (pure: data in, lines out) so ``--once``, scripts and
tests see exactly what the terminal shows. The live view uses curses: it redraws every
``interval`` seconds, ``q`` (or Ctrl-C) quits, and a sidecar that goes away is shown on
the screen and retried rather than ending the view.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import EnginetimeError
from .sync_client import AccountingClient, Stream
from .types import InterferenceEvent, InterferencePhase, RequestAccounting, RequestState, ShardStatus

#: Storm events kept for the "recent storms" panel.
RECENT_EVENTS = 8
#: Running requests shown in the "most interference" panel.
TOP_REQUESTS = 6


@dataclass
class Snapshot:
    """Everything one frame shows."""

    target: str
    time: float
    shards: list[ShardStatus] = field(default_factory=list)
    running: list[RequestAccounting] = field(default_factory=list)
    events: list[InterferenceEvent] = field(default_factory=list)
    error: str = ""


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    d = max(0.0, now - t)
    if d < 1:
        return f"{d * 1000:.0f} ms ago"
    if d < 120:
        return f"{d:.1f} s ago"
    return f"{d / 60:.0f} min ago"


def _clock(t: float | None) -> str:
    return "-" if t is None else time.strftime("%H:%M:%S", time.localtime(t))


def _blame(r: RequestAccounting) -> str:
    if not r.top_blame:
        return "-"
    b = r.top_blame[0]
    who = b.request_id or "(batch)"
    return f"{who} @{b.shard} {b.seconds:.1f}s{'' if b.same_shard else ' x-shard'}"


@dataclass(frozen=True)
class Column:
    """One table column: shown when the terminal has room for it, most important first."""

    header: str
    width: int
    priority: int  # 0 is always shown; larger numbers go first when the terminal is narrow
    cell: Callable[[Any], str]
    left: bool = False
    flex: bool = False  # the last column: takes what is left of the line (at least ``width``)


def _fit(columns: list[Column], width: int) -> list[Column]:
    """The columns that fit ``width``, in their order, adding them by priority."""
    chosen: set[int] = set()
    used = 0
    for i in sorted(range(len(columns)), key=lambda i: columns[i].priority):
        need = columns[i].width + (1 if chosen else 0)
        if columns[i].priority == 0 or used + need <= width:
            chosen.add(i)
            used += need
    return [c for i, c in enumerate(columns) if i in chosen]


def _table(columns: list[Column], rows: Sequence[Any], width: int, indent: str = "") -> list[str]:
    # The flex column asks for room for its longest cell, so lesser columns do not squeeze it.
    columns = [
        dataclasses.replace(c, width=max([c.width] + [len(c.cell(r)) for r in rows])) if c.flex else c
        for c in columns
    ]
    cols = _fit(columns, width - len(indent))
    fixed = sum(c.width + 1 for c in cols if not c.flex)

    def line(cells: list[str]) -> str:
        out = []
        for c, text in zip(cols, cells, strict=True):
            w = max(1, width - len(indent) - fixed) if c.flex else c.width
            text = text[:w]
            out.append(text.ljust(w) if c.left or c.flex else text.rjust(w))
        return (indent + " ".join(out)).rstrip()

    return [line([c.header for c in cols])] + [line([c.cell(r) for c in cols]) for r in rows]


def _wrap(text: str, width: int, indent: str = "    ") -> list[str]:
    """``text`` broken at spaces into lines of ``width``; continuation lines indented."""
    lines: list[str] = []
    rest = text
    while len(rest) > width:
        cut = rest.rfind(" ", len(indent) + 1, width + 1)
        if cut <= len(indent):
            cut = width
        lines.append(rest[:cut].rstrip())
        rest = indent + rest[cut:].lstrip()
    lines.append(rest)
    return lines


def _shard_columns(shards: Sequence[ShardStatus], now: float) -> list[Column]:
    ew = min(16, max([6] + [len(s.engine_id) for s in shards]))

    def link(s: ShardStatus) -> str:
        dropped = f" ({s.dropped_frames} dropped)" if s.dropped_frames else ""
        return ("up" if s.connected else "DOWN") + dropped

    return [
        Column("ENGINE", ew, 0, lambda s: s.engine_id, left=True),
        Column("SHARD", 5, 0, lambda s: str(s.shard)),
        Column("COUPLING", 11, 7, lambda s: s.coupling.name.lower(), left=True),
        Column("DECODE tok/s", 12, 1, lambda s: f"{s.decode_tokens_per_second:.1f}"),
        Column("PREFILL tok/s", 13, 1, lambda s: f"{s.prefill_tokens_per_second:.1f}"),
        Column("BUSY", 5, 2, lambda s: f"{100 * s.busy_fraction:.0f}%"),
        Column("ACTIVE", 6, 2, lambda s: str(s.active_requests)),
        Column("QUEUED", 6, 3, lambda s: str(s.queued_requests)),
        Column("STEPS", 8, 6, lambda s: str(s.steps)),
        Column("LAST STEP", 12, 5, lambda s: _ago(s.last_step_time, now), left=True),
        Column("KIND", 10, 8, lambda s: s.engine_kind, left=True),
        Column("DEVICE", 14, 9, lambda s: s.device_name, left=True),
        Column("LINK", 4, 4, link, flex=True),
    ]


def _request_columns(rows: Sequence[RequestAccounting]) -> list[Column]:
    rw = min(28, max([8] + [len(r.request_id) for r in rows]))
    ew = min(16, max([9] + [len(r.engine_id) for r in rows]))
    return [
        Column("REQUEST", rw, 0, lambda r: r.request_id, left=True),
        Column("ENGINE ID", ew, 8, lambda r: r.engine_id, left=True),
        Column("SHARD", 5, 0, lambda r: str(r.shard)),
        Column("WALL", 6, 1, lambda r: f"{r.wall:.2f}"),
        Column("QUEUE", 6, 4, lambda r: f"{r.queue_time:.2f}"),
        Column("ENGINE", 6, 1, lambda r: f"{r.engine_time:.2f}"),
        Column("INTERF", 6, 1, lambda r: f"{r.interference:.2f}"),
        Column("OTHER", 6, 6, lambda r: f"{r.other:.2f}"),
        Column("GPU", 6, 7, lambda r: f"{r.gpu_time:.2f}"),
        Column("DECODED", 7, 5, lambda r: str(r.tokens.decoded)),
        Column("TOP BLAME (request @shard seconds)", 34, 1, _blame, flex=True),
    ]


def _partial_lines(shards: Sequence[ShardStatus], width: int) -> list[str]:
    """A note per engine of which the sidecar(s) shown see only some shards (one sidecar per node)."""
    seen: dict[str, set[int]] = {}
    announced: dict[str, int] = {}
    for s in shards:
        seen.setdefault(s.engine_id, set()).add(s.shard)
        announced[s.engine_id] = max(announced.get(s.engine_id, 0), s.num_shards)
    lines = []
    for eng, got in seen.items():
        if len(got) < announced[eng]:
            lines += _wrap(
                f"  engine {eng}: partial view, {len(got)} of its {announced[eng]} shards report here; "
                "the others report to another sidecar (one per node: follow them all with --sidecar A,B) "
                "or have not joined",
                width,
            )
    return lines


def _storm_key(engine_id: str, request_id: str, shard: int) -> tuple[str, str, int]:
    return (engine_id, request_id, shard)


def render(snap: Snapshot, width: int = 120, height: int | None = None) -> list[str]:
    """The frame as lines (no colour, no cursor control), each at most ``width`` long.

    Tables drop their least important columns to fit ``width``; with ``height`` the
    panels below the shard table show as many rows as fit (their titles say how many
    there are). Storms come from one view per frame: a storm running now (GetShards)
    is shown under STORMS NOW only, with its live figures; RECENT STORMS lists the
    others, each at its latest StreamInterference event.
    """
    now = snap.time
    head = [f"enginetime top  sidecar {snap.target}  {_clock(now)}  (q quits)"]
    if snap.error:
        head += _wrap(f"!! {snap.error}", width)
    head.append("")
    shards = sorted(snap.shards, key=lambda s: (s.engine_id, s.shard))
    head += _table(_shard_columns(shards, now), shards, width)
    if not shards:
        head += _wrap("  (no engine has reported to this sidecar yet: point ENGINETIME_INGEST at it)", width)
    head += _partial_lines(shards, width)

    latest: dict[tuple[str, str, int], InterferenceEvent] = {}
    for ev in snap.events:  # one entry per storm: its latest event (STARTED -> ONGOING -> ENDED)
        key = _storm_key(ev.engine_id, ev.aggressor_request_id, ev.aggressor_shard)
        latest.pop(key, None)
        latest[key] = ev
    running = [s for s in shards if s.current_storm is not None]
    now_keys = set()
    storm_lines: list[str] = []
    for s in running:
        st = s.current_storm
        assert st is not None
        key = _storm_key(s.engine_id, st.request_id, st.shard)
        now_keys.add(key)
        total = st.prompt_tokens or st.prefill_tokens
        pct = f" ({100 * st.prefill_tokens / total:.0f}%)" if total else ""
        last = latest.get(key)
        shards_hit = ",".join(str(k) for k in last.victims.shards) if last else ""
        on = f" on shards {shards_hit}" if shards_hit else ""
        storm_lines += _wrap(
            f"  {s.engine_id} shard {st.shard}: {st.request_id}  prefill {st.prefill_tokens}/{total} tokens"
            f"{pct} in {st.chunks} chunks, running {now - st.start_time:.1f} s; "
            f"requests{on} lost {st.stall:.1f} s in total",
            width,
        )
    past = [ev for key, ev in latest.items() if key not in now_keys][::-1]
    recent_rows: list[str] = []
    for ev in past[:RECENT_EVENTS]:
        victims = ",".join(str(k) for k in ev.victims.shards) or "-"
        if ev.phase == InterferencePhase.PREDICTED:  # a warning no storm followed (yet)
            recent_rows += _wrap(
                f"  {_clock(ev.start_time)} PREDICTED {ev.aggressor_request_id} (shard {ev.aggressor_shard}, "
                f"{ev.prefill_tokens} tokens to prefill): {ev.victims.request_count} requests on shards "
                f"{victims} would lose ~{ev.victims.seconds:.1f} s in total",
                width,
            )
            continue
        recent_rows.append(
            "\n".join(
                _wrap(
                    f"  {_clock(ev.end_time or ev.start_time)} {ev.phase.name:<7} {ev.aggressor_request_id} "
                    f"(shard {ev.aggressor_shard}, {ev.prefill_tokens} tokens, {ev.chunks} chunks): "
                    f"{ev.victims.request_count} requests on shards {victims} lost "
                    f"{ev.victims.seconds:.1f} s in total{' (cross-shard)' if ev.cross_shard else ''}",
                    width,
                )
            )
        )
    worst = sorted(snap.running, key=lambda r: r.interference_ns, reverse=True)[:TOP_REQUESTS]
    req_table = _table(_request_columns(worst), worst, width, indent="  ")

    lines = head + ["", f"STORMS NOW ({len(running)})"] + (storm_lines or ["  none"])
    n_recent, n_req = len(recent_rows), len(worst)
    if height is not None:
        # What is left below goes to the two panels (each: a blank line, a title, its rows),
        # one row to each in turn, so both stay visible on a small terminal.
        room = height - len(lines) - 4
        used = (0 if recent_rows else 1) + 1  # "none" line; the requests' header or "none running"
        cost = [r.count("\n") + 1 for r in recent_rows]
        n_recent = n_req = 0
        progress = True
        while progress:
            progress = False
            if n_req < len(worst) and used + 1 <= room:
                n_req, used, progress = n_req + 1, used + 1, True
            if n_recent < len(recent_rows) and used + cost[n_recent] <= room:
                n_recent, used, progress = n_recent + 1, used + cost[n_recent], True
    shown = "" if n_recent == len(past[:RECENT_EVENTS]) else f", {n_recent} shown"
    lines += ["", f"RECENT STORMS ({len(past)}{shown}; StreamInterference)"]
    if not recent_rows:
        lines.append("  none besides the ones running now" if running else "  none seen since top started")
    for row in recent_rows[:n_recent]:
        lines += row.split("\n")
    shown = f"seconds; top {n_req} of {len(snap.running)}" if snap.running else "0"
    lines += ["", f"RUNNING REQUESTS LOSING MOST TO INTERFERENCE ({shown})"]
    if not worst:
        lines.append("  none running")
    else:
        lines += req_table[: 1 + n_req]
    if height is not None:
        lines = lines[:height]
    return [ln[:width] for ln in lines]


class Feed:
    """Fetches snapshots; follows StreamInterference in a thread so storms are not missed."""

    def __init__(self, client: AccountingClient, engine_id: str = "") -> None:
        self.client = client
        self.engine_id = engine_id
        self.events: collections.deque[InterferenceEvent] = collections.deque(maxlen=64)
        self._stop = threading.Event()
        self._stream: Stream[InterferenceEvent] | None = None
        self._thread = threading.Thread(target=self._follow, name="enginetime-top-events", daemon=True)

    def start(self) -> Feed:
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._stream = self.client.stream_interference(engine_id=self.engine_id)
                for ev in self._stream:
                    self.events.append(ev)
            except EnginetimeError:
                pass
            self._stop.wait(1.0)

    def snapshot(self) -> Snapshot:
        snap = Snapshot(self.client.target, time.time(), events=list(self.events))
        try:
            snap.shards = self.client.get_shards(self.engine_id)
            page = self.client.list_requests(
                states=(RequestState.RUNNING,), engine_id=self.engine_id, page_size=200
            )
            snap.running = list(page.requests)
        except EnginetimeError as exc:
            snap.error = f"sidecar not answering, retrying: {exc}"
        return snap

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.close()


class FleetFeed:
    """Several sidecars' feeds as one: shards and running requests of every engine, one row each."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.feeds = list(feeds)

    def start(self) -> FleetFeed:
        for f in self.feeds:
            f.start()
        return self

    def snapshot(self) -> Snapshot:
        snaps = [f.snapshot() for f in self.feeds]
        merged = Snapshot(",".join(s.target for s in snaps), time.time())
        for s in snaps:
            merged.shards += s.shards
            merged.running += s.running
            merged.events += s.events
        merged.events.sort(key=lambda ev: ev.start_time_ns)
        merged.error = "; ".join(f"{s.target}: {s.error}" for s in snaps if s.error)
        return merged

    def close(self) -> None:
        for f in self.feeds:
            f.close()


def run_curses(feed: Feed | FleetFeed, interval: float) -> None:
    """The live view: redraw every ``interval`` s until q / Q / Ctrl-C."""
    import curses

    def loop(screen) -> None:
        curses.curs_set(0)
        screen.timeout(int(interval * 1000))
        while True:
            snap = feed.snapshot()
            height, width = screen.getmaxyx()
            screen.erase()
            for y, line in enumerate(render(snap, width - 1, height - 1)):
                screen.addstr(y, 0, line, curses.A_BOLD if y == 0 or line.isupper() else curses.A_NORMAL)
            screen.refresh()
            deadline = time.monotonic() + interval
            while True:
                key = screen.getch()
                if key in (ord("q"), ord("Q")):
                    return
                if key == -1 or time.monotonic() >= deadline:
                    break  # timed out: refresh

    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass


def print_once(feed: Feed | FleetFeed, width: int, out) -> None:
    for line in render(feed.snapshot(), width):
        print(line, file=out)


__all__: Sequence[str] = ["Feed", "FleetFeed", "Snapshot", "render", "run_curses", "print_once"]
