"""The shipper in its own process: the engine's interpreter runs no thread of ours.

The ring (engine_hooks/shm_ring.py) is checked on its own — wrap-around, refusal when
full, a corrupt writer refused — and the recorder with its shipper process against a
real Unix-socket server (the FrameServer of test_hooks_recorder): no thread in the
engine process, a killed shipper process replaced with the live requests replayed, an
engine process that dies taking its shipper with it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import test_hooks_recorder as hooks_recorder
from test_hooks_recorder import add_big_steps, add_step, delivered

from enginetime.engine_hooks import Recorder, shm_ring

# The recorder tests' fixtures: a temporary socket folder, a FrameServer listening in it.
sockdir = hooks_recorder.sockdir
server = hooks_recorder.server


def test_the_ring_keeps_records_whole_and_in_order_across_wraps():
    _fd, mm = shm_ring.create(shm_ring.MIN_CAPACITY)
    writer = shm_ring.RingWriter(mm)
    reader = shm_ring.RingReader(mm)
    rng = random.Random(5)
    sent: list[bytes] = []
    got: list[bytes] = []
    for i in range(3000):  # ~20 times round the ring, records of awkward sizes
        payload = bytes([i % 251]) * rng.randrange(0, 300)
        if writer.write(shm_ring.FRAME, payload):
            sent.append(payload)
        if rng.random() < 0.3:
            got += [p for _, p in reader.records()]
            reader.release()
    got += [p for _, p in reader.records()]
    assert got == sent and len(sent) == 3000


def test_a_full_ring_refuses_records_and_never_overwrites_unread_ones():
    _fd, mm = shm_ring.create(shm_ring.MIN_CAPACITY)
    writer = shm_ring.RingWriter(mm)
    payloads = [bytes([i]) * 1000 for i in range(100)]
    accepted = [p for p in payloads if writer.write(shm_ring.FRAME, p)]
    assert 50 < len(accepted) < 66  # 64 KiB of 1005-byte records, then refusals
    reader = shm_ring.RingReader(mm)
    assert [p for _, p in reader.records(limit=None)] == accepted  # the first ones, intact


def test_a_ring_with_impossible_positions_is_refused_not_read():
    _fd, mm = shm_ring.create(shm_ring.MIN_CAPACITY)
    shm_ring.put(mm, shm_ring.WRITE_POS, 10 * shm_ring.MIN_CAPACITY)
    with pytest.raises(ValueError, match="inconsistent"):
        shm_ring.RingReader(mm).records()
    _fd, mm = shm_ring.create(shm_ring.MIN_CAPACITY)
    shm_ring.RECORD_HEAD.pack_into(
        mm, shm_ring.HEADER_SIZE, 60_000, shm_ring.FRAME
    )  # past the write position
    shm_ring.put(mm, shm_ring.WRITE_POS, 100)
    with pytest.raises(ValueError, match="corrupt"):
        shm_ring.RingReader(mm).records()


def test_the_engine_process_runs_no_thread_of_ours(server):
    before = {t.name for t in threading.enumerate()}
    with Recorder("eng-proc", address=server.address, timer="cpu") as rec:
        h = rec.request_arrived("r1", prompt_tokens=7)
        for i in range(20):
            add_step(rec, [h], global_step=i)
        rec.request_finished(h, output_tokens=20)
        assert delivered(rec, server)
        st = rec.stats()
        new = {t.name for t in threading.enumerate()} - before
        assert all(name.endswith("(_read_loop)") for name in new), new  # only the test server's reader
    assert st.shipper == "process" and st.shipper_pid not in (None, os.getpid())
    assert st.connected and st.dropped_frames == 0 and st.errors == 0 and st.pending == 0
    assert st.shipper_cpu_ns > 0  # the shipper process's own CPU, reported back through the ring
    assert server.kinds()[0] == "hello" and [s.seq for s in server.of("step")] == list(range(20))
    assert [e.kind for e in server.of("request_event")] == [1, 5]  # ARRIVED, FINISHED


def test_the_shared_ring_is_fixed_in_size_and_counts_what_it_refuses(sockdir):
    rec = Recorder(
        "bytes-proc",
        address=f"unix:{sockdir}/nobody-here.sock",
        timer="cpu",
        buffer_bytes=1 << 20,
        start=False,  # no shipper process: nothing empties the ring
    )
    try:
        add_big_steps(rec, 4096, 200)
        mm = rec._ps.mm
        held = [t for t, _ in shm_ring.RingReader(mm).records(limit=None)]
        assert len(mm) <= (1 << 20) // 2  # a fixed mapping, a quarter of buffer_bytes plus its header
        assert 0 < held.count(shm_ring.FRAME) < 200
        assert rec.stats().dropped_steps == 200 - held.count(shm_ring.FRAME)
    finally:
        rec.close()


def test_a_killed_shipper_process_is_replaced_and_the_live_requests_replayed(server):
    with Recorder("eng-respawn", address=server.address, timer="cpu", heartbeat_interval_s=0.1) as rec:
        h = rec.request_arrived("survivor", prompt_tokens=9, session_id="s1", time_ns=111)
        add_step(rec, [h], global_step=0)
        assert delivered(rec, server)
        first = rec.stats().shipper_pid
        os.kill(first, signal.SIGKILL)
        # The engine keeps stepping; the recorder notices at its next check (once a second).
        deadline = time.monotonic() + 10
        i = 1
        while rec.stats().shipper_restarts == 0 and time.monotonic() < deadline:
            add_step(rec, [h], global_step=i)
            i += 1
            time.sleep(0.01)
        add_step(rec, [h], global_step=i)
        assert delivered(rec, server)
        st = rec.stats()
    assert st.shipper_restarts == 1 and st.shipper_pid != first and st.errors == 0
    assert server.connections == 2 and server.kinds(2)[0] == "hello"
    replay = [e for e in server.of("request_event", 2) if e.replayed]
    assert [(e.request_id, e.handle, e.prompt_tokens, e.session_id, e.time_ns) for e in replay] == [
        ("survivor", h, 9, "s1", 111)
    ]
    assert server.of("step", 2)[-1].seq == i  # the newest step made it through the new process


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan waits for whoever reaps it: it has exited all the same)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.e2e
def test_an_engine_process_that_dies_takes_its_shipper_process_with_it(server):
    engine = textwrap.dedent(
        f"""
        import os, sys
        from enginetime.engine_hooks import Recorder
        rec = Recorder("eng-dies", address={server.address!r}, timer="cpu")
        h = rec.request_arrived("r", prompt_tokens=1)
        rec.flush(5)
        print(rec.stats().shipper_pid, flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", engine], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        shipper_pid = int(proc.stdout.readline())
        assert server.wait_for(lambda: server.of("hello"))
        proc.kill()  # SIGKILL: no atexit, no close(); only the kernel closing its files
        proc.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not _running(shipper_pid):
                break
            time.sleep(0.02)
        else:
            os.kill(shipper_pid, signal.SIGKILL)
            raise AssertionError(f"shipper process {shipper_pid} outlived its engine process by 5 s")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_bad_shipper_choice_is_reported_and_the_default_used(server):
    with Recorder("eng-choice", address=server.address, timer="cpu", shipper="rocket") as rec:
        assert delivered(rec, server)
        st = rec.stats()
    assert st.shipper == "process" and st.errors == 1


def test_a_forked_child_does_not_write_into_its_parents_ring(server):
    with Recorder("eng-fork", address=server.address, timer="cpu") as rec:
        h = rec.request_arrived("parent-req", prompt_tokens=3)
        add_step(rec, [h], global_step=0)
        assert delivered(rec, server)
        pid = os.fork()
        if pid == 0:  # the child: its copy of the recorder must be inert
            try:
                rec.request_arrived("child-req")
                add_step(rec, [h], global_step=99)
                time.sleep(0.3)  # long enough for the shipper process to read whatever it wrote
                rec.close()
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        add_step(rec, [h], global_step=1)
        assert delivered(rec, server)
        st = rec.stats()
    assert [s.global_step for s in server.of("step")] == [0, 1]
    assert {e.request_id for e in server.of("request_event")} == {"parent-req"}
    assert st.dropped_frames == 0 and st.connected is True
