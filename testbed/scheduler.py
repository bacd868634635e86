"""One shard's requests, prefix cache and batching policy (no threads here).

The shard thread in engine.py asks ``Scheduler.plan()`` for the next step's
batch, runs the forward, and hands the logits back to ``Scheduler.complete()``.
Keeping the policy free of threads and timing makes it testable on its own and
keeps the engine loop readable.

Policies (the two an SGLang user can pick between):

* ``prefill-first`` — SGLang's default: while any request still has prompt tokens
  to prefill, the step is a prefill step (up to ``chunk_size`` prompt tokens,
  the head request chunked) and running decodes wait for it. A long prompt is a
  run of consecutive prefill steps: a stall for every decode on the shard.
* ``mixed`` — stall-free batching (SGLang ``--enable-mixed-chunk``, Sarathi):
  every running decode takes one token of the step's ``chunk_size`` budget and
  prefill chunks fill the rest, so decodes advance every step.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from enginetime.engine_hooks import StepKind

from .model import ForwardItem, KVCache, TinyTransformer

POLICIES = ("prefill-first", "mixed")


class Status(enum.Enum):
    WAITING = "waiting"  # arrived, no step yet
    PREFILL = "prefill"  # admitted, prompt not fully prefilled
    DECODE = "decode"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class Request:
    """A generate request and its life on one shard."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int
    shard: int
    session_id: str = ""
    traceparent: str = ""
    routed_shard: int | None = None
    arrival_ns: int = field(default_factory=time.time_ns)
    arrival_perf: float = field(default_factory=time.perf_counter)
    # Set by the shard.
    status: Status = Status.WAITING
    handle: int = 0
    kv: KVCache | None = None
    cached_tokens: int = 0
    prefilled: int = 0  # prompt positions with KV (cached + computed)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    finish_message: str = ""
    first_step_perf: float | None = None
    last_step_perf: float | None = None
    finish_perf: float | None = None
    steps: int = 0
    max_gap_s: float = 0.0  # longest time between two consecutive steps that included it
    abort_requested: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def cache(self) -> KVCache:
        """The KV cache, which every admitted request (every one in a step) holds."""
        assert self.kv is not None, f"request {self.rid} has no KV cache: it was never admitted"
        return self.kv

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def note_step(self, end_perf: float) -> None:
        """Bookkeeping after a step that included this request (shard thread)."""
        if self.first_step_perf is None:
            self.first_step_perf = end_perf
        elif self.last_step_perf is not None:
            self.max_gap_s = max(self.max_gap_s, end_perf - self.last_step_perf)
        self.last_step_perf = end_perf
        self.steps += 1


@dataclass(slots=True)
class Entry:
    """One request's part of a step."""

    req: Request
    prefill_tokens: int
    decode_tokens: int
    context_tokens: int  # KV length before the step


@dataclass(slots=True)
class Plan:
    kind: StepKind
    entries: list[Entry]
    admitted: list[Request]  # requests this step admits (first step: SCHEDULED event)

    @property
    def num_tokens(self) -> int:
        return sum(e.prefill_tokens + e.decode_tokens for e in self.entries)


class PrefixCache:
    """Finished requests' KV, reusable by a later request whose input starts with the same tokens.

    Per shard, so a session's next turn reuses its history only on the shard that
    served the previous turn — the property that makes migrating turns expensive.
    Bounded by total cached tokens, least recently used first out.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max(0, int(max_tokens))
        self._entries: OrderedDict[int, tuple[torch.Tensor, KVCache]] = OrderedDict()
        self._next = 0
        self.tokens = 0
        self.hits = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
        m = min(a.numel(), b.numel())
        if m == 0:
            return 0
        eq = a[:m] == b[:m]
        if bool(eq.all()):
            return m
        return int(torch.argmin(eq.to(torch.uint8)))

    def take(self, input_ids: list[int], capacity: int) -> tuple[KVCache | None, int]:
        """KV for the longest cached prefix of input_ids, leaving ≥ 1 token to prefill.

        Returns (cache with room for ``capacity`` positions, n_cached) or (None, 0). A
        cache entry that is wholly a prefix of the input is handed over (the new turn
        extends it and is cached again when it finishes); a partial match is copied.
        """
        if not self._entries or len(input_ids) < 2:
            return None, 0
        ids = torch.tensor(input_ids, dtype=torch.long)
        best_key, best_n = None, 0
        for key, (tokens, _kv) in self._entries.items():
            n = self._common_prefix(tokens, ids)
            if n > best_n:
                best_key, best_n = key, n
        if best_key is None:
            return None, 0
        tokens, kv = self._entries[best_key]
        whole = best_n == tokens.numel()
        best_n = min(best_n, len(input_ids) - 1)
        if best_n <= 0:
            return None, 0
        if whole:
            del self._entries[best_key]
            self.tokens -= tokens.numel()
            kv.truncate(best_n)
            kv.reserve(capacity)
            out = kv
        else:
            self._entries.move_to_end(best_key)
            out = kv.copy_prefix(best_n, max(0, capacity - best_n))
        self.hits += 1
        self.hit_tokens += best_n
        return out, best_n

    def insert(self, tokens: list[int], kv: KVCache) -> None:
        n = min(len(tokens), kv.length)
        if n <= 0 or n > self.max_tokens:
            return
        t = torch.tensor(tokens[:n], dtype=torch.long)
        # Entries that are a prefix of the new one are redundant: drop them.
        for key in [
            k
            for k, (old, _) in self._entries.items()
            if old.numel() <= n and self._common_prefix(old, t) == old.numel()
        ]:
            self.tokens -= self._entries.pop(key)[0].numel()
        self._entries[self._next] = (t, kv)
        self._next += 1
        self.tokens += n
        while self.tokens > self.max_tokens and self._entries:
            _, (old, _) = self._entries.popitem(last=False)
            self.tokens -= old.numel()

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0


class Scheduler:
    """Waiting queue, running batch and batching policy of one shard."""

    def __init__(
        self,
        model: TinyTransformer,
        *,
        policy: str = "prefill-first",
        chunk_size: int = 512,
        max_running_requests: int = 1024,
        prefix_cache_tokens: int = 1 << 18,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        self.model = model
        self.policy = policy
        self.chunk_size = int(chunk_size)
        self.max_running = int(max_running_requests)
        self.waiting: deque[Request] = deque()  # FIFO; admitted-but-chunked requests stay at the head
        self.running: list[Request] = []  # decoding
        self.prefix_cache = PrefixCache(prefix_cache_tokens)

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------ planning

    def _admit(self, req: Request) -> None:
        """First step of a request: look up the prefix cache, allocate its KV."""
        capacity = req.prompt_tokens + req.max_new_tokens
        kv, cached = self.prefix_cache.take(req.input_ids, capacity)
        if kv is None:
            kv = self.model.new_cache(capacity)
        req.kv = kv
        req.cached_tokens = cached
        req.prefilled = cached
        req.status = Status.PREFILL

    def _prefill_entries(self, budget: int, plan: Plan) -> None:
        active = len(self.running) + sum(1 for r in self.waiting if r.status is Status.PREFILL)
        for req in self.waiting:
            if budget <= 0:
                break
            if req.status is Status.WAITING:
                if active >= self.max_running:
                    break
                self._admit(req)
                plan.admitted.append(req)
                active += 1
            n = min(req.prompt_tokens - req.prefilled, budget)
            plan.entries.append(Entry(req, n, 0, req.prefilled))
            budget -= n

    def plan(self) -> Plan:
        plan = Plan(StepKind.IDLE, [], [])
        if self.policy == "prefill-first":
            if self.waiting:
                self._prefill_entries(self.chunk_size, plan)
            if plan.entries:
                plan.kind = StepKind.PREFILL
                return plan
            for req in self.running:
                plan.entries.append(Entry(req, 0, 1, req.cache.length))
            if plan.entries:
                plan.kind = StepKind.DECODE
            return plan
        # mixed: decodes first, then prefill chunks in what is left of the budget
        for req in self.running:
            plan.entries.append(Entry(req, 0, 1, req.cache.length))
        n_dec = len(plan.entries)
        if self.waiting:
            self._prefill_entries(self.chunk_size - n_dec, plan)
        n_pre = len(plan.entries) - n_dec
        if n_pre and n_dec:
            plan.kind = StepKind.MIXED
        elif n_pre:
            plan.kind = StepKind.PREFILL
        elif n_dec:
            plan.kind = StepKind.DECODE
        return plan

    # ------------------------------------------------------------------ results

    def forward_inputs(self, plan: Plan) -> list[ForwardItem]:
        items = []
        for e in plan.entries:
            req = e.req
            if e.prefill_tokens:
                start = req.prefilled
                items.append(ForwardItem(req.cache, req.input_ids[start : start + e.prefill_tokens]))
            else:
                items.append(ForwardItem(req.cache, [req.output_ids[-1]]))
        return items

    def complete(self, plan: Plan, next_tokens: Sequence[int | None]) -> list[Request]:
        """Apply a step's sampled tokens; returns the requests that finished in it."""
        finished: list[Request] = []
        for e, tok in zip(plan.entries, next_tokens, strict=True):
            req = e.req
            if e.prefill_tokens:
                req.prefilled += e.prefill_tokens
                if req.prefilled < req.prompt_tokens:
                    continue  # more chunks to go
                self.waiting.remove(req)
                if req.max_new_tokens == 0:
                    self._finish(req, "length", finished)
                    continue
                assert tok is not None  # the prompt's last chunk samples a token
                req.output_ids.append(int(tok))
                if len(req.output_ids) >= req.max_new_tokens:
                    self._finish(req, "length", finished)
                else:
                    req.status = Status.DECODE
                    self.running.append(req)
            else:
                assert tok is not None  # a decode entry samples a token
                req.output_ids.append(int(tok))
                if len(req.output_ids) >= req.max_new_tokens:
                    self.running.remove(req)
                    self._finish(req, "length", finished)
        return finished

    def _finish(self, req: Request, reason: str, finished: list[Request]) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req.kv is not None:
            self.prefix_cache.insert(req.input_ids + req.output_ids, req.kv)
            req.kv = None
        finished.append(req)

    def remove(self, req: Request, reason: str, message: str = "") -> bool:
        """Take a request out (abort, error). False when it is not on this shard any more."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            return False
        req.status = Status.ABORTED
        req.finish_reason = reason
        req.finish_message = message
        req.kv = None
        return True
