"""Wire constants shared by every adapter and the sidecar.

Plain IntEnums with the numbers of proto/enginetime/v1/ingest.proto, so the engine
process needs no protobuf library; a test checks them against the generated enums.
"""

from __future__ import annotations

import enum
import os

#: v2: steps travel as IngestFrame.packed_step. A sidecar accepts every version from
#: MIN_PROTOCOL_VERSION to its own (v1 recorders send StepRecord frames, still read).
PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1
HOOKS_VERSION = "0.1.0"

#: Where hooks send frames and the sidecar listens when nothing else is said: a
#: directory of the user's own under /tmp (``{uid}`` is the process's uid), so
#: two users on one host never share, and neither can squat the other's socket.
#: Not $XDG_RUNTIME_DIR: an engine started by a service manager often lacks it while
#: the sidecar started from a login shell has it, and both sides must agree.
#: Overridden by the ENGINETIME_INGEST environment variable (same syntax as
#: ``enginetime sidecar --ingest``: ``unix:PATH`` or ``tcp:HOST:PORT``).
DEFAULT_INGEST_TEMPLATE = "unix:/tmp/enginetime-{uid}/ingest.sock"
INGEST_ENV = "ENGINETIME_INGEST"
#: TCP ingest's shared secret: a file holding it (preferred) or the value itself.
TOKEN_FILE_ENV = "ENGINETIME_TOKEN_FILE"
TOKEN_ENV = "ENGINETIME_TOKEN"
#: TCP ingest over TLS: the CA bundle (PEM) that signed the sidecar's certificate.
TLS_CA_ENV = "ENGINETIME_TLS_CA"
#: "process" (default where the OS allows it), "thread" or "auto": where the shipper runs.
SHIPPER_ENV = "ENGINETIME_SHIPPER"


def default_ingest_address() -> str:
    """This user's default ingest address (the same rule in the hooks and the sidecar)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return DEFAULT_INGEST_TEMPLATE.format(uid=uid)


DEFAULT_INGEST_ADDRESS = default_ingest_address()

#: Where the sidecar serves gRPC and clients look for it when nothing else is said
#: (loopback only; ``enginetime sidecar --listen`` changes it).
DEFAULT_GRPC_ADDRESS = "127.0.0.1:50151"

#: Largest frame the sidecar accepts; hooks never produce one this big
#: (a 4096-entry step is ~64 KiB).
MAX_FRAME_BYTES = 4 * 1024 * 1024


def ingest_address(explicit: str | None = None) -> str:
    """The ingest address to use: explicit, else $ENGINETIME_INGEST, else the default."""
    return explicit or os.environ.get(INGEST_ENV) or default_ingest_address()


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """Split ``unix:PATH`` / ``tcp:HOST:PORT`` into (family, target).

    Raises ValueError with the accepted forms when the address is not one of them.
    """
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ValueError(f"bad ingest address {address!r}: unix: needs a path, e.g. unix:/tmp/x.sock")
        return "unix", path
    if address.startswith("tcp:"):
        host, sep, port = address[len("tcp:") :].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"bad ingest address {address!r}: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:7070"
            )
        return "tcp", (host.strip("[]"), int(port))
    raise ValueError(f"bad ingest address {address!r}: expected unix:PATH or tcp:HOST:PORT")


class Coupling(enum.IntEnum):
    """How an engine's shards' steps interact (numbers of enginetime.v1.Coupling)."""

    UNSPECIFIED = 0
    INDEPENDENT = 1
    LOCKSTEP = 2

    @classmethod
    def parse(cls, value: Coupling | str | int) -> Coupling:
        """Accept an enum, its number, or a name like 'lockstep' (CLI flags)."""
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                raise ValueError(f"unknown coupling {value!r}: use 'independent' or 'lockstep'") from None
        return cls(value)


class TimerSource(enum.IntEnum):
    """What measured a shard's step durations (numbers of enginetime.v1.TimerSource)."""

    UNSPECIFIED = 0
    MONOTONIC = 1
    CUDA_EVENT = 2


class StepKind(enum.IntEnum):
    UNSPECIFIED = 0
    PREFILL = 1
    DECODE = 2
    MIXED = 3
    IDLE = 4


class EventKind(enum.IntEnum):
    UNSPECIFIED = 0
    ARRIVED = 1
    SCHEDULED = 2
    PREEMPTED = 3
    RESUMED = 4
    FINISHED = 5
    ABORTED = 6
