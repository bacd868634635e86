"""The testbed on CUDA: CUDA-event device time vs wall per step kind, and the storm effect.

    python bench/testbed_cuda.py [--out report.json] [--storm-tokens 32768] [--shards 4]

For a GPU machine (the lead runs it once; < 3 min on one H100). Runs the demo
scenario (``enginetime.testbed.demo``: sidecar subprocess, 4 LOCKSTEP shards,
prefill-first, 512-token chunks, victims decoding on shards 0..N-2, one long
session's turn migrated onto the last shard) with a GPU-sized random model on
``cuda``: each shard thread has its own CUDA stream and the hooks time every step
with CUDA events (never a synchronize). A tap between the hooks and the sidecar
reads every step record on its way, so the script can print, per step kind and
per shard role, the device time the hooks measured next to the wall time of the
same steps. Then the storm effect: per-shard decode tok/s before / during / after,
and each victim's wall vs engine_time with and without the storm.

Exits with status 2 and says so when torch sees no CUDA device. ``--allow-cpu``
runs the same script on the CPU with a tiny model (to check the script itself).

Needs enginetime importable with its sidecar extra (``pip install -e '.[sidecar,testbed]'``,
or a PYTHONPATH that maps the package). Run it from outside the repository root if the
package is not installed: ``python -m enginetime`` started from the root would find the
bare ``enginetime/`` folder first.

Seen on one NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130), 2026-11-27:

* defaults (4 shards, 32K-token storm = 64 chunks): every step CUDA-event timed,
  device time / wall 0.999-1.001 for every step kind (the lockstep wait is inside the
  device time, as inside a real collective); decode steps ~20 ms (Python dispatch of 4
  shard threads sharing one GIL and one GPU), chunks ~38 ms: victim shards decoded at
  51 % of their pre-storm rate; victims' engine_time 1.98-2.01 s vs 1.84-2.07 s
  without the storm, wall 3.17 s vs 2.12 s.
* ``--shards 2 --victims 2 --storm-tokens 98304`` (192 chunks): victim decode 271.6 ->
  32.3 tok/s (12 %), victims' wall 1.43 -> 12.36 s (8.6x) with engine_time 1.40 ->
  1.43 s; top blame: the storm on shard 1, 10.62 s each.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict

import torch

from enginetime.engine_hooks import wire
from enginetime.engine_hooks.constants import parse_address
from enginetime.testbed.demo import DemoConfig, SidecarProcess, render, run_demo
from enginetime.testbed.model import ModelConfig
from enginetime.v1 import ingest_pb2

#: Few, wide layers: a decode step costs Python dispatch per layer (and the GIL is shared by
#: the shard threads), a prefill chunk costs FLOPs; 4 x 4096 makes chunks compute-bound
#: (~1 TFLOP each at 32K context, fp32) while a decode step stays a few ms.
GPU_MODEL = ModelConfig(
    vocab_size=32000,
    d_model=4096,
    n_layers=4,
    n_heads=32,
    head_dim=128,
    d_ff=16384,
    max_context=131072,
    seed=0,
)
CPU_MODEL = ModelConfig(
    vocab_size=1024, d_model=128, n_layers=2, n_heads=4, head_dim=32, d_ff=512, max_context=65536, seed=0
)


def _varint(buf: bytearray, pos: int) -> tuple[int, int] | None:
    shift = value = 0
    while pos < len(buf):
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return None


class FrameTap:
    """A Unix-socket relay: hooks connect here, bytes go on to the sidecar, step records are kept."""

    def __init__(self, upstream: str | None) -> None:
        self.dir = tempfile.mkdtemp(prefix="et-tap-", dir="/tmp")
        self.address = f"unix:{self.dir}/tap.sock"
        self.upstream = upstream
        self.lock = threading.Lock()
        self.steps: list[tuple[int, ingest_pb2.StepRecord]] = []  # (shard, record)
        self.errors: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(f"{self.dir}/tap.sock")
        self._sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        up = None
        if self.upstream:
            try:
                family, target = parse_address(self.upstream)
                up = socket.socket(socket.AF_UNIX if family == "unix" else socket.AF_INET, socket.SOCK_STREAM)
                up.connect(target)
            except OSError as exc:
                self.errors.append(f"cannot reach the sidecar: {exc}")
                up = None
        buf = bytearray()
        shard = -1
        while True:
            try:
                data = conn.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            if up is not None:
                try:
                    up.sendall(data)
                except OSError as exc:
                    self.errors.append(f"sidecar connection lost: {exc}")
                    up = None
            buf += data
            while (head := _varint(buf, 0)) is not None and head[1] + head[0] <= len(buf):
                size, start = head
                frame = ingest_pb2.IngestFrame.FromString(bytes(buf[start : start + size]))
                del buf[: start + size]
                which = frame.WhichOneof("frame")
                if which == "hello":
                    shard = frame.hello.shard
                elif which == "step":
                    with self.lock:
                        self.steps.append((shard, frame.step))
                elif which == "packed_step":  # what recorders send (protocol v2)
                    record = _packed_to_record(frame.packed_step)
                    with self.lock:
                        self.steps.append((shard, record))
        conn.close()
        if up is not None:
            up.close()


def _packed_to_record(body: bytes) -> ingest_pb2.StepRecord:
    """A packed step as the StepRecord it stands for."""
    fields = wire.unpack_step(body)
    global_step = fields.pop("global_step")
    record = ingest_pb2.StepRecord(**fields)
    if global_step is not None:
        record.global_step = global_step
    return record


def step_table(tap: FrameTap, storm_shard: int) -> list[dict]:
    """Per (role, kind): count, median device and wall ms, device/wall over the summed steps."""
    groups: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
    with tap.lock:
        steps = list(tap.steps)
    for shard, st in steps:
        role = "storm shard" if shard == storm_shard else "victim shards"
        kind = ingest_pb2.StepKind.Name(st.kind).removeprefix("STEP_KIND_")
        groups[(role, kind)].append((st.device_time_ns, st.end_time_ns - st.start_time_ns, st.timer_source))
    rows = []
    for (role, kind), vals in sorted(groups.items()):
        dev = [v[0] for v in vals]
        wall = [v[1] for v in vals]
        cuda = sum(1 for v in vals if v[2] == ingest_pb2.TIMER_SOURCE_CUDA_EVENT)
        rows.append(
            {
                "role": role,
                "kind": kind,
                "steps": len(vals),
                "cuda_timed": cuda,
                "device_ms_median": statistics.median(dev) / 1e6,
                "wall_ms_median": statistics.median(wall) / 1e6,
                "device_s_total": sum(dev) / 1e9,
                "wall_s_total": sum(wall) / 1e9,
                "device_over_wall": sum(dev) / max(sum(wall), 1),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--storm-tokens", type=int, default=32768)
    ap.add_argument("--victims", type=int, default=6)
    ap.add_argument("--policy", default="prefill-first", choices=("prefill-first", "mixed"))
    ap.add_argument(
        "--out", default=None, help="write the full report (demo report + step table) as JSON here"
    )
    ap.add_argument(
        "--allow-cpu", action="store_true", help="run on the CPU with a tiny model (script check)"
    )
    args = ap.parse_args()

    if torch.cuda.is_available():
        device, model = "cuda", GPU_MODEL
        print(
            f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    elif args.allow_cpu:
        device, model = "cpu", CPU_MODEL
        print(
            f"no CUDA device: --allow-cpu, running on the CPU with a tiny model (torch {torch.__version__})"
        )
    else:
        print(
            "testbed_cuda: torch sees no CUDA device (torch.cuda.is_available() is False); run this on "
            "a GPU machine, or pass --allow-cpu to check the script on the CPU",
            file=sys.stderr,
        )
        return 2

    t0 = time.perf_counter()
    sidecar = None
    try:
        sidecar = SidecarProcess()
    except Exception as exc:  # the step table still works without it
        print(f"WARNING: no sidecar ({exc}); device times only, no accounting", file=sys.stderr)
    tap = FrameTap(sidecar.ingest if sidecar else None)
    cfg = DemoConfig(
        shards=args.shards,
        coupling="lockstep",
        policy=args.policy,
        chunk=512,
        storm_tokens=args.storm_tokens,
        victims=args.victims,
        device=device,
        model=model,
        prefix_cache_tokens=1 << 20,
    )

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    try:
        if sidecar is None:
            raise RuntimeError("the demo scenario needs a sidecar for its accounting")
        report = run_demo(cfg, say, sidecar=sidecar, ingest=tap.address)
    finally:
        if sidecar is not None:
            sidecar.stop()
    table = step_table(tap, cfg.shards - 1)
    print()
    print(render(report))
    print()
    print(
        f"step device time (hooks: {'CUDA events' if device == 'cuda' else 'monotonic clock'}) vs wall, "
        "per step kind"
    )
    print(
        f"  {'role':<14} {'kind':<8} {'steps':>6} {'cuda-timed':>10} {'device ms':>10} {'wall ms':>9} "
        f"{'device s':>9} {'wall s':>8} {'dev/wall':>8}"
    )
    for r in table:
        print(
            f"  {r['role']:<14} {r['kind']:<8} {r['steps']:>6} {r['cuda_timed']:>10} "
            f"{r['device_ms_median']:>10.2f} {r['wall_ms_median']:>9.2f} {r['device_s_total']:>9.2f} "
            f"{r['wall_s_total']:>8.2f} {r['device_over_wall']:>8.3f}"
        )
    if tap.errors:
        print(f"tap errors: {tap.errors[:3]}", file=sys.stderr)
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
            json.dump(
                {
                    "device": device,
                    "device_name": name,
                    "torch": torch.__version__,
                    "report": report,
                    "step_table": table,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
