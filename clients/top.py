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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import EnginetimeError
from .sync_client import AccountingClient, Stream
from .types import InterferenceEvent, RequestAccounting, RequestState, ShardStatus

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
    return f"{who} @ shard {b.shard} {b.seconds:.1f}s{'' if b.same_shard else ' x-shard'}"


def render(snap: Snapshot, width: int = 120) -> list[str]:
    """The frame as lines (no colour, no cursor control), each cut to ``width``."""
    now = snap.time
    lines = [
        f"enginetime top  sidecar {snap.target}  {_clock(now)}  (q quits)",
    ]
    if snap.error:
        lines.append(f"!! {snap.error}")
    lines.append("")
    hdr = (
        f"{'ENGINE':<16} {'SHARD':>5} {'COUPLING':<11} {'DECODE tok/s':>12} {'PREFILL tok/s':>13} "
        f"{'BUSY':>5} {'ACTIVE':>6} {'QUEUED':>6} {'STEPS':>8}  {'LAST STEP':<12} LINK"
    )
    lines.append(hdr)
    if not snap.shards:
        lines.append("  (no engine has reported to this sidecar yet: point ENGINETIME_INGEST at it)")
    for s in sorted(snap.shards, key=lambda s: (s.engine_id, s.shard)):
        link = "up" if s.connected else "DOWN"
        if s.dropped_frames:
            link += f" ({s.dropped_frames} dropped)"
        lines.append(
            f"{s.engine_id[:16]:<16} {s.shard:>5} {s.coupling.name.lower():<11} "
            f"{s.decode_tokens_per_second:>12.1f} {s.prefill_tokens_per_second:>13.1f} "
            f"{100 * s.busy_fraction:>4.0f}% {s.active_requests:>6} {s.queued_requests:>6} {s.steps:>8}  "
            f"{_ago(s.last_step_time, now):<12} {link}"
        )
    storms = [s for s in snap.shards if s.current_storm is not None]
    lines += ["", f"STORMS NOW ({len(storms)})"]
    if not storms:
        lines.append("  none")
    for s in storms:
        st = s.current_storm
        assert st is not None
        total = st.prompt_tokens or st.prefill_tokens
        pct = f" ({100 * st.prefill_tokens / total:.0f}%)" if total else ""
        lines.append(
            f"  {s.engine_id} shard {st.shard}: {st.request_id}  prefill {st.prefill_tokens}/{total} tokens"
            f"{pct} in {st.chunks} chunks  stalling others {st.stall:.1f} s  "
            f"running {now - st.start_time:.1f} s"
        )
    lines += ["", "RECENT STORMS (StreamInterference)"]
    if not snap.events:
        lines.append("  none seen since top started")
    latest: dict[tuple, InterferenceEvent] = {}
    for ev in snap.events:  # one line per storm: its latest event (STARTED -> ONGOING -> ENDED)
        latest[(ev.engine_id, ev.aggressor_request_id, ev.aggressor_shard, ev.start_time_ns)] = ev
    for ev in list(latest.values())[-RECENT_EVENTS:][::-1]:
        victims = ",".join(str(k) for k in ev.victims.shards) or "-"
        lines.append(
            f"  {_clock(ev.end_time or ev.start_time)} {ev.phase.name:<8} {ev.aggressor_request_id} "
            f"(shard {ev.aggressor_shard}, {ev.prefill_tokens} tokens, {ev.chunks} chunks) -> "
            f"{ev.victims.request_count} requests on shards {victims} lost {ev.victims.seconds:.1f} s"
            f"{' cross-shard' if ev.cross_shard else ''}"
        )
    worst = sorted(snap.running, key=lambda r: r.interference_ns, reverse=True)[:TOP_REQUESTS]
    lines += ["", "RUNNING REQUESTS LOSING MOST TO INTERFERENCE"]
    if not worst:
        lines.append("  none running")
    for r in worst:
        lines.append(
            f"  {r.request_id[:28]:<28} shard {r.shard:>2}  engine {r.engine_time:>7.2f}s  "
            f"interference {r.interference:>7.2f}s  wall {r.wall:>7.2f}s  blame {_blame(r)}"
        )
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


def run_curses(feed: Feed, interval: float) -> None:
    """The live view: redraw every ``interval`` s until q / Q / Ctrl-C."""
    import curses

    def loop(screen) -> None:
        curses.curs_set(0)
        screen.timeout(int(interval * 1000))
        while True:
            snap = feed.snapshot()
            height, width = screen.getmaxyx()
            screen.erase()
            for y, line in enumerate(render(snap, width - 1)[: height - 1]):
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


def print_once(feed: Feed, width: int, out) -> None:
    for line in render(feed.snapshot(), width):
        print(line, file=out)


__all__: Sequence[str] = ["Feed", "Snapshot", "render", "run_curses", "print_once"]
