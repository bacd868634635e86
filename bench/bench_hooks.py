"""What the hooks cost the engine: per call, in an engine-shaped loop, and in memory.

    .venv/bin/python bench/bench_hooks.py [--batches 1,64,256,512] [--work-ms 2] [--skip-micro]
        [--work-kind sleep|spin]

1. Engine-thread cost per step: a Recorder against a draining socket server thread (a
   stand-in sidecar that reads and discards), timing on the calling thread
   ``step_begin`` + building the four columns from Python request objects + ``step_end``
   ("with columns"), the same with prefill and decode passed as ints as an adapter passes
   a decode batch ("decode as ints"), the calls alone with the lists already built
   ("hooks only"), and an unchanged decode batch as the adapters record it ("repeat":
   step_begin + comparing the batch with the previous one + ``step_repeat``), steps
   rotating among the four, plus the CPU the hooks spend off the engine thread per step.
   Steps are back to back with an untimed flush every ``--chunk`` steps. Then the SGLang
   and vLLM adapters' own code per step (bench/adapter_steps.py), batch unchanged and
   changed every step.
2. Engine-shaped loop against a real sidecar process: each step is ``--work-ms`` of
   GIL-releasing work (as kernel launches and collective waits are: ``time.sleep``, or with
   ``--work-kind spin`` SHA-256 over a buffer, a wait that spins) plus the hooks;
   blocks with hooks (columns from lists with the shipper in its own process, the same
   batch as a repeat, columns with the shipper a thread, in turn) and without alternate
   in one run; mean and p99 step-time ratios per batch size and variant, with the noise
   of plain blocks against each other.
   Then, at batch 256, where that loop's extra time goes: variants rotated in one run
   (the adapter's lists alone; hooks with no thread of ours, the append alone; hooks whose
   sidecar is absent; hooks writing to a process that only reads; a real sidecar, also
   at nice 19, also with the shipper thread). ``--sidecar-nice`` runs the main table
   against a reniced sidecar.
3. Tight loop (steps back to back, far faster than any sidecar takes them) in a fresh
   process, sidecar live and absent: the engine process's RSS growth and the worst
   single hook call (an engine-thread stall).

CPU timer throughout: the CUDA path adds one event record per begin/end and is
checked on a device by bench/cuda_timer_check.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapter_steps import sglang_steps, vllm_steps  # noqa: E402
from pinning import pin_process  # noqa: E402

from enginetime.engine_hooks import Recorder, StepKind  # noqa: E402


class DrainServer:
    """Accepts one connection on a Unix socket and discards what it reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bytes = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                while True:
                    data = conn.recv(1 << 20)
                    if not data:
                        break
                    self.bytes += len(data)

    def close(self) -> None:
        self._listener.close()


class Req:
    """What an engine's request object looks like to an adapter."""

    __slots__ = ("handle", "extend", "prefix")

    def __init__(self, handle: int, extend: int, prefix: int) -> None:
        self.handle = handle
        self.extend = extend
        self.prefix = prefix


def end_decode_as_ints(rec: Recorder, token: object, reqs: list[Req], step: int) -> None:
    """step_end of a decode batch as the SGLang adapter sends it: two lists, prefill/decode as ints."""
    rec.step_end(
        token,
        kind=StepKind.DECODE,
        handles=[r.handle for r in reqs],
        prefill_tokens=0,
        decode_tokens=1,
        context_tokens=[r.prefix for r in reqs],
        global_step=step,
    )


def run_batch(address: str, batch: int, steps: int, chunk: int, shipper: str = "process") -> dict:
    rec = Recorder("bench", address=address, timer="cpu", engine_kind="bench", shipper=shipper)
    try:
        handles = [rec.request_arrived(f"r{i}", prompt_tokens=100) for i in range(batch)]
        reqs = [Req(h, 1, 1000 + i) for i, h in enumerate(handles)]
        if not rec.flush(5):
            raise SystemExit(f"bench: could not reach the drain server at {address}")
        cpu0 = rec.stats().shipper_cpu_ns
        perf = time.perf_counter_ns
        costs: list[int] = []  # step_begin + building columns + step_end
        hook_costs: list[int] = []  # step_begin + step_end alone, columns already built
        int_costs: list[int] = []  # with handles and context built, prefill/decode as ints
        repeat_costs: list[int] = []  # the batch unchanged: compared, then step_repeat
        prev = list(reqs)
        refused = 0
        done = 0
        while done < steps:
            for _ in range(min(chunk, steps - done)):
                if done % 4 == 3:  # the same requests as the step before: a repeat
                    t0 = perf()
                    tok = rec.step_begin()
                    if reqs == prev and rec.step_repeat(tok, global_step=done):
                        repeat_costs.append(perf() - t0)
                    else:  # a step before it was dropped (a full ring): the adapters send it whole
                        refused += 1
                        end_decode_as_ints(rec, tok, reqs, done)
                elif done % 4 == 2:  # a decode batch as the SGLang adapter passes it
                    t0 = perf()
                    end_decode_as_ints(rec, rec.step_begin(), reqs, done)
                    int_costs.append(perf() - t0)
                elif done % 4 == 1:
                    t0 = perf()
                    tok = rec.step_begin()
                    rec.step_end(
                        tok,
                        kind=StepKind.DECODE,
                        handles=[r.handle for r in reqs],
                        prefill_tokens=[0] * batch,
                        decode_tokens=[r.extend for r in reqs],
                        context_tokens=[r.prefix for r in reqs],
                        global_step=done,
                    )
                    costs.append(perf() - t0)
                else:
                    handles = [r.handle for r in reqs]
                    prefill = [0] * batch
                    decode = [r.extend for r in reqs]
                    context = [r.prefix for r in reqs]
                    t0 = perf()
                    tok = rec.step_begin()
                    rec.step_end(
                        tok,
                        kind=StepKind.DECODE,
                        handles=handles,
                        prefill_tokens=prefill,
                        decode_tokens=decode,
                        context_tokens=context,
                        global_step=done,
                    )
                    hook_costs.append(perf() - t0)
                done += 1
            if not rec.flush(30):
                raise SystemExit("bench: the shipper did not drain within 30 s")
        st = rec.stats()
        shipped = st.steps - st.dropped_steps
        return {
            "ints_median_us": statistics.median(int_costs) / 1e3,
            "ints_p99_us": _p99(int_costs) / 1e3,
            "repeat_median_us": statistics.median(repeat_costs) / 1e3,
            "repeat_p99_us": _p99(repeat_costs) / 1e3,
            "repeat_refused": refused,
            "batch": batch,
            "steps": steps,
            "median_us": statistics.median(costs) / 1e3,
            "p99_us": _p99(costs) / 1e3,
            "hooks_median_us": statistics.median(hook_costs) / 1e3,
            "hooks_p99_us": _p99(hook_costs) / 1e3,
            "shipper_us": (st.shipper_cpu_ns - cpu0) / max(1, shipped) / 1e3,
            "dropped": st.dropped_steps,
            "bytes_per_step": None,
            "shipper": st.shipper,
        }
    finally:
        rec.close()


def _renice(target: int) -> None:
    """In a child before exec: lower its CPU priority to ``target`` (never raise it)."""
    os.nice(max(0, target - os.nice(0)))


def start_sidecar(
    tmp: str, nice: int | None = None, name: str = "ingest", cpus: set[int] | None = None
) -> tuple[subprocess.Popen, str]:
    """A real sidecar process (``python -m enginetime sidecar``) on a private Unix socket.

    ``nice``: the sidecar's niceness (None: inherited), so that on a host with few free
    cores the engine thread's wake-ups preempt it. ``cpus``: the CPUs it may run on
    (``--pin``), as a deployment pins the sidecar away from the engine's scheduler cores.
    """

    def prepare() -> None:
        if nice is not None:
            _renice(nice)
        if cpus:
            os.sched_setaffinity(0, cpus)

    path = os.path.join(tmp, name + ".sock")
    log = open(os.path.join(tmp, name + ".log"), "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enginetime",
            "sidecar",
            "--ingest",
            "unix:" + path,
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        stdin=subprocess.DEVNULL,
        preexec_fn=prepare if nice is not None or cpus else None,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the sidecar exited ({proc.returncode}); see {tmp}/{name}.log")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return proc, "unix:" + path
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    proc.kill()
    raise SystemExit("bench: the sidecar did not listen within 60 s")


#: ``--pin``: the CPUs the shipper processes are moved to (the sidecar's), off the engine loop's.
SHIPPER_CPUS: set[int] | None = None


def placed(rec: Recorder) -> Recorder:
    """With ``--pin``, move ``rec``'s shipper process (every thread) off the engine loop's CPU.

    A shipper process inherits the engine process's CPU mask. An engine pinned to a NUMA
    node's cores leaves it several to run on; this bench pins its engine loop to one CPU,
    and without this the shipper would share exactly the engine thread's core.
    """
    pid = rec.stats().shipper_pid
    if SHIPPER_CPUS and pid:
        pin_process(pid, SHIPPER_CPUS)
    return rec


def _p99(values: list[int]) -> float:
    s = sorted(values)
    return s[int(0.99 * (len(s) - 1))]


SHIPPERS = ("process", "thread")


#: The engine loop's hooked variants: name -> (shipper, what the engine thread does).
LOOP_VARIANTS = {
    "process": ("process", "columns"),
    "process, repeat": ("process", "repeat"),
    "thread": ("thread", "columns"),
}


def spin_work() -> Callable[[float], None]:
    """Busy work with the GIL released for about ``seconds``: SHA-256 over a buffer.

    The other model of an engine's wait: CUDA synchronization and NCCL collectives spin on
    the CPU by default, so the engine's core stays busy (and its caches and clock warm),
    where ``time.sleep`` lets it idle. Calibrated once; hashlib releases the GIL on
    buffers over 2 KiB.
    """
    buf = memoryview(bytes(32 << 20))
    hashlib.sha256(buf).digest()  # the buffer's pages, touched once
    t0 = time.perf_counter()
    hashlib.sha256(buf[: 8 << 20]).digest()
    rate = (8 << 20) / (time.perf_counter() - t0)

    def spin(seconds: float) -> None:
        hashlib.sha256(buf[: min(len(buf), int(seconds * rate))]).digest()

    return spin


def run_engine_loop(
    address: str,
    batch: int,
    blocks: int,
    block_steps: int,
    work_s: float,
    work: Callable[[float], None] = time.sleep,
) -> dict:
    """Step times of a loop shaped like an engine's scheduler thread, with and without hooks.

    Each step is ``work_s`` of GIL-releasing work (``time.sleep``: the engine thread waits
    on kernel launches and collectives with the GIL released, which is exactly when a
    thread of ours in the engine's process may take the GIL) plus, in hooked blocks,
    step_begin + the columns built from request objects + step_end ("columns"), or
    step_begin + comparing the batch with the previous step's + step_repeat ("repeat",
    the steady decode step as the adapters record it). Blocks of ``block_steps`` rotate
    hooked / plain through the LOOP_VARIANTS in one process against one live sidecar,
    every recorder alive throughout; the first 10 steps of every block are not counted
    (the previous block's shipping tail).
    "noise" compares the plain blocks of even and odd pairs with each other: ratios
    closer to 1 than that are not resolved.
    """
    recs = {
        variant: placed(
            Recorder(f"bench-loop-{variant}", address=address, timer="cpu", engine_kind="bench", shipper=mode)
        )
        for variant, (mode, _) in LOOP_VARIANTS.items()
    }
    try:
        reqs_of = {}
        for mode, rec in recs.items():
            handles = [rec.request_arrived(f"loop{batch}-{i}", prompt_tokens=100) for i in range(batch)]
            reqs_of[mode] = [Req(h, 1, 1000 + i) for i, h in enumerate(handles)]
            if not rec.flush(10):
                raise SystemExit(f"bench: could not reach the sidecar at {address}")
        perf = time.perf_counter_ns
        sleep = work
        names = list(LOOP_VARIANTS)
        hooked: dict[str, list[int]] = {v: [] for v in names}
        plain: list[list[int]] = [[], []]
        hook_max = dict.fromkeys(names, 0)
        hook_total = dict.fromkeys(names, 0)
        end_total = dict.fromkeys(names, 0)
        hook_steps = dict.fromkeys(names, 0)
        refused = dict.fromkeys(names, 0)
        for block in range(blocks):
            with_hooks = block % 2 == 0
            mode = names[(block // 2) % len(names)]
            rec, reqs = recs[mode], reqs_of[mode]
            repeat = LOOP_VARIANTS[mode][1] == "repeat"
            prev = list(reqs)
            out = hooked[mode] if with_hooks else plain[(block // 2) % 2]
            for step in range(block_steps):
                t0 = perf()
                if with_hooks and repeat and step:
                    tok = rec.step_begin()
                    sleep(work_s)
                    t1 = perf()
                    if not (reqs == prev and rec.step_repeat(tok, global_step=step)):
                        refused[mode] += 1
                        end_decode_as_ints(rec, tok, reqs, step)
                    t2 = perf()
                    hook_max[mode] = max(hook_max[mode], t2 - t1)
                    hook_total[mode] += t2 - t1
                    end_total[mode] += t2 - t1
                    hook_steps[mode] += 1
                elif with_hooks:  # (a repeat block's first step records the batch in full)
                    tok = rec.step_begin()
                    sleep(work_s)
                    t1 = perf()
                    handles = [r.handle for r in reqs]  # what an adapter builds from its batch
                    prefill = [0] * batch
                    decode = [r.extend for r in reqs]
                    context = [r.prefix for r in reqs]
                    t_cols = perf()
                    rec.step_end(
                        tok,
                        kind=StepKind.DECODE,
                        handles=handles,
                        prefill_tokens=prefill,
                        decode_tokens=decode,
                        context_tokens=context,
                        global_step=step,
                    )
                    t2 = perf()
                    hook_max[mode] = max(hook_max[mode], t2 - t1)
                    hook_total[mode] += t2 - t1
                    end_total[mode] += t2 - t_cols
                    hook_steps[mode] += 1
                else:
                    sleep(work_s)
                    t2 = perf()
                if step >= 10:
                    out.append(t2 - t0)
        base = plain[0] + plain[1]
        rows = {}
        for mode, rec in recs.items():
            rec.flush(10)
            times = hooked[mode]
            n = hook_steps[mode]
            rows[mode] = {
                "batch": batch,
                "shipper": mode,
                "refused": refused[mode],
                "mean_ratio": statistics.fmean(times) / statistics.fmean(base),
                "p99_ratio": _p99(times) / _p99(base),
                "base_mean_us": statistics.fmean(base) / 1e3,
                "base_p99_us": _p99(base) / 1e3,
                "noise_mean": statistics.fmean(plain[1]) / statistics.fmean(plain[0]),
                "noise_p99": _p99(plain[1]) / _p99(plain[0]),
                "hook_max_us": hook_max[mode] / 1e3,
                "hook_mean_us": hook_total[mode] / max(1, n) / 1e3,
                "end_mean_us": end_total[mode] / max(1, n) / 1e3,
                "dropped": rec.stats().dropped_steps,
                "steps": len(times),
            }
        return rows
    finally:
        for rec in recs.values():
            rec.close()


def run_breakdown(
    addresses: dict[str, str],
    batch: int,
    rounds: int,
    block_steps: int,
    work_s: float,
    work: Callable[[float], None] = time.sleep,
) -> dict:
    """Where the engine-shaped loop's extra time goes, one variant per block, rotated in one run.

    ``plain``: the work alone. ``columns``: plus the adapter building the four lists.
    ``hooks, no thread``: plus step_begin/step_end with the thread shipper never started (the
    bench empties its in-process ring between steps, untimed): the append alone, the floor any
    design that takes the shipping out of the engine's process can reach.
    ``hooks, no reader``: plus step_begin/step_end, the recorder's sidecar absent (its
    shipper process only wakes to find no one and drops). ``hooks, drain process``: the
    shipper writes every frame to a process that only reads them. ``hooks, sidecar``: a
    real sidecar decodes and accounts them; ``shipper thread``: the same with the shipper a
    thread in the engine's process (the other choice); ``decode as ints``: the same, with
    prefill and decode passed as ints (a decode batch as the SGLang adapter passes it);
    ``repeat``: the same batch compared with the previous step's and recorded with
    step_repeat (the steady decode step as the adapters record it). The recorders live
    throughout; all but the two named "thread" ship from their own process.
    """
    perf = time.perf_counter_ns
    sleep = work
    recs: dict[str, tuple[Recorder, list[Req]]] = {}
    repeat = "hooks, sidecar, repeat"
    addresses = {
        "hooks, no thread": addresses["hooks, no reader"],
        **addresses,
        "hooks, sidecar, shipper thread": addresses["hooks, sidecar"],
        repeat: addresses["hooks, sidecar"],
    }
    for name, address in addresses.items():
        threaded = name != "hooks, no thread"
        shipper = "thread" if name in ("hooks, no thread", "hooks, sidecar, shipper thread") else "process"
        rec = placed(
            Recorder(
                f"bench-{name}",
                address=address,
                timer="cpu",
                engine_kind="bench",
                start=threaded,
                shipper=shipper,
            )
        )
        handles = [rec.request_arrived(f"bd{batch}-{i}", prompt_tokens=100) for i in range(batch)]
        recs[name] = (rec, [Req(h, 1, 1000 + i) for i, h in enumerate(handles)])
    ints = "hooks, sidecar, decode as ints"
    variants = ["plain", "columns", *addresses] + ([ints] if "hooks, sidecar" in addresses else [])
    times: dict[str, list[int]] = {v: [] for v in variants}
    prev = list(recs[repeat][1])
    try:
        for name, (rec, _) in recs.items():
            if "no " not in name and not rec.flush(10):
                raise SystemExit(f"bench: could not reach {addresses[name]}")
        for _ in range(rounds):
            for v in variants:
                rec, reqs = recs.get(v) or recs["hooks, sidecar" if v == ints else next(iter(recs))]
                out = times[v]
                for step in range(block_steps):
                    t0 = perf()
                    if v == "plain":
                        sleep(work_s)
                    elif v == "columns":
                        sleep(work_s)
                        handles = [r.handle for r in reqs]
                        prefill = [0] * batch
                        decode = [r.extend for r in reqs]
                        context = [r.prefix for r in reqs]
                    elif v == ints:
                        tok = rec.step_begin()
                        sleep(work_s)
                        end_decode_as_ints(rec, tok, reqs, step)
                    elif v == repeat:
                        tok = rec.step_begin()
                        sleep(work_s)
                        if not (step and reqs == prev and rec.step_repeat(tok, global_step=step)):
                            end_decode_as_ints(rec, tok, reqs, step)  # a block's first step: in full
                    else:
                        tok = rec.step_begin()
                        sleep(work_s)
                        handles = [r.handle for r in reqs]
                        prefill = [0] * batch
                        decode = [r.extend for r in reqs]
                        context = [r.prefix for r in reqs]
                        rec.step_end(
                            tok,
                            kind=StepKind.DECODE,
                            handles=handles,
                            prefill_tokens=prefill,
                            decode_tokens=decode,
                            context_tokens=context,
                            global_step=step,
                        )
                    if step >= 10:
                        out.append(perf() - t0)
                    if v == "hooks, no thread":
                        rec._ring.clear()  # untimed: what a reader in another process would take
                        rec._shipper.ring_bytes = 0
    finally:
        for rec, _ in recs.values():
            rec.close(0.5)
    base = statistics.fmean(times["plain"])
    return {
        v: {
            "mean_ratio": statistics.fmean(t) / base,
            "p99_ratio": _p99(t) / _p99(times["plain"]),
            "mean_us": statistics.fmean(t) / 1e3,
        }
        for v, t in times.items()
    }


def _drain_child(path: str) -> None:
    """A process that accepts ingest connections and only reads (the breakdown's cheap reader)."""
    server = DrainServer(path)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        server.close()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_tight_loop(address: str, batch: int, seconds: float) -> dict:
    """Steps back to back (no work between them) for ``seconds``: memory growth and the worst call.

    Far more steps than any sidecar takes, so the bounded buffers fill and drop; the
    engine process's RSS must stay bounded and no hook call may stall the engine thread.
    """
    rss0 = _rss_bytes()
    rec = Recorder("bench-tight", address=address, timer="cpu", engine_kind="bench")
    try:
        handles = [rec.request_arrived(f"tight{i}", prompt_tokens=100) for i in range(batch)]
        reqs = [Req(h, 1, 1000 + i) for i, h in enumerate(handles)]
        perf = time.perf_counter_ns
        worst = 0
        peak = rss0
        steps = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(1000):
                t0 = perf()
                tok = rec.step_begin()
                rec.step_end(
                    tok,
                    kind=StepKind.DECODE,
                    handles=[r.handle for r in reqs],
                    prefill_tokens=[0] * batch,
                    decode_tokens=[r.extend for r in reqs],
                    context_tokens=[r.prefix for r in reqs],
                    global_step=steps,
                )
                worst = max(worst, perf() - t0)
                steps += 1
            peak = max(peak, _rss_bytes())
        st = rec.stats()
        return {
            "steps": steps,
            "rss_growth_mb": (peak - rss0) / 1e6,
            "worst_ms": worst / 1e6,
            "dropped": st.dropped_steps,
        }
    finally:
        rec.close(0.5)


def _tight_in_child(address: str, batch: int, seconds: float) -> dict:
    """run_tight_loop in a fresh interpreter, so its RSS growth is its own."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--tight-child",
            address,
            "--batch",
            str(batch),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench: tight loop failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000, help="steps per batch size (default 20000)")
    parser.add_argument("--chunk", type=int, default=500, help="steps between (untimed) flushes")
    parser.add_argument("--batches", default="1,64,256,512")
    parser.add_argument("--work-ms", type=float, default=2.0, help="GIL-releasing work per engine-loop step")
    parser.add_argument(
        "--work-kind",
        choices=("sleep", "spin"),
        default="sleep",
        help="the engine loop's GIL-releasing work: time.sleep (the engine's core idles while it waits), "
        "or SHA-256 over a buffer (it spins, as CUDA synchronization and NCCL waits do by default)",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=24,
        help="engine-loop blocks per batch (hooked and plain alternating, the hooked ones through the "
        "variants: columns with the shipper process, repeat, columns with the shipper thread)",
    )
    parser.add_argument("--block-steps", type=int, default=250, help="steps per engine-loop block")
    parser.add_argument("--tight-seconds", type=float, default=20.0, help="length of each tight loop")
    parser.add_argument("--skip-micro", action="store_true", help="skip the engine-thread cost table")
    parser.add_argument(
        "--breakdown-rounds", type=int, default=4, help="rounds of the batch-256 breakdown (0: skip it)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the engine loop (this process, and a shipper thread) on CPU 0 and the sidecars and the "
        "shipper processes on the other CPUs, as a deployment that keeps them off the engine's cores",
    )
    parser.add_argument(
        "--sidecar-nice",
        type=int,
        default=None,
        help="niceness of the sidecar the engine loop talks to (default: inherited)",
    )
    parser.add_argument("--tight-child", help=argparse.SUPPRESS)
    parser.add_argument("--drain-child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=20.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.blocks < 2 * len(LOOP_VARIANTS):
        parser.error(
            f"--blocks must be at least {2 * len(LOOP_VARIANTS)} "
            "(one of each hooked variant, as many without)"
        )
    if args.drain_child:
        _drain_child(args.drain_child)
        return 0
    if args.tight_child:
        print(json.dumps(run_tight_loop(args.tight_child, args.batch, args.seconds)))
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    work: Callable[[float], None] = time.sleep if args.work_kind == "sleep" else spin_work()
    sidecar_cpus: set[int] | None = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, {cpus[0]})  # before any thread starts: they inherit it
        sidecar_cpus = set(cpus[1:])
        global SHIPPER_CPUS
        SHIPPER_CPUS = sidecar_cpus
    tmp = tempfile.mkdtemp(dir="/tmp", prefix="et-bench-")
    started = time.monotonic()
    pinned = (
        f", engine loop on CPU {cpus[0]}, sidecar and shipper processes on {sorted(sidecar_cpus)}"
        if sidecar_cpus
        else ""
    )
    print(
        f"enginetime hooks bench, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, CPU timer{pinned}"
    )
    if not args.skip_micro:
        path = os.path.join(tmp, "drain.sock")
        server = DrainServer(path)
        rows = []
        adapters = []
        try:
            for batch in batches:
                for mode in SHIPPERS:
                    before = server.bytes
                    row = run_batch("unix:" + path, batch, args.steps, args.chunk, mode)
                    time.sleep(0.05)
                    row["bytes_per_step"] = (server.bytes - before) / args.steps
                    rows.append(row)
            for batch in batches:
                adapter_steps = max(400, args.steps // 4)
                adapters.append(
                    (
                        batch,
                        sglang_steps("unix:" + path, batch, adapter_steps),
                        vllm_steps("unix:" + path, batch, adapter_steps),
                    )
                )
        finally:
            server.close()
            os.unlink(path)
        print(
            f"\nengine-thread cost per step (step_begin + columns from lists + step_end), "
            f"{args.steps} steps per batch, back to back against a draining socket"
        )
        print(
            f"{'':>6} {'':>8} {'with columns':>21} {'decode as ints':>21} {'hooks only':>21} {'repeat':>21}"
        )
        print(
            f"{'batch':>6} {'shipper':>8} {'median µs':>10} {'p99 µs':>10} {'median µs':>10} {'p99 µs':>10} "
            f"{'median µs':>10} {'p99 µs':>10} {'median µs':>10} {'p99 µs':>10} "
            f"{'shipper CPU µs/step':>20} {'bytes/step':>11} {'dropped':>8}"
        )
        for r in rows:
            print(
                f"{r['batch']:>6} {r['shipper']:>8} {r['median_us']:>10.2f} {r['p99_us']:>10.2f} "
                f"{r['ints_median_us']:>10.2f} "
                f"{r['ints_p99_us']:>10.2f} {r['hooks_median_us']:>10.2f} {r['hooks_p99_us']:>10.2f} "
                f"{r['repeat_median_us']:>10.2f} {r['repeat_p99_us']:>10.2f} "
                f"{r['shipper_us']:>20.2f} {r['bytes_per_step']:>11.0f} {r['dropped']:>8}"
                + (f" ({r['repeat_refused']} repeats refused)" if r["repeat_refused"] else "")
            )
        print(
            "(with columns: the four lists built from request objects; decode as ints: handles and "
            "context built, prefill_tokens=0 and decode_tokens=1 passed as ints, as the SGLang adapter "
            "passes a decode batch; hooks only: the lists already built; repeat: the same requests as "
            "the step before, compared and recorded with step_repeat; shipper: where the socket work "
            "runs, its own process or a thread in the engine's; its CPU is the mean over all four kinds)"
        )
        print(
            "\nthe adapters' own code per step (bench/adapter_steps.py: SGLang begin + after_run + "
            "after_process, vLLM on_schedule + on_update), shipper process, median µs"
        )
        print(
            f"{'batch':>6} {'SGLang unchanged':>17} {'SGLang changed':>15} "
            f"{'vLLM unchanged':>15} {'vLLM changed':>13} {'vLLM mixed':>11}"
        )
        for batch, sg, vl in adapters:
            print(
                f"{batch:>6} {sg['unchanged']:>17.2f} {sg['changed']:>15.2f} {vl['unchanged']:>15.2f} "
                f"{vl['changed']:>13.2f} {vl['mixed']:>11.2f}"
            )
        print(
            "(unchanged: a decode batch of the same requests as the step before, recorded as a repeat; "
            "changed: one request leaves and one joins every step, so the batch is read in full; "
            "mixed: the decodes plus a new request's 100-token prompt, vLLM's chunked-prefill step)"
        )
    try:
        sidecar, address = start_sidecar(tmp, args.sidecar_nice, cpus=sidecar_cpus)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        loops = [
            row
            for b in batches
            for row in run_engine_loop(
                address,
                b,
                args.blocks,
                args.block_steps,
                args.work_ms / 1e3,
                work,
            ).values()
        ]
        breakdown = None
        if args.breakdown_rounds > 0:
            drain_path = os.path.join(tmp, "drain-proc.sock")
            drain = subprocess.Popen(
                [sys.executable, __file__, "--drain-child", drain_path], stdin=subprocess.PIPE
            )
            niced, niced_address = start_sidecar(tmp, 19, "niced", cpus=sidecar_cpus)
            try:
                deadline = time.monotonic() + 30
                while not os.path.exists(drain_path) and time.monotonic() < deadline:
                    time.sleep(0.05)
                breakdown = run_breakdown(
                    {
                        "hooks, no reader": "unix:" + os.path.join(tmp, "nobody.sock"),
                        "hooks, drain process": "unix:" + drain_path,
                        "hooks, sidecar": address,
                        "hooks, sidecar nice 19": niced_address,
                    },
                    256,
                    args.breakdown_rounds,
                    args.block_steps,
                    args.work_ms / 1e3,
                    work,
                )
            finally:
                assert drain.stdin is not None
                drain.stdin.close()
                drain.wait(10)
                niced.terminate()
                niced.wait(20)
        tight_live = _tight_in_child(address, 256, args.tight_seconds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(20)
        except subprocess.TimeoutExpired:
            sidecar.kill()
    tight_dead = _tight_in_child("unix:" + os.path.join(tmp, "nobody.sock"), 256, args.tight_seconds)
    print(
        f"\nengine-shaped loop: {args.work_ms:g} ms of GIL-releasing work "
        f"({'time.sleep' if args.work_kind == 'sleep' else 'SHA-256, spinning'}) per step, "
        f"live sidecar, {args.blocks} blocks of {args.block_steps} steps, with hooks (each variant in turn) "
        "and without, alternating"
    )
    print(
        f"{'batch':>6} {'variant':>16} {'base mean µs':>13} {'base p99 µs':>12} {'mean ratio':>11} "
        f"{'p99 ratio':>10} "
        f"{'noise mean':>11} {'noise p99':>10} {'hook µs':>8} {'step_end µs':>12} {'max hook µs':>12} "
        f"{'dropped':>8}"
    )
    for r in loops:
        print(
            f"{r['batch']:>6} {r['shipper']:>16} {r['base_mean_us']:>13.1f} {r['base_p99_us']:>12.1f} "
            f"{r['mean_ratio']:>11.4f} "
            f"{r['p99_ratio']:>10.4f} {r['noise_mean']:>11.4f} {r['noise_p99']:>10.4f} "
            f"{r['hook_mean_us']:>8.1f} {r['end_mean_us']:>12.1f} {r['hook_max_us']:>12.1f} {r['dropped']:>8}"
        )
    print(
        "(variant: process / thread: the columns built from request objects and step_end, the "
        "shipper in its own process or a thread; process, repeat: the batch compared with the step "
        "before and step_repeat; noise: plain blocks of even pairs vs odd pairs; hook µs: mean "
        "engine-thread time, inside the loop, after the work; step_end µs: the recorder call alone; "
        "goal at batch 256: mean <= 1.01, p99 <= 1.10)"
    )
    if breakdown is not None:
        print(
            f"\nwhere the extra time goes, batch 256, {args.breakdown_rounds} rounds of one "
            f"{args.block_steps}-step block per variant (rotated):"
        )
        print(f"{'variant':>30} {'mean µs':>9} {'mean ratio':>11} {'p99 ratio':>10}")
        for name, b in breakdown.items():
            print(f"{name:>30} {b['mean_us']:>9.1f} {b['mean_ratio']:>11.4f} {b['p99_ratio']:>10.4f}")
        print(
            "(no thread: the append alone to an in-process ring that nothing reads; no reader: the shipper "
            "process finds no sidecar and drops; drain process: it writes every frame to a "
            "process that only reads; sidecar: a real one decodes and accounts them; nice 19: the same at "
            "the lowest CPU priority; shipper thread: the same with the shipper a thread in this process)"
        )
    print(f"\ntight loop, batch 256, steps back to back for {args.tight_seconds:g} s, fresh process each:")
    print(f"{'sidecar':>8} {'steps':>9} {'RSS growth MB':>14} {'worst call ms':>14} {'dropped':>9}")
    for label, t in (("live", tight_live), ("absent", tight_dead)):
        print(
            f"{label:>8} {t['steps']:>9} {t['rss_growth_mb']:>14.1f} {t['worst_ms']:>14.2f} {t['dropped']:>9}"
        )
    print("(goal: RSS growth <= 100 MB, no engine-thread stall over 50 ms)")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"(took {time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
