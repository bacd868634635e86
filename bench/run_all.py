"""Run every CPU benchmark in a quick mode, one after another, and print their figures.

``make bench`` runs this. Each benchmark is its own process (as when run by hand) with
smaller sizes than its defaults, so the whole set finishes in a few minutes on two cores;
the figures are the same kind (ratios side by side in one run) but noisier than a full
run. ``--full`` runs each with its own defaults (tens of minutes); ``--only NAME`` picks
benchmarks. The GPU checks (cuda_timer_check.py, adapters_cuda_check.py, testbed_cuda.py)
are not run: they need a CUDA device.

Run: ``.venv/bin/python bench/run_all.py [--full] [--only hooks --only fanout ...]``.
Exit status: 0 when every benchmark ran to its end (a goal a benchmark reports as missed
is a figure to read, not a failure of this script), 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (script, quick arguments). Quick sizes keep each under about half a minute on two cores.
BENCHES: dict[str, tuple[str, tuple[str, ...]]] = {
    "hooks": (
        "bench_hooks.py",
        (
            "--steps",
            "3000",
            "--batches",
            "1,256",
            "--blocks",
            "6",
            "--tight-seconds",
            "5",
            "--breakdown-rounds",
            "2",
        ),
    ),
    "ledger": ("bench_ledger.py", ("--groups", "300", "--requests", "20000")),
    "ingest": ("bench_ingest.py", ("--groups", "300")),
    "scale": (
        "bench_scale.py",
        ("--shards", "16,32,64", "--entries", "1000000", "--pace-seconds", "2", "--sidecars", "4,8,16")
        + ("--seconds", "3"),
    ),
    "accounting_encode": ("bench_accounting_encode.py", ("--requests", "2000", "--reps", "3")),
    "guard": ("bench_guard.py", ("--watched", "2000", "--batches", "10")),
    "fanout": (
        "bench_fanout.py",
        ("--subscribers", "10", "--requests", "1000", "--seconds", "3", "--mode", "both"),
    ),
    "getrequest": ("bench_getrequest.py", ("--rate", "100000", "--seconds", "3")),
    "advise": ("bench_advise.py", ("--rate", "100000", "--seconds", "3")),
    "tracing_overhead": ("bench_tracing_overhead.py", ("--groups", "500", "--rounds", "1")),
    "testbed_overhead": (
        "bench_testbed_overhead.py",
        ("--batches", "64", "--reps", "3", "--tokens", "32", "--threads", "1"),
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="each benchmark's own default sizes")
    ap.add_argument("--only", action="append", choices=sorted(BENCHES), help="run only these (repeatable)")
    args = ap.parse_args()
    names = args.only or list(BENCHES)
    results: list[tuple[str, int, float]] = []
    for name in names:
        script, quick = BENCHES[name]
        cmd = [sys.executable, str(HERE / script), *(() if args.full else quick)]
        print(f"\n===== {name}: {' '.join([script, *cmd[2:]])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=HERE.parent).returncode
        results.append((name, rc, time.monotonic() - t0))
    print("\n===== summary")
    for name, rc, secs in results:
        print(f"  {name:<18} {'ok' if rc == 0 else f'FAILED (exit {rc})':<16} {secs:6.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
