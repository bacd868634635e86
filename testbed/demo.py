"""``enginetime demo``: the incident of DESIGN.md §1, reproduced on the testbed and accounted for.

What happens (default: 4 DP shards, LOCKSTEP, prefill-first, 512-token chunks):

1. A sidecar starts (``python -m enginetime sidecar``, the same command users run) and
   the testbed engine starts in-process with its hooks pointed at the sidecar, serving
   SGLang's ``/generate`` on a loopback port. Everything below goes through HTTP.
2. A long TITO session's first turn runs on shard 0, which now holds its prefix.
3. Baseline: victim requests decode on shards 0..N-2 (plus one "neighbour" on the last
   shard), with no storm.
4. The same victims again; once they are decoding, the session's next turn is routed to
   the last shard (a migration): it prefills its whole context from scratch, dozens of
   chunks — the storm. The victims' shards step in lockstep with it.
5. The session's following turn stays on the last shard (sticky) and prefills only
   its new tokens.
6. With ``--routing advised``: the same victims once more, and the session's next turn
   is routed by the session driver asking the sidecar's ``Advise`` instead of pinned to
   another shard: it lands where its prefix is and prefills only its new tokens. The
   report puts that turn's prefilled tokens and the victims' wall beside the round-robin
   (migrating) turn of step 4.

The report: per-shard decode tok/s before / during / after the storm (from the engine's
own step log), each victim's wall, queue, engine_time, interference and top blame (from
the sidecar, via AccountingClient), the storm's own accounting, and what a wall-clock
timeout would kill versus an engine-time budget of the same length.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from ..sidecar import launcher
from .engine import Engine, EngineConfig, StepLog
from .http_api import EngineHTTPServer
from .model import ModelConfig
from .scheduler import Request
from .sessions import SessionDriver

STORM_RID = "session-long-turn-1"
ADVISED_RID = "session-long-turn-advised"
ROUTINGS = ("round-robin", "advised")


@dataclass
class DemoConfig:
    shards: int = 4
    coupling: str = "lockstep"
    policy: str = "prefill-first"
    chunk: int = 512
    storm_tokens: int = 16384
    victims: int = 6
    seed: int = 0
    device: str = "cpu"
    otlp_endpoint: str | None = None
    baseline: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    intra_op_threads: int = 0
    max_running_requests: int = 1024
    prefix_cache_tokens: int = 1 << 18
    #: Victims' decode tokens before the storm starts and after it ends.
    before_tokens: int = 16
    after_tokens: int = 16
    victim_prompt_tokens: int = 64
    #: New tokens each later turn of the long session adds.
    turn_tokens: int = 64
    #: Budget for a wall-clock timeout vs an engine-time budget, as a multiple of the
    #: slowest victim's wall time without the storm.
    budget_factor: float = 3.0
    #: Run the same storm through two session servers (wall-clock timeout vs engine-time guard).
    compare_policies: bool = True
    #: round-robin: the storm turn migrates (the incident); advised: also run the turn routed by Advise.
    routing: str = "round-robin"

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"unknown --routing {self.routing!r}: use one of {', '.join(ROUTINGS)}")
        if self.shards < 2:
            raise ValueError("the demo needs --shards ≥ 2: victims on shards 0..N-2, the storm on the last")
        if self.storm_tokens < 2 * self.chunk:
            raise ValueError(
                f"--storm-tokens {self.storm_tokens} is less than two chunks of {self.chunk}: no storm to see"
            )
        if self.storm_tokens + 1024 > self.model.max_context:
            raise ValueError(
                f"--storm-tokens {self.storm_tokens} does not fit the model context "
                f"{self.model.max_context} (raise --max-context)"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoConfig:
        model = ModelConfig.from_args(args)
        return cls(
            shards=args.shards,
            coupling=args.coupling,
            policy=args.policy,
            chunk=args.chunk,
            storm_tokens=args.storm_tokens,
            victims=args.victims,
            seed=args.seed,
            device=args.device,
            otlp_endpoint=args.otlp_endpoint,
            baseline=not args.no_baseline,
            model=model,
            intra_op_threads=args.intra_op_threads,
            max_running_requests=args.max_running_requests,
            prefix_cache_tokens=args.prefix_cache_tokens,
            routing=getattr(args, "routing", "round-robin"),
        )


# ---------------------------------------------------------------------------- the sidecar process


class SidecarProcess(launcher.SidecarProcess):
    """``python -m enginetime sidecar`` on a private Unix socket and a free gRPC port.

    The package's launcher (enginetime.sidecar.launcher); ``stop()`` also removes its directory.
    """

    def __init__(self, *extra_args: str, timeout_s: float = 60.0) -> None:
        try:
            up = launcher.start_sidecar("--log-level", "warning", *extra_args, timeout=timeout_s)
        except launcher.SidecarStartError as exc:
            raise RuntimeError(f"the sidecar did not start: {exc}") from None
        super().__init__(up.proc, up.fields, up.log_path, up.sockdir, up.stdout_lines, up.command)

    def stop(self, timeout: float = 15.0) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            self.close()


# ---------------------------------------------------------------------------- measurements


@dataclass
class Window:
    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start < t <= self.end


def decode_rate(steps: list[StepLog], window: Window, active_until: float) -> float | None:
    """Decode tokens per second of one shard's steps ending in the window.

    The denominator is the part of the window in which the shard still had decoding
    requests (until ``active_until``), so a shard whose victims finished early is not
    reported as slow.
    """
    end = min(window.end, active_until)
    span = end - window.start
    if span <= 1e-3:
        return None
    tokens = sum(s.decoded for s in steps if window.start < s.end <= end + 1e-6)
    return tokens / span


def _timeline(logs: list[list[StepLog]], t0: float, t1: float, bins: int = 40) -> dict:
    """Decode tok/s of each shard over time (``--plot``): the victims' run, in at most ``bins`` bins
    (at least 0.2 s each, so a lockstep step's burst of tokens does not read as a spike)."""
    width = max((t1 - t0) / bins, 0.2)
    n = max(1, math.ceil((t1 - t0) / width))
    rates = []
    for steps in logs:
        tokens = [0] * n
        for s in steps:
            if t0 < s.end <= t1 and s.decoded:
                tokens[min(n - 1, int((s.end - t0) / width))] += s.decoded
        rates.append([round(x / width, 1) for x in tokens])
    return {"bin_s": round(width, 4), "t0_s": [round(i * width, 3) for i in range(n)], "decode_tok_s": rates}


def _blame(acct) -> list[dict]:
    return [
        {
            "request_id": b.request_id,
            "shard": b.shard,
            "seconds": round(b.seconds, 4),
            "same_shard": b.same_shard,
        }
        for b in acct.top_blame
    ]


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


class Scenario:
    """One demo run: engine + HTTP + sidecar client, driven phase by phase."""

    def __init__(
        self,
        cfg: DemoConfig,
        engine: Engine,
        url: str,
        acct,
        say: Callable[[str], None],
        sidecar_target: str = "",
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.acct = acct
        self.say = say
        self.url = url
        self.sidecar_target = sidecar_target
        self.client = httpx.Client(
            base_url=url, timeout=600, limits=httpx.Limits(max_connections=cfg.victims + 16)
        )
        # Its own seed: the session's tokens must not repeat the warmup's (no accidental cache hits).
        self.driver = SessionDriver(
            url,
            num_shards=cfg.shards,
            routing="sticky",
            seed=cfg.seed + 1,
            vocab_size=cfg.model.vocab_size,
            client=self.client,
        )
        self.rng = random.Random(cfg.seed)
        self.storm_shard = cfg.shards - 1
        self.home_shard = 0

    def close(self) -> None:
        self.client.close()

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.cfg.model.vocab_size) for _ in range(n)]

    def post(self, rid: str, ids: list[int], max_new: int, shard: int) -> dict:
        r = self.client.post(
            "/generate",
            json={
                "rid": rid,
                "input_ids": ids,
                "routed_dp_rank": shard,
                "sampling_params": {"max_new_tokens": max_new},
            },
        )
        if r.status_code != 200:
            raise RuntimeError(f"{rid}: HTTP {r.status_code}: {r.text}")
        return r.json()

    # ------------------------------------------------------------------ phases

    def warmup(self) -> None:
        threads = [
            threading.Thread(target=self.post, args=(f"warmup-{k}", self.tokens(600), 8, k))
            for k in range(self.cfg.shards)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def victim_specs(self, prefix: str) -> list[tuple[str, int]]:
        specs = [(f"{prefix}victim-{i}", i % (self.cfg.shards - 1)) for i in range(self.cfg.victims)]
        specs.append((f"{prefix}neighbour", self.storm_shard))
        return specs

    def run_victims(self, prefix: str, max_new: int, storm: Callable[[], None] | None) -> dict:
        """Start the victims; with ``storm``, launch it once every victim has decoded before_tokens."""
        specs = self.victim_specs(prefix)
        results: dict[str, dict] = {}
        errors: list[BaseException] = []

        def one(rid: str, shard: int) -> None:
            try:
                results[rid] = self.post(rid, self.tokens(self.cfg.victim_prompt_tokens), max_new, shard)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=spec) for spec in specs]
        for t in threads:
            t.start()
        eng = self.engine
        reqs: dict[str, Request] = {}

        def decoding(n: int) -> bool:
            for rid, _ in specs:
                r = reqs.get(rid) or eng.get(rid)
                if r is None:
                    if errors:
                        return True
                    return False
                reqs[rid] = r
                if len(r.output_ids) < n:
                    return False
            return True

        if not eng.wait_until(lambda: decoding(1), 120):
            raise RuntimeError("victims did not start decoding within 120 s")
        all_decoding = time.perf_counter()
        storm_thread = None
        if storm is not None:
            if not eng.wait_until(lambda: decoding(self.cfg.before_tokens), 120):
                raise RuntimeError("victims did not reach their pre-storm tokens within 120 s")
            storm_thread = threading.Thread(target=storm)
            storm_thread.start()
        for t in threads:
            t.join()
        if storm_thread is not None:
            storm_thread.join()
        if errors:
            raise errors[0]
        return {"specs": specs, "reqs": reqs, "all_decoding": all_decoding, "results": results}

    # ------------------------------------------------------------------ accounting

    def engine_slowdown(self, engine_id: str) -> float:
        """The sidecar's slowdown factor for the engine (the largest over its shards; 1.0 if unknown)."""
        from enginetime.clients import EnginetimeError

        try:
            shards = self.acct.get_shards(engine_id)
        except EnginetimeError:
            return 1.0
        return round(max((s.slowdown for s in shards), default=1.0), 3)

    def accounting(self, rid: str, steps: int, deadline: float):
        """The sidecar's figures for rid once it has all of them (terminal, every step seen)."""
        from enginetime.clients import EnginetimeError

        last = None
        while True:
            try:
                last = self.acct.get_request(rid)
                if last.terminal and last.steps >= steps:
                    return last, False
            except EnginetimeError:
                pass
            if time.monotonic() > deadline:
                return last, True
            time.sleep(0.05)

    def victim_row(self, rid: str, shard: int, req, storm_window: Window | None, deadline: float) -> dict:
        acct, partial = self.accounting(rid, req.steps, deadline)
        row = {
            "request_id": rid,
            "shard": shard,
            "output_tokens": len(req.output_ids),
            "engine_wall_s": _r(req.finish_perf - req.arrival_perf),
            "max_stall_s": _r(req.max_gap_s),
        }
        if storm_window is not None:
            row["decode_tokens_during_storm"] = sum(
                s.decode_tokens[s.rids.index(rid)]
                for s in self.engine.step_log(shard)
                if rid in s.rids and s.end in storm_window
            )
        if acct is None:
            row.update(
                {
                    "wall_s": None,
                    "queue_s": None,
                    "engine_time_s": None,
                    "gpu_time_s": None,
                    "interference_s": None,
                    "other_s": None,
                    "blame": [],
                    "partial": True,
                }
            )
            return row
        row.update(
            {
                "wall_s": _r(acct.wall),
                "queue_s": _r(acct.queue_time),
                "engine_time_s": _r(acct.engine_time),
                "gpu_time_s": _r(acct.gpu_time),
                "interference_s": _r(acct.interference),
                "other_s": _r(acct.other),
                "excluded_steps": acct.excluded_steps,
                "blame": _blame(acct),
                "partial": bool(partial or acct.partial),
            }
        )
        return row

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        cfg, eng, say = self.cfg, self.engine, self.say
        t_start = time.perf_counter()
        say("warming up every shard")
        self.warmup()

        # The long session's first turn, on its home shard.
        history_out = 8
        first = cfg.storm_tokens - cfg.turn_tokens - history_out
        session = self.driver.new_session(first, session_id="session-long")
        say(f"session-long turn 0: {first} tokens prefilled on shard {self.home_shard} (its home)")
        turn0 = self.driver.run_turn(
            session, 0, max_new_tokens=history_out, shard=self.home_shard, rid="session-long-turn-0"
        )
        storm_prompt = len(session.history) + cfg.turn_tokens
        per_step = cfg.chunk - (1 if cfg.policy == "mixed" else 0)
        storm_chunks = math.ceil(storm_prompt / per_step)
        max_new = cfg.before_tokens + storm_chunks + cfg.after_tokens

        baseline = None
        if cfg.baseline:
            say(
                f"baseline: {cfg.victims} victims on shards 0..{cfg.shards - 2} (+1 on shard "
                f"{self.storm_shard}) decode {max_new} tokens, no storm"
            )
            baseline = self.run_victims("baseline-", max_new, None)

        storm_box: dict = {}

        def storm() -> None:
            storm_box["sent"] = time.perf_counter()
            storm_box["turn"] = self.driver.run_turn(
                session, cfg.turn_tokens, max_new_tokens=8, shard=self.storm_shard, rid=STORM_RID
            )

        say(
            f"storm: the same victims; session-long turn 1 migrates to shard {self.storm_shard} "
            f"({storm_prompt} tokens, {storm_chunks} chunks of {cfg.chunk})"
        )
        run = self.run_victims("", max_new, storm)
        storm_turn = storm_box["turn"]

        # The next turn stays where the prefix now is.
        turn2 = self.driver.run_turn(session, cfg.turn_tokens, max_new_tokens=8, rid="session-long-turn-2")
        eng.flush_hooks(10)
        say("collecting accounting from the sidecar")

        # ---- engine-side measurements
        storm_steps = [
            s
            for s in eng.step_log(self.storm_shard)
            if STORM_RID in s.rids and s.prefill_tokens[s.rids.index(STORM_RID)] > 0
        ]
        storm_window = Window(storm_steps[0].start, storm_steps[-1].end)
        reqs = run["reqs"]
        last_finish = max(r.finish_perf for r in reqs.values())
        # "before" ends when the storm turn is sent: its HTTP body (tens of thousands of ids) is
        # parsed while the victims decode, which is the server's cost, not the storm's.
        windows = {
            "before": Window(run["all_decoding"], storm_box["sent"]),
            "during": storm_window,
            "after": Window(storm_window.end, last_finish),
        }
        shards = []
        for k in range(cfg.shards):
            mine = [reqs[rid] for rid, sh in run["specs"] if sh == k]
            active_until = max((r.finish_perf for r in mine), default=0.0)
            steps = eng.step_log(k)
            shards.append(
                {
                    "shard": k,
                    "role": "storm" if k == self.storm_shard else "victims",
                    "decode_tok_s": {
                        name: _r(decode_rate(steps, w, active_until), 2) for name, w in windows.items()
                    },
                }
            )

        first_arrival = min(r.arrival_perf for r in reqs.values())
        timeline = _timeline([eng.step_log(k) for k in range(cfg.shards)], first_arrival, last_finish)
        storm_span = (storm_window.start - first_arrival, storm_window.end - first_arrival)
        timeline["storm"] = [_r(x, 3) for x in storm_span]
        timeline["storm_shard"] = self.storm_shard

        # ---- sidecar accounting
        deadline = time.monotonic() + 20
        victims: list[dict | None] = []
        neighbour: dict | None = None
        for rid, shard in run["specs"]:
            row = self.victim_row(rid, shard, reqs[rid], storm_window, deadline)
            if rid.endswith("neighbour"):
                neighbour = row
            else:
                victims.append(row)
        base_rows: list[dict | None] = []
        base_neighbour: dict | None = None
        if baseline is not None:
            for rid, shard in baseline["specs"]:
                row = self.victim_row(rid, shard, baseline["reqs"][rid], None, deadline)
                if rid.endswith("neighbour"):
                    base_neighbour = row
                else:
                    base_rows.append(row)

        storm_req_steps = sum(1 for s in eng.step_log(self.storm_shard) if STORM_RID in s.rids)
        sa, spartial = self.accounting(STORM_RID, storm_req_steps, deadline)
        storm_row = {
            "request_id": STORM_RID,
            "shard": self.storm_shard,
            "from_shard": self.home_shard,
            "session_id": "session-long",
            "prompt_tokens": storm_turn.prompt_tokens,
            "cached_tokens": storm_turn.cached_tokens,
            "prefill_tokens": sum(s.prefill_tokens[s.rids.index(STORM_RID)] for s in storm_steps),
            "chunks": len(storm_steps),
            "prefill_s": _r(storm_window.end - storm_window.start),
            "sent_after_victims_s": _r(storm_box["sent"] - run["all_decoding"]),
            "wall_s": _r(sa.wall) if sa else None,
            "queue_s": _r(sa.queue_time) if sa else None,
            "engine_time_s": _r(sa.engine_time) if sa else None,
            "gpu_time_s": _r(sa.gpu_time) if sa else None,
            "interference_s": _r(sa.interference) if sa else None,
            "migrated": bool(sa.migrated) if sa else None,
            "partial": bool(spartial or (sa and sa.partial)),
            # How much slower than its calibrated model the engine ran (1.0: at its reference
            # speed); time beyond the reference is slowdown, not any request's engine_time.
            "engine_slowdown": self.engine_slowdown(eng.config.engine_id),
        }
        session_row = {
            "session_id": "session-long",
            "turns": [
                {
                    "request_id": t.rid,
                    "shard": t.shard,
                    "prompt_tokens": t.prompt_tokens,
                    "cached_tokens": t.cached_tokens,
                    "prefilled_tokens": t.prefilled_tokens,
                    "wall_s": _r(t.wall_s),
                }
                for t in (turn0, storm_turn, turn2)
            ],
        }

        report: dict[str, Any] = {
            "config": {
                "shards": cfg.shards,
                "coupling": cfg.coupling,
                "policy": cfg.policy,
                "chunk": cfg.chunk,
                "storm_tokens": cfg.storm_tokens,
                "victims": cfg.victims,
                "seed": cfg.seed,
                "device": str(eng.device),
                "intra_op_threads": eng.intra_op_threads,
                "victim_max_new_tokens": max_new,
                "model": asdict(cfg.model),
                "engine_id": eng.config.engine_id,
            },
            "shards": shards,
            "storm": storm_row,
            "victims": victims,
            "neighbour": neighbour,
            "session": session_row,
            "timeline": timeline,
        }
        if baseline is not None:
            report["baseline"] = {"victims": base_rows, "neighbour": base_neighbour}
            report["timeouts"] = _timeouts(
                victims + [neighbour], base_rows + [base_neighbour], cfg.budget_factor
            )
        report["summary"] = _summary(report, self.storm_shard)
        if cfg.compare_policies and report.get("timeouts"):
            report["policies"] = self.compare_policies(session, report["timeouts"]["budget_s"], max_new)
        if cfg.routing == "advised":
            report["advised"] = self.advised(session, max_new, storm_row, victims, base_rows)
        report["elapsed_s"] = _r(time.perf_counter() - t_start, 2)
        return report

    # ------------------------------------------------------------------ advised routing

    def advised(
        self,
        session,
        max_new: int,
        storm_row: dict,
        storm_victims: list[dict | None],
        base_victims: list[dict | None],
    ) -> dict:
        """The storm phase again, with the session's turn routed by the sidecar's ``Advise``.

        The session driver asks ``Advise`` (``sessions.advisor_for``) and sends
        ``routed_dp_rank`` accordingly; the figures to compare are the turn's prefilled
        tokens and the victims' wall against the migrated (round-robin) turn's run.
        """
        from .sessions import SessionDriver, advisor_for

        cfg, eng = self.cfg, self.engine
        engine_id = eng.config.engine_id
        eng.flush_hooks(10)  # the sidecar has seen every earlier turn before the router asks
        driver = SessionDriver(
            self.url,
            num_shards=cfg.shards,
            routing="advised",
            seed=cfg.seed + 2,
            vocab_size=cfg.model.vocab_size,
            client=self.client,
            advisor=advisor_for(self.acct, engine_id),
        )
        box: dict = {}

        def turn() -> None:
            prompt = len(session.history) + cfg.turn_tokens
            box["advice"] = self.acct.advise(
                engine_id=engine_id,
                session_id=session.session_id,
                prompt_tokens=prompt,
                after_request_id=session.last_rid,
            )
            box["turn"] = driver.run_turn(session, cfg.turn_tokens, max_new_tokens=8, rid=ADVISED_RID)

        self.say("advised: the same victims; session-long's next turn is routed by the sidecar's Advise")
        run = self.run_victims("advised-", max_new, turn)
        eng.flush_hooks(10)
        deadline = time.monotonic() + 20
        rows: list[dict | None] = []
        neighbour = None
        for rid, shard in run["specs"]:
            row = self.victim_row(rid, shard, run["reqs"][rid], None, deadline)
            if rid.endswith("neighbour"):
                neighbour = row
            else:
                rows.append(row)
        t, adv = box["turn"], box["advice"]
        steps = sum(1 for s in eng.step_log(t.shard) if ADVISED_RID in s.rids)
        acct, _ = self.accounting(ADVISED_RID, steps, deadline)

        def mean_wall(vs: list[dict | None]) -> float | None:
            return _r(_mean([v["wall_s"] for v in vs if v and v.get("wall_s") is not None]))

        return {
            "turn": {
                "request_id": ADVISED_RID,
                "shard": t.shard,
                "prompt_tokens": t.prompt_tokens,
                "cached_tokens": t.cached_tokens,
                "prefilled_tokens": t.prefilled_tokens,
                "wall_s": _r(t.wall_s),
                "migrated": bool(acct.migrated) if acct else None,
            },
            "advice": {
                "recommended_shard": adv.recommended_shard,
                "reason": adv.reason,
                "storm_active": adv.storm_active,
                "shards": [
                    {
                        "shard": a.shard,
                        "cached_tokens": a.cached_tokens,
                        "predicted_prefill_s": _r(a.predicted_prefill),
                        "predicted_stall_s": _r(a.predicted_stall),
                    }
                    for a in adv.shards
                ],
            },
            "victims": rows,
            "neighbour": neighbour,
            "victims_mean_wall_s": mean_wall(rows),
            "round_robin": {
                "request_id": storm_row["request_id"],
                "shard": storm_row["shard"],
                "prompt_tokens": storm_row["prompt_tokens"],
                "prefilled_tokens": storm_row["prefill_tokens"],
                "victims_mean_wall_s": mean_wall(storm_victims),
            },
            "no_storm_victims_mean_wall_s": mean_wall(base_victims),
        }

    # ------------------------------------------------------------------ two session servers

    def compare_policies(self, session, budget_s: float, max_new: int) -> dict:
        """The same storm through two session servers: a wall-clock read timeout vs the engine-time guard.

        Pairs of trajectories of growing length (plus one runaway whose own work is
        over budget) go through each server at once, on the shards that do not host
        the storm; once they decode, the long session's next turn migrates to yet
        another shard and prefills from scratch. Both servers use the same budget
        in seconds: as a read timeout, and as an engine-time budget.
        """
        from .session_servers import EngineTimePolicy, SessionServer, Trajectory, WallClockPolicy

        cfg, eng, say = self.cfg, self.engine, self.say
        if cfg.shards < 3:
            return {"skipped": "the comparison needs --shards >= 3 (a third shard for a second migration)"}
        storm_shard = cfg.shards - 2
        shards = [k for k in range(cfg.shards) if k != storm_shard]
        # Lengths around the victims' (whose engine time stays well under the budget), and a runaway that
        # would decode far past the budget on its own: the one request an engine-time budget is for.
        lengths = [max(2, cfg.before_tokens // 2), max_new * 3 // 8, max_new * 3 // 4, max_new * 3 // 2]
        room = cfg.model.max_context - cfg.victim_prompt_tokens - 16
        runaway = min(room, 8192)
        plan = [(f"traj-{n}", n) for n in lengths] + [("runaway", runaway)]

        wall = SessionServer(WallClockPolicy(self.url, budget_s)).start()
        guard = SessionServer(EngineTimePolicy(self.url, self.sidecar_target, budget_s)).start()
        servers = {"wall_clock": wall, "engine_time": guard}
        trajs: dict[str, Trajectory] = {}
        bodies: dict[str, bytes] = {}
        for i, (name, n) in enumerate(plan):
            for policy, tag in (("wall_clock", "wall"), ("engine_time", "guard")):
                rid = f"{tag}-{name}"
                trajs[rid] = Trajectory(rid, policy, shards[i % len(shards)], n)
                bodies[rid] = json.dumps(
                    {
                        "rid": rid,
                        "input_ids": self.tokens(cfg.victim_prompt_tokens),
                        "routed_dp_rank": trajs[rid].shard,
                        "sampling_params": {"max_new_tokens": n},
                    }
                ).encode()
        answers: dict[str, httpx.Response | BaseException] = {}
        client = httpx.Client(timeout=None, limits=httpx.Limits(max_connections=len(trajs) + 4))

        def send(rid: str) -> None:
            try:
                answers[rid] = client.post(
                    f"{servers[trajs[rid].policy].url}/generate",
                    content=bodies[rid],
                    headers={"Content-Type": "application/json"},
                )
            except BaseException as exc:  # reported below
                answers[rid] = exc

        sizes = ", ".join(str(n) for _, n in plan)
        say(
            f"two session servers, one storm: {len(plan)} trajectories each ({sizes} "
            f"tokens) through a {budget_s:.2f} s read timeout and through the engine-time guard "
            f"({budget_s:.2f} s of engine time); session-long turn 3 migrates to shard {storm_shard}"
        )
        reqs: dict[str, Request] = {}
        threads = [threading.Thread(target=send, args=(rid,)) for rid in trajs]
        try:
            for t in threads:
                t.start()

            def ready() -> bool:
                for rid, tr in trajs.items():
                    if rid in answers:
                        continue
                    r = reqs.get(rid) or eng.get(rid)
                    if r is None:
                        return False
                    reqs[rid] = r
                    if len(r.output_ids) < min(tr.max_new_tokens, cfg.before_tokens):
                        return False
                return True

            if not eng.wait_until(ready, 120):
                raise RuntimeError("the trajectories did not start decoding within 120 s")
            sent = time.perf_counter()
            self.driver.run_turn(
                session, cfg.turn_tokens, max_new_tokens=8, shard=storm_shard, rid="session-long-turn-3"
            )
            for t in threads:
                t.join(300)
        finally:
            client.close()
            wall.stop()
            guard.stop()
        eng.flush_hooks(10)
        storm_steps = [
            s
            for s in eng.step_log(storm_shard)
            if "session-long-turn-3" in s.rids and s.prefill_tokens[s.rids.index("session-long-turn-3")] > 0
        ]
        deadline = time.monotonic() + 20
        out: dict = {
            "budget_s": _r(budget_s),
            "basis": "the timeouts budget: the same seconds as a read timeout and as an engine-time budget",
            "storm": {
                "request_id": "session-long-turn-3",
                "shard": storm_shard,
                "prefill_s": _r(storm_steps[-1].end - storm_steps[0].start) if storm_steps else None,
                "chunks": len(storm_steps),
                "sent_after_s": _r(sent - min(r.arrival_perf for r in reqs.values())),
            },
        }
        for policy, server in servers.items():
            killed, completed = [], []
            kills = {k.request_id: k for k in server.killed}
            for rid, tr in trajs.items():
                if tr.policy != policy:
                    continue
                ans = answers[rid]
                if isinstance(ans, BaseException):
                    raise RuntimeError(f"{rid}: the session server failed: {ans!r}")
                req = reqs.get(rid)
                tokens = len(req.output_ids) if req is not None else len(ans.json().get("output_ids", []))
                acct, partial = self.accounting(rid, req.steps if req is not None else 0, deadline)
                row = {
                    "request_id": rid,
                    "shard": tr.shard,
                    "max_new_tokens": tr.max_new_tokens,
                    "output_tokens": tokens,
                    "http_status": ans.status_code,
                    "wall_s": _r(acct.wall) if acct else None,
                    "engine_time_s": _r(acct.engine_time) if acct else None,
                    "interference_s": _r(acct.interference) if acct else None,
                }
                if rid in kills:
                    row["reason"] = kills[rid].reason
                    killed.append(row)
                else:
                    completed.append(row)
            out[policy] = {
                "session_server": server.policy.describe(),
                "killed": sorted(killed, key=lambda r: r["max_new_tokens"]),
                "completed": sorted(completed, key=lambda r: r["max_new_tokens"]),
            }
        return out


def _timeouts(victims: list[dict | None], baseline: list[dict | None], factor: float) -> dict:
    """What a wall-clock timeout kills versus an engine-time budget of the same length."""
    walls = [v["wall_s"] for v in baseline if v and v.get("wall_s") is not None]
    if not walls:
        return {}
    budget = factor * max(walls)
    wall_kills = [v["request_id"] for v in victims if v and (v.get("wall_s") or 0) > budget]
    engine_kills = [v["request_id"] for v in victims if v and (v.get("engine_time_s") or 0) > budget]
    return {
        "budget_s": _r(budget),
        "basis": f"{factor:g} x the slowest victim's wall time without the storm",
        "wall_clock_kills": wall_kills,
        "engine_time_kills": engine_kills,
    }


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _summary(report: dict, storm_shard: int) -> dict:
    others = [s["decode_tok_s"] for s in report["shards"] if s["shard"] != storm_shard]
    before = _mean([s["before"] for s in others])
    during = _mean([s["during"] for s in others])
    out: dict = {
        "victim_shards_decode_tok_s_before": _r(before, 2),
        "victim_shards_decode_tok_s_during": _r(during, 2),
    }
    if before and during is not None:
        out["victim_shards_during_over_before"] = _r(during / before, 4)
    base = {
        v["request_id"].removeprefix("baseline-"): v for v in report.get("baseline", {}).get("victims", [])
    }
    ratios_wall, ratios_engine = [], []
    for v in report["victims"]:
        b = base.get(v["request_id"])
        if b and b.get("wall_s") and v.get("wall_s") is not None:
            ratios_wall.append(v["wall_s"] / b["wall_s"])
        if b and b.get("engine_time_s") and v.get("engine_time_s") is not None:
            ratios_engine.append(v["engine_time_s"] / b["engine_time_s"])
    if ratios_wall:
        out["victim_wall_growth_min"] = _r(min(ratios_wall), 3)
        out["victim_wall_growth_max"] = _r(max(ratios_wall), 3)
    if ratios_engine:
        out["victim_engine_time_ratio_min"] = _r(min(ratios_engine), 3)
        out["victim_engine_time_ratio_max"] = _r(max(ratios_engine), 3)
    storm = report["storm"]["request_id"]
    named = [v for v in report["victims"] if v["blame"] and v["blame"][0]["request_id"] == storm]
    out["victims_blaming_storm_first"] = f"{len(named)}/{len(report['victims'])}"
    return out


# ---------------------------------------------------------------------------- entry points


def run_demo(
    cfg: DemoConfig,
    say: Callable[[str], None] | None = None,
    *,
    sidecar: SidecarProcess | None = None,
    ingest: str | None = None,
) -> dict:
    """Run the whole demo and return the report (the ``--json`` object).

    Starts (and stops) its own sidecar unless one is given. ``ingest`` sends the hooks
    somewhere else than the sidecar (bench/testbed_cuda.py puts a frame tap there).
    """
    from enginetime.clients import AccountingClient

    say = say or (lambda _msg: None)
    own_sidecar = sidecar is None
    if sidecar is None:
        say("starting the sidecar")
        extra = ("--otlp-endpoint", cfg.otlp_endpoint) if cfg.otlp_endpoint else ()
        sidecar = SidecarProcess(*extra)
    engine = server = acct = scenario = None
    try:
        say(
            f"starting the testbed: {cfg.shards} shards, {cfg.coupling}, {cfg.policy}, chunk {cfg.chunk}, "
            f"{cfg.device}"
        )
        engine = Engine(
            EngineConfig(
                num_shards=cfg.shards,
                coupling=cfg.coupling,
                policy=cfg.policy,
                chunk_size=cfg.chunk,
                device=cfg.device,
                model=cfg.model,
                hooks=True,
                ingest=ingest or sidecar.ingest,
                engine_id="testbed-demo",
                intra_op_threads=cfg.intra_op_threads,
                max_running_requests=cfg.max_running_requests,
                prefix_cache_tokens=cfg.prefix_cache_tokens,
            )
        ).start()
        server = EngineHTTPServer(engine).serve_in_thread()
        acct = AccountingClient(sidecar.grpc_target, timeout=5)
        scenario = Scenario(cfg, engine, server.url, acct, say, sidecar.grpc_target)
        return scenario.run()
    except Exception:
        log = sidecar.log()
        if log.strip():
            print(f"--- sidecar log (tail) ---\n{log[-3000:]}", file=sys.stderr)
        raise
    finally:
        if scenario is not None:
            scenario.close()
        if acct is not None:
            acct.close()
        if server is not None:
            server.stop()
        if engine is not None:
            engine.close()
        if own_sidecar:
            sidecar.stop()


def _fmt(x: float | None, unit: str = "", nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}{unit}"


def _blame_text(row: dict) -> str:
    if not row.get("blame"):
        return "-"
    b = row["blame"][0]
    who = b["request_id"] or "(shard)"
    where = "same shard" if b["same_shard"] else "cross-shard"
    return f"{who} @ shard {b['shard']} {b['seconds']:.2f}s ({where})"


def render(report: dict) -> str:
    c, st = report["config"], report["storm"]
    lines = [
        f"enginetime demo: {c['shards']} DP shards, {c['coupling'].upper()}, {c['policy']}, "
        f"chunk {c['chunk']}, {c['device']} ({c['intra_op_threads']} torch thread(s) per op), "
        f"finished in {report['elapsed_s']} s",
        "",
        f"storm: {st['request_id']} (session {st['session_id']}) migrated shard {st['from_shard']} -> shard "
        f"{st['shard']}: prefilled {st['prefill_tokens']} of {st['prompt_tokens']} tokens "
        f"(cached {st['cached_tokens']}) in {st['chunks']} chunks, {_fmt(st['prefill_s'], ' s')}",
    ]
    t = report["session"]["turns"]
    lines.append(
        f"       (turn 0 on shard {t[0]['shard']} prefilled {t[0]['prefilled_tokens']}; "
        f"turn 2 kept on shard {t[2]['shard']} prefilled {t[2]['prefilled_tokens']} of "
        f"{t[2]['prompt_tokens']} "
        f"in {_fmt(t[2]['wall_s'], ' s')})"
    )
    lines.append(
        f"       sidecar: engine_time {_fmt(st['engine_time_s'], ' s')}, gpu_time "
        f"{_fmt(st['gpu_time_s'], ' s')}, wall {_fmt(st['wall_s'], ' s')}, "
        f"migrated={st['migrated']}"
    )
    lines += ["", "decode tok/s per shard      before    during     after"]
    for s in report["shards"]:
        d = s["decode_tok_s"]
        tag = " (storm)" if s["role"] == "storm" else ""
        lines.append(
            f"  shard {s['shard']}{tag:<17} {_fmt(d['before'], '', 1):>8}  "
            f"{_fmt(d['during'], '', 1):>8}  {_fmt(d['after'], '', 1):>8}"
        )
    base = {
        v["request_id"].removeprefix("baseline-"): v
        for v in (report.get("baseline") or {}).get("victims", [])
        + [(report.get("baseline") or {}).get("neighbour")]
        if v
    }
    lines += [
        "",
        "victims (seconds; sidecar accounting)      wall   queue  engine  interf  top blame",
        "                                     [no storm: wall / engine]",
    ]
    rows = report["victims"] + ([report["neighbour"]] if report.get("neighbour") else [])
    for v in rows:
        b = base.get(v["request_id"])
        lines.append(
            f"  {v['request_id']:<12} shard {v['shard']}  {'':<14}{_fmt(v['wall_s']):>6}  "
            f"{_fmt(v['queue_s']):>6}  {_fmt(v['engine_time_s']):>6}  "
            f"{_fmt(v['interference_s']):>6}  {_blame_text(v)}"
        )
        if b:
            lines.append(f"  {'':<36}[{_fmt(b['wall_s'])} / {_fmt(b['engine_time_s'])}]")
    to = report.get("timeouts")
    if to:
        n = len(rows)
        lines += [
            "",
            f"a wall-clock timeout of {to['budget_s']:.2f} s ({to['basis']})",
            f"  kills {len(to['wall_clock_kills'])}/{n} of these requests; an engine-time budget "
            f"of the same {to['budget_s']:.2f} s kills {len(to['engine_time_kills'])}/{n}.",
        ]
    pol = report.get("policies")
    if pol and "skipped" not in pol:
        lines += _render_policies(pol)
    if report.get("advised"):
        lines += _render_advised(report["advised"])
    s = report["summary"]
    if s.get("victim_shards_during_over_before") is not None:
        lines.append(
            f"victim shards decoded at {100 * s['victim_shards_during_over_before']:.0f}% of their "
            f"pre-storm rate during the storm; top blame names the storm for "
            f"{s['victims_blaming_storm_first']} victims."
        )
    return "\n".join(lines)


def _render_advised(adv: dict) -> list[str]:
    """The turn routed by Advise beside the migrated one: what it prefilled, what the victims paid."""
    t, rr = adv["turn"], adv["round_robin"]
    return [
        "",
        "routing the session's turn          shard  prefilled / prompt   victims' mean wall",
        f"  round-robin ({rr['request_id']})  {rr['shard']:>5}  {rr['prefilled_tokens']:>9} / "
        f"{rr['prompt_tokens']:<6}   {_fmt(rr['victims_mean_wall_s'], ' s')}",
        f"  advised ({t['request_id']})  {t['shard']:>2}  {t['prefilled_tokens']:>9} / "
        f"{t['prompt_tokens']:<6}   {_fmt(adv['victims_mean_wall_s'], ' s')}",
        f"  (no storm: victims' mean wall {_fmt(adv['no_storm_victims_mean_wall_s'], ' s')})",
        f"  Advise said: {adv['advice']['reason']}",
    ]


def _render_policies(pol: dict) -> list[str]:
    """The two session servers side by side: who each killed, and how long those trajectories were."""
    st, budget = pol["storm"], pol["budget_s"]
    lines = [
        "",
        f"two session servers, one storm ({st['request_id']} prefilled {st['chunks']} chunks on "
        f"shard {st['shard']} in {_fmt(st['prefill_s'], ' s')}), the same {budget:.2f} s budget:",
        f"  {'trajectory':<10} {'tokens':>6}   {'wall-clock read timeout':<48} engine-time guard",
    ]
    rows: dict[str, dict] = {}
    for policy in ("wall_clock", "engine_time"):
        for state in ("killed", "completed"):
            for r in pol[policy][state]:
                name = r["request_id"].split("-", 1)[1]
                rows.setdefault(name, {"tokens": r["max_new_tokens"]})[policy] = (state, r)

    def cell(entry) -> str:
        if entry is None:
            return "-"
        state, r = entry
        if state == "killed":
            why = {"read_timeout": "timed out"}.get(r.get("reason", ""), r.get("reason", ""))
            return f"KILLED ({why}) at {r['output_tokens']} tokens, engine {_fmt(r['engine_time_s'])} s"
        return f"ok, {r['output_tokens']} tokens, wall {_fmt(r['wall_s'])} s"

    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["tokens"]):
        lines.append(
            f"  {name:<10} {row['tokens']:>6}   {cell(row.get('wall_clock')):<48} "
            f"{cell(row.get('engine_time'))}"
        )
    lines += _policy_verdict(pol, n=len(rows))
    return lines


def _policy_verdict(pol: dict, n: int) -> list[str]:
    """Two sentences computed from who each session server killed (names, not a fixed story)."""

    def short(r: dict) -> str:
        return r["request_id"].split("-", 1)[1]

    wk, gk = pol["wall_clock"]["killed"], pol["engine_time"]["killed"]
    survived = [r["max_new_tokens"] for r in pol["wall_clock"]["completed"]]
    longest = bool(wk) and min(r["max_new_tokens"] for r in wk) > max(survived, default=0)
    guard_killed = {short(r) for r in gk}
    spared = [short(r) for r in wk if short(r) not in guard_killed]
    wall_text = f"  the read timeout killed {len(wk)}/{n} trajectories"
    if wk:
        which = f": the {len(wk)} longest" if longest and len(wk) > 1 else ""
        lost = sum(r["output_tokens"] for r in wk)
        wall_text += (
            f" ({', '.join(short(r) for r in wk)}{which}), {lost} tokens of work thrown away in total"
        )
    guard_text = f"  the engine-time guard killed {len(gk)}/{n}"
    if gk:
        guard_text += f" ({', '.join(short(r) for r in gk)}), over budget on its own work"
    if spared:
        guard_text += f"; it let {', '.join(spared)} finish"
    elif wk and guard_killed:
        guard_text += "; the read timeout killed no other"
    return [wall_text + ";", guard_text + "."]


def main(args: argparse.Namespace) -> int:
    try:
        cfg = DemoConfig.from_args(args)
    except ValueError as exc:
        print(f"enginetime demo: {exc}", file=sys.stderr)
        return 2

    def say(msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)

    plot = getattr(args, "plot", None)
    if plot:
        from .plot import check_available

        try:
            check_available()
        except ImportError as exc:
            print(f"enginetime demo: {exc}", file=sys.stderr)
            return 2
        if args.no_baseline:
            say("--plot with --no-baseline: the picture has no no-storm bars to compare with")

    try:
        report = run_demo(cfg, say)
    except Exception as exc:
        print(f"enginetime demo failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    else:
        print(render(report))
    if plot:
        from .plot import plot_report

        try:
            plot_report(report, plot)
        except (OSError, ValueError) as exc:  # an unwritable path, an unknown image format
            print(f"enginetime demo: could not write the picture to {plot}: {exc}", file=sys.stderr)
            return 1
        say(f"wrote the picture to {plot}")
    return 0


__all__ = ["ADVISED_RID", "DemoConfig", "SidecarProcess", "render", "run_demo"]
