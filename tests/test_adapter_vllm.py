"""The vLLM adapter against vLLM's real code (0.33.0), plus its worker-timing path.

The real-engine tests run vLLM's own v1 ``Scheduler``/``AsyncScheduler`` — with our
scheduler class from ``--scheduler-cls`` resolved by vLLM's own config — in the
engine venv that tests/engine_envs.py builds and caches (see there: vLLM cannot
share our .venv). The engine subprocess sends its frames to a socket this test
listens on; they are decoded with the sidecar's decoder and compared with what the
scheduler scheduled, which the driver script reads off each ``SchedulerOutput``.

If vLLM cannot be installed the tests fail with the build log, never skip.
"""

from __future__ import annotations

import tempfile
import types
from collections import defaultdict
from pathlib import Path

import engine_envs
import pytest
from engine_envs import VLLM_VERSION

from enginetime.engine_hooks import Recorder, StepKind
from enginetime.engine_hooks.constants import EventKind
from enginetime.engine_hooks.timers import CpuTimer
from enginetime.sidecar.ingest.records import Event, Hello, Step

ENGINE = f"vllm-{VLLM_VERSION}"
SCRIPT = Path(__file__).parent / "engine_scripts" / "vllm_scheduler_run.py"


@pytest.fixture(scope="module")
def vllm_env() -> engine_envs.EngineEnv:
    try:
        return engine_envs.ensure("vllm")
    except engine_envs.EngineEnvError as exc:
        pytest.fail(f"cannot build the vLLM {VLLM_VERSION} environment for the adapter tests: {exc}")


@pytest.fixture(scope="module")
def shim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    eps = engine_envs.declared_entry_points("vllm.general_plugins")
    assert eps.get("enginetime") == "enginetime.engine_hooks.vllm:register", (
        'pyproject.toml must declare [project.entry-points."vllm.general_plugins"] '
        f'enginetime = "enginetime.engine_hooks.vllm:register" (found {eps})'
    )
    return engine_envs.shim(tmp_path_factory.mktemp("shim"))


def _run(vllm_env, shim_dir, *args: str) -> tuple[dict, list]:
    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="et-vllm-")
    sink = engine_envs.IngestSink(sockdir)
    try:
        result = engine_envs.run_engine_script(
            vllm_env,
            SCRIPT,
            list(args),
            shim_dir=shim_dir,
            extra_env={"ENGINETIME_INGEST": sink.address, "ENGINETIME_ENGINE_ID": "vllm-test"},
        )
    finally:
        sink.close()
    conns = sink.frames()
    assert len(conns) == 1, f"{ENGINE}: expected one ingest connection, got {len(conns)}"
    return result, conns[0]


def _check_run(result: dict, frames: list, *, expect_preemption: bool) -> None:
    tag = f"[{ENGINE} {result['scheduler_mro'][0]}]"
    assert result["vllm_version"] == VLLM_VERSION, tag
    assert result["errors"] == 0 and result["dropped"] == 0 and result["unpaired"] == 0, (tag, result)
    # Steady decode (the same requests as the step before, one token each) went as repeats,
    # and every step below still carries the scheduler's own contexts.
    assert result["repeats"] >= 40, (tag, result["repeats"])  # 66-67 of the 84-87 steps
    # Decode schedules that changed (a request finished) were read in C, contexts as below.
    assert result["decode_reads"] >= 1, (tag, result["decode_reads"])
    # So were the running decodes of a schedule that also took a new request's prompt (the
    # default chunked-prefill "mixed" step): vLLM lists its running requests first.
    assert result["mixed_reads"] >= 1, (tag, result["mixed_reads"])
    assert result["flushed"], tag
    hello = frames[0]
    assert isinstance(hello, Hello) and hello.engine_kind == "vllm" and hello.engine_version == VLLM_VERSION
    assert hello.engine_id == "vllm-test" and hello.shard == 0 and hello.num_shards == 1

    events = [f for f in frames if isinstance(f, Event)]
    steps = [f for f in frames if isinstance(f, Step)]
    # The user's X-Request-Id (external_req_id) is what the sidecar sees, not vLLM's
    # internal id with its random suffix; map it back to compare with the scheduler.
    assert result["external"] == {"user-42-1a2b3c4d": "user-42"} and result["external_dp_rank"] == 0, tag
    internal = {v: k for k, v in result["external"].items()}
    ids = {e.handle: internal.get(e.request_id, e.request_id) for e in events if e.kind == EventKind.ARRIVED}
    arrived = {internal.get(e.request_id, e.request_id): e for e in events if e.kind == EventKind.ARRIVED}
    assert set(arrived) == set(result["prompts"]), tag
    user = arrived["user-42-1a2b3c4d"]
    assert (user.request_id, user.routed_shard) == ("user-42", 0), tag
    for rid, n in result["prompts"].items():
        assert arrived[rid].prompt_tokens == n, (tag, rid)
        if rid in ("long", "share", "gone"):
            assert arrived[rid].traceparent.startswith("00-abab"), (tag, rid)
    assert result["global_step"] == (3 << 32) | 5, f"{tag}: DPEngineCoreProc's wave and step_counter"
    assert arrived["long"].session_id == "s-long" and arrived["share"].session_id == "s-share"

    # One step record per non-empty SchedulerOutput, in order, with no seq gap.
    scheduled = [s for s in result["steps"] if s["scheduled"]]
    assert [s.seq for s in steps] == list(range(len(scheduled))), tag
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    mixed = 0
    for i, (truth, rec) in enumerate(zip(scheduled, steps, strict=True)):
        got = {
            ids[int(h)]: (int(p), int(d), int(c))
            for h, p, d, c in zip(
                rec.handles, rec.prefill_tokens, rec.decode_tokens, rec.context_tokens, strict=True
            )
        }
        assert set(got) == set(truth["scheduled"]), (tag, i, got, truth)
        for rid, (p, d, c) in got.items():
            assert p + d == truth["scheduled"][rid], (tag, i, rid, got[rid], truth)
            assert c == truth["before"][rid], (tag, i, rid, "context = KV length before the step")
            totals[rid]["prefill"] += p
            totals[rid]["decode"] += d
        kinds = {("p" if p else "") + ("d" if d else "") for p, d, _ in got.values()}
        want = (
            StepKind.MIXED
            if ("p" in "".join(kinds) and "d" in "".join(kinds))
            else StepKind.PREFILL
            if "p" in "".join(kinds)
            else StepKind.DECODE
        )
        assert rec.kind == want, (tag, i, got)
        mixed += rec.kind == StepKind.MIXED
        assert rec.end_time_ns >= rec.start_time_ns and rec.device_time_ns > 0, (tag, i)
    assert mixed >= 1, f"{tag}: the scenario has a decode batched with a prefill chunk"

    preempted = {rid for s in result["steps"] for rid in s["preempted"]}
    resumed = {rid for s in result["steps"] for rid in s["resumed"]}
    hits = {rid: v for s in result["steps"] for rid, v in s["new"].items()}
    assert hits["share"] == 64 and hits["long"] == 0, f"{tag}: the scheduler's prefix-cache hits"
    # Chunked prefill: the long prompt took several steps.
    assert sum(1 for s in scheduled if "long" in s["scheduled"] and s["scheduled"]["long"] > 1) >= 3, tag
    for rid, n_prompt in result["prompts"].items():
        if rid == "gone":
            continue
        # Every sampled token after the first is one decode token, preempted or not.
        assert totals[rid]["decode"] == result["max_tokens"][rid] - 1, (tag, rid, dict(totals[rid]))
        if rid not in preempted:
            assert totals[rid]["prefill"] == n_prompt - hits[rid], (tag, rid, dict(totals[rid]))
        else:  # recomputed after the preemption
            assert totals[rid]["prefill"] > n_prompt - hits[rid], (tag, rid, dict(totals[rid]))

    sched_ev = {
        e.request_id if e.request_id else ids[e.handle]: e for e in events if e.kind == EventKind.SCHEDULED
    }
    assert sched_ev and ids[sched_ev["share"].handle] == "share"
    by_kind = defaultdict(set)
    for e in events:
        by_kind[e.kind].add(ids.get(e.handle, e.request_id))
    scheduled_cached = {ids[e.handle]: e.cached_tokens for e in events if e.kind == EventKind.SCHEDULED}
    assert scheduled_cached["share"] == 64 and scheduled_cached["long"] == 0, tag
    assert by_kind[EventKind.PREEMPTED] == preempted, tag
    assert by_kind[EventKind.RESUMED] == resumed, tag
    if expect_preemption:
        assert preempted and resumed, f"{tag}: the small KV cache should force a preemption"
    finished = {ids[e.handle]: e for e in events if e.kind == EventKind.FINISHED}
    aborted = {ids[e.handle]: e for e in events if e.kind == EventKind.ABORTED}
    assert set(aborted) == {"gone"}, tag
    assert set(finished) == set(result["prompts"]) - {"gone"}, tag
    for rid, ev in finished.items():
        assert ev.finish_reason == "length" and ev.output_tokens == result["max_tokens"][rid], (tag, rid)
    # A terminal event never precedes a step that still contains the request.
    position = {id(f): i for i, f in enumerate(frames)}
    for rid, ev in {**finished, **aborted}.items():
        last_step = max(position[id(s)] for s in steps if any(ids[int(h)] == rid for h in s.handles))
        assert position[id(ev)] > last_step, (tag, rid)


@pytest.mark.e2e
@pytest.mark.parametrize("engine", [ENGINE])
def test_real_scheduler_sync_records_what_it_scheduled(engine: str, vllm_env, shim_dir) -> None:
    result, frames = _run(vllm_env, shim_dir, "--preempt", "--blocks", "20")
    assert result["scheduler_mro"][:3] == [
        "enginetime.engine_hooks.vllm.scheduler.Scheduler",
        "enginetime.engine_hooks.vllm.scheduler.EngineTimeMixin",
        "vllm.v1.core.sched.scheduler.Scheduler",
    ], engine
    _check_run(result, frames, expect_preemption=True)


@pytest.mark.e2e
@pytest.mark.parametrize("engine", [ENGINE])
def test_real_async_scheduler_pairs_outputs_not_order(engine: str, vllm_env, shim_dir) -> None:
    result, frames = _run(vllm_env, shim_dir, "--async", "--preempt", "--blocks", "20")
    assert result["scheduler_mro"][2] == "vllm.v1.core.sched.async_scheduler.AsyncScheduler", engine
    _check_run(result, frames, expect_preemption=True)
    # vLLM's own plugin loader ran our entry point; in this process the hooks went
    # onto the real classes as each module was imported.
    assert set(result["patched"]) == {
        "vllm.v1.request.Request.from_engine_core_request",
        "vllm.v1.worker.gpu_worker.Worker.execute_model",
        "vllm.v1.worker.gpu_worker.Worker.sample_tokens",
        "vllm.v1.worker.gpu_worker.Worker.execute_dummy_batch",
        "vllm.v1.engine.core.DPEngineCoreProc._process_engine_step",
    }, engine


# ---------------------------------------------------------------------------- worker timing (main venv)


class _FakeTimer(CpuTimer):
    """A device timer stand-in: begin/end hand out and close event pairs we can see."""

    source = 2

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int]] = []
        self.n = 0
        self.released: list[int] = []

    def begin(self, stream=None):  # noqa: ANN001
        self.n += 1
        self.log.append(("begin", self.n))
        return types.SimpleNamespace(id=self.n, ended=False)

    def end(self, handle, stream=None):  # noqa: ANN001
        handle.ended = True
        self.log.append(("end", handle.id))

    def ready(self, handle) -> bool:  # noqa: ANN001
        return handle.ended

    def resolve(self, handle) -> int:  # noqa: ANN001
        return 1000 * handle.id

    def release(self, handle) -> None:  # noqa: ANN001
        self.released.append(handle.id)


class _FakeScheduler:
    """What VllmRecording reads off vLLM's scheduler: its config and live requests."""

    def __init__(self, requests: dict) -> None:
        self.vllm_config = types.SimpleNamespace(
            parallel_config=types.SimpleNamespace(data_parallel_rank=1, data_parallel_size=2),
            model_config=types.SimpleNamespace(is_moe=True),
            device_config=types.SimpleNamespace(device_type="cuda"),
        )
        self.requests = requests


def _req(rid: str, prompt: int, *, dp_rank: int | None = None) -> types.SimpleNamespace:
    r = types.SimpleNamespace(
        request_id=rid,
        num_prompt_tokens=prompt,
        num_tokens=prompt,
        arrival_time=1.0,
        session_id=None,
        trace_headers=None,
        num_computed_tokens=0,
        num_output_tokens=0,
        status=types.SimpleNamespace(name="RUNNING"),
    )
    r.is_finished = lambda: r.status.name.startswith("FINISHED")
    r.get_finished_reason = lambda: "length"
    if dp_rank is not None:
        r._enginetime_dp_rank = dp_rank
    return r


def _output(sched: dict[str, int], new: dict[str, int]) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        num_scheduled_tokens=sched,
        total_num_scheduled_tokens=sum(sched.values()),
        scheduled_new_reqs=[types.SimpleNamespace(req_id=r, num_computed_tokens=c) for r, c in new.items()],
        scheduled_cached_reqs=types.SimpleNamespace(
            req_ids=[], num_computed_tokens=[], resumed_req_ids=set()
        ),
        preempted_req_ids=set(),
    )


def test_worker_hooks_time_each_output_and_pair_by_object() -> None:
    """The worker wrappers (run on fakes here, on the real classes in the vLLM venv)
    stop the clock after sampling launches and the step record uses that clock, even
    when two outputs are in flight and updates come back in a different order."""
    from enginetime.engine_hooks.vllm import recording as vrec
    from enginetime.engine_hooks.vllm import worker as vworker

    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="et-vw-")
    sink = engine_envs.IngestSink(sockdir)
    timer = _FakeTimer()
    reqs = {"a": _req("a", 8), "b": _req("b", 4, dp_rank=0)}
    sched = _FakeScheduler(reqs)
    rec = Recorder("w", shard=1, num_shards=2, coupling="lockstep", address=sink.address, timer=timer)
    rec._cuda = True  # the fake timer stands in for CUDA events
    recording = vrec.VllmRecording(sched, recorder=rec)
    assert recording.worker_timing and recording.shard == 1 and recording.num_shards == 2
    recording.core_ref = lambda: types.SimpleNamespace(step_counter=7, current_wave=2)

    class Worker:  # the real Worker's methods, as far as the wrappers can tell
        def execute_model(self, scheduler_output):  # noqa: ANN001
            return None  # sampling follows

        def sample_tokens(self, grammar):  # noqa: ANN001
            return "sampled"

        def execute_dummy_batch(self):
            return None

    vworker._patch_worker(types.SimpleNamespace(Worker=Worker))
    vworker._patch_worker(types.SimpleNamespace(Worker=Worker))  # idempotent
    w = Worker()
    for rid in reqs:
        recording.on_add_request(rid)
    out1 = _output({"a": 8}, {"a": 0})
    recording.on_schedule(out1)
    assert w.execute_model(out1) is None and w.sample_tokens(None) == "sampled"
    out2 = _output({"b": 4}, {"b": 0})
    recording.on_schedule(out2)
    w.execute_model(out2)
    w.sample_tokens(None)
    w.execute_dummy_batch()  # an IDLE step between
    recording.on_update(out2)  # updates out of order: pairing is by object
    recording.on_update(out1)
    assert rec.flush(5.0)
    rec.close()
    sink.close()
    assert timer.log == [("begin", 1), ("end", 1), ("begin", 2), ("end", 2), ("begin", 3), ("end", 3)]
    frames = sink.frames()[0]
    steps = [f for f in frames if isinstance(f, Step)]
    assert [s.kind for s in steps] == [StepKind.IDLE, StepKind.PREFILL, StepKind.PREFILL]
    assert [s.device_time_ns for s in steps] == [3000, 2000, 1000]  # each step its own event pair
    assert {s.global_step for s in steps} == {(2 << 32) | 7}
    ev = {e.request_id: e for e in frames if isinstance(e, Event) and e.kind == EventKind.ARRIVED}
    assert ev["b"].routed_shard == 0 and ev["a"].routed_shard is None  # b asked for rank 0, runs on 1
    assert recording.guard.errors.count == 1  # the pinned-elsewhere request, reported once


def test_step_stop_keeps_the_clock_where_it_stopped() -> None:
    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="et-vs-")
    sink = engine_envs.IngestSink(sockdir)
    rec = Recorder("s", address=sink.address, timer="cpu")
    tok = rec.step_begin()
    stopped = rec.step_stop(tok)
    import time

    time.sleep(0.05)  # the batch becomes known later; that wait is not the step's
    rec.step_end(
        stopped, kind=StepKind.DECODE, handles=[], prefill_tokens=[], decode_tokens=[], context_tokens=[]
    )
    assert rec.flush(5.0)
    rec.close()
    sink.close()
    (step,) = [f for f in sink.frames()[0] if isinstance(f, Step)]
    assert step.device_time_ns < 40_000_000 and step.end_time_ns - step.start_time_ns < 40_000_000


def test_recording_never_raises_into_the_scheduler() -> None:
    """Junk where a SchedulerOutput should be, an update for an output never seen, and
    unknown ids to finish_requests: each is counted, none raises, recording goes on."""
    from enginetime.engine_hooks.vllm import recording as vrec

    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="et-vn-")
    sink = engine_envs.IngestSink(sockdir)
    reqs = {"a": _req("a", 8)}
    sched = _FakeScheduler(reqs)
    rec = Recorder("n", address=sink.address, timer="cpu")
    recording = vrec.VllmRecording(sched, recorder=rec)
    recording.on_add_request("a")
    recording.on_schedule(object())  # not a SchedulerOutput
    recording.on_update(object())  # never scheduled: ignored
    recording.on_finish_requests(["nobody", "a"])  # "a" is still running: nothing to send
    good = _output({"a": 8}, {"a": 0})
    recording.on_schedule(good)
    reqs["a"].status = types.SimpleNamespace(name="FINISHED_LENGTH_CAPPED")
    recording.on_update(good)
    assert recording.guard.errors.count == 1
    assert rec.flush(5.0)
    rec.close()
    sink.close()
    frames = sink.frames()[0]
    assert [f.kind for f in frames if isinstance(f, Step)] == [StepKind.PREFILL]
    kinds = [f.kind for f in frames if isinstance(f, Event)]
    assert kinds == [EventKind.ARRIVED, EventKind.SCHEDULED, EventKind.FINISHED]


def test_mixed_schedules_record_what_the_per_request_path_records() -> None:
    """A schedule whose running decodes lead it (then a prompt still in chunks, new
    prompts, a speculative decode, requests the adapter never saw) has its decode head
    read in C; every step must equal, entry by entry, what the per-request path records
    for the same schedules, and the simulator's truth. Stand-ins shaped like vLLM's
    objects (the real scheduler runs in the e2e tests above)."""
    import random

    from enginetime.engine_hooks.vllm import recording as vrec

    rng = random.Random(7)
    sims: dict[str, types.SimpleNamespace] = {}
    sched = _FakeScheduler(sims)
    sched.vllm_config = None
    sched.finished_req_ids = set()
    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="et-vm-")
    sinks = []
    for i in range(2):
        d = Path(sockdir) / str(i)
        d.mkdir()
        sinks.append(engine_envs.IngestSink(str(d)))
    recs = [Recorder(f"mixed-{i}", address=s.address, timer="cpu") for i, s in enumerate(sinks)]
    fast, slow = (vrec.VllmRecording(sched, recorder=r) for r in recs)
    slow._decoding_head = lambda *_: None  # the per-request path, for comparison
    running: list[str] = []
    truth: list[dict[str, tuple[int, int, int]]] = []
    n_new = 0
    for _ in range(240):
        if n_new < 60 and (not running or rng.random() < 0.35):  # a new prompt, sometimes long
            rid = f"r{n_new}"
            n_new += 1
            # 129: a 128-token chunk, then a 1-token one (one token scheduled, still prompt)
            sims[rid] = _req(rid, rng.choice([5, 40, 129, 300]))
            for rec in (fast, slow):
                rec.on_add_request(rid)
            running.append(rid)
        sched_tokens: dict[str, int] = {}
        cached_ids, cached_computed, new = [], [], {}
        budget = 128
        for rid in running:
            r = sims[rid]
            if r.num_computed_tokens < r.num_prompt_tokens:  # prompt (chunked by the budget)
                n = min(budget, r.num_prompt_tokens - r.num_computed_tokens)
                if n <= 0:
                    continue
                budget -= n
            else:  # decode, sometimes with a speculative token
                n = 2 if rng.random() < 0.05 else 1
            sched_tokens[rid] = n
            if r.num_computed_tokens == 0 and not getattr(r, "seen", False):
                new[rid] = 0
                r.seen = True
            else:
                cached_ids.append(rid)
                cached_computed.append(r.num_computed_tokens)
        # vLLM's order: the running (cached) requests first, the new ones after them; now and
        # then another order (another vLLM), which must be read entry by entry.
        head = cached_ids[::-1] if rng.random() < 0.1 else cached_ids
        order = head + [rid for rid in sched_tokens if rid in new]
        out = types.SimpleNamespace(
            num_scheduled_tokens={rid: sched_tokens[rid] for rid in order},
            scheduled_new_reqs=[
                types.SimpleNamespace(req_id=rid, num_computed_tokens=c) for rid, c in new.items()
            ],
            scheduled_cached_reqs=types.SimpleNamespace(
                req_ids=cached_ids, num_computed_tokens=cached_computed, resumed_req_ids=set()
            ),
            preempted_req_ids=set(),
        )
        want = {}
        for rid, n in sched_tokens.items():
            r = sims[rid]
            p = min(n, max(0, r.num_prompt_tokens - r.num_computed_tokens))
            want[rid] = (p, n - p, r.num_computed_tokens)
        if want:  # (an empty schedule runs nothing and records nothing)
            truth.append(want)
        for rec in (fast, slow):
            rec.on_schedule(out)
        sched.finished_req_ids = set()
        for rid, n in sched_tokens.items():  # the device ran: what it computed and sampled
            r = sims[rid]
            decoding = r.num_computed_tokens >= r.num_prompt_tokens
            r.num_computed_tokens += n
            if r.num_computed_tokens >= r.num_prompt_tokens:  # a prompt's last chunk samples 1 token,
                r.num_output_tokens += n if decoding else 1  # a decode each (speculative ones accepted)
                r.num_tokens = r.num_prompt_tokens + r.num_output_tokens
            if r.num_output_tokens >= 20 or (r.num_output_tokens and rng.random() < 0.03):
                r.status.name = "FINISHED_LENGTH_CAPPED"
                sched.finished_req_ids.add(rid)
                running.remove(rid)
        for rec in (fast, slow):
            rec.on_update(out)
    for r in recs:
        assert r.flush(10)
        r.close()
    got = []
    for sink in sinks:
        frames = sink.frames()[0]
        sink.close()
        ids = {e.handle: e.request_id for e in frames if isinstance(e, Event) and e.kind == EventKind.ARRIVED}
        got.append(
            [
                {
                    ids[int(h)]: (int(p), int(d), int(c))
                    for h, p, d, c in zip(
                        st.handles, st.prefill_tokens, st.decode_tokens, st.context_tokens, strict=True
                    )
                }
                for st in frames
                if isinstance(st, Step)
            ]
        )
    assert got[1] == truth, "the per-request path against the simulator"
    assert got[0] == truth, "the decode head read in C against the simulator"
    assert fast.mixed_reads >= 30 and slow.mixed_reads == 0, (fast.mixed_reads, slow.mixed_reads)
