"""Two engine shard processes of one LOCKSTEP engine: the harness of the cross-process tests.

Each shard is its own Python process with a real ``Recorder``. It does real work
sized by its batch (numpy matmuls through a small stack of layers: the weights are
read once per step however small the batch) and meets its peer at a collective
after every step (a socketpair all-gather of their token counts, as DP attention's
MoE layers gather), so a shard's step lasts as long as the slower shard's.

A test writes ``PRELUDE`` followed by its own scheduler loop to a file and starts
the pair with ``start_pair``. The prelude gives the loop ``SHARD``, ``ADDRESS``,
``P`` (the test's parameters, JSON; ``P["forward"]`` = [hidden, layers, fixed
rows] sizes the work), ``forward(tokens)`` and ``all_gather(tokens, more)``. The
loop talks to the test over stdin/stdout: it prints "ready" once connected, waits
for a line ("go"), and prints "done {json}" at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

PRELUDE = r"""
import json, os, socket, sys, time
import numpy as np
from enginetime.engine_hooks import Recorder, StepKind

SHARD, ADDRESS, PEER_FD = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
P = json.loads(sys.argv[4])
HIDDEN, LAYERS, FIXED_ROWS = P["forward"]

rng = np.random.default_rng(SHARD)
weights = [rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) / HIDDEN**0.5 for _ in range(LAYERS)]


def forward(tokens):
    x = np.ones((tokens + FIXED_ROWS, HIDDEN), dtype=np.float32)
    for w in weights:
        x = np.tanh(x @ w)
    return float(x[0, 0])


peer = socket.socket(fileno=PEER_FD)


def all_gather(tokens, more):
    # The collective every lockstep step ends with: returns when BOTH shards got here.
    peer.sendall(tokens.to_bytes(4, "little") + more.to_bytes(4, "little"))
    buf = b""
    while len(buf) < 8:
        chunk = peer.recv(8 - len(buf))
        if not chunk:
            raise SystemExit("peer shard went away")
        buf += chunk
    return int.from_bytes(buf[:4], "little"), int.from_bytes(buf[4:], "little")
"""


class ShardProcess:
    """One engine shard process; its stderr goes to ``shard-N.log`` beside the script."""

    def __init__(self, script: Path, shard: int, address: str, peer: socket.socket, params: str) -> None:
        # One BLAS thread per shard: two shards share the machine like two ranks share a node.
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.log = script.with_name(f"shard-{shard}.log")
        with open(self.log, "wb") as err:  # a file, never a pipe that could fill and stall the shard
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(shard), address, str(peer.fileno()), params],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                pass_fds=[peer.fileno()],
                env=env,
            )
        self.shard = shard

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def expect(self, word: str) -> str:
        """The rest of the next stdout line, which must start with ``word``."""
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            self.kill()
            raise AssertionError(
                f"shard {self.shard}: expected {word!r}, got {line!r}; stderr:\n{self.stderr()}"
            )
        return line[len(word) :].strip()

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> dict:
        """The shard's "done" summary, once it exited cleanly."""
        summary = json.loads(self.expect("done"))
        assert self.proc.wait(timeout) == 0, self.stderr()
        return summary

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_pair(script: Path, loop: str, address: str, params: dict) -> list[ShardProcess]:
    """Write PRELUDE + ``loop`` to ``script`` and start shards 0 and 1 joined by a socketpair."""
    script.write_text(PRELUDE + loop)
    text = json.dumps(params)
    a, b = socket.socketpair()
    try:
        return [ShardProcess(script, k, address, s, text) for k, s in ((0, a), (1, b))]
    finally:
        a.close()
        b.close()
