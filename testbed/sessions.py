"""TITO session driver: multi-turn token-in/token-out sessions over SGLang's ``/generate``.

Every turn sends the session's whole token history (previous prompts and outputs)
plus the new tokens, as an RL rollout's session server does. Where the turn runs
is the routing policy's choice:

* ``sticky`` — every turn goes to the shard that served the session's previous
  turn, which holds its prefix in cache: the turn prefills only its new tokens.
* ``round-robin`` — turn t of session s goes to shard (s + t) mod N: turns migrate,
  and a migrated turn prefills its whole history from scratch (the incident).
* ``advised`` — each turn goes where the sidecar's ``Advise`` says (``advisor``: a
  callable of session id, prompt length and the previous turn's request id returning a
  shard, e.g. ``advisor_for(client, engine_id)``): the shard it estimates holds the
  session's prefix. The previous turn's id makes the sidecar answer only once it has seen
  that turn end (the hooks report a few ms behind the engine's response).

Works against the testbed or a real SGLang server (``routed_dp_rank`` pins the shard).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

ROUTINGS = ("round-robin", "sticky", "advised")

#: (session id, prompt tokens, previous turn's request id or "") -> shard: where ``advised``
#: routing sends a turn.
Advisor = Callable[[str, int, str], int]


def advisor_for(client, engine_id: str) -> Advisor:
    """An ``Advisor`` asking a sidecar (an ``AccountingClient``) about ``engine_id``."""

    def advise(session_id: str, prompt_tokens: int, after_request_id: str = "") -> int:
        return client.advise(
            engine_id=engine_id,
            session_id=session_id,
            prompt_tokens=prompt_tokens,
            after_request_id=after_request_id,
        ).recommended_shard

    return advise


@dataclass(frozen=True)
class TurnResult:
    session_id: str
    turn: int
    rid: str
    shard: int  # where it ran (meta_info.dp_rank; the requested shard when the server omits it)
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    output_ids: list[int]
    finish_reason: str
    wall_s: float

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Session:
    session_id: str
    index: int  # position among the driver's sessions: round-robin offset
    history: list[int] = field(default_factory=list)  # tokens sent and received so far
    pending: list[int] = field(default_factory=list)  # tokens the next turn adds (the first prompt)
    turns: list[TurnResult] = field(default_factory=list)

    @property
    def last_shard(self) -> int | None:
        return self.turns[-1].shard if self.turns else None

    @property
    def last_rid(self) -> str:
        """The previous turn's request id ("" before the first): Advise's ``after_request_id``."""
        return self.turns[-1].rid if self.turns else ""


class SessionDriver:
    """Drives TITO sessions against one server. Thread-safe: sessions may run concurrently."""

    def __init__(
        self,
        base_url: str,
        *,
        num_shards: int | None = None,
        routing: str = "round-robin",
        timeout_s: float = 600.0,
        seed: int = 0,
        vocab_size: int | None = None,
        client: httpx.Client | None = None,
        advisor: Advisor | None = None,
    ) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}: use one of {', '.join(ROUTINGS)}")
        if routing == "advised" and advisor is None:
            raise ValueError(
                "routing='advised' needs advisor= (e.g. advisor_for(AccountingClient(...), engine_id))"
            )
        self.advisor = advisor
        self.base_url = base_url.rstrip("/")
        self.routing = routing
        self._own_client = client is None
        self.client = client or httpx.Client(base_url=self.base_url, timeout=timeout_s)
        info: dict | None = None
        if num_shards is None or vocab_size is None:
            info = self._server_info()
        self.num_shards = num_shards or int((info or {}).get("dp_size", 1))
        model = (info or {}).get("model") or {}
        self.vocab_size = vocab_size or int(model.get("vocab_size", 32000))
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._count = 0

    def _server_info(self) -> dict:
        try:
            resp = self.client.get("/get_server_info")
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError):
            return {}

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    def __enter__(self) -> SessionDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def random_tokens(self, n: int) -> list[int]:
        with self._lock:
            return [self._rng.randrange(self.vocab_size) for _ in range(n)]

    def new_session(self, prompt: list[int] | int, session_id: str | None = None) -> Session:
        """A session whose first turn will send ``prompt`` (ids, or that many random ids)."""
        with self._lock:
            index = self._count
            self._count += 1
        sid = session_id or f"session-{index}"
        first = self.random_tokens(prompt) if isinstance(prompt, int) else list(prompt)
        return Session(sid, index, pending=first)

    def route(self, session: Session, prompt_tokens: int = 0) -> int:
        turn = len(session.turns)
        if self.routing == "advised" and self.advisor is not None and prompt_tokens > 0:
            return self.advisor(session.session_id, prompt_tokens, session.last_rid)
        if self.routing == "sticky" and session.last_shard is not None:
            return session.last_shard
        return (session.index + turn) % self.num_shards

    def run_turn(
        self,
        session: Session,
        new_tokens: list[int] | int = 0,
        *,
        max_new_tokens: int = 16,
        shard: int | None = None,
        rid: str | None = None,
    ) -> TurnResult:
        """Send history + new tokens; the output is appended to the history. ``shard`` overrides routing."""
        new = self.random_tokens(new_tokens) if isinstance(new_tokens, int) else list(new_tokens)
        ids = session.history + session.pending + new
        turn = len(session.turns)
        target = self.route(session, len(ids)) if shard is None else shard
        rid = rid or f"{session.session_id}-turn-{turn}"
        body = {
            "rid": rid,
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": max_new_tokens},
            "routed_dp_rank": target,
            "session_id": session.session_id,
        }
        t0 = time.perf_counter()
        resp = self.client.post("/generate", json=body)
        wall = time.perf_counter() - t0
        if resp.status_code != 200:
            raise RuntimeError(f"turn {turn} of {session.session_id}: HTTP {resp.status_code}: {resp.text}")
        out = resp.json()
        meta = out.get("meta_info", {})
        result = TurnResult(
            session_id=session.session_id,
            turn=turn,
            rid=meta.get("id", rid),
            shard=int(meta.get("dp_rank", target)),
            prompt_tokens=int(meta.get("prompt_tokens", len(ids))),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", len(out.get("output_ids", [])))),
            output_ids=list(out.get("output_ids", [])),
            finish_reason=str((meta.get("finish_reason") or {}).get("type", "")),
            wall_s=wall,
        )
        session.history = ids + result.output_ids
        session.pending = []
        session.turns.append(result)
        return result

    def run(
        self,
        sessions: int,
        turns: int,
        *,
        prompt_tokens: int = 512,
        turn_tokens: int = 64,
        max_new_tokens: int = 16,
    ) -> list[Session]:
        """Run ``sessions`` sessions of ``turns`` turns concurrently (one thread per session)."""
        out = [self.new_session(prompt_tokens) for _ in range(sessions)]
        errors: list[BaseException] = []

        def drive(s: Session) -> None:
            try:
                for t in range(turns):
                    self.run_turn(s, 0 if t == 0 else turn_tokens, max_new_tokens=max_new_tokens)
            except BaseException as exc:  # reported after join
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(s,), daemon=True) for s in out]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out
