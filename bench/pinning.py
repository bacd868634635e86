"""CPU placement for the benches that emulate a deployment's core layout (``--pin``)."""

from __future__ import annotations

import os


def pin_process(pid: int, cpus: set[int]) -> None:
    """Move every thread of a running process onto ``cpus``.

    ``sched_setaffinity`` on a pid moves only its main thread; a sidecar's gRPC and
    ingest threads, or a shipper process's, already run by then.
    """
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass
